"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conceptseg_edge", *map(str, args)], capture_output=True, text=True)


def assert_clean_failure(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert match in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    paths = {name: d / f"{name}.png" for name in ("rgb", "gray", "rgba", "gray16")}
    Image.fromarray(rgb).save(paths["rgb"])
    Image.fromarray(rgb[..., 0]).save(paths["gray"])
    Image.fromarray(np.dstack([rgb, np.full((60, 80), 128, np.uint8)])).save(paths["rgba"])
    Image.fromarray((rng.random((60, 80)) * 65535).astype(np.uint16)).save(paths["gray16"])
    paths["corrupt"] = d / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    paths["truncated"] = d / "truncated.png"
    paths["truncated"].write_bytes(paths["rgb"].read_bytes()[:200])
    return paths


def test_segment_writes_mask_overlay_and_json(tiny_bundle, images, tmp_path):
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    proc = cli("segment", tiny_bundle, images["rgb"], "--point", "40,30", "--point", "10,10,0",
               "--out", out, "--overlay", overlay, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["route"] == "prompt"
    assert set(report["timings_ms"]) == {"preprocess", "encoder", "decoder", "postprocess", "total"}
    mask = np.asarray(Image.open(out))
    assert mask.shape == (60, 80) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(overlay)).shape == (60, 80, 3)


@pytest.mark.parametrize("kind", ["gray", "rgba", "gray16"])
def test_other_image_modes_are_converted(tiny_bundle, images, tmp_path, kind):
    proc = cli("segment", tiny_bundle, images[kind], "--box", "5,5,50,40", "--out", tmp_path / "m.png")
    assert proc.returncode == 0, proc.stderr
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == (60, 80)


@pytest.mark.parametrize(
    "image,args,match",
    [
        ("missing", ["--point", "1,1"], "file not found"),
        ("corrupt", ["--point", "1,1"], "cannot decode image"),
        ("truncated", ["--point", "1,1"], "cannot decode image"),
        ("rgb", ["--point", "500,10"], "outside the 80x60 image"),
        ("rgb", [], "no prompt"),
        ("rgb", ["--box", "1,2,3"], "--box '1,2,3': expected 4 numbers"),
        ("rgb", ["--point", "a,b"], "expected comma-separated numbers"),
    ],
)
def test_bad_input_exits_nonzero_without_traceback(tiny_bundle, images, tmp_path, image, args, match):
    path = images.get(image, tmp_path / "missing.png")
    proc = cli("segment", tiny_bundle, path, *args, "--out", tmp_path / "m.png")
    assert_clean_failure(proc, match)
    assert not (tmp_path / "m.png").exists()


def test_tampered_bundle_and_other_schema_exit_cleanly(bundle_copy, images, tmp_path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_clean_failure(cli("segment", bundle_copy, images["rgb"], "--point", "1,1", "--out", tmp_path / "m.png"),
                         "schema_version 99 is not supported")
    manifest["schema_version"] = 1
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    (bundle_copy / "sam2_decoder.onnx").write_bytes(b"garbage")
    assert_clean_failure(cli("segment", bundle_copy, images["rgb"], "--point", "1,1", "--out", tmp_path / "m.png"),
                         "sam2_decoder.onnx: sha256 mismatch")


def test_bench_json_and_table(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = cli("bench", tiny_bundle, "--route", "prompt", "--runs", "2", "--warmup", "1", "--compare-torch", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    for series in ("runtime", "torch"):
        assert set(report[series]) == {"preprocess", "encoder", "decoder", "postprocess", "total"}
        assert all(s["p50"] > 0 and s["p50"] <= s["p99"] for s in report[series].values())
    assert report["torch_weights"] == "bundle checkpoint"
    assert set(report["ratio_runtime_over_torch_p50"]) == {"preprocess", "encoder", "decoder", "postprocess", "total"}
    assert report["peak_rss_mb"] > 0 and "versions" in report["environment"]
    assert "| encoder |" in proc.stdout and "runtime/torch" in proc.stdout
