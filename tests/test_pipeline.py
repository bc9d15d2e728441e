"""ConceptSegPipeline, the torch reference: every route runs, routing follows the rule, checkpoints reload."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conceptseg_edge.data.world import ConceptWorld
from conceptseg_edge.episodes import Support, box_to_image
from conceptseg_edge.errors import InputError
from conceptseg_edge.models.checkpoint import BackboneSpec, save_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
from conceptseg_edge.models.pipeline import ConceptSegPipeline
from conceptseg_edge.models.policy import PolicyWrapper, build_policy, build_processor, tiny_policy_config
from conceptseg_edge.models.sam2 import build_sam2_model
from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.router import RouterConfig

IMAGE_SIZE = 256
ALWAYS = RouterConfig(taus={n: 0.0 for n in range(1, 5)})  # presence >= 0 always holds
NEVER = RouterConfig(taus={n: 1.01 for n in range(1, 5)})  # presence <= 1 never reaches it


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_tiny_tokenizer()
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    policy = build_policy(tiny_policy_config(tokenizer), seed=0)
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=128, num_heads=4)).eval()
    sam = build_sam2_model("sam2.1_hiera_t", image_size=IMAGE_SIZE).model
    return sam, policy, processor, ctm


@pytest.fixture(scope="module")
def pipeline(parts):
    sam, policy, processor, ctm = parts
    return ConceptSegPipeline(sam, PolicyWrapper(policy, processor), ctm, RouterConfig(), GenerationConfig(max_new_tokens=12))


@pytest.fixture(scope="module")
def episode():
    return ConceptWorld(seed=3, image_size=128).episode(0)


def test_prompt_route(pipeline, episode):
    result = pipeline(episode.image, points=[[40, 50]])
    assert result.route == "prompt" and result.mask.shape == episode.image.shape[:2]
    assert {"preprocess", "encoder", "decoder", "postprocess"} <= set(result.timings)
    assert result.completion is None


def test_shortcut_route_accepted(pipeline, episode):
    result = pipeline.with_router(ALWAYS)(episode.image, query="red circle")
    assert result.route == "shortcut" and "policy_prefill" in result.timings
    assert result.mask.shape == episode.image.shape[:2] and 0.0 <= result.object_score <= 1.0


def test_shortcut_rejected_falls_back_to_reason(pipeline, episode):
    result = pipeline.with_router(NEVER)(episode.image, query="red circle")
    assert result.route == "reason"
    assert result.reason.startswith("shortcut rejected: presence")
    assert {"policy_prefill", "policy_generate"} <= set(result.timings)
    assert isinstance(result.completion, str)


def test_long_query_reasons_with_supports(pipeline, episode):
    supports = [Support(s.image, s.box) for s in episode.supports[:4]] if episode.supports else []
    result = pipeline(episode.image, query="segment the object that looks most like the examples shown", supports=supports)
    assert result.route == "reason" and "query > 4" in result.reason
    assert result.parsed is not None and result.mask.shape == episode.image.shape[:2]


def test_policy_boxes_map_to_image_pixels(episode):
    """A <bbox> in the 600 frame (inclusive corners) becomes an image-pixel box prompt, clipped."""
    h, w = episode.image.shape[:2]
    assert box_to_image((0, 0, 299, 599), (h, w)) == (0.0, 0.0, w / 2, float(h))
    assert box_to_image((700, 700, 800, 800), (h, w)) is None
    assert box_to_image(None, (h, w)) is None


def test_forced_and_bad_routes(pipeline, episode):
    assert pipeline(episode.image, query="circle", route="reason").route == "reason"
    with pytest.raises(InputError, match="unknown route"):
        pipeline(episode.image, query="circle", route="teleport")
    with pytest.raises(InputError, match="empty"):
        pipeline(episode.image, query="   ")
    with pytest.raises(InputError, match="no points or box"):
        pipeline(episode.image, query="circle", route="prompt")


def test_checkpoint_round_trip_gives_the_same_masks(parts, pipeline, episode, tmp_path):
    sam, policy, processor, ctm = parts
    sam_ckpt = tmp_path / "sam.pt"
    torch.save({"model": sam.state_dict()}, sam_ckpt)
    backbone = BackboneSpec("sam2.1_hiera_t", str(sam_ckpt), image_size=IMAGE_SIZE)
    path = save_checkpoint(tmp_path / "ckpt", policy, ctm, processor, ALWAYS, backbone)
    loaded = ConceptSegPipeline.from_checkpoint(path, GenerationConfig(max_new_tokens=12))
    assert loaded.router == ALWAYS
    assert ConceptSegPipeline.from_checkpoint(path, router=NEVER).router == NEVER
    always = pipeline.with_router(ALWAYS)
    for kwargs in ({"query": "red circle"}, {"query": "find the one that differs", "route": "reason"}):
        a, b = always(episode.image, **kwargs), loaded(episode.image, **kwargs)
        assert a.route == b.route and np.array_equal(a.mask, b.mask)
        assert a.completion == b.completion
