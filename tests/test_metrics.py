"""Metrics against hand-worked cases (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conceptseg_edge import metrics
from conceptseg_edge.errors import InputError


def m(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=bool)


# ----------------------------------------------------------------- IoU family, Dice, MAE, BER


def test_iou_hand_case_and_empty_conventions() -> None:
    # pred {0,1}, gt {0,2}: intersection 1, union 3.
    assert metrics.iou(m([[1, 1, 0, 0]]), m([[1, 0, 1, 0]])) == pytest.approx(1 / 3)
    empty = m([[0, 0], [0, 0]])
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.iou(m([[1, 0], [0, 0]]), empty) == 0.0
    assert metrics.iou(empty, m([[1, 0], [0, 0]])) == 0.0


def test_miou_is_mean_of_foreground_and_background_iou() -> None:
    # fg: I=1, U=2 -> 1/2. bg: ~pred={1,2,3}, ~gt={2,3}: I=2, U=3 -> 2/3. Mean 7/12.
    assert metrics.miou(m([[1, 0], [0, 0]]), m([[1, 1], [0, 0]])) == pytest.approx(7 / 12)
    empty = m([[0, 0]])
    assert metrics.miou(empty, empty) == 1.0
    # A full miss still earns background credit: fg 0; bg ~pred={0,1,2}, ~gt={1,2,3}: I=2, U=4.
    assert metrics.miou(m([[0, 0, 0, 1]]), m([[1, 0, 0, 0]])) == pytest.approx(1 / 4)


def test_giou_and_ciou() -> None:
    preds = [m([[1, 1, 0, 0]]), m([[1, 1]])]
    gts = [m([[1, 0, 1, 0]]), m([[1, 1]])]
    # gIoU = mean(1/3, 1) = 2/3; cIoU = (1 + 2) / (3 + 2) = 3/5.
    assert metrics.giou(preds, gts) == pytest.approx(2 / 3)
    assert metrics.ciou(preds, gts) == pytest.approx(3 / 5)
    # An empty pair counts 1 in gIoU and nothing in cIoU.
    preds.append(m([[0, 0]]))
    gts.append(m([[0, 0]]))
    assert metrics.giou(preds, gts) == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert metrics.ciou(preds, gts) == pytest.approx(3 / 5)
    assert metrics.ciou([m([[0]])], [m([[0]])]) == 1.0


def test_giou_ciou_reject_bad_lists() -> None:
    with pytest.raises(InputError, match="preds"):
        metrics.giou([m([[1]])], [])
    with pytest.raises(InputError, match="no masks"):
        metrics.ciou([], [])


def test_dice_with_smoothing() -> None:
    s = 1e-5
    # |P| = 2, |G| = 2, I = 1.
    assert metrics.dice(m([[1, 1, 0, 0]]), m([[1, 0, 1, 0]])) == pytest.approx((2 + s) / (4 + s))
    assert metrics.dice(m([[0, 0]]), m([[0, 0]])) == 1.0
    assert metrics.dice(m([[0, 0]]), m([[1, 1]])) == pytest.approx(s / (2 + s))


def test_mae_on_a_soft_map() -> None:
    pred = np.array([[0.5, 1.0], [0.0, 0.25]])
    # |0.5-1| + |1-1| + 0 + |0.25-0| = 0.75 over 4 pixels.
    assert metrics.mae(pred, m([[1, 1], [0, 0]])) == pytest.approx(0.1875)
    assert metrics.mae(m([[0, 0]]), m([[0, 0]])) == 0.0


def test_ber_balanced_and_one_class_cases() -> None:
    gt = m([[1, 1, 0, 0, 0, 0]])
    pred = m([[1, 0, 1, 0, 0, 0]])
    # TPR 1/2, TNR 3/4 -> BER = 1 - 5/8.
    assert metrics.ber(pred, gt) == pytest.approx(0.375)
    # Empty ground truth: the false-positive rate (1 of 4).
    assert metrics.ber(m([[1, 0, 0, 0]]), m([[0, 0, 0, 0]])) == pytest.approx(0.25)
    # Full ground truth: the miss rate (3 of 4).
    assert metrics.ber(m([[1, 0, 0, 0]]), m([[1, 1, 1, 1]])) == pytest.approx(0.75)
    assert metrics.ber(gt, gt) == 0.0


def test_binary_metrics_binarise_soft_maps_at_half() -> None:
    soft = np.array([[0.6, 0.4], [0.0, 1.0]])
    assert metrics.iou(soft, m([[1, 0], [0, 1]])) == 1.0


def test_bad_inputs_raise_input_error() -> None:
    with pytest.raises(InputError, match="shape"):
        metrics.iou(m([[1, 0]]), m([[1], [0]]))
    with pytest.raises(InputError, match="2-D"):
        metrics.dice(np.zeros((2, 2, 3), bool), np.zeros((2, 2, 3), bool))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        metrics.mae(np.array([[2.0, 0.0]]), m([[1, 0]]))


# ----------------------------------------------------------------- S-measure


def test_s_measure_trivial_cases() -> None:
    gt = m([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert metrics.s_measure(gt, gt) == pytest.approx(1.0)
    empty = np.zeros((3, 3), bool)
    assert metrics.s_measure(empty, empty) == 1.0  # 1 - mean(pred)
    assert metrics.s_measure(np.ones((3, 3), bool), empty) == 0.0
    full = np.ones((2, 2), bool)
    assert metrics.s_measure(np.array([[1.0, 0.0], [0.5, 0.5]]), full) == pytest.approx(0.5)  # mean(pred)


def test_s_measure_hand_worked_all_zero_prediction() -> None:
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    # Object: fg part scores 0 (x = 0); bg part sees 1 - pred = 1 everywhere -> 1. u = 1/4 -> 0.75.
    # Region: centroid col/row mean 0.5 -> 1-based round(1.5) = 2, so quadrants are 2x2 blocks.
    # Each block is constant in both maps -> the "both constant" rule scores 1 -> region 1.
    assert metrics.s_measure(np.zeros((4, 4)), gt) == pytest.approx(0.5 * 0.75 + 0.5 * 1.0)


def test_s_measure_hand_worked_false_positives() -> None:
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # two false positives in column 2
    # Object: fg values all 1 -> 2/(1+1+0) = 1. bg: 1 - pred over 12 pixels = ten 1s, two 0s:
    #   x = 5/6, sample std = sqrt((10/36 + 50/36) / 11), score = 2x / (x^2 + 1 + std).
    x = 5 / 6
    std = math.sqrt((10 / 36 + 50 / 36) / 11)
    obj = 0.25 * 1.0 + 0.75 * (2 * x / (x * x + 1 + std))
    # Region: centroid (2, 2) 1-based. LT: both all ones -> 1. RT: gt all 0, pred mean 1/2 ->
    #   alpha = 0 but beta > 0 -> 0. LB, RB: all zeros -> 1. Weights 1/4 each -> 3/4.
    region = 0.75
    assert metrics.s_measure(pred, gt) == pytest.approx(0.5 * obj + 0.5 * region, abs=1e-9)
    assert metrics.s_measure(pred, gt) == pytest.approx(0.79995, abs=1e-4)


# ----------------------------------------------------------------- weighted F-measure


def test_weighted_f_perfect_and_empty() -> None:
    gt = np.zeros((9, 9), bool)
    gt[3:6, 2:7] = True
    assert metrics.weighted_f_measure(gt, gt) == pytest.approx(1.0)
    assert metrics.weighted_f_measure(gt, np.zeros_like(gt)) == 0.0  # empty GT scores 0
    assert metrics.weighted_f_measure(np.zeros_like(gt), np.zeros_like(gt)) == 0.0


def test_weighted_f_all_zero_prediction_is_zero() -> None:
    gt = np.zeros((20, 20), bool)
    gt[8:12, 8:12] = True
    # Every pixel inherits error 1 from its nearest fg pixel; far from the border the Gaussian
    # average stays 1, so weighted TP is 0 and the score is 0.
    assert metrics.weighted_f_measure(np.zeros((20, 20)), gt) == pytest.approx(0.0, abs=1e-9)


def test_weighted_f_hand_worked_false_positives() -> None:
    gt = m([[0, 1, 0]])
    pred = np.ones((1, 3))
    # Background pixels are 1 px from the foreground: weight b = 2 - 0.5^(1/5), error 1 each.
    # Their inherited error (from the fg pixel) is 0, so no smoothing applies. TPw = 1, FPw = 2b,
    # recall = 1, precision = 1 / (1 + 2b), F = 2PR / (P + R).
    b = 2 - 0.5**0.2
    p = 1 / (1 + 2 * b)
    assert metrics.weighted_f_measure(pred, gt) == pytest.approx(2 * p / (1 + p), abs=1e-9)


def test_weighted_f_hand_worked_miss_uses_gaussian() -> None:
    gt = m([[1, 1, 1]])
    pred = np.array([[1.0, 1.0, 0.0]])
    # No background. The missed pixel's error 1 is Gaussian-averaged with zero padding: only the
    # kernel's centre tap falls on it, k0^2 with k0 = 1 / sum_{d=-3..3} exp(-d^2 / 50) < 1, so it
    # counts k0^2. TPw = 3 - k0^2, FPw = 0 -> precision 1, recall 1 - k0^2 / 3.
    k0 = 1 / sum(math.exp(-(d * d) / 50) for d in range(-3, 4))
    recall = 1 - k0 * k0 / 3
    assert metrics.weighted_f_measure(pred, gt) == pytest.approx(2 * recall / (recall + 1), abs=1e-9)


def test_gaussian_filter_matches_fspecial_with_zero_padding() -> None:
    k = metrics.gaussian_kernel_1d(7, 5.0)
    raw = np.exp(-((np.arange(7) - 3.0) ** 2) / 50)
    assert np.allclose(k, raw / raw.sum())
    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    assert np.allclose(metrics.gaussian_filter(delta)[1:8, 1:8], np.outer(k, k))
    ones = metrics.gaussian_filter(np.ones((9, 9)))
    assert ones[4, 4] == pytest.approx(1.0)
    assert ones[0, 0] == pytest.approx(k[3:].sum() ** 2)  # zero padding loses the outer taps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distance_transform_is_exact(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((13, 17)) < 0.08
    mask[rng.integers(13), rng.integers(17)] = True
    dist, (iy, ix) = metrics.distance_transform(mask)
    fy, fx = np.nonzero(mask)
    yy, xx = np.mgrid[0:13, 0:17]
    brute = np.sqrt(((yy[..., None] - fy) ** 2 + (xx[..., None] - fx) ** 2).min(axis=-1))
    assert np.allclose(dist, brute)
    assert mask[iy, ix].all()  # each index is a foreground pixel...
    assert np.allclose(np.hypot(yy - iy, xx - ix), dist)  # ...at the reported distance
    assert (dist[mask] == 0).all()


def test_distance_transform_needs_a_foreground_pixel() -> None:
    with pytest.raises(InputError, match="no foreground"):
        metrics.distance_transform(np.zeros((3, 3), bool))


# ----------------------------------------------------------------- summary


def test_score_image_and_mean() -> None:
    gt = np.zeros((16, 16), bool)
    gt[6:10, 6:10] = True  # >= 3 px from the border, so the all-zero prediction scores Fw 0
    perfect = metrics.score_image(gt, gt)
    assert (perfect.iou, perfect.dice, perfect.mae, perfect.ber) == (1.0, pytest.approx(1.0), 0.0, 0.0)
    assert perfect.s_measure == pytest.approx(1.0) and perfect.wf_measure == pytest.approx(1.0)
    empty = metrics.score_image(np.zeros_like(gt), gt)
    assert empty.iou == 0.0 and empty.wf_measure == pytest.approx(0.0, abs=1e-9)
    mean = metrics.ConceptScores.mean([perfect, empty])
    assert mean.iou == 0.5
    assert empty.mae == pytest.approx(16 / 256) and empty.ber == 0.5
    assert set(mean.to_dict()) == {"iou", "miou", "dice", "mae", "ber", "s_measure", "wf_measure"}
    with pytest.raises(InputError):
        metrics.ConceptScores.mean([])


# ----------------------------------------------------------------- video: DAVIS J and F


def _square(shift: int = 0, size: int = 64, side: int = 20) -> np.ndarray:
    out = np.zeros((size, size), dtype=bool)
    out[20 : 20 + side, 10 + shift : 10 + shift + side] = True
    return out


def test_boundary_map_is_davis_seg2bmap() -> None:
    # A pixel is on the boundary when it differs from its right, lower or lower-right neighbour: for a
    # 3x3 square that is its last row and column (5 pixels inside) and the row above and the column
    # left of it, corner included (7 outside); side n gives 4n pixels.
    square = np.zeros((8, 8), dtype=bool)
    square[2:5, 2:5] = True
    expected = np.zeros((8, 8), dtype=bool)
    expected[4, 2:5] = expected[2:5, 4] = True
    expected[1, 1:5] = expected[1:5, 1] = True
    assert np.array_equal(metrics.boundary_map(square), expected)
    assert np.count_nonzero(metrics.boundary_map(_square())) == 80


def test_boundary_f_shifted_square_by_hand() -> None:
    # 64x64: DAVIS's tolerance is ceil(0.008 * 90.5) = 1 pixel (the disc: the 4-neighbourhood).
    # One column off: every boundary pixel has the other's one pixel away, F = 1; J = 380/420.
    assert metrics.boundary_f(_square(1), _square()) == 1.0
    assert metrics.iou(_square(1), _square()) == pytest.approx(380 / 420)
    # Ten columns off (boundaries of 80 pixels each, 20x20 square at rows a.., cols b..):
    # pred pixels within 1 of gt: top row c in [b+9, b+20] (12), bottom row [b+10, b+20] (11), left
    # column rows a, a+18, a+19 (3), right column 0 -> precision 26/80. gt pixels within 1 of pred:
    # top [b+8, b+19] (12), bottom [b+8, b+19] (12: b+8 touches the pred's left column), left 0,
    # right rows a, a+18 (2) -> recall 26/80; F = 2PR/(P+R) = 26/80.
    f = 26 / 80
    assert metrics.boundary_f(_square(10), _square()) == pytest.approx(f)
    assert metrics.iou(_square(10), _square()) == pytest.approx(200 / 600)
    # A tolerance of 10 pixels (bound_th >= 1 is in pixels) matches every pixel.
    assert metrics.boundary_f(_square(10), _square(), bound_th=10) == 1.0


def test_boundary_f_empty_conventions() -> None:
    empty = np.zeros((16, 16), dtype=bool)
    full = np.ones((16, 16), dtype=bool)  # a full mask has no boundary either (only the image edge)
    assert metrics.boundary_f(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0
    assert metrics.boundary_f(empty, _square(size=64)[:16, :16] | True) == 1.0 == metrics.boundary_f(full, full)
    some = np.zeros((16, 16), dtype=bool)
    some[4:8, 4:8] = True
    assert metrics.boundary_f(empty, some) == 0.0 and metrics.boundary_f(some, empty) == 0.0
    with pytest.raises(InputError, match="pred: shape"):
        metrics.boundary_f(empty, np.zeros((8, 8), dtype=bool))


def test_dilate_disk_and_boundary_f_match_davis_reference() -> None:
    # DAVIS dilates with cv2.dilate(b, skimage.morphology.disk(r)); scipy's binary_dilation is that dilation.
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk

    rng = np.random.default_rng(0)
    for radius in (0, 1, 3, 8):
        mask = rng.random((40, 57)) < 0.03
        assert np.array_equal(metrics.dilate_disk(mask, radius), binary_dilation(mask, disk(radius)))
    for _ in range(5):
        h, w = (int(v) for v in rng.integers(48, 160, 2))
        gt = _blobby(rng, h, w)
        pred = gt ^ (rng.random((h, w)) < 0.02) if rng.random() < 0.5 else _blobby(rng, h, w)
        radius = math.ceil(0.008 * math.hypot(h, w))
        bp, bg = metrics.boundary_map(pred), metrics.boundary_map(gt)
        precision = (bp & binary_dilation(bg, disk(radius))).sum() / bp.sum()
        recall = (bg & binary_dilation(bp, disk(radius))).sum() / bg.sum()
        expected = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert metrics.boundary_f(pred, gt) == pytest.approx(expected, abs=1e-12)


def _blobby(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from PIL import Image

    low = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8))
    return np.asarray(low.resize((w, h), Image.BILINEAR)) > 128


def test_jf_sequence_statistics_by_hand() -> None:
    empty = np.zeros((64, 64), dtype=bool)
    preds = [_square(), _square(10), empty, empty]
    gts = [_square(), _square(), empty, _square()]
    scores = metrics.jf_sequence(preds, gts)
    f10 = 26 / 80
    assert scores.j == pytest.approx((1.0, 1 / 3, 1.0, 0.0)) and scores.f == pytest.approx((1.0, f10, 1.0, 0.0))
    assert scores.j_mean == pytest.approx((1 + 1 / 3 + 1) / 4) and scores.j_recall == 0.5
    # Decay bins for 4 frames: edges round(linspace(1, 4, 5)) - 1 = 0, 1, 2, 2, 3 -> first bin
    # frames 0-1, last bin frames 2-3: (1 + 1/3)/2 - (1 + 0)/2 = 1/6.
    assert scores.j_decay == pytest.approx(1 / 6)
    assert scores.f_decay == pytest.approx((1 + f10) / 2 - 0.5)
    assert scores.jf_mean == pytest.approx((scores.j_mean + scores.f_mean) / 2)
    both = metrics.JFScores.mean([scores, metrics.jf_sequence(gts, gts)])
    assert both.j_mean == pytest.approx((scores.j_mean + 1.0) / 2) and both.j == ()
    assert both.to_dict()["jf_mean"] == pytest.approx(both.jf_mean)
    with pytest.raises(InputError, match="preds: 1 masks but gts has 2"):
        metrics.jf_sequence(preds[:1], gts[:2])
