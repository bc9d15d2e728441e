"""SAM 3 → ONNX export on the small SAM 3 (the package's modules at test size): parity per part against
the ``sam3`` package, the concept-token slot, the shipped tokenizer against the package's, the
compatibility context leaving the process as it found it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptseg_edge.cli import main
from conceptseg_edge.errors import InputError
from conceptseg_edge.export.sam3 import sam3_head_spec, sam3_text_spec, sam3_vision_spec
from conceptseg_edge.export.sam3_compat import SAM3_SITE, bpe_path, sam3_compat
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.runtime.engine import OrtEngine
from conceptseg_edge.runtime.sam3 import DEFAULT_CONCEPT_SLOTS, TOKENIZER_FILE, encode_prompts, pad_concept_tokens

# Parts whose export this module tests; test_every_registered_part_is_tested checks the registry.
TESTED_PARTS = {"sam3_vision", "sam3_text", "sam3_head"}

SIZE, QUERIES = 224, 16  # models.sam3.SAM3_SMALL
SLOTS = 6  # exported with --concept-slots 6 (not the default 8), so the slot count really comes from the bundle


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A seeded small SAM 3 saved in the release's layout (``model`` → ``detector.``-prefixed keys)."""
    with sam3_compat():
        from conceptseg_edge.models.sam3 import build_sam3

        torch.manual_seed(0)
        model = build_sam3("sam3_small", bpe_path()).model
        path = tmp_path_factory.mktemp("sam3") / "sam3_small.pt"
        torch.save({"model": {f"detector.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, small_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("sam3") / "bundle"
    assert main(["export", "sam3", "--variant", "sam3_small", "--checkpoint", str(small_checkpoint), "--out", str(out),
                 "--concept-slots", str(SLOTS)]) == 0
    return out


@pytest.fixture(scope="module")
def reference(small_checkpoint):
    with sam3_compat():
        from conceptseg_edge.models.sam3 import Sam3Reference, build_sam3

        loaded = build_sam3("sam3_small", bpe_path(), small_checkpoint)
    return Sam3Reference(loaded.model, loaded.image_size)


def _tokenizer(bundle: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle / TOKENIZER_FILE))


def test_parity_is_recorded_per_part(small_bundle, small_checkpoint):
    m = load_bundle(small_bundle)
    assert m.source.checkpoint == str(small_checkpoint) and m.source.checkpoint_sha256
    specs = {"sam3_vision": sam3_vision_spec(SIZE), "sam3_text": sam3_text_spec(), "sam3_head": sam3_head_spec(SIZE, QUERIES, SLOTS)}
    assert set(m.parts) == set(specs)
    for name, spec in specs.items():
        parity = m.part(name).parity
        assert parity.passed and set(parity.max_abs_diff) == set(spec.output_names)
        assert all(parity.max_abs_diff[o] <= spec.atol[o] for o in spec.output_names)
    head = m.part("sam3_head").parity
    assert {"presence_logit", "pred_logits", "pred_boxes", "pred_masks", "semantic_seg"} <= set(head.max_abs_diff)
    assert head.mask_iou >= 0.99
    assert TOKENIZER_FILE in m.files


def _head_feeds(reference, text: str, tokens: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    image = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32))
    with sam3_compat():
        image_out = reference.image_features(image)
        lang = reference.text_features([text])
    concept_tokens, concept_mask = pad_concept_tokens(tokens, SLOTS)
    feeds = {
        **{f"fpn_{i}": f.numpy() for i, f in enumerate(image_out["backbone_fpn"])},
        "text_features": lang["language_features"].transpose(0, 1).numpy(),
        "text_mask": lang["language_mask"].numpy(),
        "concept_tokens": concept_tokens,
        "concept_mask": concept_mask,
    }
    return feeds, image_out


def test_k0_equals_the_plain_text_prompt(small_bundle, reference):
    """All slots padded in ONNX Runtime = the package's own forward_grounding on the text alone."""
    feeds, image_out = _head_feeds(reference, "a red car", np.zeros((0, 256), np.float32))
    got = OrtEngine(small_bundle / "sam3_head.onnx").run(feeds)
    with sam3_compat():
        want = reference.predict(image_out, "a red car")
    spec = sam3_head_spec(SIZE, QUERIES, SLOTS)
    assert np.abs(got["pred_logits"] - want["pred_logits"][..., 0].numpy()).max() <= spec.atol["pred_logits"]
    assert np.abs(got["presence_logit"] - want["presence_logit_dec"].numpy()).max() <= spec.atol["presence_logit"]
    assert np.abs(got["pred_boxes"] - want["pred_boxes_xyxy"].numpy()).max() <= spec.atol["pred_boxes"]
    assert np.abs(got["pred_masks"] - want["pred_masks"].numpy()).max() <= spec.atol["pred_masks"]


def test_concept_tokens_change_the_output(small_bundle, reference):
    rng = np.random.default_rng(4)
    engine = OrtEngine(small_bundle / "sam3_head.onnx")
    plain = engine.run(_head_feeds(reference, "a red car", np.zeros((0, 256), np.float32))[0])
    feeds, image_out = _head_feeds(reference, "a red car", rng.standard_normal((3, 256)).astype(np.float32))
    with_tokens = engine.run(feeds)
    assert np.abs(with_tokens["pred_logits"] - plain["pred_logits"]).max() > 1e-2
    assert np.abs(with_tokens["pred_masks"] - plain["pred_masks"]).max() > 1e-2
    with sam3_compat():  # and the package agrees on what they change
        want = reference.predict(image_out, "a red car", torch.from_numpy(feeds["concept_tokens"]),
                                 torch.from_numpy(feeds["concept_mask"]))
    assert np.abs(with_tokens["pred_logits"] - want["pred_logits"][..., 0].numpy()).max() <= 1e-3


def test_pad_concept_tokens_refuses_too_many():
    with pytest.raises(InputError, match="concept tokens"):
        pad_concept_tokens(np.zeros((DEFAULT_CONCEPT_SLOTS + 1, 256), np.float32), DEFAULT_CONCEPT_SLOTS)


PROMPTS = ["a red car", "The DOG on the left", "2 cats!", "don't   stop", "café crème", "x",
           "a very long prompt " * 8, "person, bicycle & umbrella?"]


def test_tokenizer_round_trip_matches_the_package(small_bundle, reference):
    ids = encode_prompts(_tokenizer(small_bundle), PROMPTS)
    with sam3_compat():
        want = reference.tokenize(PROMPTS).numpy()
    np.testing.assert_array_equal(ids, want)
    assert ids.shape == (len(PROMPTS), 32) and ids[6, -1] == want[6, -1]  # truncation keeps the end token


def test_text_encoder_batches(small_bundle, reference):
    ids = encode_prompts(_tokenizer(small_bundle), PROMPTS[:3])
    got = OrtEngine(small_bundle / "sam3_text.onnx").run({"input_ids": ids})["text_features"]
    with sam3_compat():
        want = reference.text_features(PROMPTS[:3])["language_features"].transpose(0, 1).numpy()
    assert got.shape == (3, 32, 256) and np.abs(got - want).max() <= 1e-3


def test_compat_context_restores_the_process():
    pin, tv_on_path = torch.Tensor.pin_memory, str(SAM3_SITE) in sys.path
    with sam3_compat():
        from sam3.model import vitdet

        apply_rope = vitdet.Attention._apply_rope
        assert torch.Tensor.pin_memory is not pin
    assert torch.Tensor.pin_memory is pin and (str(SAM3_SITE) in sys.path) == tv_on_path
    assert vitdet.Attention._apply_rope is not apply_rope  # the package's own complex RoPE is back
    assert "sam3.model.edt" not in sys.modules
    if SAM3_SITE.is_dir():  # what transformers asks before it takes torchvision code paths
        import importlib.util

        assert importlib.util.find_spec("torchvision") is None and "timm" not in sys.modules
    with sam3_compat():
        from sam3.model import vitdet as again

        assert again is vitdet  # the same modules come back, so models built earlier keep their patches


# ---------------------------------------------------------------------------------- torch-free runtime


@pytest.fixture(scope="module")
def predictor(small_bundle):
    from conceptseg_edge.runtime.sam3 import Sam3Predictor

    return Sam3Predictor.from_bundle(small_bundle, score_threshold=0.0)


def _reference_masks(reference, image: np.ndarray, text: str, tokens: np.ndarray | None = None):
    import torch.nn.functional as F

    with sam3_compat():
        image_out = reference.image_features(reference.preprocess(image))
        if tokens is None:
            out = reference.predict(image_out, text)
        else:
            padded, mask = pad_concept_tokens(tokens, SLOTS)
            out = reference.predict(image_out, text, torch.from_numpy(padded), torch.from_numpy(mask))
    masks = F.interpolate(out["pred_masks"], image.shape[:2], mode="bilinear", align_corners=False)[0] > 0
    presence = float(torch.sigmoid(out["presence_logit_dec"][0, 0]))
    return masks.numpy(), torch.sigmoid(out["pred_logits"][0, :, 0]).numpy() * presence, presence


def _partial_mask_ious(pred, masks, scores) -> list[float]:
    """IoU of each runtime instance with the reference query of the same score, over partial masks only."""
    from conceptseg_edge.metrics import iou

    ious = []
    for got, score in zip(pred.masks, pred.scores):
        query = int(np.argmin(np.abs(scores - score)))
        coverage = masks[query].mean()
        if 0.05 < coverage < 0.95:
            ious.append(float(iou(got, masks[query])))
    return ious


@pytest.mark.parametrize("tokens", [0, 5])
def test_runtime_routes_match_the_torch_reference(predictor, reference, sample_image, tokens):
    """Prompt route (K = 0) and reason route (K = 5 concept tokens): same instances, scores, presence."""
    concept = np.random.default_rng(7).standard_normal((tokens, 256)).astype(np.float32) if tokens else None
    predictor.set_image(sample_image)
    pred = predictor.predict("a red car", concept)
    masks, scores, presence = _reference_masks(reference, sample_image, "a red car", concept)
    assert abs(pred.presence - presence) < 1e-3 and pred.accepted == (pred.presence >= predictor.presence_threshold)
    np.testing.assert_allclose(pred.scores, np.sort(scores)[::-1], atol=1e-3)
    ious = _partial_mask_ious(pred, masks, scores)
    assert len(ious) >= 3 and min(ious) >= 0.95, ious
    assert pred.masks.shape == (len(scores), *sample_image.shape[:2]) and pred.semantic_mask.shape == sample_image.shape[:2]


def test_runtime_state_and_concept_cache(small_bundle, sample_image):
    from conceptseg_edge.runtime.sam3 import Sam3Predictor

    fresh = Sam3Predictor.from_bundle(small_bundle, presence_threshold=0.0)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict("a red car")
    fresh.set_image(sample_image)
    first = fresh.predict("a red car")
    fresh.set_image(sample_image[::-1].copy())
    fresh.predict("a red car")
    assert list(fresh._concepts) == ["a red car"] and first.accepted  # text encoded once; tau 0 accepts
    assert fresh.concept_slots == SLOTS
    with pytest.raises(InputError, match="concept tokens"):
        fresh.predict("a red car", np.zeros((3, 128), np.float32))
    with pytest.raises(InputError, match="empty"):
        fresh.predict("  ")


def test_runtime_imports_no_torch():
    import subprocess

    code = "import sys, conceptseg_edge.runtime.sam3; assert 'torch' not in sys.modules and 'sam3' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_sam3_names_the_install_line(tmp_path):
    """Without the sam3 site directory the CLI exits with one line that says how to install it."""
    import subprocess

    env = {**__import__("os").environ, "CONCEPTSEG_SAM3_SITE": str(tmp_path / "absent")}
    run = subprocess.run([sys.executable, "-m", "conceptseg_edge", "export", "sam3", "--variant", "sam3_small",
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "sam3 is not installed" in run.stderr and "--target" in run.stderr
    assert not (tmp_path / "out").exists()


def test_checkpoint_must_match_the_variant(small_checkpoint, tmp_path):
    from conceptseg_edge.errors import CheckpointError

    state = torch.load(small_checkpoint, weights_only=True)["model"]
    state.pop(next(k for k in state if "presence_token" in k))
    broken = tmp_path / "broken.pt"
    torch.save({"model": state}, broken)
    with sam3_compat():
        from conceptseg_edge.models.sam3 import build_sam3

        with pytest.raises(CheckpointError, match="1 missing keys"):
            build_sam3("sam3_small", bpe_path(), broken)
