"""The official release end to end on SAM 3 (P12 item 4): a checkpoint in the release layout (no
``conceptseg_edge`` section: CTM config inferred from the shapes, no backbone recorded) whose CTM
emits 256-d tokens, exported with ``export concept --backbone sam3_small`` without retraining, then
served by ``segment`` on each route, ``bench --route all`` and the Triton python flavor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.cli import main
from conceptseg_edge.export.concept import ROUTE_IOU_FLOOR
from conceptseg_edge.manifest import load_bundle

SLOTS = 8  # the CTM's queries: the head gets one slot per concept token


@pytest.fixture(scope="module")
def sam3_release(tmp_path_factory) -> tuple[Path, Path]:
    """(release directory, small SAM 3 weights): tiny policy + CTM saved as released, and a seeded sam3_small.pt."""
    from conceptseg_edge.benchmarks.scale_sam3 import save_sam3_release

    return save_sam3_release(tmp_path_factory.mktemp("sam3_release"))


@pytest.fixture(scope="module")
def sam3_bundle(tmp_path_factory, sam3_release) -> Path:
    release, weights = sam3_release
    out = tmp_path_factory.mktemp("sam3_bundle") / "bundle"
    assert main(["export", "concept", str(release), "--backbone", "sam3_small", "--backbone-checkpoint", str(weights),
                 "--out", str(out)]) == 0
    return out


def test_release_exports_with_sam3_and_matches_torch(sam3_bundle, sam3_release):
    """Policy parts, the CTM and the SAM 3 parts in one bundle; both routes reproduce the torch pipeline
    (``Sam3ConceptPipeline``) on partial masks, as the export measured and recorded."""
    m = load_bundle(sam3_bundle)
    assert {"sam3_vision", "sam3_text", "sam3_head", "ctm", "policy_decoder"} <= set(m.parts)
    assert not {"sam2_encoder", "sam2_decoder"} & set(m.parts)
    assert m.routes == ("shortcut", "reason") and m.source.model == "conceptseg(sam3_small)"
    assert m.source.backbone_checkpoint == str(sam3_release[1])
    head = m.part("sam3_head")
    assert head.inputs[5].name == "concept_tokens" and head.inputs[5].shape == (1, SLOTS, 256)
    for route in ("shortcut", "reason"):
        parity = m.route_parity[route]
        assert parity["samples"] >= 1 and parity["min_mask_iou"] >= ROUTE_IOU_FLOOR, parity


def test_release_without_backbone_is_still_refused(sam3_release, tmp_path):
    from conceptseg_edge.errors import CheckpointError
    from conceptseg_edge.export.concept import ConceptExportConfig, export_concept

    with pytest.raises(CheckpointError, match="SAM 3"):
        export_concept(ConceptExportConfig(str(sam3_release[0])), tmp_path / "out", progress=False)


def test_segment_on_each_route_matches_torch(sam3_bundle, sam3_release, tmp_path, capsys):
    """``segment`` (the CLI) on each route vs ``Sam3ConceptPipeline``, on images whose runtime mask is partial."""
    import torch
    from PIL import Image

    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.export.concept import coverage_class, parity_images
    from conceptseg_edge.export.sam3_pipeline import Sam3ConceptPipeline
    from conceptseg_edge.metrics import iou
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    # both sides route with the release's thresholds (the manifest's), so a rejected shortcut falls back alike
    seg = ConceptSegmenter.from_bundle(sam3_bundle)  # as `segment` loads it
    assert type(seg).__name__ == "Sam3Segmenter" and set(seg.providers()) >= {"sam3_vision", "sam3_head", "ctm"}
    pipe = Sam3ConceptPipeline.from_checkpoint(sam3_release[0], "sam3_small", str(sam3_release[1]), dtype=torch.float32)
    routes = set()
    for route in ("shortcut", "reason"):  # an image where this route's mask covers part of it
        ep, image = next((ep, im) for ep, im in parity_images(ConceptWorld(seed=1234, image_size=256), 12)
                         if coverage_class(seg.segment(im, query=ep.query, route=route).mask) == "partial")
        Image.fromarray(image).save(tmp_path / "image.png")
        capsys.readouterr()
        assert main(["segment", str(sam3_bundle), str(tmp_path / "image.png"), "--concept", ep.query, "--route", route,
                     "--out", str(tmp_path / "mask.png"), "--no-bank", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        got = np.asarray(Image.open(tmp_path / "mask.png")) > 0
        want = pipe(image, query=ep.query, route=route)
        assert report["route"] == want.route and iou(got, want.mask) >= ROUTE_IOU_FLOOR
        assert abs(report["object_score"] - want.object_score) < 1e-3 and report["completion"] == want.completion, report
        assert report["providers"]["decoder"] == "CPUExecutionProvider"
        routes.add(report["route"])
    assert "reason" in routes


def test_bench_all_routes_records_providers(sam3_bundle, tmp_path, capsys):
    """``bench --route all --compare-torch`` on the SAM 3 bundle: both routes timed on ORT, torch beside them."""
    out = tmp_path / "bench.json"
    assert main(["bench", str(sam3_bundle), "--route", "all", "--compare-torch", "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["routes"]) == {"shortcut", "reason"} and set(report["torch"]) == {"shortcut", "reason"}
    assert report["providers"]["sam3_vision"] == report["providers"]["sam3_head"] == "CPUExecutionProvider"
    assert {"ctm", "policy_decoder", "sam3_text"} <= set(report["providers"])
    assert report["ratio_runtime_over_torch_p50"].keys() == {"shortcut", "reason"}
    assert "shortcut" in capsys.readouterr().out


@pytest.mark.slow
def test_triton_python_flavor_serves_sam3(sam3_bundle, tmp_path):
    """The python flavor on the real tritonserver: both routes equal the in-process runtime."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.generation import GenerationConfig
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter
    from conceptseg_edge.serve.client import TritonSegClient
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository
    from conceptseg_edge.serve.server import TritonServer, find_tritonserver

    find_tritonserver()  # the suite has one (system or the nvidia-pytriton wheel); a missing one fails here
    generation = GenerationConfig(max_new_tokens=8)
    build_repository(sam3_bundle, tmp_path / "repo", RepositoryConfig(flavor="python", device="cpu", generation=generation))
    runtime = ConceptSegmenter.from_bundle(sam3_bundle, generation=generation)
    ep = ConceptWorld(seed=5, image_size=128).episode(0, with_supports=False)
    with TritonServer(tmp_path / "repo", log_path=tmp_path / "server.log", startup_timeout=300) as srv, \
            TritonSegClient(srv.http_url) as client:
        for route in ("shortcut", "reason", "auto"):
            expected = runtime.segment(ep.image, query=ep.query, route=route)
            got = client.segment(ep.image, query=ep.query, route=route)
            assert (got.route, got.reason, got.completion) == (expected.route, expected.reason, expected.completion)
            assert np.array_equal(got.mask, expected.mask), route


def test_qdq_quantizes_a_sam3_part(sam3_bundle, tmp_path):
    """``export qdq`` takes SAM 3's parts: the vision encoder quantized alone, measured end to end on both routes."""
    from conceptseg_edge.export.qdq import QdqConfig, export_qdq

    m = export_qdq(sam3_bundle, tmp_path / "int8", QdqConfig("int8", "world:3", 2, parts=("sam3_vision",)), progress=False)
    record = m.part("sam3_vision").qdq
    assert record.held_out_samples == 4 and "shortcut, reason" in record.held_out  # 2 images x both routes
    assert record.mask_iou is not None and record.passed == (record.mask_iou >= 0.90)
    assert m.part("sam3_head").precision == "fp32" and m.part("sam3_head").qdq is None
