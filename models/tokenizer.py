"""A tiny Qwen-style tokenizer trained here, so tests and toy runs need no hub download.

Contract: ``train_tiny_tokenizer()`` returns a ``PreTrainedTokenizerFast`` that behaves like Qwen2.5's
where the pipeline can tell: byte-level BPE behind Qwen2's pre-tokenizer regex (digits split one by
one, so box coordinates tokenise as in Qwen), Qwen's special tokens with ``<|im_end|>`` as EOS and
``<|endoftext|>`` as pad, and Qwen2.5-VL's chat template restricted to text and images. It
round-trips any string exactly: unlike Qwen's it has no NFC normaliser, a difference invisible on
the NFC text the pipeline produces.

Save it with ``save_pretrained(dir)``; ``load_tokenizer(dir)`` reads it back, and reads a real Qwen
tokenizer directory the same way.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from conceptseg_edge.errors import CheckpointError

#: Qwen2.5-VL's special tokens used by an image + text pipeline. ``<|video_pad|>`` is carried only
#: because ``Qwen2_5_VLConfig.video_token_id`` must name a real id.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<|image_pad|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2's pre-tokenizer split (copied from its tokenizer.json): contractions, letter runs with one
#: leading non-letter, single digits, punctuation runs, newlines, whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Qwen2.5-VL-Instruct's chat template without the video branch: a default system turn, each image
#: as ``<|vision_start|><|image_pad|><|vision_end|>`` (the processor expands the pad per patch).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CONCEPTS = (
    "camouflaged object segmentation", "salient object segmentation", "industrial defect segmentation",
    "polyp colon segmentation", "skin melanocytic tumor segmentation", "breast tumor segmentation",
    "shadow", "transparent", "red circle", "blue square", "green triangle", "yellow star", "dog", "cat",
    "bird", "the object that appears in every image", "the object that differs from the others",
)
_THOUGHTS = (
    "The {c} is near the {w} of the image and blends into the background.",
    "Comparing the support images, the {c} shares the same shape and colour.",
    "The marked boxes show the rule: each box covers one {c}.",
    "The region at the {w} matches the concept {c}.",
)
_RULES = (
    "Each support box covers exactly one {c}.",
    "The target is the {c}, which stands out from its surroundings.",
    "Boxes enclose the whole {c} tightly.",
)
_WHERE = ("top left", "top right", "bottom left", "bottom right", "centre", "left edge", "right edge")


def _box(rng: random.Random, size: int = 600) -> str:
    x1, y1 = rng.randrange(0, size - 2), rng.randrange(0, size - 2)
    x2, y2 = rng.randrange(x1 + 1, size), rng.randrange(y1 + 1, size)
    return f"[{x1},{y1},{x2},{y2}]"


def tiny_corpus(num_samples: int = 300, seed: int = 0) -> list[str]:
    """Lines in the policy's output format plus prompts and concept phrases; deterministic per seed."""
    rng = random.Random(seed)
    lines = [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant", *_CONCEPTS]
    for _ in range(num_samples):
        c, w = rng.choice(_CONCEPTS), rng.choice(_WHERE)
        check = f"<check>{_box(rng)}</check> " if rng.random() < 0.5 else ""
        lines.append(
            f"<think>{rng.choice(_THOUGHTS).format(c=c, w=w)}</think> "
            f"<rule>{rng.choice(_RULES).format(c=c)}</rule> {check}"
            f"<bbox>{_box(rng)}</bbox> <answer>{c}</answer>"
        )
        lines.append(
            f"The red boxes {_box(rng)} and {_box(rng)} mark examples of the concept. "
            f"Find the {c} in the target image and output its box."
        )
    return lines


def train_tiny_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (default ``tiny_corpus()``) and wrap it for transformers.

    Special tokens take ids 0..6 in ``SPECIAL_TOKENS`` order.
    ``vocab_size`` is an upper bound: a small corpus may run out of merges first.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus) if corpus is not None else tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory (ours or Qwen's) from local files only; never touches the hub."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: tokenizer directory does not exist")
    try:
        return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load tokenizer: {exc}") from exc
