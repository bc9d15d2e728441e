"""Qwen2-VL's image processor in numpy + PIL: one image to the policy's flattened patches.

A port of ``Qwen2VLImageProcessorPil`` (resize to multiples of patch x merge within a pixel budget,
rescale, normalise, cut into merge-block-ordered patches), tested for bit equality with it. The
settings come from the bundle's saved processor JSON, so nothing here imports transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import InputError, ManifestError
from conceptseg_edge.preprocess import as_rgb_array

# Qwen2-VL's image processor defaults (transformers' OPENAI_CLIP_MEAN/STD, PIL bicubic).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


@dataclass(frozen=True)
class PolicyImageConfig:
    """Qwen2-VL image processor settings: what the saved ``processor_config.json`` holds.

    ``min_pixels``/``max_pixels`` bound the resized area (the paper uses max 600*600); the resized
    sides are multiples of ``patch_size * merge_size``.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 600 * 600
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal x patch x patch (1176 for Qwen2.5-VL)."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dir(cls, path: str | Path) -> PolicyImageConfig:
        """Read ``processor_config.json`` (ours) or ``preprocessor_config.json`` (a released Qwen's)."""
        path = Path(path)
        for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
            file = path / name
            if not file.is_file():
                continue
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ManifestError(f"{file}: not valid JSON ({exc})") from exc
            if key is not None:
                if key not in data:
                    continue
                data = data[key]
            return cls.from_dict(data, str(file))
        raise ManifestError(f"{path}: no processor_config.json or preprocessor_config.json with image settings")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> PolicyImageConfig:
        size = data.get("size") or {}
        try:
            return cls(
                patch_size=int(data.get("patch_size", 14)),
                temporal_patch_size=int(data.get("temporal_patch_size", 2)),
                merge_size=int(data.get("merge_size", 2)),
                min_pixels=int(size.get("shortest_edge", data.get("min_pixels", 56 * 56))),
                max_pixels=int(size.get("longest_edge", data.get("max_pixels", 28 * 28 * 1280))),
                image_mean=tuple(float(v) for v in data.get("image_mean", CLIP_MEAN)),
                image_std=tuple(float(v) for v in data.get("image_std", CLIP_STD)),
                rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                resample=int(data.get("resample", PIL_BICUBIC)),
            )
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{where}: malformed image processor settings ({exc})") from exc


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of ``factor``, area within [min, max], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image: aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess_policy_image(image: np.ndarray, cfg: PolicyImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """One image → Qwen2-VL's flattened patches, bit-identical to ``Qwen2VLImageProcessorPil``.

    Args:
        image: (H, W, 3) uint8 RGB ((H, W) and RGBA are converted).
        cfg: the processor settings.

    Returns:
        pixel_values: (grid_h * grid_w, 3 * T * P * P) float32, patches in merge-block order, each
            patch (C, T, P, P)-flattened with the frame repeated T times.
        grid_thw: (3,) int64 ``[1, grid_h, grid_w]`` in patches.
    """
    from PIL import Image

    image = as_rgb_array(image)
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w = smart_resize(image.shape[0], image.shape[1], p * m, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(Image.fromarray(image).resize((w, h), resample=cfg.resample))
    # transformers: float64 rescale, cast to float32, then (x - mean) / std in float32.
    x = (resized.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    x = x.transpose(2, 0, 1)  # (C, H, W)
    gh, gw = h // p, w // p
    patches = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    pixel_values = np.ascontiguousarray(patches.reshape(gh * gw, cfg.patch_dim), dtype=np.float32)
    return pixel_values, np.array([1, gh, gw], dtype=np.int64)
