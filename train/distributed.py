"""The processes a step-loop stage runs in: one, or several started by ``accelerate launch``.

A step's samples are a pure function of (config, step), so every process plans the whole global
batch, computes the loss of its own share (``share``: every ``world``-th sample) normalised by the
whole batch's counts, and ``sum_grads`` adds the gradients over processes. The sum of the shares is
the one-process loss, so the optimizer sees the one-process gradient (up to float summation order)
and N processes follow the one-process curve with the same global batch.

Only the main process writes (state, metrics, checkpoint); ``main_first`` lets it create what the
others then read (the ``init_policy`` a resumed run reloads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the stage's processes (rank 0 is the main one)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's part of ``items``: every ``world``-th one from ``rank``."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first, then the others (which then find what it wrote)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over processes, in one all-reduce. A parameter no process
        gave a gradient keeps ``None`` (AdamW skips it, as in one process); one that only some did
        gets the others' sum with zeros in place of the missing ones."""
        if self.world == 1:
            return
        params = [p for p in params if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        has = torch.tensor([float(p.grad is not None) for p in params])
        torch.distributed.all_reduce(flat)
        torch.distributed.all_reduce(has)
        offset = 0
        for p, seen in zip(params, has.tolist()):
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if seen else None
            offset += n

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every process, in rank order (picklable objects; small per-step logs)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


def processes() -> Processes:
    """The processes ``accelerate launch`` started, or one without it.

    ``accelerate``'s ``PartialState`` joins the process group its launcher set up (``WORLD_SIZE`` >
    1), on the CPU with gloo even on a GPU machine: a step-loop stage trains on the CPU. The
    launcher must be the multi-process one (``--multi_gpu`` or a multi-GPU config, with or without
    GPUs): accelerate 1.15's ``--cpu`` starts one process whatever ``--num_processes`` says. A single
    process never creates the state: it is a process-wide singleton that a later ``Accelerator``
    (stage 2's, in ``train tiny-default``) would have to agree with.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=True)
    return Processes(state.process_index, state.num_processes)
