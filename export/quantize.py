"""Quantization: the optional step after ``export_and_validate``, on the fp32 graph it wrote.

A quantized part is the validated fp32 part with its weights quantized by ONNX Runtime's tools:
same name, inputs and outputs, another file hash and precision. It cannot meet the fp32 ``atol``,
so its ``parity`` is left empty here: the family that quantizes it measures its behaviour and
records a ``QuantizedParity`` (the policy decoder: ``export/policy.py``).

* ``int8``: ``quantize_dynamic``, int8 weights, per-tensor, MatMuls with a constant weight,
  activations quantized at run time.
* ``int4``: ``MatMulNBitsQuantizer`` (RTN, symmetric, block ``INT4_BLOCK_SIZE``) with
  ``INT4_ACCURACY_LEVEL``: int4 weights, activations quantized to int8 per block at run time.

The tools run one MatMul at a time (``quantize_graph``), so graphs with external data of any size
are quantized with one weight in memory; the result is the whole-graph tools' (measured identical
outputs, bit for bit, on the tiny decoder).

Both read weights from initializers, so the fp32 graph must store them as fp32 (``weight_storage``
"fp32": an fp16-stored weight reaches its MatMul through a Cast, and would be skipped).

Both are ONNX-Runtime-only formats: TensorRT's ONNX parser refuses ``DynamicQuantizeLinear`` and
``MatMulInteger`` (int8) and the ``com.microsoft`` ``MatMulNBits`` (int4). The fp32 graph they start
from passed ``export/trt_check.py`` inside ``export_and_validate``; the quantized copy is deliberately
not checked here, since ONNX Runtime is its target. An engine build refuses it with
``check_tensorrt_parse``, and ``conceptseg-edge export check`` reports it as violations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from conceptseg_edge.errors import InputError
from conceptseg_edge.export.external import INLINE_MAX_BYTES, DataWriter, data_path
from conceptseg_edge.export.parts import check_precision
from conceptseg_edge.fileio import atomic_paths, sha256_file
from conceptseg_edge.manifest import PartManifest

INT4_BLOCK_SIZE = 32  # the tiny test model's hidden size is 128; 32 divides every K down to tiny sizes
#: MatMulNBits' ``accuracy_level`` 4: int8 activations, so ONNX Runtime's CPU kernel multiplies in int8
#: (MLAS CompInt8) instead of dequantizing every block to fp32 first. Measured on a 2048x11008 MatMul
#: (the 3B MLP) at one token: 1.54 ms vs 4.92 ms at level 0 and 6.58 ms in fp32, error vs fp32 0.078
#: of the output's max at both levels (the 4-bit weights dominate it); at 300 tokens the levels are even.
INT4_ACCURACY_LEVEL = 4


def quantize_graph(src: Path, dst: Path, precision: str) -> None:
    """Write a ``precision`` ("int8" or "int4") copy of the fp32 graph ``src`` to ``dst`` atomically.

    One MatMul at a time, so a graph with external data (``export/external.py``: a 3B decoder is
    11 GB of fp32) is never held whole: each MatMul whose B is a 2-D fp32 initializer is cut out as
    a one-node model with only that weight loaded, quantized by ONNX Runtime's own tool, and its
    nodes and initializers are spliced back in its place. The tools quantize each weight on its own
    anyway (INT8: one per-tensor scale per weight, activations by ``DynamicQuantizeLinear`` at run
    time; INT4: blockwise per weight), so the result is what a whole-graph run gives, except that
    each MatMul first gets its own ``DynamicQuantizeLinear``: those reading the same activation are
    merged afterwards. A source with external data gets ``<dst>.data``; a self-contained one stays
    self-contained.
    """
    import onnx

    check_precision(precision, f"precision {precision!r}")
    if precision == "fp32":
        raise InputError(f"precision: {precision!r} is not a quantized precision")
    model = onnx.load(str(src), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    target = data_path(dst)
    quiet = _QuietTools()
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    for log in loggers:
        log.addFilter(quiet)
    try:
        _splice_quantized(src, dst, target, model, precision, external)
    finally:
        for log in loggers:
            log.removeFilter(quiet)


def _splice_quantized(src: Path, dst: Path, target: Path, model, precision: str, external: bool) -> None:
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    with atomic_paths(dst, target) as (tmp_graph, tmp_data), open(tmp_data, "wb") as handle:
        writer = DataWriter(handle, target.name, INLINE_MAX_BYTES if external else math.inf)
        nodes, tensors, opsets = [], [], {}
        for node in graph.node:
            weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2:
                nodes.append(node)
                continue
            array = numpy_helper.to_array(weight, base_dir=str(src.parent))
            mini = _quantize_matmul(array, precision, model.opset_import)
            del array
            prefix = f"{node.name or node.output[0]}/q"
            rename = {"A": node.input[0], "Y": node.output[0]}
            rename.update({n: f"{prefix}/{n}" for n in _names(mini.graph) if n not in rename and n})
            for q in mini.graph.node:
                q.input[:] = [rename.get(n, n) for n in q.input]
                q.output[:] = [rename.get(n, n) for n in q.output]
                q.name = f"{prefix}/{q.name}"
                nodes.append(q)
            for t in mini.graph.initializer:
                tensors.append(writer.tensor(numpy_helper.to_array(t), rename[t.name]))
            opsets.update({o.domain: o.version for o in mini.opset_import})
        nodes = _merge_dynamic_quantize(nodes)
        read = {n for node in nodes for n in node.input}
        for t in graph.initializer:  # what stays fp32: copied one tensor at a time
            if t.name in read:
                tensors.append(writer.tensor(numpy_helper.to_array(t, base_dir=str(src.parent)), t.name))
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(tensors)
        known = {o.domain for o in model.opset_import}
        model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items() if d not in known)
        Path(tmp_graph).write_bytes(model.SerializeToString())
        stored = writer.offset
    if not stored:
        target.unlink()


def _quantize_matmul(weight, precision: str, opset_import):
    """A one-MatMul model ``Y = A @ W`` with ``weight`` as W, quantized by ONNX Runtime's tool."""
    import tempfile

    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="MatMul")], "matmul",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    mini = helper.make_model(graph, opset_imports=list(opset_import))
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(prefix=".quantize-") as tmp:
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(
                mini,
                str(out),
                op_types_to_quantize=["MatMul"],
                # Per-tensor: ORT's per-channel MatMul path measured worse here (agreement 0.943 vs
                # 0.984, cosine 0.9992 vs 0.9994 on the tiny model).
                per_channel=False,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
            return onnx.load(str(out))
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(mini, bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=INT4_ACCURACY_LEVEL)
    quantizer.process()
    return quantizer.model.model


class _QuietTools(logging.Filter):
    """Drops the tools' per-node INFO lines and their advice to pre-process (once per one-node model)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO and not record.getMessage().startswith("Please consider to run pre-processing")


def _names(graph) -> set[str]:
    return {n for node in graph.node for n in (*node.input, *node.output)} | {t.name for t in graph.initializer}


def _merge_dynamic_quantize(nodes: list) -> list:
    """Keep one ``DynamicQuantizeLinear`` per quantized activation (q/k/v, gate/up read one each)."""
    first: dict[str, list[str]] = {}
    alias: dict[str, str] = {}
    kept = []
    for node in nodes:
        node.input[:] = [alias.get(n, n) for n in node.input]
        if node.op_type == "DynamicQuantizeLinear":
            if node.input[0] in first:
                alias.update(zip(node.output, first[node.input[0]]))
                continue
            first[node.input[0]] = list(node.output)
        kept.append(node)
    return kept


def quantize_part(part: PartManifest, src_dir: Path, out_dir: Path, precision: str) -> PartManifest:
    """Quantize the validated fp32 ``part`` (its file in ``src_dir``) into ``out_dir``.

    Returns the part as it now sits in ``out_dir``: ``precision`` set, the new file's hash, no
    ``parity`` (the fp32 tolerances no longer apply; the caller attaches a ``QuantizedParity``).

    Raises:
        InputError: ``precision`` is not a quantized precision, or ``part`` is not an fp32 graph
            with fp32-stored weights.
    """
    check_precision(precision, f"precision {precision!r}")
    if part.precision != "fp32" or part.weight_storage != "fp32":
        raise InputError(
            f"{part.name}: quantization starts from an fp32 graph with fp32-stored weights "
            f"(got precision {part.precision}, weight storage {part.weight_storage})"
        )
    quantize_graph(Path(src_dir) / part.file, Path(out_dir) / part.file, precision)
    return dataclasses.replace(part, sha256=sha256_file(Path(out_dir) / part.file), precision=precision, parity=None)
