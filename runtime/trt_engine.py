"""TensorRT engines behind the runtime's ``Engine`` protocol, and the check that an engine fits this machine.

A serialized TensorRT engine (``.plan``) runs only on the TensorRT release that built it and on a GPU of
the compute capability it was built for, unless it was built version- or hardware-compatible. TensorRT
itself finds a mismatch only inside ``deserialize_cuda_engine``, as a log line and a ``None``; here the
engine's manifest record (``EngineInfo``) is compared with the machine first (``check_engine_compatible``,
pure, so it is tested without a GPU) and a mismatch is refused with the recorded and found values and the
commands that rebuild the engine.

``tensorrt`` and the CUDA Python bindings (cuda-python's ``cuda.bindings.runtime``) are optional: they are
imported inside functions, and a missing one is an ``EngineUnavailableError`` that says what to install,
never an ImportError traceback. Every CUDA runtime call returns ``(error, value...)``; each is checked and
a failure is an ``EngineRunError`` naming the call.

Written against the TensorRT 10 Python API (``ICudaEngine.num_io_tensors`` / ``get_tensor_name`` /
``get_tensor_mode`` / ``get_tensor_dtype`` / ``get_tensor_location``, ``IExecutionContext.set_input_shape``
/ ``set_tensor_address`` / ``get_tensor_shape`` / ``execute_async_v3``), as TensorRT's
``samples/python/common_runtime.py`` and polygraphy's ``TrtRunner`` use it.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from conceptseg_edge.errors import (
    EngineCompatibilityError,
    EngineIOError,
    EngineRunError,
    EngineUnavailableError,
    InputError,
    ManifestError,
)
from conceptseg_edge.fileio import contained
from conceptseg_edge.manifest import EngineInfo, PartManifest, TensorSpec
from conceptseg_edge.profiles import InputProfile
from conceptseg_edge.runtime.engine import check_feeds
from conceptseg_edge.runtime.providers import ProviderConfig, as_config

TENSORRT_MISSING = "tensorrt not importable: install conceptseg-edge[gpu] (on Jetson: JetPack's python3-libnvinfer)"
CUDA_MISSING = "cuda-python not importable: install conceptseg-edge[gpu] (cuda-python, the CUDA runtime bindings)"

# The builder flag (as ``EngineInfo.builder_flags`` records TensorRT's names) of a version-compatible engine.
VERSION_COMPATIBLE_FLAG = "BuilderFlag.VERSION_COMPATIBLE"

# TensorRT DataType (by enum name) → numpy dtype name. BF16, FP8, INT4 and FP4 have no numpy dtype: an
# engine with such an input or output is refused at load, naming the tensor.
_NUMPY_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or an ``EngineUnavailableError`` saying how to install it.

    A ``tensorrt`` package whose libnvinfer fails to load raises ImportError or OSError on import; both
    are reported the same way, with TensorRT's own words after the install hint.
    """
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
        raise EngineUnavailableError(f"{TENSORRT_MISSING}; {exc}") from exc
    return tensorrt


def import_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except (ImportError, OSError):
        try:
            from cuda import cudart as runtime
        except (ImportError, OSError) as exc:
            raise EngineUnavailableError(f"{CUDA_MISSING}; {exc}") from exc
    return runtime


def cuda_call(cudart: ModuleType, call: str, result: tuple[Any, ...]) -> Any:
    """The value of one CUDA runtime call's ``(error, value...)`` result; an ``EngineRunError`` naming
    ``call`` and CUDA's error name and text when the error is not ``cudaSuccess``."""
    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(error)[1]
        text = cudart.cudaGetErrorString(error)[1]
        raise EngineRunError(f"{call}: {_text(name)} ({_text(text)})")
    return values[0] if len(values) == 1 else tuple(values) or None


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class TrtMachine:
    """What an engine must match on the machine that runs it (compare ``EngineInfo``)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100/H200)


def cuda_device(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of CUDA device ``device``, from ``cudaGetDeviceProperties``.

    Raises:
        EngineUnavailableError: the CUDA Python bindings do not import.
        EngineRunError: CUDA cannot describe the device (no driver, no such device), naming the call.
    """
    cudart = import_cudart()
    prop = cuda_call(cudart, f"cudaGetDeviceProperties({device})", cudart.cudaGetDeviceProperties(device))
    return _text(prop.name).rstrip("\x00"), f"{prop.major}.{prop.minor}"


def trt_machine(device: int = 0) -> TrtMachine:
    """This machine as an engine sees it: the TensorRT that imports here and CUDA device ``device``."""
    trt = import_tensorrt()
    name, capability = cuda_device(device)
    return TrtMachine(trt.__version__, name, capability)


def _release(version: str) -> tuple[int, ...] | None:
    """``"10.3.0.26"`` → (10, 3, 0, 26); None for a string that is not dotted integers."""
    return tuple(int(p) for p in version.split(".")) if re.fullmatch(r"\d+(\.\d+)*", version) else None


def _same_release(built: str, found: str) -> bool:
    """Major.minor.patch equal (and the build number too when both versions carry one), as TensorRT
    requires of a plan that was not built version-compatible ("expecting library version X got Y")."""
    a, b = _release(built), _release(found)
    if a is None or b is None:
        return built == found
    return a[:3] == b[:3] and (len(a) < 4 or len(b) < 4 or a[3] == b[3])


def version_compatible(info: EngineInfo) -> bool:
    """Whether the engine was built with TensorRT's version-compatibility flag (trtexec ``--versionCompatible``)."""
    return VERSION_COMPATIBLE_FLAG in info.builder_flags


def _version_problem(info: EngineInfo, machine: TrtMachine) -> str | None:
    """Why this TensorRT cannot deserialize the engine, or None.

    TensorRT's "Version Compatibility" section: by default an engine runs only on the TensorRT version
    that built it; one built with ``VERSION_COMPATIBLE`` (from 8.6 on, running on 8.6 or later) runs on
    later versions too, never on earlier ones.
    """
    built, found = info.tensorrt_version, machine.tensorrt_version
    if not version_compatible(info):
        if _same_release(built, found):
            return None
        return (f"built with TensorRT {built}, this machine has TensorRT {found} (an engine runs only on the "
                "TensorRT release that built it)")
    a, b = _release(built), _release(found)
    if a is not None and b is not None and (8, 6) <= a[:3] <= b[:3]:
        return None
    return (f"built version-compatible with TensorRT {built}, this machine has TensorRT {found} (such an "
            "engine runs on the release that built it or a later one, from 8.6 on)")


def _hardware_problem(info: EngineInfo, machine: TrtMachine) -> str | None:
    """Why this GPU cannot run the engine, or None; TensorRT's ``HardwareCompatibilityLevel`` (NvInfer.h):

    * ``none``: only the GPU architecture it was built on. TensorRT refuses another compute capability
      ("expecting compute X got compute Y"); another GPU model of the same capability deserializes with
      TensorRT's warning that this may affect performance or even cause errors, and so it does here.
    * ``ampere_plus``: Ampere and newer GPUs (compute capability 8.0 and up); only an engine built on one.
    * ``same_compute_capability`` (TensorRT 10.9+): GPUs of the compute capability it was built on.
    """
    built, found = info.compute_capability, machine.compute_capability
    level = info.hardware_compatibility
    where = f"this GPU ({machine.gpu_name}) is {found}"
    if level == "ampere_plus":
        if _capability(built) < (8, 0):
            return f"recorded hardware compatibility 'ampere_plus' on compute capability {built}, which is not Ampere or newer"
        if _capability(found) < (8, 0):
            return f"built for Ampere and newer GPUs (hardware compatibility 'ampere_plus'); {where}, older than Ampere (8.0)"
        return None
    if built != found:
        return f"built for compute capability {built} ({info.gpu_name}, hardware compatibility '{level}'); {where}"
    if level == "none" and info.gpu_name != machine.gpu_name:
        warnings.warn(
            f"engine built on {info.gpu_name}, running on {machine.gpu_name} (same compute capability {found}): "
            "TensorRT deserializes it but warns this may affect performance or even cause errors; rebuild it here",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


def _capability(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def rebuild_commands(info: EngineInfo, recipe_text: str, bundle: str | Path = "ENGINE_BUNDLE") -> str:
    """How to rebuild the engine on this machine: its recipe in ``bundle`` (the engine bundle, which keeps
    the ONNX graph each engine was built from), and the ``conceptseg-edge export tensorrt`` command that
    rebuilds the whole bundle with this part's recorded precision, workspace, hardware compatibility and profile."""
    part = info.profile.part
    export = ["conceptseg-edge export tensorrt ONNX_BUNDLE --out ENGINE_BUNDLE", f"--precision {info.precision}"]
    if info.workspace_gb is not None:
        export.append(f"--workspace {info.workspace_gb:g}")
    if info.hardware_compatibility != "none":
        export.append(f"--hardware-compatibility {info.hardware_compatibility}")
    export += [f"--profile {_override(part, p)}" for p in info.profile.inputs]
    recipe = shlex.quote(str(Path(bundle) / info.recipe))
    return (f"Rebuild it on this machine: bash {recipe}, which runs {_trtexec_line(recipe_text)}; "
            f"or rebuild the bundle from the ONNX bundle whose {part} graph has sha256 {info.onnx_sha256[:12]}...: "
            + " ".join(export))


def _override(part: str, profile: InputProfile) -> str:
    """``PART:INPUT=MIN,OPT,MAX`` as ``--profile`` reads it (``profiles.parse_profile_override``)."""
    shapes = ("x".join(str(d) for d in shape) for shape in (profile.min, profile.opt, profile.max))
    return f"{part}:{profile.name}=" + ",".join(shapes)


def _trtexec_line(recipe_text: str) -> str:
    """The recipe's ``trtexec`` command as one line (backslash continuations joined); the whole recipe
    when no line runs trtexec."""
    logical = re.sub(r"\\\r?\n", " ", recipe_text).splitlines()
    commands = [" ".join(line.split()) for line in logical if "trtexec" in line and not line.lstrip().startswith("#")]
    if commands:
        return " && ".join(commands)
    return " ".join(recipe_text.split()) or "(the recipe is empty)"


def check_engine_compatible(
    info: EngineInfo, machine: TrtMachine, recipe_text: str, bundle: str | Path = "ENGINE_BUNDLE"
) -> None:
    """Refuse an engine that ``machine`` cannot deserialize, before TensorRT tries.

    Pure: compares the manifest's record with ``machine`` (``trt_machine()`` on the running machine);
    ``recipe_text`` is the engine's trtexec recipe and ``bundle`` the directory holding it.
    Another GPU model of the same compute capability under hardware compatibility ``none`` is a
    ``RuntimeWarning``, as it is in TensorRT.

    Raises:
        EngineCompatibilityError: the TensorRT version or the compute capability does not fit, naming
            the recorded and found values and giving the rebuild commands (``rebuild_commands``).
    """
    problems = [p for p in (_version_problem(info, machine), _hardware_problem(info, machine)) if p]
    if problems:
        raise EngineCompatibilityError(
            f"{info.profile.part}: this TensorRT engine cannot run here: {'; '.join(problems)}. "
            + rebuild_commands(info, recipe_text, bundle)
        )


def _read_recipe(bundle: Path, part: PartManifest) -> str:
    """The text of ``part``'s trtexec recipe (``engine.recipe``, inside ``bundle``)."""
    assert part.engine is not None
    recipe = contained(bundle, part.engine.recipe, f"parts.{part.name}.engine.recipe")
    try:
        return recipe.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"parts.{part.name}.engine.recipe: cannot read {recipe} ({exc})") from exc


@dataclass
class _DeviceBuffer:
    ptr: int
    nbytes: int


class TrtEngine:
    """A deserialized TensorRT engine behind the ``Engine`` protocol: numpy in, numpy out.

    ``inputs``/``outputs`` are the manifest's (the engine's IO names and dtypes are checked against
    them at load); ``provider`` says what runs it ("TensorRT 10.3.0"). Each ``run`` checks feeds like
    every engine (``check_feeds``) and their shapes against the engine's optimization profile, copies
    inputs to device buffers on one CUDA stream, runs ``execute_async_v3`` and copies outputs back.
    Device buffers are allocated once per tensor and reused call after call; a larger shape grows one.
    ``close()`` (or garbage collection) frees them and the stream.

    ``bundle_dir`` (default: the engine file's directory) holds the engine's trtexec recipe, quoted by a
    compatibility refusal; ``device`` is the CUDA device that runs it.

    Raises:
        EngineUnavailableError: tensorrt or the CUDA bindings do not import.
        EngineCompatibilityError: the engine was built for another TensorRT or GPU (before deserializing).
        ManifestError: the part records no engine, its recipe cannot be read, or the engine's IO differs
            from the manifest's.
        EngineRunError: CUDA or TensorRT refused a call (named).
    """

    def __init__(self, path: str | Path, part: PartManifest, *, bundle_dir: str | Path | None = None, device: int = 0) -> None:
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._stream: Any = None
        self._context: Any = None
        if part.engine is None:
            raise ManifestError(f"parts.{part.name}.engine: a TensorRT part must record how its engine was built")
        trt = import_tensorrt()
        self._cudart = import_cudart()
        machine = trt_machine(device)
        bundle = Path(path).parent if bundle_dir is None else Path(bundle_dir)
        check_engine_compatible(part.engine, machine, _read_recipe(bundle, part), bundle)
        self._trt = trt
        self.name = part.name
        self.inputs: tuple[TensorSpec, ...] = part.inputs
        self.outputs: tuple[TensorSpec, ...] = part.outputs
        self.provider = f"TensorRT {machine.tensorrt_version}"
        self._profile = part.engine.profile
        self._device = device
        self._cuda(f"cudaSetDevice({device})", self._cudart.cudaSetDevice(device))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if version_compatible(part.engine):
            # The plan carries TensorRT's lean runtime, which this process then runs: TensorRT asks the
            # caller to trust the plan; its hash was checked against the manifest when the bundle loaded.
            self._runtime.engine_host_code_allowed = True
        self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self._engine is None:
            raise EngineRunError(f"{path}: TensorRT could not deserialize the engine (its log above says why)")
        self._host = self._check_io(path)
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineRunError(f"{path}: TensorRT could not create an execution context (its log above says why)")
        self._stream = self._cuda("cudaStreamCreate()", self._cudart.cudaStreamCreate())

    def _cuda(self, call: str, result: tuple[Any, ...]) -> Any:
        return cuda_call(self._cudart, call, result)

    def _check_io(self, path: str | Path) -> frozenset[str]:
        """Compare the engine's IO names, directions and dtypes with the manifest's; return the names of
        tensors TensorRT keeps in host memory (shape-tensor inputs: ``get_tensor_location`` is HOST)."""
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = sorted(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        declared_in = sorted(t.name for t in self.inputs)
        declared_out = sorted(t.name for t in self.outputs)
        if inputs != declared_in or outputs != declared_out:
            raise ManifestError(
                f"{path}: engine inputs {inputs}, outputs {outputs} != manifest inputs {declared_in}, outputs {declared_out}"
            )
        for spec in (*self.inputs, *self.outputs):
            kind = engine.get_tensor_dtype(spec.name)
            dtype = _NUMPY_DTYPES.get(kind.name)
            if dtype is None:
                raise ManifestError(f"{path}: tensor {spec.name!r} is TensorRT {kind.name}, which numpy cannot hold")
            if np.dtype(dtype) != np.dtype(spec.dtype):
                raise ManifestError(f"{path}: tensor {spec.name!r} is {dtype} in the engine, {spec.dtype} in the manifest")
        return frozenset(n for n in names if engine.get_tensor_location(n) == trt.TensorLocation.HOST)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference: (N-d numpy arrays by input name) → numpy arrays by output name.

        Raises:
            EngineIOError: a feed's name, rank or fixed dim is wrong (``check_feeds``), or the engine is closed.
            InputError: a feed's shape is outside the engine's optimization profile, naming the input.
            EngineRunError: TensorRT or CUDA refused a call (named).
        """
        if self._stream is None:
            raise EngineIOError(f"{self.name}: the TensorRT engine is closed")
        checked = check_feeds(self.name, self.inputs, feeds)
        self._profile.check({name: value.shape for name, value in checked.items()})
        cudart, context, stream = self._cudart, self._context, self._stream
        # The engine, its stream and buffers live on its device; another engine may have made another current.
        self._cuda(f"cudaSetDevice({self._device})", cudart.cudaSetDevice(self._device))
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, value in checked.items():
            if not context.set_input_shape(name, value.shape):
                raise EngineRunError(f"{self.name}.{name}: TensorRT refused input shape {value.shape}")
            if name in self._host:  # TensorRT reads it from host memory; `checked` keeps it alive through the run
                self._address(name, value.ctypes.data)
                continue
            ptr = self._device_buffer(name, value.nbytes)
            self._address(name, ptr)
            if value.nbytes:
                self._cuda(f"cudaMemcpyAsync({self.name}.{name}, host to device)",
                           cudart.cudaMemcpyAsync(ptr, value.ctypes.data, value.nbytes, h2d, stream))
        results: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EngineRunError(
                    f"{self.name}.{spec.name}: output shape {shape} depends on input values; TrtEngine needs "
                    "output shapes that follow from input shapes"
                )
            results[spec.name] = out = np.empty(shape, dtype=spec.dtype)
            self._address(spec.name, out.ctypes.data if spec.name in self._host else self._device_buffer(spec.name, out.nbytes))
        if not context.execute_async_v3(int(stream)):
            raise EngineRunError(f"{self.name}: TensorRT execute_async_v3 failed (its log above says why)")
        for name, out in results.items():
            if out.nbytes and name not in self._host:
                self._cuda(f"cudaMemcpyAsync({self.name}.{name}, device to host)",
                           cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name].ptr, out.nbytes, d2h, stream))
        self._cuda(f"cudaStreamSynchronize({self.name})", cudart.cudaStreamSynchronize(stream))
        return results

    def _address(self, name: str, ptr: int) -> None:
        if not self._context.set_tensor_address(name, ptr):
            raise EngineRunError(f"{self.name}.{name}: TensorRT refused the tensor address")

    def _device_buffer(self, name: str, nbytes: int) -> int:
        """The device buffer of tensor ``name``, grown to ``nbytes`` if smaller; at least one byte, so a
        zero-size tensor (no points on the concept routes) still gets the non-null address TensorRT requires."""
        held = self._buffers.get(name)
        if held is None or held.nbytes < nbytes:
            if held is not None:
                del self._buffers[name]
                self._cuda(f"cudaFree({self.name}.{name})", self._cudart.cudaFree(held.ptr))
            size = max(nbytes, 1)
            held = _DeviceBuffer(self._cuda(f"cudaMalloc({size}) for {self.name}.{name}", self._cudart.cudaMalloc(size)), size)
            self._buffers[name] = held
        return held.ptr

    def device_addresses(self) -> dict[str, int]:
        """The device buffer in use per tensor name: the same addresses call after call until a larger
        shape grows a buffer."""
        return {name: buffer.ptr for name, buffer in self._buffers.items()}

    def close(self) -> None:
        """Free the device buffers and the stream and release the TensorRT objects; ``run`` then refuses."""
        if self._stream is None and not self._buffers:
            return
        buffers, self._buffers = self._buffers, {}
        stream, self._stream = self._stream, None
        self._context = None
        for name, buffer in buffers.items():
            self._cuda(f"cudaFree({self.name}.{name})", self._cudart.cudaFree(buffer.ptr))
        if stream is not None:
            self._cuda(f"cudaStreamDestroy({self.name})", self._cudart.cudaStreamDestroy(stream))

    def __del__(self) -> None:
        # Best effort: at interpreter exit the CUDA bindings may already be torn down.
        with contextlib.suppress(Exception):
            self.close()


def open_trt_engine(bundle_dir: Path, part: PartManifest, provider: str | ProviderConfig) -> TrtEngine:
    """The ``EngineFactory`` for a ``tensorrt`` part: its engine on TensorRT, the only provider that runs one.

    Raises:
        ManifestError: the part is not a TensorRT engine, records no build, or its file or recipe leaves the bundle.
        InputError: ``provider`` (a name, or a ``ProviderConfig`` whose ``device_id`` picks the GPU) is not
            ``tensorrt``: an engine cannot run on ONNX Runtime, and no fallback can run it either.
        EngineUnavailableError, EngineCompatibilityError, EngineRunError: see ``TrtEngine``.
    """
    config = as_config(provider)
    if part.format != "tensorrt" or part.engine is None:
        raise ManifestError(f"parts.{part.name}: format {part.format!r} with no engine record is not a TensorRT engine")
    if config.name != "tensorrt":
        raise InputError(
            f"provider '{config.name}': part {part.name} of this bundle is a TensorRT engine, which only TensorRT "
            "runs; pass --provider tensorrt, or use the ONNX bundle it was built from"
        )
    path = contained(bundle_dir, part.file, f"parts.{part.name}.file")
    return TrtEngine(path, part, bundle_dir=bundle_dir, device=config.device_id)
