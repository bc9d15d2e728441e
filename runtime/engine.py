"""Engines: thin, stateless wrappers that run one graph on named numpy feeds.

An engine checks feed names and ranks against the graph's declared inputs, casts dtypes, and raises
``EngineIOError`` with expected vs. received; it does no pre/post-processing. ONNX Runtime and
TensorRT implement the same ``Engine`` protocol, so predictors never know which one they hold.

Decode loops can also hold an ``OrtBinding`` (``OrtEngine.binding()``): inputs and outputs bound to
the session's device as ORT values, so a KV cache returned by one call is fed to the next without a
round trip through numpy (on CUDA: without leaving the GPU). Engines without it keep ``run``.

Every ``from_bundle`` builds its engines through an ``EngineFactory`` (one bundle part in, one engine
out). The default, ``open_engine``, opens ONNX parts with ONNX Runtime (strictly: the provider asked
for or a ``ProviderError``), TensorRT engines as ``TrtEngine``s, and refuses other formats by name;
``OrtEngineFactory(config)`` is the same with a ``ProviderConfig`` (fallback allowed, TensorRT caches,
fp16). Triton's BLS calls plug in as another factory, not as another loader.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from conceptseg_edge.errors import EngineIOError, InputError, ManifestError
from conceptseg_edge.fileio import contained
from conceptseg_edge.manifest import BundleManifest, PartManifest, TensorSpec
from conceptseg_edge.runtime.providers import (  # the names --provider takes, re-exported for callers
    CPU_EP,
    PROVIDER_NAMES,  # noqa: F401
    PROVIDERS,  # noqa: F401
    Provider,  # noqa: F401
    ProviderConfig,
    SessionSettings,
    as_config,
    check_provider,
    check_session,
    ort_providers,
    session_entries,
    warmup_feeds,
)

if TYPE_CHECKING:
    from onnxruntime import OrtValue

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}

# ORT providers whose tensors live in CUDA memory: IO bindings allocate there.
_CUDA_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


class Engine(Protocol):
    """What a predictor needs from a compiled graph."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class BindableEngine(Engine, Protocol):
    """An engine that can also bind device-resident inputs and outputs (``OrtEngine``)."""

    def binding(self) -> OrtBinding: ...


def check_feeds(name: str, inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate names and ranks, cast dtypes; shared by every engine implementation."""
    expected = {t.name for t in inputs}
    missing = sorted(expected - set(feeds))
    extra = sorted(set(feeds) - expected)
    if missing or extra:
        raise EngineIOError(f"{name}: inputs expected {sorted(expected)}, missing {missing}, unexpected {extra}")
    return {spec.name: check_feed(name, spec, feeds[spec.name]) for spec in inputs}


def check_feed(name: str, spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """One feed: rank and fixed dims checked, cast to the declared dtype (no copy when it already is)."""
    value = np.asarray(value)
    if value.ndim != len(spec.shape):
        raise EngineIOError(f"{name}.{spec.name}: rank {value.ndim} (shape {value.shape}), expected shape {list(spec.shape)}")
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and value.shape[axis] != dim:
            raise EngineIOError(f"{name}.{spec.name}: shape {value.shape}, expected {list(spec.shape)}")
    return np.ascontiguousarray(value, dtype=spec.dtype)


class OrtEngine:
    """An ONNX Runtime session behind the ``Engine`` protocol.

    ``provider`` is the execution provider that runs the session (``session.get_providers()[0]``),
    never just the one asked for; ``part`` (the manifest's record, when the graph comes from a bundle)
    gives the TensorRT provider its profile and the warm-up run its shapes.

    Raises:
        ProviderError: the provider asked for is not available or did not start (unless fallback is allowed).
        EngineIOError: ONNX Runtime cannot load the file.
    """

    def __init__(self, path: str | Path, provider: str | ProviderConfig = "cpu", part: PartManifest | None = None) -> None:
        import onnxruntime as ort

        config = as_config(provider)
        chosen = check_provider(config, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=session_options(config.session), providers=ort_providers(config, part, chosen)
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types for corrupt files
            raise EngineIOError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        self.name = Path(path).stem
        self.session_settings = config.session  # what the session was opened with, for reports
        self.provider = check_session(config, chosen, self._session.get_providers(), str(path))
        self.inputs = tuple(self._spec(t) for t in self._session.get_inputs())
        self.outputs = tuple(self._spec(t) for t in self._session.get_outputs())
        self._output_names = [t.name for t in self.outputs]
        self.device = "cuda" if self.provider in _CUDA_PROVIDERS else "cpu"
        if self.provider != CPU_EP and part is not None and config.warmup:
            self._warm_up(warmup_feeds(part, config))

    def _warm_up(self, feeds: Mapping[str, np.ndarray]) -> None:
        """One run at load: TensorRT builds its engine (or loads it from the cache) and CUDA picks its
        kernels here, not inside the first timed request.

        Zeros are not valid data for every graph (the policy's vision graph divides by its image grid),
        so a failed warm-up is a warning that the first request pays the build, not a load failure.
        """
        try:
            self.run(feeds)
        except Exception as exc:  # ORT's own error types
            warnings.warn(
                f"{self.name}: warm-up on {self.provider} with zero feeds failed ({str(exc)[:200]}); "
                "the first request builds the engine",
                RuntimeWarning,
                stacklevel=3,
            )

    @staticmethod
    def _spec(arg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feeds(self.name, self.inputs, feeds)
        return dict(zip(self._output_names, self._session.run(self._output_names, checked)))

    def binding(self) -> OrtBinding:
        """A fresh IO binding on this session, for loops that feed outputs back as inputs."""
        return OrtBinding(self)


def session_options(settings: SessionSettings):
    """``settings`` as an ``ort.SessionOptions`` (ORT's log quieted: the exporter's shape-merge notes are not user errors)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = levels[settings.graph_optimization]
    options.enable_cpu_mem_arena = settings.cpu_mem_arena
    options.enable_mem_pattern = settings.mem_pattern
    for key, value in session_entries(settings).items():
        options.add_session_config_entry(key, value)
    return options


class EngineFactory(Protocol):
    """Builds the engine that runs one part of a bundle (``bundle_dir / part.file``) on ``provider``."""

    def __call__(self, bundle_dir: Path, part: PartManifest, provider: str | ProviderConfig) -> Engine: ...


def open_engine(bundle_dir: Path, part: PartManifest, provider: str | ProviderConfig) -> Engine:
    """The default ``EngineFactory``: an ``onnx`` part on ONNX Runtime, a ``tensorrt`` part as a
    ``TrtEngine``, any other format refused. A provider name is strict (no fallback); a
    ``ProviderConfig`` says whether falling back is allowed.

    Raises:
        ManifestError: the part's format is neither (naming the part and the format).
        ProviderError: the provider is not available here (see ``OrtEngine``).
    """
    if part.format == "tensorrt":
        from conceptseg_edge.runtime.trt_engine import open_trt_engine

        return open_trt_engine(bundle_dir, part, provider)
    if part.format != "onnx":
        raise ManifestError(
            f"parts.{part.name}.format: {part.format!r} cannot be opened (ONNX Runtime opens 'onnx', TensorRT "
            "'tensorrt'); pass an engine_factory that opens this format"
        )
    config = as_config(provider)
    if config.name != "cpu":  # the GPU providers' profiles and warm-up are sized by the bundle's dims
        config = config.for_bundle(bundle_dir)
    return OrtEngine(contained(bundle_dir, part.file, f"parts.{part.name}.file"), config, part)


@dataclass(frozen=True)
class OrtEngineFactory:
    """``open_engine`` with a ``ProviderConfig``: ``from_bundle(bundle, config.name, engine_factory=OrtEngineFactory(config))``.

    The provider a ``from_bundle`` passes on must be the config's: a factory never runs a part on a
    provider other than the one the caller named.
    """

    config: ProviderConfig

    def __call__(self, bundle_dir: Path, part: PartManifest, provider: str) -> Engine:
        if provider != self.config.name:
            raise InputError(f"provider '{provider}': this engine factory is configured for '{self.config.name}'")
        return open_engine(bundle_dir, part, self.config)


def engine_factory_for(config: ProviderConfig, manifest: BundleManifest | None = None) -> OrtEngineFactory:
    """The factory that opens parts on ``config``'s provider, after checking that the provider can run
    them: a command calls it before it loads anything, so a missing GPU provider fails (or, with
    ``allow_fallback``, warns) before any model runs.

    An engine bundle (``manifest`` with ``tensorrt`` parts) runs on TensorRT itself, not on an ONNX
    Runtime provider: it needs ``--provider tensorrt`` and the TensorRT and CUDA bindings, and no
    fallback can run a plan.

    Raises:
        ProviderError: the provider is not in this onnxruntime build and fallback is off.
        InputError: an engine bundle asked to run on another provider than ``tensorrt``.
        EngineUnavailableError: an engine bundle where TensorRT or cuda-python does not import.
    """
    if manifest is not None and any(part.format == "tensorrt" for part in manifest.parts.values()):
        from conceptseg_edge.runtime.trt_engine import import_cudart, import_tensorrt

        if config.name != "tensorrt":
            raise InputError(
                f"provider '{config.name}': this bundle holds TensorRT engines, which only TensorRT runs; "
                "pass --provider tensorrt, or use the ONNX bundle they were built from"
            )
        import_tensorrt()
        import_cudart()
        return OrtEngineFactory(config)
    import onnxruntime as ort

    check_provider(config, ort.get_available_providers())
    return OrtEngineFactory(config)


def open_part(
    bundle_dir: Path, manifest: BundleManifest, name: str, provider: str, engine_factory: EngineFactory
) -> Engine:
    """The engine of part ``name``, built by ``engine_factory`` and checked against the manifest.

    Raises:
        ManifestError: no such part, or the engine's inputs are not the ones the manifest declares
            (a graph swapped behind the manifest's back).
    """
    part = manifest.part(name)
    engine = engine_factory(Path(bundle_dir), part, provider)
    declared = sorted(t.name for t in part.inputs)
    if sorted(t.name for t in engine.inputs) != declared:
        raise ManifestError(
            f"{Path(bundle_dir) / part.file}: graph inputs {[t.name for t in engine.inputs]} != manifest {declared}"
        )
    return engine


class OrtBinding:
    """One session's inputs and outputs bound as ORT values on its device, reused call after call.

    ``session.run`` copies every output into a new numpy array and wraps every input again; in a
    decode loop that is the whole KV cache twice per token. Here an output (an ``OrtValue``) can be
    bound straight back as the next call's input, and ORT allocates each call's outputs afresh on
    the device, so values from earlier calls stay valid while the caller holds them.
    """

    def __init__(self, engine: OrtEngine) -> None:
        self._engine = engine
        self._session = engine._session
        self._binding = engine._session.io_binding()
        self._specs = {t.name: t for t in engine.inputs}
        self._bound: set[str] = set()
        self._keep: dict[str, np.ndarray] = {}  # host arrays ORT reads at run time (CPU binds in place)

    def bind(self, name: str, value: np.ndarray | OrtValue) -> None:
        """Bind one input: a numpy array (checked like ``run``'s feeds) or an ``OrtValue`` (as is)."""
        from onnxruntime import OrtValue

        if name not in self._specs:
            raise EngineIOError(f"{self._engine.name}: no input {name!r} (has {sorted(self._specs)})")
        if isinstance(value, OrtValue):
            self._binding.bind_ortvalue_input(name, value)
            self._keep.pop(name, None)
        else:
            array = check_feed(self._engine.name, self._specs[name], value)
            if self._engine.device == "cpu":
                self._binding.bind_cpu_input(name, array)
                self._keep[name] = array
            else:
                self._binding.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(array, self._engine.device, 0))
        self._bound.add(name)

    def run(self) -> dict[str, OrtValue]:
        """Run on the bound inputs; every output comes back as a new ``OrtValue`` on the device."""
        missing = sorted(set(self._specs) - self._bound)
        if missing:
            raise EngineIOError(f"{self._engine.name}: inputs not bound: {missing}")
        for name in self._engine._output_names:
            self._binding.bind_output(name, self._engine.device, 0)
        self._session.run_with_iobinding(self._binding)
        return dict(zip(self._engine._output_names, self._binding.get_outputs()))
