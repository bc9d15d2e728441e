"""Meta-GRPO rewards on crafted completions: exact values, and the edge cases the policy will produce."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptseg_edge.episodes import box_to_image, build_meta_episode
from conceptseg_edge.metrics import iou
from conceptseg_edge.tags import format_output
from conceptseg_edge.train.rewards import (
    ConceptMasker,
    MaskIoUReward,
    box_iou,
    box_reward,
    completion_text,
    format_reward,
    mask_reward,
)

GT = (100, 100, 199, 199)  # 100 x 100 px
HIDDEN = (10, 10, 59, 59)  # 50 x 50 px


def out(bbox, check=None, answer="red circle") -> str:
    return format_output(think="t", rule="r", bbox=bbox, check=check, answer=answer)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --------------------------------------------------------------------------- box IoU


def test_box_iou_counts_inclusive_pixels():
    assert box_iou(GT, GT) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 10x10 each, 5x10 shared
    assert box_iou((0, 0, 0, 0), (0, 0, 1, 1)) == pytest.approx(1 / 4)  # a one-pixel box has area 1
    assert box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0  # touching corners share no pixel
    assert box_iou(None, GT) == 0.0 and box_iou(GT, None) == 0.0
    assert box_iou((9, 9, 0, 0), (0, 0, 9, 9)) == 0.0  # unordered corners: no area (parse_box reorders first)


# --------------------------------------------------------------------------- format


def test_format_reward_exact_tag_sequence():
    good = out(GT)
    with_check = out(GT, check=HIDDEN)
    completions = [good, with_check, good, with_check, chat(with_check), good + " trailing", ""]
    hidden = [False, False, True, True, True, False, False]
    assert format_reward(completions, hidden) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "text",
    [
        "<think>t</think> <bbox>[1,2,3,4]</bbox> <answer>a</answer>",  # no <rule> (the official one-support bug)
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3]</bbox> <answer>a</answer>",  # three numbers
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3,-4]</bbox> <answer>a</answer>",  # negative
        "<think>t</think> <rule>r</rule> <bbox>[1.5,2,3,4]</bbox> <answer>a</answer>",  # decimal
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer> </answer>",  # blank answer
        "<think>t</think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer>a",  # truncated
        "<think>t <rule>r</rule></think> <rule>r</rule> <bbox>[1,2,3,4]</bbox> <answer>a</answer>",  # nested tag
        "<rule>r</rule> <think>t</think> <bbox>[1,2,3,4]</bbox> <answer>a</answer>",  # wrong order
    ],
)
def test_format_reward_rejects_malformed(text):
    assert format_reward([text], [False]) == [0.0]


def test_completion_text_reads_strings_and_messages():
    assert completion_text("abc") == "abc"
    assert completion_text(chat("abc")) == "abc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == "ab"
    assert completion_text(None) == "" and completion_text([]) == ""


# --------------------------------------------------------------------------- box reward


def test_box_reward_is_iou_squared_without_a_hidden_box():
    half = (150, 100, 249, 199)  # 50x100 shared of 100x100 each: IoU 1/3
    rewards = box_reward([out(GT), out(half), chat(out(half))], [GT] * 3, [None] * 3)
    assert rewards == pytest.approx([1.0, 1 / 9, 1 / 9])


def test_box_reward_is_the_product_with_a_hidden_box():
    half = (150, 100, 249, 199)
    check_quarter = (35, 10, 84, 59)  # 25x50 shared of 50x50 each: IoU 1/3
    completions = [out(GT, check=HIDDEN), out(half, check=HIDDEN), out(half, check=check_quarter), out(GT)]
    rewards = box_reward(completions, [list(GT)] * 4, [list(HIDDEN)] * 4)
    assert rewards == pytest.approx([1.0, 1 / 3, 1 / 9, 0.0])  # a missing <check> scores 0


@pytest.mark.parametrize(
    ("bbox_text", "expected"),
    [
        ("[199,199,100,100]", 1.0),  # inverted corners: reordered, as the pipeline reads them
        ("[100,199,199,100]", 1.0),  # one axis inverted
        ("[100.4,99.5,199,199.49]", 1.0),  # decimals round half up
        ("(100, 100, 199, 199)", 1.0),  # any brackets or separators
        ("[100,100,199,1000]", pytest.approx((100 * 100 / (100 * 500)) ** 2)),  # clipped to the 600 frame
        ("", 0.0),  # empty tag
        ("[100,100,199]", 0.0),  # three numbers
        ("[100,100,199,199,5]", 0.0),  # five numbers
        ("[700,700,800,800]", 0.0),  # wholly outside the frame
        ("none", 0.0),
    ],
)
def test_box_reward_edge_cases(bbox_text, expected):
    text = f"<think>t</think> <rule>r</rule> <bbox>{bbox_text}</bbox> <answer>a</answer>"
    assert box_reward([text], [GT], [None]) == [expected]


def test_box_reward_malformed_and_missing_ground_truth():
    garbage = ["", "no tags at all", "<bbox>", "<bbox>[100,100,199,199]", chat("")]  # the fourth: truncated
    assert box_reward(garbage, [GT] * 5, [None] * 5) == [0.0, 0.0, 0.0, 1.0, 0.0]
    # An empty ground-truth mask has no box: every completion of the group gets 0 (neutral).
    assert box_reward([out(GT), out((0, 0, 599, 599))], [None, None], [None, None]) == [0.0, 0.0]


def test_box_reward_first_tag_wins_and_extra_check_is_ignored_without_hidden_box():
    text = out(GT, check=(0, 0, 5, 5)) + " <bbox>[0,0,1,1]</bbox>"
    assert box_reward([text], [GT], [None]) == [1.0]


# --------------------------------------------------------------------------- mask reward


@pytest.fixture(scope="module")
def sam():
    from conceptseg_edge.models.sam2 import build_sam2_model

    torch.manual_seed(0)
    return build_sam2_model("conceptseg_tiny", None, 128).model


@pytest.fixture(scope="module")
def masker(sam):
    return ConceptMasker(sam, cache_size=2)


def _episode(mask_box=(20, 30, 90, 110), size=128, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    if mask_box is not None:
        x1, y1, x2, y2 = mask_box
        mask[y1 : y2 + 1, x1 : x2 + 1] = True
    return build_meta_episode(image, mask, "red circle", [])


def test_mask_reward_matches_the_sam2_reference(sam, masker):
    """The reward's mask is the eager SAM2 reference's single-mask prediction at 600x600."""
    from conceptseg_edge.models.sam2 import SAM2Reference

    ep = _episode()
    torch.manual_seed(1)
    tokens = torch.randn(1, 8, 256)
    ref = SAM2Reference(sam)
    ref.set_image(ep.target)
    for box in (ep.gt_box, (0, 0, 300, 599), None):
        text = out(box) if box else "<think>t</think> no box"
        reward = mask_reward(masker, "ep0", ep, text, tokens)
        box_px = box_to_image(box, (600, 600))
        pred = ref.predict(box=None if box_px is None else np.array(box_px), concept_tokens=tokens.numpy(), multimask_output=False)
        expected = iou(pred.masks[0], ep.gt_mask)
        assert reward == pytest.approx(expected, abs=2e-3), box  # a boundary pixel may round differently


def test_mask_reward_empty_masks(masker):
    empty_gt = _episode(mask_box=None)
    full_gt = _episode()
    # No completion tokens: no concept, an empty mask. Empty vs empty is a perfect 1, as metrics.iou says.
    assert mask_reward(masker, "e", empty_gt, "", None) == 1.0
    assert mask_reward(masker, "f", full_gt, "", None) == 0.0
    # A predicted mask against an empty ground truth scores 1 only if it is empty too.
    tokens = torch.zeros(1, 8, 256)
    logits = masker.logits(masker.features("e", empty_gt.target), tokens, (0, 0, 599, 599))
    predicted_empty = not bool((logits > 0).any())
    assert mask_reward(masker, "e", empty_gt, out((0, 0, 599, 599)), tokens) == (1.0 if predicted_empty else 0.0)


def test_mask_iou_reward_calls_tokens_per_completion_and_caches_features(masker):
    eps = {"a": _episode(seed=0), "b": _episode(mask_box=(0, 0, 127, 127), seed=1)}
    calls = []

    def tokens_fn(episode, ids):
        calls.append(len(ids))
        return torch.full((1, 8, 256), float(len(ids)) / 10)

    reward = MaskIoUReward(masker, eps.__getitem__, tokens_fn)
    assert reward.__name__ == "mask_iou"
    completions = [out(eps["a"].gt_box), chat("garbage"), out((0, 0, 599, 599))]
    encoder_runs = []
    handle = masker.encoder.register_forward_hook(lambda *_: encoder_runs.append(1))
    try:
        got = reward(completions=completions, completion_ids=[[1, 2, 3], [], [4]], episode_id=["a", "a", "b"], extra=1)
        assert calls == [3, 1]  # the empty completion reads no hidden states
        expected = [
            mask_reward(masker, "a", eps["a"], completions[0], tokens_fn(eps["a"], [1, 2, 3])),
            0.0,  # empty completion, non-empty ground truth
            mask_reward(masker, "b", eps["b"], completions[2], tokens_fn(eps["b"], [4])),
        ]
        assert got == expected
        assert len(encoder_runs) == 2  # one encoder run per episode: the second pass reads the cache
        masker.features("c", eps["a"].target)  # a third key evicts the least recently used ("a")
        masker.features("b", eps["b"].target)
        assert len(encoder_runs) == 3
        masker.features("a", eps["a"].target)
        assert len(encoder_runs) == 4  # LRU of two
    finally:
        handle.remove()
