"""Engines: thin, stateless wrappers that run one graph on named numpy feeds.

An engine checks feed names and ranks against the graph's declared inputs, casts dtypes, and raises
``EngineIOError`` with expected vs. received; it does no pre/post-processing. ONNX Runtime and
TensorRT implement the same ``Engine`` protocol, so predictors never know which one they hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from conceptseg_edge.errors import EngineIOError, InputError
from conceptseg_edge.manifest import TensorSpec

# Provider names users type → ONNX Runtime execution providers, in fallback order.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}

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


class Engine(Protocol):
    """What a predictor needs from a compiled graph."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def check_feeds(name: str, inputs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate names and ranks, cast dtypes; shared by every engine implementation."""
    expected = {t.name for t in inputs}
    missing = sorted(expected - set(feeds))
    extra = sorted(set(feeds) - expected)
    if missing or extra:
        raise EngineIOError(f"{name}: inputs expected {sorted(expected)}, missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for spec in inputs:
        value = np.asarray(feeds[spec.name])
        if value.ndim != len(spec.shape):
            raise EngineIOError(
                f"{name}.{spec.name}: rank {value.ndim} (shape {value.shape}), expected shape {list(spec.shape)}"
            )
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and value.shape[axis] != dim:
                raise EngineIOError(f"{name}.{spec.name}: shape {value.shape}, expected {list(spec.shape)}")
        out[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
    return out


def resolve_providers(provider: str, available: Sequence[str]) -> list[str]:
    """Map a provider name to ORT providers present in this build, warning on each fallback."""
    if provider not in PROVIDERS:
        raise InputError(f"provider '{provider}': expected one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    chosen = [p for p in wanted if p in available]
    if wanted[0] not in available:
        warnings.warn(
            f"provider '{provider}' ({wanted[0]}) is not available in this onnxruntime build "
            f"(has {list(available)}); falling back to {chosen[0]}",
            RuntimeWarning,
            stacklevel=3,
        )
    return chosen


class OrtEngine:
    """An ONNX Runtime session behind the ``Engine`` protocol."""

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # shape-merge notes from the exporter are not user errors
        if threads:
            options.intra_op_num_threads = threads
        providers = resolve_providers(provider, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types for corrupt files
            raise EngineIOError(f"{path}: ONNX Runtime cannot load it ({exc})") from exc
        self.name = Path(path).stem
        self.provider = self._session.get_providers()[0]
        self.inputs = tuple(self._spec(t) for t in self._session.get_inputs())
        self.outputs = tuple(self._spec(t) for t in self._session.get_outputs())
        self._output_names = [t.name for t in self.outputs]

    @staticmethod
    def _spec(arg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
        return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_feeds(self.name, self.inputs, feeds)
        return dict(zip(self._output_names, self._session.run(self._output_names, checked)))
