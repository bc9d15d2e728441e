"""Smoke of the real-width concept-route profile (``benchmarks/real_concept.py``) at toy depth.

The profile itself runs a Qwen2.5-VL-3B-architecture policy for tens of minutes; here the same
steps run on Qwen2.5-0.5B's width cut to one decoder layer and one vision block, SAM2.1-tiny at
128 px, one run: every child step, the speed-only bundles and the report are real.
"""

from __future__ import annotations

import json

import pytest

from conceptseg_edge.benchmarks.real_concept import main
from conceptseg_edge.manifest import read_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("real-concept")
    code = main(["--out", str(out), "--preset", "0.5b", "--layers", "1", "--vision-depth", "1", "--image-size", "128",
                 "--max-pixels", str(56 * 56), "--runs", "1", "--warmup", "0", "--max-new-tokens", "4",
                 "--capture", "fp32"])
    return code, out, json.loads((out / "real_concept.json").read_text())


def test_every_step_ran_in_its_own_process(profile):
    code, out, report = profile
    assert code == 0, {k: v.get("error") for k, v in report["steps"].items()}
    assert list(report["steps"]) == ["build", "export", "quantize-int8", "quantize-int4", "time-fp32", "time-int8", "time-int4"]
    for name, step in report["steps"].items():
        assert step["peak_rss_gib"] > 0.05 and step["seconds"] > 0, name  # each child's own VmHWM
    assert report["widths"]["hidden_size"] == 896 and report["widths"]["num_layers"] == 1
    assert report["machine"]["commit"]


def test_speed_bundles_quantize_only_the_decoder_and_say_so(profile):
    _, out, _ = profile
    fp32 = read_manifest(out / "bundle-fp32")
    assert fp32.route_parity == {}  # --no-route-parity: never compared, and the manifest says so
    assert fp32.part("policy_decoder").parity is not None  # the graph's own check still ran
    for precision in ("int8", "int4"):
        m = read_manifest(out / f"bundle-{precision}")
        decoder = m.part("policy_decoder")
        assert decoder.precision == precision and decoder.quantized_parity is None and m.route_parity == {}
        assert decoder.sha256 != fp32.part("policy_decoder").sha256
        assert m.part("sam2_encoder") == fp32.part("sam2_encoder")  # hard-linked, unchanged
        assert (out / f"bundle-{precision}" / m.part("sam2_encoder").file).stat().st_nlink >= 2


def test_timings_and_targets(profile):
    _, out, report = profile
    fp32, int8 = report["steps"]["time-fp32"], report["steps"]["time-int8"]
    assert fp32["precision"] == "fp32" and int8["precision"] == "int8"
    assert fp32["prefill_ms_p50"] > 0 and fp32["provider"] == "CPUExecutionProvider"
    assert set(fp32["route_total_ms_p50"]) == {"prompt", "shortcut_bank_hit", "shortcut_bank_miss", "reason"}
    assert set(fp32["capture"]) == {"runtime_no_supports", "runtime_with_supports"} and int8["capture"] == {}
    names = [t["target"] for t in report["targets"]]
    assert any(n.startswith("int8 decode") for n in names) and any(n.startswith("int4 decode") for n in names)
    assert sum(n.startswith("fp32 capture") for n in names) == 2 and not any("int8 capture" in n for n in names)
    assert any(n.startswith("4 concepts") for n in names) and any(n.startswith("shortcut") for n in names)
    for t in report["targets"]:
        if t["ratio"] is not None:
            assert t["met"] == (t["ratio"] >= t["limit"] if "decode" in t["target"] else t["ratio"] <= t["limit"])
    assert (out / "real_concept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "real_concept.md").read_text()
    assert "| int4 |" in md and "capture" in md


def test_a_failed_build_is_reported_and_stops_the_rest(tmp_path):
    code = main(["--out", str(tmp_path), "--preset", "0.5b", "--layers", "1", "--vision-depth", "1",
                 "--sam2", "no_such_config", "--image-size", "128", "--precisions", "fp32"])
    report = json.loads((tmp_path / "real_concept.json").read_text())
    assert code == 1
    assert "error" in report["steps"]["build"] and "no_such_config" in (tmp_path / "build.log").read_text()
    assert report["steps"]["time-fp32"] == {"error": "not run: an earlier step failed"}
