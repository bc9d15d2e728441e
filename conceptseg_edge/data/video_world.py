"""ConceptWorld in motion: seeded video clips with ground truth per object and per frame.

A clip is one of eight kinds, cycling with the index:

- CI, a concept class ("red circle", "striped square") tracked through motion:
  ``move`` (every object drifts and bounces off the borders), ``occlusion`` (a larger object of
  another concept passes in front of the target and hides it completely for a few frames),
  ``reenter`` (the target leaves the frame, stays out for at least ``MIN_ABSENT`` frames, and comes
  back in through the same border), ``distractor`` (objects one attribute away from the concept:
  a red square beside the red circle, a blue circle);
- CD, a concept defined by the surroundings: ``saliency`` (one vivid object moving over muted
  clutter), ``camouflage`` (a blob textured like the ground sliding across it) and ``salient
  reenter`` (the salient object leaves and comes back as in ``reenter``: the concept a small
  concept model finds most reliably, so a re-fire's success measures the tracker, not the model);
- CR, a concept defined by reasoning over time: ``colour change`` (the object that changes colour;
  the query's ground truth is empty until the frame the change happens, ``query_from``).

Masks are what is visible: an object drawn later covers the ones below it, a covered or off-frame
object has an empty mask, so the masks of one frame never overlap (they fit one indexed PNG, the
DAVIS annotation format).

Clip ``i`` of seed ``s`` is a pure function of ``(s, i)``, the frame size and the length: the scene
and the motion draw from ``numpy.random.default_rng([s, i])``, frame ``t``'s sensor grain from
``default_rng([s, i, 1, t])``, and nothing else. Drawing reuses ConceptWorld's primitives
(``data.world``), so a frame looks like a ConceptWorld image of the same level.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from conceptseg_edge.data.meta import task_info
from conceptseg_edge.data.world import (
    CI_CLASSES,
    COMMON_SHAPES,
    PALETTE,
    TEXTURES,
    ConceptClass,
    Look,
    _blob,
    _blotches,
    _colour_field,
    _draw,
    _earth_tones,
    _finish,
    _grain,
    _muted_clutter,
    _pick,
    _place,
    _plain_background,
    _random_look,
    _salient_look,
    _sample_obj,
    _Obj,
)
from conceptseg_edge.errors import InputError

KINDS = ("move", "occlusion", "reenter", "distractor", "saliency", "camouflage", "colour change", "salient reenter")
KIND_LEVELS = {"move": "CI", "occlusion": "CI", "reenter": "CI", "distractor": "CI",
               "saliency": "CD", "camouflage": "CD", "colour change": "CR", "salient reenter": "CD"}  # fmt: skip
COLOUR_CHANGE_QUERY = "segment the object that changes colour"
MIN_LENGTH = 12  # a reenter clip needs frames before, during (MIN_ABSENT) and after the absence
MIN_ABSENT = 6  # frames a reenter target stays fully out of the frame, at least
CLIP_FILE = "clip.json"  # written last: its presence marks a complete clip folder
_CI_TRACKED = tuple(c for c in CI_CLASSES if c.task != "rare")


@dataclass(frozen=True, eq=False)
class VideoClip:
    """A synthetic video with its ground truth.

    Attributes:
        frames: T frames, (H, W, 3) uint8 each.
        masks: object id (1, 2, ...) → (T, H, W) bool, the object's visible pixels per frame. Ids
            follow the drawing order: a higher id is drawn over a lower one.
        targets: the ids the query names.
        query: the concept query (a class name, a CD task's canonical query or a CR problem).
        level: "CI", "CD" or "CR".
        kind: one of ``KINDS``.
        cls_name: the class the targets belong to ("red circle", "salient object", "changed object").
        names: object id → what it is ("red striped circle"), for people reading results.
        query_from: first frame where the query applies (the colour change; 0 for every other kind).
    """

    frames: list[np.ndarray]
    masks: dict[int, np.ndarray]
    targets: tuple[int, ...]
    query: str
    level: str
    kind: str
    cls_name: str
    names: dict[int, str] = field(default_factory=dict)
    query_from: int = 0

    def __post_init__(self) -> None:
        if not self.frames:
            raise InputError("frames: a clip needs at least one frame")
        shape = self.frames[0].shape
        if len(shape) != 3 or shape[2] != 3 or any(f.shape != shape or f.dtype != np.uint8 for f in self.frames):
            raise InputError(f"frames: expected (H, W, 3) uint8 frames of one size, the first is {shape}")
        for obj_id, m in self.masks.items():
            if m.shape != (len(self.frames), *shape[:2]) or m.dtype != bool:
                raise InputError(f"masks[{obj_id}]: expected bool {(len(self.frames), *shape[:2])}, got {m.dtype} {m.shape}")
        if unknown := set(self.targets) - set(self.masks):
            raise InputError(f"targets: ids {sorted(unknown)} have no masks (objects {sorted(self.masks)})")

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every frame."""
        return self.frames[0].shape[:2]

    def target_masks(self) -> np.ndarray:
        """(T, H, W) bool: what the query should segment in each frame (empty before ``query_from``)."""
        out = np.zeros((len(self), *self.size), dtype=bool)
        for obj_id in self.targets:
            out |= self.masks[obj_id]
        out[: self.query_from] = False
        return out

    def label_map(self, t: int) -> np.ndarray:
        """(H, W) uint8 of frame ``t``: 0 background, else the id of the object seen there."""
        out = np.zeros(self.size, dtype=np.uint8)
        for obj_id, m in self.masks.items():
            out[m[t]] = obj_id
        return out


class VideoWorld:
    """Deterministic clips: ``VideoWorld(seed).clip(i)`` is the same on every call.

    Args:
        seed: world seed.
        image_size: side of the square frames, pixels (>= 32).
        length: frames per clip (>= ``MIN_LENGTH``).
    """

    def __init__(self, seed: int = 0, image_size: int = 256, length: int = 30) -> None:
        if seed < 0:
            raise InputError(f"seed: must be >= 0, got {seed}")
        if image_size < 32:
            raise InputError(f"image_size: at least 32 pixels, got {image_size}")
        if length < MIN_LENGTH:
            raise InputError(f"length: at least {MIN_LENGTH} frames, got {length}")
        self.seed = seed
        self.size = image_size
        self.length = length

    def kind_of(self, index: int) -> str:
        return KINDS[index % len(KINDS)]

    def index_of(self, kind: str, n: int = 0) -> int:
        """The index of the ``n``-th clip of ``kind``."""
        if kind not in KINDS:
            raise InputError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if n < 0:
            raise InputError(f"n: must be >= 0, got {n}")
        return KINDS.index(kind) + n * len(KINDS)

    def clip(self, index: int) -> VideoClip:
        if index < 0:
            raise InputError(f"index: must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        kind = self.kind_of(index)
        grains = [np.random.default_rng([self.seed, index, 1, t]) for t in range(self.length)]
        if kind == "camouflage":
            return _camouflage_clip(rng, grains, self.size, self.length)
        scene = _SCENES[kind](rng, self.size, self.length)
        frames, masks = _render(scene.background, scene.movers, grains, scene.grain)
        names = {i + 1: m.name for i, m in enumerate(scene.movers)}
        return VideoClip(frames, masks, scene.targets, scene.query, KIND_LEVELS[kind], kind, scene.cls_name,
                         names, scene.query_from)  # fmt: skip


# --------------------------------------------------------------------------- motion


@dataclass(frozen=True)
class _Mover:
    """An object and where it is in every frame.

    ``centres``: (T, 2) float x, y; the object turns by ``spin`` radians a frame; from frame
    ``change_at`` on it is drawn as ``changed`` (another look and tint, same place and size).
    """

    obj: _Obj
    centres: np.ndarray
    spin: float
    changed: _Obj | None = None
    change_at: int = 0

    @property
    def name(self) -> str:
        def words(look: Look) -> str:
            return " ".join(a for a in (look.colour, look.texture if look.texture != "plain" else "", look.shape) if a)

        if self.changed is None:
            return words(self.obj.look)
        return f"{words(self.obj.look)}, {words(self.changed.look)} from frame {self.change_at}"

    def at(self, t: int) -> _Obj:
        """The object as drawn in frame ``t`` (maybe outside the frame: ``_render`` skips it then)."""
        base = self.changed if self.changed is not None and t >= self.change_at else self.obj
        cx, cy = (float(v) for v in self.centres[t])
        return replace(base, cx=cx, cy=cy, r=self.obj.r, angle=self.obj.angle + self.spin * t)


@dataclass(frozen=True)
class _Scene:
    background: np.ndarray
    movers: list[_Mover]
    targets: tuple[int, ...]
    query: str
    cls_name: str
    grain: float = 4.0
    query_from: int = 0


def _bounce(start: np.ndarray, velocity: np.ndarray, lo: float, hi: float, length: int) -> np.ndarray:
    """(T, 2) positions moving at ``velocity`` a frame from ``start``, reflected off the walls ``lo``/``hi``."""
    span = hi - lo
    p = (start - lo + velocity * np.arange(length)[:, None]) % (2.0 * span)
    return lo + np.where(p > span, 2.0 * span - p, p)


def _drifting(rng: np.random.Generator, obj: _Obj, size: int, length: int, speed: tuple[float, float]) -> _Mover:
    """``obj`` drifting in a random direction at ``speed`` (fractions of the frame side a frame), bouncing."""
    heading = rng.uniform(0, 2 * math.pi)
    v = rng.uniform(*speed) * size * np.array([math.cos(heading), math.sin(heading)])
    margin = obj.r + 1.0
    centres = _bounce(np.array([obj.cx, obj.cy]), v, margin, size - margin, length)
    return _Mover(obj, centres, float(rng.uniform(-0.05, 0.05)))


def _reach(r: float) -> float:
    """How far from its centre an object of radius ``r`` can paint: ``_draw`` clips to a window of r + 2."""
    return r + 2.0


def _other_look(rng: np.random.Generator, cls: ConceptClass) -> Look:
    look = _random_look(rng)
    while cls.matches(look):
        look = _random_look(rng)
    return look


def _near_look(rng: np.random.Generator, cls: ConceptClass, look: Look) -> Look:
    """A look one attribute away from ``look`` that no longer matches ``cls`` (a red square for "red circle")."""
    options = {"shape": COMMON_SHAPES, "colour": tuple(PALETTE), "texture": TEXTURES}
    while True:
        attr = _pick(rng, tuple(options))
        near = replace(look, **{attr: _pick(rng, options[attr])})
        if not cls.matches(near):
            return near


def _render(
    background: np.ndarray, movers: list[_Mover], grains: list[np.random.Generator], grain: float
) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
    """Draw every frame, movers in list order (later on top); return frames and visible masks by id."""
    size, length = background.shape[0], len(grains)
    masks = {i + 1: np.zeros((length, size, size), dtype=bool) for i in range(len(movers))}
    frames = []
    for t, grain_rng in enumerate(grains):
        canvas = background.copy()
        for i, mover in enumerate(movers):
            obj = mover.at(t)
            if -_reach(obj.r) < obj.cx < size + _reach(obj.r) and -_reach(obj.r) < obj.cy < size + _reach(obj.r):
                drawn = _draw(canvas, obj)
                for below in range(1, i + 1):
                    masks[below][t] &= ~drawn
                masks[i + 1][t] = drawn
        frames.append(_finish(canvas, _grain(grain_rng, size, grain)))
    return frames, masks


# --------------------------------------------------------------------------- CI scenes


def _ci_class(rng: np.random.Generator) -> ConceptClass:
    return _CI_TRACKED[int(rng.integers(len(_CI_TRACKED)))]


def _moving_ci(
    rng: np.random.Generator, size: int, length: int, cls: ConceptClass, n_near: int
) -> tuple[_Mover, list[_Mover]]:
    """The target (a look of ``cls``) and 2-4 distractors, ``n_near`` of them one attribute away."""
    taken: list[tuple[float, float, float]] = []
    [(cx, cy, r)] = _place(rng, size, 1, (0.08, 0.12), taken)
    look = cls.sample_look(rng)
    target = _drifting(rng, _sample_obj(rng, look, cx, cy, r), size, length, (0.008, 0.02))
    others = []
    for k, (cx, cy, r) in enumerate(_place(rng, size, n_near + int(rng.integers(2, 4)), (0.07, 0.11), taken)):
        other = _near_look(rng, cls, look) if k < n_near else _other_look(rng, cls)
        others.append(_drifting(rng, _sample_obj(rng, other, cx, cy, r), size, length, (0.008, 0.02)))
    return target, others


def _ci_scene(movers: list[_Mover], target: _Mover, cls: ConceptClass, background: np.ndarray) -> _Scene:
    return _Scene(background, movers, (movers.index(target) + 1,), cls.name, cls.name)


def _move(rng: np.random.Generator, size: int, length: int) -> _Scene:
    cls = _ci_class(rng)
    background = _plain_background(rng, size)
    target, others = _moving_ci(rng, size, length, cls, n_near=0)
    return _ci_scene([*others, target], target, cls, background)


def _distractor(rng: np.random.Generator, size: int, length: int) -> _Scene:
    cls = _ci_class(rng)
    background = _plain_background(rng, size)
    target, others = _moving_ci(rng, size, length, cls, n_near=2)
    return _ci_scene([*others, target], target, cls, background)


def _occlusion(rng: np.random.Generator, size: int, length: int) -> _Scene:
    """A slow target and a larger object of another concept that crosses over it at ~55% of the clip.

    The occluder's inscribed radius is 1.6x the target's, so the target (which reaches 1.11 r at a
    square's corners) is wholly hidden while the centres are within 0.49 r.
    """
    cls = _ci_class(rng)
    background = _plain_background(rng, size)
    target, others = _moving_ci(rng, size, length, cls, n_near=0)
    # the target moves slowly along a straight line inside the frame, so the occluder's path is one too
    r = target.obj.r
    p0 = np.array([target.obj.cx, target.obj.cy])
    p1 = rng.uniform(r + 2, size - r - 2, 2)
    p1 = p0 + (p1 - p0) * min(1.0, 0.25 * size / max(float(np.linalg.norm(p1 - p0)), 1e-6))
    steps = np.arange(length)[:, None] / (length - 1)
    target = replace(target, centres=p0 + (p1 - p0) * steps)
    shape = "square" if cls.shape == "circle" else "circle"
    inscribed = 1.6 * r
    big_r = inscribed / (0.78 if shape == "square" else 1.0)
    look = Look(shape, _pick(rng, tuple(PALETTE)), _pick(rng, TEXTURES))
    while cls.matches(look):
        look = Look(shape, _pick(rng, tuple(PALETTE)), _pick(rng, TEXTURES))
    t_mid = round(0.55 * (length - 1))
    heading = rng.uniform(0, 2 * math.pi)
    rel_speed = (big_r + 1.2 * r + 2.0) / (0.45 * (length - 1))  # apart at frame 0, on top at t_mid
    u = rel_speed * np.array([math.cos(heading), math.sin(heading)])
    meet = target.centres[t_mid]
    velocity = (p1 - p0) / (length - 1) + u
    centres = meet + velocity * (np.arange(length)[:, None] - t_mid)
    occluder = _Mover(_sample_obj(rng, look, *meet, big_r), centres, float(rng.uniform(-0.03, 0.03)))
    return _ci_scene([*others, target, occluder], target, cls, background)


def _reenter(rng: np.random.Generator, size: int, length: int) -> _Scene:
    cls = _ci_class(rng)
    background = _plain_background(rng, size)
    target, others = _moving_ci(rng, size, length, cls, n_near=0)
    target = replace(target, centres=_away_and_back(rng, size, length, target.obj.r))
    return _ci_scene([*others, target], target, cls, background)


def _away_and_back(rng: np.random.Generator, size: int, length: int, r: float) -> np.ndarray:
    """(T, 2) centres of an object of radius ``r`` that starts wholly inside, runs out through one border,
    stays out for at least ``MIN_ABSENT`` frames and comes back in through the same border.

    Along the exit axis (worked out for the far border, mirrored for the near one) the centre is
    ``size + reach`` at ``t_exit`` (wholly out), out of sight until ``t_back``, then moves back in.
    """
    t_exit = max(3, round(0.25 * length))
    t_back = t_exit + max(MIN_ABSENT, round(0.25 * length))
    out = size + _reach(r)
    x0 = rng.uniform(max(0.35 * size, _reach(r) + 1), size - _reach(r) - 1)
    v_out = (out - x0) / t_exit
    v_in = rng.uniform(0.025, 0.045) * size
    t = np.arange(length, dtype=np.float64)
    along = np.where(t < t_exit, x0 + v_out * t, out + r)  # parked beyond the border while away
    along = np.where(t >= t_back, np.maximum(out - v_in * (t - t_back + 1), 0.35 * size), along)
    drift = rng.uniform(-0.006, 0.006) * size
    across = np.clip(rng.uniform(_reach(r), size - _reach(r)) + drift * t, _reach(r), size - _reach(r))
    axis, far = int(rng.integers(2)), bool(rng.integers(2))
    if not far:
        along = size - along
    return np.stack([along, across] if axis == 0 else [across, along], axis=1)


# --------------------------------------------------------------------------- CD and CR scenes


def _saliency(rng: np.random.Generator, size: int, length: int) -> _Scene:
    background = _muted_clutter(rng, size)
    [(cx, cy, r)] = _place(rng, size, 1, (0.12, 0.18), [])
    mover = _drifting(rng, _sample_obj(rng, _salient_look(rng), cx, cy, r), size, length, (0.01, 0.02))
    query = task_info("saliency")[1] or "salient object"
    return _Scene(background, [mover], (1,), query, "salient object", grain=5.0)


def _salient_reenter(rng: np.random.Generator, size: int, length: int) -> _Scene:
    """The salient object of a ``saliency`` scene leaves the frame and comes back (``_away_and_back``)."""
    scene = _saliency(rng, size, length)
    [mover] = scene.movers
    return replace(scene, movers=[replace(mover, centres=_away_and_back(rng, size, length, mover.obj.r))])


def _colour_change(rng: np.random.Generator, size: int, length: int) -> _Scene:
    """3-5 objects drifting; one takes another colour at a frame in the middle third of the clip."""
    background = _plain_background(rng, size)
    discs = _place(rng, size, int(rng.integers(3, 6)), (0.07, 0.12), [])
    movers = [_drifting(rng, _sample_obj(rng, _random_look(rng), cx, cy, r), size, length, (0.006, 0.015))
              for cx, cy, r in discs]  # fmt: skip
    k = int(rng.integers(len(movers)))
    old = movers[k].obj
    colour = old.look.colour
    while colour == old.look.colour:
        colour = _pick(rng, tuple(PALETTE))
    new = _sample_obj(rng, replace(old.look, colour=colour), old.cx, old.cy, old.r)
    change_at = int(rng.integers(length // 3, 2 * length // 3 + 1))
    movers[k] = replace(movers[k], changed=replace(new, angle=old.angle), change_at=change_at)
    return _Scene(background, movers, (k + 1,), COLOUR_CHANGE_QUERY, "changed object", query_from=change_at)


def _camouflage_clip(rng: np.random.Generator, grains: list[np.random.Generator], size: int, length: int) -> VideoClip:
    """A blob textured like the ground, sliding in a straight line that keeps it inside the frame."""
    dark, light = _earth_tones(rng)
    background = _colour_field(dark, _blotches(rng, size), light - dark)
    blob = _blob(rng, size, (0.1, 0.18), 0.15)
    shift = rng.uniform(-12, 12, 3).astype(np.float32)
    texture = (dark + shift + (light - dark) * _blotches(rng, size)[..., None]) * np.float32(rng.uniform(0.92, 0.98))
    ys, xs = np.nonzero(blob)
    lo = np.array([-xs.min(), -ys.min()], dtype=np.float64)  # shifts that keep the blob in the frame
    hi = np.array([size - 1 - xs.max(), size - 1 - ys.max()], dtype=np.float64)
    end = rng.uniform(np.maximum(lo, -0.3 * size), np.minimum(hi, 0.3 * size))
    frames, masks = [], np.zeros((length, size, size), dtype=bool)
    for t, grain_rng in enumerate(grains):
        dx, dy = (int(round(v)) for v in end * t / (length - 1))
        moved = np.roll(blob, (dy, dx), axis=(0, 1))  # never wraps: the shift keeps the blob inside
        canvas = background.copy()
        canvas[moved] = np.roll(texture, (dy, dx), axis=(0, 1))[moved]
        masks[t] = moved
        frames.append(_finish(canvas, _grain(grain_rng, size, 6.0)))
    query = task_info("camouflage")[1] or "camouflaged object"
    return VideoClip(frames, {1: masks}, (1,), query, "CD", "camouflage", "camouflaged object", {1: "camouflaged object"})


_SCENES = {
    "move": _move,
    "occlusion": _occlusion,
    "reenter": _reenter,
    "distractor": _distractor,
    "saliency": _saliency,
    "colour change": _colour_change,
    "salient reenter": _salient_reenter,
}


# --------------------------------------------------------------------------- on disk


def write_clip(clip: VideoClip, out: str | Path, image_format: str = "jpg") -> Path:
    """Write ``clip`` as a folder: ``frames/00000.jpg`` ... (the layout sam2's video predictor reads, or
    ``.png``), ``masks/00000.png`` (indexed PNG per frame: 0 background, else the object id, as DAVIS
    annotations), and ``clip.json`` (query, level, kind, targets, object names). Return ``out``.

    The folder appears whole or not at all (built beside ``out``, then renamed). JPEG frames are
    lossy (quality 95, no chroma subsampling); the masks are the ground truth of the frames as generated.

    Raises:
        InputError: ``image_format`` is not jpg or png; ``out`` exists and is not a clip folder.
    """
    from conceptseg_edge.fileio import staged_dir

    if image_format not in ("jpg", "png"):
        raise InputError(f"image_format: expected 'jpg' or 'png', got {image_format!r}")
    with staged_dir(out, CLIP_FILE, "video clip folder") as staging:
        (staging / "frames").mkdir()
        (staging / "masks").mkdir()
        palette = _palette()
        for t, frame in enumerate(clip.frames):
            Image.fromarray(frame).save(staging / "frames" / f"{t:05d}.{image_format}", quality=95, subsampling=0)
            labels = Image.frombytes("P", clip.size[::-1], clip.label_map(t).tobytes())
            labels.putpalette(palette)
            labels.save(staging / "masks" / f"{t:05d}.png")
        meta = {
            "query": clip.query, "level": clip.level, "kind": clip.kind, "cls_name": clip.cls_name,
            "targets": list(clip.targets), "query_from": clip.query_from, "n_frames": len(clip),
            "size": list(clip.size), "frame_format": image_format,
            "objects": {str(k): clip.names.get(k, "") for k in sorted(clip.masks)},
        }  # fmt: skip
        (staging / CLIP_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def read_clip(folder: str | Path) -> VideoClip:
    """A clip written by ``write_clip``, frames as stored (JPEG-decoded when written as jpg).

    Raises:
        InputError: no ``clip.json``, unreadable JSON, or frame/mask files missing.
    """
    from conceptseg_edge.fileio import read_json_object
    from conceptseg_edge.preprocess import load_image

    folder = Path(folder)
    meta = read_json_object(folder / CLIP_FILE, "missing: not a clip folder written by write_clip", "expected a JSON object")
    try:
        n, ext, objects = int(meta["n_frames"]), str(meta["frame_format"]), [int(k) for k in meta["objects"]]
        frames = [load_image(folder / "frames" / f"{t:05d}.{ext}") for t in range(n)]
        labels = [_read_labels(folder / "masks" / f"{t:05d}.png") for t in range(n)]
        masks = {k: np.stack([lab == k for lab in labels]) for k in objects}
        return VideoClip(frames, masks, tuple(int(k) for k in meta["targets"]), str(meta["query"]), str(meta["level"]),
                         str(meta["kind"]), str(meta["cls_name"]), {int(k): str(v) for k, v in meta["objects"].items()},
                         int(meta["query_from"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{folder / CLIP_FILE}: malformed clip description ({exc!r})") from exc


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: mask file missing")
    with Image.open(path) as img:
        if img.mode != "P":
            raise InputError(f"{path}: expected an indexed (palette) PNG of object ids, got mode {img.mode}")
        return np.asarray(img)


def _palette() -> list[int]:
    """DAVIS's annotation palette: id k gets the colour from the bits of k (0 black, 1 red, 2 green, ...)."""
    out = []
    for k in range(256):
        rgb = [0, 0, 0]
        c = k
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        out += rgb
    return out
