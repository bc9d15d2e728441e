"""Meta-episodes: what the policy sees, in Meta-GRPO training and at evaluation.

An episode is a target image plus up to four support images of the same concept. Supports are
resized to 300x300 and tiled 2x2 into a 600x600 mosaic (tiles in reading order: top-left,
top-right, bottom-left, bottom-right; unused tiles black); a single support fills the whole
600x600 image instead. Each support's box is the tight box of its mask in the mosaic frame (or its
given box, scaled, when there is no mask). With two or more supports the top-left box is hidden:
the policy must find it (``<check>``), which verifies the rule it inferred. The other boxes are
drawn in red and listed in the prompt. The target is resized to 600x600 as well.

Boxes everywhere are ``(x1, y1, x2, y2)`` integer pixels with inclusive corners.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from conceptseg_edge.errors import InputError
from conceptseg_edge.tags import Box, format_box, template

SYSTEM_PROMPT = "You are a helpful assistant."
FRAME = 600
TILE = FRAME // 2
MAX_SUPPORTS = 4
TILE_NAMES = ("top-left", "top-right", "bottom-left", "bottom-right")
BOX_COLOUR = (255, 0, 0)
BOX_WIDTH = 3


@dataclass(frozen=True, eq=False)
class Support:
    """One support image and where its concept is.

    Attributes:
        image: (H, W, 3) uint8.
        box: the concept's box in the support's own pixel frame; None when it has none.
        mask: (H, W) bool, optional; when given, the mosaic box is the tight box of the resized
            mask, which is tighter than scaling ``box``.
    """

    image: np.ndarray
    box: Box | None
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        _check_image(self.image, "support.image")
        if self.mask is not None and self.mask.shape != self.image.shape[:2]:
            raise InputError(f"support.mask: shape {self.mask.shape} differs from image {self.image.shape[:2]}")


@dataclass(frozen=True, eq=False)
class MetaEpisode:
    """The policy's inputs for one target, and the ground truth in the policy frame.

    Attributes:
        mosaic: (600, 600, 3) uint8 support image with the visible boxes drawn; None without supports.
        target: (600, 600, 3) uint8 target image.
        prompt: the user-turn text (it follows the images).
        query: the concept phrase or question.
        hidden_box: the top-left support's box, the ``<check>`` target; None when nothing is hidden.
        visible_boxes: the boxes drawn on the mosaic, in tile order.
        gt_box: tight box of ``gt_mask``; None when the mask is empty.
        gt_mask: (600, 600) bool target mask.
    """

    mosaic: np.ndarray | None
    target: np.ndarray
    prompt: str
    query: str
    hidden_box: Box | None
    visible_boxes: tuple[Box, ...]
    gt_box: Box | None
    gt_mask: np.ndarray

    @property
    def has_hidden_box(self) -> bool:
        return self.hidden_box is not None

    def images(self) -> list[np.ndarray]:
        """The user turn's images, in order: the mosaic (if any), then the target."""
        return [self.target] if self.mosaic is None else [self.mosaic, self.target]

    def messages(self) -> list[dict[str, Any]]:
        """The chat: system prompt, then a user turn with the images (PIL) then the text."""
        content: list[dict[str, Any]] = [{"type": "image", "image": Image.fromarray(im)} for im in self.images()]
        content.append({"type": "text", "text": self.prompt})
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": content},
        ]


def box_from_mask(mask: np.ndarray) -> Box | None:
    """Tight inclusive box of a 2-D mask's True pixels; None when it has none."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask: expected 2-D, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))


def box_to_image(box: Box | None, image_hw: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """A policy-frame (600×600, inclusive corners) box → image pixels (exclusive corners), clipped.

    None when there is no box or nothing is left after clipping: the mask decoder then gets the
    concept tokens alone.
    """
    if box is None:
        return None
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = np.clip([x0 * w / FRAME, (x1 + 1) * w / FRAME], 0, w)
    y0, y1 = np.clip([y0 * h / FRAME, (y1 + 1) * h / FRAME], 0, h)
    return (float(x0), float(y0), float(x1), float(y1)) if x1 > x0 and y1 > y0 else None


def supports_needed(n_candidates: int) -> int:
    """How many supports an episode takes, given how many other items its class offers.

    The paper: one support when the class has exactly two training items (so one candidate), else
    four. Counting candidates rather than items extends that to test targets, whose class pool
    does not contain them; with no candidate there is no support.
    """
    if n_candidates <= 0:
        return 0
    return 1 if n_candidates == 1 else MAX_SUPPORTS

def choose_supports(n_pool: int, exclude: int | None, rng: np.random.Generator) -> list[int]:
    """Indices into a class pool of ``n_pool`` items to use as supports, never ``exclude``.

    Without replacement when the pool allows, with replacement when it has fewer candidates than
    needed (two or three), so the mosaic is always full.
    """
    candidates = [i for i in range(n_pool) if i != exclude]
    k = supports_needed(len(candidates))
    if k == 0:
        return []
    picks = rng.choice(len(candidates), size=k, replace=len(candidates) < k)
    return [candidates[int(i)] for i in picks]


def build_meta_episode(
    target: np.ndarray, target_mask: np.ndarray | None, query: str, supports: Sequence[Support]
) -> MetaEpisode:
    """Lay out one episode for the policy.

    Args:
        target: (H, W, 3) uint8 target image, any size.
        target_mask: (H, W) bool ground truth for the target; None at inference (no ground truth).
        query: concept phrase (CI), canonical task query (CD) or problem text (CR).
        supports: 0 to 4 supports; with one it fills the frame, with more they are tiled.

    Raises:
        InputError: bad shapes, an empty query, or more than four supports.
    """
    _check_image(target, "target")
    if target_mask is None:
        target_mask = np.zeros(target.shape[:2], bool)
    target_mask = np.asarray(target_mask)
    if target_mask.shape != target.shape[:2]:
        raise InputError(f"target_mask: shape {target_mask.shape} differs from target {target.shape[:2]}")
    if not query.strip():
        raise InputError("query: empty")
    if len(supports) > MAX_SUPPORTS:
        raise InputError(f"supports: at most {MAX_SUPPORTS}, got {len(supports)}")
    gt_mask = _resize_mask(target_mask.astype(bool), FRAME)
    mosaic, boxes = _mosaic(supports)
    tiled = len(supports) > 1
    hidden = boxes[0] if tiled else None
    visible = [(TILE_NAMES[i], box) for i, box in enumerate(boxes) if box is not None and (i > 0 or not tiled)]
    if mosaic is not None:
        image = Image.fromarray(mosaic)
        draw = ImageDraw.Draw(image)
        for _, box in visible:
            draw.rectangle(box, outline=BOX_COLOUR, width=BOX_WIDTH)
        mosaic = np.array(image)
    return MetaEpisode(
        mosaic=mosaic,
        target=_resize_image(target, FRAME),
        prompt=_prompt(query, len(supports), visible, hidden is not None),
        query=query,
        hidden_box=hidden,
        visible_boxes=tuple(b for _, b in visible),
        gt_box=box_from_mask(gt_mask),
        gt_mask=gt_mask,
    )


def _mosaic(supports: Sequence[Support]) -> tuple[np.ndarray | None, list[Box | None]]:
    if not supports:
        return None, []
    if len(supports) == 1:
        return _resize_image(supports[0].image, FRAME), [_support_box(supports[0], FRAME, 0, 0)]
    mosaic = np.zeros((FRAME, FRAME, 3), dtype=np.uint8)
    boxes = []
    for i, support in enumerate(supports):
        top, left = (i // 2) * TILE, (i % 2) * TILE
        mosaic[top : top + TILE, left : left + TILE] = _resize_image(support.image, TILE)
        boxes.append(_support_box(support, TILE, left, top))
    return mosaic, boxes


def _support_box(support: Support, size: int, left: int, top: int) -> Box | None:
    if support.mask is not None:
        box = box_from_mask(_resize_mask(support.mask.astype(bool), size))
    elif support.box is not None:
        box = scale_box(support.box, support.image.shape[1], support.image.shape[0], size)
    else:
        box = None
    return None if box is None else (box[0] + left, box[1] + top, box[2] + left, box[3] + top)


def scale_box(box: Box, width: int, height: int, size: int) -> Box:
    """Map an inclusive pixel box from a ``width`` x ``height`` image onto a ``size`` x ``size`` one.

    Pixel edges are scaled (x1 to floor, x2 + 1 to ceil), so the box still covers every pixel the
    original did.
    """
    x1, y1, x2, y2 = box
    sx, sy = size / width, size / height
    last = size - 1
    return (
        min(max(math.floor(x1 * sx), 0), last),
        min(max(math.floor(y1 * sy), 0), last),
        min(max(math.ceil((x2 + 1) * sx) - 1, 0), last),
        min(max(math.ceil((y2 + 1) * sy) - 1, 0), last),
    )


def _prompt(query: str, n_supports: int, visible: list[tuple[str, Box]], with_check: bool) -> str:
    frame = f"Boxes are integer pixels [x1,y1,x2,y2] in each image's {FRAME}x{FRAME} frame."
    if n_supports == 0:
        intro = "The image is the target image."
        task = "Locate the object in the target image that the query asks for."
    elif n_supports == 1:
        where = f" at {format_box(visible[0][1])}" if visible else ""
        intro = (
            f"Image 1 is an example of the concept, marked with a red box{where}. "
            "Image 2 is the target image."
        )
        task = "Find the rule behind the marked example, then locate the object in image 2 that follows it."
    else:
        listed = "; ".join(f"{name} {format_box(box)}" for name, box in visible) or "none"
        hidden = "the top-left example's box is hidden" if with_check else "the top-left example has no box"
        intro = (
            f"Image 1 is a 2x2 mosaic of {n_supports} example images of the concept, marked with red boxes "
            f"({listed}); {hidden}. Image 2 is the target image."
        )
        task = "Find the rule the marked examples share"
        task += ", check it by locating the concept in the top-left example" if with_check else ""
        task += ", then locate the object in image 2 that follows it."
    check = " the top-left example's box in <check></check>," if with_check else ""
    output = (
        "Output your thinking in <think></think>, the rule in <rule></rule>,"
        f"{check} the target box in <bbox></bbox> and a short phrase naming the object in <answer></answer>, "
        f"in this format: {template(with_check)}"
    )
    return f'{intro}\nQuery: "{query}"\n{task} {frame}\n{output}'


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        raise InputError(f"{name}: expected an (H, W, 3) uint8 array, got {shape}")


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape == (size, size):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return np.asarray(resized) > 127
