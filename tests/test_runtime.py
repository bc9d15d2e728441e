"""The torch-free runtime: equals the eager reference, caches the encoder, refuses bad input clearly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.errors import EngineIOError, InputError, ManifestError
from conceptseg_edge.manifest import TensorSpec, load_bundle
from conceptseg_edge.metrics import iou
from conceptseg_edge.runtime.engine import OrtEngine, open_engine
from conceptseg_edge.runtime.predictor import SAM2Predictor


PROMPTS = [
    {"points": [[200, 280]], "labels": [1]},  # one click: multimask, best by IoU
    {"box": [110, 190, 290, 370]},  # a box: single mask
    {"points": [[450, 300], [200, 280]], "labels": [1, 0]},  # fg + bg clicks
    {"points": [[450, 300]], "labels": [1], "box": [370, 220, 530, 380]},  # box + click
]


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return SAM2Predictor.from_bundle(tiny_bundle)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["click", "box", "fg+bg", "box+click"])
def test_runtime_mask_equals_torch_reference(predictor, torch_reference, sample_image, prompt):
    predictor.set_image(sample_image)
    got = predictor.predict(**prompt)
    torch_reference.set_image(sample_image)
    multimask = "box" not in prompt and len(prompt["points"]) == 1
    ref = torch_reference.predict(
        np.array(prompt["points"]) if "points" in prompt else None,
        np.array(prompt["labels"]) if "labels" in prompt else None,
        np.array(prompt["box"]) if "box" in prompt else None,
        multimask_output=multimask,
    )
    best = int(np.argmax(ref.scores))
    assert got.mask.shape == sample_image.shape[:2]
    assert iou(got.mask, ref.masks[best]) >= 0.99
    assert got.score == pytest.approx(float(ref.scores[best]), abs=1e-3)
    assert list(got.timings) == ["preprocess", "encoder", "decoder", "postprocess"]


def test_concept_tokens_through_the_runtime_match_torch(predictor, torch_reference, sample_image):
    tokens = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
    predictor.set_image(sample_image)
    got = predictor.predict(concept_tokens=tokens, multimask=False)
    torch_reference.set_image(sample_image)
    ref = torch_reference.predict(concept_tokens=tokens, multimask_output=False)
    assert iou(got.mask, ref.masks[0]) >= 0.99
    assert got.object_score == pytest.approx(1 / (1 + np.exp(-ref.object_score_logit)), abs=1e-4)


class CountingEngine:
    """A real OrtEngine with a call counter (instrumentation, not a stand-in)."""

    def __init__(self, engine: OrtEngine) -> None:
        self.engine, self.calls = engine, 0
        self.inputs, self.outputs, self.provider = engine.inputs, engine.outputs, engine.provider

    def run(self, feeds):
        self.calls += 1
        return self.engine.run(feeds)


def test_encoder_runs_once_per_image(tiny_bundle, sample_image):
    base = SAM2Predictor.from_bundle(tiny_bundle)
    encoder, decoder = CountingEngine(base.encoder), CountingEngine(base.decoder)
    predictor = SAM2Predictor(encoder, decoder, base.pre)
    predictor.set_image(sample_image)
    masks = [predictor.predict(**p).mask for p in PROMPTS]
    assert encoder.calls == 1 and decoder.calls == len(PROMPTS)
    assert not np.array_equal(masks[0], masks[1])
    predictor.set_image(sample_image[::-1].copy())
    predictor.predict(points=[[10, 10]])
    assert encoder.calls == 2


def test_every_part_is_opened_by_the_engine_factory(tiny_bundle, sample_image):
    opened = []

    def counting(bundle_dir, part, provider):
        opened.append((part.name, provider))
        return CountingEngine(open_engine(bundle_dir, part, provider))

    predictor = SAM2Predictor.from_bundle(tiny_bundle, engine_factory=counting)
    assert opened == [("sam2_encoder", "cpu"), ("sam2_decoder", "cpu")]
    predictor.set_image(sample_image)
    predictor.predict(points=[[10, 10]])
    assert predictor.encoder.calls == 1 and predictor.decoder.calls == 1


def test_default_factory_refuses_a_format_it_cannot_open(tiny_bundle):
    manifest = load_bundle(tiny_bundle)
    unknown = dataclasses.replace(manifest.part("sam2_decoder"), format="openvino")
    with pytest.raises(ManifestError, match=r"parts\.sam2_decoder\.format: 'openvino' cannot be opened"):
        SAM2Predictor.from_bundle(tiny_bundle, manifest=manifest.with_parts(sam2_decoder=unknown))
    engine = dataclasses.replace(manifest.part("sam2_decoder"), format="tensorrt")  # goes to TrtEngine: no engine record
    with pytest.raises(ManifestError, match=r"parts\.sam2_decoder: format 'tensorrt' with no engine record"):
        SAM2Predictor.from_bundle(tiny_bundle, manifest=manifest.with_parts(sam2_decoder=engine))


def test_engine_inputs_must_match_the_manifest(tiny_bundle):
    manifest = load_bundle(tiny_bundle)
    part = manifest.part("sam2_encoder")
    renamed = dataclasses.replace(part, inputs=(TensorSpec("pixels", "float32", (1, 3, 512, 512)),))
    with pytest.raises(ManifestError, match=r"graph inputs \['image'\] != manifest \['pixels'\]"):
        SAM2Predictor.from_bundle(tiny_bundle, manifest=manifest.with_parts(sam2_encoder=renamed))


def test_predict_before_set_image_names_the_call(tiny_bundle):
    with pytest.raises(RuntimeError, match=r"call set_image\(\)"):
        SAM2Predictor.from_bundle(tiny_bundle).predict(points=[[1, 1]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"points": [[700, 10]]}, "outside the 640x480 image"),
        ({"points": [[-1, 10]]}, "outside"),
        ({"box": [100, 100, 50, 200]}, "X1 > X0"),
        ({"box": [0, 0, 900, 100]}, "outside"),
        ({"points": [[1, 1]], "labels": [7]}, "labels must be exactly 0"),
        ({"points": [[1, 1], [2, 2]], "labels": [1]}, "2 points but 1 labels"),
        ({}, "no prompt"),
    ],
)
def test_bad_prompts_are_input_errors(predictor, sample_image, kwargs, match):
    predictor.set_image(sample_image)
    with pytest.raises(InputError, match=match):
        predictor.predict(**kwargs)


@pytest.mark.parametrize(
    "image,expect",
    [
        (np.zeros((40, 50), np.uint8), (40, 50)),  # grayscale
        (np.zeros((40, 50, 4), np.uint8), (40, 50)),  # RGBA
        (np.full((40, 50), 65535, np.uint16), (40, 50)),  # 16-bit
    ],
)
def test_image_modes_are_converted(predictor, image, expect):
    predictor.set_image(image)
    assert predictor.predict(points=[[10, 10]]).mask.shape == expect


@pytest.mark.parametrize("image", [np.full((40, 50, 3), 2.0, np.float32), np.zeros((40, 50, 2), np.uint8), np.zeros((1, 1, 3), np.uint8)])
def test_unusable_arrays_are_refused(predictor, image):
    with pytest.raises(InputError):
        predictor.set_image(image)


# ---------------------------------------------------------------- samples wider than 8 bit: one rule, or refused

_RAMP = np.linspace(0.0, 1.0, 40 * 50).reshape(40, 50)
# (array PIL writes, file format, expected uint8 gray) per mode: float in [0, 1] x 255; 16 bit / 257
WIDE_IMAGES = {
    "F-tiff": (_RAMP.astype(np.float32), "tiff", np.round(_RAMP.astype(np.float32).astype(np.float64) * 255)),
    "I;16-png": ((_RAMP * 65535).round().astype(np.uint16), "png", np.round((_RAMP * 65535).round() / 257)),
    "I;16-tiff": ((_RAMP * 65535).round().astype(np.uint16), "tiff", np.round((_RAMP * 65535).round() / 257)),
    "I-tiff": ((_RAMP * 65535).round().astype(np.int32), "tiff", np.round((_RAMP * 65535).round() / 257)),
}
REFUSED_IMAGES = {
    "F-0-255": ((_RAMP * 255).astype(np.float32), "tiff", r"from 0 to 255, expected values in \[0, 1\]"),
    "F-negative": ((_RAMP - 0.5).astype(np.float32), "tiff", r"expected values in \[0, 1\]"),
    "F-nan": (np.where(_RAMP > 0.5, np.nan, _RAMP).astype(np.float32), "tiff", "NaN"),
    "I-negative": ((_RAMP * 100 - 5).astype(np.int32), "tiff", "integer samples from -5"),
    "I-over-16-bit": ((_RAMP * 70000).astype(np.int32), "tiff", "expected 0-255 .* or 0-65535"),
}


def _written(tmp_path, array: np.ndarray, fmt: str):
    from PIL import Image

    path = tmp_path / f"image.{fmt}"
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("name", list(WIDE_IMAGES))
def test_wide_sample_images_are_scaled_by_the_documented_rule(tmp_path, name):
    """A float TIFF of 0-1 values used to decode all black (PIL clips F to 0/1 when converting to RGB)."""
    from PIL import Image

    from conceptseg_edge.preprocess import load_image

    array, fmt, expected = WIDE_IMAGES[name]
    path = _written(tmp_path, array, fmt)
    with Image.open(path) as img:
        assert img.mode == name.split("-")[0]  # the mode under test is the one PIL reads back
    got = load_image(path)
    assert got.dtype == np.uint8 and got.shape == (40, 50, 3)
    assert np.array_equal(got[..., 0], expected.astype(np.uint8)) and (got == got[..., :1]).all()
    assert got.max() == 255  # full range kept, not crushed to black


@pytest.mark.parametrize("name", list(REFUSED_IMAGES))
def test_wide_sample_images_outside_the_rule_are_refused(tmp_path, name):
    from conceptseg_edge.preprocess import as_rgb_array, load_image

    array, fmt, match = REFUSED_IMAGES[name]
    path = _written(tmp_path, array, fmt)
    with pytest.raises(InputError, match=match) as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match=match):  # the same rule for in-memory arrays
        as_rgb_array(array)


def test_segment_cli_refuses_a_nan_float_tiff_with_one_error_line(tmp_path):
    array, fmt, _ = REFUSED_IMAGES["F-nan"]
    path = _written(tmp_path, array, fmt)
    out = tmp_path / "mask.png"
    proc = subprocess.run([sys.executable, "-m", "conceptseg_edge", "segment", "conceptseg_edge/assets/conceptseg_tiny",
                           str(path), "--point", "10,10", "--out", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error:"), proc.stderr
    assert "NaN" in proc.stderr and not out.exists()


# ---------------------------------------------------------------- click labels: exactly 0 or 1, never truncated


BAD_LABELS = [0.5, 0.999, 2, -1, "1", float("nan")]


@pytest.mark.parametrize("label", BAD_LABELS, ids=str)
def test_point_labels_must_be_exactly_0_or_1(label):
    from conceptseg_edge.preprocess import make_prompts

    with pytest.raises(InputError, match="labels must be exactly 0"):
        make_prompts([[5, 5]], [label], None, (40, 50))
    ok = make_prompts([[5, 5], [6, 6]], [1.0, 0], None, (40, 50))
    assert ok.labels.tolist() == [1, 0] and ok.labels.dtype == np.int32


@pytest.mark.parametrize("label", ["0.5", "2", "-1", "nan"])
def test_point_flag_refuses_a_label_that_is_not_0_or_1(label):
    import argparse

    from conceptseg_edge.cli.segment import point_arg

    with pytest.raises(argparse.ArgumentTypeError, match="expected 0 .background. or 1"):
        point_arg(f"10,10,{label}")
    assert point_arg("10,10,0") == [10.0, 10.0, 0.0]
    proc = subprocess.run([sys.executable, "-m", "conceptseg_edge", "segment", "conceptseg_edge/assets/conceptseg_tiny",
                           "conceptseg_edge/assets/sample.png", "--point", f"10,10,{label}", "--out", "unused.png"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"label {float(label):g}" in proc.stderr


def test_engine_checks_feeds(tiny_bundle):
    engine = OrtEngine(tiny_bundle / "sam2_encoder.onnx")
    with pytest.raises(EngineIOError, match=r"missing \['image'\]"):
        engine.run({"img": np.zeros((1, 3, 512, 512), np.float32)})
    with pytest.raises(EngineIOError, match="rank 3"):
        engine.run({"image": np.zeros((3, 512, 512), np.float32)})
    with pytest.raises(EngineIOError, match="expected"):
        engine.run({"image": np.zeros((1, 3, 256, 256), np.float32)})


def test_tampered_onnx_is_refused_at_load(bundle_copy):
    path = bundle_copy / "sam2_encoder.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="sam2_encoder.onnx: sha256 mismatch"):
        SAM2Predictor.from_bundle(bundle_copy)


def test_runtime_import_leaves_torch_out():
    code = (
        "import sys, conceptseg_edge.runtime as r; "
        "from conceptseg_edge.runtime import SAM2Predictor, OrtEngine; "
        "import conceptseg_edge.runtime.engine, conceptseg_edge.runtime.predictor, conceptseg_edge.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
