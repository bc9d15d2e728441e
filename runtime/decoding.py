"""The policy decoder's feeds and its cached decoding loop, one token per step over the KV cache."""

from __future__ import annotations

from typing import Any

import numpy as np

from conceptseg_edge.runtime.engine import BindableEngine, Engine


def decoder_feeds(embeds: np.ndarray, positions: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """The decoder's non-cache inputs: (1, S, d) embeddings, their (3, S) M-RoPE positions and an
    all-ones mask over the ``total`` positions cached plus fed (batch of one, no padding)."""
    return {
        "inputs_embeds": embeds,
        "position_ids": positions.reshape(3, 1, -1),
        "attention_mask": np.ones((1, total), np.int64),
    }


class CachedDecoder:
    """One sequence's decoding steps over the KV-cache decoder, the cache carried between steps.

    With an ORT engine the cache stays in the ``OrtValue``s the decoder returned (on its device) and
    is bound straight back as the next step's past; other engines (TensorRT, Triton BLS) get numpy
    feeds through ``run``. The first step binds the prefill's numpy cache (no copy on CPU, one upload
    on CUDA). Either way each step reads back only the last position's logits and hidden state.
    """

    def __init__(self, decoder: Engine, past_names: list[str], present_names: list[str], cache: list[np.ndarray]) -> None:
        self._decoder = decoder
        self._pairs = list(zip(past_names, present_names))
        self._binding = decoder.binding() if isinstance(decoder, BindableEngine) else None
        self._cache: dict[str, Any] = dict(zip(past_names, cache))
        if self._binding is not None:
            for name, value in self._cache.items():
                self._binding.bind(name, value)

    def step(self, embeds: np.ndarray, position: int, total: int) -> tuple[np.ndarray, np.ndarray]:
        """Feed one token's (1, 1, d) embedding; return its (V,) logits and (d,) post-norm state."""
        feeds = decoder_feeds(embeds, np.full((3, 1), position, np.int64), total)
        if self._binding is None:
            out = self._decoder.run({**feeds, **self._cache})
            self._cache = {past: out[present] for past, present in self._pairs}
            return out["logits"][0, -1], out["last_hidden_state"][0, -1]
        for name, value in feeds.items():
            self._binding.bind(name, value)
        out = self._binding.run()
        for past, present in self._pairs:
            self._binding.bind(past, out[present])
        # numpy() is a view of the ORT buffer on CPU (a download on CUDA); keep a copy of one row only
        return out["logits"].numpy()[0, -1], np.array(out["last_hidden_state"].numpy()[0, -1])
