"""``train stage1``: the CTM learns to prompt the frozen SAM2 from the frozen policy's hidden states.

What a step does (the paper's stage 1, plus the shortcut this repo serves with the CTM):

- reason samples: the episode as the policy sees it (``build_meta_episode``: target, support mosaic,
  prompt) and a teacher-forced completion from the tag template whose ``<bbox>`` (and ``<check>``, when
  a support box is hidden) holds the ground truth; ``teacher_forced_hidden_states`` gives the rows
  generation would produce (the final ``<|im_end|>`` included); CTM → 8 tokens → SAM2's decoder
  with the ground-truth box as box prompt, exactly as the pipeline passes the parsed ``<bbox>``;
- shortcut samples (``shortcut_fraction``, concepts of at most ``max_shortcut_words`` words): the
  text-only prefill of the concept phrase (``prompt_hidden_states``), CTM → tokens alone. SAM 3 reads
  text itself, SAM2 cannot, so this is not in the paper; it is how the shortcut route runs here.
  With ``negative_fraction`` some name a concept absent from the image (target empty);
- ``drop_box_fraction`` of reason samples go without the box prompt (tokens alone), as the pipeline
  runs when the policy writes no parsable box.

Loss: sigmoid BCE + Dice, 1:1, on the decoder's single-mask output (token 0, what the concept routes
use at inference) upsampled bilinearly to the ground-truth size; plus ``presence_weight`` x BCE of the
object score against "target present" (0 in the paper; the router reads that score). Negatives, like
SAM2's absent objects, skip the mask loss.

``init_checkpoint`` continues a checkpoint's CTM instead of starting one: ours, or a ConceptSeg-R1
release, whose CTM prompts SAM 3 and is retrained here for the configured SAM2 (the retarget path,
``train stage1 --init-from DIR --backbone NAME``). Its CTM keeps its trained shape over ``cfg.ctm``;
``ctm_overrides`` names what was ignored, and the summary records it.

The policy is normally ``train warmstart``'s (``policy_checkpoint``): a tiny Qwen2.5-VL taught the
tag format, standing in for an instruction-tuned one; the template here is the one it learnt
(``train.items.template_completion``).

Both models are frozen, so the SAM2 image features and the policy's hidden states are computed once
per training item and cached (``cache: true``); a step then runs only the CTM and the mask decoder.
The policy and processor are written to ``out_dir/init_policy`` on the first run, so a resumed run
uses the very same weights. Step ``s`` reads ``default_rng([seed, s])`` only: resume is exact.

Outputs in ``out_dir``: ``checkpoint/`` (policy + trained CTM + processor + default router + the
backbone it was trained against), ``stage1.json`` (held-out IoU per level and route vs baselines,
loss start/end, timings), ``metrics.csv`` + ``curves.png``, ``config.yaml``, ``state/``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptseg_edge.data.meta import LEVELS
from conceptseg_edge.errors import InputError
from conceptseg_edge.router import RouterConfig, count_words
from conceptseg_edge.train.config import LoopConfig, check_types, load_config, require_fraction, require_positive
from conceptseg_edge.train.distributed import Processes, processes
from conceptseg_edge.train.items import EpisodeData, Item, epoch_picks, load_items, template_completion
from conceptseg_edge.train.loop import StageResult, begin_stage, eval_mode, lr_at, run_steps, seed_everything, set_lr, write_summary
from conceptseg_edge.train.sam2_batch import bce_dice, box_prompt, empty_mask_prompt, mask_iou, sam_input, upsample
from conceptseg_edge.train.warmstart import TinyPolicyConfig, build_tiny_policy


@dataclass
class CTMSettings:
    """CTM shape; hidden_size comes from the policy. Paper: 8 queries, 4 blocks, 16 heads, MLP x4."""

    num_queries: int = 8
    depth: int = 4
    num_heads: int = 16
    mlp_ratio: int = 4


@dataclass
class Stage1Config(LoopConfig):
    """``train stage1`` settings; defaults are the paper's where it has one (see comments)."""

    out_dir: str = "runs/stage1"
    # the frozen SAM2 (paper: SAM 3; the checkpoint records which backbone the CTM was trained for)
    backbone_config: str = "sam2.1_hiera_t"
    backbone_checkpoint: str | None = None
    backbone_image_size: int = 1024
    # the frozen policy, one of: a ConceptSeg checkpoint or ConceptSeg-R1 release to continue (policy +
    # CTM; a release's CTM was trained for SAM 3: the retarget path, train/configs/retarget.yaml), a checkpoint whose
    # policy + processor start a fresh CTM (``train warmstart``'s output), a released Qwen2.5-VL
    # directory (paper: Qwen2.5-VL-3B-Instruct); with none, a random-init tiny policy (tests)
    init_checkpoint: str | None = None
    policy_checkpoint: str | None = field(
        default=None, metadata={"help": "models.checkpoint directory: its policy + processor, a new CTM"})
    policy_path: str | None = None
    tiny_policy: TinyPolicyConfig = field(default_factory=TinyPolicyConfig)
    max_pixels: int = field(default=600 * 600, metadata={
        "help": "policy image cap (paper: 360000); checkpoints keep their processor's own"})
    ctm: CTMSettings = field(default_factory=CTMSettings)
    data: EpisodeData = field(default_factory=EpisodeData)
    lr: float = 3e-5  # paper
    batch_size: int = 16  # paper: 16 per GPU ... (here the micro-batch of all processes together)
    grad_accum: int = 2  # ... x 2 ("16x2"; read as gradient accumulation)
    epochs: int = 20  # paper
    steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs when set"})
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    bce_weight: float = 1.0  # paper: BCE + Dice, 1:1
    dice_weight: float = 1.0
    presence_weight: float = 0.0  # not in the paper
    shortcut_fraction: float = 0.25  # not in the paper (SAM 3 reads text); 0 trains the reason route only
    negative_fraction: float = 0.0  # share of shortcut samples naming an absent concept (world only)
    drop_box_fraction: float = 0.0  # paper: the box is always given
    max_shortcut_words: int = 4  # paper: longer concepts never take the shortcut
    cache: bool = True

    def validate(self) -> None:
        where = "stage1"
        check_types(self, where)
        require_positive(where, lr=self.lr, batch_size=self.batch_size, grad_accum=self.grad_accum,
                         epochs=self.epochs, eval_every=self.eval_every, save_every=self.save_every,
                         backbone_image_size=self.backbone_image_size, max_pixels=self.max_pixels)
        if self.steps is not None:
            require_positive(where, steps=self.steps)
        require_fraction(where, shortcut_fraction=self.shortcut_fraction, negative_fraction=self.negative_fraction,
                         drop_box_fraction=self.drop_box_fraction)
        self.data.validate(f"{where}.data")
        if self.data.source == "meta" and self.negative_fraction:
            raise InputError(f"{where}.negative_fraction: needs data.source 'world' (absence must be certain)")
        sources = [n for n in ("init_checkpoint", "policy_checkpoint", "policy_path") if getattr(self, n)]
        if len(sources) > 1:
            raise InputError(f"{where}: give one of init_checkpoint, policy_checkpoint, policy_path; got {sources}")

    def total_steps(self, n_items: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(n_items / (self.batch_size * self.grad_accum))


# --------------------------------------------------------------------------- models


@dataclass
class Frozen:
    """The frozen halves: policy wrapper and SAM2 encoder/decoder."""

    policy: Any  # PolicyWrapper
    encoder: torch.nn.Module
    decoder: torch.nn.Module
    image_size: int
    backbone: Any  # BackboneSpec


def build_initial_policy(cfg: Stage1Config):
    """(policy model, processor, CTM or None) as the config names them; nothing trained yet.

    An ``init_checkpoint`` (ours, or a ConceptSeg-R1 release: the retarget path) brings its own CTM,
    whose shape wins over ``cfg.ctm`` (``ctm_overrides`` says where they differ); ``cfg.ctm.num_heads``
    is used only where the checkpoint does not record the head count (a release: shapes do not show it).
    """
    if cfg.init_checkpoint or cfg.policy_checkpoint:
        from conceptseg_edge.models.checkpoint import load_checkpoint

        ckpt = load_checkpoint(cfg.init_checkpoint or cfg.policy_checkpoint, ctm_num_heads=cfg.ctm.num_heads)
        return ckpt.policy, ckpt.processor, ckpt.ctm if cfg.init_checkpoint else None
    if cfg.policy_path:
        from transformers import AutoModelForImageTextToText

        from conceptseg_edge.errors import CheckpointError
        from conceptseg_edge.models.policy import load_processor

        try:
            model = AutoModelForImageTextToText.from_pretrained(cfg.policy_path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{cfg.policy_path}: cannot load the policy: {exc}") from exc
        return model.eval(), load_processor(cfg.policy_path, max_pixels=cfg.max_pixels), None
    policy, processor = build_tiny_policy(cfg.tiny_policy, cfg.max_pixels, "stage1.tiny_policy")
    return policy, processor, None


def ctm_overrides(cfg: Stage1Config, ctm) -> dict[str, dict[str, int]]:
    """``cfg.ctm`` settings the CTM in use does not follow ({name: {"config": asked, "used": kept}}):
    a CTM from ``init_checkpoint`` keeps its trained shape."""
    used = ctm.config
    return {name: {"config": asked, "used": getattr(used, name)}
            for name, asked in dataclasses.asdict(cfg.ctm).items() if getattr(used, name) != asked}


def new_ctm(cfg: Stage1Config, hidden_size: int):
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig

    c = cfg.ctm
    return ConceptTranslationModule(CTMConfig(hidden_size=hidden_size, num_queries=c.num_queries, depth=c.depth,
                                              num_heads=c.num_heads, mlp_ratio=c.mlp_ratio))


def load_frozen(cfg: Stage1Config, out: Path, procs: Processes = Processes()):
    """Frozen policy + SAM2, and the CTM to train (restored from ``init_policy`` on a resumed run;
    under several processes the main one writes it and the others load it)."""
    from conceptseg_edge.fileio import sha256_file
    from conceptseg_edge.models.checkpoint import BackboneSpec, load_checkpoint, save_checkpoint
    from conceptseg_edge.models.policy import PolicyWrapper
    from conceptseg_edge.models.sam2 import SAM2ImageEncoder, SAM2PromptDecoder, build_sam2_model

    seed_everything(cfg.seed)
    ckpt_path = cfg.backbone_checkpoint
    backbone = BackboneSpec(
        cfg.backbone_config,
        str(Path(ckpt_path).resolve()) if ckpt_path else None,
        sha256_file(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else None,
        cfg.backbone_image_size,
    )
    sam = build_sam2_model(cfg.backbone_config, ckpt_path, cfg.backbone_image_size).model.eval()
    for p in sam.parameters():
        p.requires_grad_(False)
    init_dir = out / "init_policy"
    with procs.main_first():
        if init_dir.is_dir():
            ckpt = load_checkpoint(init_dir)
            policy, processor, ctm = ckpt.policy, ckpt.processor, ckpt.ctm
        else:
            policy, processor, ctm = build_initial_policy(cfg)
            torch.manual_seed(cfg.seed)
            ctm = ctm if ctm is not None else new_ctm(cfg, policy.config.text_config.hidden_size)
            if ctm.config.out_dim != sam.sam_prompt_embed_dim:
                raise InputError(f"stage1: the CTM of {cfg.init_checkpoint} writes {ctm.config.out_dim}-wide prompt "
                                 f"tokens, {cfg.backbone_config} takes {sam.sam_prompt_embed_dim}-wide ones")
            save_checkpoint(init_dir, policy, ctm, processor, RouterConfig(), backbone)
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    frozen = Frozen(PolicyWrapper(policy, processor), SAM2ImageEncoder(sam).eval(), SAM2PromptDecoder(sam).eval(),
                    cfg.backbone_image_size, backbone)
    return frozen, ctm.float().train()


# --------------------------------------------------------------------------- caches


@dataclass
class Cached:
    feats: tuple[torch.Tensor, ...]  # (1, ...) x 3
    reason: torch.Tensor  # (T, d)


class FeatureCache:
    """Frozen-model outputs per item (SAM2 features, teacher-forced states) and per phrase (prefill)."""

    def __init__(self, frozen: Frozen, items: list[Item], enabled: bool, progress: bool, desc: str) -> None:
        from tqdm import tqdm

        self.frozen = frozen
        self.items = items
        self.enabled = enabled
        self._items: dict[int, Cached] = {}
        self._phrases: dict[str, torch.Tensor] = {}
        if enabled:
            for i in tqdm(range(len(items)), desc=desc, unit="item", disable=not progress):
                self._items[i] = self._compute(i)

    @torch.no_grad()
    def _compute(self, i: int) -> Cached:
        item, f = self.items[i], self.frozen
        feats = f.encoder(sam_input([item.image], f.image_size))
        inputs = f.policy.build_inputs(item.meta.images(), item.meta.prompt)
        tok = f.policy.processor.tokenizer
        ids = tok(template_completion(item.meta), add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        states = f.policy.teacher_forced_hidden_states(inputs, ids).float()
        return Cached(tuple(x.clone() for x in feats), states.clone())

    def get(self, i: int) -> Cached:
        if i in self._items:
            return self._items[i]
        return self._compute(i)

    @torch.no_grad()
    def phrase(self, query: str) -> torch.Tensor:
        """(P, d) prefill states of the text-only prompt, as ``concept_tokens_from_text`` computes them."""
        if query not in self._phrases:
            p = self.frozen.policy
            self._phrases[query] = p.prompt_hidden_states(p.build_inputs([], query)).float().clone()
        return self._phrases[query]


# --------------------------------------------------------------------------- a step


@dataclass
class Sample:
    index: int
    route: str  # "reason" | "shortcut"
    with_box: bool
    query: str
    target: np.ndarray  # (H, W) bool; empty for a negative


def plan_batch(cfg: Stage1Config, items: list[Item], step: int, micro: int) -> list[Sample]:
    """The samples of micro-batch ``micro`` of step ``step``: a pure function of (config, step)."""
    from conceptseg_edge.train.backbone import CONCEPTS, absent_concepts

    picks = epoch_picks(cfg.seed, len(items), step, cfg.batch_size * cfg.grad_accum, micro * cfg.batch_size,
                        cfg.batch_size)
    rng = np.random.default_rng([cfg.seed, step, micro, 1])
    samples = []
    for i in picks:
        item = items[i]
        u, v, w = rng.random(3)
        short = item.shortcut_ok and count_words(item.query) <= cfg.max_shortcut_words and u < cfg.shortcut_fraction
        if short:
            if v < cfg.negative_fraction:
                pool = [c for c in absent_concepts(item.task) if c in CONCEPTS]
                query = pool[int(rng.integers(len(pool)))]
                samples.append(Sample(i, "shortcut", False, query, np.zeros_like(item.mask)))
            else:
                samples.append(Sample(i, "shortcut", False, item.query, item.mask))
        else:
            with_box = w >= cfg.drop_box_fraction and item.box_px is not None
            samples.append(Sample(i, "reason", with_box, item.query, item.mask))
    return samples


def forward_samples(cfg: Stage1Config, frozen: Frozen, cache: FeatureCache, ctm, samples: list[Sample]):
    """Decoder outputs per sample, in order: list of (low-res masks (4, s, s), iou (4,), obj logit ())."""
    tokens = []
    for s in samples:
        states = cache.get(s.index).reason if s.route == "reason" else cache.phrase(s.query)
        tokens.append(ctm(states[None])[0])
    outputs: list[Any] = [None] * len(samples)
    for with_box in (True, False):
        idx = [j for j, s in enumerate(samples) if s.with_box == with_box]
        if not idx:
            continue
        feats = tuple(torch.cat([cache.get(samples[j].index).feats[k] for j in idx]) for k in range(3))
        if with_box:
            boxes = np.array([cache.items[samples[j].index].box_px for j in idx], np.float32)
            coords, labels = _boxes(boxes, [cache.items[samples[j].index].image.shape[:2] for j in idx], frozen.image_size)
        else:
            coords, labels = torch.zeros(len(idx), 0, 2), torch.zeros(len(idx), 0, dtype=torch.int32)
        mask_in, has_mask = empty_mask_prompt(len(idx), frozen.image_size)
        masks, iou, obj = frozen.decoder(*feats, coords, labels, torch.stack([tokens[j] for j in idx]), mask_in, has_mask)
        for r, j in enumerate(idx):
            outputs[j] = (masks[r], iou[r], obj[r, 0])
    return outputs


def _boxes(boxes: np.ndarray, hws: list[tuple[int, int]], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords, labels = zip(*(box_prompt(b[None], hw, image_size) for b, hw in zip(boxes, hws)))
    return torch.cat(coords), torch.cat(labels)


def sample_losses(cfg: Stage1Config, samples: list[Sample], outputs) -> dict[str, torch.Tensor]:
    """Per-sample loss terms: BCE, Dice (present targets only), presence BCE, IoU of the mask."""
    bce_l, dice_l, pres_l, ious, present = [], [], [], [], []
    for s, (masks, _, obj) in zip(samples, outputs):
        target = torch.from_numpy(s.target).float()
        logit = upsample(masks[None, :1], tuple(target.shape))[0, 0]
        bce, dice = bce_dice(logit[None], target[None])
        has = bool(s.target.any())
        bce_l.append(bce[0])
        dice_l.append(dice[0])
        present.append(float(has))
        pres_l.append(torch.nn.functional.binary_cross_entropy_with_logits(obj, torch.tensor(float(has))))
        with torch.no_grad():
            ious.append(mask_iou((logit > 0)[None], target.bool()[None])[0])
    return {"bce": torch.stack(bce_l), "dice": torch.stack(dice_l), "presence": torch.stack(pres_l),
            "iou": torch.stack(ious), "present": torch.tensor(present)}


def batch_loss(cfg: Stage1Config, losses: dict[str, torch.Tensor], samples: list[Sample] | None = None) -> torch.Tensor:
    """Segmentation loss averaged over present targets, plus the weighted mean presence loss. With
    ``samples`` (the whole micro-batch, of which ``losses`` holds one process's share) the sums are
    divided by the whole batch's counts, so the shares of all processes add up to the batch's loss."""
    pf = losses["present"]
    n = len(samples) if samples is not None else len(pf)
    n_present = sum(bool(s.target.any()) for s in samples) if samples is not None else float(pf.sum())
    seg = ((cfg.bce_weight * losses["bce"] + cfg.dice_weight * losses["dice"]) * pf).sum() / max(n_present, 1)
    return seg + cfg.presence_weight * losses["presence"].sum() / n


def train_step(cfg: Stage1Config, frozen: Frozen, cache: FeatureCache, ctm, optimizer, step: int, total: int,
               procs: Processes = Processes()) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; each process runs its share of every
    micro-batch (``Processes``), the gradients are summed over processes and the logs describe the
    whole batch."""
    set_lr(optimizer, lr_at(step, cfg.lr, total, cfg.warmup_steps, min_ratio=1.0 if cfg.warmup_steps == 0 else 0.05))
    optimizer.zero_grad(set_to_none=True)
    logs: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        samples = plan_batch(cfg, cache.items, step, micro)
        mine = procs.share(samples)
        losses = sample_losses(cfg, mine, forward_samples(cfg, frozen, cache, ctm, mine))
        (batch_loss(cfg, losses, samples) / cfg.grad_accum).backward()
        whole = _whole_batch(procs, {k: v.detach() for k, v in losses.items()})
        for key, value in _summarise(samples, whole, batch_loss(cfg, whole)).items():
            logs[key] = logs.get(key, 0.0) + value / cfg.grad_accum
    procs.sum_grads(ctm.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(ctm.parameters(), cfg.grad_clip)
    optimizer.step()
    logs.update(lr=optimizer.param_groups[0]["lr"], grad_norm=float(grad_norm))
    return logs


def _whole_batch(procs: Processes, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample losses of the whole micro-batch, in plan order, from every process's share."""
    shares = procs.gather(losses)
    if len(shares) == 1:
        return shares[0]
    # process r holds samples r, r + world, ...: interleave the shares back into plan order
    n = sum(len(share["bce"]) for share in shares)
    order = [j for r in range(len(shares)) for j in range(r, n, len(shares))]
    inverse = torch.argsort(torch.tensor(order))
    return {k: torch.cat([share[k] for share in shares])[inverse] for k in losses}


def _summarise(samples: list[Sample], losses: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, float]:
    out = {"loss": loss.item(), "bce": losses["bce"].mean().item(), "dice": losses["dice"].mean().item(),
           "presence_loss": losses["presence"].mean().item()}
    for route in ("reason", "shortcut"):
        sel = [j for j, s in enumerate(samples) if s.route == route and s.target.any()]
        if sel:
            out[f"train_iou_{route}"] = float(losses["iou"][sel].mean())
    return out


# --------------------------------------------------------------------------- evaluation


def evaluate(cfg: Stage1Config, frozen: Frozen, cache: FeatureCache, ctm) -> dict[str, Any]:
    """Held-out foreground IoU per level of the teacher-forced reason route (with and without the
    ground-truth box) and of the shortcut, against the empty and whole-image masks; the mean loss."""
    rows: dict[str, dict[str, list[float]]] = {}
    losses_all = []
    pres_pos = []
    with eval_mode(ctm):
        for i, item in enumerate(cache.items):
            plans = [Sample(i, "reason", item.box_px is not None, item.query, item.mask),
                     Sample(i, "reason", False, item.query, item.mask)]
            names = ["reason_box", "reason_nobox"]
            if item.shortcut_ok and count_words(item.query) <= cfg.max_shortcut_words:
                plans.append(Sample(i, "shortcut", False, item.query, item.mask))
                names.append("shortcut")
            outputs = forward_samples(cfg, frozen, cache, ctm, plans)
            losses = sample_losses(cfg, plans, outputs)
            losses_all.append(float(batch_loss(cfg, {k: v[:1] for k, v in losses.items()})))
            r = rows.setdefault(item.level, {})
            for name, iou in zip(names, losses["iou"].tolist()):
                r.setdefault(name, []).append(iou)
            if "shortcut" in names:
                pres_pos.append(float(torch.sigmoid(outputs[-1][2])))
            area = item.mask.mean()
            r.setdefault("empty", []).append(0.0)
            r.setdefault("whole", []).append(float(area))
    report: dict[str, Any] = {"items": len(cache.items), "loss_reason_box": round(float(np.mean(losses_all)), 4), "fg_iou": {}}
    for level in LEVELS:
        if level in rows:
            report["fg_iou"][level] = {k: round(float(np.mean(v)), 4) for k, v in rows[level].items()}
            report["fg_iou"][level]["n"] = len(rows[level]["empty"])
    if pres_pos:
        report["shortcut_presence_mean"] = round(float(np.mean(pres_pos)), 4)
    return report


# --------------------------------------------------------------------------- the stage


def train_stage1(
    cfg: Stage1Config, out_dir: str | os.PathLike[str] | None = None, *, stop_after: int | None = None,
) -> StageResult:
    """Train (or resume) the CTM; ``stop_after`` interrupts after that many total steps (tests)."""
    from conceptseg_edge.models.checkpoint import save_checkpoint

    with begin_stage(cfg, out_dir) as (out, clock):
        items = load_items(cfg.data, "train", "stage1.data")  # bad data fails before a model is built
        procs = processes()
        if cfg.batch_size < procs.world:
            raise InputError(f"stage1.batch_size: {cfg.batch_size} samples cannot be shared by {procs.world} processes "
                             "(batch_size is the micro-batch of all processes together)")
        frozen, ctm = load_frozen(cfg, out, procs)
        cache = FeatureCache(frozen, items, cfg.cache, cfg.progress, "stage1 cache")
        total = cfg.total_steps(len(items))
        optimizer = torch.optim.AdamW(ctm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        modules = {"ctm": ctm}
        val_cache = functools.cache(
            lambda: FeatureCache(frozen, load_items(cfg.data, "val", "stage1.data"), cfg.cache, False, "stage1 val cache"))
        end, logger = run_steps(
            "stage1", cfg, out, modules, optimizer, total,
            step=lambda i: train_step(cfg, frozen, cache, ctm, optimizer, i, total, procs),
            evaluate=lambda: {"val_loss": evaluate(cfg, frozen, val_cache(), ctm)["loss_reason_box"]},
            postfix=lambda row: {"loss": f"{row['loss']:.3f}"},
            stop_after=stop_after,
            procs=procs,
        )
        if end < total:
            if procs.is_main:
                logger.plot(out / "curves.png", title="stage 1 (CTM)")
            return StageResult(out, out / "checkpoint", {"stopped_at": end})
        if not procs.is_main:  # the main process evaluates and writes; the others wait for it
            procs.barrier()
            return StageResult(out, out / "checkpoint", {})
        logger.plot(out / "curves.png", title="stage 1 (CTM)")
        ckpt = save_checkpoint(out / "checkpoint", frozen.policy.model, ctm.eval(), frozen.policy.processor,
                               RouterConfig(max_shortcut_words=cfg.max_shortcut_words), frozen.backbone, overwrite=True)
        train_time = clock.elapsed()
        losses = [r["loss"] for r in logger.rows if "loss" in r]
        summary = {
            "checkpoint": str(ckpt),
            "steps": total,
            "train_items": len(items),
            "processes": procs.world,
            "ctm": {"config": ctm.config.to_dict(), "from": cfg.init_checkpoint, "overrides": ctm_overrides(cfg, ctm)},
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "loss_first10_mean": float(np.mean(losses[:10])) if losses else None,
            "loss_last10_mean": float(np.mean(losses[-10:])) if losses else None,
            "heldout": evaluate(cfg, frozen, val_cache(), ctm),
            "time": {"train": train_time, "total": clock.elapsed()},
        }
        write_summary(out / "stage1.json", summary)
        procs.barrier()
        return StageResult(out, ckpt, summary)


def run_stage1(config_path: str | os.PathLike[str], out_dir: str | None = None) -> Path:
    """CLI entry: load the YAML config, train, return the checkpoint directory."""
    cfg = load_config(config_path, Stage1Config)
    return train_stage1(cfg, out_dir).checkpoint
