"""``train tiny-default`` end to end on micro versions of the shipped recipe: every stage runs, the
bundle exports with the recipe's storage options, the report covers levels, routes and baselines, and
a rerun resumes instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.train.tiny_default import CONFIG_DIR, run_tiny_default

pytestmark = pytest.mark.slow

# The shipped YAMLs with every count cut to a few steps/episodes; everything else (models, sizes,
# storage options) stays as shipped, so the test exercises the recipe the default is trained with.
MICRO = {
    "backbone.yaml": {"steps": 4, "fill_steps": 1, "localize_steps": 1, "images_per_step": 2, "eval_every": 2,
                      "save_every": 2, "warmup_steps": 1, "data": {"train_episodes": 8, "val_episodes": 3}},
    "warmstart.yaml": {"steps": 3, "batch_size": 2, "eval_every": 3, "save_every": 3, "warmup_steps": 1,
                       "data": {"train_episodes": 8, "val_episodes": 2}},
    "stage1.yaml": {"steps": 3, "batch_size": 2, "eval_every": 3, "save_every": 3, "warmup_steps": 1,
                    "data": {"train_episodes": 8, "val_episodes": 2}},
    "stage2.yaml": {"max_steps": 1, "num_generations": 2, "max_completion_length": 16, "eval_max_new_tokens": 16,
                    "save_steps": 1, "data": {"train_episodes": 2, "eval_episodes": 2}},
    "calibrate.yaml": {"max_new_tokens": 16, "data": {"episodes": 6}},
    "report.yaml": {"episodes": 6, "max_new_tokens": 16},
    "export.yaml": {},
}


def _micro_configs(root: Path) -> Path:
    root.mkdir()
    for name, overrides in MICRO.items():
        raw = yaml.safe_load((CONFIG_DIR / name).read_text()) or {}
        for key, value in overrides.items():
            raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
        (root / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def test_tiny_default_runs_every_stage_exports_and_resumes(tmp_path):
    configs = _micro_configs(tmp_path / "configs")
    out, copy = tmp_path / "run", tmp_path / "assets" / "conceptseg_tiny"
    report = run_tiny_default(out, configs=configs, bundle=copy, progress=False)

    for stage in ("backbone", "warmstart", "stage1", "stage2", "calibrate", "export"):
        assert report["time"][stage]["cpu_s"] > 0, stage
    manifest = load_bundle(copy)  # the copy verifies: every file hash matches
    assert set(manifest.routes) == {"prompt", "shortcut", "reason"}
    assert manifest.part("sam2_decoder").weight_storage == "fp16"  # export.yaml's choice reached the bundle
    assert report["export"]["weight_storage"] == "fp16" and report["export"]["bytes"] > 0
    held = report["heldout"]
    assert held["all"]["n"] == sum(v["n"] for v in held["by_level"].values())
    assert sum(v["n"] for v in held["by_route"].values()) == held["all"]["n"]
    assert set(held["by_route"]) <= {"shortcut", "reason"}
    assert "empty_mask" not in held["all"] and 0 < held["all"]["whole_image"] < 1  # baselines that can win
    assert all(0 <= held["all"][k] <= 1 for k in ("shortcut_only", "reason_only", "policy_box"))
    assert report["produced_by"]["command"].startswith("conceptseg-edge train tiny-default --out")
    assert "format_rate" in json.dumps(report["warmstart_heldout"])
    page = (out / "report.md").read_text()
    assert page.startswith("# ConceptSeg-Tiny") and f"Produced by commit `{report['produced_by']['commit']}`" in page
    assert "Route mix after calibration:" in page
    assert not list(copy.parent.glob(".*partial*"))  # the copy was staged and swapped in

    # a rerun skips the finished stages: their summaries (and timings) are kept as they were
    again = run_tiny_default(out, configs=configs, bundle=copy, progress=False)
    for stage in ("backbone", "warmstart", "stage1", "stage2", "calibrate", "export"):
        assert again["time"][stage] == report["time"][stage], stage
