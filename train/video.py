"""``train video``: train a SAM2 backbone's memory path on VideoWorld clips, so tracking works.

``train backbone`` trains the image path only (encoder, prompt encoder, mask decoder); the modules
SAM2 adds for video stay at their random init, and tracking with them is poor (measured on
ConceptSeg-Tiny: presence ~0.64 on every tracked frame, object there or not). This stage trains
exactly those modules, SAM2-style, with sam2's own training forward:

- a clip of ``frames_per_clip`` consecutive VideoWorld frames; frame 0 is a conditioning frame
  prompted from the ground truth, by its mask (``_use_mask_as_output``, how the tracker starts an
  object a concept route found) or by its box; frames 1.. are tracked by ``SAM2Base.track_step``
  with ``run_mem_encoder=True``, each frame's memory feeding the next, gradients through all of it;
- losses on each tracked frame: BCE + Dice of the high-res mask against the object's visible mask
  (skipped when the object is not visible, as SAM2 does) and BCE of the object-score logit against
  "visible", the two classes weighted alike (``presence_loss``). Occlusions and objects that leave
  and re-enter (kinds ``occlusion``, ``reenter``, ``salient reenter``; ``absence_prob`` of the
  windows are chosen to hold an absent frame) teach the presence score the tracker's lost/re-fire
  logic reads.

What trains: ``MEMORY_MODULES`` (memory attention, memory encoder, object-pointer projections,
temporal encodings, the no-object pointer and embedding, and ``mask_downsample``, which only the
mask-prompted conditioning frame uses). Everything else is frozen, ``no_mem_embed`` included: the
image encoder's exported output already has it added and the image routes decode that output, so
every image graph and image route stays bit-identical (checked before the checkpoint is written),
and the CTM trained against the backbone stays valid. Image features are computed once per clip
under ``no_grad`` (the encoder is frozen). The model runs in eval mode: dropout off and the same
forward (multimask choice, binarised memory masks) the tracker and ``SAM2VideoPredictor`` run.

Data: clips ``[0, data.train_clips)`` of ``VideoWorld(data.seed)``; the held-out report tracks one
clip of every kind from ``VideoWorld(eval_seed)`` (another world). Step ``s`` draws from
``default_rng([seed, s])`` only, so a resumed run takes the steps an uninterrupted one would.

Outputs in ``out_dir``: ``backbone.pt`` (the input checkpoint with the trained memory weights, the
official format ``export sam2`` / ``export concept --video`` read), ``video.json`` (held-out J and
presence per kind, before and after, timings), ``metrics.csv`` + ``curves.png``, ``config.yaml``,
``state/`` (resume).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from conceptseg_edge.data.video_world import KINDS, MIN_LENGTH, VideoClip, VideoWorld
from conceptseg_edge.episodes import box_from_mask
from conceptseg_edge.errors import InputError, TrainingError
from conceptseg_edge.fileio import sha256_file
from conceptseg_edge.metrics import iou
from conceptseg_edge.models.sam2 import SAM2_CONFIGS
from conceptseg_edge.train.backbone import write_backbone
from conceptseg_edge.train.config import LoopConfig, check_types, load_config, require_fraction, require_positive
from conceptseg_edge.train.loop import (
    StageResult,
    begin_stage,
    eval_mode,
    lr_at,
    run_steps,
    seed_everything,
    set_lr,
    write_summary,
)
from conceptseg_edge.train.sam2_batch import bce_dice, sam_input, upsample

#: The SAM2 modules only video uses: what this stage trains (names of ``SAM2Base`` attributes).
MEMORY_MODULES = ("memory_attention", "memory_encoder", "obj_ptr_proj", "obj_ptr_tpos_proj", "maskmem_tpos_enc",
                  "no_obj_ptr", "no_obj_embed_spatial", "mask_downsample")
#: Logits are clamped to this before BCE: a frame SAM2 blanked to -1024 (object score < 0) counts as a
#: confident miss, not as 1024 per pixel (no gradient flows either way).
_LOGIT_CLAMP = 32.0


@dataclass
class VideoDataConfig:
    seed: int = field(default=1, metadata={"help": "VideoWorld seed of the training clips"})
    image_size: int = field(default=128, metadata={"help": "VideoWorld frame side, px (ground-truth size)"})
    clip_length: int = field(default=30, metadata={"help": "frames per VideoWorld clip (windows are cut from it)"})
    train_clips: int = field(default=400, metadata={"help": "training clips: indices [0, n)"})


@dataclass
class VideoConfig(LoopConfig):
    """``train video`` settings: this repo's CPU-sized choices (SAM2 trains on 8-frame clips; shorter
    windows, more of them, measured better here: see train/configs/tiny/video.yaml)."""

    out_dir: str = "runs/video"
    sam2_config: str = field(default="conceptseg_tiny", metadata={"help": "a name in SAM2_CONFIGS"})
    backbone_checkpoint: str = field(default="runs/backbone/backbone.pt",
                                     metadata={"help": "SAM2 weights (.pt) to start from"})
    image_size: int = field(default=128, metadata={"help": "SAM2 input side (multiple of 64)"})
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    steps: int = 300
    clips_per_step: int = 3
    frames_per_clip: int = field(default=5, metadata={"help": "frame 0 conditioning, the rest tracked"})
    box_prob: float = field(default=0.25, metadata={"help": "share of clips started from a box (the rest: the mask)"})
    target_prob: float = field(default=0.7,
                               metadata={"help": "share of clips tracking the query's target (else any object)"})
    absence_prob: float = field(default=0.5,
                                metadata={"help": "share of windows chosen to hold a frame the object is not visible"})
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    presence_weight: float = 1.0
    eval_seed: int = field(default=0, metadata={"help": "VideoWorld seed of the held-out clips"})
    eval_clips: int = field(default=8, metadata={"help": "held-out clips: one per kind, cycling"})

    def validate(self) -> None:
        where = "video"
        check_types(self, where)
        if self.sam2_config not in SAM2_CONFIGS:
            raise InputError(f"{where}.sam2_config: {self.sam2_config!r} is not one of {sorted(SAM2_CONFIGS)}")
        if self.image_size <= 0 or self.image_size % 64:
            raise InputError(f"{where}.image_size: a positive multiple of 64, got {self.image_size!r}")
        require_positive(where, steps=self.steps, clips_per_step=self.clips_per_step, lr=self.lr,
                         save_every=self.save_every, eval_every=self.eval_every, eval_clips=self.eval_clips)
        if self.frames_per_clip < 2:
            raise InputError(f"{where}.frames_per_clip: at least 2 (a conditioning frame and a tracked one), "
                             f"got {self.frames_per_clip}")
        require_positive(f"{where}.data", image_size=self.data.image_size, train_clips=self.data.train_clips)
        if self.data.clip_length < max(MIN_LENGTH, self.frames_per_clip):
            raise InputError(f"{where}.data.clip_length: at least {max(MIN_LENGTH, self.frames_per_clip)} "
                             f"(VideoWorld's minimum and frames_per_clip), got {self.data.clip_length}")
        if self.data.seed < 0 or self.eval_seed < 0:
            raise InputError(f"{where}: data.seed and eval_seed must be >= 0")
        if self.eval_seed == self.data.seed:
            raise InputError(f"{where}.eval_seed: {self.eval_seed} is data.seed too; held-out clips must come from "
                             "another world")
        require_fraction(where, box_prob=self.box_prob, target_prob=self.target_prob, absence_prob=self.absence_prob)


# --------------------------------------------------------------------------- model


def memory_parameters(sam: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``MEMORY_MODULES``, by their state-dict name."""
    return {n: p for n, p in sam.named_parameters() if n.split(".")[0] in MEMORY_MODULES}


def build_model(cfg: VideoConfig) -> torch.nn.Module:
    """The SAM2 of ``backbone_checkpoint`` in eval mode, only ``MEMORY_MODULES`` requiring grad."""
    from conceptseg_edge.models.sam2 import build_sam2_model

    seed_everything(cfg.seed)
    sam = build_sam2_model(cfg.sam2_config, cfg.backbone_checkpoint, cfg.image_size).model.eval()
    trainable = memory_parameters(sam)
    for name, p in sam.named_parameters():
        p.requires_grad_(name in trainable)
    return sam


def frozen_state(sam: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor this stage must not change (all but ``MEMORY_MODULES``)."""
    return {k: v.detach().clone() for k, v in sam.state_dict().items() if k.split(".")[0] not in MEMORY_MODULES}


def require_unchanged(sam: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> None:
    """``TrainingError`` naming the first frozen tensor that is not bit-identical to ``frozen``."""
    state = sam.state_dict()
    for name, before in frozen.items():
        if not torch.equal(state[name], before):
            raise TrainingError(f"video: frozen tensor {name} changed during training; the image routes would no "
                                "longer match the committed graphs")


def clip_features(sam: torch.nn.Module, frames: list[np.ndarray], image_size: int):
    """SAM2's per-level vision features, position encodings and sizes for every frame, no grad."""
    with torch.no_grad():
        out = sam.forward_image(sam_input(frames, image_size))
        _, feats, pos, sizes = sam._prepare_backbone_features(out)
    return feats, pos, sizes


def track_clip(sam: torch.nn.Module, frames: list[np.ndarray], first_mask: np.ndarray, image_size: int,
               use_box: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition on frame 0 (its mask, or the mask's box) and track the rest with ``track_step``.

    Returns the high-res mask logits of frames 1.. (T-1, S, S) and their object-score logits (T-1,).
    Gradients flow wherever the caller enables them.
    """
    feats, pos, sizes = clip_features(sam, frames, image_size)
    n = len(frames)
    output_dict: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    masks, scores = [], []
    for t in range(n):
        points = mask_in = None
        if t == 0:
            if use_box:
                points = _box_points(first_mask, image_size)
            else:
                m = torch.from_numpy(first_mask).float()[None, None]
                mask_in = F.interpolate(m, (image_size, image_size), mode="nearest") if m.shape[-1] != image_size else m
        out = sam.track_step(
            frame_idx=t, is_init_cond_frame=t == 0,
            current_vision_feats=[f[:, t : t + 1] for f in feats],
            current_vision_pos_embeds=[p[:, t : t + 1] for p in pos],
            feat_sizes=sizes, point_inputs=points, mask_inputs=mask_in, output_dict=output_dict,
            num_frames=n, run_mem_encoder=True,
        )
        output_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
        if t > 0:
            masks.append(out["pred_masks_high_res"][0, 0])
            scores.append(out["object_score_logits"][0, 0])
    return torch.stack(masks), torch.stack(scores)


def _box_points(mask: np.ndarray, image_size: int) -> dict[str, torch.Tensor]:
    """The mask's box (exclusive corners) as SAM2 point inputs in the model frame, labels 2 and 3."""
    x0, y0, x1, y1 = box_from_mask(mask)
    h, w = mask.shape
    scale = np.array([image_size / w, image_size / h], np.float32)
    corners = np.array([[x0, y0], [x1 + 1, y1 + 1]], np.float32) * scale
    return {"point_coords": torch.from_numpy(corners)[None], "point_labels": torch.tensor([[2, 3]], dtype=torch.int32)}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Window:
    """One training sample: consecutive frames and the tracked object's visible mask in each."""

    frames: list[np.ndarray]
    masks: np.ndarray  # (T, H, W) bool; frame 0's is non-empty
    use_box: bool
    kind: str


class ClipSource:
    """Training windows drawn from VideoWorld clips; clip rendering is cached (a clip is ~0.1 s)."""

    def __init__(self, cfg: VideoConfig) -> None:
        self.cfg = cfg
        self.world = VideoWorld(cfg.data.seed, cfg.data.image_size, cfg.data.clip_length)
        self.clip = lru_cache(maxsize=64)(self.world.clip)

    def window(self, rng: np.random.Generator) -> Window:
        cfg = self.cfg
        while True:
            clip = self.clip(int(rng.integers(cfg.data.train_clips)))
            ids = list(clip.targets) if rng.random() < cfg.target_prob else list(clip.masks)
            masks = clip.masks[ids[int(rng.integers(len(ids)))]]
            start = _window_start(rng, masks, cfg.frames_per_clip, cfg.absence_prob)
            if start is not None:
                end = start + cfg.frames_per_clip
                return Window(clip.frames[start:end], masks[start:end], bool(rng.random() < cfg.box_prob), clip.kind)


def _window_start(rng: np.random.Generator, masks: np.ndarray, length: int, absence_prob: float) -> int | None:
    """A start whose first frame shows the object; with ``absence_prob``, one whose window also holds a
    frame where it is not visible (when the clip has one). None when the object never starts a window."""
    visible = masks.reshape(len(masks), -1).any(1)
    starts = [s for s in range(len(masks) - length + 1) if visible[s]]
    if not starts:
        return None
    absent = [s for s in starts if not visible[s : s + length].all()]
    pool = absent if absent and rng.random() < absence_prob else starts
    return pool[int(rng.integers(len(pool)))]


# --------------------------------------------------------------------------- training


def window_losses(cfg: VideoConfig, masks: torch.Tensor, scores: torch.Tensor,
                  target: np.ndarray) -> dict[str, torch.Tensor]:
    """Sums over a window's tracked frames: mask loss (visible frames only), presence BCE on visible
    and on hidden frames, counts."""
    tgt = torch.from_numpy(target).float()
    present = tgt.flatten(1).amax(1) > 0
    pf = present.float()
    up = upsample(masks[:, None], tuple(tgt.shape[-2:]))[:, 0].clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
    bce, dice = bce_dice(up, tgt)
    presence = F.binary_cross_entropy_with_logits(scores, pf, reduction="none")
    with torch.no_grad():
        hit = ((scores > 0) == present).float()
    return {"mask": ((cfg.bce_weight * bce + cfg.dice_weight * dice) * pf).sum(),
            "presence_visible": (presence * pf).sum(), "presence_hidden": (presence * (1 - pf)).sum(),
            "presence_acc": hit.sum(), "n_present": pf.sum(), "n": torch.tensor(float(len(pf)))}


def presence_loss(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """Presence BCE with visible and hidden frames weighted alike (each class's mean, averaged over
    the classes the step has): hidden frames are ~10% of the tracked ones, and a plain mean is
    minimised by "always visible" (measured: presence 0.94 on visible and hidden frames alike)."""
    n_hidden = sums["n"] - sums["n_present"]
    means = [sums[k] / n for k, n in (("presence_visible", sums["n_present"]), ("presence_hidden", n_hidden)) if n > 0]
    return torch.stack(means).mean()


def train_step(cfg: VideoConfig, sam: torch.nn.Module, optimizer: torch.optim.Optimizer, source: ClipSource,
               step: int) -> dict[str, float]:
    """One optimisation step (``step`` counts from 0) over ``clips_per_step`` windows."""
    t0 = time.perf_counter()
    set_lr(optimizer, lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps))
    rng = np.random.default_rng([cfg.seed, step])
    sums: dict[str, torch.Tensor] = {}
    for _ in range(cfg.clips_per_step):
        w = source.window(rng)
        masks, scores = track_clip(sam, w.frames, w.masks[0], cfg.image_size, w.use_box)
        for k, v in window_losses(cfg, masks, scores, w.masks[1:]).items():
            sums[k] = sums.get(k, 0) + v
    mask = sums["mask"] / sums["n_present"].clamp(min=1)
    presence = presence_loss(sums)
    loss = mask + cfg.presence_weight * presence
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "mask_loss": mask.item(), "presence_loss": presence.item(),
            "presence_acc": (sums["presence_acc"] / sums["n"]).item(), "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm), "step_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- evaluation


def evaluate_tracking(sam: torch.nn.Module, cfg: VideoConfig) -> dict[str, Any]:
    """Held-out tracking through the same eager forward: clip ``i < eval_clips`` of
    ``VideoWorld(eval_seed)``, its first target conditioned by its mask on the first frame it is
    visible, tracked to the end. J (``metrics.iou`` of the thresholded mask, 1 on a frame where both
    are empty) per kind and overall; mean sigmoid object score on frames where the object is visible
    vs not, and presence accuracy at 0.5."""
    world = VideoWorld(cfg.eval_seed, cfg.data.image_size, cfg.data.clip_length)
    per_kind: dict[str, list[float]] = {}
    shown, hidden = [], []
    with eval_mode(sam):
        for i in range(cfg.eval_clips):
            clip: VideoClip = world.clip(i)
            gt = clip.masks[clip.targets[0]]
            first = int(np.argmax(gt.reshape(len(gt), -1).any(1)))
            masks, scores = track_clip(sam, clip.frames[first:], gt[first], cfg.image_size, use_box=False)
            pred = upsample(masks[:, None], gt.shape[-2:])[:, 0].numpy() > 0
            per_kind.setdefault(clip.kind, []).extend(iou(p, g) for p, g in zip(pred, gt[first + 1 :]))
            prob = torch.sigmoid(scores).numpy()
            for p, g in zip(prob, gt[first + 1 :]):
                (shown if g.any() else hidden).append(float(p))
    j_all = [j for js in per_kind.values() for j in js]
    report: dict[str, Any] = {
        "J": round(float(np.mean(j_all)), 4),
        "J_per_kind": {k: round(float(np.mean(per_kind[k])), 4) for k in KINDS if k in per_kind},
        "presence_visible": round(float(np.mean(shown)), 4) if shown else None,
        "presence_hidden": round(float(np.mean(hidden)), 4) if hidden else None,
        "presence_accuracy_at_0.5": round(float((np.sum(np.array(shown) >= 0.5) + np.sum(np.array(hidden) < 0.5))
                                                / max(1, len(shown) + len(hidden))), 4),
        "frames_visible": len(shown), "frames_hidden": len(hidden),
    }
    return report


# --------------------------------------------------------------------------- the stage


def train_video(cfg: VideoConfig, out_dir: str | os.PathLike[str] | None = None, *,
                stop_after: int | None = None) -> StageResult:
    """Train (or resume) the memory path; ``stop_after`` ends the run early after that many total
    steps (the state is saved, no ``backbone.pt``), which is how resume is tested."""
    if not Path(cfg.backbone_checkpoint).is_file():  # not in validate(): tiny-default checks before backbone runs
        raise InputError(f"video.backbone_checkpoint: {cfg.backbone_checkpoint} is not a file")
    with begin_stage(cfg, out_dir) as (out, clock):
        sam = build_model(cfg)
        frozen = frozen_state(sam)
        before = evaluate_tracking(sam, cfg)
        optimizer = torch.optim.AdamW(list(memory_parameters(sam).values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
        source = ClipSource(cfg)
        end, logger = run_steps(
            "video", cfg, out, {"sam": sam}, optimizer, cfg.steps,
            step=lambda i: train_step(cfg, sam, optimizer, source, i),
            evaluate=lambda: {"val_J": evaluate_tracking(sam, cfg)["J"]},
            postfix=lambda row: {"loss": f"{row['loss']:.3f}", "acc": f"{row['presence_acc']:.2f}"},
            stop_after=stop_after,
        )
        logger.plot(out / "curves.png", title="video (memory path) training")
        ckpt = out / "backbone.pt"
        if end < cfg.steps:
            return StageResult(out, ckpt, {"stopped_at": end})
        require_unchanged(sam, frozen)
        write_backbone(ckpt, sam)
        train_time = clock.elapsed()
        step_s = [r["step_s"] for r in logger.rows if "step_s" in r]
        summary = {
            "sam2_config": cfg.sam2_config,
            "image_size": cfg.image_size,
            "input_checkpoint": cfg.backbone_checkpoint,
            "input_sha256": sha256_file(cfg.backbone_checkpoint),
            "checkpoint": ckpt.name,
            "sha256": sha256_file(ckpt),
            "trained": list(MEMORY_MODULES),
            "trained_parameters": sum(p.numel() for p in memory_parameters(sam).values()),
            "steps": cfg.steps,
            "steps_per_s": round(1 / float(np.mean(step_s)), 3) if step_s else None,
            "final": logger.rows[-1] if logger.rows else {},
            "heldout": {"before": before, "after": evaluate_tracking(sam, cfg)},
            "time": {"train": train_time, "total": clock.elapsed()},
        }
        write_summary(out / "video.json", summary)
        return StageResult(out, ckpt, summary)


def run_video(config_path: str | os.PathLike[str], out_dir: str | None = None) -> Path:
    """CLI entry: load the YAML config, train, return the output directory."""
    return train_video(load_config(config_path, VideoConfig), out_dir).out_dir
