"""The ``conceptseg`` model's request/response contract: one source of tensor names for server and client.

Inputs (all optional in ``config.pbtxt``; the model checks the combination and answers a bad one
with ``INVALID_ARG``, so Triton never sees an exception):

==================  ===========  ==========  =====================================================
name                dtype        dims        meaning
==================  ===========  ==========  =====================================================
IMAGE               UINT8        [-1,-1,-1]  H×W×C pixels, C in {1, 3, 4} (RGB; gray / RGBA converted)
IMAGE_BYTES         BYTES        [1]         an encoded image (PNG, JPEG, …) instead of IMAGE
QUERY               BYTES        [1]         concept phrase or question (UTF-8): shortcut / reason
POINTS              FP32         [-1, 2]     click XY, pixels of the original image
POINT_LABELS        INT32        [-1]        1 foreground / 0 background; default all 1
BOX                 FP32         [4]         X0, Y0, X1, Y1, pixels of the original image
SUPPORT_IMAGES      BYTES        [-1]        encoded support images (≤ 4), shown to the policy
SUPPORT_MASKS       BYTES        [-1]        encoded masks, one per support image (box = tight box)
SUPPORT_BOXES       FP32         [-1, 4]     one box per support image, in its own pixels
FORCE_ROUTE         BYTES        [1]         auto (default), prompt, shortcut or reason
==================  ===========  ==========  =====================================================

Exactly one of IMAGE / IMAGE_BYTES; at least POINTS, BOX or QUERY. Outputs:

=========  =====  =======  ==================================================================
MASK       BOOL   [-1,-1]  H×W, the original image frame
ROUTE      BYTES  [1]      prompt, shortcut or reason: the route that produced the mask
SCORES     FP32   [2]      SAM2's predicted IoU, sigmoid(object-score logit)
TIMINGS    BYTES  [1]      JSON: per-stage ms of this request (runtime stages + ``decode_request``,
                           ``encode_response``, ``server_total``)
DETAILS    BYTES  [1]      JSON: ``reason`` (why that route), ``completion``, ``box``, ``bank_hit``
=========  =====  =======  ==================================================================

This module holds only numpy and the runtime's typed errors: ``parse_request`` (server side) and
``decode_response`` (client side) never import the engines, Triton, or tritonclient.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from conceptseg_edge.errors import InputError
from conceptseg_edge.router import AUTO, ROUTE_CHOICES
from conceptseg_edge.serve.model_config import TensorConfig

if TYPE_CHECKING:  # the client side of this module never loads the runtime
    from conceptseg_edge.runtime.segmenter import SegmentResult

MODEL_NAME = "conceptseg"

INPUTS: tuple[TensorConfig, ...] = (
    TensorConfig("IMAGE", "uint8", (-1, -1, -1), optional=True),
    TensorConfig("IMAGE_BYTES", "bytes", (1,), optional=True),
    TensorConfig("QUERY", "bytes", (1,), optional=True),
    TensorConfig("POINTS", "float32", (-1, 2), optional=True),
    TensorConfig("POINT_LABELS", "int32", (-1,), optional=True),
    TensorConfig("BOX", "float32", (4,), optional=True),
    TensorConfig("SUPPORT_IMAGES", "bytes", (-1,), optional=True),
    TensorConfig("SUPPORT_MASKS", "bytes", (-1,), optional=True),
    TensorConfig("SUPPORT_BOXES", "float32", (-1, 4), optional=True),
    TensorConfig("FORCE_ROUTE", "bytes", (1,), optional=True),
)
OUTPUTS: tuple[TensorConfig, ...] = (
    TensorConfig("MASK", "bool", (-1, -1)),
    TensorConfig("ROUTE", "bytes", (1,)),
    TensorConfig("SCORES", "float32", (2,)),
    TensorConfig("TIMINGS", "bytes", (1,)),
    TensorConfig("DETAILS", "bytes", (1,)),
)
INPUT_NAMES = tuple(t.name for t in INPUTS)
OUTPUT_NAMES = tuple(t.name for t in OUTPUTS)


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server; beyond these it is refused before any decoding."""

    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": "largest H*W accepted (raw or encoded)"})
    max_encoded_bytes: int = field(default=32 << 20, metadata={"help": "largest encoded image, bytes"})
    max_points: int = field(default=64, metadata={"help": "most clicks per request"})
    max_query_chars: int = field(default=1024, metadata={"help": "longest concept / question"})
    max_supports: int = field(default=4, metadata={"help": "most support images per request"})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ServeLimits.{f.name}: {value!r}, expected an int >= 1")


@dataclass
class SegmentRequest:
    """A decoded request, ready for ``ConceptSegmenter.segment``."""

    image: np.ndarray  # (H, W, 3) uint8
    query: str | None = None
    points: np.ndarray | None = None  # (N, 2) float32
    labels: np.ndarray | None = None  # (N,) int32
    box: np.ndarray | None = None  # (4,) float32
    supports: list[Any] = field(default_factory=list)  # conceptseg_edge.episodes.Support
    route: str = AUTO

    def segment_kwargs(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "points": None if self.points is None else self.points.tolist(),
            "labels": None if self.labels is None else self.labels.tolist(),
            "box": None if self.box is None else self.box.tolist(),
            "supports": self.supports,
            "route": self.route,
        }


# ---------------------------------------------------------------------------- server side


def _one_string(tensors: Mapping[str, np.ndarray], name: str, limit: int) -> str | None:
    value = tensors.get(name)
    if value is None:
        return None
    items = np.asarray(value, dtype=object).reshape(-1)
    if items.size != 1:
        raise InputError(f"{name}: expected one string, got {items.size}")
    raw = items[0]
    if isinstance(raw, (bytes, np.bytes_)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{name}: not valid UTF-8") from None
    if not isinstance(raw, str):
        raise InputError(f"{name}: expected a UTF-8 string, got {type(raw).__name__}")
    if len(raw) > limit:
        raise InputError(f"{name}: {len(raw)} characters, at most {limit}")
    return raw


def _float_array(tensors: Mapping[str, np.ndarray], name: str, width: int) -> np.ndarray | None:
    value = tensors.get(name)
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype != np.float32:
        raise InputError(f"{name}: dtype {arr.dtype}, expected float32")
    if arr.ndim not in (1, 2) or arr.shape[-1] != width:
        raise InputError(f"{name}: shape {list(arr.shape)}, expected [..., {width}]")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: contains NaN or infinity")
    return arr.reshape(-1, width)


def _check_pixels(h: int, w: int, what: str, limits: ServeLimits) -> None:
    if h * w > limits.max_image_pixels:
        raise InputError(f"{what}: {w}x{h} = {h * w} pixels exceeds this server's limit of {limits.max_image_pixels}")


def decode_image_bytes(data: Any, what: str, limits: ServeLimits) -> np.ndarray:
    """Encoded bytes → (H, W, 3) uint8, refusing oversize images from their header, before decoding."""
    import io

    from PIL import Image, UnidentifiedImageError

    from conceptseg_edge.preprocess import decode_failure, load_image

    if isinstance(data, np.bytes_):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InputError(f"{what}: expected encoded image bytes, got {type(data).__name__}")
    if not data:
        raise InputError(f"{what}: empty")
    if len(data) > limits.max_encoded_bytes:
        raise InputError(f"{what}: {len(data)} bytes exceeds this server's limit of {limits.max_encoded_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except Image.DecompressionBombError as exc:  # PIL refuses absurd sizes while reading the header
        raise InputError(f"{what}: exceeds this server's limit of {limits.max_image_pixels} pixels ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{what}: cannot decode image ({decode_failure(exc)})") from exc
    _check_pixels(h, w, what, limits)
    try:
        return load_image(data)
    except InputError as exc:  # load_image names its source "image bytes": name the input instead
        raise InputError(str(exc).replace("image bytes", what, 1)) from exc


def _image(tensors: Mapping[str, np.ndarray], limits: ServeLimits) -> np.ndarray:
    from conceptseg_edge.preprocess import as_rgb_array

    raw, encoded = tensors.get("IMAGE"), tensors.get("IMAGE_BYTES")
    if (raw is None) == (encoded is None):
        raise InputError("IMAGE / IMAGE_BYTES: give exactly one (raw H×W×C uint8 pixels, or an encoded image)")
    if encoded is not None:
        items = np.asarray(encoded, dtype=object).reshape(-1)
        if items.size != 1:
            raise InputError(f"IMAGE_BYTES: expected one encoded image, got {items.size}")
        return decode_image_bytes(items[0], "IMAGE_BYTES", limits)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        raise InputError(f"IMAGE: dtype {arr.dtype}, expected uint8")
    if arr.ndim != 3:
        raise InputError(f"IMAGE: shape {list(arr.shape)}, expected [H, W, C]")
    _check_pixels(arr.shape[0], arr.shape[1], "IMAGE", limits)
    return as_rgb_array(arr, "IMAGE")


def _supports(tensors: Mapping[str, np.ndarray], limits: ServeLimits) -> list[Any]:
    from conceptseg_edge.episodes import Support, box_from_mask

    images, masks, boxes = tensors.get("SUPPORT_IMAGES"), tensors.get("SUPPORT_MASKS"), tensors.get("SUPPORT_BOXES")
    if images is None:
        if masks is not None or boxes is not None:
            raise InputError("SUPPORT_MASKS / SUPPORT_BOXES: given without SUPPORT_IMAGES")
        return []
    images = np.asarray(images, dtype=object).reshape(-1)
    n = images.size
    if n > limits.max_supports:
        raise InputError(f"SUPPORT_IMAGES: {n} supports, at most {limits.max_supports}")
    if masks is None and boxes is None:
        raise InputError("SUPPORT_IMAGES: each support needs its mask (SUPPORT_MASKS) or box (SUPPORT_BOXES)")
    masks = None if masks is None else np.asarray(masks, dtype=object).reshape(-1)
    box_arr = _float_array(tensors, "SUPPORT_BOXES", 4)
    for name, arr in (("SUPPORT_MASKS", masks), ("SUPPORT_BOXES", box_arr)):
        if arr is not None and len(arr) != n:
            raise InputError(f"{name}: {len(arr)} entries for {n} support images")
    out = []
    for i in range(n):
        image = decode_image_bytes(images[i], f"SUPPORT_IMAGES[{i}]", limits)
        mask = None
        if masks is not None:
            mask = decode_image_bytes(masks[i], f"SUPPORT_MASKS[{i}]", limits)[..., 0] > 127
            if mask.shape != image.shape[:2]:
                raise InputError(f"SUPPORT_MASKS[{i}]: {mask.shape[1]}x{mask.shape[0]}, image is {image.shape[1]}x{image.shape[0]}")
        if box_arr is not None:
            x0, y0, x1, y1 = (float(v) for v in box_arr[i])
            h, w = image.shape[:2]
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise InputError(f"SUPPORT_BOXES[{i}]: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not inside the {w}x{h} support")
            box = (x0, y0, x1, y1)
        else:
            box = box_from_mask(mask)
        out.append(Support(image, box, mask))
    return out


def parse_request(tensors: Mapping[str, np.ndarray], limits: ServeLimits = ServeLimits()) -> SegmentRequest:
    """Decode the named input arrays of one request; every problem is an ``InputError`` naming the input.

    Geometry is validated against the image later by the runtime (``make_prompts``), with the same
    typed errors.
    """
    unknown = sorted(set(tensors) - set(INPUT_NAMES))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; expected a subset of {list(INPUT_NAMES)}")
    image = _image(tensors, limits)
    query = _one_string(tensors, "QUERY", limits.max_query_chars)
    route = _one_string(tensors, "FORCE_ROUTE", 32) or AUTO
    if route not in ROUTE_CHOICES:
        raise InputError(f"FORCE_ROUTE: {route!r}, expected one of {', '.join(ROUTE_CHOICES)}")
    points = _float_array(tensors, "POINTS", 2)
    labels = None
    if tensors.get("POINT_LABELS") is not None:
        labels = np.asarray(tensors["POINT_LABELS"])
        if labels.dtype != np.int32 or labels.ndim != 1:
            raise InputError(f"POINT_LABELS: {labels.dtype} {list(labels.shape)}, expected int32 [N]")
        if points is None:
            raise InputError("POINT_LABELS: given without POINTS")
    if points is not None and len(points) > limits.max_points:
        raise InputError(f"POINTS: {len(points)} points, at most {limits.max_points}")
    box = _float_array(tensors, "BOX", 4)
    if box is not None:
        box = box.reshape(4)
    if points is not None and len(points) == 0:
        points = None
    if points is None and box is None and not (query and query.strip()):
        raise InputError("no prompt: give POINTS, BOX or a QUERY")
    return SegmentRequest(image, query, points, labels, box, _supports(tensors, limits), route)


def _json_bytes(obj: Any) -> np.ndarray:
    return np.array([json.dumps(obj, sort_keys=True).encode("utf-8")], dtype=object)


def timings_array(timings: Mapping[str, float]) -> np.ndarray:
    """The TIMINGS output: JSON of stage → ms."""
    return _json_bytes({k: round(float(v), 3) for k, v in timings.items()})


def encode_result(result: SegmentResult, timings: Mapping[str, float]) -> dict[str, np.ndarray]:
    """A ``SegmentResult`` → the output arrays (see the module table)."""
    details = {
        "reason": result.reason,
        "completion": result.completion,
        "box": None if result.box is None else [float(v) for v in result.box],
        "bank_hit": result.bank_hit,
    }
    return {
        "MASK": np.ascontiguousarray(result.mask, dtype=bool),
        "ROUTE": np.array([result.route.encode("utf-8")], dtype=object),
        "SCORES": np.array([result.score, result.object_score], dtype=np.float32),
        "TIMINGS": timings_array(timings),
        "DETAILS": _json_bytes(details),
    }


# ---------------------------------------------------------------------------- client side


@dataclass
class ServedResult:
    """What the server answered, decoded: the same fields as the runtime's ``SegmentResult``."""

    mask: np.ndarray  # (H, W) bool
    route: str
    reason: str
    score: float
    object_score: float
    completion: str | None
    box: tuple[float, float, float, float] | None
    bank_hit: bool | None
    timings: dict[str, float]


def decode_text(value: np.ndarray) -> str:
    """The one string a BYTES output holds (with or without its batch axis)."""
    item = np.asarray(value, dtype=object).reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, (bytes, np.bytes_)) else str(item)


def require_outputs(outputs: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
    """``InputError`` naming the outputs a response lacks."""
    missing = [name for name in names if name not in outputs]
    if missing:
        raise InputError(f"response: missing output(s) {missing}")


def decode_response(outputs: Mapping[str, np.ndarray]) -> ServedResult:
    """Output arrays → ``ServedResult``."""
    require_outputs(outputs, OUTPUT_NAMES)
    details = json.loads(decode_text(outputs["DETAILS"]))
    scores = np.asarray(outputs["SCORES"], dtype=np.float32).reshape(-1)
    box = details.get("box")
    return ServedResult(
        mask=np.asarray(outputs["MASK"], dtype=bool),
        route=decode_text(outputs["ROUTE"]),
        reason=details.get("reason", ""),
        score=float(scores[0]),
        object_score=float(scores[1]),
        completion=details.get("completion"),
        box=None if box is None else tuple(box),
        bank_hit=details.get("bank_hit"),
        timings={k: float(v) for k, v in json.loads(decode_text(outputs["TIMINGS"])).items()},
    )


def request_arrays(
    image: np.ndarray | bytes,
    query: str | None = None,
    points: Sequence[Sequence[float]] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    box: Sequence[float] | np.ndarray | None = None,
    supports: Sequence[tuple[bytes, bytes | Sequence[float]]] = (),
    route: str = AUTO,
) -> dict[str, np.ndarray]:
    """Client-side: build the named input arrays for one request.

    Args:
        image: (H, W, C) uint8 pixels (sent as IMAGE) or encoded bytes (sent as IMAGE_BYTES).
        query: concept phrase or question.
        points: (N, 2) XY pixels; labels: (N,) 1/0.
        box: X0, Y0, X1, Y1 pixels.
        supports: (encoded image, encoded mask **or** a 4-number box) per support; all supports use
            the same kind.
        route: auto, prompt, shortcut or reason.
    """
    feeds: dict[str, np.ndarray] = {}
    if isinstance(image, (bytes, bytearray)):
        feeds["IMAGE_BYTES"] = np.array([bytes(image)], dtype=object)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise InputError(f"image: dtype {arr.dtype}, expected uint8 (or pass encoded bytes)")
        if arr.ndim == 2:
            arr = arr[..., None]
        feeds["IMAGE"] = np.ascontiguousarray(arr)
    if query is not None:
        feeds["QUERY"] = np.array([query.encode("utf-8")], dtype=object)
    if points is not None and len(points):
        feeds["POINTS"] = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        if labels is not None:
            from conceptseg_edge.preprocess import point_labels

            feeds["POINT_LABELS"] = point_labels(labels)  # 0.5 is refused here, not truncated to 0 on the wire
    if box is not None:
        feeds["BOX"] = np.asarray(box, dtype=np.float32).reshape(4)
    if supports:
        feeds["SUPPORT_IMAGES"] = np.array([bytes(img) for img, _ in supports], dtype=object)
        kinds = {isinstance(where, (bytes, bytearray)) for _, where in supports}
        if len(kinds) != 1:
            raise InputError("supports: give every support a mask, or every support a box")
        if kinds == {True}:
            feeds["SUPPORT_MASKS"] = np.array([bytes(m) for _, m in supports], dtype=object)
        else:
            feeds["SUPPORT_BOXES"] = np.asarray([list(b) for _, b in supports], dtype=np.float32).reshape(-1, 4)
    if route != AUTO:
        feeds["FORCE_ROUTE"] = np.array([route.encode("utf-8")], dtype=object)
    return feeds
