"""Helpers every training stage shares: seeding, timing, SAM2 inputs, losses, resumable training state.

Training state (for ``resume``) is a directory written atomically, safetensors + JSON, never pickle::

    state/
      tensors.safetensors   model weights ("model.<name>.*") and optimizer tensors ("optim.<i>.<key>")
      state.json            step, optimizer param groups and scalar state, torch RNG, the stage's
                            extra JSON, and the sha256 of tensors.safetensors

Every stage draws its data from ``numpy.random.default_rng([seed, step])`` and has no dropout, so
weights + optimizer state + step are the whole state: a resumed run takes exactly the step an
uninterrupted one would.

Also here, because warmstart and stage 1 both train on them: the episode items (``EpisodeData``,
``load_items``: ConceptWorld or an all_meta.json root, each target laid out as the policy sees it)
and the tag template a teacher-forced completion follows (``template_completion``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from conceptseg_edge.episodes import MetaEpisode, box_to_image, build_meta_episode
from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.fileio import sha256_file, write_json
from conceptseg_edge.models.sam2 import PIXEL_MEAN, PIXEL_STD
from conceptseg_edge.tags import format_output
from conceptseg_edge.train.log import MetricsLogger

#: Held-out ConceptWorld episodes start here (as in train/backbone.py); training uses [0, n).
VAL_OFFSET = 1_000_000
STATE_DIR = "state"
_TENSORS = "tensors.safetensors"
_META = "state.json"
_STATE_FORMAT = "conceptseg-edge-train-state"


# --------------------------------------------------------------------------- run setup


def seed_everything(seed: int) -> None:
    """Seed python, numpy's legacy global RNG and torch (model init draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads (the project's machines have two cores, shared)."""
    if threads is not None:
        if threads < 1:
            raise InputError(f"threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)


@dataclass
class StageClock:
    """Wall and CPU seconds of a stage (CPU = this process's user+system time, all threads)."""

    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def elapsed(self) -> dict[str, float]:
        return {
            "wall_s": round(time.perf_counter() - self.wall0, 2),
            "cpu_s": round(time.process_time() - self.cpu0, 2),
        }


def lr_at(step: int, base_lr: float, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` steps, then cosine down to ``min_ratio * base_lr``.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_types(cfg: Any, where: str) -> None:
    """``InputError`` for a field whose value does not match its annotation (YAML gives any type).

    Handles the annotations the training configs use: bool, int, float (an int is accepted), str,
    ``X | None``, ``tuple[T, ...]`` and nested dataclasses (checked recursively).
    """
    import dataclasses
    import types
    import typing

    def ok(value: Any, hint: Any) -> bool:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return any(ok(value, h) for h in typing.get_args(hint))
        if hint is type(None):
            return value is None
        if hint is bool:
            return isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is str:
            return isinstance(value, str)
        if origin is tuple:
            args = typing.get_args(hint)
            return isinstance(value, tuple) and all(ok(v, args[0]) for v in value)
        if dataclasses.is_dataclass(hint):
            return isinstance(value, hint)
        return True

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not ok(value, hints[f.name]):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = " (YAML reads 1e-3 as a string: write 1.0e-3)"
                except ValueError:
                    pass
            raise InputError(f"{where}.{f.name}: expected {hints[f.name]}, got {value!r}{hint}")
        if dataclasses.is_dataclass(value):
            check_types(value, f"{where}.{f.name}")


def require_positive(where: str, **values: float) -> None:
    """``InputError`` naming the first field that is not > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{where}.{name}: expected > 0, got {value!r}")


def require_fraction(where: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"{where}.{name}: expected a fraction in [0, 1], got {value!r}")


def epoch_picks(seed: int, n: int, step: int, per_step: int, start: int, count: int) -> list[int]:
    """``count`` item indices from position ``start`` of step ``step``'s share of a shuffled epoch.

    Each epoch is a fresh permutation of ``range(n)`` from ``default_rng([seed, epoch])``; steps take
    consecutive runs of ``per_step`` from it (wrapping around). A pure function of its arguments.
    """
    steps_per_epoch = max(1, math.ceil(n / per_step))
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    first = k * per_step + start
    return [int(order[(first + j) % n]) for j in range(count)]


# --------------------------------------------------------------------------- episodes and the template


#: The template's ``<think>`` and ``<rule>`` text: fixed and short, so a tiny policy writes the whole
#: format in few tokens and what it has to work out is in the boxes and the answer.
TEMPLATE_THINK = "Find the query."
TEMPLATE_RULE = "Box the match."


def template_completion(meta: MetaEpisode) -> str:
    """The tag-format completion with the ground-truth ``<bbox>`` (and ``<check>`` when a support box
    is hidden) and the query as ``<answer>``: what warmstart teaches and stage 1 teacher-forces.

    Raises:
        InputError: the episode has no ground-truth box (an empty target mask).
    """
    if meta.gt_box is None:
        raise InputError(f"template: episode {meta.query!r} has an empty target mask, so no <bbox>")
    return format_output(think=TEMPLATE_THINK, rule=TEMPLATE_RULE, bbox=meta.gt_box, answer=meta.query,
                         check=meta.hidden_box)


@dataclass
class EpisodeData:
    """Where training and held-out targets come from (warmstart, stage 1)."""

    source: str = field(default="world", metadata={"help": "'world' (ConceptWorld) or 'meta' (an all_meta.json root)"})
    root: str | None = field(default=None, metadata={"help": "dataset root for source 'meta'"})
    seed: int = 0
    image_size: int = field(default=128, metadata={"help": "ConceptWorld image side, px"})
    train_episodes: int = field(default=400, metadata={"help": "world: indices [0, n); meta: at most n train items"})
    val_episodes: int = field(default=40, metadata={"help": "world: from VAL_OFFSET; meta: the test split"})
    support_prob: float = field(default=0.5, metadata={"help": "CI/CD items shown with their supports (CR always)"})

    def validate(self, where: str) -> None:
        if self.source not in ("world", "meta"):
            raise InputError(f"{where}.source: expected 'world' or 'meta', got {self.source!r}")
        if self.source == "meta" and not self.root:
            raise InputError(f"{where}.root: required when data.source is 'meta'")
        require_positive(where, train_episodes=self.train_episodes, val_episodes=self.val_episodes)
        require_fraction(where, support_prob=self.support_prob)


@dataclass
class Item:
    """One training/eval target with what the policy stages need from it."""

    image: np.ndarray  # (H, W, 3) uint8, the target
    mask: np.ndarray  # (H, W) bool
    query: str
    level: str
    task: str
    meta: MetaEpisode  # the policy's view, ground truth in the 600x600 frame

    @property
    def box_px(self) -> tuple[float, float, float, float] | None:
        """The ground-truth ``<bbox>`` as the pipeline would pass it to SAM2 (image pixels)."""
        return box_to_image(self.meta.gt_box, self.image.shape[:2])

    @property
    def shortcut_ok(self) -> bool:
        return self.level != "CR"


def world_items(data: EpisodeData, split: str) -> list[Item]:
    from conceptseg_edge.data.world import ConceptWorld

    world = ConceptWorld(data.seed, data.image_size)
    if split == "train":
        indices = range(data.train_episodes)
    else:
        indices = range(VAL_OFFSET, VAL_OFFSET + data.val_episodes)
    items = []
    for i in indices:
        ep = world.episode(i)
        if not ep.mask.any():
            continue
        rng = np.random.default_rng([data.seed, i, 7])
        supports = ep.supports if (ep.level == "CR" or rng.random() < data.support_prob) else ()
        meta = build_meta_episode(ep.image, ep.mask, ep.query, supports)
        items.append(Item(ep.image, ep.mask, ep.query, ep.level, ep.task_name, meta))
    return items


def meta_items(data: EpisodeData, split: str) -> list[Item]:
    from conceptseg_edge.data.meta import ConceptSegDataset

    dataset = ConceptSegDataset.open(data.root)
    name = "train" if split == "train" else "test"
    if name not in dataset.splits:
        raise InputError(f"{data.root}: no {name!r} split in all_meta.json")
    limit = data.train_episodes if split == "train" else data.val_episodes
    items = []
    for k, (_, cls_name, index, meta_item) in enumerate(dataset.items(name)):
        if k >= limit:
            break
        rng = np.random.default_rng([data.seed, k, 7])
        ep = dataset.load(meta_item)
        if not ep.mask.any():
            continue
        if ep.level != "CR" and rng.random() >= data.support_prob:
            meta = build_meta_episode(ep.image, ep.mask, ep.query, ())
        else:
            meta = dataset.meta_episode(name, cls_name, index, rng)
        items.append(Item(ep.image, ep.mask, ep.query, ep.level, ep.task_name, meta))
    return items


def load_items(data: EpisodeData, split: str, where: str = "data") -> list[Item]:
    """Targets with a non-empty mask: ``split`` "train" or "val" (world) / "test" split (meta)."""
    items = world_items(data, split) if data.source == "world" else meta_items(data, split)
    if not items:
        raise InputError(f"{where}: no {split} items with a non-empty mask")
    return items


# --------------------------------------------------------------------------- SAM2 inputs and losses


def sam_input(images: np.ndarray | list[np.ndarray], image_size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, S, S) float, as ``SAM2Reference.preprocess`` (bilinear + antialias)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2).float().div(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def upsample(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) low-res logits → (B, C, H, W), bilinear, as the runtime upsamples."""
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits
    return F.interpolate(logits, hw, mode="bilinear", align_corners=False)


def bce_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigmoid BCE (mean over pixels) and Dice loss; logits/target (B, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    dice = 1 - (2 * (prob * tgt).sum(1) + smooth) / (prob.sum(1) + tgt.sum(1) + smooth)
    return bce, dice


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of boolean masks (B, H, W); 1 where both are empty."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def gather_features(feats: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Select per-prompt rows of per-image encoder outputs (gradients flow back to the encoder)."""
    return tuple(f.index_select(0, index) for f in feats)


def empty_mask_prompt(batch: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_input`` zeros and ``has_mask_input`` = 0 for a decoder batch."""
    low = image_size // 4
    return torch.zeros(batch, 1, low, low), torch.zeros(batch)


def box_prompt(boxes_px: np.ndarray, image_hw: tuple[int, int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) XYXY boxes in image pixels → padded decoder points (B, 3, 2) and labels (B, 3).

    Box corners (labels 2, 3) then SAM2's (0, 0) padding point (label -1), in the model frame, as
    ``preprocess.encode_prompts`` builds them at inference.
    """
    h, w = image_hw
    scale = np.array([image_size / w, image_size / h, image_size / w, image_size / h], np.float32)
    corners = (np.asarray(boxes_px, np.float32).reshape(-1, 4) * scale).reshape(-1, 2, 2)
    coords = np.concatenate([corners, np.zeros((len(corners), 1, 2), np.float32)], axis=1)
    labels = np.tile(np.array([[2, 3, -1]], np.int32), (len(corners), 1))
    return torch.from_numpy(coords), torch.from_numpy(labels)


# --------------------------------------------------------------------------- resumable state


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_load(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(
    out_dir: str | os.PathLike[str],
    step: int,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/state`` atomically: built beside it, then swapped in; returns its path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final = out_dir / STATE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{STATE_DIR}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for mod_name, module in modules.items():
            for key, value in module.state_dict().items():
                # safetensors refuses shared storage; a tied alias is stored once and re-tied on load
                if value.numel() and value.data_ptr() in seen:
                    continue
                seen[value.data_ptr()] = key
                tensors[f"model.{mod_name}.{key}"] = value.detach().cpu().contiguous()
        optim_tensors, optim_meta = _optimizer_split(optimizer)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in optim_tensors.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / _TENSORS)
        write_json(tmp / _META, {
            "format": _STATE_FORMAT,
            "step": step,
            "optimizer": optim_meta,
            "extra": extra or {},
            "sha256": sha256_file(tmp / _TENSORS),
        })
        if final.exists():
            old = out_dir / f".{STATE_DIR}.{uuid.uuid4().hex[:12]}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def has_state(out_dir: str | os.PathLike[str]) -> bool:
    return (Path(out_dir) / STATE_DIR / _META).is_file()


def load_state(
    out_dir: str | os.PathLike[str],
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
) -> tuple[int, dict[str, Any]]:
    """Restore modules, optimizer and torch RNG from ``out_dir/state``; returns ``(step, extra)``.

    Raises:
        CheckpointError: missing or tampered files, or weights that do not fit the modules.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(out_dir) / STATE_DIR
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / _META}: unreadable training state ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{path / _META}: not a {_STATE_FORMAT} file")
    if not (path / _TENSORS).is_file() or sha256_file(path / _TENSORS) != meta.get("sha256"):
        raise CheckpointError(f"{path / _TENSORS}: missing or does not match its sha256 in {_META}")
    try:
        tensors = load_file(path / _TENSORS)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / _TENSORS}: unreadable ({exc})") from exc
    for mod_name, module in modules.items():
        prefix = f"model.{mod_name}."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = [k for k in expected if k not in weights]
        # a key absent from the file is fine only when it aliases a stored tensor (tied weights)
        ptrs = {v.data_ptr(): k for k, v in expected.items() if k in weights and v.numel()}
        missing = [k for k in missing if expected[k].data_ptr() not in ptrs]
        unexpected = [k for k in weights if k not in expected]
        if missing or unexpected:
            raise CheckpointError(
                f"{path / _TENSORS}: {mod_name} does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        try:
            module.load_state_dict(weights, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{path / _TENSORS}: {mod_name}: {exc}") from exc
    try:
        _optimizer_load(optimizer, tensors, meta["optimizer"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit: {exc}") from exc
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), meta.get("extra", {})


def begin_stage(cfg: Any, out_dir: str | os.PathLike[str] | None) -> tuple[Path, StageClock]:
    """Validate ``cfg``, create the output directory (``out_dir`` or ``cfg.out_dir``), set torch's
    threads, keep the config beside the outputs (checkpoints name what produced them) and start the
    clock the summary reports."""
    from conceptseg_edge.train.config import save_config

    cfg.validate()
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    clock = StageClock()
    save_config(out / "config.yaml", cfg)
    return out, clock


def run_steps(
    name: str,
    cfg: Any,
    out: Path,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    total: int,
    step: Callable[[int], dict[str, float]],
    evaluate: Callable[[], dict[str, float]],
    postfix: Callable[[dict[str, float]], dict[str, str]],
    stop_after: int | None = None,
) -> tuple[int, MetricsLogger]:
    """The step loop every stage shares: resume from ``out/state`` (when ``cfg.resume``), run
    ``step(i)`` up to ``total`` (or ``stop_after``, for tests), add ``evaluate()`` every
    ``cfg.eval_every`` steps and at the end, log each step to ``out/metrics.csv``, and write resumable
    state every ``cfg.save_every`` steps and where the run stops. ``cfg`` is a ``LoopConfig``.

    Returns the step it stopped after and the logger (for the curves).
    """
    from tqdm import tqdm

    start = load_state(out, modules, optimizer)[0] if cfg.resume and has_state(out) else 0
    logger = MetricsLogger(out)
    end = total if stop_after is None else min(total, stop_after)
    with tqdm(total=total, initial=start, desc=name, unit="step", disable=not cfg.progress) as bar:
        for i in range(start, end):
            row = step(i)
            if (i + 1) % cfg.eval_every == 0 or i + 1 == total:
                row.update(evaluate())
            logger.log(i + 1, **row)
            bar.set_postfix(**postfix(row))
            bar.update()
            if (i + 1) % cfg.save_every == 0 or i + 1 == end:
                save_state(out, i + 1, modules, optimizer)
    return end, logger


class ParamBank(torch.nn.Module):
    """Free-standing trainable tensors (e.g. the backbone's concept table) as a module for ``save_state``."""

    def __init__(self, **params: torch.Tensor) -> None:
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(value))


@contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside the block; the previous train/eval flags are restored after."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def write_summary(path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
    """The stage's JSON summary (metrics, timings, outputs), written atomically."""
    write_json(path, summary)
