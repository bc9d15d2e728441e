"""ConceptWorld: a seeded generator of concept-segmentation episodes at all three concept levels.

ConceptWorld stands in for the real ConceptSeg data in tests, smoke training and demos. It writes
the same layout (``data.meta``), so every tool runs on both unchanged.

- CI, appearance alone: shape, colour+shape and texture+shape classes ("triangle", "red circle",
  "striped square"), plus rare classes ("star", "cross", "orange ring") that appear seldom.
  Distractors never match the class; the mask covers every matching object.
- CD, relation to the surroundings: saliency (one vivid object in muted clutter), camouflage (a
  blob textured almost like the background), anomaly (a scratch or hole on a regular industrial
  texture), and lesions (a polyp on mucosa, a melanoma on skin). Queries are the canonical ones.
- CR, reasoning across images: difference (two images, one object changed; the mask is the changed
  object in the second) and consistency (three images; the mask is the one object, by shape,
  colour and texture, common to all three, in the last).

Episode ``i`` of seed ``s`` is a pure function of ``(s, i)`` and the image size: each draws from
``numpy.random.default_rng([s, i])`` and nothing else. Tasks cycle with the index, so any ten
consecutive episodes cover all ten tasks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image

from conceptseg_edge.data.meta import Episode, MetaItem, task_info, write_episode, write_meta
from conceptseg_edge.episodes import Support, box_from_mask
from conceptseg_edge.errors import InputError

TASKS = (
    "shape", "colour", "texture",
    "saliency", "camouflage", "anomaly", "polyp", "skin lesion",
    "difference", "consistency",
)  # fmt: skip
PROBLEMS = {
    "difference": "segment the object that differs between the two images",
    "consistency": "segment the object that appears in all three images",
}
CR_CLASSES = {"difference": "changed object", "consistency": "common object"}
CD_CLASSES = {
    "saliency": ("salient object",),
    "camouflage": ("camouflaged object",),
    "anomaly": ("scratch", "hole"),
    "polyp": ("polyp",),
    "skin lesion": ("melanoma",),
}

PALETTE = {
    "red": (214, 40, 40),
    "green": (46, 160, 67),
    "blue": (38, 84, 214),
    "yellow": (235, 200, 30),
    "purple": (128, 60, 170),
    "orange": (240, 130, 20),
}
COMMON_SHAPES = ("circle", "square", "triangle", "hexagon")
RARE_SHAPES = ("star", "cross", "ring")
TEXTURES = ("plain", "striped", "dotted", "checkered")


@dataclass(frozen=True)
class Look:
    """What an object looks like: the attributes CI classes are defined by."""

    shape: str
    colour: str
    texture: str


@dataclass(frozen=True)
class ConceptClass:
    """A CI class: a shape, optionally pinned to a colour or a texture."""

    name: str
    task: str
    shape: str
    colour: str | None = None
    texture: str | None = None

    def matches(self, look: Look) -> bool:
        return (
            look.shape == self.shape
            and self.colour in (None, look.colour)
            and self.texture in (None, look.texture)
        )

    def sample_look(self, rng: np.random.Generator) -> Look:
        return Look(
            self.shape,
            self.colour or _pick(rng, tuple(PALETTE)),
            self.texture or _pick(rng, TEXTURES),
        )


CI_CLASSES = (
    ConceptClass("circle", "shape", "circle"),
    ConceptClass("square", "shape", "square"),
    ConceptClass("triangle", "shape", "triangle"),
    ConceptClass("hexagon", "shape", "hexagon"),
    ConceptClass("red circle", "colour", "circle", colour="red"),
    ConceptClass("blue square", "colour", "square", colour="blue"),
    ConceptClass("green triangle", "colour", "triangle", colour="green"),
    ConceptClass("yellow hexagon", "colour", "hexagon", colour="yellow"),
    ConceptClass("striped square", "texture", "square", texture="striped"),
    ConceptClass("dotted circle", "texture", "circle", texture="dotted"),
    ConceptClass("checkered triangle", "texture", "triangle", texture="checkered"),
    ConceptClass("striped hexagon", "texture", "hexagon", texture="striped"),
    ConceptClass("star", "rare", "star"),
    ConceptClass("cross", "rare", "cross"),
    ConceptClass("orange ring", "rare", "ring", colour="orange"),
)


@dataclass(frozen=True)
class _Obj:
    """A placed object; rendering it is a pure function of these fields."""

    look: Look
    cx: float
    cy: float
    r: float
    angle: float
    tint: tuple[float, float, float]
    period: float
    tex_angle: float


class ConceptWorld:
    """Deterministic episodes: ``ConceptWorld(seed).episode(i)`` is the same on every call.

    Across machines too, up to last-bit differences in numpy's transcendental functions, which can
    move an edge pixel where a shape boundary is exactly on a pixel centre.

    Args:
        seed: world seed.
        image_size: side of the square images, pixels (>= 32).
        n_supports: same-class supports generated for CI/CD episodes.
        rare_rate: share of CI episodes that draw a rare class.
    """

    def __init__(self, seed: int = 0, image_size: int = 256, n_supports: int = 4, rare_rate: float = 0.05) -> None:
        if seed < 0:
            raise InputError(f"seed: must be >= 0, got {seed}")
        if image_size < 32:
            raise InputError(f"image_size: at least 32 pixels, got {image_size}")
        if n_supports < 0:
            raise InputError(f"n_supports: must be >= 0, got {n_supports}")
        if not 0.0 <= rare_rate <= 1.0:
            raise InputError(f"rare_rate: expected [0, 1], got {rare_rate}")
        self.seed = seed
        self.size = image_size
        self.n_supports = n_supports
        self.rare_rate = rare_rate

    def task_of(self, index: int) -> str:
        """The task family of episode ``index`` (CI episodes may still turn out "rare")."""
        return TASKS[index % len(TASKS)]

    def split_of(self, index: int, test_fraction: float) -> str:
        """``"test"`` for about ``test_fraction`` of the indices, from a stream apart from the episode's."""
        return "test" if np.random.default_rng([self.seed, index, 1]).random() < test_fraction else "train"

    def episode(self, index: int, with_supports: bool = True) -> Episode:
        """Episode ``index``. ``with_supports=False`` skips the CI/CD supports (the layout does not
        keep them) and leaves the rest unchanged: supports are drawn after the target."""
        if index < 0:
            raise InputError(f"index: must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        task = self.task_of(index)
        if task in CR_CLASSES:
            return self._cr_episode(rng, task)
        if task in CD_CLASSES:
            cls_name = _pick(rng, CD_CLASSES[task])
            scene = partial(_CD_SCENES[task], size=self.size, cls_name=cls_name)
        else:
            group_name = "rare" if rng.random() < self.rare_rate else task
            group = [c for c in CI_CLASSES if c.task == group_name]
            cls = group[int(rng.integers(len(group)))]
            task, cls_name = cls.task, cls.name
            scene = partial(_ci_scene, size=self.size, cls=cls)
        image, mask = scene(rng)
        supports = tuple(_support(*scene(rng)) for _ in range(self.n_supports if with_supports else 0))
        level, query = task_info(task)
        return Episode(image, mask, query or cls_name, level, task, cls_name, _dataset(task), supports)

    def _cr_episode(self, rng: np.random.Generator, task: str) -> Episode:
        views = _difference(rng, self.size) if task == "difference" else _consistency(rng, self.size)
        supports = tuple(_support(image, mask) for image, mask in views[:-1])
        image, mask = views[-1]
        return Episode(image, mask, PROBLEMS[task], "CR", task, CR_CLASSES[task], _dataset(task), supports)


def make_world(
    out: Path, n: int, seed: int = 0, test_fraction: float = 0.2, image_size: int = 256, *, progress: bool = True
) -> Path:
    """Write ``n`` ConceptWorld episodes under ``out`` in the ConceptSeg layout; return ``out``.

    Files are written atomically one by one and ``all_meta.json`` last. Existing files with the same
    names are replaced; other files under ``out`` are left alone.

    Raises:
        InputError: ``n`` < 1, ``test_fraction`` outside [0, 1), or ``image_size`` < 32.
    """
    from tqdm import tqdm

    if n < 1:
        raise InputError(f"n: at least one episode, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"test_fraction: expected [0, 1), got {test_fraction}")
    out = Path(out)
    world = ConceptWorld(seed, image_size)
    splits: dict[str, dict[str, list[MetaItem]]] = {"train": {}, "test": {}}
    for i in tqdm(range(n), desc="ConceptWorld", unit="episode", disable=not progress):
        episode = world.episode(i, with_supports=False)
        item = write_episode(out, f"{i:06d}", episode)
        splits[world.split_of(i, test_fraction)].setdefault(episode.cls_name, []).append(item)
    write_meta(out, splits)
    return out


def _dataset(task: str) -> str:
    return "conceptworld-" + task.replace(" ", "-")


def _support(image: np.ndarray, mask: np.ndarray) -> Support:
    return Support(image, box_from_mask(mask), mask)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------- drawing primitives


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), float32, read-only and shared."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@lru_cache(maxsize=4)
def _vignette(size: int) -> np.ndarray:
    yy, xx = _grid(size)
    v = 1.0 - 0.45 * (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size * size / 2))
    v.flags.writeable = False
    return v


def _colour_field(base: np.ndarray, field: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``base + scale * field`` as (H, W, 3) float32 from (3,) colours and an (H, W) field.

    One channel at a time: numpy broadcasting over a trailing axis of 3 is ~10x slower.
    """
    out = np.empty(field.shape + (3,), dtype=np.float32)
    for ch in range(3):
        np.multiply(field, np.float32(scale[ch]), out=out[..., ch])
        out[..., ch] += np.float32(base[ch])
    return out


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a cells x cells random field upsampled bilinearly."""
    low = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BILINEAR))


def _upsample_rgb(low: np.ndarray, size: int) -> np.ndarray:
    """A smooth colour field: a small (c, c, 3) field upsampled bilinearly, as float32."""
    image = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(image).astype(np.float32)


def _finish(canvas: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """Add sensor grain, (H, W), and quantise to uint8; ``canvas`` is consumed (modified in place)."""
    for ch in range(3):
        canvas[..., ch] += grain
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8)


def _grain(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    grain = rng.random((size, size), dtype=np.float32)
    grain -= 0.5
    grain *= 2.0 * amount
    return grain


def _local(size: int, cx: float, cy: float, r: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The window around a disc and its pixel offsets (dy, dx) from the centre."""
    win = (
        slice(max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)),
        slice(max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)),
    )
    yy, xx = _grid(size)
    return win, yy[win] - cy, xx[win] - cx


def _full(size: int, win: tuple[slice, slice], local: np.ndarray) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[win] = local
    return mask


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Mask of a shape of radius ``r`` centred at the origin, in its own rotated frame (u, v)."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78 * r
    if shape in ("triangle", "hexagon"):
        n = 3 if shape == "triangle" else 6
        inside = np.ones(u.shape, dtype=bool)
        for k in range(n):
            a = 2.0 * math.pi * k / n + math.pi / 2
            inside &= u * math.cos(a) + v * math.sin(a) <= r * math.cos(math.pi / n)
        return inside
    rho = np.sqrt(u * u + v * v)
    if shape == "star":
        phase = (np.arctan2(v, u) * (5.0 / (2.0 * math.pi))) % 1.0
        return rho <= r * (0.45 + 0.55 * np.abs(2.0 * phase - 1.0))
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    raise AssertionError(f"unknown shape {shape}")


def _sample_obj(rng: np.random.Generator, look: Look, cx: float, cy: float, r: float) -> _Obj:
    jitter = rng.uniform(-18, 18, 3)
    tint = tuple(float(c) for c in np.clip(np.array(PALETTE[look.colour]) + jitter, 0, 255))
    return _Obj(look, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), tint, float(r * rng.uniform(0.3, 0.45)),
                float(rng.uniform(0, math.pi)))  # fmt: skip


def _draw(canvas: np.ndarray, obj: _Obj) -> np.ndarray:
    """Paint ``obj`` onto the float canvas in place; return its full-size mask."""
    win, dy, dx = _local(canvas.shape[0], obj.cx, obj.cy, obj.r)
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    m = _shape_mask(obj.look.shape, c * dx + s * dy, -s * dx + c * dy, obj.r)
    shade = np.ones(m.shape, dtype=np.float32)  # texture as a brightness factor on the tint
    dots = None
    if obj.look.texture != "plain":
        ct, st = math.cos(obj.tex_angle), math.sin(obj.tex_angle)
        tu, tv = (ct * dx + st * dy) / obj.period, (-st * dx + ct * dy) / obj.period
        if obj.look.texture == "striped":
            shade[(tu % 1.0) < 0.5] = 0.4
        elif obj.look.texture == "checkered":
            shade[(np.floor(tu) + np.floor(tv)) % 2 == 1] = 0.4
        else:
            dots = (tu % 1.0 - 0.5) ** 2 + (tv % 1.0 - 0.5) ** 2 < 0.09
    for ch in range(3):
        values = shade * np.float32(obj.tint[ch])
        if dots is not None:
            values[dots] = 245.0
        canvas[win + (ch,)][m] = values[m]
    return _full(canvas.shape[0], win, m)


def _place(
    rng: np.random.Generator, size: int, n: int, radius: tuple[float, float], taken: list[tuple[float, float, float]]
) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-overlapping discs (cx, cy, r) that also avoid ``taken``; appends to ``taken``.

    The first disc on an empty ``taken`` always fits, so a scene's target is always drawn.
    """
    placed = []
    for _ in range(n):
        for _ in range(40):
            r = rng.uniform(*radius) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 3) ** 2 for x, y, q in taken):
                taken.append((cx, cy, r))
                placed.append((cx, cy, r))
                break
    return placed


def _plain_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A pale, softly shaded backdrop for object scenes."""
    cells = 6
    t = np.linspace(-0.5, 0.5, cells, dtype=np.float32)
    slope = rng.uniform(-25, 25, 2)
    low = rng.uniform(190, 245, 3) + (t[None, :] * slope[0] + t[:, None] * slope[1])[..., None]
    low = low + (rng.random((cells, cells, 1)) - 0.5) * 20
    return _upsample_rgb(low, size)


def _random_look(rng: np.random.Generator) -> Look:
    return Look(_pick(rng, COMMON_SHAPES), _pick(rng, tuple(PALETTE)), _pick(rng, TEXTURES))


# --------------------------------------------------------------------------- CI


def _ci_scene(rng: np.random.Generator, size: int, cls: ConceptClass) -> tuple[np.ndarray, np.ndarray]:
    canvas = _plain_background(rng, size)
    taken: list[tuple[float, float, float]] = []
    n_targets = 1 + int(rng.random() < 0.25)
    mask = np.zeros((size, size), dtype=bool)
    for cx, cy, r in _place(rng, size, n_targets, (0.08, 0.14), taken):
        mask |= _draw(canvas, _sample_obj(rng, cls.sample_look(rng), cx, cy, r))
    for cx, cy, r in _place(rng, size, int(rng.integers(2, 5)), (0.07, 0.13), taken):
        look = _random_look(rng)
        while cls.matches(look):
            look = _random_look(rng)
        _draw(canvas, _sample_obj(rng, look, cx, cy, r))
    return _finish(canvas, _grain(rng, size, 4.0)), mask


# --------------------------------------------------------------------------- CD


def _muted_clutter(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey, softly shaded backdrop strewn with muted blobs: the surroundings a salient object stands out of."""
    grey = rng.uniform(100, 170)
    canvas = _upsample_rgb(grey + (rng.random((6, 6, 3)) - 0.5) * 40, size)
    for _ in range(int(rng.integers(10, 20))):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.015, 0.05, 2) * size
        win, dy, dx = _local(size, cx, cy, max(rx, ry))
        blob = (dx / rx) ** 2 + (dy / ry) ** 2 <= 1.0
        canvas[win][blob] = grey + rng.uniform(-30, 30) + rng.uniform(-8, 8, 3)
    return canvas


def _salient_look(rng: np.random.Generator) -> Look:
    return Look(_pick(rng, COMMON_SHAPES), _pick(rng, tuple(PALETTE)), _pick(rng, ("plain", "plain", "striped")))


def _saliency(rng: np.random.Generator, size: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    canvas = _muted_clutter(rng, size)
    [(cx, cy, r)] = _place(rng, size, 1, (0.14, 0.22), [])
    look = _salient_look(rng)
    mask = _draw(canvas, _sample_obj(rng, look, cx, cy, r))
    return _finish(canvas, _grain(rng, size, 5.0)), mask


def _blotches(rng: np.random.Generator, size: int) -> np.ndarray:
    """Blend weights in [0, 1] for a two-colour blotchy pattern, (size, size)."""
    w = 0.6 * _smooth(rng, size, 7) + 0.4 * _smooth(rng, size, 18)
    return np.clip((w - 0.5) * 4.0 + 0.5, 0.0, 1.0)


def _blob(rng: np.random.Generator, size: int, radius: tuple[float, float], max_amp: float) -> np.ndarray:
    """An irregular blob: a disc whose radius is modulated by harmonics 2-4 of random phase."""
    r = rng.uniform(*radius) * size
    cx, cy = rng.uniform(r * 1.4, size - r * 1.4, 2)
    amps, phases = rng.uniform(0, max_amp, 3), rng.uniform(0, 2 * math.pi, 3)
    win, dy, dx = _local(size, cx, cy, r * (1.0 + amps.sum()))
    theta = np.arctan2(dy, dx)
    edge = r * (1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 4), amps, phases)))
    return _full(size, win, dx * dx + dy * dy <= edge * edge)


def _earth_tones(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two distinct earth colours (dark, light), (3,) float32 each: a camouflage scene's palette."""
    earth = np.array([[96, 82, 52], [120, 110, 70], [70, 90, 50], [140, 120, 90]], dtype=np.float32)
    i, j = rng.choice(len(earth), 2, replace=False)
    dark = earth[i] + rng.uniform(-10, 10, 3).astype(np.float32)
    light = earth[j] + rng.uniform(-10, 10, 3).astype(np.float32)
    return dark, light


def _camouflage(rng: np.random.Generator, size: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    dark, light = _earth_tones(rng)
    canvas = _colour_field(dark, _blotches(rng, size), light - dark)
    mask = _blob(rng, size, (0.12, 0.22), 0.15)
    shift = rng.uniform(-12, 12, 3).astype(np.float32)
    w = _blotches(rng, size)[mask][:, None]
    canvas[mask] = (dark + shift + (light - dark) * w) * np.float32(rng.uniform(0.92, 0.98))
    return _finish(canvas, _grain(rng, size, 6.0)), mask


def _anomaly(rng: np.random.Generator, size: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    a = rng.uniform(0, math.pi / 2)
    k = np.float32(2 * math.pi / (rng.uniform(0.03, 0.06) * size))
    ca, sa = np.float32(math.cos(a) * k), np.float32(math.sin(a) * k)
    weave = np.sin(ca * xx + sa * yy) * np.sin(ca * yy - sa * xx)
    metal = (rng.uniform(120, 170) + rng.uniform(-8, 8, 3)).astype(np.float32)
    canvas = _colour_field(metal, weave, np.full(3, 18.0))
    if cls_name == "scratch":
        p0 = rng.uniform(0.15, 0.85, 2) * size
        angle = rng.uniform(0, 2 * math.pi)
        p1 = np.clip(p0 + rng.uniform(0.2, 0.45) * size * np.array([math.cos(angle), math.sin(angle)]), 2, size - 2)
        centre, half = (p0 + p1) / 2, float(np.abs(p1 - p0).max()) / 2 + 3
        win, dy, dx = _local(size, centre[0], centre[1], half)
        seg = p1 - p0
        ox, oy = dx + (centre[0] - p0[0]), dy + (centre[1] - p0[1])  # offsets from p0
        t = np.clip((ox * seg[0] + oy * seg[1]) / float(seg @ seg), 0.0, 1.0)
        local = (ox - t * seg[0]) ** 2 + (oy - t * seg[1]) ** 2 <= rng.uniform(1.0, 2.0) ** 2
        canvas[win][local] += rng.choice([-75.0, 60.0])
    else:  # hole
        cx, cy = rng.uniform(0.15, 0.85, 2) * size
        ra, rb = np.maximum(rng.uniform(0.02, 0.045, 2) * size, 1.5)
        win, dy, dx = _local(size, cx, cy, max(ra, rb))
        rho2 = (dx / ra) ** 2 + (dy / rb) ** 2
        local = rho2 <= 1.0
        canvas[win][local] = rng.uniform(20, 45)
        canvas[win][local & (rho2 >= 0.65)] += 45.0
    return _finish(canvas, _grain(rng, size, 5.0)), _full(size, win, local)


def _polyp(rng: np.random.Generator, size: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    _, xx = _grid(size)
    mucosa = np.array([190, 85, 80]) + rng.uniform(-15, 15, 3)
    canvas = _upsample_rgb(mucosa + (rng.random((8, 8, 1)) - 0.5) * 50 * np.array([1.0, 0.6, 0.5]), size)
    rows = np.arange(size, dtype=np.float32)[:, None] + 0.5
    for _ in range(int(rng.integers(2, 5))):  # vessels: thin sinuous lines
        y0, amp, wave, phase = rng.uniform(0, size), rng.uniform(5, 25), rng.uniform(40, 120), rng.uniform(0, 6.3)
        curve = y0 + amp * np.sin(2 * math.pi * xx[0] / wave + phase)
        canvas[np.abs(rows - curve[None, :]) < 1.2] -= np.array([40, 30, 20], dtype=np.float32)
    mask = _blob(rng, size, (0.09, 0.18), 0.08)
    ys, xs = np.nonzero(mask)
    cy, cx, r = ys.mean() + 0.5, xs.mean() + 0.5, math.sqrt(len(ys) / math.pi)
    dome = 1.15 - 0.35 * ((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2) / (r * r)
    colour = np.array([225, 130, 120]) + rng.uniform(-12, 12, 3)
    canvas[ys, xs] = (dome[:, None] * colour).astype(np.float32)
    for ch in range(3):
        canvas[..., ch] *= _vignette(size)
    return _finish(canvas, _grain(rng, size, 4.0)), mask


def _skin(rng: np.random.Generator, size: int, cls_name: str) -> tuple[np.ndarray, np.ndarray]:
    tone = np.array([220, 175, 145]) + rng.uniform(-20, 15, 3)
    canvas = _upsample_rgb(tone + (rng.random((10, 10, 1)) - 0.5) * 18, size)
    mask = _blob(rng, size, (0.1, 0.2), 0.2)
    mottle = 0.7 + 0.5 * _smooth(rng, size, 16)[mask]
    colour = np.array([105, 62, 42]) + rng.uniform(-20, 20, 3)
    canvas[mask] = (mottle[:, None] * colour).astype(np.float32)
    return _finish(canvas, _grain(rng, size, 5.0)), mask


_CD_SCENES = {
    "saliency": _saliency,
    "camouflage": _camouflage,
    "anomaly": _anomaly,
    "polyp": _polyp,
    "skin lesion": _skin,
}


# --------------------------------------------------------------------------- CR


def _render(background: np.ndarray, grain: np.ndarray, objs: list[_Obj]) -> tuple[np.ndarray, list[np.ndarray]]:
    canvas = background.copy()
    masks = [_draw(canvas, obj) for obj in objs]
    return _finish(canvas, grain), masks


def _difference(rng: np.random.Generator, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two views of one scene; in the second one object has another shape or colour."""
    background, grain = _plain_background(rng, size), _grain(rng, size, 4)
    discs = _place(rng, size, int(rng.integers(3, 6)), (0.07, 0.13), [])
    objs = [_sample_obj(rng, _random_look(rng), cx, cy, r) for cx, cy, r in discs]
    k = int(rng.integers(len(objs)))
    old = objs[k].look
    new = old
    while new == old:
        if rng.random() < 0.5:
            new = Look(_pick(rng, COMMON_SHAPES), old.colour, old.texture)
        else:
            new = Look(old.shape, _pick(rng, tuple(PALETTE)), old.texture)
    before, masks_before = _render(background, grain, objs)
    changed = list(objs)
    changed[k] = _sample_obj(rng, new, objs[k].cx, objs[k].cy, objs[k].r)
    after, masks_after = _render(background, grain, changed)
    return [(before, masks_before[k]), (after, masks_after[k])]


def _consistency(rng: np.random.Generator, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three scenes sharing exactly one look; every other look appears once in the episode."""
    common = _random_look(rng)
    used = {common}
    views = []
    for _ in range(3):
        background, grain = _plain_background(rng, size), _grain(rng, size, 4)
        taken: list[tuple[float, float, float]] = []
        [(cx, cy, r)] = _place(rng, size, 1, (0.08, 0.13), taken)
        objs = [_sample_obj(rng, common, cx, cy, r)]
        for cx, cy, r in _place(rng, size, int(rng.integers(2, 4)), (0.07, 0.12), taken):
            look = _random_look(rng)
            while look in used:
                look = _random_look(rng)
            used.add(look)
            objs.append(_sample_obj(rng, look, cx, cy, r))
        image, masks = _render(background, grain, objs)
        views.append((image, masks[0]))
    return views
