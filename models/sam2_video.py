"""SAM2's video path in torch, as three exportable parts: video decoder, memory encoder, memory attention.

Imported by export only (never by the runtime). SAM2 tracks an object through a video by conditioning
each frame's features on a memory bank (``SAM2Base._prepare_memory_conditioned_features``), decoding
them with the image decoder (``_forward_sam_heads``) and encoding the result back into memory
(``_encode_new_memory``). The bank itself, and the rules choosing which memories a frame attends to,
live in the runtime; each graph here is one step of that loop with the bank passed in as tensors:

- ``SAM2VideoDecoder``: ``SAM2PromptDecoder`` plus the object pointer of each of the four mask tokens;
- ``SAM2MemoryEncoder``: a frame's features and chosen mask logits → its memory features;
- ``SAM2MemoryAttention``: a frame's features + Nm memories + P object pointers → the features the
  decoder reads. sam2 rotates queries and keys with complex multiplication (``apply_rotary_enc``),
  which no ONNX opset can express; here the same rotation is written with cos/sin tables.

Everything that depends only on the grid (positional encodings, the RoPE tables) is a constant buffer.
The encoder's ``image_embed`` already holds ``no_mem_embed`` (``SAM2ImageEncoder`` folds it in, as
``directly_add_no_mem_embed`` asks); the memory parts subtract it to recover the raw backbone
feature sam2 feeds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from conceptseg_edge.errors import ExportError
from conceptseg_edge.models.sam2 import SAM2PromptDecoder


def _require(sam: nn.Module, what: str, **flags: bool) -> None:
    """Refuse a SAM2 model whose flags take a branch these wrappers do not implement."""
    wrong = {name: getattr(sam, name) for name, want in flags.items() if bool(getattr(sam, name)) != want}
    if wrong:
        raise ExportError(f"{what}: SAM2 model flags {wrong} are not supported (every SAM 2.1 config has {flags})")


def _raw_feature(sam: nn.Module, image_embed: torch.Tensor) -> torch.Tensor:
    """The encoder's ``image_embed`` (1, C, g, g) minus ``no_mem_embed``: the backbone feature sam2 stores."""
    return image_embed - sam.no_mem_embed.reshape(1, -1, 1, 1)


class SAM2VideoDecoder(SAM2PromptDecoder):
    """``_forward_sam_heads`` on all four mask tokens: masks, IoUs, object score and object pointers.

    ``mask_input`` is a full-resolution (B, 1, s, s) mask prompt, brought to the decoder's mask size
    with ``sam.mask_downsample`` as ``_use_mask_as_output`` does. A row with a mask prompt decodes the
    raw backbone feature (``image_embed`` minus ``no_mem_embed``): ``_use_mask_as_output`` hands
    ``_forward_sam_heads`` the frame's feature without the no-memory embedding that point and box
    prompts on a first frame get. Each pointer is
    ``obj_ptr_proj(token)`` mixed with ``no_obj_ptr`` by the decoder's own object score
    (``fixed_no_obj_ptr``: a hard λ = score > 0); picking a row, and blanking the masks of an absent
    object, is left to the runtime like the choice between single and multimask output.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__(sam)
        _require(sam, "sam2_video_decoder", pred_obj_scores=True, fixed_no_obj_ptr=True, soft_no_obj_ptr=False,
                 use_obj_ptrs_in_encoder=True)
        self.mask_downsample = sam.mask_downsample
        self.obj_ptr_proj = sam.obj_ptr_proj
        self.no_obj_ptr = sam.no_obj_ptr
        self.no_mem_embed = sam.no_mem_embed

    def forward(  # type: ignore[override]
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        concept_tokens: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        gate = has_mask_input.reshape(-1, 1, 1, 1)
        image_embed = image_embed - gate * self.no_mem_embed.reshape(1, -1, 1, 1)
        masks, iou, object_score_logits, tokens = self.decode(
            image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, concept_tokens,
            self.mask_downsample(mask_input), has_mask_input,
        )
        appearing = (object_score_logits > 0).to(tokens.dtype).unsqueeze(-1)  # (B, 1, 1)
        obj_ptrs = appearing * self.obj_ptr_proj(tokens) + (1 - appearing) * self.no_obj_ptr
        return masks, iou, object_score_logits, obj_ptrs


class SAM2MemoryEncoder(nn.Module):
    """``_encode_new_memory`` for one frame: (image_embed, mask logits, object score) → memory features.

    The low-res logits are upsampled to the input size (bilinear, ``align_corners=False``, as
    ``_forward_sam_heads`` makes its high-res masks), turned into a mask by a per-row choice
    (``mask_from_prompt`` 1: binarised at 0, as the video predictor does for prompted frames with
    ``binarize_mask_from_pts_for_mem_enc``; 0: sigmoid), scaled and biased, encoded, and marked with
    ``no_obj_embed_spatial`` where the object is absent.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        _require(sam, "sam2_memory_encoder", directly_add_no_mem_embed=True, non_overlap_masks_for_mem_enc=False)
        self.sam = sam
        self.image_size = int(sam.image_size)

    def forward(
        self,
        image_embed: torch.Tensor,
        mask_logits: torch.Tensor,
        object_score_logits: torch.Tensor,
        mask_from_prompt: torch.Tensor,
    ) -> torch.Tensor:
        sam = self.sam
        batch = mask_logits.shape[0]
        pix_feat = _raw_feature(sam, image_embed).expand(batch, -1, -1, -1)
        high_res = F.interpolate(mask_logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        gate = mask_from_prompt.reshape(-1, 1, 1, 1)
        mask = gate * (high_res > 0).to(high_res.dtype) + (1 - gate) * torch.sigmoid(high_res)
        mask = mask * sam.sigmoid_scale_for_mem_enc + sam.sigmoid_bias_for_mem_enc
        features = sam.memory_encoder(pix_feat, mask, skip_mask_sigmoid=True)["vision_features"]
        if sam.no_obj_embed_spatial is not None:
            absent = 1 - (object_score_logits > 0).to(features.dtype)
            features = features + absent[..., None, None] * sam.no_obj_embed_spatial[..., None, None]
        return features


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_enc`` in real arithmetic, on the half-split layout of ``_half_split``.

    ``x``: (..., T, D) whose last axis holds a head's even components, then its odd ones; T is a
    multiple of cos/sin's (L, D/2) rows (keys over several memory frames repeat the table, as
    ``repeat_freqs_k``). Each (even, odd) pair is rotated by reading two contiguous halves: the
    interleaved layout would take strided gathers, which cost ORT more than the rotation itself.
    """
    *lead, tokens, dim = x.shape
    x = x.reshape(*lead, -1, cos.shape[0], dim)
    even, odd = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(*lead, tokens, dim)


def _half_split(proj: nn.Linear) -> nn.Linear:
    """``proj`` with its output channels reordered to each head's even ones, then its odd ones.

    Queries and keys get the same order, so q·k (a sum over channels) is unchanged and the values,
    which are not reordered, come out as sam2's; only where the rotation reads its pairs moves.
    """
    order = torch.cat([torch.arange(0, proj.out_features, 2), torch.arange(1, proj.out_features, 2)])
    out = nn.Linear(proj.in_features, proj.out_features, bias=proj.bias is not None)
    with torch.no_grad():
        out.weight.copy_(proj.weight[order])
        if proj.bias is not None:
            out.bias.copy_(proj.bias[order])
    return out


class SAM2MemoryAttention(nn.Module):
    """``_prepare_memory_conditioned_features`` from the point where memories are chosen.

    Inputs: the encoder's ``image_embed`` (1, C, g, g); ``memory`` (B, Nm, m, g, g) with
    ``memory_tpos`` (Nm,) int64 indices into ``maskmem_tpos_enc``; ``obj_ptrs`` (B, P, C) with
    ``obj_ptr_tpos`` (P,) float (signed frame distance / t_diff_max). Output (B, C, g, g):
    ``pix_feat_with_mem``. The layers are sam2's ``MemoryAttentionLayer`` arithmetic (eval mode, so
    no dropout) with RoPE from constant cos/sin tables; pointer tokens are projected apart from the
    memory tokens, which is how ``num_k_exclude_rope`` keeps them unrotated.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        from sam2.modeling.sam.transformer import RoPEAttention

        _require(sam, "sam2_memory_attention", directly_add_no_mem_embed=True, use_obj_ptrs_in_encoder=True,
                 add_tpos_enc_to_obj_ptrs=True, proj_tpos_enc_in_obj_ptrs=True)
        attention = sam.memory_attention
        if not attention.batch_first or any(
            not isinstance(a, RoPEAttention) for layer in attention.layers for a in (layer.self_attn, layer.cross_attn_image)
        ):
            raise ExportError("sam2_memory_attention: expected batch-first layers with RoPE self and cross attention")
        self.sam = sam
        self.attention = attention
        self.hidden_dim = int(sam.hidden_dim)
        self.mem_dim = int(sam.mem_dim)
        grid = int(sam.image_size) // 16
        with torch.no_grad():
            curr_pos = sam.image_encoder.neck.position_encoding(torch.zeros(1, self.hidden_dim, grid, grid))
            mem_pos = sam.memory_encoder.position_encoding(torch.zeros(1, self.mem_dim, grid, grid))
            tables = [
                torch.view_as_real(a.compute_cis(end_x=grid, end_y=grid))
                for layer in attention.layers for a in (layer.self_attn, layer.cross_attn_image)
            ]
        # Every RoPE module of a SAM2 config shares theta and head size: one table serves all.
        first = tables[0]
        if any(not torch.equal(t, first) for t in tables):
            raise ExportError("sam2_memory_attention: RoPE modules with different tables are not supported")
        self.register_buffer("curr_pos", curr_pos.flatten(2).transpose(1, 2).contiguous(), persistent=False)  # (1, HW, C)
        self.register_buffer("mem_pos", mem_pos.flatten(2).transpose(1, 2)[0].contiguous(), persistent=False)  # (HW, m)
        # Persistent, so the exporter writes each table once as an initializer: a non-persistent
        # buffer is inlined as a constant at every use (16 rotations: 128 MB of copies at 1024 px).
        self.register_buffer("rope_cos", first[..., 0].contiguous())  # (HW, D/2)
        self.register_buffer("rope_sin", first[..., 1].contiguous())
        if any(a.num_heads != 1 for layer in attention.layers for a in (layer.self_attn, layer.cross_attn_image)):
            raise ExportError("sam2_memory_attention: RoPE attention with more than one head is not supported")
        # Query and key projections in the half-split order ``_rotate`` reads, per layer: (self q, k, cross q, k).
        self.rotated = nn.ModuleList(
            nn.ModuleList(_half_split(p) for a in (layer.self_attn, layer.cross_attn_image) for p in (a.q_proj, a.k_proj))
            for layer in attention.layers
        )

    def _attend(self, attn: nn.Module, q_proj: nn.Linear, k_proj: nn.Linear, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, k_plain: torch.Tensor | None = None, v_plain: torch.Tensor | None = None) -> torch.Tensor:
        """``RoPEAttention.forward`` with one head: ``k``/``v`` tokens are rotated, ``k_plain``/``v_plain``
        (pointers) are not; ``q_proj``/``k_proj`` are the layer's, half-split."""
        q = _rotate(q_proj(q).unsqueeze(1), self.rope_cos, self.rope_sin)
        k = _rotate(k_proj(k).unsqueeze(1), self.rope_cos, self.rope_sin)
        v = attn.v_proj(v).unsqueeze(1)
        if k_plain is not None:
            k = torch.cat([k, k_proj(k_plain).unsqueeze(1)], dim=2)
            v = torch.cat([v, attn.v_proj(v_plain).unsqueeze(1)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return attn.out_proj(out.squeeze(1))

    def forward(
        self,
        image_embed: torch.Tensor,
        memory: torch.Tensor,
        memory_tpos: torch.Tensor,
        obj_ptrs: torch.Tensor,
        obj_ptr_tpos: torch.Tensor,
    ) -> torch.Tensor:
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        sam, attention = self.sam, self.attention
        batch, c, m = memory.shape[0], self.hidden_dim, self.mem_dim
        _, _, h, w = image_embed.shape
        curr = _raw_feature(sam, image_embed).flatten(2).transpose(1, 2).expand(batch, -1, -1)  # (B, HW, C)
        curr_pos = self.curr_pos
        # Memory tokens frame-major, as sam2 concatenates them: (B, Nm*HW, m), each frame's spatial
        # encoding plus its temporal one.
        mem = memory.flatten(3).transpose(2, 3).reshape(batch, -1, m)
        tpos = sam.maskmem_tpos_enc.reshape(-1, m)[memory_tpos]  # (Nm, m)
        mem_pos = (self.mem_pos.unsqueeze(0) + tpos.unsqueeze(1)).reshape(1, -1, m)
        # Each C-wide pointer becomes C/m tokens sharing its temporal encoding.
        split = c // m
        ptr = obj_ptrs.reshape(batch, -1, m)
        ptr_pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(obj_ptr_tpos, dim=c))  # (P, m)
        ptr_pos = ptr_pos.unsqueeze(1).expand(-1, split, -1).reshape(1, -1, m)

        output = curr + 0.1 * curr_pos if attention.pos_enc_at_input else curr
        for layer, (self_q, self_k, cross_q, cross_k) in zip(attention.layers, self.rotated):
            tgt = layer.norm1(output)
            q = tgt + curr_pos if layer.pos_enc_at_attn else tgt
            output = output + self._attend(layer.self_attn, self_q, self_k, q, q, tgt)
            tgt = layer.norm2(output)
            q = tgt + curr_pos if layer.pos_enc_at_cross_attn_queries else tgt
            keys = layer.pos_enc_at_cross_attn_keys
            output = output + self._attend(
                layer.cross_attn_image, cross_q, cross_k, q,
                mem + mem_pos if keys else mem, mem,
                ptr + ptr_pos if keys else ptr, ptr,
            )
            output = output + layer.linear2(layer.activation(layer.linear1(layer.norm3(output))))
        output = attention.norm(output)
        return output.transpose(1, 2).reshape(batch, c, h, w)
