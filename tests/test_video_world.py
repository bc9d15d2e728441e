"""ConceptWorld in motion: determinism, what each clip kind promises, the folder layout, and J&F on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge import metrics
from conceptseg_edge.cli import main
from conceptseg_edge.data.video_world import (
    COLOUR_CHANGE_QUERY,
    KIND_LEVELS,
    KINDS,
    MIN_ABSENT,
    MIN_LENGTH,
    VideoClip,
    VideoWorld,
    read_clip,
    write_clip,
)
from conceptseg_edge.data.world import CI_CLASSES, PALETTE
from conceptseg_edge.errors import InputError
from conceptseg_edge.video import open_frames

SIZE, LENGTH = 96, 16


@pytest.fixture(scope="module")
def clips() -> dict[str, VideoClip]:
    world = VideoWorld(3, SIZE, LENGTH)
    return {world.kind_of(i): world.clip(i) for i in range(len(KINDS))}


def _same(a: VideoClip, b: VideoClip) -> bool:
    return (all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames)) and a.masks.keys() == b.masks.keys()
            and all(np.array_equal(a.masks[k], b.masks[k]) for k in a.masks)
            and (a.targets, a.query, a.level, a.kind, a.names, a.query_from)
            == (b.targets, b.query, b.level, b.kind, b.names, b.query_from))  # fmt: skip


def _present(masks: np.ndarray) -> np.ndarray:
    return masks.reshape(len(masks), -1).any(axis=1)


def test_a_clip_is_a_pure_function_of_seed_index_size_and_length() -> None:
    first = VideoWorld(1, 64, MIN_LENGTH).clip(9)
    world = VideoWorld(1, 64, MIN_LENGTH)
    for index in range(3):
        world.clip(index)
    assert _same(world.clip(9), first)
    assert not np.array_equal(VideoWorld(2, 64, MIN_LENGTH).clip(9).frames[0], first.frames[0])
    assert not np.array_equal(first.frames[0], first.frames[1])  # grain and motion: frames differ


def test_every_kind_with_its_level_and_sane_ground_truth(clips: dict[str, VideoClip]) -> None:
    assert set(clips) == set(KINDS) and {c.level for c in clips.values()} == {"CI", "CD", "CR"}
    for kind, clip in clips.items():
        assert clip.level == KIND_LEVELS[kind] and clip.kind == kind and len(clip) == LENGTH
        assert clip.frames[0].shape == (SIZE, SIZE, 3) and clip.frames[0].dtype == np.uint8
        stacked = np.stack(list(clip.masks.values()))
        assert stacked.sum(axis=0).max() <= 1, kind  # visible masks never overlap
        target = clip.target_masks()
        assert target[clip.query_from].any(), kind  # the query has something to find where it starts
        assert not target[: clip.query_from].any()
        if clip.level == "CI":
            cls = next(c for c in CI_CLASSES if c.name == clip.query)
            assert clip.cls_name == cls.name
        assert set(clip.names) == set(clip.masks)


def test_move_and_distractor_keep_the_target_in_view_and_moving(clips: dict[str, VideoClip]) -> None:
    for kind in ("move", "distractor"):
        target = clips[kind].target_masks()
        assert _present(target).all(), kind
        assert not np.array_equal(target[0], target[-1]), kind


def _look(name: str) -> tuple[str, str, str]:
    words = name.split()
    return words[0], (words[1] if len(words) == 3 else "plain"), words[-1]


def test_distractors_include_near_concepts(clips: dict[str, VideoClip]) -> None:
    clip = clips["distractor"]
    [target] = clip.targets
    colour, texture, shape = _look(clip.names[target])
    assert colour in PALETTE
    near = [k for k, name in clip.names.items()
            if k != target and sum(a != b for a, b in zip(_look(name), (colour, texture, shape))) == 1]  # fmt: skip
    assert len(near) >= 2, clip.names
    cls = next(c for c in CI_CLASSES if c.name == clip.query)
    for k in clip.names:  # no distractor is of the queried class
        if k != target:
            c, t, s = _look(clip.names[k])
            assert not (s == cls.shape and cls.colour in (None, c) and cls.texture in (None, t)), clip.names[k]


def test_occlusion_hides_the_target_completely_for_a_while(clips: dict[str, VideoClip]) -> None:
    clip = clips["occlusion"]
    [target] = clip.targets
    seen = _present(clip.masks[target])
    assert seen[0] and seen[-1] and not seen.all()
    hidden = np.flatnonzero(~seen)
    assert np.array_equal(hidden, np.arange(hidden[0], hidden[-1] + 1))  # one stretch, mid-clip
    occluder = max(clip.masks)
    assert occluder > target  # drawn over it
    t = hidden[0]
    assert clip.masks[occluder][t].sum() > clip.masks[target][0].sum()


@pytest.mark.parametrize(("kind", "n"), [("reenter", 0), ("reenter", 1), ("reenter", 2), ("salient reenter", 0), ("salient reenter", 1)])
def test_reenter_target_leaves_for_at_least_min_absent_frames_and_returns(kind: str, n: int) -> None:
    world = VideoWorld(n, 64, 20 + 5 * n)
    clip = world.clip(world.index_of(kind, n))
    assert clip.level == KIND_LEVELS[kind]
    seen = _present(clip.target_masks())
    assert seen[0] and seen[-1]
    away = np.flatnonzero(~seen)
    assert len(away) >= MIN_ABSENT and np.array_equal(away, np.arange(away[0], away[-1] + 1)), seen
    assert clip.target_masks()[0].sum() == clip.target_masks()[1].sum() or seen[1]  # fully in frame at the start


def test_colour_change_ground_truth_starts_at_the_change(clips: dict[str, VideoClip]) -> None:
    clip = clips["colour change"]
    [target] = clip.targets
    t = clip.query_from
    assert clip.query == COLOUR_CHANGE_QUERY and clip.cls_name == "changed object"
    assert LENGTH // 3 <= t <= 2 * LENGTH // 3 and f"from frame {t}" in clip.names[target]
    assert clip.masks[target][:t].any()  # the object is there before; the query only applies from t
    before, after = clip.masks[target][t - 1], clip.masks[target][t]
    colour_before = clip.frames[t - 1][before].mean(axis=0)
    colour_after = clip.frames[t][after].mean(axis=0)
    assert np.abs(colour_before - colour_after).max() > 40
    others = [k for k in clip.masks if k != target]
    for k in others:  # nothing else changes colour
        a, b = clip.masks[k][t - 1], clip.masks[k][t]
        if a.sum() > 20 and b.sum() > 20:
            assert np.abs(clip.frames[t - 1][a].mean(axis=0) - clip.frames[t][b].mean(axis=0)).max() < 40


def test_cd_clips_one_object_that_moves(clips: dict[str, VideoClip]) -> None:
    for kind in ("saliency", "camouflage"):
        clip = clips[kind]
        assert list(clip.masks) == [1] and clip.targets == (1,)
        assert _present(clip.masks[1]).all()
        assert abs(int(clip.masks[1][0].sum()) - int(clip.masks[1][-1].sum())) <= 0.1 * clip.masks[1][0].sum()


def test_write_and_read_back(clips: dict[str, VideoClip], tmp_path: Path) -> None:
    clip = clips["occlusion"]
    root = write_clip(clip, tmp_path / "clip")
    names = sorted(p.name for p in (root / "frames").iterdir())
    assert names == [f"{t:05d}.jpg" for t in range(LENGTH)]  # sam2's video predictor reads <int>.jpg
    meta = json.loads((root / "clip.json").read_text())
    assert meta["query"] == clip.query and meta["targets"] == list(clip.targets) and meta["n_frames"] == LENGTH
    back = read_clip(root)
    assert all(np.array_equal(back.masks[k], clip.masks[k]) for k in clip.masks)
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(back.frames, clip.frames)) < 3.0  # JPEG, quality 95
    assert len(list(open_frames(root / "frames"))) == LENGTH
    exact = read_clip(write_clip(clip, tmp_path / "png", image_format="png"))
    assert _same(exact, clip)
    assert _same(read_clip(write_clip(clip, tmp_path / "png", image_format="png")), clip)  # a clip folder is replaced


def test_bad_arguments_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=f"length: at least {MIN_LENGTH} frames"):
        VideoWorld(0, 64, MIN_LENGTH - 1)
    with pytest.raises(InputError, match="image_size: at least 32"):
        VideoWorld(0, 16)
    with pytest.raises(InputError, match="index: must be >= 0"):
        VideoWorld(0, 64, MIN_LENGTH).clip(-1)
    with pytest.raises(InputError, match="kind: 'spin' is not one of"):
        VideoWorld().index_of("spin")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a video clip folder"):
        write_clip(VideoWorld(0, 32, MIN_LENGTH).clip(0), tmp_path / "other")
    with pytest.raises(InputError, match="clip.json: missing"):
        read_clip(tmp_path / "other")


def test_jf_of_ground_truth_and_of_a_frozen_first_mask(clips: dict[str, VideoClip]) -> None:
    """The metric and the world together: the ground truth scores 1; holding frame 0's mask loses the
    target as it moves, and the reenter target's absence is credited only where the mask is empty too."""
    for kind in ("move", "reenter"):
        target = clips[kind].target_masks()
        assert metrics.jf_sequence(list(target), list(target)).jf_mean == 1.0
        frozen = metrics.jf_sequence([target[0]] * LENGTH, list(target))
        assert frozen.j[0] == 1.0 and frozen.jf_mean < 0.9 and frozen.j_decay > 0


def test_data_make_video_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reenter"
    code = main(["data", "make-video", "--out", str(out), "--kind", "reenter", "--seed", "4", "--image-size", "64",
                 "--length", str(MIN_LENGTH)])  # fmt: skip
    assert code == 0
    world = VideoWorld(4, 64, MIN_LENGTH)
    assert _same(read_clip(out), read_clip(write_clip(world.clip(world.index_of("reenter")), tmp_path / "direct")))
    assert "reenter" in capsys.readouterr().out
    assert main(["data", "make-video", "--out", str(tmp_path / "x"), "--length", "3"]) == 2
    assert "length: at least" in capsys.readouterr().err


def test_sam2_video_predictor_reads_a_written_clip(clips: dict[str, VideoClip], tmp_path: Path) -> None:
    """sam2's own loader (``SAM2VideoPredictor.init_state`` calls it) reads the frames folder in order."""
    import torch
    from sam2.utils.misc import load_video_frames

    clip = clips["move"]
    root = write_clip(clip, tmp_path / "clip")
    images, height, width = load_video_frames(str(root / "frames"), SIZE, offload_video_to_cpu=True,
                                              compute_device=torch.device("cpu"))  # fmt: skip
    assert images.shape == (LENGTH, 3, SIZE, SIZE) and (height, width) == (SIZE, SIZE)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    pixels = [((img * std + mean) * 255).permute(1, 2, 0).numpy() for img in images]
    for t in (0, LENGTH // 2, LENGTH - 1):
        same = np.abs(pixels[t] - clip.frames[t]).mean()
        other = np.abs(pixels[t] - clip.frames[(t + LENGTH // 2) % LENGTH]).mean()
        assert same < 3.0 and other > same, (t, same, other)
