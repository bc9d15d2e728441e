"""Per-stage wall times of one request: a frozen record with a field per stage, not a free-form dict.

Every stage a request can pass through has a field, in milliseconds; a stage that did not run is
``None`` and is absent from ``to_dict()`` (and from the read-only mapping view), so the JSON that
``segment --json``, ``demo.json``, Triton and the benchmarks write keeps the keys and key order it
always had. Counts (tokens generated) are not stages: they travel as ints on the result that owns
them (``PolicyGeneration.new_tokens``, ``SegmentResult.new_tokens``), never as floats in here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields


def elapsed_ms(start_ns: int) -> float:
    """Milliseconds since ``start_ns`` (a ``time.perf_counter_ns()`` reading)."""
    return (time.perf_counter_ns() - start_ns) / 1e6


@dataclass(frozen=True)
class Timings(Mapping[str, float]):
    """Milliseconds per stage, in the order stages run; reads as a mapping of the stages that ran.

    Image stages (``preprocess``, ``encoder``: 0.0 when the image's features were reused), the
    shortcut's ``concept_tokens`` (bank or text prefill), the policy's stages (``policy_preprocess``
    and ``policy_vision`` with images, ``policy_prefill``, ``policy_decode`` after the first token;
    the torch reference times its whole generation as ``policy_generate``), the translator
    (``ctm``), and the SAM2 ``decoder`` and ``postprocess``.
    """

    preprocess: float | None = None
    encoder: float | None = None
    concept_tokens: float | None = None
    policy_preprocess: float | None = None
    policy_vision: float | None = None
    policy_prefill: float | None = None
    policy_generate: float | None = None
    policy_decode: float | None = None
    ctm: float | None = None
    decoder: float | None = None
    postprocess: float | None = None

    def __or__(self, other: Timings) -> Timings:
        """These stages with ``other``'s laid over them (a stage ``other`` ran replaces ours)."""
        return Timings(**{f.name: getattr(self, f.name) for f in fields(self)} | dict(other))

    def to_dict(self) -> dict[str, float]:
        """The stages that ran, in stage order: the JSON every report writes."""
        return dict(self)

    def total(self) -> float:
        return sum(self.values())

    def __getitem__(self, stage: str) -> float:
        value = getattr(self, stage, None) if stage in _STAGES else None
        if value is None:
            raise KeyError(stage)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in _STAGES if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


_STAGES = tuple(f.name for f in fields(Timings))
