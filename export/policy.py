"""The policy family: Qwen2.5-VL → the three graphs ONNX Runtime GenAI uses, each validated against torch.

This module holds the family's ``PartSpec``s, its export-time modules (``VisionEncoderGraph``,
``EmbedGraph``, ``DecoderGraph``), its references and parity cases, and ``export_policy``. Every
graph goes through ``export_and_validate`` (so all accept a ``weight_storage``); a quantized decoder
is the optional step after it (``export/quantize.py``), validated on behaviour here.

Graphs (IO names come from the ``PartSpec``s below; batch is 1 everywhere, as in ``PolicyWrapper``):

* ``policy_vision``: ``pixel_values`` (num_patches, 1176) float32 + ``image_grid_thw`` (1, 3) int64
  → ``image_embeds`` (num_patches / 4, d). **One image per call**, any size: the window-attention
  order, the 2-D rotary positions and the window masks are computed *inside* the graph from the grid
  with plain tensor ops (Range, integer div/mod, TopK as argsort, Equal/Where), so the tracer records
  them as dynamic and no index bookkeeping leaks into the runtime. This was chosen over feeding
  precomputed indices (which would make the runtime depend on the vision config's ``window_size``,
  stored nowhere in the processor files) and over fixing the grid to 600x600 (support mosaics and
  other ``max_pixels`` would need another graph). Window attention runs as full attention with an
  additive block mask, which is exact (masked weights are exactly 0 after softmax) but spends
  O(N^2) instead of O(N * window) on the windowed layers; the full-attention layers are O(N^2) anyway.
  Images only (grid t = 1); video is out of scope.
* ``policy_embed``: ``input_ids`` (1, S) int64 → ``inputs_embeds`` (1, S, d).
* ``policy_decoder``: ``inputs_embeds`` (1, S, d), ``position_ids`` (3, 1, S) int64 (M-RoPE),
  ``attention_mask`` (1, past + S) int64, ``past_key_values.{i}.key|value`` (1, kv_heads, past, head_dim)
  with past >= 0 → ``logits`` (1, S, vocab), ``last_hidden_state`` (1, S, d) after the final RMSNorm
  (what the CTM consumes), ``present.{i}.key|value`` (1, kv_heads, past + S, head_dim). The attention
  loop is written out over the HF modules' own weights (projections, norms, MLPs, the rotary module),
  with the cache as plain tensors and the causal + padding mask built in the graph: transformers 5's
  ``Cache`` objects and mask factories are not traceable as graph inputs, and hiding them would risk
  baking a trace-time mask decision into the graph. Sliding-window attention is refused (Qwen2.5-VL
  does not use it). Grouped-query attention runs on the unexpanded cache: the heads / kv_heads query
  heads sharing a KV head are stacked along the query axis, (1, kv_heads, G * S, head_dim), against
  (1, kv_heads, T, head_dim) keys/values with the mask tiled G times, instead of transformers'
  ``repeat_kv`` copy of the whole cache every step. With batch fixed at 1 the reshapes have constant
  targets, the rotary tables and the mask are built once per step, and the rotary rotation is one
  Slice per layer on queries and keys together. Measured (d = 1024, 4 layers, 16/2 heads, ~700
  cached tokens, ORT CPU, 1 thread, loaded 2-core machine, interleaved medians): 414 → 195 kernels
  per decode step; fp32 ~19-21 → ~14-16 ms and INT8 ~8.3-8.9 → ~5.7-6.1 ms per step; parity
  differences unchanged to the last bit on the test cases.

Validation (all graphs, fp32 arithmetic): ONNX Runtime vs the transformers modules on fixed cases
that cover the dynamic axes (images of several aspect ratios; prefill with past = 0, one-token
decode, a chunk after a past with a padding hole, 3-axis positions). Tolerances and why are next to
the constants; ``WeightStorage`` scales them for fp16-stored weights.

Quantized decoders (``precision="int8" | "int4"``; vision and embedding stay unquantized, see
``QUANTIZED_PARTS``): the fp32 decoder is exported and validated first, then quantized
(``export/quantize.py``). A quantized graph cannot meet an fp32 atol, so it is measured against
torch on teacher-forced greedy completions (``quantized_parity``) and recorded as the manifest's
``QuantizedParity``: greedy token agreement over all completion slots (recorded, not gated),
agreement over the decisive slots (torch's top-1 leads by >= ``DECISIVE_MARGIN`` logits) and the
mean cosine of the CTM's hidden states, each with its floor (``QUANT_FLOORS``, reasoning beside it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from conceptseg_edge.errors import ExportParityError, InputError
from conceptseg_edge.export.external import StreamedWeights
from conceptseg_edge.export.onnx_export import export_and_validate
from conceptseg_edge.export.parts import FEATURE_ATOL, LOGIT_ATOL, PartFactory, PartSpec, check_precision
from conceptseg_edge.export.quantize import quantize_part
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import PartManifest, QuantizedParity, TensorSpec

#: Parts a ``precision`` other than fp32 applies to. The vision tower runs once per image (compute-
#: bound, and known to drift under reduced precision: see deployment-notes), and the embedding is a
#: Gather that MatMul-only quantizers do not touch; the decoder is where per-token weight traffic is.
QUANTIZED_PARTS = frozenset({"policy_decoder"})
REFERENCE_NAME = "transformers Qwen2_5_VLForConditionalGeneration modules, torch eager fp32"

# fp32 tolerances (parts.FEATURE_ATOL, parts.LOGIT_ATOL). The graphs are float32 like the eager
# modules, so differences come only from kernel choice and summation order: measured ~2e-7 on image
# embeddings and ~1e-6 on decoder states of the tiny model. Post-norm states and KV entries are of
# order 1, so 1e-3 leaves ~1000x margin while any real export bug (a wrong rotary section, a dropped
# mask, a transposed head) moves them by 1e-2 or more. Logits of a trained model reach ~30, hence
# 1e-2. The embedding graph is a Gather: at fp32 storage it must be bit-exact.
EMBED_ATOL = 0.0

# Quantized decoders: what the export *gates* on. Three measures on teacher-forced greedy
# completions (see ``quantized_parity``), because plain top-1 agreement mixes two things: at near-tie
# slots (torch's top-1 leads top-2 by a fraction of a logit: random box digits in a trained model,
# nearly every slot in a random-init one) any perturbation may flip the token, while a *decisive*
# slot (lead >= DECISIVE_MARGIN logits) flips only if the graph is off by half a logit or more.
# The export gate is meant to catch a *broken* quantized graph (wrong axis, mis-packed blocks, a
# dropped scale: decisive agreement ~ chance, cosine ~ 0-0.5), not to judge the accuracy trade-off
# of a sound one; that trade-off belongs to the validation lane (route mask IoU vs torch, which the
# concept export records per precision), and on real checkpoints it depends on activation outliers
# that a tiny model does not have (per-tensor dynamic INT8 activations suffer from them most). So:
# decisive agreement >= 0.9 and mean hidden cosine >= 0.9; plain agreement is recorded, not gated
# (ceiling 1.0), since a random-init model scores anything there (0.41 measured at INT4, d = 1024).
# Measured (tiny model trained 60 steps, 192 slots, 101 decisive): INT8 agreement 0.984, decisive
# 1.0, cosine 0.9994; INT4 0.974, 1.0, 0.9975. Random-init d = 1024, 4 layers: INT8 cosine 0.998,
# INT4 0.955. tests/test_export_policy.py asserts tighter, measured floors on the trained tiny model.
DECISIVE_MARGIN = 1.0
QUANT_FLOORS: dict[str, dict[str, float]] = {
    "int8": {"greedy_token_agreement": 0.0, "decisive_token_agreement": 0.9, "hidden_cosine": 0.9},
    "int4": {"greedy_token_agreement": 0.0, "decisive_token_agreement": 0.9, "hidden_cosine": 0.9},
}
#: The completions torch generates for the quantized check: long enough to leave the prompt's
#: echo and reach tags, words and box digits.
QUANT_PARITY_GENERATION = GenerationConfig(max_new_tokens=32)
FORBIDDEN = frozenset({"OneHot", "NonZero"})
_NEG = torch.finfo(torch.float32).min  # an additive mask's "never attend"


# ----------------------------------------------------------------------------- specs


def policy_vision_spec(hidden_size: int, patch_dim: int = 1176) -> PartSpec:
    """One image's patches (the processor's ``pixel_values``) + its grid → merged image embeddings."""
    return PartSpec(
        name="policy_vision",
        file="policy_vision.onnx",
        inputs=(
            TensorSpec("pixel_values", "float32", ("num_patches", patch_dim)),
            TensorSpec("image_grid_thw", "int64", (1, 3)),
        ),
        outputs=(TensorSpec("image_embeds", "float32", ("num_image_tokens", hidden_size)),),
        atol={"image_embeds": FEATURE_ATOL},
        forbidden_ops=FORBIDDEN,
    )


def policy_embed_spec(hidden_size: int) -> PartSpec:
    """Token ids → input embeddings (the decoder's ``embed_tokens``)."""
    return PartSpec(
        name="policy_embed",
        file="policy_embed.onnx",
        inputs=(TensorSpec("input_ids", "int64", (1, "sequence")),),
        outputs=(TensorSpec("inputs_embeds", "float32", (1, "sequence", hidden_size)),),
        atol={"inputs_embeds": EMBED_ATOL},
        forbidden_ops=FORBIDDEN,
    )


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer, in graph order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def policy_decoder_spec(hidden_size: int, num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int) -> PartSpec:
    """The language model + LM head with an explicit KV cache (the fp32 graph a quantized one starts from)."""
    kv = (1, num_kv_heads)
    atol = {"logits": LOGIT_ATOL, "last_hidden_state": FEATURE_ATOL}
    atol |= {name: FEATURE_ATOL for name in kv_names(num_layers, "present")}
    return PartSpec(
        name="policy_decoder",
        file="policy_decoder.onnx",
        inputs=(
            TensorSpec("inputs_embeds", "float32", (1, "sequence", hidden_size)),
            TensorSpec("position_ids", "int64", (3, 1, "sequence")),
            TensorSpec("attention_mask", "int64", (1, "total_sequence")),
            *(TensorSpec(n, "float32", (*kv, "past_sequence", head_dim)) for n in kv_names(num_layers, "past_key_values")),
        ),
        outputs=(
            TensorSpec("logits", "float32", (1, "sequence", vocab_size)),
            TensorSpec("last_hidden_state", "float32", (1, "sequence", hidden_size)),
            *(TensorSpec(n, "float32", (*kv, "total_sequence", head_dim)) for n in kv_names(num_layers, "present")),
        ),
        atol=atol,
        forbidden_ops=FORBIDDEN,
    )


#: This family's parts, for ``export/registry.py``.
PARTS: dict[str, PartFactory] = {
    "policy_vision": policy_vision_spec,
    "policy_embed": policy_embed_spec,
    "policy_decoder": policy_decoder_spec,
}


# ----------------------------------------------------------------------------- graph modules


class VisionEncoderGraph(nn.Module):
    """Qwen2.5-VL's vision tower for one image, with the grid bookkeeping as tensor ops."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        cfg = visual.config
        self.visual = visual
        self.merge = cfg.spatial_merge_size
        self.unit = self.merge**2
        self.window = cfg.window_size // self.merge // cfg.patch_size  # merged tokens per window side
        self.full_attention = frozenset(cfg.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        m, vw, unit = self.merge, self.window, self.unit
        lw = image_grid_thw[0, 2] // m  # merged columns
        n = pixel_values.shape[0] // unit  # merged tokens (t = 1)
        idx = torch.arange(n, device=pixel_values.device)
        row, col = idx // lw, idx % lw
        windows_per_row = (lw + vw - 1) // vw
        window_id = (row // vw) * windows_per_row + col // vw
        # transformers' get_vision_window_index lists merged tokens window by window (windows
        # row-major), row-major inside a window: exactly ascending order of this unique key.
        key = window_id * (vw * vw) + (row % vw) * vw + col % vw
        window_index = torch.argsort(key)
        sub = torch.arange(unit, device=pixel_values.device)
        patch_row = (row[window_index][:, None] * m + sub[None, :] // m).reshape(-1, 1)
        patch_col = (col[window_index][:, None] * m + sub[None, :] % m).reshape(-1, 1)
        inv_freq = self.visual.rotary_pos_emb.inv_freq
        freqs = torch.cat([patch_row.float() * inv_freq, patch_col.float() * inv_freq], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1)
        cos, sin = freqs.cos(), freqs.sin()
        patch_window = window_id[window_index][:, None].expand(-1, unit).reshape(-1)
        window_bias = torch.where(patch_window[:, None] == patch_window[None, :], 0.0, _NEG)

        x = self.visual.patch_embed(pixel_values)
        d = x.shape[-1]
        x = x.reshape(-1, unit, d)[window_index].reshape(-1, d)
        for i, block in enumerate(self.visual.blocks):
            bias = None if i in self.full_attention else window_bias
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, bias)
            x = x + block.mlp(block.norm2(x))
        merged = self.visual.merger(x)
        return merged[torch.argsort(window_index)]

    @staticmethod
    def _attention(attn, x, cos, sin, bias):
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return attn.proj(torch.matmul(weights, v).transpose(0, 1).reshape(n, -1))

class EmbedGraph(nn.Module):
    """The decoder's token embedding on its own (a Gather), so the runtime embeds ids and image rows alike."""

    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

class DecoderGraph(nn.Module):
    """Language model + LM head over explicit past/present tensors (batch 1)."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        cfg = language_model.config
        if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in (cfg.layer_types or []):
            raise InputError("policy: sliding-window attention is not supported by the decoder export")
        self.lm = language_model
        self.lm_head = lm_head

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        # Batch is 1 (the spec's leading dims), so every reshape below has a constant target and
        # the graph carries no per-layer Shape/Gather/Concat chains.
        x = inputs_embeds
        cfg = self.lm.config
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = self.lm.layers[0].self_attn.head_dim
        group = heads // kv_heads
        seq = x.shape[1]
        past_len = past[0].shape[2]
        total = attention_mask.shape[1]
        query_pos = torch.arange(seq, device=x.device) + past_len
        key_pos = torch.arange(total, device=x.device)
        allowed = (key_pos[None, :] <= query_pos[:, None]) & (attention_mask[0][None, :] > 0)
        # Grouped-query attention without repeat_kv: the G = heads / kv_heads query heads that
        # share a KV head are stacked along the query axis, (1, kv, G * S, hd), and attend to the
        # unexpanded (1, kv, T, hd) cache; the (S, T) mask is tiled G times to match (row g*S + s
        # is query s of group member g). Built once per step, shared by all layers.
        bias = torch.where(allowed, 0.0, _NEG).repeat(group, 1)[None, None]
        # Rotary: cos/sin once per step. rotate_half(x) * sin == flip(x as (2, hd/2)) * sin with the
        # first half negated, which is one Slice instead of Slice/Slice/Neg/Concat, applied to
        # the queries and keys of a layer together.
        cos, sin = self.lm.rotary_emb(x, position_ids)
        pairs = (1, -1, 1, 2, hd // 2)  # (1, S, heads, half, hd / 2)
        sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype).view(1, 1, 1, 2, 1)
        cos, sin = cos.reshape(pairs), sin.reshape(pairs) * sign
        presents = []
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            qk = torch.cat([attn.q_proj(h), attn.k_proj(h)], dim=-1).view(1, -1, heads + kv_heads, 2, hd // 2)
            qk = (qk * cos + qk.flip(3) * sin).view(1, -1, heads + kv_heads, hd).transpose(1, 2)
            q, k = qk.split([heads, kv_heads], dim=1)
            v = attn.v_proj(h).view(1, -1, kv_heads, hd).transpose(1, 2)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            q = q.reshape(1, kv_heads, -1, hd)
            scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + bias
            weights = torch.softmax(scores, dim=-1)
            out = torch.matmul(weights, v).reshape(1, heads, -1, hd).transpose(1, 2).reshape(1, -1, heads * hd)
            x = x + attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.lm.norm(x)
        return (self.lm_head(hidden), hidden, *presents)


# ----------------------------------------------------------------------------- references


def vision_reference(model):
    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = model.model.get_image_features(
                torch.from_numpy(feeds["pixel_values"]), torch.from_numpy(feeds["image_grid_thw"])
            )
        return {"image_embeds": torch.cat(out.pooler_output, dim=0).numpy()}

    return run


def embed_reference(model):
    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"inputs_embeds": model.get_input_embeddings()(torch.from_numpy(feeds["input_ids"])).numpy()}

    return run


def decoder_reference(model, num_layers: int):
    """transformers' own language model with a ``DynamicCache`` filled from the past feeds."""
    from transformers import DynamicCache

    lm = model.model.language_model
    past_names = kv_names(num_layers, "past_key_values")
    present_names = kv_names(num_layers, "present")

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        past = [torch.from_numpy(feeds[n]) for n in past_names]
        cache = DynamicCache(config=lm.config)
        if past[0].shape[2] > 0:
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
        with torch.no_grad():
            out = lm(
                inputs_embeds=torch.from_numpy(feeds["inputs_embeds"]),
                position_ids=torch.from_numpy(feeds["position_ids"]),
                attention_mask=torch.from_numpy(feeds["attention_mask"]),
                cache=cache,
                use_cache=True,
            )
            logits = model.lm_head(out.last_hidden_state)
        result = {"logits": logits.numpy(), "last_hidden_state": out.last_hidden_state.numpy()}
        for i in range(num_layers):
            layer = out.cache.layers[i]
            result[present_names[2 * i]] = layer.keys.numpy()
            result[present_names[2 * i + 1]] = layer.values.numpy()
        return result

    return run


# ----------------------------------------------------------------------------- parity cases


def embed_cases(vocab_size: int) -> list[dict[str, np.ndarray]]:
    """Ids across the vocabulary (its last row included), and a single id."""
    return [{"input_ids": np.array([[1, 5, 9, vocab_size - 1]], np.int64)}, {"input_ids": np.array([[3]], np.int64)}]


def vision_cases(processor) -> list[dict[str, np.ndarray]]:
    """Images of several aspect ratios through the real processor (the first one is traced)."""
    rng = np.random.default_rng(0)
    cases = []
    for h, w in ((200, 150), (90, 120), (60, 300), (600, 600)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        feats = processor.image_processor(images=[image], return_tensors="np")
        cases.append({"pixel_values": feats["pixel_values"].astype(np.float32),
                      "image_grid_thw": feats["image_grid_thw"].astype(np.int64)})
    return cases


def decoder_cases(cfg, num_layers: int, embed_weight: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Prefill (past 0), one-token decode, and a chunk after a past with a padding hole.

    The first case (traced) has past > 0 and S > 1 so neither dim is specialised to 0 or 1.
    Embeddings are real token rows; the past is random at unit scale like real keys/values.
    """
    rng = np.random.default_rng(0)
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def case(past: int, seq: int, positions: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        ids = rng.integers(0, embed_weight.shape[0], seq)
        feeds = {
            "inputs_embeds": embed_weight[ids][None].astype(np.float32),
            "position_ids": positions.reshape(3, 1, seq).astype(np.int64),
            "attention_mask": (np.ones((1, past + seq)) if mask is None else mask).astype(np.int64),
        }
        for name in kv_names(num_layers, "past_key_values"):
            feeds[name] = rng.standard_normal((1, kv, past, hd)).astype(np.float32)
        return feeds

    text = lambda start, n: np.broadcast_to(np.arange(start, start + n), (3, n))  # noqa: E731
    # 3-axis positions as after an image: t constant, (h, w) over a 2x3 grid, then text.
    image_like = np.concatenate(
        [text(0, 3), np.stack([np.full(6, 3), 3 + np.repeat(np.arange(2), 3), 3 + np.tile(np.arange(3), 2)]), text(6, 2)],
        axis=1,
    )
    hole = np.ones((1, 6 + 4))
    hole[0, 1] = 0
    return [
        case(5, 4, text(5, 4)),
        case(0, 11, image_like),
        case(11, 1, text(8, 1)),
        case(6, 4, text(6, 4), hole),
    ]


# ----------------------------------------------------------------------------- export


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def quantized_parity(
    wrapper,
    policy,
    prompts: Sequence[tuple[Sequence[Any], str]],
    precision: str,
    generation: GenerationConfig = QUANT_PARITY_GENERATION,
) -> QuantizedParity:
    """Quantized runtime vs torch on torch's greedy completions, teacher-forced.

    For each (images, text): torch decodes greedily (``PolicyWrapper.generate``); the runtime
    prefills prompt + completion[:-1] once, and each completion slot's runtime top-1 token is
    compared with torch's token, its hidden-state row with torch's captured row. Teacher forcing
    keeps one early flip from cascading into a different continuation, so the numbers measure the
    graph, not where the first divergence happened to fall.

    Returns, pooled over all prompts, the ``QuantizedParity`` of ``policy``'s decoder (quantized
    at ``precision``): ``greedy_token_agreement`` (fraction of slots), ``decisive_token_agreement``
    (over slots where torch's top-1 logit leads the runner-up by at least ``DECISIVE_MARGIN``; 1.0
    when there are none), ``hidden_cosine`` (mean row cosine), the slot counts, and ``passed``
    against ``QUANT_FLOORS[precision]``.
    """
    agree, decisive, cosines = [], [], []
    for images, text in prompts:
        ref = wrapper.generate(list(images), text, generation.max_new_tokens)
        tokens = ref.token_ids.numpy()
        ref_states = ref.hidden_states.float()
        with torch.no_grad():
            top2 = torch.topk(wrapper.model.lm_head(ref_states.to(wrapper.model.lm_head.weight.dtype)).float(), 2).values
        state = policy.prefill([np.asarray(im) for im in images], text, append_ids=tokens[:-1])
        start = state.length - len(tokens)
        agree.append(state.predicted_ids[start:] == tokens)
        decisive.append((top2[:, 0] - top2[:, 1]).numpy() >= DECISIVE_MARGIN)
        cosines.append(_cosines(state.hidden_states[start:], ref_states.numpy()))
    agree_all, decisive_all, cos_all = np.concatenate(agree), np.concatenate(decisive), np.concatenate(cosines)
    measures = {
        "greedy_token_agreement": float(agree_all.mean()),
        "decisive_token_agreement": float(agree_all[decisive_all].mean()) if decisive_all.any() else 1.0,
        "hidden_cosine": float(cos_all.mean()),
    }
    floors = QUANT_FLOORS[precision]
    return QuantizedParity(
        reference=f"{REFERENCE_NAME}; teacher-forced greedy completions ({generation.max_new_tokens} new tokens at most)",
        precision=precision,
        tokens=len(agree_all),
        decisive_tokens=int(decisive_all.sum()),
        floors=dict(floors),
        passed=all(measures[k] >= floor - 1e-12 for k, floor in floors.items()),
        **measures,
    )


def validation_prompts() -> list[tuple[list[np.ndarray], str]]:
    """The quantized-decoder validation set: concept phrases, a question, and one image prompt."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    return [
        ([], "camouflaged object segmentation"),
        ([], "Find the red circle in the target image and output its box."),
        ([], "the object that differs from the others"),
        ([], "shadow"),
        ([], "dog"),
        ([image], "salient object segmentation"),
    ]


def export_policy(
    policy_model,
    processor,
    out_dir: str | Path,
    opset: int = 17,
    precision: str = "fp32",
    weight_storage: str = "fp32",
) -> dict[str, PartManifest]:
    """Export the policy's three graphs into ``out_dir`` and validate each against torch.

    Args:
        policy_model: a ``Qwen2_5_VLForConditionalGeneration`` (any dtype; exported in float32).
        processor: its processor (``ConceptSegProcessor``); the image processor makes the vision
            cases, and for quantized precisions the tokenizer builds the validation prompts.
        out_dir: where ``policy_vision.onnx``, ``policy_embed.onnx``, ``policy_decoder.onnx`` go (each
            written atomically; an fp32 intermediate for quantization lives in a temporary directory).
        opset: ONNX opset (17: TensorRT 8.6+/Jetson-friendly).
        precision: the decoder's precision, "fp32", "int8" or "int4"; the others stay fp32.
        weight_storage: how the fp32 graphs store their large weights (``parts.WEIGHT_STORAGES``);
            a quantized decoder holds its own quantized weights.

    Returns:
        ``{"policy_vision": ..., "policy_embed": ..., "policy_decoder": ...}`` manifests: ``parity``
        per fp32 graph, ``quantized_parity`` for a quantized decoder.

    Raises:
        ExportParityError: a graph disagrees with torch past its tolerance / floors, or holds a
            banned op.
        InputError: an unknown precision or weight storage.
    """
    check_precision(precision, f"precision {precision!r}")
    model = policy_model
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()
    return _export_graphs(model.eval(), processor, Path(out_dir), opset, precision, weight_storage)


def export_policy_streamed(
    checkpoint: str | Path,
    out_dir: str | Path,
    opset: int = 17,
    precision: str = "fp32",
    generation: GenerationConfig = QUANT_PARITY_GENERATION,
) -> dict[str, PartManifest]:
    """``export_policy`` for policies larger than memory, straight from a checkpoint directory.

    The policy is opened with ``models.streamed.open_streamed_policy`` (vision tower, embedding,
    norm and LM head resident in fp32; decoder layers read from the memory-mapped shards one at a
    time); each graph is traced without weights and its weights are streamed into ``<file>.data``
    (``export/external.py``), and the references run the transformers modules at full depth with
    one layer loaded at a time. Same graphs, same parity checks and floors as ``export_policy``;
    weights are stored fp32 (a quantized decoder holds its own). ``generation`` bounds the
    completions of the quantized decoder's check (each decode step streams every layer).
    The returned parts' external data files are found with ``external.data_files``.
    """
    from conceptseg_edge.models.streamed import open_streamed_policy

    check_precision(precision, f"precision {precision!r}")
    source = open_streamed_policy(checkpoint)
    return _export_graphs(source.model, source.processor, Path(out_dir), opset, precision, "fp32", source, generation)


def _streamed(source, prefixes: Mapping[str, str], **contexts) -> StreamedWeights | None:
    """The ``StreamedWeights`` of a graph module whose parameter prefixes map to model names as ``prefixes``."""
    if source is None:
        return None

    def resolve(name: str) -> np.ndarray:
        for graph_prefix, model_prefix in prefixes.items():
            if name.startswith(graph_prefix):
                return source.weight(model_prefix + name.removeprefix(graph_prefix)).numpy()
        raise KeyError(name)

    return StreamedWeights(resolve, **contexts)


def _export_graphs(
    model,
    processor,
    out_dir: Path,
    opset: int,
    precision: str,
    weight_storage: str,
    source=None,
    generation: GenerationConfig = QUANT_PARITY_GENERATION,
) -> dict[str, PartManifest]:
    """The three graphs of ``model`` (fp32, eval); ``source`` (a ``StreamedPolicy``) streams them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = model.config.text_config
    d, layers = tcfg.hidden_size, tcfg.num_hidden_layers
    head_dim = getattr(tcfg, "head_dim", None) or d // tcfg.num_attention_heads
    vocab = model.lm_head.out_features
    ip = processor.image_processor
    patch_dim = 3 * ip.temporal_patch_size * ip.patch_size**2
    embed = model.get_input_embeddings()
    layer_weights = ({"tracing": source.placeholders, "reference": source.streaming} if source is not None else {})

    def export(module, spec, cases, reference, where: Path, storage: str, streamed) -> PartManifest:
        return export_and_validate(module.eval(), spec, cases, reference, REFERENCE_NAME, where, opset, storage, streamed)

    parts = {
        "policy_vision": export(VisionEncoderGraph(model.model.visual), policy_vision_spec(d, patch_dim),
                                vision_cases(processor), vision_reference(model), out_dir, weight_storage,
                                _streamed(source, {"visual.": "model.visual."})),
        "policy_embed": export(EmbedGraph(embed), policy_embed_spec(d), embed_cases(vocab), embed_reference(model),
                               out_dir, weight_storage,
                               _streamed(source, {"embed_tokens.": "model.language_model.embed_tokens."})),
    }
    decoder = (DecoderGraph(model.model.language_model, model.lm_head), policy_decoder_spec(d, layers, tcfg.num_key_value_heads, head_dim, vocab),
               decoder_cases(tcfg, layers, embed.weight.detach().numpy()), decoder_reference(model, layers))
    decoder_streamed = _streamed(source, {"lm.": "model.language_model.", "lm_head.": "lm_head."}, **layer_weights)
    if precision == "fp32":
        parts["policy_decoder"] = export(*decoder, out_dir, weight_storage, decoder_streamed)
        return parts
    with tempfile.TemporaryDirectory(prefix=".policy-export-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        fp32 = export(*decoder, tmp, "fp32", decoder_streamed)  # the quantizers read fp32 initializers
        quantized = quantize_part(fp32, tmp, out_dir, precision)
        processor.save_pretrained(str(tmp / "processor"))
        with layer_weights["reference"]() if source is not None else contextlib.nullcontext():
            report = quantized_decoder_parity(model, processor, out_dir, tmp / "processor", precision, generation)
    parts["policy_decoder"] = dataclasses.replace(quantized, quantized_parity=report)
    return parts


def quantized_decoder_parity(model, processor, graphs_dir: Path, processor_dir: Path, precision: str,
                             generation: GenerationConfig = QUANT_PARITY_GENERATION) -> QuantizedParity:
    """Measure the quantized decoder in ``graphs_dir`` (beside the vision and embedding graphs)
    against ``model`` on ``validation_prompts()``, through the torch-free runtime.

    Raises:
        ExportParityError: a measure is below its ``QUANT_FLOORS[precision]`` floor.
    """
    from conceptseg_edge.models.policy import PolicyWrapper
    from conceptseg_edge.runtime.engine import OrtEngine
    from conceptseg_edge.runtime.policy import OnnxPolicy
    from conceptseg_edge.runtime.policy_image import PolicyImageConfig
    from conceptseg_edge.runtime.policy_tokenizer import PolicyTokenizer

    graphs_dir = Path(graphs_dir)
    policy = OnnxPolicy(
        OrtEngine(graphs_dir / "policy_vision.onnx"),
        OrtEngine(graphs_dir / "policy_embed.onnx"),
        OrtEngine(graphs_dir / "policy_decoder.onnx"),
        PolicyTokenizer.from_dir(processor_dir),
        PolicyImageConfig.from_dir(processor_dir),
    )
    report = quantized_parity(PolicyWrapper(model, processor), policy, validation_prompts(), precision, generation)
    if not report.passed:
        measures = report.measures()
        measured = ", ".join(f"{k} {measures[k]:.4f} (floor {f})" for k, f in report.floors.items())
        raise ExportParityError(f"policy_decoder ({precision}): {measured} vs {REFERENCE_NAME}")
    return report
