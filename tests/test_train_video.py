"""``train video``: the memory path of a small SAM2 learns on VideoWorld clips through sam2's own
``track_step``, the image path stays bit-identical, runs resume exactly, and bad configs are typed
errors. A random-init ``conceptseg_tiny`` at 64 px keeps each test to seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptseg_edge.cli import main
from conceptseg_edge.errors import InputError
from conceptseg_edge.train.config import load_config
from conceptseg_edge.train.video import (
    MEMORY_MODULES,
    ClipSource,
    VideoConfig,
    VideoDataConfig,
    build_model,
    memory_parameters,
    train_step,
    train_video,
)

SIZE = 64


@pytest.fixture(scope="module")
def backbone_pt(tmp_path_factory) -> Path:
    """A seeded random-init conceptseg_tiny in the official ``{"model": state_dict}`` format."""
    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.train.backbone import write_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("video_backbone") / "backbone.pt"
    write_backbone(path, build_sam2_model("conceptseg_tiny", None, SIZE).model)
    return path


def _cfg(backbone_pt: Path, out: Path, **changes) -> VideoConfig:
    cfg = VideoConfig(out_dir=str(out), backbone_checkpoint=str(backbone_pt), image_size=SIZE,
                      data=VideoDataConfig(seed=1, image_size=SIZE, clip_length=12, train_clips=8),
                      steps=2, clips_per_step=1, frames_per_clip=3, warmup_steps=0, eval_clips=1,
                      eval_every=2, save_every=1, threads=1, progress=False)
    return dataclasses.replace(cfg, **changes)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_steps_on_one_window_lower_its_loss(backbone_pt, tmp_path, one_thread):
    cfg = _cfg(backbone_pt, tmp_path / "unused", lr=3e-3, absence_prob=1.0)
    sam = build_model(cfg)
    optimizer = torch.optim.AdamW(list(memory_parameters(sam).values()), lr=cfg.lr)
    source = ClipSource(cfg)
    losses = [train_step(cfg, sam, optimizer, source, 0)["loss"] for _ in range(6)]  # step 0: the same window
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses


def test_only_the_memory_path_changes_and_resume_is_exact(backbone_pt, tmp_path, one_thread):
    whole = train_video(_cfg(backbone_pt, tmp_path / "whole"))
    before, after = _state(backbone_pt), _state(whole.checkpoint)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.split(".")[0] not in MEMORY_MODULES]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # image path bit-identical
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(MEMORY_MODULES)
    assert {"memory_attention", "memory_encoder", "obj_ptr_proj"} <= changed
    summary = json.loads((tmp_path / "whole" / "video.json").read_text())
    assert set(summary["heldout"]) == {"before", "after"} and summary["steps_per_s"] > 0
    assert 0 <= summary["heldout"]["after"]["J"] <= 1
    assert (tmp_path / "whole" / "curves.png").is_file() and (tmp_path / "whole" / "metrics.csv").is_file()

    # interrupted after step 1, then resumed: the same weights as the uninterrupted run
    cfg = _cfg(backbone_pt, tmp_path / "resumed")
    stopped = train_video(cfg, stop_after=1)
    assert not stopped.checkpoint.exists()
    resumed = train_video(cfg)
    again = _state(resumed.checkpoint)
    assert all(torch.equal(after[k], again[k]) for k in after)


@pytest.mark.parametrize("changes,needle", [
    ({"eval_seed": 1}, "video.eval_seed: 1 is data.seed too"),
    ({"frames_per_clip": 1}, "video.frames_per_clip: at least 2"),
    ({"box_prob": 1.5}, "video.box_prob: expected a fraction"),
    ({"image_size": 100}, "video.image_size: a positive multiple of 64"),
    ({"sam2_config": "nope"}, "video.sam2_config: 'nope' is not one of"),
])
def test_bad_settings_are_typed_errors_before_any_output(backbone_pt, tmp_path, changes, needle):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=needle):
        train_video(_cfg(backbone_pt, out, **changes))
    assert not out.exists()


def test_missing_checkpoint_and_unknown_key(tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "video.yaml"
    config.write_text(f"out_dir: {out}\nbackbone_checkpoint: {tmp_path / 'absent.pt'}\n")
    assert main(["train", "video", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "video.backbone_checkpoint" in err and "absent.pt" in err, err
    assert not out.exists()
    config.write_text("stepz: 3\n")
    with pytest.raises(InputError, match="stepz"):
        load_config(config, VideoConfig)
