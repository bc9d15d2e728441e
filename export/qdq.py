"""``export qdq``: explicit quantization (Q/DQ ONNX) of a bundle's parts, measured on ONNX Runtime CPU.

TensorRT builds an INT8 / FP8 engine from a graph whose ``QuantizeLinear``/``DequantizeLinear`` pairs
say where and with which scales to quantize (explicit quantization; TensorRT 10 deprecates implicit
INT8 calibration). This module writes such graphs here, without a GPU, and measures them before
anything trusts them:

1. Calibration: the fp32 bundle runs through the runtime (``ConceptSegmenter``) on calibration
   images, on every route the bundle has (prompt with a box, shortcut and reason with the query),
   through a ``RecordingFactory`` that wraps the real ``OrtEngine`` of each part and keeps every
   run's feeds: the decoder and the CTM are calibrated on what they really see in use.
2. Quantization, per part: ONNX Runtime's ``quantize_static`` in QDQ format on those feeds.
3. Measurement, per part, on held-out images the calibration never saw: the bundle with only this
   part quantized against the fp32 bundle (end-to-end mask IoU, same prompts and queries, on the
   routes that run the part) and the part's own max |diff| per output on the held-out feeds.
4. A part at or above its floor ships its Q/DQ graph (precision "int8"/"fp8", ``qdq`` record);
   one below keeps its fp32 graph and records the measurement that decided (``passed`` false).

Tool choice. ModelOpt's ONNX PTQ needs onnxruntime-gpu, which cannot share a venv with onnxruntime
(docs: stack-notes "Q/DQ (explicit INT8) on CPU"). Measured there on a random SAM2.1-tiny, ORT's
placement below gave encoder end-to-end IoU 0.91 vs ModelOpt's 0.83, and on the decoder 15 dB vs
ORT's default op set's 5 dB. Re-measured on ConceptSeg-Tiny (table at ``MASK_IOU_FLOORS``): the ORT
settings alone gave 0.78-0.86; the two placement rules below (``quantized_nodes``, ``qdq_only_into``)
brought every part to 0.92-0.95 at INT8. The settings:

* ``op_types_to_quantize`` = Conv, ConvTranspose, MatMul, Gemm (``QDQ_OP_TYPES``), only those with a
  weight and not computing a sinusoid's argument (``quantized_nodes``), their outputs left alone:
  Q/DQ on the inputs of the ops TensorRT runs in INT8, never on Softmax, LayerNormalization,
  Resize, Add... ORT's default op set puts them there too and costs most of the accuracy; and
  every other reader of a quantized tensor reads the fp32 one (``qdq_only_into``).
* per-channel weights (axis = output channel: Conv 0, ConvTranspose 1, MatMul 1, Gemm by transB),
  symmetric activations and weights (every zero point 0, as TensorRT requires), no int32 bias
  quantization (``QuantizeBias`` off: TensorRT fuses fp32 biases itself), Relu/Clip kept.
* ``quant_pre_process`` is not used: ``quantize_static`` runs on these graphs as exported, and
  its ORT optimisation pass would rewrite the graph TensorRT is meant to see.
* Calibration: MinMax for INT8 (every value a part saw in use); FP8 needs ORT's Distribution
  calibrator (``quantize_static`` refuses any other for float types), and opset 19.

Weights stored as fp16 with a Cast back (``weight_storage`` "fp16") are turned back into fp32
initializers first (``fold_weight_casts``), or ORT would treat each weight as an activation.

FP8 (E4M3FN) Q/DQ runs on ORT CPU (the DQ outputs fp32; the ops run fp32), so it is measured like
INT8. A TensorRT FP8 engine needs compute capability >= 8.9 (Ada, Hopper and later): not Jetson
Orin (8.7), where the FP8 graph does not build; the part's ``qdq.tool`` says so.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.episodes import Support
from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import atomic_path, contained, sha256_file, staged_dir, writable_output
from conceptseg_edge.manifest import MANIFEST_NAME, BundleManifest, PartManifest, QdqReport, load_bundle, write_manifest
from conceptseg_edge.metrics import iou
from conceptseg_edge.router import RouterConfig, count_words
from conceptseg_edge.runtime.engine import Engine, OrtEngine, open_engine

QDQ_PRECISIONS = ("int8", "fp8")
#: The ops whose inputs get Q/DQ pairs: what TensorRT runs in INT8/FP8 (Q/DQ anywhere else only
#: forces reformatting and loses accuracy).
QDQ_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
#: Parts ``export qdq`` can quantize, and the routes whose masks they change. ``policy_embed`` is a
#: Gather (nothing to quantize); ``policy_decoder`` runs a KV-cache loop through IO bindings and is
#: quantized by ``export concept --policy-precision`` (with its own token-agreement measure).
PART_ROUTES: dict[str, tuple[str, ...]] = {
    "sam2_encoder": ("prompt", "shortcut", "reason"),
    "sam2_decoder": ("prompt", "shortcut", "reason"),
    "ctm": ("shortcut", "reason"),
    "policy_vision": ("reason",),
    # a SAM 3 concept bundle (``export concept --backbone sam3``): both of its routes run every SAM 3 part
    "sam3_vision": ("shortcut", "reason"),
    "sam3_text": ("shortcut", "reason"),
    "sam3_head": ("shortcut", "reason"),
}
#: Why the other parts of a concept bundle are not ``export qdq``'s.
NOT_QDQ = {
    "policy_embed": "a Gather (an embedding lookup): no Conv/MatMul/Gemm to quantize",
    "policy_decoder": "its KV-cache decode loop runs through IO bindings; it is quantized (int8 / int4, ONNX Runtime "
                      "formats) by 'export concept --policy-precision' and measured on token agreement there",
}
#: Minimum end-to-end mask IoU (held-out mean, quantized part vs fp32 bundle) for a part to ship
#: quantized. Measured on ConceptSeg-Tiny (128 px; calibration world:32, held-out 16 ConceptWorld
#: images, mean over every request on the part's routes):
#:
#:   part            INT8 here   FP8 here   INT8, ORT's placement (all MatMuls, all readers, outputs)
#:   sam2_encoder    0.916       0.927      0.784
#:   sam2_decoder    0.923       0.572      0.799
#:   ctm             0.949       0.974      0.945 (world:16, held-out 8)
#:   policy_vision   0.944       0.925      0.860 (world:16, held-out 8)
#:
#: For scale: fp16 weight storage is held to 0.98 and measured 0.9989-1.0; the stack notes' ORT
#: placement gave 0.91 on a random SAM2.1-tiny encoder. 0.90 passes every part whose Q/DQ sits only
#: where TensorRT quantizes (0.916-0.974) and fails the placements that quantize what feeds norms,
#: residuals and sinusoids (0.78-0.86) and the FP8 decoder (0.57): a part below it changes about
#: one object pixel in ten against its fp32 graph, more than the fp32-vs-torch export checks allow
#: by two orders of magnitude.
MASK_IOU_FLOOR = 0.90
MASK_IOU_FLOORS: dict[str, float] = dict.fromkeys(PART_ROUTES, MASK_IOU_FLOOR)
OPSET = {"int8": 13, "fp8": 19}  # the least each precision's Q/DQ needs (fp8 types: opset 19)
TOOL = "onnxruntime {version} quantize_static QDQ ({precision}; per-channel symmetric weights, symmetric activations, " \
       "{calibrator} calibration, ops {ops})"
FP8_NOTE = "; TensorRT FP8 needs compute capability >= 8.9 (not Jetson Orin 8.7)"

#: ConceptWorld episodes used here (seed 0): training uses indices < 300 000, the held-out report
#: 1 000 000+, router calibration 2 000 000+, the demo 3 000 000+.
WORLD_SEED = 0
CALIBRATION_OFFSET = 4_000_000
HELD_OUT_OFFSET = 5_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Prompts for images from a folder (no ground truth, no query): a box over the central half, and a
#: generic concept the ConceptSeg tasks share.
DIR_QUERY = "salient object segmentation"
#: Both sides of a measurement accept every shortcut (τ 0), so the shortcut route is compared on its
#: own mask, as ``export/concept.route_parity`` does.
ALWAYS_SHORTCUT = RouterConfig(taus={n: 0.0 for n in range(1, 5)})


@dataclass(frozen=True)
class QdqConfig:
    """Arguments of ``conceptseg-edge export qdq``.

    ``calibration``: ``world:N`` (N ConceptWorld episodes) or a folder of PNG/JPEG images;
    ``held_out``: images measured (ConceptWorld episodes apart from the calibration's, or the last
    ``held_out`` images of the folder, the rest calibrating); ``parts``: None = every part in
    ``PART_ROUTES`` the bundle has; ``floors``: part → mask IoU floor, overriding ``MASK_IOU_FLOORS``.
    """

    precision: str = field(default="int8", metadata={"help": "int8, or fp8 (E4M3; TensorRT needs compute capability >= 8.9)"})
    calibration: str = field(default="world:32", metadata={
        "help": "world:N (N ConceptWorld episodes) or a folder of PNG/JPEG images (its last --held-out ones are held out)"})
    held_out: int = field(default=16, metadata={"help": "images the accuracy is measured on, never calibrated on"})
    parts: tuple[str, ...] | None = field(default=None, metadata={
        "help": f"parts to quantize (default: every fp32 one of {', '.join(PART_ROUTES)})"})
    floors: Mapping[str, float] = field(default_factory=dict, metadata={"help": "part → mask IoU floor (MASK_IOU_FLOORS)"})

    def __post_init__(self) -> None:
        if self.precision not in QDQ_PRECISIONS:
            raise InputError(f"--precision {self.precision}: expected one of {', '.join(QDQ_PRECISIONS)}")
        if self.held_out < 1:
            raise InputError(f"--held-out {self.held_out}: expected at least 1 image")
        count = self.calibration.removeprefix("world:")
        if self.calibration.startswith("world:") and (not count.isdecimal() or int(count) < 1):
            raise InputError(f"--calib {self.calibration}: expected world:N with N >= 1 ConceptWorld episodes")
        unknown = sorted(set(self.floors) - set(PART_ROUTES))
        if unknown:
            raise InputError(f"floors: unknown part(s) {unknown} (Q/DQ parts: {list(PART_ROUTES)})")


@dataclass(frozen=True)
class Sample:
    """One calibration or held-out image and the requests made on it (original-image pixels)."""

    image: np.ndarray
    box: tuple[float, float, float, float] | None
    query: str | None
    supports: tuple[Support, ...] = ()

    def requests(self, routes: Iterable[str], max_shortcut_words: int) -> Iterator[tuple[str, dict[str, Any]]]:
        """(route, ``segment`` keywords) for each route in ``routes`` this sample can take."""
        for route in routes:
            if route == "prompt" and self.box is not None:
                yield route, {"box": self.box}
            elif route == "shortcut" and self.query and count_words(self.query) <= max_shortcut_words:
                yield route, {"query": self.query}
            elif route == "reason" and self.query:
                yield route, {"query": self.query, "supports": self.supports}


@dataclass(frozen=True)
class SampleSet:
    """Samples and what they are, in the words the ``QdqReport`` records."""

    samples: tuple[Sample, ...]
    description: str


# ---------------------------------------------------------------------------------------- inputs


def calibration_sets(spec: str, held_out: int, image_size: int) -> tuple[SampleSet, SampleSet]:
    """(calibration, held-out) sample sets from ``world:N`` or a folder, disjoint by construction.

    Raises:
        InputError: a folder that does not exist, holds no PNG/JPEG, holds no more images than
            ``held_out``, or has an unreadable image or a link out of the folder.
    """
    if spec.startswith("world:"):  # N checked by QdqConfig
        return (_world_set(CALIBRATION_OFFSET, int(spec.removeprefix("world:")), image_size),
                _world_set(HELD_OUT_OFFSET, held_out, image_size))
    return _folder_sets(Path(spec), held_out)


def _world_set(offset: int, n: int, image_size: int) -> SampleSet:
    """``n`` ConceptWorld episodes with a non-empty mask from index ``offset`` on."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.episodes import box_from_mask

    world = ConceptWorld(WORLD_SEED, image_size)
    samples, index = [], offset
    while len(samples) < n:
        if index - offset > 1000 * n:
            raise InputError(f"--calib world:{n}: ConceptWorld gave {len(samples)} non-empty masks in {index - offset} episodes")
        ep = world.episode(index)
        index += 1
        if ep.mask.any():
            samples.append(Sample(ep.image, box_from_mask(ep.mask), ep.query, ep.supports))
    return SampleSet(tuple(samples), f"ConceptWorld seed {WORLD_SEED} at {image_size} px, episodes {offset}-{index - 1} "
                                     f"with a non-empty mask ({n}); prompt = ground-truth box, query = the episode's")


def _folder_sets(folder: Path, held_out: int) -> tuple[SampleSet, SampleSet]:
    from conceptseg_edge.preprocess import load_image

    if not folder.is_dir():
        raise InputError(f"--calib {folder}: not a directory, and not world:N")
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise InputError(f"--calib {folder}: no {'/'.join(IMAGE_SUFFIXES)} image in it")
    if len(names) <= held_out:
        raise InputError(f"--calib {folder}: {len(names)} image(s); --held-out {held_out} needs more "
                         "(the last ones are held out, the rest calibrate)")
    samples = []
    for name in names:
        image = load_image(contained(folder, name, f"--calib {folder}", InputError))
        h, w = image.shape[:2]
        samples.append(Sample(image, (w / 4, h / 4, 3 * w / 4, 3 * h / 4), DIR_QUERY))
    split = len(names) - held_out
    where = f"{folder} ({{}}): prompt = box over the central half, query = {DIR_QUERY!r}"
    return (SampleSet(tuple(samples[:split]), where.format(f"{names[0]}..{names[split - 1]}, {split} images")),
            SampleSet(tuple(samples[split:]), where.format(f"{names[split]}..{names[-1]}, {held_out} images")))


def quantizable_parts(manifest: BundleManifest, requested: Sequence[str] | None) -> tuple[str, ...]:
    """The parts to quantize: ``requested``, or every part in ``PART_ROUTES`` the bundle has.

    Raises:
        InputError: a requested part the bundle lacks, or one ``export qdq`` cannot quantize (not in
            ``PART_ROUTES``, not an fp32 ONNX graph), naming it and the bundle's parts.
    """
    if requested is None:
        return tuple(p for p in PART_ROUTES if p in manifest.parts and manifest.parts[p].precision == "fp32"
                     and manifest.parts[p].format == "onnx")
    for name in requested:
        if name not in manifest.parts:
            raise InputError(f"--parts {name}: the bundle has no such part (its parts: {', '.join(manifest.parts)})")
        if name not in PART_ROUTES:
            why = NOT_QDQ.get(name, "not a part export qdq knows")
            raise InputError(f"--parts {name}: {why} (export qdq quantizes {', '.join(PART_ROUTES)}; "
                             f"the bundle's parts: {', '.join(manifest.parts)})")
        part = manifest.parts[name]
        if part.format != "onnx" or part.precision != "fp32":
            raise InputError(f"--parts {name}: {part.format} {part.precision}; Q/DQ starts from an fp32 ONNX graph")
    return tuple(dict.fromkeys(requested))


# ------------------------------------------------------------------------------- runtime capture


class RecordingEngine:
    """A real engine that keeps every run's feeds (the calibration data of its part).

    It keeps the arrays themselves, not copies: the runtime never writes into a feed after the
    call, and the image features every prompt on one image feeds the decoder are then held once
    (at 1024 px, 28 MB per image rather than per request).
    """

    def __init__(self, engine: Engine, feeds: list[dict[str, np.ndarray]]) -> None:
        self._engine = engine
        self.inputs, self.outputs, self.provider = engine.inputs, engine.outputs, engine.provider
        self.feeds = feeds

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append(dict(feeds))
        return self._engine.run(feeds)


@dataclass
class RecordingFactory:
    """``open_engine`` on ONNX Runtime CPU, recording the feeds of ``parts`` and opening each part in
    ``replaced`` from its own file (a quantized graph) instead of the bundle's."""

    parts: Sequence[str] = ()
    replaced: Mapping[str, Path] = field(default_factory=dict)
    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def __call__(self, bundle_dir: Path, part: PartManifest, provider: str) -> Engine:
        engine = OrtEngine(self.replaced[part.name], provider, part) if part.name in self.replaced \
            else open_engine(bundle_dir, part, provider)
        if part.name in self.parts:
            return RecordingEngine(engine, self.feeds.setdefault(part.name, []))
        return engine


def run_routes(bundle: Path, manifest: BundleManifest, samples: SampleSet, routes: Sequence[str],
               factory: RecordingFactory, desc: str, progress: bool) -> list[np.ndarray]:
    """Masks of every request of ``samples`` on ``routes`` (in order), from the bundle's runtime."""
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    seg = ConceptSegmenter.from_bundle(bundle, "cpu", router=ALWAYS_SHORTCUT, engine_factory=factory, manifest=manifest)
    masks = []
    for sample in tqdm(samples.samples, desc=desc, disable=not progress, unit="image", leave=False):
        for route, kwargs in sample.requests(routes, ALWAYS_SHORTCUT.max_shortcut_words):
            masks.append(seg.segment(sample.image, route=route, **kwargs).mask)
    return masks


# ----------------------------------------------------------------------------------- quantization


def fold_weight_casts(model):
    """``model`` with every ``Cast(fp16 initializer → float)`` replaced by an fp32 initializer.

    ``export --weight-storage fp16`` stores weights that way; ORT's quantizer quantizes only weights
    that are initializers and would treat a Cast's output as an activation (per-tensor, calibrated).
    """
    import onnx
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    nodes, folded = [], {}
    for node in model.graph.node:
        source = inits.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if source is not None and source.data_type == onnx.TensorProto.FLOAT16 and to == onnx.TensorProto.FLOAT:
            folded[node.output[0]] = numpy_helper.from_array(numpy_helper.to_array(source).astype(np.float32), node.output[0])
        else:
            nodes.append(node)
    if not folded:
        return model
    used = _names_used(nodes) | {o.name for o in model.graph.output}
    kept = [init for init in model.graph.initializer if init.name in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *folded.values()])
    return model


def quantized_nodes(model) -> list[str]:
    """The nodes that get Q/DQ inputs: ``QDQ_OP_TYPES`` nodes with a weight (input 1 an initializer),
    except those computing a sinusoid's argument.

    A MatMul of two activations (attention's Q·Kᵀ and P·V) stays unquantized: measured on
    ConceptSeg-Tiny (before the rules below), quantizing them too lowered the encoder's mean mask IoU
    0.791 → 0.784 and the decoder's 0.808 → 0.799, and TensorRT runs them in fp16 beside INT8 GEMMs
    either way. A MatMul whose output reaches Sin/Cos (SAM2's random-Fourier point encoding, rotary
    frequencies) stays fp32 too: its error is multiplied by 2π·frequency before the sinusoid;
    quantizing the decoder's point encoding alone took its mean prompt-route IoU from 0.958 to 0.816.
    """
    inits = {init.name for init in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return [n.name for n in model.graph.node if n.op_type in QDQ_OP_TYPES and len(n.input) > 1 and n.input[1] in inits
            and not _reaches_sinusoid(n, consumers)]


#: Ops between a MatMul and a Sin/Cos that keep it a sinusoid's argument (scaling, concatenation, layout).
_SINUSOID_PATH = frozenset({"Mul", "Add", "Sub", "Div", "Concat", "Unsqueeze", "Reshape", "Transpose", "Cast"})


def _reaches_sinusoid(node, consumers: Mapping[str, list], depth: int = 3) -> bool:
    frontier = [node]
    for _ in range(depth):
        frontier = [user for n in frontier for out in n.output for user in consumers.get(out, [])]
        if any(user.op_type in ("Sin", "Cos") for user in frontier):
            return True
        frontier = [user for user in frontier if user.op_type in _SINUSOID_PATH]
    return False


def qdq_only_into(model, quantized: set[str]):
    """``model`` with each activation's Q/DQ pair feeding only the ``quantized`` nodes.

    ORT's quantizer rewires *every* consumer of a quantized tensor to its DequantizeLinear: a
    LayerNorm output read by a MatMul and by a Shape, a residual read by a MatMul and by an Add,
    would reach the Add (and TensorRT's INT8 plan) quantized too. Here every other consumer (in
    If/Loop bodies too) reads the fp32 tensor again, and Q/DQ pairs left without a reader go.
    """
    from onnx import AttributeProto

    producers = {out: node for node in model.graph.node for out in node.output}
    originals = {dq.output[0]: producers[dq.input[0]].input[0] for dq in model.graph.node
                 if dq.op_type == "DequantizeLinear" and dq.input[0] in producers
                 and producers[dq.input[0]].op_type == "QuantizeLinear"}
    stack = [(node, True) for node in model.graph.node]
    while stack:
        node, top = stack.pop()
        if not (top and node.name in quantized):
            for i, name in enumerate(node.input):
                if name in originals:
                    node.input[i] = originals[name]
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs if attr.type == AttributeProto.GRAPHS else []
            stack.extend((inner, False) for body in bodies for inner in body.node)
    outputs = {o.name for o in model.graph.output}
    while True:  # drop readerless DQs, then the Qs they leave readerless
        read = _names_used(model.graph.node) | outputs
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.output[0] not in read]
        if not dead:
            return model
        for node in dead:
            model.graph.node.remove(node)


def nonzero_scales(model):
    """``model`` with every zero Q/DQ scale set to 1.

    A tensor that was zero on every calibration feed (the decoder's ``mask_input``: the runtime never
    feeds a mask) calibrates to the range (0, 0). ORT gives it scale 1 at INT8 but 0 at FP8, and a
    zero scale divides by zero (measured: every FP8 decoder output NaN) and is refused by TensorRT.
    Zero is exact at any scale; 1 keeps the FP8 range (±448) for a mask a caller might feed.
    """
    from onnx import numpy_helper

    scales = {node.input[1] for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    for init in model.graph.initializer:
        if init.name in scales:
            value = numpy_helper.to_array(init)
            if (value == 0).any():
                init.CopyFrom(numpy_helper.from_array(np.where(value == 0, 1, value).astype(value.dtype), init.name))
    return model


def _names_used(nodes) -> set[str]:
    """Every tensor name the nodes read, inside If/Loop/Scan bodies too (they read outer-scope names)."""
    from onnx import AttributeProto

    used, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        used.update(node.input)
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else attr.graphs if attr.type == AttributeProto.GRAPHS else []
            for body in bodies:
                stack.extend(body.node)
    return used


class FeedReader:
    """ORT's ``CalibrationDataReader`` over recorded feeds, one feed per ``collect_data`` call.

    A part's feeds differ in shape (the decoder's point and token counts, the CTM's completion
    length), which ORT's histogram calibrators cannot stack: ``CalibStridedMinMax`` = 1 makes
    ``quantize_static`` collect (and merge ranges or histograms) feed by feed through ``set_range``.
    """

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._next, None)
        return None if feed is None else dict(feed)


def quantize_qdq(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]], precision: str) -> str:
    """Write the Q/DQ graph of ``src`` calibrated on ``feeds`` to ``dst`` atomically; returns the tool line."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = fold_weight_casts(onnx.load(str(src)))
    nodes = quantized_nodes(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < OPSET[precision]:
        model = onnx.version_converter.convert_version(model, OPSET[precision])
    qtype = QuantType.QInt8 if precision == "int8" else QuantType.QFLOAT8E4M3FN
    method = CalibrationMethod.MinMax if precision == "int8" else CalibrationMethod.Distribution
    quiet = logging.getLogger("root"), logging.getLogger()
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)  # ORT's quantizer logs per-node notes through the root logger
    try:
        with atomic_path(dst) as tmp:
            quantize_static(
                model, str(tmp), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QDQ_OP_TYPES), nodes_to_quantize=nodes, per_channel=True,
                activation_type=qtype, weight_type=qtype, calibrate_method=method,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "QDQKeepRemovableActivations": True, "CalibStridedMinMax": 1,
                               "OpTypesToExcludeOutputQuantization": list(QDQ_OP_TYPES)},
            )
            onnx.save(qdq_only_into(nonzero_scales(onnx.load(str(tmp))), set(nodes)), str(tmp))
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    tool = TOOL.format(version=onnxruntime.__version__, precision=precision, calibrator=method.name,
                       ops="/".join(QDQ_OP_TYPES))
    return tool + (FP8_NOTE if precision == "fp8" else "")


def require_parse(path: Path, part_name: str) -> None:
    """The Q/DQ graph must pass the static TensorRT parser check (``export/trt_check.py``)."""
    from conceptseg_edge.export.trt_check import require_tensorrt_parse

    require_tensorrt_parse(path, part_name)


# ---------------------------------------------------------------------------------- measurement


#: What a non-finite quantized output counts as in ``max_abs_diff`` (the manifest holds finite numbers).
NON_FINITE_DIFF = float(np.finfo(np.float32).max)


def part_diffs(fp32: Engine, qdq: Engine, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Max |quantized - fp32| per output of one part over ``feeds`` (``NON_FINITE_DIFF`` for inf/NaN)."""
    worst = {t.name: 0.0 for t in fp32.outputs}
    for feed in feeds:
        a, b = fp32.run(feed), qdq.run(feed)
        for name in worst:
            diff = np.abs(a[name].astype(np.float64) - b[name])
            worst[name] = max(worst[name], float(diff.max(initial=0.0)) if np.isfinite(diff).all() else NON_FINITE_DIFF)
    return worst


def mean_iou(masks: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    return float(np.mean([iou(a, b) for a, b in zip(masks, reference, strict=True)]))


# ---------------------------------------------------------------------------------------- export


def export_qdq(src_bundle: str | Path, out_dir: str | Path, cfg: QdqConfig, progress: bool = True) -> BundleManifest:
    """Quantize ``src_bundle``'s parts to Q/DQ graphs, measure them, and write the bundle to ``out_dir``.

    Every input is checked before any model runs (``--out``, the parts, the calibration source).

    A record's ``calibration_samples`` counts the part's runs its calibration recorded, and
    ``held_out_samples`` the held-out requests (image × route running the part) its mask IoU averages.

    Returns:
        The written bundle's manifest: passed parts with their Q/DQ file, precision and ``qdq``
        record; failed parts unchanged but for their ``qdq`` record; ``route_parity`` (the fp32 bundle
        vs torch) kept only when no graph changed.

    Raises:
        InputError: ``--out`` unusable or the source bundle itself, unknown or unquantizable part, bad
            calibration source.
        ManifestError: the source bundle fails its checks.
        ExportError: a Q/DQ graph breaks TensorRT's documented parser rules.
    """
    src, out = Path(src_bundle), writable_output(out_dir, "--out", directory=True)
    if out.exists() and out.resolve() == src.resolve():
        raise InputError(f"--out {out}: is the source bundle; write the Q/DQ bundle elsewhere")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise InputError(f"--out {out}: exists and is not a bundle; refusing to replace it")
    manifest = load_bundle(src)
    parts = quantizable_parts(manifest, cfg.parts)
    calibration, held_out = calibration_sets(cfg.calibration, cfg.held_out, manifest.preprocessing.image_size)
    routes = [r for r in ("prompt", "shortcut", "reason") if r in manifest.routes]
    part_routes = {name: tuple(r for r in PART_ROUTES[name] if r in routes) for name in parts}

    recorder = RecordingFactory(parts)
    run_routes(src, manifest, calibration, routes, recorder, "calibrate (fp32)", progress)
    reference = RecordingFactory(parts)
    reference_masks = run_routes(src, manifest, held_out, routes, reference, "held-out (fp32)", progress)
    request_routes = [route for s in held_out.samples for route, _ in s.requests(routes, ALWAYS_SHORTCUT.max_shortcut_words)]

    with staged_dir(out, MANIFEST_NAME, "bundle") as staging:
        work = staging / ".qdq"
        work.mkdir()
        new_parts: dict[str, PartManifest] = {}
        for name in tqdm(parts, desc=f"qdq {cfg.precision}", disable=not progress, unit="part"):
            part = manifest.parts[name]
            graph = work / Path(part.file).name
            tool = quantize_qdq(contained(src, part.file, f"parts.{name}.file"), graph, recorder.feeds[name], cfg.precision)
            measured = run_routes(src, manifest, held_out, part_routes[name], RecordingFactory(replaced={name: graph}),
                                  f"held-out ({name} {cfg.precision})", progress)
            fp32 = [mask for mask, route in zip(reference_masks, request_routes) if route in part_routes[name]]
            mask_iou = mean_iou(measured, fp32) if measured else None
            diffs = part_diffs(OrtEngine(contained(src, part.file, f"parts.{name}.file"), "cpu", part),
                               OrtEngine(graph, "cpu", part), reference.feeds[name])
            floor = cfg.floors.get(name, MASK_IOU_FLOORS[name])
            passed = mask_iou is not None and mask_iou >= floor
            report = QdqReport(
                precision=cfg.precision, tool=tool, calibration=calibration.description,
                calibration_samples=len(recorder.feeds[name]),
                held_out=f"{held_out.description}; mask_iou = mean over its requests on {', '.join(part_routes[name])}",
                held_out_samples=len(measured), mask_iou=mask_iou, max_abs_diff=diffs,
                floors={"mask_iou": floor}, passed=passed,
            )
            if passed:
                require_parse(graph, name)
                shutil.move(graph, staging / part.file)
                new_parts[name] = dataclasses.replace(
                    part, sha256=sha256_file(staging / part.file), precision=cfg.precision, opset=_opset(staging / part.file),
                    parity=None, quantized_parity=None, weight_storage="fp32", qdq=report)
            else:
                new_parts[name] = dataclasses.replace(part, qdq=report)
        shutil.rmtree(work)
        for name, part in manifest.parts.items():
            if new_parts.get(name, part).sha256 == part.sha256:
                _copy(src, staging, part.file)
        for rel in manifest.files:
            _copy(src, staging, rel)
        changed = any(p.sha256 != manifest.parts[n].sha256 for n, p in new_parts.items())
        write_manifest(staging, dataclasses.replace(
            manifest.with_parts(**new_parts), route_parity={} if changed else manifest.route_parity, versions={}))
    return load_bundle(out)


def _opset(path: Path) -> int:
    import onnx

    return next(o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx"))


def _copy(src: Path, dst: Path, rel: str) -> None:
    target = dst / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(contained(src, rel, f"{src}: {rel}"), target)
