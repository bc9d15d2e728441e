"""Typed Triton model configurations, rendered to ``config.pbtxt`` and checked by Triton's own protobuf.

A ``ModelConfig`` is a frozen dataclass tree (tensors, instance groups, dynamic batching, string
parameters). ``to_pbtxt()`` renders it deterministically; ``validate_pbtxt()`` parses the text with
the ``ModelConfig`` message that tritonclient ships (``tritonclient.grpc.model_config_pb2``, the
same .proto the server compiles) and then checks that the parsed message says exactly what the
description said, field by field, so a rendering bug cannot slip through as a silently different
config. Semantic rules Triton enforces at load time (a batch dimension needs ``max_batch_size > 0``,
dynamic batching needs batching, names are unique, dims are non-empty, positive or -1, a warm-up sample feeds
every required input at a shape the config accepts) are checked in ``__post_init__`` so an invalid
config is never written.

Dtypes are given as numpy names (``"float32"``, ``"uint8"``, ``"bool"``) or ``"bytes"``; the
Triton enum (``TYPE_FP32`` …, ``TYPE_STRING`` for bytes) is derived here and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conceptseg_edge.errors import ConceptsegError

# numpy dtype name → Triton DataType enum name. "bytes" is Triton's BYTES (TYPE_STRING in config).
TRITON_TYPES: dict[str, str] = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bytes": "TYPE_STRING",
}
# The wire names tritonclient uses for the same types (InferInput(name, shape, datatype)).
WIRE_TYPES: dict[str, str] = {k: ("BYTES" if k == "bytes" else v.removeprefix("TYPE_")) for k, v in TRITON_TYPES.items()}

INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_AUTO", "KIND_MODEL")
# ``ModelWarmup.Input``'s synthetic data kinds (its ``input_data_file`` needs files we never write).
WARMUP_DATA = ("zero_data", "random_data")
BACKENDS = ("python", "onnxruntime", "tensorrt")
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan", "ensemble")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
# ``sequence_batching.control_input`` kinds (lower-case here) → Triton's ``Control.Kind`` enum names.
SEQUENCE_CONTROLS = {"start": "CONTROL_SEQUENCE_START", "end": "CONTROL_SEQUENCE_END", "ready": "CONTROL_SEQUENCE_READY",
                     "corrid": "CONTROL_SEQUENCE_CORRID"}
SEQUENCE_STRATEGIES = ("direct", "oldest")


class ModelConfigError(ConceptsegError):
    """A model configuration is invalid, or its rendered text does not parse back to the same config."""


@dataclass(frozen=True)
class TensorConfig:
    """One model input or output.

    Attributes:
        name: tensor name as the model (graph or ``model.py``) sees it.
        dtype: numpy dtype name, or ``"bytes"`` for Triton BYTES.
        dims: shape **without** the batch dimension when the model batches; -1 is dynamic.
        optional: inputs only; a request may leave it out.
        allow_ragged_batch: inputs only; batch requests whose shapes differ.
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    allow_ragged_batch: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ModelConfigError(f"tensor {self.name!r}: not a valid Triton tensor name")
        if self.dtype not in TRITON_TYPES:
            raise ModelConfigError(f"tensor {self.name}.dtype: {self.dtype!r}, expected one of {sorted(TRITON_TYPES)}")
        dims = tuple(self.dims)
        if any(not isinstance(d, int) or isinstance(d, bool) or (d < 1 and d != -1) for d in dims):
            raise ModelConfigError(f"tensor {self.name}.dims: {list(dims)}, each dim must be a positive int or -1")
        object.__setattr__(self, "dims", dims)

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]

    @property
    def wire_type(self) -> str:
        return WIRE_TYPES[self.dtype]


@dataclass(frozen=True)
class InstanceGroup:
    """``instance_group``: ``count`` copies of the model of ``kind`` (``KIND_CPU`` / ``KIND_GPU`` …)."""

    count: int = 1
    kind: str = "KIND_CPU"
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ModelConfigError(f"instance_group.count: {self.count!r}, expected an int >= 1")
        if self.kind not in INSTANCE_KINDS:
            raise ModelConfigError(f"instance_group.kind: {self.kind!r}, expected one of {INSTANCE_KINDS}")
        if self.gpus and self.kind != "KIND_GPU":
            raise ModelConfigError(f"instance_group.gpus: only meaningful with KIND_GPU, got {self.kind}")


@dataclass(frozen=True)
class DynamicBatching:
    """``dynamic_batching``: preferred batch sizes and the longest a request may wait to be batched."""

    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 0

    def __post_init__(self) -> None:
        if any(not isinstance(b, int) or b < 1 for b in self.preferred_batch_size):
            raise ModelConfigError(f"dynamic_batching.preferred_batch_size: {list(self.preferred_batch_size)}, expected ints >= 1")
        if self.max_queue_delay_microseconds < 0:
            raise ModelConfigError("dynamic_batching.max_queue_delay_microseconds: must be >= 0")


@dataclass(frozen=True)
class SequenceControl:
    """One ``sequence_batching.control_input``: a tensor Triton fills for the model on every request.

    ``start`` / ``end`` / ``ready`` are int32 flags (``int32_false_true: [0, 1]``); ``corrid`` carries the
    request's correlation id as ``TYPE_UINT64``. (Triton 2.51 refuses every request to a model whose CORRID
    is ``TYPE_STRING``: "unexpected number of string elements 2 for inference input 'CORRID'".)
    """

    name: str
    kind: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ModelConfigError(f"control input {self.name!r}: not a valid Triton tensor name")
        if self.kind not in SEQUENCE_CONTROLS:
            raise ModelConfigError(f"control input {self.name}.kind: {self.kind!r}, expected one of {sorted(SEQUENCE_CONTROLS)}")


@dataclass(frozen=True)
class SequenceBatching:
    """``sequence_batching``: requests of one correlation id go, in order, to the same model instance.

    ``strategy="oldest"`` lets up to ``max_candidate_sequences`` sequences be live per instance and batches
    their next requests together (up to ``max_batch_size``); ``"direct"`` pins each live sequence to one
    batch slot (``max_batch_size`` slots per instance), so a further sequence waits in Triton's backlog.
    A sequence that sends nothing for ``max_sequence_idle_microseconds`` is released by Triton.
    """

    controls: tuple[SequenceControl, ...]
    max_sequence_idle_microseconds: int
    strategy: str = "oldest"
    max_candidate_sequences: int = 4
    max_queue_delay_microseconds: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "controls", tuple(self.controls))
        if self.strategy not in SEQUENCE_STRATEGIES:
            raise ModelConfigError(f"sequence_batching.strategy: {self.strategy!r}, expected one of {SEQUENCE_STRATEGIES}")
        for key in ("max_sequence_idle_microseconds", "max_candidate_sequences"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelConfigError(f"sequence_batching.{key}: {value!r}, expected an int >= 1")
        if self.max_queue_delay_microseconds < 0:
            raise ModelConfigError("sequence_batching.max_queue_delay_microseconds: must be >= 0")
        names = [c.name for c in self.controls]
        kinds = [c.kind for c in self.controls]
        for what, values in (("names", names), ("kinds", kinds)):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ModelConfigError(f"sequence_batching.control_input: duplicate {what} {dupes}")


@dataclass(frozen=True)
class WarmupInput:
    """One input of a warm-up sample: its dtype, full dims (no batch dim when the model batches) and data.

    Unlike ``TensorConfig.dims`` these are concrete sizes (Triton refuses a warm-up dim of -1) and may be 0.
    """

    dtype: str
    dims: tuple[int, ...]
    data: str = "zero_data"

    def __post_init__(self) -> None:
        if self.dtype not in TRITON_TYPES:
            raise ModelConfigError(f"warmup input dtype: {self.dtype!r}, expected one of {sorted(TRITON_TYPES)}")
        dims = tuple(self.dims)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in dims):
            raise ModelConfigError(f"warmup input dims: {list(dims)}, each dim must be an int >= 0")
        if self.data not in WARMUP_DATA:
            raise ModelConfigError(f"warmup input data: {self.data!r}, expected one of {WARMUP_DATA}")
        object.__setattr__(self, "dims", dims)

    @property
    def triton_type(self) -> str:
        return TRITON_TYPES[self.dtype]


@dataclass(frozen=True)
class ModelWarmup:
    """``model_warmup``: one sample Triton runs on every instance before the model reports ready.

    ``batch_size`` requests of one item each when the model batches; exactly 1 when it does not.
    """

    name: str
    inputs: Mapping[str, WarmupInput]
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ModelConfigError("model_warmup.name: must not be empty")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ModelConfigError(f"model_warmup {self.name}.batch_size: {self.batch_size!r}, expected an int >= 1")
        if not self.inputs:
            raise ModelConfigError(f"model_warmup {self.name}: needs at least one input")
        object.__setattr__(self, "inputs", dict(self.inputs))


@dataclass(frozen=True)
class ModelConfig:
    """A whole ``config.pbtxt``. Exactly one of ``backend`` / ``platform`` is set."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    backend: str | None = None
    platform: str | None = None
    max_batch_size: int = 0
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    dynamic_batching: DynamicBatching | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    default_model_filename: str | None = None
    warmup: tuple[ModelWarmup, ...] = ()
    sequence_batching: SequenceBatching | None = None

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise ModelConfigError(f"{where}: not a valid Triton model name")
        if (self.backend is None) == (self.platform is None):
            raise ModelConfigError(f"{where}: set exactly one of backend / platform")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ModelConfigError(f"{where}.backend: {self.backend!r}, expected one of {BACKENDS}")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise ModelConfigError(f"{where}.platform: {self.platform!r}, expected one of {PLATFORMS}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 0:
            raise ModelConfigError(f"{where}.max_batch_size: {self.max_batch_size!r}, expected an int >= 0")
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ModelConfigError(f"{where}.dynamic_batching: needs max_batch_size > 0")
            too_big = [b for b in self.dynamic_batching.preferred_batch_size if b > self.max_batch_size]
            if too_big:
                raise ModelConfigError(f"{where}.dynamic_batching.preferred_batch_size: {too_big} > max_batch_size {self.max_batch_size}")
        if self.sequence_batching is not None:
            if self.dynamic_batching is not None:
                raise ModelConfigError(f"{where}: dynamic_batching and sequence_batching exclude each other")
            if self.sequence_batching.strategy == "oldest" and self.max_batch_size == 0:
                raise ModelConfigError(f"{where}.sequence_batching.oldest: needs max_batch_size > 0")
            tensors = {t.name for t in (*self.inputs, *self.outputs)}
            clash = sorted(tensors & {c.name for c in self.sequence_batching.controls})
            if clash:
                raise ModelConfigError(f"{where}.sequence_batching.control_input: {clash} are also inputs or outputs")
        if not self.inputs or not self.outputs:
            raise ModelConfigError(f"{where}: needs at least one input and one output")
        for kind, tensors in (("input", self.inputs), ("output", self.outputs)):
            names = [t.name for t in tensors]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ModelConfigError(f"{where}.{kind}: duplicate names {dupes}")
            for t in tensors:  # Triton's ValidateIOShape: "must specify 'dims'", batching or not
                if not t.dims:
                    raise ModelConfigError(f"{where}.{kind} {t.name}: empty dims (Triton needs at least one; a scalar "
                                           "per batch item would need dims [1] and a reshape)")
        for t in self.outputs:
            if t.optional or t.allow_ragged_batch:
                raise ModelConfigError(f"{where}.output {t.name}: optional / allow_ragged_batch are input-only")
        both = sorted({t.name for t in self.inputs} & {t.name for t in self.outputs})
        if both:
            raise ModelConfigError(f"{where}: names used as both input and output: {both}")
        for key, value in self.parameters.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ModelConfigError(f"{where}.parameters[{key!r}]: keys and values must be strings")
        object.__setattr__(self, "parameters", dict(self.parameters))
        object.__setattr__(self, "warmup", tuple(self.warmup))
        for sample in self.warmup:
            self._check_warmup(sample)

    def _check_warmup(self, sample: ModelWarmup) -> None:
        """Triton runs the sample through the model's own input checks: refuse here what it would refuse there."""
        where = f"model {self.name!r}.model_warmup {sample.name}"
        if self.max_batch_size == 0 and sample.batch_size != 1:
            raise ModelConfigError(f"{where}.batch_size: {sample.batch_size}, a model without batching takes 1")
        if sample.batch_size > max(self.max_batch_size, 1):
            raise ModelConfigError(f"{where}.batch_size: {sample.batch_size} > max_batch_size {self.max_batch_size}")
        known = {t.name: t for t in self.inputs}
        unknown = sorted(set(sample.inputs) - set(known))
        if unknown:
            raise ModelConfigError(f"{where}: inputs {unknown} are not inputs of the model")
        missing = [t.name for t in self.inputs if not t.optional and t.name not in sample.inputs]
        if missing:
            raise ModelConfigError(f"{where}: required inputs {missing} have no warm-up data")
        for name, value in sample.inputs.items():
            tensor = known[name]
            if value.dtype != tensor.dtype:
                raise ModelConfigError(f"{where}.inputs[{name}].dtype: {value.dtype}, the input is {tensor.dtype}")
            fits = len(value.dims) == len(tensor.dims) and all(d == -1 or d == v for d, v in zip(tensor.dims, value.dims))
            if not fits:
                raise ModelConfigError(f"{where}.inputs[{name}].dims: {list(value.dims)} do not fit the input's {list(tensor.dims)}")

    # ------------------------------------------------------------------ lookups

    def input(self, name: str) -> TensorConfig:
        for t in self.inputs:
            if t.name == name:
                return t
        raise ModelConfigError(f"model {self.name!r}: no input {name!r} (has {[t.name for t in self.inputs]})")

    def output(self, name: str) -> TensorConfig:
        for t in self.outputs:
            if t.name == name:
                return t
        raise ModelConfigError(f"model {self.name!r}: no output {name!r} (has {[t.name for t in self.outputs]})")

    # ------------------------------------------------------------------ rendering

    def to_pbtxt(self) -> str:
        """Render ``config.pbtxt`` text (deterministic: same description, same bytes)."""
        lines = [f"name: {_q(self.name)}"]
        if self.backend is not None:
            lines.append(f"backend: {_q(self.backend)}")
        if self.platform is not None:
            lines.append(f"platform: {_q(self.platform)}")
        lines.append(f"max_batch_size: {self.max_batch_size}")
        if self.default_model_filename:
            lines.append(f"default_model_filename: {_q(self.default_model_filename)}")
        lines += _tensor_block("input", self.inputs)
        lines += _tensor_block("output", self.outputs)
        lines.append("instance_group [")
        groups = []
        for g in self.instance_groups:
            body = f"    count: {g.count}\n    kind: {g.kind}"
            if g.gpus:
                body += f"\n    gpus: [ {', '.join(map(str, g.gpus))} ]"
            groups.append("  {\n" + body + "\n  }")
        lines.append(",\n".join(groups))
        lines.append("]")
        if self.dynamic_batching is not None:
            db = self.dynamic_batching
            lines.append("dynamic_batching {")
            if db.preferred_batch_size:
                lines.append(f"  preferred_batch_size: [ {', '.join(map(str, db.preferred_batch_size))} ]")
            lines.append(f"  max_queue_delay_microseconds: {db.max_queue_delay_microseconds}")
            lines.append("}")
        if self.sequence_batching is not None:
            lines += _sequence_block(self.sequence_batching)
        for key in sorted(self.parameters):
            lines.append(f"parameters {{\n  key: {_q(key)}\n  value {{ string_value: {_q(self.parameters[key])} }}\n}}")
        if self.warmup:
            lines += ["model_warmup [", ",\n".join(_warmup_block(w) for w in self.warmup), "]"]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Triton's JSON form of the config (as ``model_config`` arrives in ``initialize``)."""
        return _message_to_dict(validate_pbtxt(self.to_pbtxt(), expected=self))


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor_block(kind: str, tensors: Sequence[TensorConfig]) -> list[str]:
    items = []
    for t in tensors:
        body = [f"    name: {_q(t.name)}", f"    data_type: {t.triton_type}", f"    dims: [ {', '.join(map(str, t.dims))} ]"]
        if t.optional:
            body.append("    optional: true")
        if t.allow_ragged_batch:
            body.append("    allow_ragged_batch: true")
        items.append("  {\n" + "\n".join(body) + "\n  }")
    return [f"{kind} [", ",\n".join(items), "]"]


def _sequence_block(sb: SequenceBatching) -> list[str]:
    lines = ["sequence_batching {", f"  max_sequence_idle_microseconds: {sb.max_sequence_idle_microseconds}"]
    if sb.strategy == "oldest":
        lines += ["  oldest {", f"    max_candidate_sequences: {sb.max_candidate_sequences}",
                  f"    max_queue_delay_microseconds: {sb.max_queue_delay_microseconds}", "  }"]
    else:
        lines += ["  direct {", f"    max_queue_delay_microseconds: {sb.max_queue_delay_microseconds}", "  }"]
    controls = []
    for c in sb.controls:
        value = "data_type: TYPE_UINT64" if c.kind == "corrid" else "int32_false_true: [ 0, 1 ]"
        controls.append(f"    {{\n      name: {_q(c.name)}\n      control [ {{ kind: {SEQUENCE_CONTROLS[c.kind]} {value} }} ]\n    }}")
    return lines + ["  control_input [", ",\n".join(controls), "  ]", "}"]


def _warmup_block(sample: ModelWarmup) -> str:
    body = [f"    name: {_q(sample.name)}", f"    batch_size: {sample.batch_size}"]
    for name, value in sample.inputs.items():
        body += [
            "    inputs {",
            f"      key: {_q(name)}",
            "      value {",
            f"        data_type: {value.triton_type}",
            f"        dims: [ {', '.join(map(str, value.dims))} ]",
            f"        {value.data}: true",
            "      }",
            "    }",
        ]
    return "  {\n" + "\n".join(body) + "\n  }"


# ---------------------------------------------------------------------------- protobuf validation


def _pb2():
    from conceptseg_edge._compat import require

    require("tritonclient", extra="serve")
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _message_to_dict(message) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def validate_pbtxt(text: str, expected: ModelConfig | None = None, where: str = "config.pbtxt"):
    """Parse ``text`` with Triton's ``ModelConfig`` protobuf; with ``expected``, check it matches.

    Returns the parsed ``model_config_pb2.ModelConfig``. Raises ``ModelConfigError`` naming the field
    on a parse error or on any difference from ``expected``.
    """
    from google.protobuf import text_format

    pb2 = _pb2()
    message = pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{where}: Triton's ModelConfig protobuf rejects it ({exc})") from exc
    if expected is not None:
        _compare(message, expected, pb2, where)
    return message


def _compare(m, cfg: ModelConfig, pb2, where: str) -> None:
    def check(field_name: str, got: Any, want: Any) -> None:
        if got != want:
            raise ModelConfigError(f"{where}: {field_name} parsed as {got!r}, described as {want!r}")

    check("name", m.name, cfg.name)
    check("backend", m.backend or None, cfg.backend)
    check("platform", m.platform or None, cfg.platform)
    check("max_batch_size", m.max_batch_size, cfg.max_batch_size)
    check("default_model_filename", m.default_model_filename or None, cfg.default_model_filename or None)
    for kind, parsed, described in (("input", m.input, cfg.inputs), ("output", m.output, cfg.outputs)):
        check(f"{kind} count", len(parsed), len(described))
        for p, t in zip(parsed, described):
            at = f"{kind} {t.name}"
            check(f"{at}.name", p.name, t.name)
            check(f"{at}.data_type", pb2.DataType.Name(p.data_type), t.triton_type)
            check(f"{at}.dims", tuple(p.dims), t.dims)
            if kind == "input":
                check(f"{at}.optional", p.optional, t.optional)
                check(f"{at}.allow_ragged_batch", p.allow_ragged_batch, t.allow_ragged_batch)
    check("instance_group count", len(m.instance_group), len(cfg.instance_groups))
    for i, (p, g) in enumerate(zip(m.instance_group, cfg.instance_groups)):
        check(f"instance_group[{i}].count", p.count, g.count)
        check(f"instance_group[{i}].kind", pb2.ModelInstanceGroup.Kind.Name(p.kind), g.kind)
        check(f"instance_group[{i}].gpus", tuple(p.gpus), g.gpus)
    check("dynamic_batching present", m.HasField("dynamic_batching"), cfg.dynamic_batching is not None)
    if cfg.dynamic_batching is not None:
        db = m.dynamic_batching
        check("dynamic_batching.preferred_batch_size", tuple(db.preferred_batch_size), cfg.dynamic_batching.preferred_batch_size)
        check("dynamic_batching.max_queue_delay_microseconds", db.max_queue_delay_microseconds,
              cfg.dynamic_batching.max_queue_delay_microseconds)
    check("sequence_batching present", m.HasField("sequence_batching"), cfg.sequence_batching is not None)
    if cfg.sequence_batching is not None:
        sb, want = m.sequence_batching, cfg.sequence_batching
        check("sequence_batching.strategy", sb.WhichOneof("strategy_choice"), want.strategy)
        check("sequence_batching.max_sequence_idle_microseconds", sb.max_sequence_idle_microseconds,
              want.max_sequence_idle_microseconds)
        strategy = getattr(sb, want.strategy)
        check("sequence_batching.max_queue_delay_microseconds", strategy.max_queue_delay_microseconds,
              want.max_queue_delay_microseconds)
        if want.strategy == "oldest":
            check("sequence_batching.oldest.max_candidate_sequences", strategy.max_candidate_sequences,
                  want.max_candidate_sequences)
        kinds = pb2.ModelSequenceBatching.Control.Kind
        parsed = [(c.name, [(kinds.Name(k.kind), tuple(k.int32_false_true), pb2.DataType.Name(k.data_type)) for k in c.control])
                  for c in sb.control_input]
        described = [(c.name, [(SEQUENCE_CONTROLS[c.kind], () if c.kind == "corrid" else (0, 1),
                                "TYPE_UINT64" if c.kind == "corrid" else "TYPE_INVALID")])
                     for c in want.controls]
        check("sequence_batching.control_input", parsed, described)
    check("parameters", {k: v.string_value for k, v in m.parameters.items()}, dict(cfg.parameters))
    check("model_warmup count", len(m.model_warmup), len(cfg.warmup))
    for p, w in zip(m.model_warmup, cfg.warmup):
        at = f"model_warmup {w.name}"
        check(f"{at}.name", p.name, w.name)
        check(f"{at}.batch_size", p.batch_size, w.batch_size)
        parsed = {k: (pb2.DataType.Name(v.data_type), tuple(v.dims), v.WhichOneof("input_data_type")) for k, v in p.inputs.items()}
        check(f"{at}.inputs", parsed, {k: (v.triton_type, v.dims, v.data) for k, v in w.inputs.items()})


def read_config(path) -> Any:
    """Parse an existing ``config.pbtxt`` file with Triton's protobuf (no comparison)."""
    from pathlib import Path

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read ({exc})") from exc
    return validate_pbtxt(text, where=str(path))
