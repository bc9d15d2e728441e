"""``OnnxPolicy``: the Qwen2.5-VL policy over its three ONNX graphs, with numpy + ONNX Runtime only.

Contract:

* Graphs (ONNX Runtime GenAI's split, exported by ``conceptseg_edge.export.policy``):
  ``policy_vision`` (one image's flattened patches + its grid → merged image embeddings),
  ``policy_embed`` (token ids → embeddings) and ``policy_decoder`` (embeddings + 3-axis positions +
  attention mask + KV cache → logits, the last hidden state after the final norm, and the new cache).
* ``generate(image, text, max_new_tokens)`` reproduces ``PolicyWrapper.generate`` with greedy
  decoding: the same prompt (Qwen2.5-VL chat format), the same pixel values (Qwen2-VL's PIL image
  processor, ported to numpy + PIL and tested for equality), the same 3-axis M-RoPE positions
  (``get_rope_index`` ported to numpy), the same stop rule (``<|im_end|>`` or ``<|endoftext|>``, kept as
  the last token) and the same hidden states: row i is the last-layer state, after the final RMSNorm,
  at the position that *produced* token i (the last prompt position for i = 0), i.e. what the CTM
  reads. At fp32 the tokens are identical and the states agree to float rounding (tests).
* ``prefill_hidden_states(text)``: the text-only shortcut route, all prompt positions' states,
  equal to ``PolicyWrapper.prompt_hidden_states(build_inputs([], text))``.
* Per-stage timings of the last call are in ``timings`` (milliseconds, plus decode tokens/s).

Nothing here imports torch or transformers: the tokenizer is read from ``tokenizer.json`` with the
``tokenizers`` library, the chat prompt is built in code (the Qwen2.5-VL-Instruct template restricted
to one system turn and one user turn of images then text; a test compares it with transformers'
rendering of the saved template), and the image processor settings come from the saved processor's
JSON. Batch size is 1 throughout, as in ``PolicyWrapper``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from conceptseg_edge.errors import EngineIOError, InputError, ManifestError
from conceptseg_edge.manifest import BundleManifest, load_bundle
from conceptseg_edge.preprocess import as_rgb_array
from conceptseg_edge.runtime.engine import BindableEngine, Engine, EngineFactory, open_engine, open_part

POLICY_PARTS = ("policy_vision", "policy_embed", "policy_decoder")
#: Where bundles keep the processor files (tokenizer.json, processor_config.json).
PROCESSOR_DIR = "processor"

# Qwen2.5-VL's special tokens and default system turn. They mirror conceptseg_edge.models.tokenizer,
# which cannot be imported here (it imports transformers); test_export_policy checks they agree.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
STOP_TOKENS = (IM_END, END_OF_TEXT)

# Qwen2-VL's image processor defaults (transformers' OPENAI_CLIP_MEAN/STD, PIL bicubic).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3

#: Token ids whose embedding ``OnnxPolicy`` keeps for decoding (4 MiB per 1k ids at d=1024, fp32);
#: a completion's vocabulary is small, the cap only bounds a long-lived server.
EMBED_CACHE_TOKENS = 8192


def _ms(start_ns: int) -> float:
    return (time.perf_counter_ns() - start_ns) / 1e6


# ----------------------------------------------------------------------------- images


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


# ----------------------------------------------------------------------------- positions


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


# ----------------------------------------------------------------------------- text


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


# ----------------------------------------------------------------------------- the policy


class PolicyGeneration(NamedTuple):
    """One greedy completion: unpacks as ``text, token_ids, hidden_states``.

    ``token_ids``: (T,) int64, the final stop token included when decoding stopped on one;
    ``hidden_states``: (T, d) float32, row i the post-norm last-layer state that produced token i.
    """

    text: str
    token_ids: np.ndarray
    hidden_states: np.ndarray


@dataclass
class PrefillState:
    """The decoder state after one prefill (batch of one).

    ``input_ids``: (S,) the prompt (+ any appended ids); ``hidden_states``: (S, d) float32 post-norm
    last-layer states; ``predicted_ids``: (S,) greedy next token at each position; ``last_logits``:
    (V,) float32 at the last position; ``cache``: the decoder's ``present.*`` outputs in input order;
    ``next_position``: the rotary position of the next token (all three axes).
    """

    input_ids: np.ndarray
    hidden_states: np.ndarray
    predicted_ids: np.ndarray
    last_logits: np.ndarray
    cache: list[np.ndarray]
    next_position: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def decoder_feeds(embeds: np.ndarray, positions: np.ndarray, total: int) -> dict[str, np.ndarray]:
    """The decoder's non-cache inputs: (1, S, d) embeddings, their (3, S) M-RoPE positions and an
    all-ones mask over the ``total`` positions cached plus fed (batch of one, no padding)."""
    return {
        "inputs_embeds": embeds,
        "position_ids": positions.reshape(3, 1, -1),
        "attention_mask": np.ones((1, total), np.int64),
    }


class _CachedDecoder:
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


def _as_image_list(image: np.ndarray | Sequence[np.ndarray] | None) -> list[np.ndarray]:
    if image is None:
        return []
    if isinstance(image, np.ndarray):
        return [image]
    return list(image)


class OnnxPolicy:
    """Greedy Qwen2.5-VL decoding over three engines, with the states the CTM reads."""

    def __init__(
        self,
        vision: Engine | None,
        embed: Engine,
        decoder: Engine,
        tokenizer: PolicyTokenizer,
        image_config: PolicyImageConfig,
    ) -> None:
        self.vision = vision
        self.embed = embed
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.timings: dict[str, float] = {}
        names = {t.name: t for t in decoder.inputs}
        self._past_names = [t.name for t in decoder.inputs if t.name.startswith("past_key_values.")]
        self._present_names = [n.replace("past_key_values.", "present.", 1) for n in self._past_names]
        missing = [n for n in ("inputs_embeds", "position_ids", "attention_mask") if n not in names]
        outputs = {t.name for t in decoder.outputs}
        missing += [n for n in ("logits", "last_hidden_state", *self._present_names) if n not in outputs]
        if missing or not self._past_names:
            raise EngineIOError(f"policy_decoder: graph lacks {missing or 'past_key_values.* inputs'}")
        first = names[self._past_names[0]]
        if not isinstance(first.shape[1], int) or not isinstance(first.shape[3], int):
            raise EngineIOError(f"policy_decoder.{first.name}: expected fixed kv heads and head dim, got {first.shape}")
        self._cache_dtype = np.dtype(first.dtype)
        self._empty_cache = {
            n: np.zeros((1, first.shape[1], 0, first.shape[3]), self._cache_dtype) for n in self._past_names
        }
        self.hidden_size = int(names["inputs_embeds"].shape[2])
        self._token_embeds: dict[int, np.ndarray] = {}

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        manifest: BundleManifest | None = None,
        provider: str = "cpu",
        engine_factory: EngineFactory = open_engine,
    ) -> OnnxPolicy:
        """Load the policy graphs and processor files of a verified bundle (``engine_factory`` opens each part)."""
        bundle = Path(bundle)
        manifest = manifest or load_bundle(bundle)
        # a bundle without policy_vision is text-only: generate() then refuses images
        vision = open_part(bundle, manifest, "policy_vision", provider, engine_factory) if "policy_vision" in manifest.parts else None
        embed, decoder = (open_part(bundle, manifest, name, provider, engine_factory) for name in ("policy_embed", "policy_decoder"))
        proc = bundle / PROCESSOR_DIR
        return cls(vision, embed, decoder, PolicyTokenizer.from_dir(proc), PolicyImageConfig.from_dir(proc))

    # ------------------------------------------------------------------ pieces

    def build_input_ids(self, num_images: int, text: str, grids: Sequence[np.ndarray]) -> np.ndarray:
        """(P,) prompt ids with each ``<|image_pad|>`` expanded to its image's merged-token count."""
        if not text:
            raise InputError("text: the prompt text is empty")
        ids = self.tokenizer.encode(self.tokenizer.prompt(num_images, text))
        pads = np.flatnonzero(ids == self.tokenizer.image_token_id)
        if len(pads) != num_images:
            raise InputError(f"text: found {len(pads)} image placeholders for {num_images} images")
        merge2 = self.image_config.merge_size**2
        counts = np.ones(len(ids), dtype=np.int64)
        counts[pads] = [int(np.prod(g)) // merge2 for g in grids]
        limit = self.tokenizer.max_length
        if limit is not None and counts.sum() >= limit:
            raise InputError(
                f"query: the prompt is {int(counts.sum())} tokens (images included), past the policy's "
                f"context limit of {limit}; shorten the query or use fewer/smaller support images"
            )
        return np.repeat(ids, counts)

    # ------------------------------------------------------------------ public API

    def prefill(
        self,
        images: np.ndarray | Sequence[np.ndarray] | None,
        text: str,
        append_ids: Sequence[int] | np.ndarray = (),
    ) -> PrefillState:
        """Run the prompt (images, then ``text``; ``append_ids`` after it, for teacher forcing).

        Returns the state to decode from; timings in ms: ``policy_preprocess`` + ``policy_vision``
        (images only), ``policy_prefill`` (embedding + decoder).
        """
        images = _as_image_list(images)
        timings: dict[str, float] = {}
        image_embeds, grids = [], []
        if images:
            if self.vision is None:
                raise InputError("image: this policy has no vision graph (text-only bundle)")
            t0 = time.perf_counter_ns()
            pre = [preprocess_policy_image(im, self.image_config) for im in images]
            t1 = time.perf_counter_ns()
            for pixel_values, grid in pre:
                out = self.vision.run({"pixel_values": pixel_values, "image_grid_thw": grid[None]})
                image_embeds.append(out["image_embeds"])
                grids.append(grid)
            timings["policy_preprocess"] = (t1 - t0) / 1e6
            timings["policy_vision"] = _ms(t1)
        t2 = time.perf_counter_ns()
        ids = self.build_input_ids(len(images), text, grids)
        ids = np.concatenate([ids, np.asarray(append_ids, dtype=np.int64).reshape(-1)])
        embeds = self.embed.run({"input_ids": ids[None]})["inputs_embeds"]
        if images:
            slots = np.flatnonzero(ids == self.tokenizer.image_token_id)
            vision = np.concatenate(image_embeds, axis=0)
            if len(slots) != len(vision):
                raise InputError(f"text: {len(slots)} image tokens for {len(vision)} image embeddings")
            embeds = embeds.copy()
            embeds[0, slots] = vision.astype(embeds.dtype, copy=False)
        positions, next_position = mrope_position_ids(
            ids, self.tokenizer.image_token_id, grids, self.image_config.merge_size
        )
        out = self.decoder.run({**decoder_feeds(embeds, positions, len(ids)), **self._empty_cache})
        logits = out["logits"][0]
        timings["policy_prefill"] = _ms(t2)
        return PrefillState(
            input_ids=ids,
            hidden_states=out["last_hidden_state"][0],
            predicted_ids=np.argmax(logits, axis=-1),
            last_logits=logits[-1],
            cache=[out[n] for n in self._present_names],
            next_position=next_position,
            timings=timings,
        )

    def generate(
        self,
        image: np.ndarray | Sequence[np.ndarray] | None,
        text: str,
        max_new_tokens: int = 2048,
    ) -> PolicyGeneration:
        """Greedy completion of the chat prompt (``image``: none, one, or a list, in prompt order).

        Stops after a stop token (kept) or ``max_new_tokens``. Sets ``self.timings``: the prefill
        stages, ``policy_decode`` ms over the decoding steps after the first token,
        ``policy_new_tokens`` and (when there were decoding steps) ``policy_decode_tokens_per_s``.
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        state = self.prefill(image, text)
        timings = dict(state.timings)
        tokens: list[int] = []
        rows: list[np.ndarray] = [state.hidden_states[-1]]
        logits = state.last_logits
        decoder = _CachedDecoder(self.decoder, self._past_names, self._present_names, state.cache)
        position, total = state.next_position, state.length
        t0 = time.perf_counter_ns()
        steps = 0
        while True:
            token = int(np.argmax(logits))
            tokens.append(token)
            at_limit = self.tokenizer.max_length is not None and total + 1 >= self.tokenizer.max_length
            if token in self.tokenizer.stop_ids or len(tokens) >= max_new_tokens or at_limit:
                break
            total += 1
            logits, row = decoder.step(self._token_embedding(token), position, total)
            position += 1
            steps += 1
            rows.append(row)
        decode_ms = _ms(t0)
        timings["policy_decode"] = decode_ms
        timings["policy_new_tokens"] = float(len(tokens))
        if steps:
            timings["policy_decode_tokens_per_s"] = steps / (decode_ms / 1e3)
        self.timings = timings
        token_ids = np.asarray(tokens, dtype=np.int64)
        hidden = np.stack(rows[: len(tokens)]).astype(np.float32, copy=False)
        return PolicyGeneration(self.tokenizer.decode(token_ids), token_ids, hidden)

    def _token_embedding(self, token: int) -> np.ndarray:
        """(1, 1, d) embedding of one generated token, from the embed graph once per token id.

        Decoding feeds one token per step; the embed graph is a table lookup, so its answer for an
        id never changes and a dict spares one engine call per step after the first use of an id.
        """
        row = self._token_embeds.get(token)
        if row is None:
            row = self.embed.run({"input_ids": np.array([[token]], np.int64)})["inputs_embeds"]
            if len(self._token_embeds) < EMBED_CACHE_TOKENS:
                self._token_embeds[token] = row
        return row

    def prefill_hidden_states(self, text: str) -> np.ndarray:
        """(P, d) float32 states of the text-only chat prompt for ``text`` (the shortcut route)."""
        state = self.prefill(None, text)
        self.timings = dict(state.timings)
        return state.hidden_states
