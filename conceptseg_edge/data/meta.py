"""The official ConceptSeg layout: ``all_meta.json`` plus image and mask files under one root.

``all_meta.json`` is ``{split: {cls_name: [item, ...]}}`` (splits ``train`` and ``test``). An item:

- ``img_path``: list of paths relative to the root; several for multi-image (CR) tasks, where all
  but the last are supports and the last is the target;
- ``mask_path``: grayscale PNG of the target, > 127 is foreground;
- ``task_name``, ``cls_name``, ``dataset_name``: strings;
- ``problem`` (optional): the query text, used by CR items;
- ``ref_box`` (optional): one ``[x1, y1, x2, y2]`` per support, as fractions of its width/height.

Any root with that file reads the same way, so the real ConceptSeg data and ConceptWorld plug in
alike. Leniencies: unknown item keys are ignored, a single-string ``img_path`` reads as a list of
one, and ``ref_box`` on a single-image item is kept but unused. Reading checks every field and (by
default) that every file exists, and names the item and field at fault. Writing is atomic per file, ``all_meta.json`` last,
so a crashed write never leaves a meta file pointing at missing images.

Box fractions are pixel *edges*: an inclusive pixel box ``(x1, y1, x2, y2)`` in a W x H image is
``[x1/W, y1/H, (x2+1)/W, (y2+1)/H]``, so ``[0, 0, 1, 1]`` is the whole image.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from conceptseg_edge.episodes import MetaEpisode, Support, build_meta_episode, box_from_mask, choose_supports
from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import read_json_object, write_bytes, write_json
from conceptseg_edge.tags import Box

META_FILE = "all_meta.json"
LEVELS = ("CI", "CD", "CR")

# Level and canonical query by task name. The first block is ConceptWorld's tasks; the keyword
# rules after it map the real ConceptSeg tasks (inferred: the official task names were not read).
_TASKS: dict[str, tuple[str, str | None]] = {
    "shape": ("CI", None),
    "colour": ("CI", None),
    "texture": ("CI", None),
    "rare": ("CI", None),
    "saliency": ("CD", "salient object segmentation"),
    "camouflage": ("CD", "camouflaged object segmentation"),
    "anomaly": ("CD", "industrial defect segmentation"),
    "polyp": ("CD", "polyp colon segmentation"),
    "skin lesion": ("CD", "skin melanocytic tumor segmentation"),
    "difference": ("CR", None),
    "consistency": ("CR", None),
}
_KEYWORDS: tuple[tuple[tuple[str, ...], str, str | None], ...] = (
    (("salien", "duts"), "CD", "salient object segmentation"),
    (("camou", "cod"), "CD", "camouflaged object segmentation"),
    (("defect", "anomal", "industr", "mvtec"), "CD", "industrial defect segmentation"),
    (("polyp", "colon"), "CD", "polyp colon segmentation"),
    (("skin", "melano", "isic"), "CD", "skin melanocytic tumor segmentation"),
    (("breast",), "CD", "breast tumor segmentation"),
    (("shadow",), "CD", "shadow"),
    (("transparen", "glass"), "CD", "transparent"),
    (("lesion",), "CD", None),
    (("consisten", "common", "cosod", "differ", "logic", "rational", "track", "temporal", "view"), "CR", None),
)


def task_info(task_name: str, n_images: int = 1) -> tuple[str, str | None]:
    """``(level, canonical query or None)`` for a task; unknown tasks are CR if multi-image, else CI."""
    if task_name in _TASKS:
        return _TASKS[task_name]
    lowered = task_name.lower()
    for keys, level, query in _KEYWORDS:
        if any(k in lowered for k in keys):
            return level, query
    return ("CR" if n_images > 1 else "CI"), None


def default_query(task_name: str, cls_name: str, n_images: int = 1) -> str:
    """The query an item without ``problem`` gets: its task's canonical query (CD), else its class name."""
    return task_info(task_name, n_images)[1] or cls_name


def box_to_fractions(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    """Inclusive pixel box to edge fractions (see the module docstring), rounded to 6 places."""
    x1, y1, x2, y2 = box
    return (round(x1 / width, 6), round(y1 / height, 6), round((x2 + 1) / width, 6), round((y2 + 1) / height, 6))


def box_from_fractions(frac: Sequence[float], width: int, height: int) -> Box:
    """Edge fractions to an inclusive pixel box, edges rounded to the nearest pixel and clipped."""
    x1 = min(max(round(frac[0] * width), 0), width - 1)
    y1 = min(max(round(frac[1] * height), 0), height - 1)
    x2 = min(max(round(frac[2] * width) - 1, x1), width - 1)
    y2 = min(max(round(frac[3] * height) - 1, y1), height - 1)
    return (x1, y1, x2, y2)


@dataclass(frozen=True)
class MetaItem:
    """One entry of ``all_meta.json``, validated."""

    img_path: tuple[str, ...]
    mask_path: str
    task_name: str
    cls_name: str
    dataset_name: str
    problem: str | None = None
    ref_box: tuple[tuple[float, float, float, float], ...] | None = None

    @property
    def level(self) -> str:
        return task_info(self.task_name, len(self.img_path))[0]

    @property
    def query(self) -> str:
        """``problem`` when given, else the task's canonical query, else the class name."""
        return self.problem or default_query(self.task_name, self.cls_name, len(self.img_path))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "img_path": list(self.img_path),
            "mask_path": self.mask_path,
            "task_name": self.task_name,
            "cls_name": self.cls_name,
            "dataset_name": self.dataset_name,
        }
        if self.problem is not None:
            out["problem"] = self.problem
        if self.ref_box is not None:
            out["ref_box"] = [list(b) for b in self.ref_box]
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> MetaItem:
        """Validate one item; ``where`` (e.g. ``train/cat[3]``) leads every error message.

        A single-string ``img_path`` is taken as a list of one.

        Raises:
            InputError: a required field is missing or of the wrong type, a path is absolute, or
                ``ref_box`` is not one box of four finite numbers per support.
        """
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected an object, got {type(data).__name__}")
        paths = data.get("img_path")
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise InputError(f"{where}.img_path: expected a non-empty list of relative paths, got {paths!r}")
        strings = {}
        for key in ("mask_path", "task_name", "cls_name", "dataset_name"):
            value = data.get(key)
            if not isinstance(value, str) or not value:
                raise InputError(f"{where}.{key}: expected a non-empty string, got {value!r}")
            strings[key] = value
        for j, p in enumerate([*paths, strings["mask_path"]]):
            if PurePosixPath(p).is_absolute() or Path(p).is_absolute():
                name = "mask_path" if j == len(paths) else f"img_path[{j}]"
                raise InputError(f"{where}.{name}: must be relative to the dataset root, got {p!r}")
        problem = data.get("problem")
        if problem is not None and not isinstance(problem, str):
            raise InputError(f"{where}.problem: expected a string, got {problem!r}")
        ref_box = _parse_ref_box(data.get("ref_box"), len(paths), where)
        return cls(tuple(paths), problem=problem or None, ref_box=ref_box, **strings)


def _parse_ref_box(raw: Any, n_images: int, where: str) -> tuple[tuple[float, float, float, float], ...] | None:
    if raw is None:
        return None
    boxes = raw if isinstance(raw, list) else None
    ok = boxes is not None and all(
        isinstance(b, list)
        and len(b) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
        for b in boxes
    )
    if not ok:
        raise InputError(f"{where}.ref_box: expected [[x1,y1,x2,y2], ...] as fractions, got {raw!r}")
    if n_images > 1 and len(boxes) != n_images - 1:
        raise InputError(f"{where}.ref_box: {len(boxes)} boxes for {n_images - 1} support images")
    return tuple((float(b[0]), float(b[1]), float(b[2]), float(b[3])) for b in boxes)


@dataclass(frozen=True, eq=False)
class Episode:
    """A concept-segmentation example: the target, its mask and query, and its supports.

    Equality compares arrays by value, so an episode read back from disk equals ``stored()`` of the
    one written.

    Attributes:
        image: (H, W, 3) uint8 target image.
        mask: (H, W) bool target mask.
        query: concept phrase, canonical task query or problem text.
        level: "CI", "CD" or "CR".
        supports: for CR the other images of the item (the layout keeps their boxes, not masks);
            for CI/CD same-class examples, which the layout does not keep: there a reader draws
            supports from the class's other train items instead.
    """

    image: np.ndarray
    mask: np.ndarray
    query: str
    level: str
    task_name: str
    cls_name: str
    dataset_name: str
    supports: tuple[Support, ...] = ()

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise InputError(f"image: expected (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if self.mask.shape != self.image.shape[:2] or self.mask.dtype != bool:
            raise InputError(f"mask: expected bool {self.image.shape[:2]}, got {self.mask.shape} {self.mask.dtype}")
        if self.level not in LEVELS:
            raise InputError(f"level: expected one of {LEVELS}, got {self.level!r}")

    def stored(self) -> Episode:
        """What the layout keeps of this episode: CR supports without masks; no CI/CD supports."""
        supports = tuple(Support(s.image, s.box) for s in self.supports) if self.level == "CR" else ()
        return Episode(
            self.image, self.mask, self.query, self.level, self.task_name, self.cls_name, self.dataset_name, supports
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Episode):
            return NotImplemented
        same_text = (self.query, self.level, self.task_name, self.cls_name, self.dataset_name) == (
            other.query,
            other.level,
            other.task_name,
            other.cls_name,
            other.dataset_name,
        )
        return (
            same_text
            and np.array_equal(self.image, other.image)
            and np.array_equal(self.mask, other.mask)
            and len(self.supports) == len(other.supports)
            and all(_support_equal(a, b) for a, b in zip(self.supports, other.supports))
        )

    __hash__ = None  # type: ignore[assignment]


def _support_equal(a: Support, b: Support) -> bool:
    masks = (a.mask is None and b.mask is None) or (
        a.mask is not None and b.mask is not None and np.array_equal(a.mask, b.mask)
    )
    return a.box == b.box and masks and np.array_equal(a.image, b.image)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ConceptSegDataset:
    """A dataset root and its validated ``all_meta.json``."""

    root: Path
    splits: Mapping[str, Mapping[str, tuple[MetaItem, ...]]]

    @classmethod
    def open(cls, root: str | Path, check_files: bool = True) -> ConceptSegDataset:
        """Read and validate ``root/all_meta.json``.

        Args:
            root: dataset directory.
            check_files: also check that every image and mask file exists (a stat per file).

        Raises:
            InputError: the meta file is missing, not JSON, not ``{split: {cls: [item]}}``, has a
                malformed item, or names a missing file; the message names the item and field.
        """
        root = Path(root)
        meta_path = root / META_FILE
        raw = read_json_object(meta_path, f"not found; is {root} a ConceptSeg dataset root?",
                               "expected {split: {cls_name: [item, ...]}}")
        splits: dict[str, dict[str, tuple[MetaItem, ...]]] = {}
        for split, classes in raw.items():
            if not isinstance(classes, dict):
                raise InputError(f"{META_FILE}: {split}: expected {{cls_name: [item, ...]}}")
            splits[split] = {}
            for cls_name, items in classes.items():
                if not isinstance(items, list):
                    raise InputError(f"{META_FILE}: {split}/{cls_name}: expected a list of items")
                splits[split][cls_name] = tuple(
                    MetaItem.from_json(item, f"{META_FILE}: {split}/{cls_name}[{i}]") for i, item in enumerate(items)
                )
        dataset = cls(root, splits)
        if check_files:
            dataset._check_files()
        return dataset

    def _check_files(self) -> None:
        for split, cls_name, i, item in self.items():
            where = f"{META_FILE}: {split}/{cls_name}[{i}]"
            for j, rel in enumerate(item.img_path):
                if not (self.root / rel).is_file():
                    raise InputError(f"{where}.img_path[{j}]: file not found: {self.root / rel}")
            if not (self.root / item.mask_path).is_file():
                raise InputError(f"{where}.mask_path: file not found: {self.root / item.mask_path}")

    def items(self, split: str | None = None) -> Iterator[tuple[str, str, int, MetaItem]]:
        """``(split, cls_name, index, item)`` for one split or all, in file order."""
        for name, classes in self.splits.items():
            if split is None or name == split:
                for cls_name, items in classes.items():
                    for i, item in enumerate(items):
                        yield name, cls_name, i, item

    def item(self, split: str, cls_name: str, index: int) -> MetaItem:
        try:
            return self.splits[split][cls_name][index]
        except (KeyError, IndexError) as exc:
            raise InputError(f"{split}/{cls_name}[{index}]: no such item in {self.root / META_FILE}") from exc

    def load(self, item: MetaItem) -> Episode:
        """Read an item's images and mask; CR supports carry their ``ref_box`` as pixel boxes.

        Raises:
            InputError: a file is unreadable, or the mask's size differs from the target's.
        """
        target, mask = self._target(item)
        supports = []
        for j, rel in enumerate(item.img_path[:-1]):
            image = _read_image(self.root / rel)
            h, w = image.shape[:2]
            box = box_from_fractions(item.ref_box[j], w, h) if item.ref_box else None
            supports.append(Support(image, box))
        return Episode(
            target, mask, item.query, item.level, item.task_name, item.cls_name, item.dataset_name, tuple(supports)
        )

    def episodes(self, split: str) -> Iterator[Episode]:
        for _, _, _, item in self.items(split):
            yield self.load(item)

    def meta_episode(self, split: str, cls_name: str, index: int, rng: np.random.Generator) -> MetaEpisode:
        """The policy's view of one item, supports drawn as in Meta-GRPO training.

        A multi-image item brings its own supports. Otherwise supports are drawn from the class's
        train items (never the target itself), as many as ``episodes.supports_needed`` says.
        """
        episode = self.load(self.item(split, cls_name, index))
        supports = episode.supports
        if not supports:
            pool = self.splits.get("train", {}).get(cls_name, ())
            picks = choose_supports(len(pool), index if split == "train" else None, rng)
            supports = tuple(self._support(pool[i]) for i in picks)
        return build_meta_episode(episode.image, episode.mask, episode.query, supports)

    def _support(self, item: MetaItem) -> Support:
        image, mask = self._target(item)
        return Support(image, box_from_mask(mask), mask)

    def _target(self, item: MetaItem) -> tuple[np.ndarray, np.ndarray]:
        image = _read_image(self.root / item.img_path[-1])
        mask = _read_mask(self.root / item.mask_path)
        if mask.shape != image.shape[:2]:
            raise InputError(
                f"{self.root / item.mask_path}: mask is {mask.shape[::-1]} px but its target image is "
                f"{image.shape[1::-1]} px"
            )
        return image, mask


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    return image


def _read_image(path: Path) -> np.ndarray:
    return np.array(_open(path).convert("RGB"))


def _read_mask(path: Path) -> np.ndarray:
    return np.array(_open(path).convert("L")) > 127


# --------------------------------------------------------------------------- writing


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_episode(root: str | Path, stem: str, episode: Episode) -> MetaItem:
    """Write an episode's files under ``root`` (atomically, each) and return its item.

    The target goes to ``images/<stem>.png``, CR supports to ``images/<stem>_<j>.png``, the mask to
    ``masks/<stem>.png``. CI/CD supports are not written (see ``Episode``).

    Raises:
        InputError: the layout cannot represent the episode: its level differs from what its
            task name implies, or a CR support has no box.
    """
    root = Path(root)
    supports = episode.supports if episode.level == "CR" else ()
    n_images = len(supports) + 1
    level = task_info(episode.task_name, n_images)[0]
    if level != episode.level:
        raise InputError(f"level: task {episode.task_name!r} reads back as {level}, not {episode.level}")
    img_paths = []
    ref_box = []
    for j, support in enumerate(supports):
        if support.box is None:
            raise InputError(f"supports[{j}].box: a CR support needs a box for ref_box")
        rel = f"images/{stem}_{j}.png"
        write_bytes(root / rel, _png(support.image))
        img_paths.append(rel)
        h, w = support.image.shape[:2]
        ref_box.append(box_to_fractions(support.box, w, h))
    img_paths.append(f"images/{stem}.png")
    write_bytes(root / img_paths[-1], _png(episode.image))
    mask_path = f"masks/{stem}.png"
    write_bytes(root / mask_path, _png(episode.mask.astype(np.uint8) * 255))
    fallback = default_query(episode.task_name, episode.cls_name, n_images)
    return MetaItem(
        img_path=tuple(img_paths),
        mask_path=mask_path,
        task_name=episode.task_name,
        cls_name=episode.cls_name,
        dataset_name=episode.dataset_name,
        problem=None if episode.query == fallback else episode.query,
        ref_box=tuple(ref_box) or None,
    )


def write_meta(root: str | Path, splits: Mapping[str, Mapping[str, Sequence[MetaItem]]]) -> Path:
    """Write ``root/all_meta.json`` atomically; call it after every file it names is written."""
    path = Path(root) / META_FILE
    write_json(path, {s: {c: [i.to_json() for i in items] for c, items in cls.items()} for s, cls in splits.items()})
    return path
