"""The run a training stage is: seeding, threads, the clock, the learning-rate schedule, and the one
step loop (resume, evaluate, log, save) that backbone, warmstart and stage 1 share.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import write_json
from conceptseg_edge.train.config import save_config
from conceptseg_edge.train.log import MetricsLogger
from conceptseg_edge.train.state import has_state, load_state, save_state


@dataclass(frozen=True)
class StageResult:
    """What a step-loop stage hands back: its output directory, the checkpoint it wrote (where it
    would have written it, when ``stop_after`` interrupted the run) and its JSON summary."""

    out_dir: Path
    checkpoint: Path
    summary: dict[str, Any]


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


def begin_stage(cfg: Any, out_dir: str | os.PathLike[str] | None) -> tuple[Path, StageClock]:
    """Validate ``cfg``, create the output directory (``out_dir`` or ``cfg.out_dir``), set torch's
    threads, keep the config beside the outputs (checkpoints name what produced them) and start the
    clock the summary reports."""
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
