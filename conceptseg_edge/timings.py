"""Per-stage wall times of one request: a frozen record with a field per stage, not a free-form dict.

Every stage a request can pass through has a field, in milliseconds; a stage that did not run is
``None`` and is absent from ``to_dict()`` (and from the read-only mapping view), so the JSON that
``segment --json``, ``demo.json``, Triton and the benchmarks write keeps the keys and key order it
always had. Counts (tokens generated) are not stages: they travel as ints on the result that owns
them (``PolicyGeneration.new_tokens``, ``SegmentResult.new_tokens``), never as floats in here.

Beside the milliseconds, ``providers`` records which execution provider (or engine) ran each stage
that ran a graph, as the engine reported it after loading: a time means nothing without the
hardware that produced it, and a request may mix providers. It is not a stage, so the mapping view
and ``to_dict()`` are unchanged; reports write it under its own key (``provider_map()``).
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
    (``ctm``), and the SAM2 ``decoder`` and ``postprocess``. Video tracking adds ``route`` (the router
    run that starts or re-finds an object, whole), ``memory_attention`` before the decoder and
    ``memory_encoder`` after it.

    ``providers``: stage → the provider that ran it (``CPUExecutionProvider``, ``TensorrtExecutionProvider``,
    ...), for the stages that ran a graph; given as a mapping, held as sorted pairs so the record stays
    frozen and hashable.
    """

    preprocess: float | None = None
    encoder: float | None = None
    route: float | None = None
    concept_tokens: float | None = None
    policy_preprocess: float | None = None
    policy_vision: float | None = None
    policy_prefill: float | None = None
    policy_generate: float | None = None
    policy_decode: float | None = None
    ctm: float | None = None
    memory_attention: float | None = None
    decoder: float | None = None
    postprocess: float | None = None
    memory_encoder: float | None = None
    providers: Mapping[str, str] | tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        pairs = self.providers.items() if isinstance(self.providers, Mapping) else self.providers
        object.__setattr__(self, "providers", tuple(sorted((str(k), str(v)) for k, v in pairs)))

    def __or__(self, other: Timings) -> Timings:
        """These stages with ``other``'s laid over them (a stage ``other`` ran replaces ours, and its provider)."""
        stages = {name: getattr(self, name) for name in _STAGES} | dict(other)
        return Timings(**stages, providers=self.provider_map() | other.provider_map())

    def provider_map(self) -> dict[str, str]:
        """Stage → provider for the stages that ran a graph, in stage order: the JSON reports write."""
        held = dict(self.providers)
        return {stage: held[stage] for stage in (*_STAGES, *sorted(set(held) - set(_STAGES))) if stage in held}

    @property
    def provider(self) -> str:
        """The provider of every graph stage, or each provider with its stages when they differ."""
        return describe_providers(self.provider_map())

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


_STAGES = tuple(f.name for f in fields(Timings) if f.name != "providers")


def describe_providers(providers: Mapping[str, str]) -> str:
    """One provider for a report: its name when every stage or part ran on it (``none`` when nothing
    ran a graph), else ``A (s1, s2); B (s3)`` so a mix is visible in a table cell."""
    by_provider: dict[str, list[str]] = {}
    for where, provider in providers.items():
        by_provider.setdefault(provider, []).append(where)
    if len(by_provider) <= 1:
        return next(iter(by_provider), "none")
    return "; ".join(f"{provider} ({', '.join(names)})" for provider, names in by_provider.items())
