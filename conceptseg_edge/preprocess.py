"""SAM2's pre- and post-processing in numpy, for the torch-free runtime.

The arithmetic mirrors sam2 exactly so runtime masks match the eager reference:
- image: squash-resize to S×S, bilinear **with antialiasing** on [0, 1] floats (torchvision's tensor
  ``Resize``, i.e. PIL's separable triangle filter), then ImageNet mean/std;
- prompts: pixel XY in the original image → ``xy / (W, H) * S``; a box is two corner points with
  labels 2 and 3 placed first; one (0, 0) padding point with label -1 is always appended;
- masks: low-res logits upsampled bilinearly (``align_corners=False``, no antialiasing) to the
  original size, thresholded at 0; best multimask by predicted IoU; for single-mask output, SAM2's
  stability fallback (``build_sam2(apply_postprocessing=True)``).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import InputError

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs before decoding
SIXTEEN_BIT_MAX = 65535
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# ----------------------------------------------------------------------------- images


def load_image(source: str | Path | bytes) -> np.ndarray:
    """Read an image file or encoded bytes as (H, W, 3) uint8 RGB.

    Grayscale, palette, CMYK and RGBA are converted (alpha dropped); 16-bit and float images are
    scaled by ``to_uint8``'s rule (or refused). Unreadable input raises ``InputError`` naming the source.
    """
    from PIL import Image, UnidentifiedImageError

    name = "image bytes" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise InputError(f"{name}: file not found")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InputError(f"{name}: {img.width}x{img.height} exceeds {MAX_IMAGE_PIXELS} pixels")
            img.load()
            return image_to_rgb(img, name)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name}: cannot decode image ({decode_failure(exc)})") from exc


def decode_failure(exc: BaseException) -> str:
    """Why an image did not decode, for a user: PIL's message without object reprs (``<_io.BytesIO object at 0x…>``)."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format, or a corrupt header"
    return without_reprs(str(exc)) or type(exc).__name__


def without_reprs(text: str) -> str:
    """``text`` with default object reprs (``<_io.BytesIO object at 0x7f…>``) replaced: error text goes to clients."""
    return _OBJECT_REPR.sub("the input", text)


# PIL modes whose samples are not 8 bit: read as numbers and scaled by ``to_uint8``.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def image_to_rgb(img, name: str = "image") -> np.ndarray:
    """PIL image of any common mode → (H, W, 3) uint8 (16-bit and float modes through ``to_uint8``)."""
    if img.mode in _WIDE_MODES:
        return as_rgb_array(np.asarray(img), name)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def to_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Scale samples wider than 8 bit to uint8, or refuse them; the one rule for files and arrays.

    - uint8: as is;
    - 16-bit (uint16; PIL's ``I;16`` modes) and 32-bit integers (PIL's ``I``) holding values in
      0–65535: ``/ 257`` rounded (65535 → 255), i.e. the full 16-bit range;
    - float (PIL's ``F``): values in [0, 1] → ``× 255`` rounded;
    - anything else (negative or > 65535 integers, floats outside [0, 1], NaN or infinity, other
      dtypes) raises ``InputError``: guessing a scale would return a plausible-looking wrong mask.
    """
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16 or (image.dtype.kind in "iu" and image.size and 0 <= image.min() and image.max() <= SIXTEEN_BIT_MAX):
        return (image.astype(np.float64) / 257.0).round().astype(np.uint8)
    if image.dtype.kind in "iu":
        raise InputError(f"{name}: integer samples from {image.min()} to {image.max()}, "
                         f"expected 0-255 (uint8) or 0-{SIXTEEN_BIT_MAX} (16 bit)")
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise InputError(f"{name}: float samples include NaN or infinity")
        lo, hi = (float(image.min()), float(image.max())) if image.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise InputError(f"{name}: float samples from {lo:g} to {hi:g}, expected values in [0, 1]")
        return (image.astype(np.float64) * 255.0).round().astype(np.uint8)
    raise InputError(f"{name}: dtype {image.dtype}, expected uint8, 16-bit integers or floats in [0, 1]")


def as_rgb_array(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an in-memory image: (H, W) or (H, W, 1|3|4) → (H, W, 3) uint8 (samples scaled by ``to_uint8``)."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InputError(f"{name}: shape {image.shape}, expected (H, W), (H, W, 3) or (H, W, 4)")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"{name}: {image.shape[1]}x{image.shape[0]} is too small")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: {image.shape[1]}x{image.shape[0]} exceeds {MAX_IMAGE_PIXELS} pixels")
    image = to_uint8(image, name)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


# ----------------------------------------------------------------------------- resizing


def _resize_taps(in_size: int, out_size: int, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, (out_size, taps), of a 1-D bilinear resize.

    ``antialias=True`` is PIL's / torch's antialiased triangle filter (support widened by the scale
    when shrinking); ``False`` is ``F.interpolate(mode="bilinear", align_corners=False)``.
    """
    scale = in_size / out_size
    if not antialias:
        # float32 index arithmetic, as torch's kernel does it for float32 tensors
        src = np.float32(scale) * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
        src = np.maximum(src, np.float32(0.0))
        i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        lam = (src - i0).astype(np.float32)
        return np.stack([i0, i1], 1), np.stack([1 - lam, lam], 1)
    support = scale if scale > 1.0 else 1.0
    inv = 1.0 / support
    center = (np.arange(out_size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    taps = int((xmax - xmin).max())
    idx = xmin[:, None] + np.arange(taps)[None, :]
    w = np.maximum(0.0, 1.0 - np.abs((idx - center[:, None] + 0.5) * inv))
    w[idx >= xmax[:, None]] = 0.0
    w /= w.sum(1, keepdims=True)
    return np.minimum(idx, in_size - 1), w.astype(np.float32)


def resize(array: np.ndarray, out_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """Separable bilinear resize of (H, W) or (H, W, C) float32 (each channel by ``resize_plane``)."""
    if array.ndim == 2:
        return resize_plane(array, out_hw, antialias)
    out = np.empty((*out_hw, array.shape[2]), np.float32)
    for c in range(array.shape[2]):
        out[..., c] = resize_plane(np.ascontiguousarray(array[..., c], dtype=np.float32), out_hw, antialias)
    return out


def resize_plane(plane: np.ndarray, out_hw: tuple[int, int], antialias: bool, out: np.ndarray | None = None) -> np.ndarray:
    """Separable bilinear resize of one (H, W) float32 plane, into ``out`` ((*out_hw) float32) when given.

    Two passes of gathers, no dense matrices. A pass along rows gathers whole contiguous rows; the
    pass along columns runs as a row pass on the transposed plane (gathering single floats along a
    row is several times slower than two transposes), so it runs on the smaller intermediate:
    first when the image grows in height (on H rows, not out_h), last when it shrinks.
    """
    (h, w), (out_h, out_w) = plane.shape, out_hw
    out = np.empty(out_hw, np.float32) if out is None else out
    rows = _resize_taps(h, out_h, antialias)
    cols = _resize_taps(w, out_w, antialias)
    if h <= out_h:
        mid = _column_pass(plane, *cols, out=np.empty((h, out_w), np.float32))
        return _row_pass(mid, *rows, out=out)
    mid = _row_pass(plane, *rows, out=np.empty((out_h, w), np.float32))
    return _column_pass(mid, *cols, out=out)


def _row_pass(src: np.ndarray, idx: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """One resize pass along axis 0: ``out = Σ_k w[:, k] · src[idx[:, k]]``, in place (one scratch).

    ``mode="clip"``: the indices are in range already, and ``np.take`` into ``out`` in its default
    mode buffers the whole result first."""
    np.take(src, idx[:, 0], axis=0, out=out, mode="clip")
    out *= w[:, :1]
    tmp = np.empty_like(out) if idx.shape[1] > 1 else out
    for k in range(1, idx.shape[1]):
        np.take(src, idx[:, k], axis=0, out=tmp, mode="clip")
        tmp *= w[:, k : k + 1]
        out += tmp
    return out


def _column_pass(src: np.ndarray, idx: np.ndarray, w: np.ndarray, out: np.ndarray) -> np.ndarray:
    """One resize pass along axis 1, as a row pass on ``src``'s transpose; written into ``out``."""
    transposed = _row_pass(np.ascontiguousarray(src.T), idx, w, out=np.empty(out.shape[::-1], np.float32))
    out[...] = transposed.T
    return out


def preprocess_image(image: np.ndarray, image_size: int, mean, std) -> np.ndarray:
    """(H, W, 3) uint8 → (1, 3, S, S) float32, normalised, as SAM2's transforms.

    SAM2 resizes ``x / 255`` and then normalises ``(x - mean) / std``; each output pixel's resize
    weights sum to one, so that equals resizing ``x · a + b`` with ``a = 1 / (255 · std)`` and
    ``b = -mean / std`` (to float32 rounding). The affine runs fused into the uint8 → float32
    conversion of each channel, and each channel is resized straight into its plane of the output:
    no float copy of the whole image, no normalise pass and no HWC → CHW transpose at S × S.
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scale, shift = np.float32(1.0 / 255.0) / std, -mean / std
    out = np.empty((1, 3, image_size, image_size), np.float32)
    plane = np.empty(image.shape[:2], np.float32)
    for c in range(3):
        np.multiply(image[:, :, c], scale[c], out=plane)
        plane += shift[c]
        resize_plane(plane, (image_size, image_size), antialias=True, out=out[0, c])
    return out


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompts:
    """Geometric prompts in original-image pixels.

    ``points``: (N, 2) float XY; ``labels``: (N,) 1 = foreground, 0 = background; ``box``: XYXY.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return self.box is None and (self.points is None or len(self.points) == 0)

    @property
    def multimask(self) -> bool:
        """SAM's convention: one click is ambiguous, so return the best of three masks."""
        return self.box is None and self.points is not None and len(self.points) == 1


def point_labels(labels) -> np.ndarray:
    """Click labels → (N,) int32, each exactly 0 (background) or 1 (foreground).

    Checked before the cast: ``0.5`` or ``"1"`` is refused, never truncated to a label.
    """
    try:
        raw = np.asarray(labels).reshape(-1)
    except ValueError as exc:
        raise InputError(f"points: labels {labels!r} are not a flat list of numbers") from exc
    valid = raw.dtype.kind in "biuf" and bool(np.isin(raw, (0, 1)).all())
    if not valid:
        shown = sorted({str(v) for v in raw.tolist()})[:8]
        raise InputError(f"points: labels must be exactly 0 (background) or 1 (foreground), got {shown}")
    return raw.astype(np.int32)


def make_prompts(
    points: list[tuple[float, float]] | np.ndarray | None,
    labels: list[int] | np.ndarray | None,
    box: tuple[float, float, float, float] | np.ndarray | None,
    image_hw: tuple[int, int],
) -> Prompts:
    """Validate prompts against the image; errors name the offending prompt."""
    h, w = image_hw
    pts = lab = bx = None
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        lab = np.ones(len(pts), np.int32) if labels is None else point_labels(labels)
        if len(lab) != len(pts):
            raise InputError(f"points: {len(pts)} points but {len(lab)} labels")
        for x, y in pts:
            if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
                raise InputError(f"point ({x:g}, {y:g}) lies outside the {w}x{h} image")
    if box is not None:
        bx = np.asarray(box, dtype=np.float32).reshape(-1)
        if bx.size != 4 or not np.isfinite(bx).all():
            raise InputError(f"box: expected 4 finite numbers X0,Y0,X1,Y1, got {box!r}")
        x0, y0, x1, y1 = bx
        if not (x1 > x0 and y1 > y0):
            raise InputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}): needs X1 > X0 and Y1 > Y0")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise InputError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) extends outside the {w}x{h} image")
    return Prompts(pts, lab, bx)


def encode_prompts(prompts: Prompts, image_hw: tuple[int, int], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts → decoder ``point_coords`` (1, N, 2) float32 and ``point_labels`` (1, N) int32.

    Box corners come first (labels 2, 3), then points, then one (0, 0) padding point with label -1:
    SAM2's predictor merges the box into the point list and calls the prompt encoder with
    ``boxes=None``, which always pads. No geometry at all gives N = 0 (the concept routes).
    """
    h, w = image_hw
    scale = np.array([image_size / w, image_size / h], np.float32)
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if prompts.box is not None:
        coords.append(prompts.box.reshape(2, 2) * scale)
        labels.append(np.array([2, 3], np.int32))
    if prompts.points is not None:
        coords.append(prompts.points * scale)
        labels.append(prompts.labels)
    if not coords:
        return np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.int32)
    coords.append(np.zeros((1, 2), np.float32))
    labels.append(np.array([-1], np.int32))
    return (
        np.concatenate(coords)[None].astype(np.float32),
        np.concatenate(labels)[None].astype(np.int32),
    )


# ----------------------------------------------------------------------------- masks


def stability_scores(logits: np.ndarray, delta: float) -> np.ndarray:
    """IoU between the masks thresholded at +delta and -delta, per mask (SAM2's definition)."""
    flat = logits.reshape(logits.shape[0], -1)
    inter = (flat > delta).sum(1).astype(np.float32)
    union = (flat > -delta).sum(1).astype(np.float32)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def select_mask(
    low_res: np.ndarray, ious: np.ndarray, multimask: bool, delta: float, thresh: float
) -> tuple[int, np.ndarray, float]:
    """Choose among the decoder's four masks: (index, (s, s) logits, predicted IoU).

    Multimask: the best of tokens 1–3 by predicted IoU. Single: token 0, unless its stability score
    is below ``thresh``, in which case the best multimask token (SAM2's dynamic fallback).
    """
    best = 1 + int(np.argmax(ious[1:]))
    if multimask:
        return best, low_res[best], float(ious[best])
    if stability_scores(low_res[:1], delta)[0] >= thresh:
        return 0, low_res[0], float(ious[0])
    return best, low_res[best], float(ious[best])


def upsample_mask(low_res: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.0) -> np.ndarray:
    """(s, s) logits → (H, W) bool at the original size."""
    return resize(low_res.astype(np.float32), image_hw, antialias=False) > threshold
