"""The torch-free runtime: equals the eager reference, caches the encoder, refuses bad input clearly."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from conceptseg_edge.errors import EngineIOError, InputError, ManifestError
from conceptseg_edge.manifest import TensorSpec, load_bundle
from conceptseg_edge.metrics import iou
from conceptseg_edge.runtime.engine import OrtEngine, open_engine, resolve_providers
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
    engine = dataclasses.replace(manifest.part("sam2_decoder"), format="tensorrt")
    with pytest.raises(ManifestError, match=r"parts\.sam2_decoder\.format: 'tensorrt' cannot be opened with ONNX Runtime"):
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
        ({"points": [[1, 1]], "labels": [7]}, "labels must be 0"),
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


@pytest.mark.parametrize("image", [np.zeros((40, 50, 3), np.float32), np.zeros((40, 50, 2), np.uint8), np.zeros((1, 1, 3), np.uint8)])
def test_unusable_arrays_are_refused(predictor, image):
    with pytest.raises(InputError):
        predictor.set_image(image)


def test_engine_checks_feeds(tiny_bundle):
    engine = OrtEngine(tiny_bundle / "sam2_encoder.onnx")
    with pytest.raises(EngineIOError, match=r"missing \['image'\]"):
        engine.run({"img": np.zeros((1, 3, 512, 512), np.float32)})
    with pytest.raises(EngineIOError, match="rank 3"):
        engine.run({"image": np.zeros((3, 512, 512), np.float32)})
    with pytest.raises(EngineIOError, match="expected"):
        engine.run({"image": np.zeros((1, 3, 256, 256), np.float32)})


def test_missing_provider_falls_back_with_a_warning():
    with pytest.warns(RuntimeWarning, match="'cuda'.*not available.*falling back to CPUExecutionProvider"):
        assert resolve_providers("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(InputError, match="provider 'metal'"):
        resolve_providers("metal", ["CPUExecutionProvider"])


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
