"""`export concept`: the CTM graph, the assembled concept bundle, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.export.concept import ConceptExportConfig, export_concept
from conceptseg_edge.export.ctm import ctm_spec, export_ctm
from conceptseg_edge.export.parts import WEIGHT_STORAGES
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.models.checkpoint import load_checkpoint
from conceptseg_edge.runtime.engine import OrtEngine
from conceptseg_edge.runtime.segmenter import ConceptSegmenter

TESTED_PARTS = {"ctm"}


def test_ctm_graph_matches_torch_for_any_completion_length(concept_bundle, concept_checkpoint):
    m = load_bundle(concept_bundle)
    part = m.part("ctm")
    assert part.parity.passed and part.parity.max_abs_diff["concept_tokens"] <= ctm_spec(128).atol["concept_tokens"]
    assert part.inputs[0].shape == (1, "completion_len", 128) and part.outputs[0].shape == (1, 8, 256)
    engine = OrtEngine(concept_bundle / part.file)
    ctm = load_checkpoint(concept_checkpoint).ctm
    for t in (1, 5, 64):
        hidden = np.random.default_rng(t).standard_normal((1, t, 128)).astype(np.float32)
        with torch.no_grad():
            want = ctm(torch.from_numpy(hidden)).numpy()
        np.testing.assert_allclose(engine.run({"hidden_states": hidden})["concept_tokens"], want, atol=1e-4)


def test_query_past_the_context_limit_is_refused(concept_bundle):
    seg = ConceptSegmenter.from_bundle(concept_bundle)
    limit = seg.concepts.policy.tokenizer.max_length
    assert limit == 32768  # tokenizer_config.json's model_max_length
    image = np.zeros((64, 64, 3), np.uint8)
    too_long = "1" * (limit + 10)  # the tiny tokenizer spends one token per digit
    for route in ("shortcut", "reason"):
        with pytest.raises(InputError, match="past the policy's context limit of 32768"):
            seg.segment(image, query=too_long, route=route)


def test_refusals(tmp_path):
    with pytest.raises(InputError, match="--policy-precision fp16"):
        ConceptExportConfig(str(tmp_path), policy_precision="fp16")
    with pytest.raises(InputError, match="--weight-storage int8"):
        ConceptExportConfig(str(tmp_path), weight_storage="int8")
    with pytest.raises(CheckpointError):
        export_concept(ConceptExportConfig(str(tmp_path / "missing")), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_ctm_with_fp16_storage_halves_and_stays_within_tolerance(concept_checkpoint, tmp_path):
    ctm = load_checkpoint(concept_checkpoint).ctm
    parts = {}
    for storage in ("fp32", "fp16"):
        (tmp_path / storage).mkdir()
        parts[storage] = export_ctm(ctm, tmp_path / storage, 17, storage)
    sizes = {s: (tmp_path / s / p.file).stat().st_size for s, p in parts.items()}
    assert sizes["fp16"] <= 0.6 * sizes["fp32"]
    half = parts["fp16"]
    assert half.weight_storage == "fp16" and half.parity.passed
    assert half.parity.atol["concept_tokens"] == ctm_spec(128).atol["concept_tokens"] * WEIGHT_STORAGES["fp16"].atol_scale
    engine = OrtEngine(tmp_path / "fp16" / half.file)
    hidden = np.random.default_rng(3).standard_normal((1, 9, 128)).astype(np.float32)
    with torch.no_grad():
        want = ctm(torch.from_numpy(hidden)).numpy()
    got = engine.run({"hidden_states": hidden})["concept_tokens"]
    assert np.abs(got - want).max() <= half.parity.atol["concept_tokens"]


@pytest.mark.slow
def test_concept_bundle_with_fp16_storage(concept_checkpoint, tmp_path):
    """The whole concept export with fp16 storage: SAM2 and CTM parts halved, routes still match torch."""
    from conceptseg_edge.export.concept import ROUTE_IOU_FLOOR

    m = export_concept(ConceptExportConfig(str(concept_checkpoint), weight_storage="fp16"), tmp_path / "b", progress=False)
    storage = {name: p.weight_storage for name, p in m.parts.items()}
    assert storage["sam2_encoder"] == storage["sam2_decoder"] == storage["ctm"] == "fp16"
    assert all(p.parity.passed for p in m.parts.values() if p.parity)
    assert all(v["min_mask_iou"] >= ROUTE_IOU_FLOOR for v in m.route_parity.values())
