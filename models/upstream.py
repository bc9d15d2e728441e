"""The sam2 package's own ``SAM2ImagePredictor`` as the upstream oracle, runnable without torchvision.

``SAM2ImagePredictor`` is what SAM2 users call; comparing an exported bundle with it (not only with
``SAM2Reference``, which re-derives its arithmetic) checks that nothing was lost in our reading of
it. It needs torchvision for three image transforms, and torchvision cannot be installed beside
the CPU torch pinned here. While ``sam2.utils.transforms`` is first imported, this module lends it
``ToTensor``, ``Resize`` and ``Normalize`` written with torch alone, following torchvision's tensor
code (to-tensor divides uint8 by 255; ``Resize`` on a tensor is bilinear ``F.interpolate`` with
``align_corners=False`` and antialiasing; ``Normalize`` is ``(x - mean) / std``); the stand-in is
taken out of ``sys.modules`` again at once so nothing else sees a fake torchvision. With a real
torchvision installed it is used and the stand-in never is.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _ToTensor:
    """torchvision ``ToTensor`` for (H, W, C) uint8 arrays: (C, H, W) float32 in [0, 1]."""

    def __call__(self, pic: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(pic.transpose(2, 0, 1))).float().div(255.0)


class _Resize(nn.Module):
    """torchvision ``Resize((h, w))`` on a float tensor (antialias=True, its default since 0.17)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return F.interpolate(img[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]


class _Normalize(nn.Module):
    """torchvision ``Normalize(mean, std)`` on a (C, H, W) float tensor."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=img.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=img.dtype).view(-1, 1, 1)
        return (img - mean) / std


@contextmanager
def _lent_torchvision() -> Iterator[None]:
    """Lend ``torchvision.transforms`` for the duration of an import, if torchvision is absent."""
    try:
        import torchvision.transforms  # noqa: F401

        yield
        return
    except ImportError:
        pass
    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor, transforms.Resize, transforms.Normalize = _ToTensor, _Resize, _Normalize
    package.transforms = transforms
    sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})
    try:
        yield
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]


def upstream_predictor(sam: nn.Module):
    """``sam2.sam2_image_predictor.SAM2ImagePredictor`` on ``sam`` (a built SAM2, CPU, eval).

    ``SAM2ImagePredictor`` hard-codes the backbone feature sizes of a 1024 px input; for any other
    ``image_size`` they are set from the model's strides (4, 8, 16), as sam2 users do for other
    resolutions. Its defaults are kept otherwise (mask threshold 0, no hole / sprinkle filling).
    """
    with _lent_torchvision():
        from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(sam)
    s = sam.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor
