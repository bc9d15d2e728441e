"""Reports that can be wrong say so: stability is never "stable" unmeasured, ``--compare-torch``
refuses a reference it cannot load (one ``error:`` line, before any timing), a bank miss is timed
with its write, route parity compares masks that can disagree, and the held-out report's baselines
can beat the model and it says which commit produced it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.benchmarks.prompt import BenchConfig, bench_prompt_route, render_table
from conceptseg_edge.benchmarks.routes import CONCEPTS, bank_miss
from conceptseg_edge.benchmarks.stats import STABILITY_MIN_RUNS, LatencyStats, StageSeries, stability_note
from conceptseg_edge.cli import main
from conceptseg_edge.export.concept import PARTIAL_COVERAGE, coverage_class
from conceptseg_edge.data.world import ConceptWorld
from conceptseg_edge.manifest import MANIFEST_NAME, load_bundle
from conceptseg_edge.metrics import iou
from conceptseg_edge.router import RouterConfig
from conceptseg_edge.runtime.segmenter import ConceptSegmenter
from conceptseg_edge.train.items import VAL_OFFSET

EMBEDDED = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"


# ----------------------------------------------------------------------------- stability


@pytest.mark.parametrize("samples,stable", [
    ([10.0, 10.0, 10.0, 20.0, 20.0], False),  # 5 runs that doubled: measured, drifting (read "stable" before)
    ([10.0, 10.1, 10.0, 10.1, 10.0], True),  # 5 runs, flat
    ([10.0, 30.0], None),  # 2 runs: not measured (read "stable" before)
    ([10.0], None),
    ([10.0] * 5 + [11.0] * 7, False),  # a long series: first five vs last five, as before
    ([10.0] * 12, True),
], ids=["5-drift", "5-flat", "2-runs", "1-run", "12-drift", "12-flat"])
def test_stability_is_measured_or_said_to_be_unmeasured(samples, stable):
    assert LatencyStats.from_samples(samples).stable is stable
    series = StageSeries.from_samples([{"a": s, "b": 1.0} for s in samples])
    assert series.stable is stable and series.to_json()["total"]["stable"] is stable
    note = stability_note(series.stable)
    assert ("UNSTABLE" in note) == (stable is False)
    assert (f"not measured (fewer than {STABILITY_MIN_RUNS} runs)" in note) == (stable is None)


# ----------------------------------------------------------------------------- --compare-torch


def _one_error_line(capsys, rc: int, pattern: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), (pattern, err[0])


@pytest.mark.parametrize("route", ["prompt", "all"])
@pytest.mark.parametrize("case", ["recorded_path_missing", "other_weights"])
def test_compare_torch_refuses_a_reference_it_cannot_load(route, case, concept_checkpoint, tmp_path, capsys):
    """A bundle whose recorded checkpoint is not on this machine: refused, naming that path
    and --checkpoint (the prompt route said "unknown SAM2 variant", the routes bench dropped torch
    silently); a checkpoint whose weights are not the bundle's is refused by hash. Before any timing."""
    bundle = shutil.copytree(EMBEDDED, tmp_path / "bundle")
    # the bundle records where it was trained; on another machine (or after `rm -rf runs`) that is gone
    recorded = str(tmp_path / "gone" / "checkpoint")
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    raw["source"]["checkpoint"] = recorded
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    args = ["bench", str(bundle), "--route", route, "--compare-torch", "--runs", "1", "--warmup", "0",
            "--json", str(tmp_path / "b.json")]
    if case == "recorded_path_missing":
        pattern = rf"source\.checkpoint {re.escape(recorded)}: not found .*pass --checkpoint"
    else:
        args += ["--checkpoint", str(concept_checkpoint)]
        pattern = rf"--checkpoint {re.escape(str(concept_checkpoint))}: sha256 \w+… differs from the bundle's"
    _one_error_line(capsys, main(args), pattern)
    assert not (tmp_path / "b.json").exists()


def test_compare_torch_on_a_concept_bundles_prompt_route_times_its_backbone(concept_bundle):
    """A concept bundle's prompt route is its SAM2 backbone: torch builds the one the checkpoint names."""
    report = bench_prompt_route(concept_bundle, BenchConfig(runs=1, warmup=0, compare_torch=True), progress=False)
    assert report.torch is not None and not report.torch_random_init
    assert report.torch.total.p50 > 0 and set(report.ratio_runtime_over_torch_p50) >= {"encoder", "total"}
    assert "stability not measured" in render_table(report).splitlines()[0]


# ----------------------------------------------------------------------------- bank miss


def test_bank_miss_series_pays_the_lookup_and_the_write(concept_bundle, tmp_path):
    seg = ConceptSegmenter.from_bundle(concept_bundle, bank_dir=tmp_path / "bank")
    image = np.zeros((64, 64, 3), np.uint8)
    run = bank_miss(seg, tmp_path / "misses", image)
    for n in (1, 2):
        assert run()["concept_tokens"] > 0
        written = sorted((tmp_path / "misses").glob("*/*/*.npy"))
        assert len(written) == n  # every timed miss wrote its tokens, as a first request does
    assert seg.bank.get(CONCEPTS[0]) is None  # the bench's own bank is left as it was


# ----------------------------------------------------------------------------- route parity


@pytest.mark.parametrize("share,expected", [(0.0, "empty"), (0.02, "under"), (0.05, "partial"), (0.3, "partial"),
                                            (0.6, "partial"), (0.9, "over"), (1.0, "over")])
def test_coverage_classes(share, expected):
    mask = np.zeros(1000, bool)
    mask[:int(round(share * 1000))] = True
    assert coverage_class(mask.reshape(10, 100)) == expected


def test_route_parity_is_recorded_on_partial_masks(concept_bundle):
    """The export compared only runtime masks covering PARTIAL_COVERAGE of the image, and says how many
    of how many screened episodes qualified and what the others were."""
    for route, entry in load_bundle(concept_bundle).route_parity.items():
        assert entry["coverage"] == list(PARTIAL_COVERAGE), route
        assert 1 <= entry["samples"] <= entry["screened"], route
        assert entry["screened"] == entry["samples"] + sum(entry["not_partial"].values()), route
        assert set(entry["not_partial"]) == {"empty", "under", "over"} and entry["torch_empty"] == 0, route
        assert entry["min_mask_iou"] >= 0.98, route


# ----------------------------------------------------------------------------- held-out report


def test_heldout_report_has_baselines_that_can_win_and_says_what_produced_it(concept_bundle):
    from conceptseg_edge.generation import GenerationConfig
    from conceptseg_edge.train.tiny_default import (
        BASELINES,
        SHORTCUT_ALONE,
        ReportConfig,
        evaluate_default,
        render_report,
    )

    # every shortcut rejected (tau 1): the router sends every query to reason, and "shortcut only" must
    # still be the shortcut's own mask, not the forced shortcut's fallback to reason
    never = RouterConfig(taus={n: 1.0 for n in range(1, 5)})
    segment = ConceptSegmenter.from_bundle(concept_bundle, generation=GenerationConfig(8), router=never).segment
    alone = ConceptSegmenter.from_bundle(concept_bundle, generation=GenerationConfig(8), router=SHORTCUT_ALONE).segment
    cfg = ReportConfig(image_size=128, episodes=4, max_new_tokens=8)
    held = evaluate_default(segment, alone, cfg, progress=False)
    row = held["all"]
    assert row["n"] >= 1 and "empty_mask" not in row
    assert set(row) == {"n", "fg_iou", *BASELINES} and set(held["by_route"]) == {"reason"}
    assert row["fg_iou"] == row["reason_only"]  # routed = reason here
    world = ConceptWorld(cfg.seed, cfg.image_size)
    episodes = [ep for ep in (world.episode(i) for i in range(VAL_OFFSET, VAL_OFFSET + cfg.episodes)) if ep.mask.any()]
    shortcuts = [alone(ep.image, query=ep.query, supports=ep.supports, route="shortcut") for ep in episodes]
    assert {r.route for r in shortcuts} == {"shortcut"}
    assert row["shortcut_only"] == round(float(np.mean([iou(r.mask, ep.mask) for r, ep in zip(shortcuts, episodes)])), 4)
    assert all(0 <= row[k] <= 1 for k in BASELINES) and row["whole_image"] > 0  # non-empty ground truth

    from conceptseg_edge.manifest import produced_by

    describe = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    assert produced_by() == describe
    mix = {"CD": {"queries": 5, "shortcut": 0.6, "reason": 0.4}, "all": {"queries": 5, "shortcut": 0.6, "reason": 0.4}}
    report = {"produced_by": {"commit": describe, "command": "conceptseg-edge train tiny-default --out runs/tiny"},
              "heldout": {"evaluated_with": "exported bundle", **held}, "warmstart_heldout": None,
              "router": {"taus": {"1": 0.5}, "route_mix_calibration_split": mix}, "time": {},
              "train_wall_s": 0.0, "train_cpu_s": 0.0}
    page = render_report(report)
    assert f"Produced by commit `{describe}` with `conceptseg-edge train tiny-default --out runs/tiny`" in page
    assert "| split | n | fg IoU | shortcut only | reason only | policy box | whole image |" in page
    assert "Route mix after calibration:" in page and "| calibration CD | 5 | 0.600 | 0.400 |" in page
    assert f"| held-out all | {row['n']} | 0.000 | 1.000 |" in page  # every held-out query reasoned
