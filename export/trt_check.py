"""Will TensorRT's ONNX parser take this graph? A static check, on CPU, with the ``onnx`` package only.

TensorRT cannot be installed on this project's machines, so a graph TensorRT refuses would otherwise
be found only on a Jetson. This module encodes what onnx-tensorrt documents for TensorRT 10.x, the
support matrix and its restrictions, and checks every node of a graph (subgraphs of If/Loop/Scan
included) against it. Each ``ParseViolation`` names the node, its op type, the rule and the offending
attribute or input. ``export_and_validate`` calls ``require_tensorrt_parse`` on every fp32 graph it
writes; ``conceptseg-edge export check BUNDLE`` runs ``check_bundle`` on a whole bundle.

Source of every rule (unless a rule says otherwise): ``docs/operators.md`` of onnx/onnx-tensorrt,
branch ``10.1-GA`` (tag ``release/10.1-GA``), commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c
(2024-06-17, "ONNX-TensorRT 10.1 GA release"), the newest 10.x document we could read. Restrictions
of that document that need tensor shapes or values known only at build time (EyeLike's static
dims, GridSample's 4-D input, Hardmax's constant axis dim, Loop's scan-output length) are not
checked here; a TensorRT build still decides those. Two places where the document and the parser's
own source (``onnxOpImporters.cpp``, same commit) differ are followed as the source behaves and said
so at the rule: Resize ``cubic`` (imported as ``InterpolationMode::kCUBIC``, and TensorRT 10.0.1's
Resize operator documents CUBIC) and TopK's K (read as a tensor: a K computed from shapes passes).

ONNX-Runtime-only formats fail this check, truthfully: the dynamic INT8 policy decoder
(``DynamicQuantizeLinear``/``MatMulInteger``, both "N" in the matrix) and the INT4 one (``MatMulNBits``
in domain ``com.microsoft``). Their export does not run this check (``export/quantize.py``);
``check_tensorrt_parse`` is what an engine build uses to refuse them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import ExportError

SOURCE = ("onnx/onnx-tensorrt docs/operators.md, branch 10.1-GA "
          "(commit 96e781103cfc4adf4a6bb557e94bac8e693f6f4c)")

# The matrix's "Y" rows, verbatim.
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

# The matrix's "N" rows, verbatim (an op in neither set is not in the matrix at all).
UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Col2Im
CenterCropPad Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow
HannWindow ImageDecoder MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul
RegexFullMatch STFT SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert
SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer
StringSplit TfIdfVectorizer Unique
""".split())

OPSET_RANGE = (9, 20)  # "operators in the inclusive range of opset 9 to opset 20"
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
TOPK_K_LIMIT = 3840  # TopK: "`K` input must be less than 3840"

# "TensorRT supports the following ONNX data types: DOUBLE, FLOAT32, FLOAT16, BFLOAT16, INT32, INT64,
# FP8, INT8, INT4, UINT8, and BOOL" (DOUBLE is cast down to FLOAT). FP8 is FLOAT8E4M3FN, the one FP8
# type the parser's ``convertDtype`` (importerUtils.cpp) maps.
SUPPORTED_DTYPES = frozenset({"DOUBLE", "FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64", "FLOAT8E4M3FN", "INT8",
                              "INT4", "UINT8", "BOOL"})
# "INT8, INT4, and FP8 are treated as Quantized Types ... available only through quantization from a
# floating-point type with higher precision."
QUANTIZED_DTYPES = frozenset({"INT8", "INT4", "FLOAT8E4M3FN"})

# The "Supported Types" of the two Q/DQ rows (the type of input `x`): what explicit quantization may
# carry. An int32 bias DequantizeLinear (ONNX Runtime's QuantizeBias) is outside them.
QDQ_INPUT_TYPES = {"QuantizeLinear": frozenset({"FLOAT", "FLOAT16", "BFLOAT16"}),
                   "DequantizeLinear": QUANTIZED_DTYPES}

# Inputs that "must be an initializer" (Unsqueeze: "a constant tensor"): op -> (input index, name).
INITIALIZER_INPUTS: dict[str, tuple[int, str]] = {
    "CumSum": (1, "axis"), "Pad": (3, "axes"), "Slice": (3, "axes"), "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"),
    **{op: (1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                  "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}

# Resize: "Supported resize transformation modes: half_pixel, pytorch_half_pixel, tf_half_pixel_for_nn,
# asymmetric, and align_corners. Supported resize modes: nearest, linear. ... Supported aspect ratio
# policy: stretch. ... Antialiasing is not supported." ``cubic`` is added: the 10.1 importer maps it to
# InterpolationMode::kCUBIC, and TensorRT 10.0.1's Resize operator page documents CUBIC resizing.
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                     "align_corners"})
RESIZE_MODES = frozenset({"nearest", "linear", "cubic"})


@dataclass(frozen=True)
class ParseViolation:
    """One place where a graph breaks what TensorRT's ONNX parser documents.

    ``node`` is the node's name (``<graph>`` for a model-wide rule; nodes inside an If/Loop/Scan body
    are prefixed with the owning node and attribute, ``If_0/then_branch/``); ``rule`` is a short
    identifier (``topk-k``, ``unsupported-op``, ...); ``detail`` names the attribute or input at fault.
    """

    node: str
    op_type: str
    rule: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op_type": self.op_type, "rule": self.rule, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type or 'model'}) [{self.rule}]: {self.detail}"


def check_tensorrt_parse(model_or_path: Any) -> list[ParseViolation]:
    """Every documented TensorRT 10.x parser restriction that ``model_or_path`` breaks, in graph order.

    Args:
        model_or_path: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.

    Returns:
        The violations; empty when the graph passes every rule this module encodes.
    """
    import onnx

    # Rules read structure, types and small constants (which stay inline), never large weights: a
    # graph's external data is not loaded.
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path), load_external_data=False)
    try:
        # Types of intermediate tensors, for the data-type rules; a graph shape inference cannot
        # handle is still checked node by node with the types it declares.
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference failing is not a parse verdict
        typed = model
    violations = _model_rules(typed)
    violations += _graph_rules(typed.graph, _Scope(None), "", _default_opset(typed), top=True)
    return violations


def require_tensorrt_parse(path: str | Path, part_name: str) -> None:
    """Raise ``ExportError`` listing every violation if the graph at ``path`` fails the check.

    Raises:
        ExportError: the graph breaks at least one documented TensorRT parser restriction.
    """
    violations = check_tensorrt_parse(path)
    if violations:
        listed = "\n  ".join(str(v) for v in violations)
        # The file's name, not its path: during export the path is a staging directory that the
        # error removes.
        raise ExportError(f"{part_name} ({Path(path).name}): {len(violations)} TensorRT ONNX parser violation(s) "
                          f"(per {SOURCE}):\n  {listed}")


def check_bundle(bundle_dir: str | Path) -> dict[str, list[ParseViolation]]:
    """Check every ONNX part of a bundle (hashes verified first); parts of another format are left out.

    Returns:
        Part name -> its violations (empty when it passes), in manifest order.
    """
    from conceptseg_edge.manifest import load_bundle

    manifest = load_bundle(bundle_dir)
    return {name: check_tensorrt_parse(Path(bundle_dir) / part.file)
            for name, part in manifest.parts.items() if part.format == "onnx"}


class _Scope:
    """Names visible in one graph: its initializers, Constant outputs, inputs and producers, then the outer graph's."""

    def __init__(self, outer: _Scope | None) -> None:
        self.outer = outer
        self.constants: dict[str, Any] = {}  # name -> TensorProto (value readable) or None
        self.producers: dict[str, Any] = {}  # name -> NodeProto
        self.inputs: set[str] = set()
        self.types: dict[str, int] = {}  # name -> TensorProto data type, where declared or inferred

    def add_graph(self, graph) -> None:
        self.types.update(_tensor_types(graph))
        for init in graph.initializer:
            self.constants[init.name] = init
        self.inputs.update(i.name for i in graph.input if i.name not in self.constants)
        for node in graph.node:
            for out in node.output:
                self.producers[out] = node
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                self.constants[node.output[0]] = _constant_tensor(node)

    def lookup(self, table: str, name: str) -> tuple[bool, Any]:
        scope: _Scope | None = self
        while scope is not None:
            entries = getattr(scope, table)
            if name in entries:
                return True, entries[name] if isinstance(entries, dict) else None
            scope = scope.outer
        return False, None

    def dtype(self, name: str) -> str | None:
        from onnx import TensorProto

        found, code = self.lookup("types", name)
        return TensorProto.DataType.Name(code) if found else None

    def is_constant(self, name: str) -> bool:
        return self.lookup("constants", name)[0]

    def value(self, name: str):
        """The numpy value of a constant ``name`` (through Identity), or None when it is not one."""
        from onnx import numpy_helper

        found, tensor = self.lookup("constants", name)
        if found:
            return None if tensor is None else numpy_helper.to_array(tensor)
        _, node = self.lookup("producers", name)
        if node is not None and node.op_type == "Identity":
            return self.value(node.input[0])
        return None

    def value_sources(self, name: str) -> set[str]:
        """Graph inputs whose *values* (not only shapes) flow into ``name``; Shape/Size cut the flow."""
        sources, seen, todo = set(), set(), [name]
        while todo:
            current = todo.pop()
            if current in seen or not current or self.is_constant(current):
                continue
            seen.add(current)
            if self.lookup("inputs", current)[0]:
                sources.add(current)
                continue
            _, node = self.lookup("producers", current)
            if node is not None and node.op_type not in ("Shape", "Size"):
                todo.extend(node.input)
        return sources


def _constant_tensor(node):
    """A Constant node's value as a TensorProto (``value`` or a numeric ``value_*``), None for the others."""
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
            values = {"value_int": attr.i, "value_ints": list(attr.ints), "value_float": attr.f,
                      "value_floats": list(attr.floats)}[attr.name]
            dtype = np.int64 if "int" in attr.name else np.float32
            return numpy_helper.from_array(np.asarray(values, dtype=dtype), node.output[0])
    return None


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)


def _model_rules(model) -> list[ParseViolation]:
    low, high = OPSET_RANGE
    opset = _default_opset(model)
    if low <= opset <= high:
        return []
    return [ParseViolation("<graph>", "", "opset",
                           f"default-domain opset {opset}; TensorRT 10 supports opsets {low} to {high} inclusive")]


def _graph_rules(graph, outer: _Scope, prefix: str, opset: int, top: bool) -> list[ParseViolation]:
    scope = _Scope(outer)
    scope.add_graph(graph)
    violations: list[ParseViolation] = []
    for index, node in enumerate(graph.node):
        name = prefix + _node_name(node, index)
        violations += [ParseViolation(name, node.op_type, rule, detail) for rule, detail in _node_rules(node, scope, opset)]
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                violations += _graph_rules(sub, scope, f"{name}/{attr.name}/", opset, top=False)
    # A node whose op is unsupported is reported once, by that rule, not again for its tensors' types.
    refused = {v.node for v in violations if v.rule == "unsupported-op"}
    return violations + [v for v in _dtype_rules(graph, scope, prefix, top) if v.node not in refused]


def _node_name(node, index: int) -> str:
    return node.name or f"<{node.op_type} #{index}>"


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _at(names, index: int) -> str:
    """The ``index``-th input or output name, "" when it is absent (an omitted optional one)."""
    return names[index] if len(names) > index else ""


def _node_rules(node, scope: _Scope, opset: int) -> Iterator[tuple[str, str]]:
    if node.domain not in DEFAULT_DOMAINS:
        contrib = " (ONNX Runtime contrib ops)" if node.domain == "com.microsoft" else ""
        yield "unsupported-op", f"domain {node.domain!r}{contrib}: the support matrix lists ai.onnx operators only"
        return
    if node.op_type in UNSUPPORTED_OPS:
        yield "unsupported-op", f"{node.op_type} is marked unsupported (N) in the support matrix"
        return
    if node.op_type not in SUPPORTED_OPS:
        yield "unsupported-op", f"{node.op_type} is not in the support matrix"
        return
    attrs = _attrs(node)
    if node.op_type in INITIALIZER_INPUTS:
        index, what = INITIALIZER_INPUTS[node.op_type]
        source = _at(node.input, index)
        if source and not scope.is_constant(source):
            yield "initializer-input", f"input {index} `{what}` ({source!r}) must be an initializer, not a computed tensor"
    check = _OP_RULES.get(node.op_type)
    if check is not None:
        yield from check(node, attrs, scope, opset)


def _constant_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    for bad in ("sparse_value", "value_string", "value_strings"):
        if bad in attrs:
            yield "constant-attr", f"attribute `{bad}` is unsupported"


def _pool_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    dilations = attrs.get("dilations", [])
    if any(d != 1 for d in dilations):
        yield "pool-dilations", f"`dilations` {list(dilations)} must be empty or all ones"
    if node.op_type in ("AveragePool", "MaxPool") and len(attrs.get("kernel_shape", [])) not in (2, 3):
        yield "pool-rank", f"`kernel_shape` {list(attrs.get('kernel_shape', []))}: 2D or 3D pooling only"
    if node.op_type == "MaxPool" and _at(node.output, 1):
        yield "maxpool-indices", f"the `Indices` output ({node.output[1]!r}) is unsupported"


def _dropout_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    training = _at(node.input, 2)
    if training:
        value = scope.value(training)
        if value is None or bool(value):
            yield "dropout-training", f"input `training_mode` ({training!r}) must be an initializer that is False"


def _deform_conv_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    pads = list(attrs.get("pads", []))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        yield "deformconv-pads", f"`pads` {pads}: begin and end must be the same along each spatial axis"


def _qdq_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    types = QDQ_INPUT_TYPES[node.op_type]
    dtype = scope.dtype(node.input[0])
    if dtype is not None and dtype not in types:
        yield "qdq-type", f"input `x` ({node.input[0]!r}) is {dtype}; {node.op_type} supports {sorted(types)}"
    which = "x_zero_point" if node.op_type == "DequantizeLinear" else "y_zero_point"
    zero_point = _at(node.input, 2)
    if not zero_point:
        return
    value = scope.value(zero_point)
    if value is None:
        yield "qdq-zero-point", f"`{which}` ({zero_point!r}) is not a constant, so it cannot be shown to be 0"
    elif np.any(value.astype(np.float64)):
        nonzero = sorted({float(v) for v in value.astype(np.float64).ravel() if v})[:4]
        yield "qdq-zero-point", f"`{which}` ({zero_point!r}) must be 0; it holds {nonzero}"


def _if_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    then_out, else_out = attrs["then_branch"].output, attrs["else_branch"].output
    shared = sorted({o.name for o in then_out} & {o.name for o in else_out})
    if shared:
        yield "if-branches", f"output tensors of the two branches must have different names; both name {shared}"
    for a, b in zip(then_out, else_out):
        ta, tb = a.type.tensor_type, b.type.tensor_type
        if ta.HasField("shape") and tb.HasField("shape") and len(ta.shape.dim) != len(tb.shape.dim):
            yield "if-branches", (f"outputs {a.name!r} (rank {len(ta.shape.dim)}) and {b.name!r} "
                                  f"(rank {len(tb.shape.dim)}) must have the same rank")


def _layer_norm_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    extra = [o for o in node.output[1:] if o]
    if extra:
        yield "layernorm-outputs", f"only the first output `Y` is supported; also produces {extra}"


def _recurrent_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    activations = [_text(a) for a in attrs.get("activations", [])]
    if _text(attrs.get("direction", "forward")) == "bidirectional" and activations:
        half = len(activations) // 2
        if activations[:half] != activations[half:]:
            yield "rnn-activations", f"bidirectional: forward {activations[:half]} and reverse {activations[half:]} must match"
    if node.op_type == "LSTM":
        for name in ("input_forget", "layout"):
            if attrs.get(name, 0) != 0:
                yield f"lstm-{name.replace('_', '-')}", f"`{name}` must be 0, is {attrs[name]}"


def _onehot_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    depth = _at(node.input, 1)
    if not scope.is_constant(depth):
        yield "onehot-depth", f"input `depth` ({depth!r}) must be a build-time constant, not a computed tensor"


def _resize_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    if attrs.get("antialias", 0) != 0:
        yield "resize-antialias", f"`antialias`={attrs['antialias']}: antialiasing is not supported"
    mode = _text(attrs.get("mode", "nearest"))
    if mode not in RESIZE_MODES:
        yield "resize-mode", f"`mode`={mode!r}; supported: {sorted(RESIZE_MODES)}"
    transform = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    if transform not in RESIZE_COORDINATE_MODES:
        yield "resize-coordinate-mode", f"`coordinate_transformation_mode`={transform!r}; supported: {sorted(RESIZE_COORDINATE_MODES)}"
    policy = _text(attrs.get("keep_aspect_ratio_policy", "stretch"))
    if policy != "stretch":
        yield "resize-aspect-policy", f"`keep_aspect_ratio_policy`={policy!r}; only 'stretch' is supported"
    scales, axes = _at(node.input, 2), list(attrs.get("axes", []))
    if scales and axes and not scope.is_constant(scales) and axes != list(range(len(axes))):
        yield "resize-axes", f"`scales` ({scales!r}) is a tensor, so `axes` must be an iota vector; got {axes}"


def _scatter_nd_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    # The document: "`reduction` is not supported"; the 10.1 importer refuses the attribute's presence.
    if "reduction" in attrs:
        yield "scatternd-reduction", f"`reduction`={_text(attrs['reduction'])!r}: the attribute is not supported"


def _topk_rule(node, attrs, scope, opset) -> Iterator[tuple[str, str]]:
    if attrs.get("sorted", 1) != 1:
        yield "topk-sorted", f"`sorted`={attrs['sorted']} must be 1"
    if opset < 10:
        k_value, k_name = attrs.get("k"), "attribute k"
    else:
        k_name = _at(node.input, 1)
        value = scope.value(k_name)
        k_value = None if value is None else int(value.reshape(-1)[0])
        if value is None:
            # The importer reads K as a tensor (ITopKLayer::setInput(1, ...)): K computed from tensor
            # shapes is bounded by the engine's profile. K fed by a graph input's values is not.
            sources = scope.value_sources(k_name)
            if sources:
                yield "topk-k", (f"input `K` ({k_name!r}) takes its value from graph input(s) {sorted(sources)}: "
                                 f"not a constant, so K < {TOPK_K_LIMIT} cannot be guaranteed")
    if k_value is not None and k_value >= TOPK_K_LIMIT:
        yield "topk-k", f"`K`={k_value} ({k_name}); K must be less than {TOPK_K_LIMIT}"


_OP_RULES = {
    "Constant": _constant_rule, "AveragePool": _pool_rule, "MaxPool": _pool_rule, "LpPool": _pool_rule,
    "Dropout": _dropout_rule, "DeformConv": _deform_conv_rule, "QuantizeLinear": _qdq_rule,
    "DequantizeLinear": _qdq_rule, "If": _if_rule, "LayerNormalization": _layer_norm_rule, "GRU": _recurrent_rule,
    "LSTM": _recurrent_rule, "RNN": _recurrent_rule, "OneHot": _onehot_rule, "Resize": _resize_rule,
    "ScatterND": _scatter_nd_rule, "TopK": _topk_rule,
}


def _dtype_rules(graph, scope: _Scope, prefix: str, top: bool) -> list[ParseViolation]:
    """Tensor types outside the documented set; UINT8 inside the network; quantized types not from Q/DQ."""
    from onnx import TensorProto

    types = _tensor_types(graph)
    boundary = {v.name for v in graph.input} | {v.name for v in graph.output} if top else set()
    consumers: dict[str, list[tuple[Any, int]]] = {}
    names = {id(node): _node_name(node, index) for index, node in enumerate(graph.node)}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    violations = []
    for name, code in types.items():
        dtype = TensorProto.DataType.Name(code)
        _, producer = scope.lookup("producers", name)
        node = producer if producer is not None else next((n for n, _ in consumers.get(name, [])), None)
        at = (prefix + names.get(id(node), node.name), node.op_type) if node is not None else (prefix + "<graph>", "")
        if dtype not in SUPPORTED_DTYPES:
            violations.append(ParseViolation(*at, "dtype", f"tensor {name!r} is {dtype}; TensorRT supports "
                                                           f"{sorted(SUPPORTED_DTYPES)}"))
        elif dtype == "UINT8" and name not in boundary:
            violations.append(ParseViolation(*at, "dtype-uint8", f"tensor {name!r} is UINT8, which TensorRT supports "
                                                                 "only as a network input or output"))
        elif dtype in QUANTIZED_DTYPES:
            made_by_q = (producer is not None and producer.op_type == "QuantizeLinear") or scope.is_constant(name)
            used_by_qdq = all((n.op_type == "DequantizeLinear" and i in (0, 2)) or (n.op_type == "QuantizeLinear" and i == 2)
                              for n, i in consumers.get(name, []))
            if not (made_by_q and used_by_qdq):
                violations.append(ParseViolation(*at, "dtype-quantized", (
                    f"tensor {name!r} is {dtype}, which TensorRT takes only through quantization "
                    "(a QuantizeLinear output or a DequantizeLinear input)")))
    return violations


def _tensor_types(graph) -> Mapping[str, int]:
    types: dict[str, int] = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types
