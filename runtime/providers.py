"""Execution providers: what ``--provider`` asks for, what ONNX Runtime may use, and what really ran.

A user who asks for ``cuda`` or ``tensorrt`` and silently gets CPU reads CPU latencies as GPU ones,
so nothing here falls back on its own: a provider this onnxruntime build lacks is a ``ProviderError``
before any model loads (``check_provider``), and so is one ONNX Runtime drops while it creates a
session (it does that when CUDA or TensorRT libraries fail to load, and only logs it:
``check_session``). ``ProviderConfig(allow_fallback=True)`` turns both into one warning and the next
provider in the chain; every report then records the provider that executed beside the one asked for.

``ProviderConfig`` also holds what the GPU providers need to run well, turned into ONNX Runtime's
provider options by pure functions (``cuda_options``, ``tensorrt_options``, ``ort_providers``):
TensorRT's fp16/int8 flags, engine and timing caches, and the optimization profile of each part,
derived from the manifest's symbolic dims by ``conceptseg_edge.profiles`` (the same profile the
``export tensorrt`` engines and their trtexec recipes use).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from conceptseg_edge.errors import InputError, ProviderError
from conceptseg_edge.generation import DEFAULT_MAX_NEW_TOKENS
from conceptseg_edge.manifest import PROCESSOR_DIR, PartManifest
from conceptseg_edge.profiles import DimRange, PartProfile, bundle_dim_ranges, derive_profile
from conceptseg_edge.timings import describe_providers

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

# Provider names users type → ONNX Runtime execution providers, in fallback order.
Provider = Literal["cpu", "cuda", "tensorrt"]
PROVIDERS: dict[Provider, tuple[str, ...]] = {
    "cpu": (CPU_EP,),
    "cuda": (CUDA_EP, CPU_EP),
    "tensorrt": (TENSORRT_EP, CUDA_EP, CPU_EP),
}
#: The names ``--provider`` accepts, in the order help lists them.
PROVIDER_NAMES: tuple[Provider, ...] = tuple(PROVIDERS)


GraphOptimization = Literal["disable", "basic", "extended", "all"]


@dataclass(frozen=True)
class SessionSettings:
    """The ONNX Runtime session options every ``OrtEngine`` opens with (any provider; the thread
    settings are the CPU provider's). ``session_entries`` spells the ones ORT takes as config strings.

    Defaults from interleaved A/Bs in one process (P10, SAM2.1-tiny at 1024 on the 2-core CI host):
    ORT's own defaults except spinning and the memory pattern.
    - Spinning off: idle intra-op threads that spin for work hold a core that the rest of the request
      (numpy pre- and post-processing, the other session, a neighbour process) needs; on a loaded
      host the decoder's p50 was 0.84x and the encoder's 0.89x with it off; on a quiet one the
      encoder took 3863 ms off, 3899 ms on.
    - Memory pattern off: the pattern ORT plans from the first run is one block for the whole run's
      intermediates. On a quiet host the encoder-only process peaked at 970 MiB without it against
      1518 MiB with it, at the same speed (3837 vs 3863 ms; the decoder 82.0 vs 81.0 ms). A policy
      decoder, whose KV inputs change shape every step, never reuses a pattern anyway.
    - Arena and weight pre-packing on: each off made the decoder slower (1.15-1.2x, loaded host).
    """

    intra_op_threads: int = field(default=0, metadata={"help": "intra-op threads (0: ORT's default, one per physical core)"})
    inter_op_threads: int = field(default=0, metadata={"help": "inter-op threads (0: ORT's default; used only by parallel execution)"})
    spinning: bool = field(default=False, metadata={"help": "idle intra-op threads spin for work instead of sleeping"})
    graph_optimization: GraphOptimization = field(default="all", metadata={"help": "ORT graph optimization level"})
    cpu_mem_arena: bool = field(default=True, metadata={"help": "ORT's CPU memory arena"})
    mem_pattern: bool = field(default=False, metadata={"help": "preallocate from the memory pattern of earlier runs"})
    prepacking: bool = field(default=True, metadata={"help": "pre-pack constant weights into the kernels' layouts at load"})

    def __post_init__(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise InputError(f"{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if self.graph_optimization not in get_args(GraphOptimization):
            raise InputError(f"graph_optimization '{self.graph_optimization}': expected one of {list(get_args(GraphOptimization))}")

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def session_entries(settings: SessionSettings) -> dict[str, str]:
    """ORT session config entries (``SessionOptions.add_session_config_entry``) for ``settings``."""
    return {
        "session.intra_op.allow_spinning": _flag(settings.spinning),
        "session.disable_prepacking": _flag(not settings.prepacking),
    }


@dataclass(frozen=True)
class ProviderConfig:
    """Which provider to run on, whether falling back is allowed, and the GPU providers' settings."""

    name: Provider = field(default="cpu", metadata={"help": "execution provider: cpu, cuda or tensorrt"})
    allow_fallback: bool = field(
        default=False, metadata={"help": "run on the next available provider (with a warning) instead of failing"}
    )
    device_id: int = field(default=0, metadata={"help": "CUDA device the CUDA/TensorRT providers use"})
    fp16: bool = field(default=False, metadata={"help": "let TensorRT choose fp16 kernels (trt_fp16_enable)"})
    cache_dir: Path | None = field(
        default=None, metadata={"help": "TensorRT engine + timing cache directory (None: rebuild every session)"}
    )
    workspace_gb: float | None = field(default=None, metadata={"help": "TensorRT builder workspace, GiB"})
    # Exhaustive cuDNN search re-runs for every new input shape; our decoders see a new point count per
    # request, so the heuristic choice is the steadier default.
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "HEURISTIC"
    max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "the policy's token budget, which bounds the KV-cache profile"}
    )
    dim_ranges: Mapping[str, DimRange] | None = field(
        default=None, metadata={"help": "size range per symbolic dim (None: the bundle's, see bundle_ranges)"}
    )
    warmup: bool = field(default=True, metadata={"help": "one run per GPU session at load (TensorRT builds its engine)"})
    session: SessionSettings = field(default=SessionSettings(), metadata={"help": "ONNX Runtime session options"})

    def __post_init__(self) -> None:
        if self.name not in PROVIDERS:
            raise InputError(f"provider '{self.name}': expected one of {list(PROVIDER_NAMES)}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise InputError(f"workspace_gb: expected > 0, got {self.workspace_gb}")

    def ranges(self) -> Mapping[str, DimRange]:
        return self.dim_ranges if self.dim_ranges is not None else bundle_dim_ranges(self.max_new_tokens)

    def for_bundle(self, bundle_dir: Path) -> ProviderConfig:
        """This config with the dim ranges of ``bundle_dir`` filled in (unless set explicitly)."""
        if self.dim_ranges is not None:
            return self
        return replace(self, dim_ranges=bundle_ranges(bundle_dir, self.max_new_tokens))


@dataclass(frozen=True)
class ProviderChoice:
    """The provider settings a command's config carries (``--provider``, ``--allow-fallback``,
    ``--trt-cache``, ``--ort-threads``, ``--ort-spinning``), shared by the benchmark and demo configs; ``provider_config`` is the full config."""

    provider: Provider = field(default="cpu", metadata={"help": "ONNX Runtime provider: cpu, cuda or tensorrt"})
    allow_fallback: bool = field(default=False, metadata={"help": "run on the next provider (warning) if this one is missing"})
    trt_cache: str | None = field(default=None, metadata={"help": "TensorRT provider engine + timing cache directory"})
    ort_threads: int = field(default=0, metadata={"help": "ONNX Runtime intra-op threads (0: one per physical core)"})
    ort_spinning: bool = field(default=False, metadata={"help": "ONNX Runtime's idle intra-op threads spin for work"})

    @property
    def provider_config(self) -> ProviderConfig:
        return ProviderConfig(self.provider, allow_fallback=self.allow_fallback,
                              cache_dir=None if self.trt_cache is None else Path(self.trt_cache),
                              session=SessionSettings(intra_op_threads=self.ort_threads, spinning=self.ort_spinning))


def bundle_ranges(bundle_dir: Path, max_new_tokens: int) -> dict[str, DimRange]:
    """``bundle_dim_ranges`` sized by the bundle's policy processor (its patch range and merge size), so a
    TensorRT profile admits every image the processor can produce; the defaults for a bundle without one."""
    from conceptseg_edge.runtime.policy_image import PolicyImageConfig

    processor = Path(bundle_dir) / PROCESSOR_DIR
    if not processor.is_dir():
        return bundle_dim_ranges(max_new_tokens)
    image = PolicyImageConfig.from_dir(processor)
    return bundle_dim_ranges(max_new_tokens, min_patches=image.min_pixels // image.patch_size**2,
                             max_patches=image.max_pixels // image.patch_size**2, merge_size=image.merge_size)


def as_config(provider: str | ProviderConfig) -> ProviderConfig:
    """A provider name (strict: no fallback) or a full config, as a config."""
    return provider if isinstance(provider, ProviderConfig) else ProviderConfig(provider)


def check_provider(config: ProviderConfig, available: Sequence[str]) -> list[str]:
    """The ONNX Runtime providers to ask for, in order; call it before loading anything.

    Raises:
        ProviderError: the requested provider is not in ``available`` (``ort.get_available_providers()``)
            and ``allow_fallback`` is off; with it on, one ``RuntimeWarning`` names the fallback.
    """
    wanted = PROVIDERS[config.name]
    chosen = [p for p in wanted if p in available]
    if wanted[0] not in available:
        _refuse(config, f"{wanted[0]} is not in this onnxruntime build (it has {list(available)})",
                "install onnxruntime-gpu (pip install 'conceptseg-edge[gpu]'; on a Jetson, JetPack's wheel)", chosen[0])
    return chosen


def check_session(config: ProviderConfig, chosen: Sequence[str], session_providers: Sequence[str], where: str) -> str:
    """The provider that runs a created session; refuses one that lost the provider it was given first.

    ONNX Runtime drops a provider whose libraries fail to load while it builds the session (an
    onnxruntime-gpu wheel without CUDA, TensorRT or cuDNN libraries, or without a GPU) and only logs
    it: ``session_providers`` (``session.get_providers()``) is the truth. ``chosen``: what
    ``check_provider`` asked the session for.

    Raises:
        ProviderError: ``chosen[0]`` is not among the session's providers and fallback is off.
    """
    wanted = chosen[0]
    if wanted not in session_providers:
        _refuse(
            config,
            f"{where}: ONNX Runtime could not start {wanted} for this session (it runs on {list(session_providers)})",
            "make the GPU and the CUDA/cuDNN/TensorRT libraries this onnxruntime-gpu loads available "
            "(ONNX Runtime's log at severity 0-2 names the missing one)",
            session_providers[0],
        )
    return session_providers[0]


def _refuse(config: ProviderConfig, why: str, fix: str, fallback: str) -> None:
    if not config.allow_fallback:
        raise ProviderError(f"provider '{config.name}': {why}; {fix}, or pass --allow-fallback to run on {fallback}")
    # Reported at this line whoever asks, so the same fallback (checked by the command, then by each
    # engine) is shown once under Python's default filter; a session that lost its provider names its file.
    warnings.warn(f"provider '{config.name}': {why}; --allow-fallback: running on {fallback}", RuntimeWarning)


def provider_record(requested: str, executed: Mapping[str, str]) -> dict[str, object]:
    """What every report writes about providers: the one asked for, the one that ran (or the mix, see
    ``describe_providers``), and what ran each part or stage. A fallback shows as requested != provider."""
    return {"provider_requested": requested, "provider": describe_providers(executed), "providers": dict(executed)}


def provider_note(requested: str, providers: Mapping[str, str]) -> str:
    """A report header's provider: what ran (a mix names each provider's parts), and what was asked for
    when a part ran elsewhere (``--allow-fallback``), so a CPU number never reads as a GPU one."""
    ran = describe_providers(providers)
    wanted = PROVIDERS[requested][0] if requested in PROVIDERS else requested
    fell_back = [part for part, provider in providers.items() if provider != wanted]
    if not fell_back:
        return ran
    where = "" if len(fell_back) == len(providers) else f" on {', '.join(fell_back)}"
    return f"{ran} (asked for {requested}: FALLBACK{where})"


def part_profile(part: PartManifest, config: ProviderConfig) -> PartProfile:
    """The optimization profile of ``part`` (one per dynamic input) from the config's dim ranges."""
    return derive_profile(part.name, part.inputs, config.ranges())


def explicit_int8(part: PartManifest) -> bool:
    """Whether ``part``'s graph carries INT8 Q/DQ nodes (``export qdq`` kept them: its measurement passed).

    TensorRT builds such a graph with its INT8 flag and takes every scale from the graph; ORT's TensorRT
    provider reads a calibration table only when one is named, and none is. An int8 part quantized any
    other way (ORT's dynamic MatMulInteger graphs) is not TensorRT INT8: ORT places those nodes itself.
    """
    return part.qdq is not None and part.qdq.passed and part.qdq.precision == "int8"


def cuda_options(config: ProviderConfig) -> dict[str, str]:
    """ONNX Runtime CUDA provider options (string values, as ORT's Python API takes them)."""
    return {
        "device_id": str(config.device_id),
        "cudnn_conv_algo_search": config.cudnn_conv_algo_search,
        # Copies on the compute stream: feeds are ready when a kernel reads them.
        "do_copy_in_default_stream": "1",
        # Grow the arena by what is asked, not in powers of two: a Jetson shares its memory with the CPU.
        "arena_extend_strategy": "kSameAsRequested",
    }


def tensorrt_options(config: ProviderConfig, part: PartManifest | None) -> dict[str, str]:
    """ONNX Runtime TensorRT provider options for one part.

    fp16 when asked; INT8 for a Q/DQ part (explicit quantization: scales come from the graph, no
    calibration table); engine and timing caches under ``cache_dir``; the part's optimization profile
    pinned with explicit min/opt/max shapes, so TensorRT builds one engine for the whole range instead
    of rebuilding whenever a request's shape leaves the range it has seen. ``part`` None (a graph
    opened without its manifest record) leaves the profile to TensorRT's own shape tracking.
    """
    options = {
        "device_id": str(config.device_id),
        "trt_fp16_enable": _flag(config.fp16),
        "trt_int8_enable": _flag(part is not None and explicit_int8(part)),
    }
    if config.workspace_gb is not None:
        options["trt_max_workspace_size"] = str(int(config.workspace_gb * (1 << 30)))
    if config.cache_dir is not None:
        cache = str(Path(config.cache_dir))
        options |= {
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": cache,
        }
    return options if part is None else options | part_profile(part, config).ort_trt_options()


def ort_providers(config: ProviderConfig, part: PartManifest | None, chosen: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """``providers=`` for ``ort.InferenceSession``: each chosen provider with its options."""
    options = {CUDA_EP: cuda_options, TENSORRT_EP: lambda c: tensorrt_options(c, part)}
    return [(name, options[name](config) if name in options else {}) for name in chosen]


def warmup_feeds(part: PartManifest, config: ProviderConfig) -> dict[str, np.ndarray]:
    """Zeros at every input's static shape, or its profile's opt shape: the warm-up run's feeds."""
    profile = part_profile(part, config)
    dynamic = {p.name: p.opt for p in profile.inputs}
    return {
        spec.name: np.zeros(dynamic.get(spec.name, spec.shape), dtype=spec.dtype)
        for spec in part.inputs
    }


def _flag(value: bool) -> str:
    return "1" if value else "0"
