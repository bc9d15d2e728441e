"""The run a training stage is: its output directory, seeding, threads, the clock, the learning-rate
schedule, and the one step loop (resume, evaluate, log, save) that backbone, warmstart and stage 1
share.

A stage's output directory is checked before any work (one clean error for a path under a file or
an unwritable place) and, when the stage fails before it wrote anything a rerun resumes from, the
directory this run created is removed again (``stage_output``). ``config.yaml`` is written with each
resumable state, so it always describes the state beside it. A non-finite loss stops the loop at
once, naming the step (``require_finite_loss``); non-finite weights are never saved (``save_state``).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from conceptseg_edge.errors import InputError, TrainingError
from conceptseg_edge.fileio import writable_output, write_json
from conceptseg_edge.train.config import save_config
from conceptseg_edge.train.distributed import Processes
from conceptseg_edge.train.log import MetricsLogger
from conceptseg_edge.train.state import clean_state_dir, has_state, load_state, save_state


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


@contextmanager
def stage_output(
    path: str | os.PathLike[str], where: str, resumable: Callable[[Path], bool],
) -> Iterator[Path]:
    """Check that ``path`` can be written (``InputError`` naming ``where``, before any work), create
    it, and yield it. If the block fails and ``path`` was new (absent, or an empty directory), what
    this run put there is removed again, parents it created included, unless ``resumable(path)``:
    a failed first run leaves nothing behind, and a directory that already held something is never
    touched."""
    path = writable_output(path, where, directory=True)
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    fresh = bool(created) or not any(path.iterdir())
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if fresh and not resumable(path):
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:  # something else appeared in it meanwhile
                    break
        raise


@contextmanager
def begin_stage(cfg: Any, out_dir: str | os.PathLike[str] | None) -> Iterator[tuple[Path, StageClock]]:
    """Validate ``cfg``, check and create the output directory (``out_dir`` or ``cfg.out_dir``) with
    ``stage_output`` (a failure before the first state leaves no directory behind), set torch's
    threads and start the clock the summary reports."""
    cfg.validate()
    with stage_output(out_dir or cfg.out_dir, "out_dir", has_state) as out:
        set_threads(cfg.threads)
        yield out, StageClock()


def require_finite_loss(loss: float, where: str, step: int) -> None:
    """``TrainingError`` naming the step when its loss is inf or NaN: every update after it would
    only spread the NaN into the weights."""
    if not math.isfinite(loss):
        raise TrainingError(f"{where}: step {step}: the loss is {loss}; training stopped before anything from "
                            "this step was written. A non-finite loss usually means the learning rate is too high")


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
    procs: Processes = Processes(),
) -> tuple[int, MetricsLogger]:
    """The step loop every stage shares: clear what a killed save left (``clean_state_dir``), resume
    from ``out``'s last complete state (when ``cfg.resume``), run ``step(i)`` up to ``total`` (or
    ``stop_after``, for tests), stop on a non-finite ``"loss"`` in its row, add ``evaluate()`` every
    ``cfg.eval_every`` steps and at the end, log each step to ``out/metrics.csv``, and write resumable
    state (and ``config.yaml``) every ``cfg.save_every`` steps and where the run stops. ``cfg`` is a
    ``LoopConfig``. Under several processes (``procs``) each runs every step and resumes from the
    same state; only the main one cleans, evaluates, logs and writes.

    Returns the step it stopped after and the logger (for the curves).

    Raises:
        TrainingError: a non-finite loss, or weights that turned non-finite (nothing is written).
    """
    from tqdm import tqdm

    if procs.is_main:
        clean_state_dir(out)
    procs.barrier()
    start = load_state(out, modules, optimizer)[0] if cfg.resume and has_state(out) else 0
    logger = MetricsLogger(out)
    end = total if stop_after is None else min(total, stop_after)
    with tqdm(total=total, initial=start, desc=name, unit="step", disable=not (cfg.progress and procs.is_main)) as bar:
        for i in range(start, end):
            row = step(i)
            require_finite_loss(row["loss"], str(out), i + 1)
            bar.update()
            if not procs.is_main:
                continue
            if (i + 1) % cfg.eval_every == 0 or i + 1 == total:
                row.update(evaluate())
            bar.set_postfix(**postfix(row))
            logger.log(i + 1, **row)
            if (i + 1) % cfg.save_every == 0 or i + 1 == end:
                save_state(out, i + 1, modules, optimizer)
                save_config(out / "config.yaml", cfg)
    procs.barrier()  # every process returns once the last state is written
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
