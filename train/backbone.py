"""``train backbone``: pretrain a small SAM2 on ConceptWorld so the embedded default truly segments.

Only the offline default needs this (the paper uses SAM 3 / official SAM2 weights). The model is a
registered variant of the sam2 package's own modules (``conceptseg_tiny``: a 6-block Hiera at a
small input size) trained from scratch, SAM-style:

- images: half ConceptWorld episodes (targets and supports, all ten tasks), half *instance scenes*:
  shape scenes drawn with ConceptWorld's renderer that keep every object's mask and look. An
  episode has one target per image, so every prompt on it points at the same mask and the decoder
  learns to ignore where the prompt is (measured: a box anywhere gave the same mask); instance
  scenes make boxes and clicks on different objects ask for different masks;
- prompts from the ground truth: a jittered box, or 1-3 clicks (positives inside the mask, some
  negatives outside) on one instance; one click is ambiguous, so its loss is taken on the best of
  the three multimask outputs, every other prompt trains the single-mask output (token 0), as at
  inference;
- concept prompts: a learned table of K x 256 tokens per ConceptWorld concept (CI class names, CD
  canonical queries) given to the decoder the way the CTM's tokens are. It stands in for SAM 3's
  text prompt, so the decoder learns to find concepts from prompt tokens alone (the shortcut route);
  the table itself is not part of the exported backbone (stage 1 trains the CTM to produce tokens);
- negatives: concepts that are certainly absent from the image (a CI shape on a lesion, a polyp
  query on a shape scene, a CI class none of an instance scene's objects belongs to) with an empty
  target; they train only the object-score head, the presence score the router thresholds (mask
  losses are skipped on them, as SAM2 does).

Curriculum. From scratch, the decoder settles on prompt-independent objectness within ~30 steps
(the mask of every salient object, whatever the box or concept; measured: identical masks for boxes
on different objects, and instance-box IoU stuck at the segment-everything level for 450 steps) and
never leaves it. What gets it out, measured on the same budget (instance-box IoU 0.22 → 0.80 by step
400):

1. ``fill_steps`` of a pretext with the encoder frozen: random boxes on episode images, the target
   the filled box. Only the prompt's position tells the answer, so the decoder learns to read it;
2. ``localize_steps`` on instance scenes with boxes and clicks only;
3. the full mix above for the rest.

The mask decoder's attentions also start with ``k_proj = q_proj`` (``tied_qk_scale``): a prompt's
positional encoding then attends to image tokens with a similar encoding from the first step.

Loss: BCE + Dice on the chosen mask (upsampled to the ground-truth size) + MSE of the IoU head
against the mask's real IoU + BCE of the object score against "target present".

Data: episode ``i < data.train_episodes`` of ``ConceptWorld(data.seed)`` for training (targets and
their supports), episodes from ``VAL_OFFSET`` on for the held-out report, so they never overlap.
Step ``s`` draws from ``default_rng([seed, s])`` only: training is resumable exactly.

Outputs in ``out_dir``: ``backbone.pt`` (official format ``{"model": state_dict}``, what
``build_sam2_model`` and ``export sam2`` load), ``concepts.safetensors`` (the concept table),
``backbone.json`` (held-out IoU per prompt and level vs empty / whole-image baselines, presence
accuracy, timings), ``metrics.csv`` + ``curves.png``, ``config.yaml``, ``state/`` (resume).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptseg_edge.data.meta import task_info
from conceptseg_edge.data.world import CD_CLASSES, CI_CLASSES, ConceptWorld, Look
from conceptseg_edge.episodes import box_from_mask
from conceptseg_edge.data.meta import LEVELS
from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import sha256_file
from conceptseg_edge.metrics import iou
from conceptseg_edge.models.sam2 import SAM2_CONFIGS
from conceptseg_edge.train.config import LoopConfig, check_types, load_config, require_fraction, require_positive
from conceptseg_edge.train.items import VAL_OFFSET
from conceptseg_edge.train.loop import StageResult, begin_stage, eval_mode, lr_at, run_steps, seed_everything, write_summary
from conceptseg_edge.train.sam2_batch import (
    bce_dice,
    box_prompt,
    empty_mask_prompt,
    gather_features,
    mask_iou,
    sam_input,
    upsample,
)
from conceptseg_edge.train.state import ParamBank

#: Concept tokens per prompt, as the CTM's N = 8 queries.
CONCEPT_TOKENS = 8

CI_CONCEPTS: tuple[str, ...] = tuple(c.name for c in CI_CLASSES)
CD_QUERIES: dict[str, str] = {task: task_info(task)[1] for task in CD_CLASSES}
#: ConceptWorld's concept vocabulary: CI class names, then the CD canonical queries.
CONCEPTS: tuple[str, ...] = CI_CONCEPTS + tuple(CD_QUERIES.values())
_SHAPE_FREE = ("camouflage", "anomaly", "polyp", "skin lesion")  # CD scenes with no CI shapes in them


def absent_concepts(task: str) -> tuple[str, ...]:
    """Concepts certainly absent from an image of ``task`` (negatives for the presence head).

    A shape scene may hold any CI look among its distractors, and a salient object is a shape, so
    only cross-family pairs are used: CD queries on shape scenes (saliency excluded), anything but
    the image's own query on a shape-free CD scene.
    """
    own = CD_QUERIES.get(task)
    if task in _SHAPE_FREE:
        return tuple(c for c in CONCEPTS if c not in (own, CD_QUERIES["saliency"]))
    if task == "saliency":
        return tuple(CD_QUERIES[t] for t in _SHAPE_FREE)
    return tuple(CD_QUERIES[t] for t in _SHAPE_FREE)  # CI and CR scenes are shape scenes


@dataclass
class BackboneDataConfig:
    seed: int = field(default=0, metadata={"help": "ConceptWorld seed"})
    image_size: int = field(default=128, metadata={"help": "ConceptWorld image side, px (ground-truth size)"})
    train_episodes: int = field(default=4000, metadata={"help": "training episodes: indices [0, n)"})
    val_episodes: int = field(default=60, metadata={"help": "held-out episodes from VAL_OFFSET"})
    support_views: float = field(default=0.5, metadata={"help": "share of episode images drawn from its supports"})
    instance_scenes: float = field(default=0.5, metadata={"help": "share of images that are instance scenes"})


@dataclass
class BackboneConfig(LoopConfig):
    """``train backbone`` settings. Not from the paper (it starts from released SAM weights):
    values here are this repo's CPU-sized choices for ConceptSeg-Tiny."""

    out_dir: str = "runs/backbone"
    sam2_config: str = field(default="conceptseg_tiny", metadata={"help": "a name in SAM2_CONFIGS"})
    image_size: int = field(default=128, metadata={"help": "SAM2 input side (multiple of 64)"})
    init_checkpoint: str | None = field(default=None, metadata={"help": "start from these SAM2 weights (.pt)"})
    data: BackboneDataConfig = field(default_factory=BackboneDataConfig)
    steps: int = 300
    images_per_step: int = 8
    prompts_per_image: int = 4
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    box_prob: float = field(default=0.35, metadata={"help": "prompt mix: box"})
    point_prob: float = field(default=0.35, metadata={"help": "prompt mix: clicks (the rest: concept prompts)"})
    negative_prob: float = field(default=0.3, metadata={"help": "share of concept prompts naming an absent concept"})
    max_clicks: int = 3
    box_noise: float = field(default=0.08, metadata={"help": "box corner jitter, std as a share of the box side"})
    concept_init_std: float = 1.0
    concept_lr_mult: float = 5.0
    fill_steps: int = field(default=120, metadata={"help": "first steps: random boxes, target = the filled box; encoder frozen"})
    localize_steps: int = field(default=100, metadata={"help": "next steps: instance scenes, boxes and clicks only"})
    tied_qk_scale: float = field(default=4.0, metadata={"help": "from scratch: k_proj = q_proj = this x default init (0: off)"})
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    iou_weight: float = 1.0
    presence_weight: float = 1.0
    eval_images: int = 24

    def validate(self) -> None:
        where = "backbone"
        check_types(self, where)
        if self.sam2_config not in SAM2_CONFIGS:
            raise InputError(f"{where}.sam2_config: {self.sam2_config!r} is not one of {sorted(SAM2_CONFIGS)}")
        if not isinstance(self.image_size, int) or self.image_size % 64 or self.image_size <= 0:
            raise InputError(f"{where}.image_size: a positive multiple of 64, got {self.image_size!r}")
        require_positive(where, steps=self.steps, images_per_step=self.images_per_step,
                         prompts_per_image=self.prompts_per_image, lr=self.lr, max_clicks=self.max_clicks,
                         save_every=self.save_every, eval_every=self.eval_every, eval_images=self.eval_images)
        if self.fill_steps < 0 or self.localize_steps < 0:
            raise InputError(f"{where}: fill_steps and localize_steps must be >= 0")
        require_positive(f"{where}.data", image_size=self.data.image_size,
                         train_episodes=self.data.train_episodes, val_episodes=self.data.val_episodes)
        require_fraction(where, box_prob=self.box_prob, point_prob=self.point_prob, negative_prob=self.negative_prob,
                         support_views=self.data.support_views, instance_scenes=self.data.instance_scenes)
        if self.box_prob + self.point_prob > 1.0:
            raise InputError(f"{where}: box_prob + point_prob must be <= 1, got {self.box_prob + self.point_prob}")


# --------------------------------------------------------------------------- data


@dataclass
class _View:
    """One training image: its instances (geometric prompt targets) and how concepts map to masks."""

    image: np.ndarray
    instances: list[np.ndarray]  # masks a box or clicks may point at, one object (or region) each
    task: str
    concept: str | None = None  # the episode's concept (None: a CR view, or an instance scene)
    concept_mask: np.ndarray | None = None
    looks: list[Look] | None = None  # instance scenes: the look of each instance

    def concept_prompt(self, rng: np.random.Generator, negative_prob: float) -> tuple[str, np.ndarray] | None:
        """A concept and its exact target (empty when the concept is absent), or None if none applies."""
        empty = np.zeros(self.image.shape[:2], bool)
        if self.looks is not None:
            if rng.random() < negative_prob:  # any CI class: present or not, the target is exact
                cls = CI_CLASSES[int(rng.integers(len(CI_CLASSES)))]
            else:  # a class that one of the objects belongs to
                look = self.looks[int(rng.integers(len(self.looks)))]
                matching = [c for c in CI_CLASSES if c.matches(look)]
                cls = matching[int(rng.integers(len(matching)))] if matching else CI_CLASSES[0]
            target = empty.copy()
            for look, mask in zip(self.looks, self.instances):
                if cls.matches(look):
                    target |= mask
            return cls.name, target
        if self.concept is None:
            return None
        if rng.random() < negative_prob:
            pool = absent_concepts(self.task)
            return pool[int(rng.integers(len(pool)))], empty
        return self.concept, self.concept_mask


def _views(world: ConceptWorld, index: int) -> list[_View]:
    ep = world.episode(index)
    concept = ep.query if ep.level != "CR" else None
    views = [_View(ep.image, [ep.mask], ep.task_name, concept, ep.mask)]
    views += [_View(s.image, [s.mask], ep.task_name, concept, s.mask) for s in ep.supports if s.mask is not None]
    return [v for v in views if v.instances[0].any()]


def instance_scene(rng: np.random.Generator, size: int) -> _View:
    """A ConceptWorld shape scene with every object's mask and look kept (the episodes keep only the
    target class's union): boxes and clicks can then point at any object, and a CI concept's target
    is exact, present or absent. Drawn with ConceptWorld's own renderer (its private primitives)."""
    from conceptseg_edge.data import world as W

    canvas = W._plain_background(rng, size)
    cls = CI_CLASSES[int(rng.integers(len(CI_CLASSES)))]
    looks = [cls.sample_look(rng) for _ in range(1 + int(rng.random() < 0.3))]
    looks += [W._random_look(rng) for _ in range(int(rng.integers(2, 5)))]
    discs = W._place(rng, size, len(looks), (0.07, 0.14), [])
    masks = [W._draw(canvas, W._sample_obj(rng, look, cx, cy, r)) for look, (cx, cy, r) in zip(looks, discs)]
    image = W._finish(canvas, W._grain(rng, size, 4.0))
    return _View(image, masks, "shape", looks=looks[: len(masks)])


@dataclass
class _Group:
    """One decoder call's worth of prompts (same number of points)."""

    image_index: list[int] = field(default_factory=list)
    coords: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    concepts: list[int] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    multimask: bool = False

    def __len__(self) -> int:
        return len(self.image_index)


def _jittered_box(mask: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    x0, y0, x1, y1 = box_from_mask(mask)
    x1, y1 = x1 + 1, y1 + 1  # exclusive corners, as box_to_image gives at inference
    w, h = x1 - x0, y1 - y0
    box = np.array([x0, y0, x1, y1], np.float32) + rng.normal(0, noise, 4) * np.array([w, h, w, h])
    size = mask.shape[::-1]
    box[[0, 2]] = np.clip(box[[0, 2]], 0, size[0])
    box[[1, 3]] = np.clip(box[[1, 3]], 0, size[1])
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return np.array([x0, y0, x1, y1], np.float32)
    return box


def _random_box(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A random box (exclusive corners, 12-40% of the side) and its filled mask."""
    h, w = hw
    bw, bh = (rng.uniform(0.12, 0.4, 2) * np.array([w, h])).astype(int)
    x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    mask = np.zeros((h, w), bool)
    mask[y0 : y0 + bh, x0 : x0 + bw] = True
    return np.array([x0, y0, x0 + bw, y0 + bh], np.float32), mask


def _click(mask: np.ndarray, rng: np.random.Generator, inside: bool) -> np.ndarray:
    ys, xs = np.nonzero(mask if inside else ~mask)
    k = int(rng.integers(len(xs)))
    return np.array([xs[k], ys[k]], np.float32)


def sample_batch(cfg: BackboneConfig, world: ConceptWorld, step: int) -> tuple[np.ndarray, list[_Group]]:
    """Images (N, H, W, 3) and prompt groups of step ``step``; a pure function of (config, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    n_clicks = int(rng.integers(1, cfg.max_clicks + 1))
    scale = cfg.image_size / cfg.data.image_size
    box_g, click_g, concept_g = _Group(), _Group(multimask=n_clicks == 1), _Group()
    images = []
    fill = step < cfg.fill_steps
    localize = step < cfg.fill_steps + cfg.localize_steps
    for j in range(cfg.images_per_step):
        if fill:  # pretext: where the box is is the whole answer (targets are the filled boxes)
            view = _views(world, int(rng.integers(cfg.data.train_episodes)))[0]
            images.append(view.image)
            for _ in range(cfg.prompts_per_image):
                box, target = _random_box(rng, view.image.shape[:2])
                coords, labels = box_prompt(box[None], target.shape, cfg.image_size)
                box_g.image_index.append(j)
                box_g.coords.append(coords[0].numpy())
                box_g.labels.append(labels[0].numpy())
                box_g.targets.append(target)
            continue
        if localize or rng.random() < cfg.data.instance_scenes:
            view = instance_scene(rng, cfg.data.image_size)
        else:
            views = _views(world, int(rng.integers(cfg.data.train_episodes)))
            use_support = len(views) > 1 and rng.random() < cfg.data.support_views
            view = views[int(rng.integers(1, len(views)))] if use_support else views[0]
        images.append(view.image)
        for _ in range(cfg.prompts_per_image):
            u = rng.random()
            kind = "box" if u < cfg.box_prob else "click" if u < cfg.box_prob + cfg.point_prob else "concept"
            if localize:  # geometric prompts only: where the prompt points is all that tells targets apart
                kind = "box" if u < 0.5 else "click"
            concept = view.concept_prompt(rng, cfg.negative_prob) if kind == "concept" else None
            if kind == "concept" and concept is None:
                kind = "box" if rng.random() < 0.5 else "click"
            if kind == "concept":
                name, target = concept
                concept_g.image_index.append(j)
                concept_g.concepts.append(CONCEPTS.index(name))
                concept_g.targets.append(target)
                continue
            mask = view.instances[int(rng.integers(len(view.instances)))]
            if kind == "box":
                box = _jittered_box(mask, rng, cfg.box_noise)
                coords, labels = box_prompt(box[None], mask.shape, cfg.image_size)
                box_g.image_index.append(j)
                box_g.coords.append(coords[0].numpy())
                box_g.labels.append(labels[0].numpy())
                box_g.targets.append(mask)
            else:
                pts, labs = [_click(mask, rng, True)], [1]
                for _ in range(n_clicks - 1):
                    positive = rng.random() < 0.7 or mask.all()
                    pts.append(_click(mask, rng, positive))
                    labs.append(1 if positive else 0)
                pts.append(np.zeros(2, np.float32))  # SAM2's padding point
                labs.append(-1)
                coords = np.stack(pts) * np.float32(scale)
                coords[-1] = 0.0
                click_g.image_index.append(j)
                click_g.coords.append(coords)
                click_g.labels.append(np.array(labs, np.int32))
                click_g.targets.append(mask)
    return np.stack(images), [g for g in (box_g, click_g, concept_g) if len(g)]


# --------------------------------------------------------------------------- model step


class BackboneModel(torch.nn.Module):
    """The SAM2 halves under training plus the concept table."""

    def __init__(self, sam: torch.nn.Module, concepts: ParamBank) -> None:
        super().__init__()
        from conceptseg_edge.models.sam2 import SAM2ImageEncoder, SAM2PromptDecoder

        self.sam = sam
        self.concepts = concepts
        self.encoder = SAM2ImageEncoder(sam)
        self.decoder = SAM2PromptDecoder(sam)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights, then recompute the decoder's dense positional encoding: a non-persistent
        buffer ``SAM2PromptDecoder`` derives from the prompt encoder's (persistent) Gaussian matrix
        when it is built, which would otherwise keep the pre-load value."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        with torch.no_grad():
            self.decoder.image_pe.copy_(self.sam.sam_prompt_encoder.get_dense_pe())
        return result

    def decode(self, feats, group: _Group, image_size: int):
        index = torch.tensor(group.image_index)
        f = gather_features(feats, index)
        b = len(group)
        if group.concepts:
            coords, labels = torch.zeros(b, 0, 2), torch.zeros(b, 0, dtype=torch.int32)
            tokens = self.concepts.table[torch.tensor(group.concepts)]
        else:
            coords = torch.from_numpy(np.stack(group.coords))
            labels = torch.from_numpy(np.stack(group.labels))
            tokens = torch.zeros(b, 0, 256)
        mask_in, has_mask = empty_mask_prompt(b, image_size)
        return self.decoder(*f, coords, labels, tokens, mask_in, has_mask)


def group_losses(cfg: BackboneConfig, group: _Group, masks, iou_pred, obj_logits) -> dict[str, torch.Tensor]:
    """Per-sample losses of one decoder call (sums, to be divided by the step's counts)."""
    target = torch.from_numpy(np.stack(group.targets)).float()
    present = target.flatten(1).amax(1) > 0
    up = upsample(masks, tuple(target.shape[-2:]))
    if group.multimask:
        cand = up[:, 1:]
        k = cand.shape[1]
        bce, dice = bce_dice(cand.flatten(0, 1), target.repeat_interleave(k, 0))
        per = (cfg.bce_weight * bce + cfg.dice_weight * dice).view(-1, k)
        best = per.argmin(1, keepdim=True)
        mask_loss = per.gather(1, best)[:, 0]
        with torch.no_grad():
            real = mask_iou(cand.flatten(0, 1) > 0, target.bool().repeat_interleave(k, 0)).view(-1, k)
        iou_loss = ((iou_pred[:, 1:] - real) ** 2).mean(1)
        chosen = real.gather(1, best)[:, 0]
    else:
        bce, dice = bce_dice(up[:, 0], target)
        mask_loss = cfg.bce_weight * bce + cfg.dice_weight * dice
        with torch.no_grad():
            chosen = mask_iou(up[:, 0] > 0, target.bool())
        iou_loss = (iou_pred[:, 0] - chosen) ** 2
    obj = torch.nn.functional.binary_cross_entropy_with_logits(obj_logits[:, 0], present.float(), reduction="none")
    pf = present.float()
    return {
        "mask": (mask_loss * pf).sum(),
        "iou_head": (iou_loss * pf).sum(),
        "presence": obj.sum(),
        "train_iou": (chosen * pf).sum(),
        "n_present": pf.sum(),
        "n": torch.tensor(float(len(group))),
    }


def step_loss(cfg: BackboneConfig, model: BackboneModel, images: np.ndarray, groups: list[_Group],
              freeze_encoder: bool = False):
    """Total loss and logged values of one training step (encoder under no_grad if ``freeze_encoder``)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_encoder):
        feats = model.encoder(sam_input(images, cfg.image_size))
    sums: dict[str, torch.Tensor] = {}
    for group in groups:
        for k, v in group_losses(cfg, group, *model.decode(feats, group, cfg.image_size)).items():
            sums[k] = sums.get(k, 0) + v
    n_present = sums["n_present"].clamp(min=1)
    mask = sums["mask"] / n_present
    iou_head = sums["iou_head"] / n_present
    presence = sums["presence"] / sums["n"]
    loss = mask + cfg.iou_weight * iou_head + cfg.presence_weight * presence
    logs = {"loss": loss.item(), "mask_loss": mask.item(), "iou_head_loss": iou_head.item(),
            "presence_loss": presence.item(), "train_iou": (sums["train_iou"] / n_present).item()}
    return loss, logs


def build_model(cfg: BackboneConfig) -> BackboneModel:
    from conceptseg_edge.models.sam2 import build_sam2_model

    seed_everything(cfg.seed)
    sam = build_sam2_model(cfg.sam2_config, cfg.init_checkpoint, cfg.image_size).model.train()
    if cfg.tied_qk_scale > 0 and cfg.init_checkpoint is None:
        tie_decoder_attention(sam, cfg.tied_qk_scale)
    table = torch.randn(len(CONCEPTS), CONCEPT_TOKENS, 256) * cfg.concept_init_std
    return BackboneModel(sam, ParamBank(table=table))


def tie_decoder_attention(sam: torch.nn.Module, scale: float) -> None:
    """Start every attention of the mask decoder with ``k_proj = q_proj`` (scaled) and zero biases.

    Prompts reach the mask through attention between positional encodings: a point's Fourier
    features against the image tokens'. With q and k projected alike, ``q . k`` starts as a
    similarity of the two encodings (near the prompt = similar), instead of a random bilinear form;
    ``scale`` sharpens that similarity (the default init gives near-uniform attention). Measured on a
    box-to-filled-box toy from scratch (blank image, frozen encoder, 32 boxes a step): IoU 0 until
    step ~200 untied, learning from ~120 tied, from ~80 tied x 4 (x 10 saturates: nothing by 120).
    """
    with torch.no_grad():
        for module in sam.sam_mask_decoder.transformer.modules():
            q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
            if q is not None and k is not None and q.weight.shape == k.weight.shape:
                q.weight.mul_(scale)
                k.weight.copy_(q.weight)
                q.bias.zero_()
                k.bias.zero_()


def make_optimizer(cfg: BackboneConfig, model: BackboneModel) -> torch.optim.Optimizer:
    """AdamW; the concept table (each row seen by a few prompts a step) at ``concept_lr_mult`` x lr."""
    table = [model.concepts.table]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("concepts.")]
    return torch.optim.AdamW(
        [{"params": rest, "lr_mult": 1.0}, {"params": table, "lr_mult": cfg.concept_lr_mult, "weight_decay": 0.0}],
        lr=cfg.lr, weight_decay=cfg.weight_decay,
    )


def train_step(cfg: BackboneConfig, model, optimizer, world, step: int) -> dict[str, float]:
    """One optimisation step (``step`` counts from 0); returns the logged values."""
    lr = lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    images, groups = sample_batch(cfg, world, step)
    loss, logs = step_loss(cfg, model, images, groups, freeze_encoder=step < cfg.fill_steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    logs.update(lr=optimizer.param_groups[0]["lr"], grad_norm=float(grad_norm))
    return logs


# --------------------------------------------------------------------------- evaluation


def _center_click(mask: np.ndarray) -> np.ndarray:
    """The mask pixel nearest its centroid: a deterministic, usually interior click."""
    ys, xs = np.nonzero(mask)
    k = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return np.array([[xs[k], ys[k]]], np.float32)


def quick_val_iou(cfg: BackboneConfig, model: BackboneModel, world: ConceptWorld) -> float:
    """Mean box-prompt IoU on the first ``eval_images`` held-out targets (the training curve's check)."""

    eps = [world.episode(VAL_OFFSET + i, with_supports=False) for i in range(cfg.eval_images)]
    with eval_mode(model):
        feats = model.encoder(sam_input([e.image for e in eps], cfg.image_size))
        group = _Group(targets=[e.mask for e in eps])
        for j, e in enumerate(eps):
            coords, labels = box_prompt(_jittered_box(e.mask, np.random.default_rng(0), 0.0)[None], e.mask.shape, cfg.image_size)
            group.image_index.append(j)
            group.coords.append(coords[0].numpy())
            group.labels.append(labels[0].numpy())
        masks, _, _ = model.decode(feats, group, cfg.image_size)
        target = torch.from_numpy(np.stack(group.targets))
        return float(mask_iou(upsample(masks, tuple(target.shape[-2:]))[:, 0] > 0, target).mean())


def evaluate_backbone(
    checkpoint: str | os.PathLike[str], sam2_config: str, image_size: int, concept_table: torch.Tensor | None,
    world: ConceptWorld, n: int,
) -> dict[str, Any]:
    """Held-out report through the eager inference path (``SAM2Reference`` on the saved ``.pt``).

    Per level (CI/CD/CR) and overall: foreground IoU of a tight box, of one centre click (best of the
    multimask outputs, SAM's convention) and, for CI/CD, of the concept prompt; the empty-mask and
    whole-image baselines; and presence (sigmoid object score) on present vs absent concepts.
    """
    from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model

    ref = SAM2Reference(build_sam2_model(sam2_config, checkpoint, image_size).model)
    rows: dict[str, dict[str, list[float]]] = {}
    presence_pos, presence_neg = [], []
    for i in range(n):
        ep = world.episode(VAL_OFFSET + i, with_supports=False)
        if not ep.mask.any():
            continue
        r = rows.setdefault(ep.level, {})
        ref.set_image(ep.image)
        x0, y0, x1, y1 = box_from_mask(ep.mask)
        pred = ref.predict(box=np.array([x0, y0, x1 + 1, y1 + 1], np.float32), multimask_output=False)
        r.setdefault("box", []).append(iou(pred.masks[int(np.argmax(pred.scores))], ep.mask))
        pred = ref.predict(point_coords=_center_click(ep.mask), point_labels=np.array([1]), multimask_output=True)
        r.setdefault("click", []).append(iou(pred.masks[int(np.argmax(pred.scores))], ep.mask))
        r.setdefault("empty", []).append(iou(np.zeros_like(ep.mask), ep.mask))
        r.setdefault("whole", []).append(iou(np.ones_like(ep.mask), ep.mask))
        if concept_table is not None and ep.level != "CR":
            tokens = concept_table[CONCEPTS.index(ep.query)].numpy()
            pred = ref.predict(concept_tokens=tokens, multimask_output=False)
            r.setdefault("concept", []).append(iou(pred.masks[0], ep.mask))
            presence_pos.append(1 / (1 + np.exp(-pred.object_score_logit)))
            pool = absent_concepts(ep.task_name)
            neg = concept_table[CONCEPTS.index(pool[i % len(pool)])].numpy()
            presence_neg.append(1 / (1 + np.exp(-ref.predict(concept_tokens=neg, multimask_output=False).object_score_logit)))
    report: dict[str, Any] = {"images": sum(len(r["box"]) for r in rows.values()), "fg_iou": {}}
    report["instances"] = _instance_report(ref, concept_table, n, world.size)
    keys = ("box", "click", "concept", "empty", "whole")
    for level in LEVELS:
        if level in rows:
            report["fg_iou"][level] = {k: round(float(np.mean(v)), 4) for k, v in rows[level].items() if k in keys}
            report["fg_iou"][level]["n"] = len(rows[level]["box"])
    report["fg_iou"]["all"] = {
        k: round(float(np.mean([x for r in rows.values() for x in r.get(k, [])])), 4)
        for k in keys if any(k in r for r in rows.values())
    }
    if presence_pos:
        pos, neg = np.array(presence_pos), np.array(presence_neg)
        report["presence"] = {
            "mean_present": round(float(pos.mean()), 4),
            "mean_absent": round(float(neg.mean()), 4),
            "accuracy_at_0.5": round(float(((pos >= 0.5).sum() + (neg < 0.5).sum()) / (len(pos) + len(neg))), 4),
        }
    return report


def _instance_report(ref, concept_table: torch.Tensor | None, n: int, size: int) -> dict[str, Any]:
    """Held-out instance scenes: box / centre-click IoU per object (the prompt route must follow the
    prompt to the right object), and concept presence on CI classes known present or absent."""
    box, click, pres, absent = [], [], [], []
    for k in range(n):
        view = instance_scene(np.random.default_rng([VAL_OFFSET, k]), size)
        ref.set_image(view.image)
        for mask in view.instances:
            x0, y0, x1, y1 = box_from_mask(mask)
            pred = ref.predict(box=np.array([x0, y0, x1 + 1, y1 + 1], np.float32), multimask_output=False)
            box.append(iou(pred.masks[0], mask))
            pred = ref.predict(point_coords=_center_click(mask), point_labels=np.array([1]), multimask_output=True)
            click.append(iou(pred.masks[int(np.argmax(pred.scores))], mask))
        if concept_table is not None:
            for cls in CI_CLASSES:
                p = ref.predict(concept_tokens=concept_table[CONCEPTS.index(cls.name)].numpy(), multimask_output=False)
                score = 1 / (1 + np.exp(-p.object_score_logit))
                (pres if any(cls.matches(lk) for lk in view.looks) else absent).append(score)
    out: dict[str, Any] = {"scenes": n, "objects": len(box), "box_iou": round(float(np.mean(box)), 4),
                           "click_iou": round(float(np.mean(click)), 4)}
    if pres and absent:
        out["presence_present"] = round(float(np.mean(pres)), 4)
        out["presence_absent"] = round(float(np.mean(absent)), 4)
        out["presence_accuracy_at_0.5"] = round(
            float((np.sum(np.array(pres) >= 0.5) + np.sum(np.array(absent) < 0.5)) / (len(pres) + len(absent))), 4)
    return out


# --------------------------------------------------------------------------- the stage


def train_backbone(
    cfg: BackboneConfig, out_dir: str | os.PathLike[str] | None = None, *, stop_after: int | None = None,
) -> StageResult:
    """Train (or resume) the backbone; ``stop_after`` ends the run early after that many total steps
    (an interruption: the state is saved, no final export), which is how resume is tested."""
    with begin_stage(cfg, out_dir) as (out, clock):
        world = ConceptWorld(cfg.data.seed, cfg.data.image_size)
        model = build_model(cfg)
        optimizer = make_optimizer(cfg, model)
        modules = {"backbone": model}
        end, logger = run_steps(
            "backbone", cfg, out, modules, optimizer, cfg.steps,
            step=lambda i: train_step(cfg, model, optimizer, world, i),
            evaluate=lambda: {"val_box_iou": quick_val_iou(cfg, model, world)},
            postfix=lambda row: {"loss": f"{row['loss']:.3f}", "iou": f"{row['train_iou']:.2f}"},
            stop_after=stop_after,
        )
        logger.plot(out / "curves.png", title="backbone pretraining")
        if end < cfg.steps:
            return StageResult(out, out / "backbone.pt", {"stopped_at": end})
        ckpt = out / "backbone.pt"
        write_backbone(ckpt, model.sam)
        from safetensors.torch import save_file

        save_file({"table": model.concepts.table.detach().contiguous()}, out / "concepts.safetensors",
                  metadata={"concepts": "\n".join(CONCEPTS)})
        train_time = clock.elapsed()
        report = evaluate_backbone(ckpt, cfg.sam2_config, cfg.image_size, model.concepts.table.detach(),
                                   world, cfg.data.val_episodes)
        summary = {
            "sam2_config": cfg.sam2_config,
            "image_size": cfg.image_size,
            "checkpoint": ckpt.name,
            "sha256": sha256_file(ckpt),
            "steps": cfg.steps,
            "final": logger.rows[-1] if logger.rows else {},
            "heldout": report,
            "time": {"train": train_time, "total": clock.elapsed()},
        }
        write_summary(out / "backbone.json", summary)
        return StageResult(out, ckpt, summary)


def write_backbone(path: Path, sam: torch.nn.Module) -> None:
    """Save SAM2 weights in the official ``{"model": state_dict}`` format, atomically.

    ``build_sam2_model`` (export, reference pipeline) reads only that format, with
    ``torch.load(weights_only=True)``; the file holds tensors only.
    """
    from conceptseg_edge.fileio import atomic_path

    state = {k: v.detach().clone().contiguous() for k, v in sam.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"model": state}, tmp)


def run_backbone(config_path: str | os.PathLike[str], out_dir: str | None = None) -> Path:
    """CLI entry: load the YAML config, train, return the output directory."""
    cfg = load_config(config_path, BackboneConfig)
    return train_backbone(cfg, out_dir).out_dir
