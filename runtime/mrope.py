"""Qwen2.5-VL's multimodal rotary positions (M-RoPE), ``get_rope_index`` ported to numpy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from conceptseg_edge.errors import InputError


def mrope_position_ids(
    input_ids: np.ndarray, image_token_id: int, image_grids: Sequence[np.ndarray], merge_size: int
) -> tuple[np.ndarray, int]:
    """Qwen2.5-VL's 3-axis (temporal, height, width) rotary positions: ``get_rope_index`` in numpy.

    Text runs count up on all three axes alike. A run of image tokens (one image) takes
    ``(start + t, start + row, start + col)`` over its merged grid, and the text after it resumes at
    ``start + max(rows, cols)``, i.e. one past the largest position used. Images are still frames
    (grid t = 1), so the video-only temporal spacing does not arise.

    Args:
        input_ids: (P,) int token ids of one sequence, image placeholders already expanded.
        image_token_id: the ``<|image_pad|>`` id.
        image_grids: one (3,) ``[t, h, w]`` patch grid per image, in prompt order.
        merge_size: the vision merger's spatial merge (2).

    Returns:
        positions: (3, P) int64.
        next_position: the position of the token after the sequence (``max + 1``), for decoding.
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    # Runs of equal modality: boundaries where is_image flips.
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(ids)]])
    grids = iter(image_grids)
    chunks: list[np.ndarray] = []
    current = 0
    for start, end in zip(starts, ends):
        if not is_image[start]:
            n = int(end - start)
            chunks.append(np.broadcast_to(np.arange(n, dtype=np.int64) + current, (3, n)))
            current += n
            continue
        try:
            t, gh, gw = (int(v) for v in next(grids))
        except StopIteration:
            raise InputError("input_ids: more image-token runs than image grids") from None
        lh, lw = gh // merge_size, gw // merge_size
        if t * lh * lw != end - start:
            raise InputError(f"input_ids: an image run of {end - start} tokens does not match grid {[t, gh, gw]}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        chunks.append(np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + current)
        current += max(gh, gw) // merge_size
    if next(grids, None) is not None:
        raise InputError("image_grids: more grids than image-token runs in input_ids")
    if not chunks:
        return np.zeros((3, 0), np.int64), 0
    positions = np.concatenate(chunks, axis=1)
    return positions, int(positions.max()) + 1
