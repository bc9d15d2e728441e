"""Quantization: the optional step after ``export_and_validate``, on the fp32 graph it wrote.

A quantized part is the validated fp32 part with its weights quantized by ONNX Runtime's tools:
same name, inputs and outputs, another file hash and precision. It cannot meet the fp32 ``atol``,
so its ``parity`` is left empty here: the family that quantizes it measures its behaviour and
records a ``QuantizedParity`` (the policy decoder: ``export/policy.py``).

* ``int8``: ``quantize_dynamic``, int8 weights, per-tensor, MatMul/Gemm only, activations
  quantized at run time.
* ``int4``: weight-only ``MatMulNBitsQuantizer`` (RTN, symmetric, block ``INT4_BLOCK_SIZE``, fp32
  compute).

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
from pathlib import Path

from conceptseg_edge.errors import InputError
from conceptseg_edge.export.parts import check_precision
from conceptseg_edge.fileio import atomic_path, sha256_file
from conceptseg_edge.manifest import PartManifest

INT4_BLOCK_SIZE = 32  # the tiny test model's hidden size is 128; 32 divides every K down to tiny sizes


def quantize_graph(src: Path, dst: Path, precision: str) -> None:
    """Write a ``precision`` ("int8" or "int4") copy of the fp32 graph ``src`` to ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(src),
                str(tmp),
                op_types_to_quantize=["MatMul", "Gemm"],
                # Per-tensor: ORT's per-channel MatMul path measured worse here (agreement 0.943 vs
                # 0.984, cosine 0.9992 vs 0.9994 on the tiny model).
                per_channel=False,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        elif precision == "int4":
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # The quantizer logs one INFO line per graph node; keep export output readable.
            log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
            level = log.level
            log.setLevel(max(level, logging.WARNING))
            try:
                quantizer = MatMulNBitsQuantizer(
                    onnx.load(str(src)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True
                )
                quantizer.process()
                quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
            finally:
                log.setLevel(level)
        else:
            raise InputError(f"precision: {precision!r} is not a quantized precision")


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
