"""Meta-episodes: mosaic layout, box frames, hidden/visible boxes, prompt text."""

from __future__ import annotations

import numpy as np
import pytest

from conceptseg_edge.data.world import ConceptWorld
from conceptseg_edge.episodes import (
    SYSTEM_PROMPT,
    Support,
    box_from_mask,
    build_meta_episode,
    choose_supports,
    scale_box,
    supports_needed,
)
from conceptseg_edge.errors import InputError
from conceptseg_edge.tags import format_output, parse_output

RED = (255, 0, 0)


def grey(size: int, value: int = 128) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def support_100(value: int = 128) -> Support:
    """A 100x100 support whose object fills rows 10..29, columns 20..59."""
    mask = np.zeros((100, 100), bool)
    mask[10:30, 20:60] = True
    return Support(grey(100, value), box_from_mask(mask), mask)


def target_200() -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((200, 200), bool)
    mask[50:100, 100:150] = True
    return grey(200, 90), mask


def test_box_from_mask() -> None:
    mask = np.zeros((5, 6), bool)
    mask[1:3, 2:5] = True
    assert box_from_mask(mask) == (2, 1, 4, 2)
    assert box_from_mask(np.zeros((4, 4), bool)) is None
    with pytest.raises(InputError):
        box_from_mask(np.zeros((2, 2, 2), bool))


def test_supports_needed_follows_the_paper() -> None:
    # A class of two training items leaves one candidate: one support; otherwise four.
    assert [supports_needed(n) for n in (0, 1, 2, 3, 10)] == [0, 1, 4, 4, 4]


def test_choose_supports() -> None:
    rng = np.random.default_rng(0)
    assert choose_supports(2, 0, rng) == [1]
    assert choose_supports(1, 0, rng) == []
    picks = choose_supports(3, 1, rng)  # two candidates, four needed: with replacement
    assert len(picks) == 4 and set(picks) <= {0, 2}
    picks = choose_supports(10, 3, rng)
    assert len(set(picks)) == 4 and 3 not in picks
    assert choose_supports(10, None, np.random.default_rng(5)) == choose_supports(10, None, np.random.default_rng(5))


def test_scale_box_keeps_covering_the_same_pixels() -> None:
    assert scale_box((10, 20, 29, 39), 100, 100, 300) == (30, 60, 89, 119)
    assert scale_box((0, 0, 99, 49), 100, 50, 600) == (0, 0, 599, 599)
    assert scale_box((1, 1, 1, 1), 3, 3, 2) == (0, 0, 1, 1)


def test_four_support_mosaic() -> None:
    target, mask = target_200()
    supports = [support_100(40 * (i + 1)) for i in range(4)]
    ep = build_meta_episode(target, mask, "striped square", supports)
    assert ep.mosaic is not None and ep.mosaic.shape == (600, 600, 3) and ep.mosaic.dtype == np.uint8
    assert ep.target.shape == (600, 600, 3) and ep.gt_mask.shape == (600, 600)
    # Each 100 px support goes to a 300 px tile (x3): rows 30..89, cols 60..179, offset per tile.
    assert ep.hidden_box == (60, 30, 179, 89)
    assert ep.visible_boxes == ((360, 30, 479, 89), (60, 330, 179, 389), (360, 330, 479, 389))
    assert ep.has_hidden_box
    # Tiles hold the supports in reading order; visible boxes are drawn in red, the hidden one not.
    assert tuple(ep.mosaic[150, 250]) == (40, 40, 40) and tuple(ep.mosaic[450, 550]) == (160, 160, 160)
    for x1, y1, x2, y2 in ep.visible_boxes:
        assert tuple(ep.mosaic[y1, x1]) == RED and tuple(ep.mosaic[y2, x2]) == RED
    assert tuple(ep.mosaic[30, 60]) == (40, 40, 40)
    # Target mask (rows 50..99, cols 100..149 of 200) scales x3.
    assert ep.gt_box == (300, 150, 449, 299)
    assert ep.gt_mask.sum() == 150 * 150
    assert "[360,30,479,89]" in ep.prompt and "[60,30,179,89]" not in ep.prompt
    assert "<check>" in ep.prompt and '"striped square"' in ep.prompt
    assert len(ep.images()) == 2


def test_one_support_fills_the_frame_and_hides_nothing() -> None:
    target, mask = target_200()
    ep = build_meta_episode(target, mask, "cat", [support_100()])
    assert ep.hidden_box is None and not ep.has_hidden_box
    assert ep.visible_boxes == ((120, 60, 359, 179),)  # x6
    assert ep.mosaic is not None and tuple(ep.mosaic[60, 120]) == RED
    assert "<check>" not in ep.prompt and "[120,60,359,179]" in ep.prompt


def test_two_supports_tile_and_leave_the_rest_black() -> None:
    target, mask = target_200()
    ep = build_meta_episode(target, mask, "q", [support_100(), support_100()])
    assert ep.hidden_box == (60, 30, 179, 89) and ep.visible_boxes == ((360, 30, 479, 89),)
    assert ep.mosaic is not None and (ep.mosaic[300:, :] == 0).all()


def test_support_without_mask_uses_its_scaled_box() -> None:
    target, mask = target_200()
    boxed = Support(grey(100), (10, 20, 29, 39))
    ep = build_meta_episode(target, mask, "q", [support_100(), boxed])
    assert ep.visible_boxes == ((330, 60, 389, 119),)


def test_hidden_support_without_box_means_no_check() -> None:
    target, mask = target_200()
    ep = build_meta_episode(target, mask, "q", [Support(grey(100), None), support_100()])
    assert ep.hidden_box is None and "<check>" not in ep.prompt


def test_no_supports_only_the_target() -> None:
    target, mask = target_200()
    ep = build_meta_episode(target, mask, "find the cat", [])
    assert ep.mosaic is None and ep.visible_boxes == () and len(ep.images()) == 1
    assert "Image 1" not in ep.prompt and "<bbox>" in ep.prompt


def test_messages_hold_system_prompt_images_then_text() -> None:
    target, mask = target_200()
    ep = build_meta_episode(target, mask, "q", [support_100()] * 4)
    system, user = ep.messages()
    assert system == {"role": "system", "content": SYSTEM_PROMPT} and SYSTEM_PROMPT == "You are a helpful assistant."
    kinds = [part["type"] for part in user["content"]]
    assert kinds == ["image", "image", "text"]
    assert user["content"][0]["image"].size == (600, 600)
    assert user["content"][2]["text"] == ep.prompt


def test_empty_target_mask_has_no_gt_box() -> None:
    ep = build_meta_episode(grey(64), np.zeros((64, 64), bool), "q", [])
    assert ep.gt_box is None and not ep.gt_mask.any()


def test_bad_inputs() -> None:
    target, mask = target_200()
    with pytest.raises(InputError, match="at most 4"):
        build_meta_episode(target, mask, "q", [support_100()] * 5)
    with pytest.raises(InputError, match="query"):
        build_meta_episode(target, mask, "  ", [])
    with pytest.raises(InputError, match="target_mask"):
        build_meta_episode(target, mask[:10], "q", [])
    with pytest.raises(InputError, match="target"):
        build_meta_episode(target[..., 0], mask, "q", [])
    with pytest.raises(InputError, match="support.mask"):
        Support(grey(10), None, np.zeros((5, 5), bool))


def test_world_episode_to_policy_and_back() -> None:
    world = ConceptWorld(seed=3, image_size=96)
    for index in (0, 8, 9):  # CI with four supports, CR difference (one), CR consistency (two)
        episode = world.episode(index)
        ep = build_meta_episode(episode.image, episode.mask, episode.query, episode.supports)
        assert ep.gt_box is not None and ep.gt_box == box_from_mask(ep.gt_mask)
        assert ep.has_hidden_box == (len(episode.supports) > 1)
        answer = format_output(think="t", rule="r", bbox=ep.gt_box, answer=episode.cls_name, check=ep.hidden_box)
        parsed = parse_output(answer, has_hidden_box=ep.has_hidden_box)
        assert parsed.well_formed and parsed.bbox == ep.gt_box and parsed.check == ep.hidden_box
