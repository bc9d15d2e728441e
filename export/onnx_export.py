"""torch module → ONNX file → validated ``PartManifest``.

Exports validate themselves: the written graph is run in ONNX Runtime on every parity case, compared
output by output with the eager reference within the part's ``atol``, and checked for banned ops.
All parts are measured before anything is raised, so the error lists every failure at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import ExportParityError
from conceptseg_edge.fileio import atomic_path, sha256_file
from conceptseg_edge.manifest import ParityReport, PartManifest
from conceptseg_edge.export.parts import PartSpec

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
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag Python-side shape branches (Hiera's padding); the parity check that
        # follows is what tells whether the trace is valid for other shapes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
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


def graph_op_types(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two logit tensors binarised at 0 (1.0 when both are empty)."""
    a, b = a > 0, b > 0
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def check_parity(
    spec: PartSpec, path: Path, cases: Sequence[Feeds], reference: Reference, reference_name: str
) -> ParityReport:
    """Run the graph in ONNX Runtime on each case and compare with ``reference``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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
            ious.append(mask_iou(got[mask_output], want[mask_output]))
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
) -> PartManifest:
    """Export ``module`` into ``bundle_dir``, validate it, and describe it for the manifest.

    Raises:
        ExportParityError: an output differs past its ``atol``, the mask IoU is below the floor,
            or the graph holds a banned op.
    """
    path = bundle_dir / spec.file
    export_part(module, spec, cases[0], path, opset)
    banned = graph_op_types(path) & spec.forbidden_ops
    if banned:
        raise ExportParityError(f"{spec.name}: graph contains ops {sorted(banned)} that TensorRT/serving forbid")
    report = check_parity(spec, path, cases, reference, reference_name)
    if not report.passed:
        diffs = ", ".join(f"{n}={d:.3g} (atol {report.atol[n]:.0e})" for n, d in report.max_abs_diff.items())
        iou = f", mask IoU {report.mask_iou:.4f} (floor {spec.min_mask_iou})" if report.mask_iou is not None else ""
        raise ExportParityError(f"{spec.name}: ONNX Runtime disagrees with {reference_name}: {diffs}{iou}")
    return PartManifest(
        name=spec.name,
        file=spec.file,
        sha256=sha256_file(path),
        format="onnx",
        precision="fp32",
        opset=opset,
        inputs=spec.inputs,
        outputs=spec.outputs,
        parity=report,
    )
