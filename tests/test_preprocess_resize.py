"""The fast numpy preprocessing gives the input SAM2's transforms give, and what the runtime computed before it.

``preprocess_image`` folds the normalisation into the uint8 → float32 conversion and resizes each
channel straight into the output; ``before`` below is the implementation it replaced (commit
263d2b1: a float copy of the image, two gathers in HWC, then normalise and transpose), kept here
as the fixed point the new one must not drift from. The bar is one grey level: 1 / 255 / std in
normalised units.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptseg_edge.preprocess import _resize_taps, as_rgb_array, preprocess_image, resize, upsample_mask

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
ONE_GREY_LEVEL = 1.0 / 255.0 / min(STD)


def before_resize(array: np.ndarray, out_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """``preprocess.resize`` as of commit 263d2b1."""
    out_h, out_w = out_hw
    idx, w = _resize_taps(array.shape[0], out_h, antialias)
    extra = (1,) * (array.ndim - 1)
    rows = sum(w[:, k].reshape(-1, *extra) * array[idx[:, k]] for k in range(idx.shape[1]))
    idx, w = _resize_taps(array.shape[1], out_w, antialias)
    extra = (1,) * (array.ndim - 2)
    return sum(w[:, k].reshape(1, -1, *extra) * rows[:, idx[:, k]] for k in range(idx.shape[1]))


def before(image: np.ndarray, image_size: int) -> np.ndarray:
    """``preprocess.preprocess_image`` as of commit 263d2b1."""
    x = before_resize(image.astype(np.float32) / 255.0, (image_size, image_size), antialias=True)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def sam2_transforms(image: np.ndarray, image_size: int) -> np.ndarray:
    """SAM2's own arithmetic: antialiased bilinear resize of [0, 1] floats, then ImageNet mean/std."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.numpy()


def images() -> dict[str, np.ndarray]:
    """Sources of every kind ``as_rgb_array`` takes, at sizes that grow, shrink and keep either side."""
    rng = np.random.default_rng(0)
    return {
        "uint8 480x640": (rng.random((480, 640, 3)) * 255).astype(np.uint8),
        "uint8 tall 700x90": (rng.random((700, 90, 3)) * 255).astype(np.uint8),
        "uint8 1500x1100": (rng.random((1100, 1500, 3)) * 255).astype(np.uint8),
        "uint16 300x200": (rng.random((200, 300, 3)) * 65535).astype(np.uint16),
        "float 64x64 gray": rng.random((64, 64)).astype(np.float32),
        "uint8 rgba 33x257": (rng.random((257, 33, 4)) * 255).astype(np.uint8),
        "uint8 2x3": (rng.random((2, 3, 3)) * 255).astype(np.uint8),
    }


@pytest.mark.parametrize("image_size", [256, 1024])
@pytest.mark.parametrize("name", list(images()))
def test_preprocess_equals_the_previous_implementation_and_sam2(name, image_size):
    image = as_rgb_array(images()[name])
    got = preprocess_image(image, image_size, MEAN, STD)
    assert got.shape == (1, 3, image_size, image_size) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.abs(got - before(image, image_size)).max() <= ONE_GREY_LEVEL / 100  # float rounding only
    assert np.abs(got - sam2_transforms(image, image_size)).max() <= ONE_GREY_LEVEL


@pytest.mark.parametrize("image_hw", [(480, 640), (100, 90), (256, 256), (1100, 1500)])
def test_mask_upsampling_equals_the_previous_implementation(image_hw):
    logits = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    old = before_resize(logits, image_hw, antialias=False)
    new = resize(logits, image_hw, antialias=False)
    assert new.shape == image_hw and new.dtype == np.float32
    assert np.abs(new - old).max() < 1e-5
    near_zero = np.abs(old) < 1e-5  # a threshold exactly at float rounding may flip; nowhere else
    assert np.array_equal(upsample_mask(logits, image_hw)[~near_zero], (old > 0)[~near_zero])


def test_resize_of_channels_is_per_plane():
    array = np.random.default_rng(2).random((40, 30, 3)).astype(np.float32)
    out = resize(array, (64, 20), antialias=True)
    assert out.shape == (64, 20, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], resize(np.ascontiguousarray(array[..., c]), (64, 20), antialias=True))
    np.testing.assert_allclose(out, before_resize(array, (64, 20), antialias=True), atol=1e-6)
