"""Segmentation metrics in numpy: ReasonSeg (gIoU, cIoU) and ConceptSeg (mIoU, Dice, MAE, BER, S, Fw).

Inputs are 2-D arrays of one shape. ``gt`` is a mask: bool, or numbers where > 0.5 is foreground.
``pred`` is a bool mask or a float map in [0, 1]. The binary metrics (the IoU family, Dice, BER)
binarise ``pred`` at 0.5; MAE, the S-measure and the weighted F-measure take it as given, as the
saliency reference code does. ConceptSeg scores each image at 600x600 and averages over images;
``score_image`` and ``ConceptScores.mean`` do exactly that. scipy is not a dependency, so the
Gaussian filter and the Euclidean distance transform the weighted F-measure needs live here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from conceptseg_edge.errors import InputError

_EPS = float(np.spacing(1))  # MATLAB's eps, as the S-measure and Fw reference code use


def _check_2d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise InputError(f"{name}: expected a 2-D mask, got shape {a.shape}")
    return a


def _as_mask(a: np.ndarray, name: str) -> np.ndarray:
    a = _check_2d(a, name)
    return a if a.dtype == bool else a > 0.5


def _as_map(a: np.ndarray, name: str) -> np.ndarray:
    a = _check_2d(a, name)
    if a.dtype == bool:
        return a.astype(np.float64)
    out = a.astype(np.float64)
    if out.size and (not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0):
        raise InputError(f"{name}: a float map must lie in [0, 1], got [{out.min()}, {out.max()}]")
    return out


def _pair_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise InputError(f"pred: shape {p.shape} differs from gt shape {g.shape}")
    return p, g


def _pair_map(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_map(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape:
        raise InputError(f"pred: shape {p.shape} differs from gt shape {g.shape}")
    return p, g


# --------------------------------------------------------------------------- IoU family


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU; 1.0 when both masks are empty (nothing to find, nothing found)."""
    p, g = _pair_masks(pred, gt)
    union = np.count_nonzero(p | g)
    return 1.0 if union == 0 else np.count_nonzero(p & g) / union


def miou(pred: np.ndarray, gt: np.ndarray) -> float:
    """ConceptSeg's "mIoU": the mean of foreground and background IoU.

    This is what the paper reports as mIoU; it sits well above the foreground IoU on small objects,
    so report both.
    """
    p, g = _pair_masks(pred, gt)
    return (iou(p, g) + iou(~p, ~g)) / 2.0


def giou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """ReasonSeg gIoU: the mean over images of the foreground IoU (an empty union counts 1)."""
    _check_lists(preds, gts)
    return float(np.mean([iou(p, g) for p, g in zip(preds, gts)]))


def ciou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """ReasonSeg cIoU: total intersection over total union across images; 1.0 if every union is empty."""
    _check_lists(preds, gts)
    inter = union = 0
    for pred, gt in zip(preds, gts):
        p, g = _pair_masks(pred, gt)
        inter += np.count_nonzero(p & g)
        union += np.count_nonzero(p | g)
    return 1.0 if union == 0 else inter / union


def _check_lists(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> None:
    if len(preds) != len(gts):
        raise InputError(f"preds: {len(preds)} masks but gts has {len(gts)}")
    if not preds:
        raise InputError("preds: no masks to score")


def dice(pred: np.ndarray, gt: np.ndarray, smooth: float = 1e-5) -> float:
    """Dice = (2|P∩G| + s) / (|P| + |G| + s); the smoothing makes two empty masks score 1."""
    p, g = _pair_masks(pred, gt)
    inter = np.count_nonzero(p & g)
    return (2.0 * inter + smooth) / (np.count_nonzero(p) + np.count_nonzero(g) + smooth)


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error between the map and the mask."""
    p, g = _pair_map(pred, gt)
    return float(np.abs(p - g).mean())


def ber(pred: np.ndarray, gt: np.ndarray) -> float:
    """Balanced error rate, 1 - (TPR + TNR)/2, as a fraction (shadow papers print it x100).

    A class absent from the ground truth has no rate, so the other class's error rate is the BER:
    with an empty ground truth that is the false-positive rate, with a full one the miss rate.
    """
    p, g = _pair_masks(pred, gt)
    n_pos, n_neg = np.count_nonzero(g), np.count_nonzero(~g)
    rates = []
    if n_pos:
        rates.append(np.count_nonzero(p & g) / n_pos)
    if n_neg:
        rates.append(np.count_nonzero(~p & ~g) / n_neg)
    return 1.0 - float(np.mean(rates)) if rates else 0.0


# --------------------------------------------------------------------------- S-measure


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5) -> float:
    """Structure measure (Fan et al., ICCV 2017): alpha * object-aware + (1 - alpha) * region-aware.

    Follows the authors' MATLAB code, including its conventions: an empty ground truth scores
    1 - mean(pred), a full one mean(pred); the centroid is rounded half up in 1-based pixels; a
    quadrant where both maps are constant scores 1; the result is clipped at 0.
    """
    p, g = _pair_map(pred, gt)
    fg_share = g.mean() if g.size else 0.0
    if fg_share == 0.0:
        return float(1.0 - p.mean()) if p.size else 1.0
    if fg_share == 1.0:
        return float(p.mean())
    score = alpha * _s_object(p, g) + (1.0 - alpha) * _s_region(p, g)
    return max(0.0, float(score))


def _object_score(values: np.ndarray) -> float:
    x = values.mean()
    sigma = values.std(ddof=1) if values.size > 1 else 0.0
    return 2.0 * x / (x * x + 1.0 + sigma + _EPS)


def _s_object(p: np.ndarray, g: np.ndarray) -> float:
    u = g.mean()
    fg = _object_score(p[g])
    bg = _object_score(1.0 - p[~g])
    return u * fg + (1.0 - u) * bg


def _s_region(p: np.ndarray, g: np.ndarray) -> float:
    h, w = g.shape
    ys, xs = np.nonzero(g)
    # 1-based centroid, rounded half up like MATLAB's round on positive numbers.
    cx = int(math.floor(xs.mean() + 1.0 + 0.5))
    cy = int(math.floor(ys.mean() + 1.0 + 0.5))
    area = h * w
    quads = (
        (slice(0, cy), slice(0, cx), cx * cy / area),
        (slice(0, cy), slice(cx, w), (w - cx) * cy / area),
        (slice(cy, h), slice(0, cx), cx * (h - cy) / area),
        (slice(cy, h), slice(cx, w), (w - cx) * (h - cy) / area),
    )
    return sum(weight * _ssim(p[rows, cols], g[rows, cols]) for rows, cols, weight in quads if weight > 0)


def _ssim(p: np.ndarray, g: np.ndarray) -> float:
    g = g.astype(np.float64)
    n = p.size
    x, y = p.mean(), g.mean()
    sigma_x = ((p - x) ** 2).sum() / (n - 1 + _EPS)
    sigma_y = ((g - y) ** 2).sum() / (n - 1 + _EPS)
    sigma_xy = ((p - x) * (g - y)).sum() / (n - 1 + _EPS)
    a = 4.0 * x * y * sigma_xy
    b = (x * x + y * y) * (sigma_x + sigma_y)
    if a != 0.0:
        return a / (b + _EPS)
    return 1.0 if b == 0.0 else 0.0


# --------------------------------------------------------------------------- weighted F-measure


def weighted_f_measure(pred: np.ndarray, gt: np.ndarray, beta: float = 1.0) -> float:
    """Weighted F-measure (Margolin et al., CVPR 2014) with the authors' 7x7, sigma=5 Gaussian.

    Errors on background pixels are attributed to the nearest foreground pixel, smoothed by the
    Gaussian (zero padding, as MATLAB's imfilter), and background errors are weighted up by
    2 - 0.5^(d/5) with d the distance to the foreground. An empty ground truth scores 0.
    """
    p, g = _pair_map(pred, gt)
    if not g.any():
        return 0.0
    dist, (iy, ix) = distance_transform(g)
    err = np.abs(p - g)
    err_t = err[iy, ix]  # every pixel takes the error at its nearest foreground pixel
    err_a = gaussian_filter(err_t, size=7, sigma=5.0)
    min_e = np.where(g & (err_a < err), err_a, err)
    weight = np.where(g, 1.0, 2.0 - np.exp(np.log(0.5) / 5.0 * dist))
    err_w = min_e * weight
    tp_w = g.sum() - err_w[g].sum()
    fp_w = err_w[~g].sum()
    recall = 1.0 - err_w[g].mean()
    precision = tp_w / (tp_w + fp_w + _EPS)
    b2 = beta * beta
    return float((1.0 + b2) * recall * precision / (recall + b2 * precision + _EPS))


def gaussian_kernel_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """The 1-D factor of MATLAB's ``fspecial('gaussian', size, sigma)``; its outer square is that kernel."""
    r = (size - 1) / 2.0
    x = np.arange(size, dtype=np.float64) - r
    k = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_filter(img: np.ndarray, size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """Gaussian filter with zero padding (MATLAB ``imfilter`` default), done as two 1-D passes."""
    k = gaussian_kernel_1d(size, sigma)
    r = size // 2
    h, w = img.shape
    padded = np.pad(img.astype(np.float64), r)
    rows = sum(k[i] * padded[i : i + h, :] for i in range(size))
    return sum(k[i] * rows[:, i : i + w] for i in range(size))


def distance_transform(mask: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Exact Euclidean distance from every pixel to the nearest True pixel, with that pixel's index.

    Like MATLAB ``bwdist(mask)`` (scipy's ``distance_transform_edt(~mask, return_indices=True)``):
    True pixels get distance 0 and their own index. Done as Felzenszwalb & Huttenlocher's two 1-D
    passes, the second vectorised across rows. Ties may pick another, equally near, pixel than
    scipy does.

    Returns:
        ``(dist, (iy, ix))``: float64 distances and int64 row/column indices, each of mask's shape.

    Raises:
        InputError: the mask has no True pixel, so no distance is defined.
    """
    m = _as_mask(mask, "mask")
    if not m.any():
        raise InputError("mask: no foreground pixel to measure distances to")
    h, w = m.shape
    # Pass 1, along columns: the nearest foreground row in the same column.
    rows = np.arange(h)[:, None]
    big = 4 * (h + w)  # farther than any real site
    above = np.maximum.accumulate(np.where(m, rows, -big), axis=0)
    below = np.minimum.accumulate(np.where(m, rows, big)[::-1], axis=0)[::-1]
    near_row = np.where(rows - above <= below - rows, above, below)
    f = ((rows - near_row) ** 2).astype(np.float64)  # squared column distance; huge where the column is empty
    # Pass 2, along rows: lower envelope of parabolas (x - q)^2 + f[q], one envelope per row.
    d2, site = _envelope_rows(f)
    rr = np.arange(h)[:, None].repeat(w, axis=1)
    iy = near_row[rr, site]
    return np.sqrt(d2), (iy.astype(np.int64), site.astype(np.int64))


def _envelope_rows(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row r and column x: min over q of (x - q)^2 + f[r, q], and the arg-min q."""
    h, w = f.shape
    r = np.arange(h)
    qs = np.arange(w, dtype=np.float64)
    v = np.zeros((h, w), dtype=np.int64)  # parabola apexes in the envelope
    z = np.full((h, w + 1), np.inf)  # boundaries between them
    z[:, 0] = -np.inf
    k = np.zeros(h, dtype=np.int64)
    fq_plus = f + qs**2  # f[q] + q^2

    def cross(q: int, vk: np.ndarray) -> np.ndarray:
        return (fq_plus[:, q] - fq_plus[r, vk]) / (2.0 * (q - vk))

    for q in range(1, w):
        s = cross(q, v[r, k])
        pop = s <= z[r, k]
        while pop.any():
            k[pop] -= 1
            s = np.where(pop, cross(q, v[r, k]), s)
            pop &= s <= z[r, k]
        k += 1
        v[r, k] = q
        z[r, k] = s
        z[r, k + 1] = np.inf
    d2 = np.empty((h, w))
    site = np.empty((h, w), dtype=np.int64)
    k[:] = 0
    for x in range(w):
        step = z[r, k + 1] < x
        while step.any():
            k[step] += 1
            step &= z[r, k + 1] < x
        vk = v[r, k]
        site[:, x] = vk
        d2[:, x] = (x - vk) ** 2 + f[r, vk]
    return d2, site


# --------------------------------------------------------------------------- per-image summary


@dataclass(frozen=True)
class ConceptScores:
    """ConceptSeg's per-image scores (higher is better except ``mae`` and ``ber``)."""

    iou: float
    miou: float
    dice: float
    mae: float
    ber: float
    s_measure: float
    wf_measure: float

    @classmethod
    def mean(cls, scores: Sequence[ConceptScores]) -> ConceptScores:
        """Average each score over images, as ConceptSeg reports them."""
        if not scores:
            raise InputError("scores: nothing to average")
        return cls(**{f.name: float(np.mean([getattr(s, f.name) for s in scores])) for f in fields(cls)})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def score_image(pred: np.ndarray, gt: np.ndarray) -> ConceptScores:
    """All ConceptSeg scores for one image; ``pred`` a mask or [0, 1] map, ``gt`` a mask."""
    p, g = _pair_map(pred, gt)
    return ConceptScores(
        iou=iou(p, g),
        miou=miou(p, g),
        dice=dice(p, g),
        mae=mae(p, g),
        ber=ber(p, g),
        s_measure=s_measure(p, g),
        wf_measure=weighted_f_measure(p, g),
    )


# --------------------------------------------------------------------------- video: DAVIS J and F

DAVIS_BOUND_TH = 0.008  # DAVIS's boundary tolerance: a fraction of the image diagonal (pixels if >= 1)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The mask's one-pixel boundary, as DAVIS's ``seg2bmap`` draws it at the mask's own size.

    A pixel is on the boundary when it differs from its right, lower or lower-right neighbour (the
    last row and column compare along the edge only; the last pixel never counts).
    """
    m = _as_mask(mask, "mask")
    e, s, se = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    e[:, :-1] = m[:, 1:]
    s[:-1, :] = m[1:, :]
    se[:-1, :-1] = m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]
    b[:, -1] = m[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = DAVIS_BOUND_TH) -> float:
    """DAVIS's boundary F: the F-measure of boundary precision and recall, a boundary pixel counting
    as matched when the other mask's boundary lies within ``ceil(bound_th * diagonal)`` pixels.

    The tolerance is DAVIS's dilation by ``skimage.morphology.disk(radius)`` (``dilate_disk``). As in
    DAVIS, two empty boundaries score 1 and one empty boundary 0.
    """
    p, g = _pair_masks(pred, gt)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*g.shape))
    bp, bg = boundary_map(p), boundary_map(g)
    n_p, n_g = np.count_nonzero(bp), np.count_nonzero(bg)
    if n_p == 0 or n_g == 0:
        return 1.0 if n_p == n_g else 0.0
    precision = np.count_nonzero(bp & dilate_disk(bg, radius)) / n_p
    recall = np.count_nonzero(bg & dilate_disk(bp, radius)) / n_g
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by the disc ``dy^2 + dx^2 <= radius^2`` (``skimage.morphology.disk``), pixels
    outside the image counting as background.

    Row by row of the disc: a horizontal dilation of half-width ``floor(sqrt(r^2 - dy^2))`` (a
    running sum over the row), shifted by ``dy``. ``distance_transform(mask) <= radius`` gives the
    same pixels but is ~20x slower at 256x256.
    """
    m = _as_mask(mask, "mask")
    h, w = m.shape
    r = int(math.floor(radius))
    # run[:, r + k] = foreground pixels left of column k in the row, k from -r to w + r
    run = np.zeros((h, w + 1 + 2 * r), dtype=np.int32)
    np.cumsum(m, axis=1, out=run[:, r + 1 : r + 1 + w])
    run[:, r + 1 + w :] = run[:, r + w : r + 1 + w]
    rows: dict[int, np.ndarray] = {}
    out = np.zeros_like(m)
    for dy in range(-r, r + 1):
        half = int(math.floor(math.sqrt(max(radius * radius - dy * dy, 0.0))))
        if half not in rows:  # any foreground in columns x - half .. x + half
            rows[half] = run[:, r + half + 1 : r + half + 1 + w] > run[:, r - half : r - half + w]
        wide = rows[half]
        if dy >= 0:
            out[: h - dy] |= wide[dy:]
        else:
            out[-dy:] |= wide[: h + dy]
    return out


@dataclass(frozen=True)
class JFScores:
    """DAVIS's statistics of one object over a sequence, for region J (``iou``: two empty masks
    score 1) and boundary F (``boundary_f``): the mean, the recall (share of frames above 0.5) and
    the decay (mean of the first quarter of the frames minus that of the last).

    ``j`` and ``f`` hold the per-frame values (empty in an average over objects).
    """

    j_mean: float
    j_recall: float
    j_decay: float
    f_mean: float
    f_recall: float
    f_decay: float
    j: tuple[float, ...] = ()
    f: tuple[float, ...] = ()

    @property
    def jf_mean(self) -> float:
        """DAVIS's headline J&F: the mean of J's and F's means."""
        return (self.j_mean + self.f_mean) / 2.0

    @classmethod
    def mean(cls, scores: Sequence[JFScores]) -> JFScores:
        """Average the statistics over objects, as DAVIS's J&F-Mean does (per-frame values dropped)."""
        if not scores:
            raise InputError("scores: nothing to average")
        names = [f.name for f in fields(cls) if f.name not in ("j", "f")]
        return cls(**{n: float(np.mean([getattr(s, n) for s in scores])) for n in names})

    def to_dict(self) -> dict[str, float]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("j", "f")}
        return out | {"jf_mean": self.jf_mean}


def jf_sequence(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], bound_th: float = DAVIS_BOUND_TH) -> JFScores:
    """J and F of one object over a sequence of frames (``preds[t]``, ``gts[t]``: masks of frame t).

    Every frame given counts; DAVIS's semi-supervised protocol leaves out the first frame (its
    annotation is the prompt) and the last, so pass ``preds[1:-1]`` to reproduce its numbers.
    """
    _check_lists(preds, gts)
    j = tuple(float(iou(p, g)) for p, g in zip(preds, gts))
    f = tuple(float(boundary_f(p, g, bound_th)) for p, g in zip(preds, gts))
    (jm, jr, jd), (fm, fr, fd) = _davis_statistics(j), _davis_statistics(f)
    return JFScores(jm, jr, jd, fm, fr, fd, j, f)


def _davis_statistics(values: tuple[float, ...]) -> tuple[float, float, float]:
    """(mean, recall, decay) as DAVIS's ``db_statistics``: the decay compares the first and the last of
    four bins whose edges are ``round(linspace(1, n, 5)) - 1``, each bin including its right edge."""
    v = np.asarray(values, dtype=np.float64)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)
    bins = [v[ids[i] : ids[i + 1] + 1] for i in range(4)]
    return float(v.mean()), float((v > 0.5).mean()), float(bins[0].mean() - bins[3].mean())
