"""The real-size SAM2 profile (``benchmarks/real.py``): a smoke run of the whole command at a small size,
and the pieces of the limit (FLOPs counted from a graph, the GEMM peak) on graphs whose answer is known."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conceptseg_edge.benchmarks.prompt import STAGES
from conceptseg_edge.benchmarks.real import DECODE_STAGES, ORT_PEER_IMAGE_SIZE, TARGETS, gemm_peak, graph_flops, main


def test_real_profile_smoke(tmp_path):
    """tiny at 128 px, 1 run, no warm-up (about a minute on 2 cores): every file, side and stage is there,
    ratios are finite, and the ORT peer (1024 px only) is named with its reason rather than dropped."""
    out = tmp_path / "real"
    assert main(["--out", str(out), "--sizes", "tiny", "--image-size", "128", "--quick", "--runs", "1", "--warmup", "0",
                 "--batch", "4", "--concept", "none"]) == 0  # the concept half: tests/test_bench_real_concept.py
    report = json.loads((out / "real.json").read_text())
    assert (out / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "real.md").read_text()
    for key in ("machine", "environment", "threads", "gemm_peak", "date"):
        assert report[key]
    assert report["machine"]["commit"]
    (row,) = report["sizes"]
    assert row["config"] == "sam2.1_hiera_t" and row["image_size"] == 128
    assert set(row["series"]) == {"ours", "torch"}
    for side, kinds in row["series"].items():
        assert list(kinds["route"]) == [*STAGES, "total"]
        assert list(kinds["decoder_only"]) == list(kinds["batch"]) == [*DECODE_STAGES, "total"]
        assert all(s["n"] == 1 and s["p50"] > 0 for k in kinds.values() for s in k.values())
    assert row["providers"]["ours"] == {"sam2_encoder": "CPUExecutionProvider", "sam2_decoder": "CPUExecutionProvider"}
    assert str(ORT_PEER_IMAGE_SIZE) in row["not_run"]["ort_peer"] and "error" in row["ort_peer_export"]
    torch_ratios = row["ratio_ours_over"]["torch"]
    assert all(math.isfinite(r) and r > 0 for kind in torch_ratios.values() for r in kind.values())
    targets = {t["target"]: t for t in row["targets"]}
    assert set(targets) == {t.name for t in TARGETS} | {"peak_rss ours <= torch"}
    for t in TARGETS:
        met = targets[t.name]["met"]
        assert (met is None) == (t.denominator == "ort_peer"), t.name  # the peer's targets: not evaluated, said so
    assert row["mask_iou"]["ours_vs_torch"] > 0.9  # the same weights on both sides
    rss = row["peak_rss"]
    assert set(rss) == {"ours", "torch"} and all(r["peak_rss_mib"] > 0 and "error" not in r for r in rss.values())
    assert rss["ours"]["torch_imported"] is False and rss["torch"]["torch_imported"] is True
    limit = row["limit"]
    assert limit["flops"] > 0 and not limit["uncounted_nodes"] and 0 < limit["fraction_of_peak"] < 10
    ops = limit["op_types"]  # ORT's profiler on our encoder: what dominates, with shares that add up
    assert ops["provider"] == "CPUExecutionProvider" and ops["run_ms"] > 0 and {o["op"] for o in ops["top"]} & {"Conv", "MatMul", "Gemm", "FusedMatMul"}
    assert 0 < sum(o["share"] for o in ops["top"]) <= 1.001
    for text in ("sam2.1_hiera_t @ 128 px", "ort_peer not run", "GEMM peak", "Peak RSS"):
        assert text in markdown


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _weight(name, shape):
    return helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(math.prod(shape), np.float32).tolist())


def test_graph_flops_counts_conv_matmul_gemm(tmp_path):
    """2 x MACs from inferred shapes, with the input's symbolic dims fixed by the caller."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),  # 8 x 3 x 3 x 3 per pixel
        helper.make_node("Flatten", ["c"], ["f"], axis=1),  # (1, 8 * 16 * 16)
        helper.make_node("Gemm", ["f", "wg"], ["g"]),  # 2048 -> 4
        helper.make_node("Unsqueeze", ["g", "ax"], ["u"]),  # (1, 1, 4)
        helper.make_node("MatMul", ["u", "wm"], ["y"]),  # 4 -> 5
    ]
    inits = [_weight("wc", [8, 3, 3, 3]), _weight("wg", [8 * 16 * 16, 4]), _weight("wm", [4, 5]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [0])]
    path = tmp_path / "g.onnx"
    onnx.save(_model(nodes, [x], [y], inits), str(path))
    got = graph_flops(path, (1, 3, 16, 16))
    conv, gemm, matmul = 16 * 16 * 8 * 27, 2048 * 4, 4 * 5
    assert got["flops_per_op"] == {"Conv": 2 * conv, "ConvTranspose": 0, "MatMul": 2 * matmul, "Gemm": 2 * gemm}
    assert got["flops"] == 2 * (conv + gemm + matmul) and got["uncounted_nodes"] == []


def test_gemm_peak_is_a_rate():
    peak = gemm_peak(n=256, runs=2)
    assert peak["provider"] == "CPUExecutionProvider" and peak["gflops"] > 0
    assert peak["gflops"] == pytest.approx(2 * 256**3 / (peak["best_ms"] / 1e3) / 1e9, rel=0.01)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conceptseg_edge", "bench", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    ((), "give a BUNDLE (or --profile real --out DIR)"),
    (("--profile", "real"), "takes --out DIR and no BUNDLE"),
    (("some-bundle", "--profile", "real", "--out", "x"), "takes --out DIR and no BUNDLE"),
    (("--profile", "real", "--out", "x", "--sizes", "huge"), "invalid choice: 'huge'"),  # reached the profile's parser
    (("--profile", "real", "--out", "x", "--ort-threads", "1", "--json", "r.json"),
     "--ort-threads, --json not used by the profile"),
])
def test_cli_profile_refusals(args, message):
    """``bench --profile real`` takes --out and no bundle; plain ``bench`` still needs its bundle."""
    proc = _cli(*args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_ort_peer_at_1024(tmp_path):
    """ONNX Runtime's own exporters and fusions build the peer from the seeded .pt (several minutes on 2
    cores); it serves a click from the same weights as torch, and its batch of prompts is named as not run."""
    from conceptseg_edge.benchmarks.real import (Artifacts, TorchSide, _in_fresh_process, build_side, export_ort_peer,
                                                 time_sides)
    from conceptseg_edge.benchmarks.scale import save_seeded_checkpoint

    checkpoint = save_seeded_checkpoint(tmp_path / "t.pt", "sam2.1_hiera_t", ORT_PEER_IMAGE_SIZE)
    peer = _in_fresh_process(export_ort_peer, "sam2.1_hiera_t", str(checkpoint), ORT_PEER_IMAGE_SIZE, str(tmp_path / "ort"))
    assert peer["encoder_optimized"] is True and peer["decoder_optimized"] is True, peer
    art = Artifacts("sam2.1_hiera_t", ORT_PEER_IMAGE_SIZE, str(checkpoint), "", peer)
    torch_side = TorchSide(art.config, checkpoint, art.image_size)
    side = build_side("ort_peer", art, torch_side)
    assert side.providers() == {"encoder": "CPUExecutionProvider", "decoder": "CPUExecutionProvider"}
    timed = time_sides({"ort_peer": side}, runs=1, warmup=0, batch=2)
    assert list(timed["series"]["ort_peer"]) == ["route", "decoder_only"]
    assert "broadcast" in timed["batch_not_run"]["ort_peer"]  # has_input_masks [2] against the mask width
    assert timed["masks"]["ort_peer"].shape == (480, 640)


def test_the_profile_runs_the_concept_half_after_the_sizes(tmp_path, monkeypatch):
    """``--concept PRESET`` hands the preset and the image size to ``real_concept.main`` (its own smoke:
    tests/test_bench_real_concept.py) and merges the report it writes into real.json and real.md. The
    concept driver is replaced by one that writes the committed 3B report, so only the wiring runs."""
    import shutil

    from conceptseg_edge.benchmarks import real_concept

    calls = []
    committed = Path(__file__).resolve().parents[1] / "docs" / "benchmarks_concept_3b.json"

    def concept_main(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        shutil.copy(committed, out / "real_concept.json")
        return 0

    monkeypatch.setattr(real_concept, "main", concept_main)
    out = tmp_path / "real"
    assert main(["--out", str(out), "--sizes", "tiny", "--image-size", "128", "--quick", "--runs", "1", "--warmup", "0",
                 "--batch", "2", "--no-rss", "--concept", "3b"]) == 0
    assert calls == [["--out", str(out / "concept"), "--preset", "3b", "--image-size", "128"]]
    report = json.loads((out / "real.json").read_text())
    assert report["concept"]["config"]["preset"] == "3b" and report["concept"]["targets"]
    markdown = (out / "real.md").read_text()
    assert "## Concept routes, 3b policy architecture" in markdown and "int4 decode tok/s / fp32 >= 2.5" in markdown
