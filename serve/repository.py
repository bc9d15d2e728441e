"""``triton build``: a bundle → a Triton model repository, written atomically.

Two flavors:

- ``python``: one python-backend model ``conceptseg`` running the torch-free runtime (router +
  ONNX Runtime engines) in its own process. The bundle is copied into ``conceptseg/1/bundle``
  (hard links when the filesystem allows) or referenced by absolute path (``bundle_mode="reference"``).
  Runs on any Triton with the python backend, including the ``nvidia-pytriton`` wheel's.
- ``native``: every bundle part becomes its own model (``onnxruntime_onnx`` or ``tensorrt_plan``,
  named after the part), with dynamic batching when every input and output of the part shares one
  symbolic leading axis; ``conceptseg`` becomes a BLS python model that runs the same router,
  predictor and concept encoder, calling the graph models (SAM2 encoder/decoder, CTM, policy vision /
  embed / decoder) for every graph run. This is the one for the NGC Triton container on GPUs. ``graph_backend="python"`` serves the graphs with ONNX Runtime under the
  python backend instead, for a server without the onnxruntime backend (and for tests here).

The bundle decides the flavor when none is given: an engine bundle (parts of format ``tensorrt``, from
``export tensorrt``) builds the native flavor, each engine a ``tensorrt_plan`` model (``model.plan``,
``KIND_GPU``) whose dims and ``max_batch_size`` are read from the engine's optimization profile
(``plan_model_config``) and which warms up at the profile's opt shapes; such a bundle on ``--device cpu``
is refused. Any other bundle builds the python flavor.

A python-flavor bundle with the video parts (``export sam2 --video`` / ``export concept --video``) also gets
``conceptseg_stream``: video tracking per stream under Triton's sequence batcher (``stream_model_config``;
the logic is ``conceptseg_edge.serve.streams``).

Every ``config.pbtxt`` is generated from a ``ModelConfig`` derived from the bundle manifest (IO names,
dtypes, symbolic shapes are never re-typed) and parsed back with Triton's own protobuf before it is
written. ``conceptseg_repository.json`` at the root records what was built from what; Triton ignores
files at the repository root.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

from conceptseg_edge.errors import InputError, ManifestError
from conceptseg_edge.fileio import contained, sha256_file, staged_dir, write_json, write_text
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import MANIFEST_NAME, BundleManifest, Dim, PartManifest, check_keys, load_bundle, tool_versions
from conceptseg_edge.profiles import InputProfile
from conceptseg_edge.runtime.engine import Provider
from conceptseg_edge.runtime.tracker import VIDEO_PARTS  # all present → the stream model is built
from conceptseg_edge.serve.model_config import (
    TRITON_TYPES,
    DynamicBatching,
    InstanceGroup,
    ModelConfig,
    ModelWarmup,
    SequenceBatching,
    TensorConfig,
    WarmupInput,
    validate_pbtxt,
)
from conceptseg_edge.serve.parameters import GraphParameters, RouterParameters, StreamParameters
from conceptseg_edge.serve.protocol import INPUTS, MODEL_NAME, OUTPUTS, ServeLimits
from conceptseg_edge.serve.stream_protocol import STREAM_INPUTS, STREAM_MODEL_NAME, STREAM_OUTPUTS, stream_controls

Flavor = Literal["python", "native"]
Device = Literal["cpu", "gpu"]
GraphBackend = Literal["onnxruntime", "python"]
BundleMode = Literal["copy", "reference"]
# The names ``triton build`` accepts (its ``choices=``), in the order help lists them.
FLAVORS: tuple[Flavor, ...] = get_args(Flavor)
DEVICES: tuple[Device, ...] = get_args(Device)
GRAPH_BACKENDS: tuple[GraphBackend, ...] = get_args(GraphBackend)
BUNDLE_MODES: tuple[BundleMode, ...] = get_args(BundleMode)
REPOSITORY_MANIFEST = "conceptseg_repository.json"
REPOSITORY_SCHEMA_VERSION = 1
DEFAULT_NATIVE_MAX_BATCH = 8
VERSION = "1"

_KIND: dict[Device, str] = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_PROVIDER: dict[Device, Provider] = {"cpu": "cpu", "gpu": "cuda"}  # the ONNX Runtime provider on each device
_PLATFORM = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
PLAN_FILE = "model.plan"  # the tensorrt backend's default model file name
# Inputs whose zeros are no valid sample: an engine taking one gets no model_warmup (its first request pays
# the warm-up instead). Qwen2.5-VL's grid (t, h, w) divides the patch indices: a zero grid divides by zero
# and gathers out of bounds on the GPU, which can take the server's CUDA context down with it.
NO_ZERO_WARMUP = frozenset({"image_grid_thw"})

# The python backend's model.py files. Both are glue only; the logic is conceptseg_edge.serve.serving.
_PRELUDE = '''\
import json
import os
import site

import triton_python_backend_utils as pb_utils

# `conceptseg-edge triton serve` lists the launching interpreter's site dirs here, so the stub finds
# conceptseg-edge (editable installs included) even when its own Python is another build.
for _dir in filter(None, os.environ.get("CONCEPTSEG_EDGE_SITE", "").split(os.pathsep)):
    site.addsitedir(_dir)


def _params(args):
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _error(code, message):
    enum = getattr(pb_utils.TritonError, code, None)
    return pb_utils.TritonError(message) if enum is None else pb_utils.TritonError(message, enum)


def _respond(outputs, error):
    if error is not None:
        return pb_utils.InferenceResponse(output_tensors=[], error=_error(*error))
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
'''

ROUTER_MODEL_PY = '''\
"""conceptseg: the conceptseg-edge router model. Generated by `conceptseg-edge triton build`; do not edit.

Imports only the torch-free runtime. Every bad request gets its own error response (INVALID_ARG for
the caller's mistakes, INTERNAL otherwise); nothing a request carries can take the model down.
"""

''' + _PRELUDE + '''
from conceptseg_edge.serve.serving import ServedModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.model = ServedModel.from_parameters(_params(args), version_dir, pb_utils)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = {t.name(): t.as_numpy() for t in request.inputs()}
            responses.append(_respond(*self.model.respond(tensors)))
        return responses
'''

GRAPH_MODEL_PY = '''\
"""One bundle graph under the python backend (ONNX Runtime). Generated by `conceptseg-edge triton build`."""

''' + _PRELUDE + '''
from conceptseg_edge.serve.serving import GraphModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.model = GraphModel.from_parameters(_params(args), version_dir, args["model_name"])

    def execute(self, requests):
        feeds = [{t.name(): t.as_numpy() for t in request.inputs()} for request in requests]
        return [_respond(*result) for result in self.model.run_many(feeds)]
'''

STREAM_MODEL_PY = '''\
"""conceptseg_stream: video tracking per sequence id. Generated by `conceptseg-edge triton build`; do not edit.

Triton's sequence batcher fills the START / END / READY / CORRID control inputs; each request is one
frame of one stream and gets its own response or its own error.
"""

''' + _PRELUDE + '''
from conceptseg_edge.serve.streams import StreamModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.model = StreamModel.from_parameters(_params(args), version_dir)

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = {t.name(): t.as_numpy() for t in request.inputs()}
            responses.append(_respond(*self.model.respond(tensors, request.correlation_id())))
        return responses
'''


@dataclass(frozen=True)
class RepositoryConfig:
    """Arguments of ``conceptseg-edge triton build``."""

    flavor: Flavor | None = field(default=None, metadata={
        "help": "python (runtime in one model) or native (graphs + BLS); default: native for an engine bundle, else python"})
    max_batch: int | None = field(default=None, metadata={"help": "native: max_batch_size of batchable graphs (default 8, or an engine's profile max)"})
    instances: int = field(default=1, metadata={"help": "instances per model (instance_group count)"})
    device: Device | None = field(default=None, metadata={"help": "cpu or gpu (default: python→cpu, native→gpu; engines need gpu)"})
    bundle_mode: BundleMode = field(default="copy", metadata={"help": "python flavor: copy the bundle in, or reference it"})
    graph_backend: GraphBackend = field(default="onnxruntime", metadata={"help": "native: onnxruntime (platform) or python (ORT in python backend)"})
    limits: ServeLimits = field(default_factory=ServeLimits, metadata={"help": "per-request limits"})
    warmup: bool = field(default=True, metadata={"help": "warm up at load time (router request, engines' model_warmup)"})
    bank_dir: str | None = field(default=None, metadata={"help": "concept bank directory (shortcut route)"})
    generation: GenerationConfig | None = field(default=None, metadata={"help": "reason route generation budget (default: the runtime's)"})
    max_streams: int = field(default=16, metadata={"help": "stream model: most live video streams per instance"})
    stream_idle_s: float = field(default=30.0, metadata={"help": "stream model: free a stream idle this many seconds"})

    def __post_init__(self) -> None:
        if self.flavor is not None and self.flavor not in FLAVORS:
            raise InputError(f"--flavor {self.flavor}: expected one of {', '.join(FLAVORS)}")
        if self.device is not None and self.device not in DEVICES:
            raise InputError(f"--device {self.device}: expected one of {', '.join(DEVICES)}")
        if not isinstance(self.instances, int) or self.instances < 1:
            raise InputError(f"--instances {self.instances}: expected an int >= 1")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 0):
            raise InputError(f"--max-batch {self.max_batch}: expected an int >= 0")
        if self.flavor == "python" and self.max_batch:
            raise InputError(
                f"--max-batch {self.max_batch}: the python flavor serves one image per request (images differ in "
                "size, a batch would be padding); batching applies to --flavor native"
            )
        if self.bundle_mode not in BUNDLE_MODES:
            raise InputError(f"bundle_mode {self.bundle_mode!r}: expected one of {BUNDLE_MODES}")
        if self.graph_backend not in GRAPH_BACKENDS:
            raise InputError(f"--graph-backend {self.graph_backend}: expected one of {', '.join(GRAPH_BACKENDS)}")
        if isinstance(self.max_streams, bool) or not isinstance(self.max_streams, int) or self.max_streams < 1:
            raise InputError(f"--max-streams {self.max_streams}: expected an int >= 1")
        if isinstance(self.stream_idle_s, bool) or not isinstance(self.stream_idle_s, (int, float)) or not self.stream_idle_s >= 1e-3:
            raise InputError(f"--stream-idle-s {self.stream_idle_s}: expected seconds >= 0.001")

    @property
    def resolved_device(self) -> Device:
        return self.device or ("gpu" if self.flavor == "native" else "cpu")

    def for_bundle(self, manifest: BundleManifest) -> RepositoryConfig:
        """This config with the flavor the bundle decides when none was given, and the device checked against it.

        An engine bundle (any part of format ``tensorrt``) builds the native flavor, whose graph models are
        ``tensorrt_plan``; any other bundle the python flavor. TensorRT engines run on a GPU only, so an
        engine bundle on cpu (``--device cpu``, or the python flavor's default) is an ``InputError``.
        """
        engines = sorted(name for name, part in manifest.parts.items() if part.format == "tensorrt")
        cfg = self if self.flavor is not None else dataclasses.replace(self, flavor="native" if engines else "python")
        if engines and cfg.resolved_device == "cpu":
            given = "--device cpu" if cfg.device else f"--flavor {cfg.flavor} (on cpu unless --device gpu)"
            raise InputError(f"{given}: parts {engines} are TensorRT engines, which run on a GPU only; build with "
                             "--device gpu, or build a CPU server from the ONNX bundle the engines came from")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The ``config`` of ``conceptseg_repository.json``: the flags, flavor resolved (``max_new_tokens`` flat)."""
        out = dataclasses.asdict(self)
        del out["generation"]
        out["max_new_tokens"] = None if self.generation is None else self.generation.max_new_tokens
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RepositoryConfig:
        """The ``config`` that ``to_dict`` wrote (``max_new_tokens`` for ``generation``), read strictly."""
        if isinstance(data, dict) and "max_new_tokens" in data:
            data = {k: v for k, v in data.items() if k != "max_new_tokens"} | {"generation": data["max_new_tokens"]}
        data = dict(check_keys(data, cls, where))
        try:
            if data.get("generation") is not None:
                data["generation"] = GenerationConfig(data["generation"])
            if "limits" in data:
                data["limits"] = ServeLimits(**check_keys(data["limits"], ServeLimits, f"{where}.limits"))
            return cls(**data)
        except InputError as exc:
            raise ManifestError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class ServedModelRecord:
    """One model of a built repository: what it does, how it runs, and (graph models) which part it serves."""

    role: str
    backend: str  # "python", or the graph model's platform
    max_batch_size: int
    instances: int
    dynamic_batching: bool | None = None  # graph models only
    part: str | None = None  # graph models only

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "backend": self.backend, "max_batch_size": self.max_batch_size}
        if self.part is not None:
            out |= {"dynamic_batching": self.dynamic_batching, "part": self.part}
        return out | {"instances": self.instances}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ServedModelRecord:
        return cls(**check_keys(data, cls, where))


@dataclass(frozen=True)
class BundleRecord:
    """The bundle a repository was built from."""

    source: str  # absolute path at build time
    mode: str  # python flavor: copy / reference; native: split (graphs in their models)
    model: str
    manifest_sha256: str
    routes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"routes": list(self.routes)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BundleRecord:
        data = check_keys(data, cls, where)
        return cls(**{**data, "routes": tuple(data["routes"])})


@dataclass(frozen=True)
class RepositoryManifest:
    """What ``conceptseg_repository.json`` records about a built repository."""

    flavor: Flavor
    models: Mapping[str, ServedModelRecord]  # model name → record
    routes: tuple[str, ...]
    bundle: BundleRecord
    config: RepositoryConfig
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    schema_version: int = REPOSITORY_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "flavor": self.flavor,
            "models": {name: record.to_dict() for name, record in self.models.items()},
            "routes": list(self.routes),
            "bundle": self.bundle.to_dict(),
            "config": self.config.to_dict(),
            "created": self.created,
            "versions": dict(self.versions),
            "schema_version": self.schema_version,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> RepositoryManifest:
        if isinstance(data, dict) and data.get("schema_version") != REPOSITORY_SCHEMA_VERSION:
            raise ManifestError(f"{where}: schema_version {data.get('schema_version')!r}, this reads {REPOSITORY_SCHEMA_VERSION}; rebuild")
        data = check_keys(data, cls, where)
        models = data["models"]
        if not isinstance(models, dict):
            raise ManifestError(f"{where}.models: expected an object, got {type(models).__name__}")
        return cls(
            **{
                **data,
                "models": {name: ServedModelRecord.from_dict(m, f"{where}.models.{name}") for name, m in models.items()},
                "routes": tuple(data["routes"]),
                "bundle": BundleRecord.from_dict(data["bundle"], f"{where}.bundle"),
                "config": RepositoryConfig.from_dict(data["config"], f"{where}.config"),
            }
        )


def read_repository(repo: str | Path) -> RepositoryManifest:
    """Read ``conceptseg_repository.json``; a ``ManifestError`` when ``repo`` was not built by us."""
    path = Path(repo) / REPOSITORY_MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing (is {repo} a repository built by `conceptseg-edge triton build`?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable ({exc})") from exc
    return RepositoryManifest.from_dict(data, str(path))


# ---------------------------------------------------------------------------- configs from the manifest


def batch_axis(part: PartManifest) -> str | None:
    """The symbolic leading axis every input and output of ``part`` shares, or None (not batchable).

    A tensor that is only that axis (``[batch]``) makes the part unbatchable: without the batch axis its
    Triton dims would be empty, which Triton refuses.
    """
    heads = {t.shape[0] if len(t.shape) > 1 else None for t in (*part.inputs, *part.outputs)}
    if len(heads) == 1:
        (head,) = heads
        if isinstance(head, str):
            return head
    return None


def _tensor(spec, batched: bool, where: str, shape: Sequence[Dim] | None = None) -> TensorConfig:
    """``spec`` as a config tensor: ``shape`` (default: the manifest's), symbolic dims -1, no batch axis when batched."""
    if spec.dtype not in TRITON_TYPES or spec.dtype == "bytes":
        raise ManifestError(f"{where}.{spec.name}: dtype {spec.dtype!r} has no Triton tensor type")
    shape = tuple(spec.shape if shape is None else shape)[1 if batched else 0:]
    return TensorConfig(spec.name, spec.dtype, tuple(d if isinstance(d, int) else -1 for d in shape))


def graph_model_config(
    part: PartManifest,
    max_batch: int | None,
    device: Device,
    instances: int,
    graph_backend: GraphBackend = "onnxruntime",
    warmup: bool = True,
) -> ModelConfig:
    """The ``config.pbtxt`` of one bundle part, derived from its ``PartManifest``.

    An engine part (format ``tensorrt``) is a ``tensorrt_plan`` model shaped by its engine's profile
    (``plan_model_config``, which also takes ``warmup``). An ONNX graph is batched (``max_batch_size =
    max_batch``, default ``DEFAULT_NATIVE_MAX_BATCH``, dims without the leading axis, dynamic batching with
    preferred sizes of powers of two) when ``batch_axis(part)`` finds one shared symbolic axis and
    ``max_batch > 0``; otherwise ``max_batch_size: 0`` with the full shapes.
    """
    where = f"parts.{part.name}"
    if part.format not in _PLATFORM:
        raise ManifestError(f"{where}.format: {part.format!r}, expected one of {sorted(_PLATFORM)}")
    if part.format == "tensorrt" and graph_backend == "onnxruntime":
        return plan_model_config(part, max_batch, instances, warmup)
    max_batch = DEFAULT_NATIVE_MAX_BATCH if max_batch is None else max_batch
    batched = max_batch > 0 and batch_axis(part) is not None
    inputs = tuple(_tensor(t, batched, f"{where}.inputs") for t in part.inputs)
    outputs = tuple(_tensor(t, batched, f"{where}.outputs") for t in part.outputs)
    dynamic = _dynamic_batching(max_batch) if batched else None
    group = (InstanceGroup(instances, _KIND[device]),)
    file_name = Path(part.file).name
    if graph_backend == "python":
        if part.format != "onnx":
            raise InputError(f"--graph-backend python: part {part.name} is {part.format}, only onnx parts run under ORT")
        params = GraphParameters(graph_file=file_name, provider=_PROVIDER[device], batched=batched)
        return ModelConfig(part.name, inputs, outputs, backend="python", max_batch_size=max_batch if batched else 0,
                           instance_groups=group, dynamic_batching=dynamic, parameters=params.to_parameters())
    return ModelConfig(part.name, inputs, outputs, platform=_PLATFORM[part.format], max_batch_size=max_batch if batched else 0,
                       instance_groups=group, dynamic_batching=dynamic, default_model_filename=file_name)


def _dynamic_batching(max_batch: int) -> DynamicBatching:
    preferred = tuple(b for b in (2, 4, 8, 16, 32, 64) if b <= max_batch) or (max_batch,)
    return DynamicBatching(preferred_batch_size=preferred, max_queue_delay_microseconds=500)


def _profile_bounds(part: PartManifest) -> dict[str, InputProfile]:
    """Every input's min/opt/max shape in the engine: its profile entry, or its one static shape.

    Raises ``ManifestError`` when the profile and the part's inputs disagree (a profile for an input the
    part lacks, a dynamic input without one, another rank, a static axis the profile moves).
    """
    where = f"parts.{part.name}.engine.profile"
    assert part.engine is not None
    profiles = {p.name: p for p in part.engine.profile.inputs}
    unknown = sorted(set(profiles) - {t.name for t in part.inputs})
    if unknown:
        raise ManifestError(f"{where}: profiles for {unknown}, which are not inputs of {part.name}")
    bounds = {}
    for spec in part.inputs:
        profile = profiles.get(spec.name)
        if profile is None:
            if not all(isinstance(d, int) for d in spec.shape):
                raise ManifestError(f"{where}: input {spec.name} has dynamic shape {list(spec.shape)} but no profile")
            profile = InputProfile(spec.name, *(tuple(spec.shape),) * 3)
        if len(profile.min) != len(spec.shape) or any(
            isinstance(d, int) and not profile.min[i] == profile.max[i] == d for i, d in enumerate(spec.shape)
        ):
            raise ManifestError(f"{where}.{spec.name}: min {list(profile.min)} / max {list(profile.max)} do not fit the "
                                f"input's shape {list(spec.shape)}")
        bounds[spec.name] = profile
    return bounds


def _plan_dim(lo: int, hi: int) -> int:
    """A config dim from an engine axis's [min, max]: the size when fixed, else -1 (also for a fixed 0, which
    Triton's config cannot write; the engine's own range check still holds it to 0)."""
    return lo if lo == hi and lo > 0 else -1


def plan_model_config(part: PartManifest, max_batch: int | None, instances: int, warmup: bool = True) -> ModelConfig:
    """The ``tensorrt_plan`` model of one engine part, its dims and batching read from the engine's profile.

    The tensorrt backend refuses a config whose dims fall outside the engine's profile, or whose
    ``max_batch_size`` exceeds the profile's largest batch. So: batched only when every input and output
    shares one symbolic leading axis (``batch_axis``) whose profile range holds 1 (the batcher sends single
    requests too); then ``max_batch_size`` is ``max_batch``, or the smallest profile max of that axis when
    ``max_batch`` is None, and dims start at axis 1. Otherwise (e.g. the SAM2 decoder, whose image features
    are batch-1 fixed) ``max_batch_size: 0`` and full dims. A dim is -1 exactly where the profile lets it vary;
    output dims named like an input axis the profile fixes take that size. With ``warmup``, one ``model_warmup``
    sample at the profile's opt shapes, zero-filled: ``random_data`` is raw random bytes, NaN/Inf as floats and
    out-of-range token or position ids as int64 (no sample for an engine taking an input of ``NO_ZERO_WARMUP``).

    Raises:
        ManifestError: the part has no engine record, or its profile does not fit its inputs.
        InputError: ``max_batch`` exceeds what the engine's profile serves.
    """
    where = f"parts.{part.name}"
    if part.engine is None:
        raise ManifestError(f"{where}.engine: a 'tensorrt' part must record its engine (export tensorrt writes it)")
    bounds = _profile_bounds(part)
    batched, mbs = False, 0
    if batch_axis(part) is not None and max_batch != 0:
        lo, hi = max(b.min[0] for b in bounds.values()), min(b.max[0] for b in bounds.values())
        if lo <= 1 <= hi:  # the dynamic batcher also sends single requests
            if max_batch is not None and max_batch > hi:
                raise InputError(f"--max-batch {max_batch}: the {part.name} engine serves batches up to {hi} (its "
                                 "profile); lower --max-batch or rebuild the engine with a larger batch range")
            batched, mbs = True, hi if max_batch is None else max_batch
    input_dims = {t.name: [_plan_dim(lo, hi) for lo, hi in zip(bounds[t.name].min, bounds[t.name].max)] for t in part.inputs}
    # Symbolic dim name → the config dims of the input axes that carry it (an output axis of that name is
    # fixed only when they all agree on one size).
    named: dict[str, set[int]] = {}
    for spec in part.inputs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                named.setdefault(dim, set()).add(input_dims[spec.name][axis])
    inputs = tuple(_tensor(t, batched, f"{where}.inputs", input_dims[t.name]) for t in part.inputs)
    outputs = tuple(
        _tensor(t, batched, f"{where}.outputs", [next(iter(named[d])) if len(named.get(d, ())) == 1 else d for d in t.shape])
        for t in part.outputs
    )
    samples = ()
    if warmup and not NO_ZERO_WARMUP & {t.name for t in part.inputs}:
        # Batched: opt-batch requests of one item each (Triton prepends the batch axis of 1 to these dims).
        batch = min(max(bounds[part.inputs[0].name].opt[0], 1), mbs) if batched else 1
        opt = {t.name: WarmupInput(t.dtype, bounds[t.name].opt[1 if batched else 0:]) for t in part.inputs}
        samples = (ModelWarmup("profile_opt", opt, batch_size=batch),)
    return ModelConfig(part.name, inputs, outputs, platform=_PLATFORM["tensorrt"], max_batch_size=mbs,
                       instance_groups=(InstanceGroup(instances, _KIND["gpu"]),),
                       dynamic_batching=_dynamic_batching(mbs) if batched else None,
                       default_model_filename=PLAN_FILE, warmup=samples)


def router_model_config(cfg: RepositoryConfig, parameters: RouterParameters) -> ModelConfig:
    """``conceptseg``: the request contract of ``protocol`` on the python backend, one image per request."""
    kind = _KIND["cpu"] if cfg.flavor == "native" else _KIND[cfg.resolved_device]  # BLS glue needs no GPU
    return ModelConfig(MODEL_NAME, INPUTS, OUTPUTS, backend="python", max_batch_size=0,
                       instance_groups=(InstanceGroup(cfg.instances, kind),), parameters=parameters.to_parameters())


def stream_model_config(cfg: RepositoryConfig, parameters: StreamParameters) -> ModelConfig:
    """``conceptseg_stream``: one frame of one stream per request, under the sequence batcher's ``oldest`` strategy.

    Why ``oldest`` with ``max_batch_size: 1``: ``direct`` pins each live sequence to one of ``max_batch_size``
    batch slots, so with one slot a second stream would wait in Triton's backlog until the first ends.
    ``oldest`` keeps up to ``max_candidate_sequences`` sequences live per instance and hands the model the
    oldest ready request; a batch of 1 is right because the python model runs frames one after another
    anyway, and a larger batch would only hold every stream's answer until the whole batch is done.
    ``max_candidate_sequences`` is twice ``max_streams``, so that a START beyond the model's limit reaches
    the model and is refused at once with a clear error instead of waiting, unanswered, in Triton's backlog.
    """
    kind = _KIND[cfg.resolved_device]
    batching = SequenceBatching(
        controls=stream_controls(),
        max_sequence_idle_microseconds=parameters.idle_timeout_us,
        strategy="oldest",
        max_candidate_sequences=2 * parameters.max_streams,
    )
    return ModelConfig(STREAM_MODEL_NAME, STREAM_INPUTS, STREAM_OUTPUTS, backend="python", max_batch_size=1,
                       instance_groups=(InstanceGroup(cfg.instances, kind),), parameters=parameters.to_parameters(),
                       sequence_batching=batching)


def stream_parameters(cfg: RepositoryConfig, bundle: str) -> StreamParameters:
    """The ``conceptseg_stream`` model's parameters from the build's flags."""
    return StreamParameters(
        bundle=bundle,
        provider=_PROVIDER[cfg.resolved_device],
        max_streams=cfg.max_streams,
        idle_timeout_us=max(1, round(cfg.stream_idle_s * 1e6)),
        bank_dir=str(Path(cfg.bank_dir).resolve()) if cfg.bank_dir else None,
        limits=cfg.limits,
    )


def has_video_parts(manifest: BundleManifest) -> bool:
    """True when the bundle carries every part video tracking needs (``VIDEO_PARTS``)."""
    return all(name in manifest.parts for name in VIDEO_PARTS)


# ---------------------------------------------------------------------------- writing


def _write_config(model_dir: Path, config: ModelConfig) -> str:
    text = config.to_pbtxt()
    validate_pbtxt(text, expected=config, where=str(model_dir / "config.pbtxt"))
    write_text(model_dir / "config.pbtxt", text)
    return text


def _place(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` when possible (bundle files are replaced, never edited, in place), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_bundle(bundle: Path, manifest: BundleManifest, dst: Path, graphs: bool) -> None:
    files = [MANIFEST_NAME, *manifest.files]
    if graphs:
        files += [p.file for p in manifest.parts.values()]
    for rel in files:  # contained: relative, no '..', no link out, so neither side leaves its directory
        _place(contained(bundle, rel, f"bundle entry {rel!r}"), dst / rel)


def _companions(bundle: Path, manifest: BundleManifest, part: PartManifest) -> list[str]:
    """Extra bundle files that belong beside a graph (ONNX external data named ``<file>.*``)."""
    prefix = Path(part.file).name + "."
    return [rel for rel in manifest.files if Path(rel).name.startswith(prefix) and (bundle / rel).is_file()]


def build_repository(bundle: str | Path, out: str | Path, cfg: RepositoryConfig = RepositoryConfig()) -> RepositoryManifest:
    """Build a model repository for ``bundle`` at ``out``; returns its ``RepositoryManifest``.

    The bundle is verified (every file hash) first, and decides the flavor when ``cfg`` names none
    (``RepositoryConfig.for_bundle``: an engine bundle is native and GPU-only). ``out`` must be absent, empty,
    or a repository this function built; it is replaced only once the new repository is complete.
    """
    bundle = Path(bundle).resolve()
    manifest = load_bundle(bundle)
    cfg = cfg.for_bundle(manifest)
    out = Path(out)
    with staged_dir(out, REPOSITORY_MANIFEST, "conceptseg-edge Triton repository") as staging:
        for reserved in (MODEL_NAME, STREAM_MODEL_NAME):
            if reserved in manifest.parts:
                raise ManifestError(f"parts.{reserved}: a part may not take a served model's name")
        build = _build_python if cfg.flavor == "python" else _build_native
        result = RepositoryManifest(
            flavor=cfg.flavor,
            models=build(bundle, manifest, staging, cfg),
            routes=tuple(manifest.routes),
            bundle=BundleRecord(
                source=str(bundle),
                mode=cfg.bundle_mode if cfg.flavor == "python" else "split",
                model=manifest.source.model,
                manifest_sha256=sha256_file(bundle / MANIFEST_NAME),
                routes=tuple(manifest.routes),
            ),
            config=cfg,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=tool_versions(),
        )
        write_json(staging / REPOSITORY_MANIFEST, result.to_dict())
    return read_repository(out)


def router_parameters(cfg: RepositoryConfig, bundle: str, graph_models: Mapping[str, str] | None = None) -> RouterParameters:
    """The ``conceptseg`` model's parameters: in-process engines, or BLS calls to ``graph_models``."""
    return RouterParameters(
        engines="local" if graph_models is None else "bls",
        bundle=bundle,
        provider=_PROVIDER[cfg.resolved_device],
        warmup=cfg.warmup and graph_models is None,  # BLS calls are allowed only in execute(), not at load
        bank_dir=str(Path(cfg.bank_dir).resolve()) if cfg.bank_dir else None,
        generation=cfg.generation,
        limits=cfg.limits,
        graph_models=graph_models or {},
    )


def _build_python(bundle: Path, manifest: BundleManifest, staging: Path, cfg: RepositoryConfig) -> dict[str, ServedModelRecord]:
    model_dir = staging / MODEL_NAME
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    if cfg.bundle_mode == "copy":
        _copy_bundle(bundle, manifest, version_dir / "bundle", graphs=True)
        bundle_param = "bundle"
    else:
        bundle_param = str(bundle)
    write_text(version_dir / "model.py", ROUTER_MODEL_PY)
    config = router_model_config(cfg, router_parameters(cfg, bundle_param))
    _write_config(model_dir, config)
    records = {MODEL_NAME: ServedModelRecord("router + engines (python backend, ONNX Runtime in process)", "python", 0,
                                             cfg.instances)}
    if has_video_parts(manifest):
        stream_dir = staging / STREAM_MODEL_NAME
        (stream_dir / VERSION).mkdir(parents=True)
        if cfg.bundle_mode == "copy":  # its own hard-linked copy: each model directory stands alone
            _copy_bundle(bundle, manifest, stream_dir / VERSION / "bundle", graphs=True)
        write_text(stream_dir / VERSION / "model.py", STREAM_MODEL_PY)
        _write_config(stream_dir, stream_model_config(cfg, stream_parameters(cfg, bundle_param)))
        records[STREAM_MODEL_NAME] = ServedModelRecord("video tracking per stream (sequence batching, python backend)",
                                                       "python", 1, cfg.instances)
    return records


def _build_native(bundle: Path, manifest: BundleManifest, staging: Path, cfg: RepositoryConfig) -> dict[str, ServedModelRecord]:
    graph_models: dict[str, str] = {}
    records: dict[str, ServedModelRecord] = {}
    for name, part in manifest.parts.items():
        config = graph_model_config(part, cfg.max_batch, cfg.resolved_device, cfg.instances, cfg.graph_backend, cfg.warmup)
        model_dir = staging / config.name
        version_dir = model_dir / VERSION
        version_dir.mkdir(parents=True)
        if config.platform == _PLATFORM["tensorrt"]:  # a plan is one self-contained file, under the backend's name
            files = {part.file: PLAN_FILE}
        else:
            files = {rel: Path(rel).name for rel in (part.file, *_companions(bundle, manifest, part))}
        for rel, placed in files.items():
            _place(contained(bundle, rel, f"bundle entry {rel!r}"), version_dir / placed)
        if cfg.graph_backend == "python":
            write_text(version_dir / "model.py", GRAPH_MODEL_PY)
        _write_config(model_dir, config)
        graph_models[name] = config.name
        records[config.name] = ServedModelRecord(f"graph {name}", config.backend or config.platform, config.max_batch_size,
                                                 cfg.instances, dynamic_batching=config.dynamic_batching is not None, part=name)
    model_dir = staging / MODEL_NAME
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    _copy_bundle(bundle, manifest, version_dir / "bundle", graphs=False)  # manifest + processor files only
    write_text(version_dir / "model.py", ROUTER_MODEL_PY)
    _write_config(model_dir, router_model_config(cfg, router_parameters(cfg, "bundle", graph_models)))
    records[MODEL_NAME] = ServedModelRecord("router (BLS python model calling the graph models)", "python", 0, cfg.instances)
    return records
