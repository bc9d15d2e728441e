"""The real-size SAM2 profile: this runtime vs PyTorch eager vs ONNX Runtime's own SAM2 pipeline.

``python -m conceptseg_edge.benchmarks.real --out DIR [--sizes tiny large] [--runs N] [--warmup N] [--quick]``
(or ``conceptseg-edge bench --profile real --out DIR``) does, per SAM 2.1 size at ``--image-size``
(1024, the size users run):

1. write a seeded random-init checkpoint in the official ``.pt`` layout (``save_seeded_checkpoint``);
   speed does not depend on the weights' values, and all three sides load these same weights;
2. export our bundle from it (``export_sam2``) and ONNX Runtime's peer from it with ORT's own
   exporters (``onnxruntime.transformers.models.sam2``: ``export_image_encoder_onnx``, the multimask
   ``export_decoder_onnx``), then ORT's transformer fusions as ``convert_to_onnx.py --optimize`` applies
   them (``optimize_model(model_type="sam2", opt_level=1)``, fp32 CPU); each export in a fresh process
   (ORT's scripts run under the TorchScript exporter they were written for, see ``_torchscript_exporter``);
3. in one process, interleaved run by run (the sides' order rotating each run), after warm-up:
   the prompt route per stage (preprocess, encoder, decoder, postprocess) for one click on a
   480x640 image; a decoder-only call after ``set_image`` (a second click: the interactive case);
   and ``--batch`` clicks decoded in one batch;
4. peak RSS of each side serving the prompt route, each in a child process of its own (the child's
   ``VmHWM``, see ``own_peak_rss_mib``), so one model's memory never counts toward another's;
5. the limit: the encoder's FLOPs counted from our encoder graph (Conv / ConvTranspose / MatMul /
   Gemm MACs x 2, see ``graph_flops``) over its measured p50, as a fraction of this machine's fp32
   GEMM peak measured through the same ONNX Runtime with our encoder's session settings.

Output: ``DIR/real.json`` (machine, versions, commit, date, thread and session settings, providers
that ran, every series, ratios, targets met / not met / not evaluated), ``DIR/real.md``, ``DIR/real.png``,
rewritten after each size.

The sides: ``ours`` is ``SAM2Predictor`` on the bundle (numpy pre/post, ONNX Runtime); ``torch`` is
``SAM2Reference`` (``SAM2ImagePredictor``'s arithmetic on sam2's own modules, eager, float32);
``ort_peer`` is ORT's graphs in the sessions ``SAM2ImageOnnxPredictor`` makes (default session
options, CPU), fed as it feeds them, with ``SAM2ImagePredictor``'s torch preprocessing
(``SAM2Reference.preprocess``, the same arithmetic). The peer's decoder graph upsamples and
thresholds the masks itself, so its ``decoder`` stage holds what ours splits into decoder +
postprocess; its postprocess is only the pick of the best-scoring mask. A side that cannot be built
(ORT's exporters trace at 1024 px only, for instance) is named in the report with the reason, never
dropped silently. Targets (issue 14) are evaluated on p50 ratios from the same run; timings on a
loaded machine are upper bounds, and the report carries the stability flag of every series.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.benchmarks.prompt import STAGES, bench_image
from conceptseg_edge.benchmarks.scale import machine, save_seeded_checkpoint
from conceptseg_edge.benchmarks.scale_policy import PRESETS as POLICY_PRESETS
from conceptseg_edge.benchmarks.stats import StageSeries, all_stable, environment, own_peak_rss_mib, p50_ratio, stability_note
from conceptseg_edge.fileio import write_json, write_text

#: ``--sizes`` names → ``export sam2 --config`` names.
SIZES = {"tiny": "sam2.1_hiera_t", "small": "sam2.1_hiera_s", "base_plus": "sam2.1_hiera_b+", "large": "sam2.1_hiera_l"}
SIDES = ("ours", "torch", "ort_peer")
#: What a decoder-only call and a batched call time (the prompt route's second half).
DECODE_STAGES = ("decoder", "postprocess")
#: The only input size ORT's SAM2 exporters and predictor support (``sam2_utils.encoder_shape_dict``
#: asserts it; the exporters trace a fixed 1024 px dummy image and 256 x 256 mask input).
ORT_PEER_IMAGE_SIZE = 1024


#: What a stage or figure holds where the sides split the work differently (kept with every report).
SCOPE_NOTES = {
    "ort_peer.decoder": "prompt encoding + mask decoding + upsampling all masks to the image size + threshold "
                        "(all inside ORT's decoder graph); compare with ours' decoder + postprocess",
    "ort_peer.postprocess": "picking the best-scoring mask only",
    "ours.postprocess": "best-mask pick, then upsampling that one mask and thresholding (numpy)",
    "torch.postprocess": "upsampling all three masks and thresholding (as SAM2ImagePredictor)",
    "decoder_only": "a second click after set_image: decoder + postprocess",
    "batch": "N one-click prompt sets in one decoder call, then each one's postprocess",
    "mask_iou": "each side's route mask against torch's on the same weights; below 1.0 means the side's arithmetic "
                "differs (on a seeded tiny at 1024, ORT's unfused peer graphs matched torch to 5e-7 in the low-res "
                "logits and IoU 1.0, while its sam2-fused decoder moved them by up to 0.35: IoU 0.81)",
    "peak_rss.ort_peer": "includes torch and the SAM2 model SAM2ImageOnnxPredictor holds (it subclasses "
                         "SAM2ImagePredictor) besides ORT's two sessions",
}


@dataclass(frozen=True)
class Target:
    """One target of issue 14: ``numerator / denominator`` p50 of ``series``/``stage`` at most ``limit``."""

    series: str  # "route", "decoder_only"
    stage: str  # a stage or "total"
    denominator: str  # the side compared with
    limit: float

    @property
    def name(self) -> str:
        return f"{self.series}.{self.stage} ours/{self.denominator} <= {self.limit}"


TARGETS = (
    Target("route", "total", "torch", 0.7),
    *(Target("route", stage, "torch", 0.8) for stage in STAGES),
    *(Target("route", stage, "ort_peer", 1.0) for stage in ("encoder", "decoder", "total")),
    Target("decoder_only", "total", "torch", 0.8),
)


@dataclass(frozen=True)
class RealConfig:
    sizes: tuple[str, ...] = ("tiny", "large")
    image_size: int = 1024
    runs: int = 10
    warmup: int = 2
    batch: int = field(default=8, metadata={"help": "clicks decoded in one batch"})
    gemm_n: int = 2048
    rss: bool = True


# ---------------------------------------------------------------------------------------------- sides


def _click(image_hw: tuple[int, int], where: tuple[float, float]) -> tuple[float, float]:
    """A click at fractions of the image's width and height, in pixels (x, y)."""
    return (image_hw[1] * where[0], image_hw[0] * where[1])


#: The prompt route's click, the decoder-only call's second click, and the batch's clicks.
ROUTE_CLICK, SECOND_CLICK = (0.45, 0.55), (0.3, 0.4)


def batch_clicks(n: int) -> list[tuple[float, float]]:
    """``n`` distinct clicks spread over the image (fractions, as ``ROUTE_CLICK``)."""
    return [(0.1 + 0.8 * (i + 0.5) / n, 0.2 + 0.6 * ((i * 3) % n + 0.5) / n) for i in range(n)]


class OursSide:
    """``SAM2Predictor`` on the exported bundle: what a user of this runtime calls."""

    def __init__(self, bundle: Path) -> None:
        from conceptseg_edge.runtime.predictor import SAM2Predictor

        self.predictor = SAM2Predictor.from_bundle(bundle)

    def providers(self) -> dict[str, str]:
        return self.predictor.providers()

    def set_image(self, image: np.ndarray) -> dict[str, float]:
        self.predictor.set_image(image)
        return {k: self.predictor.image_timings[k] for k in ("preprocess", "encoder")}

    def click(self, point: tuple[float, float]) -> tuple[dict[str, float], np.ndarray]:
        out = self.predictor.predict(points=[point])
        return {k: out.timings[k] for k in DECODE_STAGES}, out.mask

    def batch(self, points: Sequence[tuple[float, float]]) -> dict[str, float]:
        from conceptseg_edge.preprocess import encode_prompts

        p = self.predictor
        t0 = time.perf_counter_ns()
        encoded = [encode_prompts(p.prompts(points=[pt]), p.image_hw, p.pre.image_size) for pt in points]
        coords = np.concatenate([c for c, _ in encoded])
        labels = np.concatenate([lab for _, lab in encoded])
        out = p.decode(coords, labels, np.zeros((len(points), 0, 256), np.float32))
        t1 = time.perf_counter_ns()
        for i in range(len(points)):
            p.postprocess(out, i, multimask=True)
        return {"decoder": (t1 - t0) / 1e6, "postprocess": (time.perf_counter_ns() - t1) / 1e6}


class TorchSide:
    """PyTorch eager: ``SAM2Reference`` on sam2's own modules (float32, CPU)."""

    def __init__(self, config: str, checkpoint: Path, image_size: int) -> None:
        from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model

        self.model = build_sam2_model(config, checkpoint, image_size).model.eval()
        self.ref = SAM2Reference(self.model)

    def providers(self) -> dict[str, str]:
        return {"all": "torch eager (CPU)"}

    def set_image(self, image: np.ndarray) -> dict[str, float]:
        import torch

        with torch.no_grad():
            self.ref.set_image(image)
        return dict(self.ref.image_timings)

    def click(self, point: tuple[float, float]) -> tuple[dict[str, float], np.ndarray]:
        pred = self.ref.predict(np.array([point]), np.array([1]), multimask_output=True)
        return {k: pred.timings[k] for k in DECODE_STAGES}, pred.masks[int(np.argmax(pred.scores))]

    def batch(self, points: Sequence[tuple[float, float]]) -> dict[str, float]:
        """``len(points)`` one-click prompt sets through sam2's mask decoder in one call (repeat_image)."""
        import torch
        import torch.nn.functional as F

        h, w = self.ref._orig_hw
        s = self.ref.image_size
        feats = self.ref._features
        t0 = time.perf_counter_ns()
        with torch.no_grad():
            coords = torch.tensor([[[x * s / w, y * s / h], [0.0, 0.0]] for x, y in points], dtype=torch.float32)
            labels = torch.tensor([[1, -1]] * len(points), dtype=torch.int32)
            tokens = torch.zeros(len(points), 0, 256)
            features = {"image_embed": feats["image_embed"], "high_res_feats_0": feats["high_res_feats"][0],
                        "high_res_feats_1": feats["high_res_feats"][1]}
            masks, iou, _ = self.ref.decode_all(features, coords, labels, tokens, None)
            t1 = time.perf_counter_ns()
            best = iou[:, 1:].argmax(dim=1)
            chosen = masks[:, 1:][torch.arange(len(points)), best][:, None]
            (F.interpolate(chosen, (h, w), mode="bilinear", align_corners=False) > 0.0).numpy()
        return {"decoder": (t1 - t0) / 1e6, "postprocess": (time.perf_counter_ns() - t1) / 1e6}


class OrtPeerSide:
    """ONNX Runtime's own SAM2 graphs, in the sessions and with the feeds ``SAM2ImageOnnxPredictor`` uses.

    Its decoder takes one prompt set per call: with ``num_labels`` > 1 the exported graph broadcasts
    ``has_input_masks`` ([num_labels]) against the mask embedding's last axis and fails (the exporter
    traced it with one label), so its batch of N prompts is reported as not run.
    """

    def __init__(self, encoder: Path, decoder: Path, preprocess: Callable[[np.ndarray], Any], image_size: int) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]  # create_ort_session's choice off CUDA
        self.encoder = ort.InferenceSession(str(encoder), None, providers=providers)
        self.decoder = ort.InferenceSession(str(decoder), None, providers=providers)
        self.preprocess = preprocess
        self.image_size = image_size
        self._features: dict[str, np.ndarray] = {}
        self._hw = (0, 0)

    def providers(self) -> dict[str, str]:
        return {"encoder": self.encoder.get_providers()[0], "decoder": self.decoder.get_providers()[0]}

    def set_image(self, image: np.ndarray) -> dict[str, float]:
        t0 = time.perf_counter_ns()
        x = self.preprocess(image).numpy()
        t1 = time.perf_counter_ns()
        names = [o.name for o in self.encoder.get_outputs()]
        self._features = dict(zip(names, self.encoder.run(names, {"image": x})))
        self._hw = image.shape[:2]
        return {"preprocess": (t1 - t0) / 1e6, "encoder": (time.perf_counter_ns() - t1) / 1e6}

    def _decode(self, points: Sequence[tuple[float, float]]) -> tuple[dict[str, float], np.ndarray]:
        h, w = self._hw
        s, n, low = self.image_size, len(points), self.image_size // 4
        t0 = time.perf_counter_ns()
        coords = (np.array(points, np.float32) * np.array([s / w, s / h], np.float32)).reshape(n, 1, 2)
        masks, iou, _ = self.decoder.run(None, {
            **self._features,
            "point_coords": coords,
            "point_labels": np.ones((n, 1), np.int32),
            "input_masks": np.zeros((n, 1, low, low), np.float32),
            "has_input_masks": np.zeros((n,), np.float32),
            "original_image_size": np.array([h, w], np.int32),
        })
        t1 = time.perf_counter_ns()
        chosen = masks[np.arange(n), iou.argmax(axis=1)]
        return {"decoder": (t1 - t0) / 1e6, "postprocess": (time.perf_counter_ns() - t1) / 1e6}, chosen

    def click(self, point: tuple[float, float]) -> tuple[dict[str, float], np.ndarray]:
        timings, masks = self._decode([point])
        return timings, masks[0]

    def batch(self, points: Sequence[tuple[float, float]]) -> dict[str, float]:
        return self._decode(points)[0]


# ------------------------------------------------------------------------------------------- exports


def ort_sam2_dir() -> Path:
    """ORT's SAM2 tools: scripts importing each other by flat module name, so their folder goes on sys.path."""
    import onnxruntime

    return Path(onnxruntime.__file__).parent / "transformers" / "models" / "sam2"


def ort_peer_unsupported(image_size: int) -> str | None:
    """Why ORT's peer cannot be built at ``image_size``, or None."""
    if image_size == ORT_PEER_IMAGE_SIZE:
        return None
    return (f"ONNX Runtime's SAM2 exporters support {ORT_PEER_IMAGE_SIZE} px only (they trace a fixed 1024 px dummy "
            f"image and a 256x256 mask input; sam2_utils.encoder_shape_dict asserts it); this run is at {image_size} px")


@contextmanager
def _torchscript_exporter() -> Iterator[None]:
    """``torch.onnx.export`` defaulting to the TorchScript exporter while ORT's tools call it.

    ORT's SAM2 exporters were written for it (they pass no ``dynamo``); torch >= 2.9 defaults to the
    dynamo exporter, under which ORT's decoder export fails ("1 not in VR[2, 4]" on its dynamic
    ``num_labels``). Our own export uses ``dynamo=False`` too, so both sides come from the same exporter.
    """
    import torch

    original = torch.onnx.export
    torch.onnx.export = functools.partial(original, dynamo=False)
    try:
        yield
    finally:
        torch.onnx.export = original


def export_ort_peer(config: str, checkpoint: str, image_size: int, out_dir: str) -> dict[str, Any]:
    """ORT's exporters on the same weights, then its SAM2 fusions (as ``convert_to_onnx.py --optimize``).

    Returns the graph paths (``encoder``, ``decoder``: the optimized ones when the optimizer ran) or
    ``error`` saying why the peer could not be built. Imports ORT's scripts under their flat names
    (``image_encoder``, ``sam2_utils``, ...): run it in a process of its own (``_in_fresh_process``).
    """
    unsupported = ort_peer_unsupported(image_size)
    if unsupported:
        return {"error": unsupported}
    import torch

    from conceptseg_edge.models.sam2 import build_sam2_model

    sys.path.insert(0, str(ort_sam2_dir()))
    from image_decoder import export_decoder_onnx  # ORT's tool, imported as its own scripts import it
    from image_encoder import export_image_encoder_onnx

    from onnxruntime.transformers.optimizer import optimize_model

    model = build_sam2_model(config, checkpoint, image_size).model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = {"encoder": out / "image_encoder.onnx", "decoder": out / "image_decoder_multi.onnx"}
    t0 = time.perf_counter()
    with torch.no_grad(), _torchscript_exporter():
        export_image_encoder_onnx(model, str(raw["encoder"]))
        export_decoder_onnx(model, str(raw["decoder"]), multimask_output=True)
    result: dict[str, Any] = {"export_seconds": round(time.perf_counter() - t0, 1)}
    for part, path in raw.items():
        optimized = path.with_name(path.stem + "_fp32_cpu.onnx")
        try:
            optimize_model(str(path), model_type="sam2", opt_level=1, use_gpu=False).save_model_to_file(str(optimized))
            result[part] = str(optimized)
            result[f"{part}_optimized"] = True
        except Exception as exc:  # the peer still runs, unfused; the report says so
            result[part] = str(path)
            result[f"{part}_optimized"] = f"optimize_model failed: {type(exc).__name__}: {exc}"
    return result


def export_ours(config: str, checkpoint: str, image_size: int, out: str) -> dict[str, Any]:
    from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2

    t0 = time.perf_counter()
    export_sam2(SAM2ExportConfig(config, checkpoint, image_size=image_size), out, progress=False)
    return {"export_seconds": round(time.perf_counter() - t0, 1)}


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a spawned process (its memory is freed when it ends); an exception → ``error``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}


@dataclass(frozen=True)
class Artifacts:
    """What one size's sides are built from."""

    config: str
    image_size: int
    checkpoint: str
    bundle: str
    peer: Mapping[str, Any]  # export_ort_peer's result

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "image_size": self.image_size, "checkpoint": self.checkpoint,
                "bundle": self.bundle, "peer": dict(self.peer)}


def build_side(name: str, art: Artifacts, torch_side: TorchSide | None = None):
    """One side, ready to time (the peer borrows ``torch_side``'s preprocessing when given one)."""
    if name == "ours":
        return OursSide(Path(art.bundle))
    if name == "torch":
        return TorchSide(art.config, Path(art.checkpoint), art.image_size)
    if "error" in art.peer:
        raise RuntimeError(art.peer["error"])
    if torch_side is None:
        torch_side = TorchSide(art.config, Path(art.checkpoint), art.image_size)  # the predictor holds the model
    return OrtPeerSide(Path(art.peer["encoder"]), Path(art.peer["decoder"]), torch_side.ref.preprocess, art.image_size)


# -------------------------------------------------------------------------------------------- timing


def time_sides(sides: Mapping[str, Any], runs: int, warmup: int, batch: int) -> dict[str, Any]:
    """Interleaved run by run (the sides' order rotating): route, decoder-only and batch series per side.

    A side whose batched call fails (ORT's decoder graph takes one prompt set only, see ``OrtPeerSide``)
    has no batch series; ``batch_not_run`` names it with the error.
    """
    image = bench_image()
    hw = image.shape[:2]
    route_click, second, clicks = _click(hw, ROUTE_CLICK), _click(hw, SECOND_CLICK), [_click(hw, c) for c in batch_clicks(batch)]
    names = list(sides)
    samples: dict[str, dict[str, list[Mapping[str, float]]]] = {n: {"route": [], "decoder_only": [], "batch": []} for n in names}
    masks: dict[str, np.ndarray] = {}
    batch_not_run: dict[str, str] = {}
    for i in range(warmup + runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            side = sides[n]
            image_t = side.set_image(image)
            click_t, mask = side.click(route_click)
            again_t, _ = side.click(second)
            batch_t = None
            if n not in batch_not_run:
                try:
                    batch_t = side.batch(clicks)
                except Exception as exc:  # a side without batched prompts: named, not hidden
                    batch_not_run[n] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:600]}"
            if i >= warmup:
                samples[n]["route"].append({**image_t, **click_t})
                samples[n]["decoder_only"].append(again_t)
                if batch_t is not None:
                    samples[n]["batch"].append(batch_t)
                masks.setdefault(n, mask)
    stages = {"route": STAGES, "decoder_only": DECODE_STAGES, "batch": DECODE_STAGES}
    series = {n: {kind: StageSeries.from_samples(xs, stages[kind]) for kind, xs in s.items() if xs}
              for n, s in samples.items()}
    return {"series": series, "masks": masks, "batch_not_run": batch_not_run}


def ratios(series: Mapping[str, Mapping[str, StageSeries]], denominator: str) -> dict[str, dict[str, float]]:
    """ours p50 / ``denominator`` p50, per series and stage (and total), for the series both sides have."""
    out: dict[str, dict[str, float]] = {}
    for kind, ours in series["ours"].items():
        theirs = series[denominator].get(kind)
        if theirs is None:
            continue
        out[kind] = {stage: p50_ratio(ours.stages[stage], theirs.stages[stage]) for stage in ours.stages}
        out[kind]["total"] = p50_ratio(ours.total, theirs.total)
    return out


def evaluate_targets(all_ratios: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict[str, Any]]:
    """Each target: the ratio and whether it is met, or why it could not be evaluated."""
    rows = []
    for t in TARGETS:
        r = all_ratios.get(t.denominator, {}).get(t.series, {}).get(t.stage)
        row: dict[str, Any] = {"target": t.name, "limit": t.limit, "ratio": r}
        row["met"] = None if r is None else r <= t.limit
        if r is None:
            row["why_not_evaluated"] = f"no {t.denominator} series"
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ the limit

#: Ops whose multiply-accumulates are counted (everything else is memory-bound and left out).
COUNTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def graph_flops(onnx_path: str | Path, input_shape: Sequence[int]) -> dict[str, Any]:
    """FLOPs (2 x MACs) of Conv / ConvTranspose / MatMul / Gemm with the graph's first input fixed to
    ``input_shape``. Shapes: ONNX Runtime's basic-level rewrite of the graph (constant folding turns the
    ``Shape`` arithmetic of the exported window partitions into constants once the input is static;
    its fusions are only MatMul + Add → Gemm and the like, which keep the MACs), then ONNX shape
    inference. Nodes whose shapes stay unknown are listed as ``uncounted`` (the count is then a lower bound)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path), load_external_data=False)
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, input_shape):
        d.Clear()
        d.dim_value = int(v)
    with tempfile.TemporaryDirectory(prefix="flops-") as tmp:
        fixed, folded = Path(tmp) / "fixed.onnx", Path(tmp) / "folded.onnx"
        onnx.save(model, str(fixed))
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):  # keep the weights reachable
            for f in Path(onnx_path).parent.iterdir():
                if f.is_file() and f.suffix != ".onnx":
                    (Path(tmp) / f.name).symlink_to(f.resolve())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        ort.InferenceSession(str(fixed), options, providers=["CPUExecutionProvider"])
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(folded), load_external_data=False), data_prop=True)
    shapes: dict[str, list[int] | None] = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        ds = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value for d in ds] if ds and all(d.HasField("dim_value") for d in ds) else None
    macs, per_op, uncounted = 0, dict.fromkeys(COUNTED_OPS, 0), []
    for node in inferred.graph.node:
        if node.op_type not in COUNTED_OPS:
            continue
        a, w, y = (shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0]))
        if a is None or w is None or y is None:
            uncounted.append(node.name or node.op_type)
            continue
        if node.op_type == "Conv":  # W: (Cout, Cin/groups, k...)
            n = math.prod(y) * math.prod(w[1:])
        elif node.op_type == "ConvTranspose":  # W: (Cin, Cout/groups, k...): every input pixel feeds Cout/groups x k
            n = math.prod(a) * math.prod(w[1:])
        elif node.op_type == "MatMul":
            n = math.prod(y) * a[-1]
        else:  # Gemm
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            n = math.prod(y) * (a[0] if trans_a else a[-1])
        macs += n
        per_op[node.op_type] += 2 * n
    return {"flops": 2 * macs, "flops_per_op": per_op, "uncounted_nodes": uncounted}


def gemm_peak(n: int = 2048, runs: int = 5) -> dict[str, Any]:
    """This machine's fp32 GEMM rate: an (n x n) @ (n x n) MatMul through ONNX Runtime with the session
    settings our encoder runs with (``SessionSettings()``, as every ``OrtEngine``), best of ``runs`` after
    one warm-up."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from conceptseg_edge.runtime.engine import session_options
    from conceptseg_edge.runtime.providers import SessionSettings

    spec = [n, n]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, spec),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, spec)],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, spec)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(SessionSettings()), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal(spec, dtype=np.float32), "b": rng.standard_normal(spec, dtype=np.float32)}
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "runs": runs, "best_ms": round(best * 1e3, 3), "gflops": round(2 * n**3 / best / 1e9, 2),
            "provider": sess.get_providers()[0]}


def encoder_limit(bundle: Path, image_size: int, encoder_p50_ms: float, peak: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's achieved FLOP rate as a fraction of the GEMM peak."""
    from conceptseg_edge.manifest import load_bundle

    part = load_bundle(bundle).parts["sam2_encoder"]
    counted = graph_flops(bundle / part.file, (1, 3, image_size, image_size))
    achieved = counted["flops"] / (encoder_p50_ms / 1e3) / 1e9
    return {**counted, "gflop": round(counted["flops"] / 1e9, 2), "encoder_p50_ms": encoder_p50_ms,
            "achieved_gflops": round(achieved, 2), "gemm_peak": dict(peak),
            "fraction_of_peak": round(achieved / peak["gflops"], 3),
            "op_types": op_type_profile(bundle / part.file, (1, 3, image_size, image_size))}


def op_type_profile(onnx_path: Path, input_shape: Sequence[int], top: int = 8) -> dict[str, Any]:
    """What dominates a graph's run: ONNX Runtime's own profiler (kernel time per op type, one run
    after a warm-up, our session settings), the ``top`` op types with their share of the kernel time."""
    import onnxruntime as ort

    from conceptseg_edge.runtime.engine import session_options
    from conceptseg_edge.runtime.providers import SessionSettings

    with tempfile.TemporaryDirectory(prefix="op-profile-") as tmp:
        options = session_options(SessionSettings())
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "encoder")
        sess = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feeds = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
        sess.run(None, feeds)  # the warm-up is profiled too: only the last run is counted
        sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"]
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3
    total = sum(per_op.values())
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    return {"provider": sess.get_providers()[0], "run_ms": round(runs[-1]["dur"] / 1e3, 1), "kernel_ms": round(total, 1),
            "top": [{"op": op, "ms": round(ms, 1), "share": round(ms / total, 3)} for op, ms in ranked[:top]]}


# ------------------------------------------------------------------------------------------ peak RSS


def rss_child(side: str, artifacts_json: str, warmup: int) -> dict[str, Any]:
    """In a child process: build one side, serve the prompt route ``warmup + 1`` times (at least twice:
    ONNX Runtime's memory pattern allocates its planned buffers from the second run on, which on
    SAM2.1-tiny at 1024 added ~600 MiB to the peak), report the peak."""
    art = Artifacts(**json.loads(Path(artifacts_json).read_text()))
    built = build_side(side, art)
    image = bench_image()
    for _ in range(max(warmup, 1) + 1):
        built.set_image(image)
        built.click(_click(image.shape[:2], ROUTE_CLICK))
    return {"peak_rss_mib": own_peak_rss_mib(), "torch_imported": "torch" in sys.modules}


def measure_rss(side: str, artifacts_json: Path, warmup: int, log: Path) -> dict[str, Any]:
    """Peak RSS of a child process serving ``side`` alone (``own_peak_rss_mib``, reported by the child)."""
    argv = [sys.executable, "-m", "conceptseg_edge.benchmarks.real", "--rss-child", side,
            "--artifacts", str(artifacts_json), "--warmup", str(warmup)]
    with log.open("w") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = " | ".join(log.read_text().strip().splitlines()[-3:])
    return {"peak_rss_mib": None, "error": f"exit {proc.returncode}" + (f": {tail}" if tail else "")}


# ------------------------------------------------------------------------------------------- profile


def mask_agreement(masks: Mapping[str, np.ndarray]) -> dict[str, float]:
    """IoU of each side's route mask with torch's: the sides ran the same weights."""
    from conceptseg_edge.metrics import iou

    return {f"{n}_vs_torch": round(iou(m.astype(bool), masks["torch"].astype(bool)), 4)
            for n, m in masks.items() if n != "torch" and "torch" in masks}


class Phases:
    """Wall seconds per phase of a size's profile, printed as they end (large takes long)."""

    def __init__(self, size: str, progress: bool) -> None:
        self.size, self.progress, self.seconds = size, progress, {}
        self._t = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._t, 1)
        self._t = now
        if self.progress:
            print(f"[real] {self.size}: {phase} {self.seconds[phase]} s", file=sys.stderr, flush=True)


def profile_size(size: str, cfg: RealConfig, workdir: Path, peak: Mapping[str, Any], progress: bool = True) -> dict[str, Any]:
    """One SAM 2.1 size: build the three sides, time them interleaved, their RSS apart, the limit."""
    config = SIZES[size]
    phases = Phases(size, progress)
    checkpoint = save_seeded_checkpoint(workdir / f"{config}.pt", config, cfg.image_size)
    phases.done("checkpoint")
    bundle = workdir / f"{config}-bundle"
    row: dict[str, Any] = {"size": size, "config": config, "image_size": cfg.image_size, "phase_seconds": phases.seconds,
                           "ours_export": _in_fresh_process(export_ours, config, str(checkpoint), cfg.image_size, str(bundle))}
    phases.done("export ours")
    unsupported = ort_peer_unsupported(cfg.image_size)
    row["ort_peer_export"] = {"error": unsupported} if unsupported else _in_fresh_process(
        export_ort_peer, config, str(checkpoint), cfg.image_size, str(workdir / f"{config}-ort"))
    phases.done("export ort_peer")
    if "error" in row["ours_export"]:
        row["error"] = f"our export failed: {row['ours_export']['error']}"
        return row
    art = Artifacts(config, cfg.image_size, str(checkpoint), str(bundle), row["ort_peer_export"])
    torch_side = TorchSide(config, checkpoint, cfg.image_size)
    sides: dict[str, Any] = {"ours": OursSide(bundle), "torch": torch_side}
    not_run: dict[str, str] = {}
    try:
        sides["ort_peer"] = build_side("ort_peer", art, torch_side)
    except Exception as exc:  # named in the report, never hidden
        not_run["ort_peer"] = str(exc)
    timed = time_sides(sides, cfg.runs, cfg.warmup, cfg.batch)
    phases.done("timing")
    series = timed["series"]
    all_ratios = {d: ratios(series, d) for d in series if d != "ours"}
    row |= {
        "providers": {n: s.providers() for n, s in sides.items()},
        "not_run": not_run,
        "batch_not_run": timed["batch_not_run"],
        "series": {n: {k: s.to_json() for k, s in kinds.items()} for n, kinds in series.items()},
        "stable": all_stable(s.stable for kinds in series.values() for s in kinds.values()),
        "ratio_ours_over": all_ratios,
        "targets": evaluate_targets(all_ratios),
        "mask_iou": mask_agreement(timed["masks"]),
        "limit": encoder_limit(bundle, cfg.image_size, series["ours"]["route"].stages["encoder"].p50, peak),
    }
    del sides, torch_side, timed
    phases.done("limit")
    if cfg.rss:
        art_json = workdir / f"{config}-artifacts.json"
        art_json.write_text(json.dumps(art.to_json()))
        row["peak_rss"] = {n: measure_rss(n, art_json, cfg.warmup, workdir / f"rss-{n}.log")
                           for n in SIDES if n not in not_run}
        ours, theirs = (row["peak_rss"].get(n, {}).get("peak_rss_mib") for n in ("ours", "torch"))
        if ours is not None and theirs is not None:
            row["targets"].append({"target": "peak_rss ours <= torch", "limit": 1.0,
                                   "ratio": round(ours / theirs, 3), "met": ours <= theirs})
        phases.done("peak rss")
    return row


def thread_settings() -> dict[str, Any]:
    """The thread and session settings each side ran with."""
    import torch

    from conceptseg_edge.runtime.providers import SessionSettings

    return {"ours_session": SessionSettings().to_json(),  # every OrtEngine's, and the GEMM peak's
            "ort_peer_session": "onnxruntime.SessionOptions() defaults (SAM2ImageOnnxPredictor passes none)",
            "threads_note": "0 threads = ONNX Runtime's default (one per physical core)",
            "torch_num_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}


def run_profile(cfg: RealConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """The whole profile; writes ``out``/real.json, real.md and real.png, returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "profile": "real", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "environment": environment(), "threads": thread_settings(),
        "config": {"sizes": list(cfg.sizes), "image_size": cfg.image_size, "runs": cfg.runs, "warmup": cfg.warmup,
                   "batch": cfg.batch, "gemm_n": cfg.gemm_n, "rss": cfg.rss},
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "timing_scope": __doc__.split("\n\n")[-1].split(". Targets")[0].replace("\n", " "),
        "scope_notes": SCOPE_NOTES,
        "sizes": [],
    }
    report["gemm_peak"] = gemm_peak(cfg.gemm_n)
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        for size in cfg.sizes:
            workdir = Path(tmp) / size
            workdir.mkdir()
            report["sizes"].append(profile_size(size, cfg, workdir, report["gemm_peak"], progress))
            report["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
            write_outputs(report, out)  # after each size: large takes long
    return report


# ------------------------------------------------------------------------------------------ renderers


def render_markdown(report: Mapping[str, Any]) -> str:
    m, th = report["machine"], report["threads"]
    lines = [f"# Real-size SAM2 profile ({report['date']})", "",
             f"Machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, {m['platform']}; python {m['python']}, "
             f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; commit {m['commit']}.",
             f"Threads: ours ORT intra-op {th['ours_session']['intra_op_threads']} (0 = default, spinning "
             f"{'on' if th['ours_session']['spinning'] else 'off'}), ORT peer ORT defaults, torch {th['torch_num_threads']}. "
             f"Load average {report['load_average_1m_at_start']} at start. "
             f"GEMM peak {report['gemm_peak']['gflops']} GFLOP/s ({report['gemm_peak']['n']}^3 MatMul, ORT).",
             f"{report['config']['runs']} runs after {report['config']['warmup']} warm-up, interleaved; p50 ms.", ""]
    for row in report["sizes"]:
        lines.append(f"## {row['config']} @ {row['image_size']} px")
        if "error" in row:
            lines += ["", f"Not run: {row['error']}", ""]
            continue
        series = row["series"]
        sides = list(series)
        lines += ["", "route: prompt" + stability_note(row["stable"]), "",
                  "| series | stage | " + " | ".join(f"{s} p50 ms" for s in sides) + " | ours/torch | ours/ort_peer |",
                  "|---|---|" + "---:|" * (len(sides) + 2)]
        for kind in ("route", "decoder_only", "batch"):
            for stage in series["ours"][kind]:
                cells = [f"{series[s][kind][stage]['p50']:.1f}" if kind in series[s] else "-" for s in sides]
                rs = [row["ratio_ours_over"].get(d, {}).get(kind, {}).get(stage) for d in ("torch", "ort_peer")]
                lines.append(f"| {kind} | {stage} | " + " | ".join(cells) + " | "
                             + " | ".join("-" if r is None else f"{r:.2f}" for r in rs) + " |")
        for side, why in row["not_run"].items():
            lines.append(f"\n{side} not run: {why}")
        for side, why in row.get("batch_not_run", {}).items():
            lines.append(f"\n{side}: no batch of {report['config']['batch']} prompts ({why})")
        lines += ["", "| target | ratio | met |", "|---|---:|---|"]
        for t in row["targets"]:
            lines.append(f"| {t['target']} | {'-' if t['ratio'] is None else t['ratio']} | "
                         f"{'not evaluated' if t['met'] is None else ('yes' if t['met'] else 'no')} |")
        if "peak_rss" in row:
            lines += ["", "Peak RSS (separate processes): " + ", ".join(
                f"{n} {r['peak_rss_mib']} MiB" + (f" ({r['error']})" if "error" in r else "") for n, r in row["peak_rss"].items())]
        lim = row["limit"]
        lines += ["", f"Limit: encoder {lim['gflop']} GFLOP in {lim['encoder_p50_ms']} ms = {lim['achieved_gflops']} GFLOP/s, "
                      f"{lim['fraction_of_peak']:.1%} of the GEMM peak"
                      + (f" ({len(lim['uncounted_nodes'])} nodes uncounted: a lower bound)" if lim["uncounted_nodes"] else "") + ".",
                  f"Mask IoU with torch: {row['mask_iou']}."]
        if "op_types" in lim:
            ops = lim["op_types"]
            lines.append(f"What the encoder spends its time on (ONNX Runtime profiler, one run, {ops['run_ms']} ms): "
                         + ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops["top"]) + ".")
        lines.append("")
    if "concept" in report:
        from conceptseg_edge.benchmarks.real_concept import render_markdown as concept_markdown

        lines.append(concept_markdown(report["concept"]))
    return "\n".join(lines)


def plot(report: Mapping[str, Any], png: Path) -> Path:
    """Left: the prompt route's p50 per stage, stacked, one bar per size x side. Right: the decoder-only
    call's and the batch's p50 totals (the interactive cases, invisible at the route's scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptseg_edge.visualize import save_figure

    rows = [(f"{row['size']}\n{side}", s) for row in report["sizes"] if "series" in row for side, s in row["series"].items()]
    labels = [label for label, _ in rows]
    fig, (route_ax, decode_ax) = plt.subplots(1, 2, figsize=(max(10, 2.4 * len(rows)), 4))
    bottom = np.zeros(len(rows))
    for stage in STAGES:
        vals = np.array([series["route"][stage]["p50"] for _, series in rows])
        route_ax.bar(labels, vals, bottom=bottom, label=stage)
        bottom += vals
    route_ax.set_ylabel("p50 latency (ms)")
    route_ax.set_title(f"prompt route @ {report['config']['image_size']} px, {report['machine']['cpus']} CPUs")
    route_ax.legend(fontsize=8)
    x = np.arange(len(rows))
    for offset, kind in ((-0.2, "decoder_only"), (0.2, "batch")):
        vals = [series[kind]["total"]["p50"] if kind in series else 0.0 for _, series in rows]
        decode_ax.bar(x + offset, vals, width=0.4, label=kind if kind != "batch" else f"batch of {report['config']['batch']}")
    decode_ax.set_xticks(x, labels)
    decode_ax.set_ylabel("p50 latency (ms)")
    decode_ax.set_title("after set_image (0: not run)")
    decode_ax.legend(fontsize=8)
    return save_figure(fig, png)


def write_outputs(report: Mapping[str, Any], out: Path) -> None:
    write_json(out / "real.json", report)
    write_text(out / "real.md", render_markdown(report) + "\n")
    plot(report, out / "real.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conceptseg_edge.benchmarks.real", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for real.json, real.md, real.png")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(RealConfig.sizes))
    parser.add_argument("--image-size", type=int, default=RealConfig.image_size,
                        help="input size (SAM 2.1: 1024; ORT's peer runs at 1024 only)")
    parser.add_argument("--runs", type=int, default=None, help=f"timed runs (default {RealConfig.runs}, --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help=f"warm-up runs (default {RealConfig.warmup}, --quick 1)")
    parser.add_argument("--batch", type=int, default=RealConfig.batch, help="clicks decoded in one batch")
    parser.add_argument("--quick", action="store_true", help="3 runs, 1 warm-up, a 1024^3 GEMM")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--concept", default="3b", choices=["none", *sorted(POLICY_PRESETS)],
                        help="then the concept routes on a bundle with this policy architecture "
                             "(benchmarks/real_concept.py, into OUT/concept; 3b: ~50 min, ~15 GB peak)")
    parser.add_argument("--rss-child", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side, in a child
    parser.add_argument("--artifacts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.artifacts, args.warmup or 0)))
        return 0
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import writable_output

    if args.out is None:
        parser.error("--out is required")
    runs = args.runs if args.runs is not None else (3 if args.quick else RealConfig.runs)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else RealConfig.warmup)
    if runs < 1 or warmup < 0 or args.batch < 1:
        raise InputError(f"--runs {runs} / --warmup {warmup} / --batch {args.batch}: need runs >= 1, warmup >= 0, batch >= 1")
    writable_output(args.out, "--out", directory=True)
    cfg = RealConfig(tuple(args.sizes), args.image_size, runs, warmup, args.batch,
                     1024 if args.quick else RealConfig.gemm_n, not args.no_rss)
    report = run_profile(cfg, args.out)
    failed = any("error" in row for row in report["sizes"])
    if args.concept != "none":
        from conceptseg_edge.benchmarks import real_concept

        failed |= real_concept.main(["--out", str(args.out / "concept"), "--preset", args.concept,
                                     "--image-size", str(args.image_size)]) != 0
        report["concept"] = json.loads((args.out / "concept" / "real_concept.json").read_text())
        write_outputs(report, args.out)
    print(render_markdown(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
