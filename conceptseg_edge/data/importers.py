"""Importers from the layouts users already have to the ConceptSeg layout (``data.meta``).

Three sources, each read as untrusted input (every path must stay inside its root, every image and
mask must decode and agree in size, and a missing file is named):

- **MVTec-AD**: ``ROOT/<category>/test/<defect>/*.png`` with ``ROOT/<category>/ground_truth/<defect>/
  <stem>_mask.png``; ``good`` images have no mask and get an empty one (``<category>/train/``, all
  defect-free and without ground truth, is not imported). Level CD, task ``anomaly``,
  so the query is ConceptSeg's canonical CD query "industrial defect segmentation" (method-notes:
  CD items use their task's canonical query, not a per-class phrase). The class is
  ``"<category> <defect>"``, so the supports a training episode draws are of the same defect kind.
- **Folder pairs** (Kvasir-SEG style): ``SRC/images/<rel>.<ext>`` with ``SRC/masks/<rel><suffix>.<ext>``
  and one class name; written as ``images/<rel>.<ext>`` and ``masks/<rel>.png``. The level is what
  the class name implies (``polyp`` → CD with its canonical query); ``level`` overrides it with a
  generic task of that level (``object`` for CI, ``lesion`` for CD) and the class name as query,
  since ``all_meta.json`` derives the level from ``task_name`` alone.
- **COCO instances** (``images``/``annotations``/``categories``): one CI item per image and category,
  its mask the union of that category's instances (crowd regions included). Polygons and uncompressed RLE are decoded here;
  compressed RLE needs pycocotools.

Output: images copied byte for byte to ``OUT/images/<rel>``, masks written as 0/255 PNG to
``OUT/masks/``, and each item's ``ref_box`` is the tight box of its mask as edge fractions (absent
for an empty mask). The split is a pure function of ``seed`` and the image's relative path, so a
re-import (even with files added) keeps every old image in its split. The whole root is built in a
staging directory and swapped in only when every file was read and written.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from conceptseg_edge.data.meta import META_FILE, MetaItem, box_to_fractions, task_info, write_meta
from conceptseg_edge.episodes import box_from_mask
from conceptseg_edge.errors import DependencyError, InputError
from conceptseg_edge.fileio import contained, read_json_object, staged_dir, write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: The task a level falls back to when the class name implies another level (see the module docstring).
GENERIC_TASKS = {"CI": "object", "CD": "lesion"}
MVTEC_TASK = "anomaly"
COCO_TASK = GENERIC_TASKS["CI"]


@dataclass(frozen=True)
class SplitRule:
    """How items are split: about ``test_fraction`` of the images go to ``test``, chosen by a hash of
    ``seed`` and the image's relative path (stable across re-imports and file order)."""

    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction <= 1.0:
            raise InputError(f"--test-fraction: expected [0, 1], got {self.test_fraction}")

    def split_of(self, key: str) -> str:
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") / 2**64 < self.test_fraction else "train"


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: the root and the item count per ``(split, level)``."""

    root: Path
    counts: dict[tuple[str, str], int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class _Pending:
    """One item to write: its source image, how to get its mask once the image size is known, and
    its text fields. ``image_rel`` is relative to the source root and becomes ``images/<image_rel>``."""

    image: Path
    image_rel: str
    mask_rel: str
    mask: Callable[[tuple[int, int]], np.ndarray]  # (height, width) -> (H, W) bool
    task_name: str
    cls_name: str
    problem: str | None = None


# --------------------------------------------------------------------------- sources


def import_mvtec(src: str | os.PathLike[str], out: str | os.PathLike[str], *, name: str | None = None,
                 split: SplitRule = SplitRule()) -> ImportSummary:  # fmt: skip
    """Import an MVTec-AD root (or one category of it: a directory holding ``test/``).

    Raises:
        InputError: no ``<category>/test/<defect>/`` folder with images, a defect image without its
            ``ground_truth/<defect>/<stem>_mask.png``, an unreadable image or mask, sizes that differ.
    """
    return _write(out, partial(_mvtec_items, src), name or Path(src).resolve().name, split)


def _mvtec_items(src: str | os.PathLike[str]) -> list[_Pending]:
    root = _source_dir(src)
    categories = [root] if (root / "test").is_dir() else sorted(p for p in root.iterdir() if (p / "test").is_dir())
    pending = []
    for category in categories:
        for defect in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
            for image in _images_under(root, defect):
                pending.append(_mvtec_item(root, category, defect.name, image))
    if not pending:
        raise InputError(f"{root}: no images in <category>/test/<defect>/ (expected an MVTec-AD layout)")
    return pending


def _mvtec_item(root: Path, category: Path, defect: str, image: Path) -> _Pending:
    rel = image.relative_to(root).as_posix()
    if defect == "good":
        mask: Callable[[tuple[int, int]], np.ndarray] = _empty_mask
    else:
        mask_path = category / "ground_truth" / defect / f"{image.stem}_mask.png"
        if not mask_path.is_file():
            raise InputError(f"{image}: its ground truth {mask_path} is missing (every defect image needs one)")
        mask = _mask_file(root, mask_path, image)
    cls_name = f"{category.name} {defect}".replace("_", " ")
    return _Pending(image, rel, _mask_rel(rel), mask, MVTEC_TASK, cls_name)


def import_folder(src: str | os.PathLike[str], out: str | os.PathLike[str], cls_name: str, *,
                  level: str | None = None, images: str = "images", masks: str = "masks", mask_suffix: str = "",
                  name: str | None = None, split: SplitRule = SplitRule()) -> ImportSummary:  # fmt: skip
    """Import image/mask folder pairs of one class (Kvasir-SEG style), paired by relative path:
    ``images/a/b.jpg`` goes with ``masks/a/b<mask_suffix>.<any image extension>``.

    Raises:
        InputError: an empty class name, a level other than CI/CD, a missing folder, an image without
            a mask (or with several), a mask without an image, unreadable files, sizes that differ.
    """
    if not cls_name.strip():
        raise InputError("--class: expected a class name, got an empty string")
    task, problem = folder_task(cls_name.strip(), level)
    scan = partial(_folder_items, src, cls_name.strip(), task, problem, images, masks, mask_suffix)
    return _write(out, scan, name or Path(src).resolve().name, split)


def _folder_items(src: str | os.PathLike[str], cls_name: str, task: str, problem: str | None, images: str, masks: str,
                  mask_suffix: str) -> list[_Pending]:  # fmt: skip
    root = _source_dir(src)
    image_dir, mask_dir = (contained(root, sub, f"--{opt}", InputError) for opt, sub in (("images", images), ("masks", masks)))
    for opt, folder in (("images", image_dir), ("masks", mask_dir)):
        if not folder.is_dir():
            raise InputError(f"--{opt} {folder}: not a directory")
    by_key: dict[str, list[Path]] = {}
    for mask in _images_under(root, mask_dir):
        key = mask.relative_to(mask_dir).with_suffix("").as_posix()
        if mask_suffix and not key.endswith(mask_suffix):
            continue
        by_key.setdefault(key[: len(key) - len(mask_suffix)], []).append(mask)
    pending = []
    for image in _images_under(root, image_dir):
        key = image.relative_to(image_dir).with_suffix("").as_posix()
        found = by_key.pop(key, [])
        if len(found) != 1:
            what = "no mask" if not found else f"{len(found)} masks ({', '.join(map(str, found))})"
            raise InputError(f"{image}: {what} at {mask_dir / key}{mask_suffix}.<png|jpg|...>; expected exactly one")
        pending.append(_Pending(image, f"{key}{image.suffix}", f"{key}.png", _mask_file(root, found[0], image), task,
                                cls_name, problem))
    if by_key:
        orphans = sorted(p for paths in by_key.values() for p in paths)
        raise InputError(f"{orphans[0]}: a mask without an image in {image_dir} ({len(orphans)} such masks)")
    if not pending:
        raise InputError(f"{image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return pending


def folder_task(cls_name: str, level: str | None) -> tuple[str, str | None]:
    """``(task_name, problem)`` for a folder import: the class name as task when it implies the
    requested level (or no level is requested), else the level's generic task with the class name
    as the query (``problem``), since the layout reads the level back from the task name."""
    if level is not None and level not in GENERIC_TASKS:
        raise InputError(f"--level: expected one of {tuple(GENERIC_TASKS)} for single-image items, got {level!r}")
    if level is None or task_info(cls_name)[0] == level:
        return cls_name, None
    return GENERIC_TASKS[level], cls_name


def import_coco(annotations: str | os.PathLike[str], out: str | os.PathLike[str], *, images: str | os.PathLike[str] | None = None,
                name: str | None = None, split: SplitRule = SplitRule()) -> ImportSummary:  # fmt: skip
    """Import COCO instance annotations: one CI item per (image, category) with the union mask of the
    category's instances. Images without annotations are left out. ``images`` is the folder the
    ``file_name`` entries are relative to (default: the annotation file's folder).

    Raises:
        InputError: unreadable JSON, a malformed or dangling entry (named by its list and index), a
            ``file_name`` leaving the image folder, a missing image, or one whose size differs from
            its ``width``/``height``.
        DependencyError: compressed RLE without pycocotools installed.
    """
    path = Path(annotations)
    return _write(out, partial(_coco_items, path, images), name or path.stem, split)


def _coco_items(path: Path, images: str | os.PathLike[str] | None) -> list[_Pending]:
    data = read_json_object(path, "annotation file not found", "expected an object with images, annotations and categories")
    root = _source_dir(images if images is not None else path.parent)
    entries = {key: _coco_list(data, key, path) for key in ("images", "annotations", "categories")}
    categories = {_field(c, "id", int, f"{path}: categories[{i}]"): _field(c, "name", str, f"{path}: categories[{i}]")
                  for i, c in enumerate(entries["categories"])}  # fmt: skip
    image_info = {}
    for i, entry in enumerate(entries["images"]):
        where = f"{path}: images[{i}]"
        file_name = _field(entry, "file_name", str, where)
        size = (_field(entry, "height", int, where), _field(entry, "width", int, where))
        image_info[_field(entry, "id", int, where)] = (contained(root, file_name, f"{where}.file_name", InputError), file_name, size)
    groups: dict[tuple[int, int], list[tuple[str, Any]]] = {}
    for i, ann in enumerate(entries["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, category_id = _field(ann, "image_id", int, where), _field(ann, "category_id", int, where)
        if image_id not in image_info:
            raise InputError(f"{where}.image_id: {image_id} is not in images")
        if category_id not in categories:
            raise InputError(f"{where}.category_id: {category_id} is not in categories")
        if "segmentation" not in ann:
            raise InputError(f"{where}.segmentation: missing")
        groups.setdefault((image_id, category_id), []).append((where, ann["segmentation"]))
    pending = []
    for (image_id, category_id), segs in sorted(groups.items()):
        image, rel, size = image_info[image_id]
        stem = PurePosixPath(rel).with_suffix("").as_posix()
        mask = _coco_mask(image, size, segs)
        pending.append(_Pending(image, rel, f"{stem}.{category_id}.png", mask, COCO_TASK, categories[category_id]))
    if not pending:
        raise InputError(f"{path}: no annotations, nothing to import")
    return pending


# --------------------------------------------------------------------------- COCO geometry


def _coco_mask(image: Path, size: tuple[int, int], segs: list[tuple[str, Any]]) -> Callable[[tuple[int, int]], np.ndarray]:
    def mask(actual: tuple[int, int]) -> np.ndarray:
        if actual != size:
            raise InputError(f"{image}: is {actual[1]}x{actual[0]} px but the annotations say {size[1]}x{size[0]}")
        out = np.zeros(size, dtype=bool)
        for where, seg in segs:
            out |= coco_segmentation_mask(seg, size, f"{where}.segmentation")
        return out

    return mask


def coco_segmentation_mask(seg: Any, size: tuple[int, int], where: str) -> np.ndarray:
    """(H, W) bool mask of one COCO ``segmentation``: a list of polygons ``[x1, y1, x2, y2, ...]`` in
    pixel-edge coordinates, or RLE ``{"size": [h, w], "counts": ...}`` (column-major runs from 0)."""
    if isinstance(seg, list):
        out = np.zeros(size, dtype=bool)
        for j, poly in enumerate(seg):
            ok = isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in poly)  # fmt: skip
            if not ok:
                raise InputError(f"{where}[{j}]: expected a polygon [x1, y1, x2, y2, ...] of >= 3 points, got {poly!r}")
            out |= polygon_mask(np.asarray(poly, dtype=np.float64).reshape(-1, 2), size)
        return out
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise InputError(f"{where}: expected a list of polygons or an RLE object with size and counts")
    if list(seg["size"]) != list(size):
        raise InputError(f"{where}.size: {seg['size']} but the image is [{size[0]}, {size[1]}] (height, width)")
    counts = seg["counts"]
    if isinstance(counts, (str, bytes)):
        return _compressed_rle(seg, where)
    if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise InputError(f"{where}.counts: expected a list of non-negative run lengths")
    if sum(counts) != size[0] * size[1]:
        raise InputError(f"{where}.counts: runs sum to {sum(counts)}, expected height x width = {size[0] * size[1]}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape(size[1], size[0]).T.copy()


def _compressed_rle(seg: dict[str, Any], where: str) -> np.ndarray:
    try:
        from pycocotools import mask as coco_mask
    except ImportError as exc:
        raise DependencyError(f"{where}: compressed RLE needs pycocotools: pip install pycocotools") from exc
    counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
    return coco_mask.decode({"size": list(seg["size"]), "counts": counts}).astype(bool)


def polygon_mask(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies inside the polygon (even-odd rule).

    ``points`` is (N, 2) XY in pixel-edge coordinates (COCO's: pixel (0, 0) spans [0, 1)²), so an
    axis-aligned rectangle covers exactly its area in pixels. PIL's ``ImageDraw.polygon`` also fills
    the pixels its outline touches (a 4x3 rectangle fills 5x4), hence the centre test here.
    """
    height, width = size
    out = np.zeros(size, dtype=bool)
    x0, y0 = max(int(np.floor(points[:, 0].min())), 0), max(int(np.floor(points[:, 1].min())), 0)
    x1, y1 = min(int(np.ceil(points[:, 0].max())), width), min(int(np.ceil(points[:, 1].max())), height)
    if x1 <= x0 or y1 <= y0:
        return out
    cy, cx = np.mgrid[y0:y1, x0:x1] + 0.5
    inside = np.zeros(cx.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(points, np.roll(points, -1, axis=0)):
        if ay == by:
            continue
        crosses = (ay > cy) != (by > cy)
        inside ^= crosses & (cx < ax + (cy - ay) * (bx - ax) / (by - ay))
    out[y0:y1, x0:x1] = inside
    return out


# --------------------------------------------------------------------------- shared reading and writing


def _write(out: str | os.PathLike[str], scan: Callable[[], Iterable[_Pending]], dataset_name: str,
           split: SplitRule) -> ImportSummary:  # fmt: skip
    """Copy images, write masks and ``all_meta.json`` into a staged root swapped in over ``out``.

    ``out`` is checked (``staged_dir``) before ``scan`` reads the source: a bad output path is
    reported before any source file is read, as every command that writes does."""
    splits: dict[str, dict[str, list[MetaItem]]] = {"train": {}, "test": {}}
    counts: dict[tuple[str, str], int] = {}
    written: dict[str, Path] = {}
    with staged_dir(out, META_FILE, "ConceptSeg dataset root") as stage:
        for item in tqdm(scan(), desc="import", unit="item", disable=None):  # disable=None: no bar off a terminal
            mask_rel = f"masks/{item.mask_rel}"
            if mask_rel in written:
                raise InputError(f"{item.image}: its mask {mask_rel} would overwrite the one of {written[mask_rel]}")
            written[mask_rel] = item.image
            size = _image_size(item.image)
            mask = item.mask(size)
            image_rel = f"images/{item.image_rel}"
            if image_rel not in written:
                (stage / image_rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item.image, stage / image_rel)
                written[image_rel] = item.image
            write_bytes(stage / mask_rel, _png(mask))
            box = box_from_mask(mask)
            meta = MetaItem(
                img_path=(image_rel,), mask_path=mask_rel, task_name=item.task_name, cls_name=item.cls_name,
                dataset_name=dataset_name, problem=item.problem,
                ref_box=None if box is None else (box_to_fractions(box, size[1], size[0]),),
            )  # fmt: skip
            name = split.split_of(item.image_rel)
            splits[name].setdefault(item.cls_name, []).append(meta)
            counts[(name, meta.level)] = counts.get((name, meta.level), 0) + 1
        write_meta(stage, splits)
    return ImportSummary(Path(out), counts)


def _source_dir(src: str | os.PathLike[str]) -> Path:
    path = Path(src)
    if not path.is_dir():
        raise InputError(f"{path}: not a directory ({'missing' if not path.exists() else 'a file'})")
    return path.resolve()


def _images_under(root: Path, folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` (recursively, sorted), each checked to stay inside ``root``."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            yield contained(root, path.relative_to(root).as_posix(), str(path), InputError)
        elif path.is_symlink():  # a dangling link, or one to a folder outside: name it rather than skip it
            contained(root, path.relative_to(root).as_posix(), str(path), InputError)


def _mask_rel(image_rel: str) -> str:
    return PurePosixPath(image_rel).with_suffix(".png").as_posix()


def _open(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: {what} not found") from exc
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable {what} ({exc})") from exc
    return image


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image that decodes completely."""
    width, height = _open(path, "image").size
    return height, width


def _mask_file(root: Path, mask_path: Path, image: Path) -> Callable[[tuple[int, int]], np.ndarray]:
    """A mask read from a file (> 127 is foreground, as the layout's reader takes it), size-checked
    against its image."""
    contained(root, mask_path.relative_to(root).as_posix(), str(mask_path), InputError)

    def mask(size: tuple[int, int]) -> np.ndarray:
        array = np.array(_open(mask_path, "mask").convert("L")) > 127
        if array.shape != size:
            raise InputError(f"{mask_path}: mask is {array.shape[1]}x{array.shape[0]} px but {image} is {size[1]}x{size[0]}")
        return array

    return mask


def _empty_mask(size: tuple[int, int]) -> np.ndarray:
    return np.zeros(size, dtype=bool)


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def _coco_list(data: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise InputError(f"{path}: {key}: expected a list, got {type(value).__name__}")
    return value


def _field(entry: Any, key: str, kind: type, where: str) -> Any:
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        raise InputError(f"{where}.{key}: expected {'a non-empty string' if kind is str else 'an integer'}, got {value!r}")
    if kind is int and key in ("height", "width") and value < 1:
        raise InputError(f"{where}.{key}: expected a positive integer, got {value}")
    return value

