"""What the mask-training stages feed SAM2 and score it by: image batches and box prompts laid out as
the runtime lays them out, low-res logits upsampled as the runtime upsamples, and the losses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from conceptseg_edge.models.sam2 import PIXEL_MEAN, PIXEL_STD

def sam_input(images: np.ndarray | list[np.ndarray], image_size: int) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, S, S) float, as ``SAM2Reference.preprocess`` (bilinear + antialias)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2).float().div(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def upsample(logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) low-res logits → (B, C, H, W), bilinear, as the runtime upsamples."""
    if tuple(logits.shape[-2:]) == tuple(hw):
        return logits
    return F.interpolate(logits, hw, mode="bilinear", align_corners=False)


def bce_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigmoid BCE (mean over pixels) and Dice loss; logits/target (B, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    prob = torch.sigmoid(logits).flatten(1)
    tgt = target.flatten(1)
    dice = 1 - (2 * (prob * tgt).sum(1) + smooth) / (prob.sum(1) + tgt.sum(1) + smooth)
    return bce, dice


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of boolean masks (B, H, W); 1 where both are empty.

    The batched torch counterpart of ``metrics.iou`` (same rule), for the training steps that score
    masks while they are still tensors, a batch at a time (backbone's candidate pick, train and quick
    held-out IoU; stage 1's per-sample IoU log); reports on numpy masks use ``metrics.iou``.
    """
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def gather_features(feats: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Select per-prompt rows of per-image encoder outputs (gradients flow back to the encoder)."""
    return tuple(f.index_select(0, index) for f in feats)


def empty_mask_prompt(batch: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_input`` zeros and ``has_mask_input`` = 0 for a decoder batch."""
    low = image_size // 4
    return torch.zeros(batch, 1, low, low), torch.zeros(batch)


def box_prompt(boxes_px: np.ndarray, image_hw: tuple[int, int], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4) XYXY boxes in image pixels → padded decoder points (B, 3, 2) and labels (B, 3).

    Box corners (labels 2, 3) then SAM2's (0, 0) padding point (label -1), in the model frame, as
    ``preprocess.encode_prompts`` builds them at inference.
    """
    h, w = image_hw
    scale = np.array([image_size / w, image_size / h, image_size / w, image_size / h], np.float32)
    corners = (np.asarray(boxes_px, np.float32).reshape(-1, 4) * scale).reshape(-1, 2, 2)
    coords = np.concatenate([corners, np.zeros((len(corners), 1, 2), np.float32)], axis=1)
    labels = np.tile(np.array([[2, 3, -1]], np.int32), (len(corners), 1))
    return torch.from_numpy(coords), torch.from_numpy(labels)
