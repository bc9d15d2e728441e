"""torch module → ONNX file → validated ``PartManifest``: the one export path every part takes.

Exports validate themselves: the written graph (its large weights stored as the chosen
``WeightStorage``) is run in ONNX Runtime on every parity case, compared output by output with the
eager reference within the part's ``atol``, and checked for banned ops and against TensorRT's documented
ONNX parser support (``export/trt_check.py``). All outputs are measured
before anything is raised, so the error lists every failure at once. Quantization
(``export/quantize.py``) is an optional step after this one, on the fp32 graph it produced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import ExportParityError, InputError
from conceptseg_edge.export.external import StreamedWeights, bind_weights, data_path, export_unbound, quiet_tracing
from conceptseg_edge.export.parts import STORAGE_MIN_ELEMENTS, PartSpec, weight_storage
from conceptseg_edge.export.trt_check import require_tensorrt_parse
from conceptseg_edge.fileio import atomic_path, sha256_file
from conceptseg_edge.manifest import ParityReport, PartManifest
from conceptseg_edge.metrics import iou as mask_iou

Feeds = Mapping[str, np.ndarray]
Reference = Callable[[Feeds], Mapping[str, np.ndarray]]

# torch.onnx has two exporters; pin one. The TorchScript exporter honours opset 17 (the TensorRT 8.6+
# / Jetson-friendly default) and handles zero-sized dynamic dims (K = 0 concept tokens) without the
# 0/1 specialisation torch.export applies to symbolic sizes.
EXPORTER = "torchscript"


def export_part(module, spec: PartSpec, example: Feeds, path: Path, opset: int) -> None:
    """Trace ``module`` on ``example`` and write the graph to ``path`` atomically."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[name])) for name in spec.input_names)
    with atomic_path(path) as tmp, torch.no_grad(), quiet_tracing():
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def store_weights(path: Path, storage: str, min_elements: int = STORAGE_MIN_ELEMENTS) -> int:
    """Rewrite ``path`` so its large fp32 initializers are stored as ``storage`` with a Cast back.

    Each float32 initializer of at least ``min_elements`` elements becomes ``<name>__<storage>``
    in the storage dtype, and a ``Cast(to=FLOAT)`` at the head of the graph produces the original
    name, so every consumer (and the graph's arithmetic) is unchanged. ONNX Runtime folds these
    casts into fp32 initializers when the session is created. An initializer with values beyond
    the storage dtype's finite range stays fp32. Returns how many initializers were converted;
    ``fp32`` is a no-op.
    """
    declared = weight_storage(storage, f"weight storage '{storage}'")
    if declared.onnx_dtype == 1:
        return 0
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(declared.onnx_dtype)
    limit = float(np.finfo(np_dtype).max)
    # Large float Constant nodes (folded buffers such as the decoder's dense positional encoding)
    # become initializers first, so they are stored the same way.
    nodes, lifted = [], []
    for node in model.graph.node:
        tensor = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if tensor is not None and node.attribute[0].name == "value" and tensor.data_type == onnx.TensorProto.FLOAT \
                and int(np.prod(tensor.dims)) >= min_elements:
            lifted.append(numpy_helper.from_array(numpy_helper.to_array(tensor), node.output[0]))
        else:
            nodes.append(node)
    kept, casts = [], []
    for init in [*model.graph.initializer, *lifted]:
        if init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        value = numpy_helper.to_array(init)
        if not np.isfinite(value).all() or np.abs(value).max() > limit:
            kept.append(init)
            continue
        stored = f"{init.name}__{storage}"
        kept.append(numpy_helper.from_array(value.astype(np_dtype), stored))
        casts.append(helper.make_node("Cast", [stored], [init.name], name=f"{stored}_to_fp32", to=onnx.TensorProto.FLOAT))
    if not casts:
        return 0
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = [*casts, *nodes]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return len(casts)


def graph_op_types(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def check_parity(
    spec: PartSpec, path: Path, cases: Sequence[Feeds], reference: Reference, reference_name: str
) -> ParityReport:
    """Run the graph in ONNX Runtime on each case and compare with ``reference``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if data_path(path).is_file():
        # Pre-packing copies every MatMul weight into a second layout: for a graph whose weights
        # live in external data (too large for one protobuf) that doubles the session's memory.
        options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = {name: 0.0 for name in spec.output_names}
    ious: list[float] = []
    mask_output = spec.outputs[0].name
    for feeds in cases:
        got = dict(zip(spec.output_names, session.run(spec.output_names, dict(feeds))))
        want = reference(feeds)
        for name in spec.output_names:
            if got[name].shape != want[name].shape:
                raise ExportParityError(
                    f"{spec.name}.{name}: shape {got[name].shape} from ONNX Runtime, {want[name].shape} from torch"
                )
            worst[name] = max(worst[name], float(np.abs(got[name] - want[name]).max(initial=0.0)))
        if spec.min_mask_iou is not None:
            # Every mask of the batch at logit 0, pooled (rows stacked into one 2-D mask).
            width = got[mask_output].shape[-1]
            ious.append(float(mask_iou((got[mask_output] > 0).reshape(-1, width), (want[mask_output] > 0).reshape(-1, width))))
    iou = min(ious) if ious else None
    passed = all(worst[n] <= spec.atol[n] for n in worst) and (iou is None or iou >= spec.min_mask_iou)
    return ParityReport(reference=reference_name, max_abs_diff=worst, atol=dict(spec.atol), passed=passed, mask_iou=iou)


def export_and_validate(
    module,
    spec: PartSpec,
    cases: Sequence[Feeds],
    reference: Reference,
    reference_name: str,
    bundle_dir: Path,
    opset: int,
    weight_storage: str = "fp32",
    streamed: StreamedWeights | None = None,
) -> PartManifest:
    """Export ``module`` into ``bundle_dir``, validate it, and describe it for the manifest.

    ``weight_storage`` (a name in ``parts.WEIGHT_STORAGES``) picks how large initializers are stored;
    parity is then checked against the fp32 torch reference with that storage's tolerances.
    ``streamed`` exports the graph without weights and streams them into ``<file>.data``
    (``export/external.py``: graphs past 2 GB, modules that never hold their weights); fp32 storage only.

    Raises:
        ExportParityError: an output differs past its ``atol``, the mask IoU is below the floor,
            or the graph holds a banned op.
        ExportError: the graph breaks a documented TensorRT ONNX parser restriction
            (``export/trt_check.py``); checked before parity, so no time is spent validating it.
    """
    spec = spec.with_storage(weight_storage)
    path = bundle_dir / spec.file
    if streamed is None:
        export_part(module, spec, cases[0], path, opset)
        store_weights(path, weight_storage)
    else:
        if weight_storage != "fp32":
            raise InputError(f"{spec.name}: streamed weights are stored as fp32 (got weight storage {weight_storage})")
        with streamed.tracing():
            export_unbound(module, spec, cases[0], path, opset)
        bind_weights(path, spec, streamed.resolve)
    banned = graph_op_types(path) & spec.forbidden_ops
    if banned:
        raise ExportParityError(f"{spec.name}: graph contains ops {sorted(banned)} that TensorRT/serving forbid")
    require_tensorrt_parse(path, spec.name)  # the caller's staged bundle directory drops the file on raise
    with streamed.reference() if streamed is not None else nullcontext():
        report = check_parity(spec, path, cases, reference, reference_name)
    if not report.passed:
        diffs = ", ".join(f"{n}={d:.3g} (atol {report.atol[n]:.0e})" for n, d in report.max_abs_diff.items())
        iou = f", mask IoU {report.mask_iou:.4f} (floor {spec.min_mask_iou})" if report.mask_iou is not None else ""
        raise ExportParityError(
            f"{spec.name} ({weight_storage} weights): ONNX Runtime disagrees with {reference_name}: {diffs}{iou}"
        )
    return PartManifest(
        name=spec.name,
        file=spec.file,
        sha256=sha256_file(path),
        format="onnx",
        precision="fp32",
        opset=opset,
        weight_storage=weight_storage,
        inputs=spec.inputs,
        outputs=spec.outputs,
        parity=report,
    )
