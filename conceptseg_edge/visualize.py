"""Overlays for people to look at: a mask tinted over its image, with the prompts drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptseg_edge.preprocess import Prompts

MASK_COLOR = np.array([30, 144, 255], np.float32)  # dodger blue


def overlay(
    image: np.ndarray, mask: np.ndarray, prompts: Prompts | None = None, alpha: float = 0.5, color: np.ndarray = MASK_COLOR
) -> np.ndarray:
    """(H, W, 3) uint8 image + (H, W) bool mask → (H, W, 3) uint8, mask tinted ``color`` (RGB), outline and prompts drawn."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
    out[edge] = color
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if prompts is not None:
        draw = ImageDraw.Draw(canvas)
        r = max(3, min(image.shape[:2]) // 80)
        if prompts.box is not None:
            draw.rectangle([float(v) for v in prompts.box], outline=(0, 255, 0), width=max(2, r // 2))
        if prompts.points is not None:
            for (x, y), label in zip(prompts.points, prompts.labels):
                color = (0, 220, 0) if label == 1 else (230, 0, 0)
                draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))
    return np.asarray(canvas)


def save_png(path, array: np.ndarray) -> None:
    """Write a uint8 array (or bool mask, as 0/255) as PNG, atomically."""
    import io

    from PIL import Image

    from conceptseg_edge.fileio import write_bytes

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it (training curves, benchmark charts)."""
    import io

    import matplotlib.pyplot as plt

    from conceptseg_edge.fileio import write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)
