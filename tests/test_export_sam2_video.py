"""SAM2 video path → ONNX: the three graphs against the sam2 package's own video-path methods.

A seeded SAM2.1-tiny at 128 px with its object-score head biased to say "present" (+8) is exported
in-process at fp32; the same weights biased to "absent" (-8) go through ``export sam2 --video`` on the
CLI with fp16 weight storage. Each graph is then run in ONNX Runtime and compared with what
``SAM2Base`` itself computes: ``_forward_sam_heads`` / ``_use_mask_as_output`` (decoder and pointers),
``_encode_new_memory`` (memory encoder) and ``_prepare_memory_conditioned_features`` on a memory bank
laid out by sam2's own rules (memory attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptseg_edge.errors import ExportError
from conceptseg_edge.export.onnx_export import graph_op_types
from conceptseg_edge.export.sam2_video import (
    PARTS,
    export_video_parts,
    memory_attention_reference,
    sam2_memory_attention_spec,
    video_predictor_flags,
)
from conceptseg_edge.manifest import PartManifest, load_bundle
from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model
from conceptseg_edge.runtime.engine import OrtEngine, open_engine, open_part

# Parts whose export this module tests; test_every_registered_part_is_tested checks the registry.
TESTED_PARTS = {"sam2_video_decoder", "sam2_memory_encoder", "sam2_memory_attention"}

SIZE = 128
GRID = SIZE // 16
NO_OBJ_SCORE = -1024.0  # sam2_base.NO_OBJ_SCORE: the masks of an absent object


@dataclass
class VideoExport:
    sam: torch.nn.Module  # the eager model the graphs were exported from (fp32 weights)
    features: dict[str, np.ndarray]  # encoder outputs on one image
    bundle: Path
    parts: dict[str, PartManifest]  # as the export returned them
    atol: float  # graph vs sam2 on features and pointers: fp32 or fp16 weight storage


def _seeded_sam(object_bias: float) -> torch.nn.Module:
    torch.manual_seed(0)
    sam = build_sam2_model("sam2.1_hiera_t", None, SIZE).model
    with torch.no_grad():  # stack-notes: a random head says "absent"; ±8 decides it either way
        sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias += object_bias
    return sam


def _features(sam: torch.nn.Module) -> dict[str, np.ndarray]:
    reference = SAM2Reference(sam)
    image = (np.random.default_rng(0).random((200, 300, 3)) * 255).astype(np.uint8)
    return {k: v.numpy() for k, v in reference.features(reference.preprocess(image)).items()}


@pytest.fixture(scope="module")
def present(tmp_path_factory) -> VideoExport:
    sam = _seeded_sam(+8.0)
    features = _features(sam)
    out = tmp_path_factory.mktemp("video_present")
    parts = export_video_parts(sam, features, out, opset=17)
    return VideoExport(sam, features, out, parts, atol=1e-4)


@pytest.fixture(scope="module")
def absent(tmp_path_factory) -> VideoExport:
    from conceptseg_edge.cli import main

    sam = _seeded_sam(-8.0)
    root = tmp_path_factory.mktemp("video_absent")
    torch.save({"model": sam.state_dict()}, root / "sam2.1_hiera_t.pt")
    out = root / "bundle"
    code = main(["export", "sam2", "--checkpoint", str(root / "sam2.1_hiera_t.pt"), "--image-size", str(SIZE),
                 "--weight-storage", "fp16", "--video", "--out", str(out)])
    assert code == 0
    return VideoExport(sam, _features(sam), out, load_bundle(out).parts, atol=1e-2)


def _run(export: VideoExport, part: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return OrtEngine(export.bundle / PARTS[part](SIZE).file).run(feeds)


def _torch_features(export: VideoExport, batch: int):
    t = {k: torch.from_numpy(v).expand(batch, -1, -1, -1) for k, v in export.features.items()}
    return t["image_embed"], [t["high_res_feats_0"], t["high_res_feats_1"]]


def _decoder_feeds(export: VideoExport, coords, labels, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    coords = np.asarray(coords, np.float32)
    batch = coords.shape[0]
    return {
        **export.features,
        "point_coords": coords,
        "point_labels": np.asarray(labels, np.int32),
        "concept_tokens": np.zeros((batch, 0, 256), np.float32),
        "mask_input": mask if mask is not None else np.zeros((batch, 1, SIZE, SIZE), np.float32),
        "has_mask_input": np.full((batch,), float(mask is not None), np.float32),
    }


def _disc(batch: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.broadcast_to(((yy - 0.4 * SIZE) ** 2 + (xx - 0.6 * SIZE) ** 2 < (0.2 * SIZE) ** 2).astype(np.float32), (batch, 1, SIZE, SIZE)).copy()


@pytest.mark.parametrize("which", ["present", "absent"])
def test_parity_is_recorded_and_within_tolerance(which, request):
    export: VideoExport = request.getfixturevalue(which)
    storage = "fp16" if which == "absent" else "fp32"
    for name, factory in PARTS.items():
        spec = factory(SIZE).with_storage(storage)
        part = export.parts[name]
        assert part.weight_storage == storage and part.parity.passed
        assert set(part.parity.max_abs_diff) == set(spec.output_names)
        assert all(part.parity.max_abs_diff[n] <= spec.atol[n] for n in spec.output_names)
    assert export.parts["sam2_video_decoder"].parity.mask_iou >= 0.99


@pytest.mark.parametrize("which", ["present", "absent"])
@pytest.mark.parametrize("multimask", [False, True])
def test_video_decoder_matches_forward_sam_heads(which, multimask, request):
    """Two objects batched (clicks; box + click): the pointer the runtime picks is sam2's, and so are
    the blanked masks and the object score."""
    export: VideoExport = request.getfixturevalue(which)
    coords = [[[60, 45], [30, 100], [0, 0]], [[15, 20], [90, 80], [0, 0]]]
    labels = [[1, 0, -1], [2, 3, -1]]
    got = _run(export, "sam2_video_decoder", _decoder_feeds(export, coords, labels, None))
    embed, high_res = _torch_features(export, 2)
    with torch.no_grad():
        _, _, _, low_res, _, obj_ptr, obj = export.sam._forward_sam_heads(
            backbone_features=embed,
            point_inputs={"point_coords": torch.tensor(coords, dtype=torch.float32)[:, :-1],  # sam2 pads itself
                          "point_labels": torch.tensor(labels, dtype=torch.int32)[:, :-1]},
            high_res_features=high_res, multimask_output=multimask,
        )
    present = got["object_score_logits"][:, 0] > 0
    assert present.all() == (which == "present") and present.any() == (which == "present")
    np.testing.assert_allclose(got["object_score_logits"], obj.numpy(), atol=export.atol)
    rows = 1 + got["iou_predictions"][:, 1:].argmax(1) if multimask else np.zeros(2, int)
    picked = got["obj_ptrs"][np.arange(2), rows]
    np.testing.assert_allclose(picked, obj_ptr.numpy(), atol=export.atol)
    if multimask:  # the single-mask output may be swapped by the stability fallback (runtime's numpy)
        masks = np.where(present[:, None, None], got["low_res_masks"][np.arange(2), rows], NO_OBJ_SCORE)
        np.testing.assert_allclose(masks, low_res[:, 0].numpy(), atol=10 * export.atol)


@pytest.mark.parametrize("which", ["present", "absent"])
def test_mask_prompt_pointer_matches_use_mask_as_output(which, request):
    """A full-resolution mask prompt (``add_new_mask``) gives ``_use_mask_as_output``'s pointer."""
    export: VideoExport = request.getfixturevalue(which)
    mask = _disc(1)
    # sam2 feeds its own padding point and the prompt encoder appends another: two (0, 0, -1) points.
    got = _run(export, "sam2_video_decoder", _decoder_feeds(export, [[[0, 0], [0, 0]]], [[-1, -1]], mask))
    embed, high_res = _torch_features(export, 1)
    embed = embed - export.sam.no_mem_embed.reshape(1, -1, 1, 1)  # sam2 hands it the raw backbone feature
    with torch.no_grad():
        out = export.sam._use_mask_as_output(embed, high_res, torch.from_numpy(mask))
        heads = export.sam._forward_sam_heads(backbone_features=embed, mask_inputs=export.sam.mask_downsample(torch.from_numpy(mask)),
                                              high_res_features=high_res)
    np.testing.assert_allclose(got["obj_ptrs"][:, 0], out[5].numpy(), atol=export.atol)
    np.testing.assert_allclose(got["object_score_logits"], heads[6].numpy(), atol=export.atol)


@pytest.mark.parametrize("which", ["present", "absent"])
def test_memory_encoder_matches_encode_new_memory(which, request):
    """The decoder's own logits (blanked when absent) → memory, binarised (prompted frame) and sigmoid (tracked)."""
    export: VideoExport = request.getfixturevalue(which)
    dec = _run(export, "sam2_video_decoder", _decoder_feeds(export, [[[60, 45], [0, 0]]] * 2, [[1, -1]] * 2, None))
    obj = dec["object_score_logits"]
    logits = np.where(obj[:, :, None, None] > 0, dec["low_res_masks"][:, :1], NO_OBJ_SCORE).astype(np.float32)
    from_prompt = np.array([1.0, 0.0], np.float32)
    got = _run(export, "sam2_memory_encoder", {"image_embed": export.features["image_embed"], "mask_logits": logits,
                                               "object_score_logits": obj, "mask_from_prompt": from_prompt})
    sam = export.sam
    raw = torch.from_numpy(export.features["image_embed"]) - sam.no_mem_embed.reshape(1, -1, 1, 1)
    want = []
    with torch.no_grad(), video_predictor_flags(sam):
        for b in range(2):
            high_res = F.interpolate(torch.from_numpy(logits[b : b + 1]), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
            features, _ = sam._encode_new_memory([raw.flatten(2).permute(2, 0, 1)], [(GRID, GRID)], high_res,
                                                 torch.from_numpy(obj[b : b + 1]), is_mask_from_pts=bool(from_prompt[b]))
            want.append(features.numpy())
    np.testing.assert_allclose(got["maskmem_features"], np.concatenate(want), atol=10 * export.atol)


def _bank_scenario(sam, frame_idx: int, cond_frames: set[int], num_frames: int, batch: int):
    """A memory bank as the video predictor holds it, ``_prepare_memory_conditioned_features``' output on
    it, and the graph's feeds chosen by the runtime's rules (the interface: cond frames at tpos
    num_maskmem-1, the frame t_rel before at t_rel-1; pointers at signed distance / t_diff_max)."""
    rng = torch.Generator().manual_seed(frame_idx)
    m, c = sam.mem_dim, sam.hidden_dim
    pos = sam.memory_encoder.position_encoding(torch.zeros(batch, m, GRID, GRID))
    bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    for t in range(frame_idx):
        kind = "cond_frame_outputs" if t in cond_frames else "non_cond_frame_outputs"
        bank[kind][t] = {"maskmem_features": torch.randn(batch, m, GRID, GRID, generator=rng), "maskmem_pos_enc": [pos],
                         "obj_ptr": torch.randn(batch, c, generator=rng)}
    n = sam.num_maskmem
    memories = [(n - 1, out) for out in bank["cond_frame_outputs"].values()]
    memories += [(t_rel - 1, bank["non_cond_frame_outputs"][frame_idx - t_rel])
                 for t_rel in range(1, n) if frame_idx - t_rel in bank["non_cond_frame_outputs"]]
    max_ptrs = min(num_frames, sam.max_obj_ptrs_in_encoder)
    pointers = [(frame_idx - t, out) for t, out in bank["cond_frame_outputs"].items()]
    pointers += [(d, bank["non_cond_frame_outputs"][frame_idx - d])
                 for d in range(1, max_ptrs) if frame_idx - d in bank["non_cond_frame_outputs"]]
    return bank, {
        "memory": torch.stack([out["maskmem_features"] for _, out in memories], 1).numpy(),
        "memory_tpos": np.array([t for t, _ in memories], np.int64),
        "obj_ptrs": torch.stack([out["obj_ptr"] for _, out in pointers], 1).numpy(),
        "obj_ptr_tpos": np.array([d / (max_ptrs - 1) for d, _ in pointers], np.float32),
    }


@pytest.mark.parametrize("frame_idx,cond_frames,batch", [(1, {0}, 1), (9, {0}, 1), (5, {0, 3}, 2)])
def test_memory_attention_matches_prepare_memory_conditioned_features(present, frame_idx, cond_frames, batch):
    """Nm = 1 / 7 / 5 memories, P = 1 / 9 / 5 pointers, one and two objects."""
    sam = present.sam
    bank, feeds = _bank_scenario(sam, frame_idx, cond_frames, num_frames=30, batch=batch)
    got = _run(present, "sam2_memory_attention", {"image_embed": present.features["image_embed"], **feeds})
    raw = torch.from_numpy(present.features["image_embed"]) - sam.no_mem_embed.reshape(1, -1, 1, 1)
    vision = raw.flatten(2).permute(2, 0, 1).expand(-1, batch, -1)
    vision_pos = sam.image_encoder.neck.position_encoding(torch.zeros(batch, 256, GRID, GRID)).flatten(2).permute(2, 0, 1)
    with torch.no_grad():
        want = sam._prepare_memory_conditioned_features(
            frame_idx=frame_idx, is_init_cond_frame=False, current_vision_feats=[vision],
            current_vision_pos_embeds=[vision_pos], feat_sizes=[(GRID, GRID)], output_dict=bank, num_frames=30,
        )
    np.testing.assert_allclose(got["image_embed_mem"], want.numpy(), atol=present.atol)


@pytest.mark.parametrize("batch,memories,pointers", [(1, 1, 1), (1, 3, 4), (2, 1, 4), (2, 3, 1)])
def test_memory_attention_dynamic_axes(present, batch, memories, pointers):
    rng = np.random.default_rng(batch * 100 + memories * 10 + pointers)
    feeds = {
        "image_embed": present.features["image_embed"],
        "memory": rng.standard_normal((batch, memories, 64, GRID, GRID)).astype(np.float32),
        "memory_tpos": rng.integers(0, 7, memories).astype(np.int64),
        "obj_ptrs": rng.standard_normal((batch, pointers, 256)).astype(np.float32),
        "obj_ptr_tpos": rng.uniform(-1, 1, pointers).astype(np.float32),
    }
    got = _run(present, "sam2_memory_attention", feeds)
    want = memory_attention_reference(present.sam)(feeds)
    assert got["image_embed_mem"].shape == (batch, 256, GRID, GRID)
    np.testing.assert_allclose(got["image_embed_mem"], want["image_embed_mem"], atol=present.atol)


def test_memory_attention_graph_is_real(present):
    """No complex tensors or ops anywhere in the RoPE graph, and none of the banned ops."""
    import onnx

    path = present.bundle / "sam2_memory_attention.onnx"
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    graph = model.graph
    elem_types = {v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    elem_types |= {t.data_type for t in graph.initializer}
    assert not elem_types & complex_types
    ops = graph_op_types(path)
    assert not ops & ({"DFT", "STFT"} | sam2_memory_attention_spec(SIZE).forbidden_ops)
    assert {"Sin", "Cos"} <= ops  # the pointers' temporal sine encoding is computed in the graph


def test_cli_bundle_parts_open_through_the_manifest(absent):
    manifest = load_bundle(absent.bundle)
    assert {"sam2_encoder", "sam2_decoder", *PARTS} <= set(manifest.parts)
    for name, factory in PARTS.items():
        engine = open_part(absent.bundle, manifest, name, "cpu", open_engine)
        assert [t.name for t in engine.inputs] == factory(SIZE).input_names
        assert manifest.part(name).inputs == factory(SIZE).inputs


def test_unsupported_model_flags_are_refused(present):
    from conceptseg_edge.models.sam2_video import SAM2VideoDecoder

    sam = present.sam
    sam.soft_no_obj_ptr = True
    try:
        with pytest.raises(ExportError, match="soft_no_obj_ptr"):
            SAM2VideoDecoder(sam)
    finally:
        sam.soft_no_obj_ptr = False
