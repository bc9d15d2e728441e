"""``OnnxPolicy``: the Qwen2.5-VL policy over its three ONNX graphs, with numpy + ONNX Runtime only.

Contract:

* Graphs (ONNX Runtime GenAI's split, exported by ``conceptseg_edge.export.policy``):
  ``policy_vision`` (one image's flattened patches + its grid → merged image embeddings),
  ``policy_embed`` (token ids → embeddings) and ``policy_decoder`` (embeddings + 3-axis positions +
  attention mask + KV cache → logits, the last hidden state after the final norm, and the new cache).
* ``generate(image, text, max_new_tokens)`` reproduces ``PolicyWrapper.generate`` with greedy
  decoding: the same prompt (Qwen2.5-VL chat format, ``policy_tokenizer``), the same pixel values
  (Qwen2-VL's PIL image processor, ``policy_image``), the same 3-axis M-RoPE positions (``mrope``),
  the same stop rule (``<|im_end|>`` or ``<|endoftext|>``, kept as the last token) and the same
  hidden states: row i is the last-layer state, after the final RMSNorm, at the position that
  *produced* token i (the last prompt position for i = 0), i.e. what the CTM reads. At fp32 the
  tokens are identical and the states agree to float rounding (tests).
* ``prefill_hidden_states(text)``: the text-only shortcut route, all prompt positions' states,
  equal to ``PolicyWrapper.prompt_hidden_states(build_inputs([], text))``.
* Each call returns its own per-stage ``Timings`` (``PolicyGeneration.timings``,
  ``PrefillState.timings``); the policy object keeps no state of the last call but its embedding
  cache. Batch size is 1 throughout, as in ``PolicyWrapper``.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import EngineIOError, InputError
from conceptseg_edge.fileio import contained
from conceptseg_edge.manifest import PROCESSOR_DIR, BundleManifest, load_bundle
from conceptseg_edge.runtime.decoding import CachedDecoder, decoder_feeds
from conceptseg_edge.runtime.engine import Engine, EngineFactory, open_engine, open_part
from conceptseg_edge.runtime.mrope import mrope_position_ids
from conceptseg_edge.runtime.policy_image import PolicyImageConfig, preprocess_policy_image
from conceptseg_edge.runtime.policy_tokenizer import PolicyTokenizer
from conceptseg_edge.timings import Timings, elapsed_ms

#: Token ids whose embedding ``OnnxPolicy`` keeps for decoding (4 MiB per 1k ids at d=1024, fp32);
#: a completion's vocabulary is small, the cap only bounds a long-lived server.
EMBED_CACHE_TOKENS = 8192


@dataclass(frozen=True)
class PolicyGeneration:
    """One greedy completion.

    ``token_ids``: (T,) int64, the final stop token included when decoding stopped on one;
    ``hidden_states``: (T, d) float32, row i the post-norm last-layer state that produced token i;
    ``timings``: the prefill's stages and ``policy_decode``, the decoding steps after the first token.
    """

    text: str
    token_ids: np.ndarray
    hidden_states: np.ndarray
    timings: Timings

    @property
    def new_tokens(self) -> int:
        """Tokens generated, stop token included (the first one comes from the prefill)."""
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decoding steps per second after the first token; None when there was no step."""
        steps = self.new_tokens - 1
        return steps / (self.timings.policy_decode / 1e3) if steps and self.timings.policy_decode else None


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
    timings: Timings  # policy_preprocess and policy_vision (with images), policy_prefill

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


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
        proc = contained(bundle, PROCESSOR_DIR, PROCESSOR_DIR)
        return cls(vision, embed, decoder, PolicyTokenizer.from_dir(proc), PolicyImageConfig.from_dir(proc))

    def providers(self) -> dict[str, str]:
        """Part → the provider (or engine) that runs it."""
        engines = {"policy_vision": self.vision, "policy_embed": self.embed, "policy_decoder": self.decoder}
        return {name: engine.provider for name, engine in engines.items() if engine is not None}

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

        Returns the state to decode from, with its stages: ``policy_preprocess`` + ``policy_vision``
        (images only), ``policy_prefill`` (embedding + decoder).
        """
        images = _as_image_list(images)
        image_timings = Timings()
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
            image_timings = Timings(
                policy_preprocess=(t1 - t0) / 1e6, policy_vision=elapsed_ms(t1), providers={"policy_vision": self.vision.provider}
            )
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
        timings = image_timings | Timings(policy_prefill=elapsed_ms(t2), providers={"policy_prefill": self.decoder.provider})
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
        max_new_tokens: int,
    ) -> PolicyGeneration:
        """Greedy completion of the chat prompt (``image``: none, one, or a list, in prompt order).

        Stops after a stop token (kept) or ``max_new_tokens`` (a caller's ``GenerationConfig``
        holds the budget; there is no default here).
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
        state = self.prefill(image, text)
        tokens: list[int] = []
        rows: list[np.ndarray] = [state.hidden_states[-1]]
        logits = state.last_logits
        decoder = CachedDecoder(self.decoder, self._past_names, self._present_names, state.cache)
        position, total = state.next_position, state.length
        t0 = time.perf_counter_ns()
        while True:
            token = int(np.argmax(logits))
            tokens.append(token)
            at_limit = self.tokenizer.max_length is not None and total + 1 >= self.tokenizer.max_length
            if token in self.tokenizer.stop_ids or len(tokens) >= max_new_tokens or at_limit:
                break
            total += 1
            logits, row = decoder.step(self._token_embedding(token), position, total)
            position += 1
            rows.append(row)
        timings = state.timings | Timings(policy_decode=elapsed_ms(t0), providers={"policy_decode": self.decoder.provider})
        token_ids = np.asarray(tokens, dtype=np.int64)
        hidden = np.stack(rows[: len(tokens)]).astype(np.float32, copy=False)
        return PolicyGeneration(self.tokenizer.decode(token_ids), token_ids, hidden, timings)

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
        return self.prefill(None, text).hidden_states
