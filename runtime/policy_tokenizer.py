"""The policy's text side without transformers: the Qwen2.5-VL chat prompt and (de)tokenization.

The tokenizer is read from the bundle's ``tokenizer.json`` with the ``tokenizers`` library and the
chat prompt is built in code (the Qwen2.5-VL-Instruct template restricted to one system turn and
one user turn of images then text; a test compares it with transformers' rendering of the saved
template).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import ManifestError

# Qwen2.5-VL's special tokens and default system turn. They mirror conceptseg_edge.models.tokenizer,
# which cannot be imported here (it imports transformers); test_export_policy checks they agree.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
STOP_TOKENS = (IM_END, END_OF_TEXT)


class PolicyTokenizer:
    """Qwen2.5-VL prompts and (de)tokenization over a ``tokenizers.Tokenizer``; no transformers."""

    def __init__(self, tokenizer: Any, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.image_token_id = self.token_id(IMAGE_PAD)
        self.stop_ids = frozenset(self.token_id(t) for t in STOP_TOKENS)
        self.max_length: int | None = None  # the context limit, from tokenizer_config.json

    @classmethod
    def from_dir(cls, path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> PolicyTokenizer:
        """Read ``tokenizer.json`` from a saved processor or tokenizer directory."""
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise ManifestError(f"{file}: tokenizer file missing")
        try:
            tok = cls(Tokenizer.from_file(str(file)), system_prompt)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise ManifestError(f"{file}: cannot load tokenizer ({exc})") from exc
        config = Path(path) / "tokenizer_config.json"
        if config.is_file():
            limit = json.loads(config.read_text(encoding="utf-8")).get("model_max_length")
            # HF writes a huge sentinel (1e30) when a tokenizer has no limit of its own
            tok.max_length = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1e9 else None
        return tok

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ManifestError(f"tokenizer: special token {token} is missing (not a Qwen2.5-VL tokenizer?)")
        return int(token_id)

    def prompt(self, num_images: int, text: str) -> str:
        """The chat prompt ``PolicyWrapper.build_inputs`` renders: system turn, images, then text."""
        images = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * num_images
        return (
            f"{IM_START}system\n{self.system_prompt}{IM_END}\n"
            f"{IM_START}user\n{images}{text}{IM_END}\n"
            f"{IM_START}assistant\n"
        )

    def encode(self, text: str) -> np.ndarray:
        """(L,) int64 ids, as transformers' fast tokenizer encodes ``text`` (special tokens parsed)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
