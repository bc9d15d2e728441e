"""SAM2 → ONNX export: parity against sam2's own modules, graph hygiene, checkpoints, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptseg_edge.errors import CheckpointError, ExportParityError, InputError
from conceptseg_edge.export.onnx_export import graph_op_types
from conceptseg_edge.export.registry import FAMILIES, PART_REGISTRY
from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2, sam2_decoder_spec, sam2_encoder_spec
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.runtime.engine import OrtEngine

# Parts whose export this module tests; test_every_registered_part_is_tested checks the registry.
TESTED_PARTS = {"sam2_encoder", "sam2_decoder"}


def test_tiny_parity_is_recorded_and_within_tolerance(tiny_bundle):
    m = load_bundle(tiny_bundle)
    for name, spec in (("sam2_encoder", sam2_encoder_spec(512)), ("sam2_decoder", sam2_decoder_spec(512))):
        parity = m.part(name).parity
        assert parity.passed
        assert set(parity.max_abs_diff) == set(spec.output_names)
        for output, diff in parity.max_abs_diff.items():
            assert diff <= spec.atol[output]
    assert m.part("sam2_decoder").parity.mask_iou >= 0.99


@pytest.mark.slow
def test_larger_config_parity(tmp_path):
    """SAM2.1-small (a deeper trunk than tiny), at a reduced input size to keep CI fast."""
    m = export_sam2(SAM2ExportConfig("sam2.1_hiera_s", image_size=256), tmp_path / "small", progress=False)
    assert m.source.random_init and m.source.checkpoint_sha256 is None
    assert all(p.parity.passed for p in m.parts.values())
    assert m.part("sam2_encoder").outputs[0].shape == (1, 256, 16, 16)


def test_graphs_stay_tensorrt_parseable(tiny_bundle):
    ops = graph_op_types(tiny_bundle / "sam2_decoder.onnx")
    assert not ops & {"OneHot", "Tile", "Resize", "NonZero", "Greater", "Less"}
    assert not graph_op_types(tiny_bundle / "sam2_encoder.onnx") & {"OneHot", "NonZero"}


@pytest.mark.parametrize("batch,points,k", [(1, 0, 8), (1, 3, 0), (3, 2, 8), (2, 5, 1)])
def test_decoder_dynamic_axes(tiny_bundle, batch, points, k):
    """Batch, point count and concept-token count are dynamic, K = 0 and N = 0 included."""
    engine = OrtEngine(tiny_bundle / "sam2_decoder.onnx")
    rng = np.random.default_rng(0)
    feeds = {
        "image_embed": rng.standard_normal((1, 256, 32, 32)).astype(np.float32),
        "high_res_feats_0": rng.standard_normal((1, 32, 128, 128)).astype(np.float32),
        "high_res_feats_1": rng.standard_normal((1, 64, 64, 64)).astype(np.float32),
        "point_coords": rng.uniform(0, 512, (batch, points, 2)).astype(np.float32),
        "point_labels": np.ones((batch, points), np.int32),
        "concept_tokens": rng.standard_normal((batch, k, 256)).astype(np.float32),
        "mask_input": np.zeros((batch, 1, 128, 128), np.float32),
        "has_mask_input": np.zeros((batch,), np.float32),
    }
    out = engine.run(feeds)
    assert out["low_res_masks"].shape == (batch, 4, 128, 128)
    assert out["iou_predictions"].shape == (batch, 4)
    assert out["object_score_logits"].shape == (batch, 1)
    assert np.isfinite(out["low_res_masks"]).all()


def test_concept_tokens_change_the_mask(tiny_bundle):
    """The tokens really enter the decoder: different tokens, different logits."""
    engine = OrtEngine(tiny_bundle / "sam2_decoder.onnx")
    rng = np.random.default_rng(1)
    base = {
        "image_embed": rng.standard_normal((1, 256, 32, 32)).astype(np.float32),
        "high_res_feats_0": rng.standard_normal((1, 32, 128, 128)).astype(np.float32),
        "high_res_feats_1": rng.standard_normal((1, 64, 64, 64)).astype(np.float32),
        "point_coords": np.zeros((1, 0, 2), np.float32),
        "point_labels": np.zeros((1, 0), np.int32),
        "mask_input": np.zeros((1, 1, 128, 128), np.float32),
        "has_mask_input": np.zeros((1,), np.float32),
    }
    a = engine.run({**base, "concept_tokens": rng.standard_normal((1, 8, 256)).astype(np.float32)})
    b = engine.run({**base, "concept_tokens": rng.standard_normal((1, 8, 256)).astype(np.float32)})
    assert np.abs(a["low_res_masks"] - b["low_res_masks"]).max() > 1e-3


def test_checkpoint_mismatch_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"not.a.key": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="missing keys"):
        export_sam2(SAM2ExportConfig(checkpoint=str(bad), image_size=256), tmp_path / "b", progress=False)
    torch.save({"weights": {}}, bad)
    with pytest.raises(CheckpointError, match="'model' state dict"):
        export_sam2(SAM2ExportConfig(checkpoint=str(bad), image_size=256), tmp_path / "b", progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        export_sam2(SAM2ExportConfig(checkpoint=str(tmp_path / "none.pt"), image_size=256), tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_failed_parity_leaves_nothing_behind(tmp_path, monkeypatch):
    """A parity failure raises ExportParityError and leaves no bundle and no staging directory."""
    import dataclasses

    import conceptseg_edge.export.sam2 as sam2_export

    unreachable = lambda s: dataclasses.replace(sam2_decoder_spec(s), min_mask_iou=2.0)  # noqa: E731
    monkeypatch.setattr(sam2_export, "sam2_decoder_spec", unreachable)
    with pytest.raises(ExportParityError, match="mask IoU"):
        export_sam2(SAM2ExportConfig(image_size=256), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_non_bundle_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not a bundle"):
        export_sam2(SAM2ExportConfig(image_size=256), tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_every_registered_part_is_tested():
    import pathlib

    tested = set(TESTED_PARTS)
    for path in pathlib.Path(__file__).parent.glob("test_export_*.py"):
        text = path.read_text()
        tested |= {name for name in PART_REGISTRY if f'"{name}"' in text and "TESTED_PARTS" in text}
    assert set(PART_REGISTRY) <= tested, f"untested parts: {set(PART_REGISTRY) - tested}"


def test_registry_lists_every_family_once():
    """Each part name belongs to one family, and the registry is built from the families' own lists."""
    declared = [name for family in FAMILIES for name in family.PARTS]
    assert len(declared) == len(set(declared)) == len(PART_REGISTRY)
    assert set(PART_REGISTRY) == {"sam2_encoder", "sam2_decoder", "ctm", "policy_vision", "policy_embed", "policy_decoder",
                                  "sam2_video_decoder", "sam2_memory_encoder", "sam2_memory_attention",
                                  "sam3_vision", "sam3_text", "sam3_head"}
