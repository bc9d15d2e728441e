"""The Qwen2.5-VL policy: tiny configs for tests, an image-only processor, and a generation wrapper.

Contract:

* ``tiny_policy_config(tokenizer)`` + ``build_policy(cfg)`` give a random-init Qwen2.5-VL that runs
  the real transformers code path in seconds on CPU.
* ``ConceptSegProcessor`` is Qwen2.5-VL's processor without the video half: the stock
  ``Qwen2_5_VLProcessor`` cannot be built without torchvision (its video processor needs it), and
  this package never feeds video. ``load_processor(dir)`` is the one loading door, for our saved
  directories and for a released Qwen2.5-VL directory alike (whose ``processor_class`` names the stock
  class: going through ``AutoProcessor`` would fail there, or silently return a bare tokenizer when
  the class name is unknown).
* ``PolicyWrapper.generate`` returns the completion's text, ids and the hidden states the CTM reads,
  captured while decoding; ``teacher_forced_hidden_states`` recomputes them with one full forward (the
  official code's way, and this module's test oracle).

Which hidden state the CTM sees: the last decoder layer's output *after* the final RMSNorm, i.e.
``hidden_states[-1]`` of a transformers forward, which is what the official code feeds the CTM. Row
i is the state at the position that *produced* completion token i (the last prompt position for
i = 0), so decoding yields all T rows with no extra pass. Should the official code turn out to
slice ``hidden_states[-1][:, prompt_len:]`` (the states *at* the completion positions), its set is
this one shifted by one (without the last prompt position, with the state after the final token),
which one more cached decoding step would give; the method notes do not settle it.

The decode-time rows equal the teacher-forced ones to ~1e-6 in float32 on CPU (measured); in bf16 or
fp16 on GPU, prefill and decode kernels round differently, so expect agreement only to that dtype.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.image_utils import SizeDict
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.models.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
)

ImageLike = Image.Image | np.ndarray

#: The paper resizes policy images to 600x600 and caps them at 360000 pixels.
DEFAULT_MAX_PIXELS = 600 * 600
#: Qwen2-VL's own floor (a 56x56 image = 4 merged vision tokens).
DEFAULT_MIN_PIXELS = 56 * 56


class ConceptSegProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images and text only; needs no torchvision.

    transformers reads a processor's parts from its ``__init__`` signature, so naming only
    ``image_processor`` and ``tokenizer`` here is what drops the video processor. Outputs include
    ``mm_token_type_ids``, which the model needs to build its 3-axis (M-RoPE) positions.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token = None
        self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


# Without this, AutoProcessor on one of our saved directories falls back to the bare tokenizer. The
# stock processor cannot be built here anyway (no torchvision), so overriding its mapping loses nothing.
AutoProcessor.register(Qwen2_5_VLConfig, ConceptSegProcessor, exist_ok=True)


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_pixels: int = DEFAULT_MIN_PIXELS,
) -> ConceptSegProcessor:
    """A processor around ``tokenizer`` with Qwen2-VL's PIL image processor (tests: small max_pixels)."""
    if not 0 < min_pixels <= max_pixels:
        raise InputError(f"max_pixels/min_pixels: need 0 < min <= max, got {min_pixels}, {max_pixels}")
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return ConceptSegProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def load_processor(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> ConceptSegProcessor:
    """Load the processor files in ``path``: ours (``save_pretrained``) or a released Qwen2.5-VL's.

    ``max_pixels`` overrides the saved cap: Qwen's files say 12845056, the paper uses 360000.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: processor directory does not exist")
    try:
        processor = ConceptSegProcessor.from_pretrained(os.fspath(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot load processor: {exc}") from exc
    token_id = processor.image_token_id
    if token_id is None or token_id == processor.tokenizer.unk_token_id:
        raise CheckpointError(f"{path}: tokenizer has no {IMAGE_TOKEN} token")
    if max_pixels is not None:
        min_pixels = processor.image_processor.size.shortest_edge
        if max_pixels < min_pixels:
            raise InputError(f"max_pixels: {max_pixels} is below the processor's min_pixels {min_pixels}")
        processor.image_processor.size = SizeDict(shortest_edge=min_pixels, longest_edge=max_pixels)
    return processor


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) as Qwen2.5-VL does (16/24/24 of 64)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_policy_config(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    tie_word_embeddings: bool = False,
) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config small enough for CPU tests, wired to ``tokenizer``'s special-token ids.

    Patch 14 and merge 2 as in the real model, so a processor built for it matches Qwen's geometry;
    the last vision block uses full attention, the other windowed, as in every Qwen2.5-VL.
    """
    if hidden_size % num_heads:
        raise InputError(f"num_heads: {num_heads} does not divide hidden_size {hidden_size}")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(hidden_size // num_heads)},
            "bos_token_id": ids[PAD_TOKEN],
            "eos_token_id": ids[EOS_TOKEN],
            "pad_token_id": ids[PAD_TOKEN],
            "tie_word_embeddings": tie_word_embeddings,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
            "out_hidden_size": hidden_size,
        },
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )


def build_policy(
    config: Qwen2_5_VLConfig, *, seed: int | None = None, dtype: torch.dtype | None = None
) -> Qwen2_5_VLForConditionalGeneration:
    """Random-init policy from ``config`` in eval mode; ``seed`` fixes the weights without touching global RNG;
    ``dtype`` initializes in that dtype directly (a bf16 3B never exists in fp32)."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, **({"dtype": dtype} if dtype else {}))
    return model.eval()


@dataclass
class PolicyOutput:
    """One completion.

    Attributes:
        text: the decoded completion, special tokens removed.
        token_ids: (T,) int64, every generated token including a final ``<|im_end|>``; on CPU.
        hidden_states: (T, d) last-layer states after the final norm, row i the state that produced
            ``token_ids[i]``; the model's dtype and device, no grad.
    """

    text: str
    token_ids: torch.Tensor
    hidden_states: torch.Tensor


class PolicyWrapper:
    """Prompts, greedy or sampled decoding, and the hidden states for the CTM, one request at a time."""

    def __init__(
        self,
        model: Qwen2_5_VLForConditionalGeneration,
        processor: ConceptSegProcessor,
        *,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    ) -> None:
        self.model = model
        self.processor = processor
        self.system_prompt = system_prompt
        tok = processor.tokenizer
        # Qwen2.5-VL's generation config stops on both; ours may lack one, so ask the tokenizer.
        self._eos_ids = [tok.convert_tokens_to_ids(t) for t in (EOS_TOKEN, PAD_TOKEN)]
        self._pad_id = tok.convert_tokens_to_ids(PAD_TOKEN)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def build_inputs(self, images: Sequence[ImageLike], text: str) -> BatchFeature:
        """The chat prompt (system turn, then the images, then ``text``) as a batch of one.

        ``images`` may be empty: a text-only prompt. Returns the processor's tensors on the model's
        device: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, with images,
        ``pixel_values`` and ``image_grid_thw``.
        """
        if not text:
            raise InputError("text: the prompt text is empty")
        content: list[dict[str, str]] = [{"type": "image"} for _ in images]
        content.append({"type": "text", "text": text})
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": content},
        ]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor(images=list(images) or None, text=[prompt], return_tensors="pt")
        return inputs.to(self.model.device)

    def generate(
        self,
        images: Sequence[ImageLike],
        text: str,
        max_new_tokens: int,
        greedy: bool = True,
    ) -> PolicyOutput:
        """Build the prompt and decode; see ``generate_from_inputs``.

        ``max_new_tokens`` has no default here: the budget is the caller's (a pipeline's
        ``GenerationConfig``, a training recipe's completion length), never this wrapper's.
        """
        return self.generate_from_inputs(self.build_inputs(images, text), max_new_tokens, greedy)

    def generate_from_inputs(
        self, inputs: BatchFeature, max_new_tokens: int, greedy: bool = True
    ) -> PolicyOutput:
        """Decode from prepared inputs (batch of one), capturing each step's last hidden state.

        ``greedy=False`` samples at temperature 1 with no top-k/top-p, as in GRPO training.
        The states come from a forward hook on the final norm, which sees (1, P, d) at prefill and
        (1, 1, d) per decoding step: one last-position row per generated token, and no
        ``output_hidden_states`` tuples of every layer kept for every step.
        """
        _require_batch_of_one(inputs)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        sampling = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        prompt_len = inputs["input_ids"].shape[1]
        with torch.no_grad(), self._capture_last_states() as rows:
            sequences = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                eos_token_id=self._eos_ids,
                pad_token_id=self._pad_id,
                **sampling,
            )
        token_ids = sequences[0, prompt_len:].cpu()
        if len(rows) != len(token_ids):
            raise RuntimeError(
                f"captured {len(rows)} hidden states for {len(token_ids)} generated tokens: "
                "transformers' generate no longer runs one forward per token"
            )
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        return PolicyOutput(text=text, token_ids=token_ids, hidden_states=torch.cat(rows, dim=0))

    def prompt_hidden_states(self, inputs: BatchFeature) -> torch.Tensor:
        """(P, d) last-layer states after the final norm at every position of ``inputs`` (batch of one).

        One prefill, no decoding: the text-only shortcut route reads the concept phrase this way.
        Runs with gradients if the caller has them enabled.
        """
        _require_batch_of_one(inputs)
        if inputs.get("image_grid_thw") is not None and inputs.get("mm_token_type_ids") is None:
            # Without it transformers 5 silently falls back to 1-D positions for image prompts.
            raise InputError("mm_token_type_ids: required with images to build the model's 3-axis positions")
        model_inputs = {
            k: inputs[k]
            for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
            if inputs.get(k) is not None
        }
        out = self.model.model(**model_inputs, use_cache=False)
        return out.last_hidden_state[0]

    def teacher_forced_hidden_states(
        self, prompt_inputs: BatchFeature, completion_ids: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """(T, d) states that produced ``completion_ids``, from one forward over prompt + completion.

        Equal (to float rounding) to ``generate``'s captured states for the same completion; stage-1
        training uses it on a template completion. ``mm_token_type_ids`` is extended with zeros
        (text) over the completion, without which transformers drops the 3-axis positions.
        """
        _require_batch_of_one(prompt_inputs)
        device = prompt_inputs["input_ids"].device
        completion = torch.as_tensor(completion_ids, dtype=torch.long, device=device).reshape(1, -1)
        if completion.shape[1] == 0:
            raise InputError("completion_ids: empty completion")
        prompt_len = prompt_inputs["input_ids"].shape[1]
        full = dict(prompt_inputs)
        full["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion], dim=1)
        full["attention_mask"] = torch.cat(
            [prompt_inputs["attention_mask"], torch.ones_like(completion)], dim=1
        )
        if prompt_inputs.get("mm_token_type_ids") is not None:
            mm = prompt_inputs["mm_token_type_ids"]
            full["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion, dtype=mm.dtype)], dim=1)
        states = self.prompt_hidden_states(BatchFeature(full))
        return states[prompt_len - 1 : prompt_len - 1 + completion.shape[1]]

    @contextmanager
    def _capture_last_states(self) -> Iterator[list[torch.Tensor]]:
        rows: list[torch.Tensor] = []

        def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> None:
            rows.append(output[0, -1:].detach())

        handle = self.model.model.language_model.norm.register_forward_hook(hook)
        try:
            yield rows
        finally:
            handle.remove()


def _require_batch_of_one(inputs: BatchFeature) -> None:
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1:
        shape = None if ids is None else tuple(ids.shape)
        raise InputError(f"input_ids: expected shape (1, P), got {shape}")
