"""The SAM2 video family: specs, parity cases and references of the three video-path parts.

``export sam2 --video`` (and ``export concept --video``) add these graphs to a bundle beside the
image encoder and decoder; the runtime's tracker keeps the memory bank and runs them per frame:

- ``sam2_video_decoder``: the prompt decoder on memory-conditioned features, plus object pointers;
- ``sam2_memory_encoder``: a frame's features and chosen mask → its memory features;
- ``sam2_memory_attention``: a frame's features conditioned on Nm memories and P object pointers.

The export-time modules are in ``models/sam2_video.py``. The references call the sam2 package's own
modules the way ``SAM2Base`` does (``predict_masks`` + ``obj_ptr_proj``, ``_encode_new_memory``,
``memory_attention`` with its complex RoPE), so they share no code with the wrappers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from conceptseg_edge.export.onnx_export import Feeds, Reference, export_and_validate
from conceptseg_edge.export.parts import FEATURE_ATOL, LOGIT_ATOL, MASK_IOU_FLOOR, SCORE_ATOL, PartFactory, PartSpec
from conceptseg_edge.manifest import PartManifest, TensorSpec

C = 256  # SAM2's hidden (prompt / transformer) width
MEM_DIM = 64  # SAM2's memory width (mem_dim) in every SAM 2.1 config
FEATURES = ("image_embed", "high_res_feats_0", "high_res_feats_1")

DECODER_REFERENCE = "sam2 package modules, torch eager (mask_downsample / predict_masks / obj_ptr_proj / no_obj_ptr)"
ENCODER_REFERENCE = "sam2 package modules, torch eager (SAM2Base._encode_new_memory, video predictor flags)"
ATTENTION_REFERENCE = "sam2 package modules, torch eager (memory_attention with complex RoPE, maskmem_tpos_enc, get_1d_sine_pe)"

# Ops no video part may hold: TensorRT refuses OneHot/Tile on shape tensors, NonZero is data-dependent.
_FORBIDDEN = frozenset({"OneHot", "Tile", "NonZero"})


def sam2_video_decoder_spec(image_size: int) -> PartSpec:
    s, g = image_size, image_size // 16
    return PartSpec(
        name="sam2_video_decoder",
        file="sam2_video_decoder.onnx",
        inputs=(
            TensorSpec("image_embed", "float32", (1, C, g, g)),
            TensorSpec("high_res_feats_0", "float32", (1, 32, s // 4, s // 4)),
            TensorSpec("high_res_feats_1", "float32", (1, 64, s // 8, s // 8)),
            TensorSpec("point_coords", "float32", ("batch", "num_points", 2)),
            TensorSpec("point_labels", "int32", ("batch", "num_points")),
            TensorSpec("concept_tokens", "float32", ("batch", "num_concept_tokens", C)),
            TensorSpec("mask_input", "float32", ("batch", 1, s, s)),
            TensorSpec("has_mask_input", "float32", ("batch",)),
        ),
        outputs=(
            TensorSpec("low_res_masks", "float32", ("batch", 4, s // 4, s // 4)),
            TensorSpec("iou_predictions", "float32", ("batch", 4)),
            TensorSpec("object_score_logits", "float32", ("batch", 1)),
            TensorSpec("obj_ptrs", "float32", ("batch", 4, C)),
        ),
        atol={"low_res_masks": LOGIT_ATOL, "iou_predictions": SCORE_ATOL, "object_score_logits": SCORE_ATOL,
              "obj_ptrs": FEATURE_ATOL},
        forbidden_ops=_FORBIDDEN | {"Resize"},
        min_mask_iou=MASK_IOU_FLOOR,
    )


def sam2_memory_encoder_spec(image_size: int, mem_dim: int = MEM_DIM) -> PartSpec:
    s, g = image_size, image_size // 16
    return PartSpec(
        name="sam2_memory_encoder",
        file="sam2_memory_encoder.onnx",
        inputs=(
            TensorSpec("image_embed", "float32", (1, C, g, g)),
            TensorSpec("mask_logits", "float32", ("batch", 1, s // 4, s // 4)),
            TensorSpec("object_score_logits", "float32", ("batch", 1)),
            TensorSpec("mask_from_prompt", "float32", ("batch",)),
        ),
        outputs=(TensorSpec("maskmem_features", "float32", ("batch", mem_dim, g, g)),),
        atol={"maskmem_features": FEATURE_ATOL},
        forbidden_ops=_FORBIDDEN,
    )


def sam2_memory_attention_spec(image_size: int, mem_dim: int = MEM_DIM) -> PartSpec:
    g = image_size // 16
    return PartSpec(
        name="sam2_memory_attention",
        file="sam2_memory_attention.onnx",
        inputs=(
            TensorSpec("image_embed", "float32", (1, C, g, g)),
            TensorSpec("memory", "float32", ("batch", "num_memories", mem_dim, g, g)),
            TensorSpec("memory_tpos", "int64", ("num_memories",)),
            TensorSpec("obj_ptrs", "float32", ("batch", "num_obj_ptrs", C)),
            TensorSpec("obj_ptr_tpos", "float32", ("num_obj_ptrs",)),
        ),
        outputs=(TensorSpec("image_embed_mem", "float32", ("batch", C, g, g)),),
        atol={"image_embed_mem": FEATURE_ATOL},
        forbidden_ops=_FORBIDDEN | {"Resize"},
    )


#: This family's parts, for ``export/registry.py``.
PARTS: dict[str, PartFactory] = {
    "sam2_video_decoder": sam2_video_decoder_spec,
    "sam2_memory_encoder": sam2_memory_encoder_spec,
    "sam2_memory_attention": sam2_memory_attention_spec,
}


# --- parity cases: the richest case first (it is the one traced), then the edges of each dynamic axis


def video_decoder_cases(features: Mapping[str, np.ndarray], image_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Batch 1 and 2, clicks / box + clicks / concept tokens / a full-resolution mask prompt."""
    rng = np.random.default_rng(seed)
    s = image_size
    yy, xx = np.mgrid[:s, :s]
    disc = ((yy - 0.4 * s) ** 2 + (xx - 0.6 * s) ** 2 < (0.2 * s) ** 2).astype(np.float32)

    def case(points: list[tuple[float, float, int]], batch: int, k: int, masks: list[bool]) -> dict[str, np.ndarray]:
        coords = np.array([[p[:2] for p in points]] * batch, np.float32).reshape(batch, len(points), 2) * s
        return {
            **features,
            "point_coords": coords,
            "point_labels": np.array([[p[2] for p in points]] * batch, np.int32).reshape(batch, len(points)),
            "concept_tokens": rng.standard_normal((batch, k, C)).astype(np.float32),
            "mask_input": np.stack([disc if m else np.zeros_like(disc) for m in masks])[:, None],
            "has_mask_input": np.array(masks, np.float32),
        }

    pad = (0.0, 0.0, -1)  # SAM2 appends one padding point to every point/box prompt
    return [
        case([(0.2, 0.2, 2), (0.7, 0.8, 3), (0.5, 0.5, 1), pad], 2, 8, [False, True]),  # box + click, concept, mask
        case([(0.4, 0.5, 1), pad], 1, 0, [False]),  # one click
        case([pad, pad], 1, 0, [True]),  # a mask prompt alone: ``_use_mask_as_output``'s point + the encoder's pad
    ]


def memory_encoder_cases(features: Mapping[str, np.ndarray], image_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Present and absent objects, sigmoid and binarised masks, batch 1 and 3.

    Logits are multiples of 0.5: bilinear upsampling by 4 then lands on exact binary fractions in
    both torch and ONNX Runtime, so no pixel sits within rounding of the binarisation threshold.
    """
    rng = np.random.default_rng(seed)
    low = image_size // 4
    image_embed = {"image_embed": features["image_embed"]}

    def logits(batch: int) -> np.ndarray:
        return (np.round(rng.standard_normal((batch, 1, low, low)) * 8) / 2).astype(np.float32)

    absent = logits(1)
    absent[:] = -1024.0  # what the runtime feeds for an absent object (``NO_OBJ_SCORE``)
    return [
        {**image_embed, "mask_logits": np.concatenate([logits(2), absent]),
         "object_score_logits": np.array([[3.0], [2.0], [-4.0]], np.float32),
         "mask_from_prompt": np.array([1.0, 0.0, 0.0], np.float32)},
        {**image_embed, "mask_logits": logits(1), "object_score_logits": np.array([[1.5]], np.float32),
         "mask_from_prompt": np.array([1.0], np.float32)},
        {**image_embed, "mask_logits": logits(1), "object_score_logits": np.array([[-0.5]], np.float32),
         "mask_from_prompt": np.array([0.0], np.float32)},
    ]


def memory_attention_cases(features: Mapping[str, np.ndarray], image_size: int, mem_dim: int = MEM_DIM,
                           seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Nm = 3 and 1 memories, P = 4 and 1 pointers, batch 2 and 1, tpos as the runtime builds them."""
    rng = np.random.default_rng(seed)
    g = image_size // 16

    def case(batch: int, memory_tpos: list[int], obj_ptr_tpos: list[float]) -> dict[str, np.ndarray]:
        return {
            "image_embed": features["image_embed"],
            "memory": rng.standard_normal((batch, len(memory_tpos), mem_dim, g, g)).astype(np.float32),
            "memory_tpos": np.array(memory_tpos, np.int64),
            "obj_ptrs": rng.standard_normal((batch, len(obj_ptr_tpos), C)).astype(np.float32),
            "obj_ptr_tpos": np.array(obj_ptr_tpos, np.float32),
        }

    return [
        case(2, [6, 1, 0], [3 / 15, 1 / 15, 2 / 15, -4 / 15]),  # a cond frame + the two latest, signed distances
        case(1, [6], [1 / 15]),  # the first tracked frame: the prompted frame only
        case(1, [6, 6, 0], [0.0, 2 / 15, 1 / 15, 1.0]),
    ]


# --- references: the sam2 package's own modules, called as SAM2Base calls them


@contextmanager
def video_predictor_flags(sam) -> Iterator[None]:
    """``build_sam2_video_predictor``'s ``binarize_mask_from_pts_for_mem_enc=true``, for the duration."""
    before = sam.binarize_mask_from_pts_for_mem_enc
    sam.binarize_mask_from_pts_for_mem_enc = True
    try:
        yield
    finally:
        sam.binarize_mask_from_pts_for_mem_enc = before


def _vision_feats(sam, image_embed):
    """The encoder's (1, C, g, g) ``image_embed`` as sam2's ``current_vision_feats[-1]``: (HW, 1, C), no no_mem_embed."""
    import torch

    raw = torch.from_numpy(image_embed) - sam.no_mem_embed.reshape(1, -1, 1, 1)
    return raw.flatten(2).permute(2, 0, 1)


def video_decoder_reference(sam) -> Reference:
    """``predict_masks`` on the downsampled mask prompt, pointers as ``_forward_sam_heads`` makes them."""
    import torch

    from conceptseg_edge.models.sam2 import SAM2Reference

    reference = SAM2Reference(sam)

    @torch.no_grad()
    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        feats = {k: torch.from_numpy(feeds[k]) for k in FEATURES}
        gate = torch.from_numpy(feeds["has_mask_input"]).reshape(-1, 1, 1, 1)
        # predict_masks takes one mask for all rows or none: a row without a mask gets no_mask_embed,
        # which is what the prompt encoder adds for ``masks=None``; rows are decoded one by one.
        # A row with a mask prompt decodes the raw feature, as ``_use_mask_as_output`` does.
        raw = {**feats, "image_embed": feats["image_embed"] - sam.no_mem_embed.reshape(1, -1, 1, 1)}
        rows = []
        for b in range(gate.shape[0]):
            mask = sam.mask_downsample(torch.from_numpy(feeds["mask_input"][b : b + 1])) if gate[b] > 0 else None
            rows.append(reference.decode_all_tokens(
                feats if mask is None else raw, torch.from_numpy(feeds["point_coords"][b : b + 1]), torch.from_numpy(feeds["point_labels"][b : b + 1]),
                torch.from_numpy(feeds["concept_tokens"][b : b + 1]), mask,
            ))
        masks, iou, obj, tokens = (torch.cat(parts) for parts in zip(*rows))
        obj_ptr = sam.obj_ptr_proj(tokens)
        appearing = (obj > 0).float()[:, None]  # _forward_sam_heads: hard lambda, fixed_no_obj_ptr
        obj_ptr = appearing * obj_ptr + (1 - appearing) * sam.no_obj_ptr
        return {"low_res_masks": masks.numpy(), "iou_predictions": iou.numpy(),
                "object_score_logits": obj.numpy(), "obj_ptrs": obj_ptr.numpy()}

    return run


def memory_encoder_reference(sam) -> Reference:
    """``SAM2Base._encode_new_memory`` row by row (``is_mask_from_pts`` is one bool per call)."""
    import torch
    import torch.nn.functional as F

    size, grid = sam.image_size, sam.image_size // 16

    @torch.no_grad()
    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        vision = _vision_feats(sam, feeds["image_embed"])
        rows = []
        with video_predictor_flags(sam):
            for b, from_prompt in enumerate(feeds["mask_from_prompt"]):
                high_res = F.interpolate(torch.from_numpy(feeds["mask_logits"][b : b + 1]), size=(size, size),
                                         mode="bilinear", align_corners=False)
                features, _ = sam._encode_new_memory(
                    current_vision_feats=[vision], feat_sizes=[(grid, grid)], pred_masks_high_res=high_res,
                    object_score_logits=torch.from_numpy(feeds["object_score_logits"][b : b + 1]),
                    is_mask_from_pts=bool(from_prompt > 0.5),
                )
                rows.append(features)
        return {"maskmem_features": torch.cat(rows).numpy()}

    return run


def memory_attention_reference(sam) -> Reference:
    """``memory_attention`` on memories and pointers laid out as ``_prepare_memory_conditioned_features`` lays them."""
    import torch

    from sam2.modeling.sam2_utils import get_1d_sine_pe

    grid, c, m = sam.image_size // 16, sam.hidden_dim, sam.mem_dim

    @torch.no_grad()
    def run(feeds: Feeds) -> dict[str, np.ndarray]:
        memory = torch.from_numpy(feeds["memory"])
        batch = memory.shape[0]
        curr = _vision_feats(sam, feeds["image_embed"]).expand(-1, batch, -1)
        curr_pos = sam.image_encoder.neck.position_encoding(torch.zeros(batch, c, grid, grid)).flatten(2).permute(2, 0, 1)
        mem_pos = sam.memory_encoder.position_encoding(torch.zeros(batch, m, grid, grid)).flatten(2).permute(2, 0, 1)
        to_cat, to_cat_pos = [], []
        for i, tpos in enumerate(feeds["memory_tpos"]):
            to_cat.append(memory[:, i].flatten(2).permute(2, 0, 1))
            to_cat_pos.append(mem_pos + sam.maskmem_tpos_enc[int(tpos)])
        obj_ptrs = torch.from_numpy(feeds["obj_ptrs"]).transpose(0, 1)  # (P, B, C)
        obj_pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(torch.from_numpy(feeds["obj_ptr_tpos"]), dim=c))
        obj_pos = obj_pos.unsqueeze(1).expand(-1, batch, m)
        obj_ptrs = obj_ptrs.reshape(-1, batch, c // m, m).permute(0, 2, 1, 3).flatten(0, 1)
        obj_pos = obj_pos.repeat_interleave(c // m, dim=0)
        out = sam.memory_attention(
            curr=[curr], curr_pos=[curr_pos],
            memory=torch.cat([*to_cat, obj_ptrs]), memory_pos=torch.cat([*to_cat_pos, obj_pos]),
            num_obj_ptr_tokens=obj_ptrs.shape[0],
        )
        return {"image_embed_mem": out.permute(1, 2, 0).reshape(batch, c, grid, grid).numpy()}

    return run


def export_video_parts(sam, features: Mapping[str, np.ndarray], staging: Path, opset: int,
                       weight_storage: str = "fp32") -> dict[str, PartManifest]:
    """Export and validate the three video parts of ``sam`` into ``staging``.

    ``features``: the encoder's outputs on one image (numpy, as ``SAM2Reference.features``), the
    parity cases' image side. Returns the parts' manifests by name.
    """
    from conceptseg_edge.models.sam2_video import SAM2MemoryAttention, SAM2MemoryEncoder, SAM2VideoDecoder

    size, mem_dim = int(sam.image_size), int(sam.mem_dim)
    jobs = (
        (SAM2VideoDecoder, sam2_video_decoder_spec(size), video_decoder_cases(features, size),
         video_decoder_reference, DECODER_REFERENCE),
        (SAM2MemoryEncoder, sam2_memory_encoder_spec(size, mem_dim), memory_encoder_cases(features, size),
         memory_encoder_reference, ENCODER_REFERENCE),
        (SAM2MemoryAttention, sam2_memory_attention_spec(size, mem_dim), memory_attention_cases(features, size, mem_dim),
         memory_attention_reference, ATTENTION_REFERENCE),
    )
    return {
        spec.name: export_and_validate(wrapper(sam).eval(), spec, cases, reference(sam), name, staging, opset, weight_storage)
        for wrapper, spec, cases, reference, name in jobs
    }
