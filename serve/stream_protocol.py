"""The ``conceptseg_stream`` model's request/response contract: one source of names for server and client.

One request is one frame of one stream; Triton's sequence batcher names the stream (the request's
correlation id) and fills the control inputs ``START`` / ``END`` / ``READY`` / ``CORRID``. The model
batches (``max_batch_size`` ≥ 1, which the sequence batcher's ``oldest`` strategy needs), so every
tensor below carries a leading batch axis of 1 on the wire; the dims here are per item.

==========  ======  ===========  ==================================================================
input       dtype   dims         meaning
==========  ======  ===========  ==================================================================
FRAME       UINT8   [-1,-1,-1]   H×W×C pixels, C in {1, 3, 4}; the first frame fixes the stream's size.
                                 Only an END request may leave it out (it then just closes the stream).
PROMPTS     BYTES   [1]          JSON list of objects to start before this frame (START or any later
                                 frame): ``{"points": [[x, y], …], "labels": [1, …], "box": [x0, y0,
                                 x1, y1], "concept": "text", "obj_id": 3}``; points and box may come
                                 together, a concept alone. Pixels of the original frame.
==========  ======  ===========  ==================================================================

==========  ======  ===========  ==================================================================
output      dtype   dims         meaning
==========  ======  ===========  ==================================================================
MASKS       BOOL    [-1,-1,-1]   N×H×W, one mask per live object, in OBJECT_IDS order
OBJECT_IDS  INT32   [-1]         N object ids
SCORES      FP32    [-1, 2]      per object: SAM2's predicted IoU, sigmoid(object score)
EVENTS      BYTES   [1]          JSON: ``frame`` index, ``objects`` (id → present, source) and the
                                 tracker's ``events`` (start / lost / refire / refound / refire_failed)
TIMINGS     BYTES   [1]          JSON: per-stage ms of this frame (+ ``decode_request``, ``server_total``)
==========  ======  ===========  ==================================================================

``parse_prompts`` and ``parse_frame`` (server side) hold only numpy and the typed errors; the runtime's
``ObjectPrompt`` is imported where a prompt is built, so the client side never loads the engines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from conceptseg_edge.errors import InputError
from conceptseg_edge.serve.model_config import SequenceControl, TensorConfig
from conceptseg_edge.serve.protocol import ServeLimits, decode_text, require_outputs

if TYPE_CHECKING:  # the client side of this module never loads the runtime
    from conceptseg_edge.runtime.tracker import FrameResult, ObjectPrompt

STREAM_MODEL_NAME = "conceptseg_stream"

STREAM_INPUTS: tuple[TensorConfig, ...] = (
    TensorConfig("FRAME", "uint8", (-1, -1, -1), optional=True),
    TensorConfig("PROMPTS", "bytes", (1,), optional=True),
)
STREAM_OUTPUTS: tuple[TensorConfig, ...] = (
    TensorConfig("MASKS", "bool", (-1, -1, -1)),
    TensorConfig("OBJECT_IDS", "int32", (-1,)),
    TensorConfig("SCORES", "float32", (-1, 2)),
    TensorConfig("EVENTS", "bytes", (1,)),
    TensorConfig("TIMINGS", "bytes", (1,)),
)
STREAM_OUTPUT_NAMES = tuple(t.name for t in STREAM_OUTPUTS)
STREAM_CONTROL_NAMES = {"start": "START", "end": "END", "ready": "READY", "corrid": "CORRID"}
_PROMPT_KEYS = ("points", "labels", "box", "concept", "obj_id")


def stream_controls() -> tuple[SequenceControl, ...]:
    """The control inputs of the stream model (CORRID as uint64: see ``parse_controls`` for string ids)."""
    return tuple(SequenceControl(name, kind) for kind, name in STREAM_CONTROL_NAMES.items())


# ---------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class StreamControls:
    """What the sequence batcher says about one request."""

    stream_id: int | str
    start: bool
    end: bool
    ready: bool = True


def _item(tensors: Mapping[str, np.ndarray], name: str) -> Any:
    value = tensors.get(name)
    if value is None:
        raise InputError(f"{name}: control input missing; send the request with a sequence id (sequence batching)")
    item = np.asarray(value).reshape(-1)[0]
    return item.decode("utf-8", "replace") if isinstance(item, (bytes, np.bytes_)) else item.item()


def parse_controls(tensors: Mapping[str, np.ndarray], correlation_id: int | str | None = None) -> StreamControls:
    """The sequence batcher's control inputs (each ``[1, 1]``) → ``StreamControls``.

    ``correlation_id``: the request's own id (``request.correlation_id()`` in the python backend), which names
    the stream when given. Triton 2.51 fills a uint64 CORRID from a *string* id by packing its length and
    first bytes into 8 bytes, so ``"camera-0001"`` and ``"camera-0002"`` arrive as the same CORRID; the
    request's own id keeps them apart. CORRID names the stream only where the backend gives no id.
    """
    names = STREAM_CONTROL_NAMES
    corrid = _item(tensors, names["corrid"])
    stream_id = corrid if correlation_id is None or correlation_id in (0, "") else correlation_id
    return StreamControls(stream_id, bool(_item(tensors, names["start"])),
                          bool(_item(tensors, names["end"])), bool(_item(tensors, names["ready"])))


def parse_frame(tensors: Mapping[str, np.ndarray], limits: ServeLimits) -> np.ndarray | None:
    """FRAME (with its batch axis of 1) → (H, W, 3) uint8, or None when absent."""
    from conceptseg_edge.preprocess import as_rgb_array

    value = tensors.get("FRAME")
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise InputError(f"FRAME: dtype {arr.dtype}, expected uint8")
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise InputError(f"FRAME: shape {list(arr.shape)}, expected [H, W, C] (a batch axis of 1 in front)")
    h, w = arr.shape[:2]
    if h * w > limits.max_image_pixels:
        raise InputError(f"FRAME: {w}x{h} = {h * w} pixels exceeds this server's limit of {limits.max_image_pixels}")
    return as_rgb_array(arr, "FRAME")


def _numbers(value: Any, where: str, count: int | None = None) -> list[float]:
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise InputError(f"{where}: expected a list of {count or 'some'} numbers, got {json.dumps(value)[:80]}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise InputError(f"{where}: expected finite numbers, got {json.dumps(value)[:80]}")
    return [float(v) for v in value]


def _prompt(entry: Any, where: str, limits: ServeLimits) -> tuple[int | None, ObjectPrompt]:
    from conceptseg_edge.preprocess import point_labels
    from conceptseg_edge.runtime.tracker import ObjectPrompt

    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with points / labels / box / concept, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_PROMPT_KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {list(_PROMPT_KEYS)}")
    obj_id = entry.get("obj_id")
    if obj_id is not None and (isinstance(obj_id, bool) or not isinstance(obj_id, int) or obj_id < 0):
        raise InputError(f"{where}.obj_id: {obj_id!r}, expected an int >= 0")
    points = labels = box = concept = None
    if entry.get("points") is not None:
        raw = entry["points"]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{where}.points: expected a non-empty list of [x, y] pairs")
        if len(raw) > limits.max_points:
            raise InputError(f"{where}.points: {len(raw)} points, at most {limits.max_points}")
        points = tuple(tuple(_numbers(p, f"{where}.points[{i}]", 2)) for i, p in enumerate(raw))
        labels = tuple(int(v) for v in point_labels(entry.get("labels", [1] * len(points))))
        if len(labels) != len(points):
            raise InputError(f"{where}.labels: {len(labels)} labels for {len(points)} points")
    elif entry.get("labels") is not None:
        raise InputError(f"{where}.labels: given without points")
    if entry.get("box") is not None:
        box = tuple(_numbers(entry["box"], f"{where}.box", 4))
    if entry.get("concept") is not None:
        concept = entry["concept"]
        if not isinstance(concept, str) or not concept.strip():
            raise InputError(f"{where}.concept: expected a non-empty string")
        if len(concept) > limits.max_query_chars:
            raise InputError(f"{where}.concept: {len(concept)} characters, at most {limits.max_query_chars}")
        if points is not None or box is not None:
            raise InputError(f"{where}: a concept starts an object alone; give it without points or box")
    if points is None and box is None and concept is None:
        raise InputError(f"{where}: empty prompt; give points, a box or a concept")
    return obj_id, ObjectPrompt(points=points, labels=labels, box=box, concept=concept)


def parse_prompts(tensors: Mapping[str, np.ndarray], limits: ServeLimits, max_objects: int) -> list[tuple[int | None, ObjectPrompt]]:
    """PROMPTS → [(obj_id or None, ObjectPrompt)]; empty when absent. Every problem is an ``InputError`` naming it."""
    value = tensors.get("PROMPTS")
    if value is None:
        return []
    items = np.asarray(value, dtype=object).reshape(-1)
    if items.size != 1:
        raise InputError(f"PROMPTS: expected one JSON string, got {items.size}")
    raw = items[0]
    try:
        text = bytes(raw).decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        entries = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"PROMPTS: not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(entries, list) or not entries:
        raise InputError("PROMPTS: expected a non-empty JSON list of objects")
    if len(entries) > max_objects:
        raise InputError(f"PROMPTS: {len(entries)} objects, at most {max_objects} per stream")
    return [_prompt(entry, f"PROMPTS[{i}]", limits) for i, entry in enumerate(entries)]


def _json_bytes(obj: Any) -> np.ndarray:
    return np.array([json.dumps(obj, sort_keys=True).encode("utf-8")], dtype=object)


def encode_frame(result: FrameResult | None, hw: tuple[int, int], timings: Mapping[str, float]) -> dict[str, np.ndarray]:
    """A ``FrameResult`` (None: an END request without a frame) → the output arrays, without the batch axis."""
    objects = [] if result is None else sorted(result.objects.values(), key=lambda o: o.obj_id)
    masks = np.zeros((len(objects), *hw), dtype=bool)
    for i, obj in enumerate(objects):
        masks[i] = obj.mask
    events = {
        "frame": None if result is None else result.index,
        "objects": {str(o.obj_id): {"present": bool(o.present), "source": o.source} for o in objects},
        "events": [] if result is None else [
            {"frame": e.frame, "obj_id": e.obj_id, "kind": e.kind, "route": e.route, "reason": e.reason} for e in result.events],
    }
    return {
        "MASKS": masks,
        "OBJECT_IDS": np.array([o.obj_id for o in objects], dtype=np.int32),
        "SCORES": np.array([[o.score, o.object_score] for o in objects], dtype=np.float32).reshape(-1, 2),
        "EVENTS": _json_bytes(events),
        "TIMINGS": _json_bytes({k: round(float(v), 3) for k, v in timings.items()}),
    }


# ---------------------------------------------------------------------------- client side


@dataclass
class StreamFrame:
    """What the server answered for one frame: masks per object id, scores, the tracker's events."""

    index: int | None
    masks: dict[int, np.ndarray]  # obj_id → (H, W) bool
    scores: dict[int, tuple[float, float]]  # obj_id → (predicted IoU, sigmoid(object score))
    objects: dict[int, dict[str, Any]]  # obj_id → {"present", "source"}
    events: list[dict[str, Any]]
    timings: dict[str, float]


def decode_stream_response(outputs: Mapping[str, np.ndarray]) -> StreamFrame:
    """Output arrays (with or without the batch axis of 1) → ``StreamFrame``."""
    require_outputs(outputs, STREAM_OUTPUT_NAMES)
    ids = [int(v) for v in np.asarray(outputs["OBJECT_IDS"]).reshape(-1)]
    masks = np.asarray(outputs["MASKS"], dtype=bool)
    masks = masks.reshape(masks.shape[-3:]) if masks.ndim == 4 else masks
    scores = np.asarray(outputs["SCORES"], dtype=np.float32).reshape(-1, 2)
    events = json.loads(decode_text(outputs["EVENTS"]))
    return StreamFrame(
        index=events["frame"],
        masks={obj_id: masks[i] for i, obj_id in enumerate(ids)},
        scores={obj_id: (float(scores[i, 0]), float(scores[i, 1])) for i, obj_id in enumerate(ids)},
        objects={int(k): v for k, v in events["objects"].items()},
        events=events["events"],
        timings={k: float(v) for k, v in json.loads(decode_text(outputs["TIMINGS"])).items()},
    )


def stream_request_arrays(frame: np.ndarray | None, prompts: Sequence[Mapping[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """Client side: the named input arrays (batch axis of 1 included) for one frame and optional prompts."""
    feeds: dict[str, np.ndarray] = {}
    if frame is not None:
        arr = np.asarray(frame)
        if arr.dtype != np.uint8:
            raise InputError(f"frame: dtype {arr.dtype}, expected uint8")
        if arr.ndim == 2:
            arr = arr[..., None]
        feeds["FRAME"] = np.ascontiguousarray(arr[None])
    if prompts:
        feeds["PROMPTS"] = np.array([[json.dumps(list(prompts)).encode("utf-8")]], dtype=object)
    return feeds
