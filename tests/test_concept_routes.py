"""Concept routes from a bundle, torch-free: parity with the torch pipeline, the bank, batching, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conceptseg_edge.data.world import ConceptWorld
from conceptseg_edge.errors import InputError
from conceptseg_edge.export.concept import coverage_class, parity_images
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.metrics import iou
from conceptseg_edge.models.pipeline import ConceptSegPipeline
from conceptseg_edge.router import RouterConfig
from conceptseg_edge.runtime.bank import ConceptBank, bundle_key, normalise_phrase
from conceptseg_edge.runtime.engine import open_engine
from conceptseg_edge.runtime.segmenter import ConceptSegmenter

ALWAYS = RouterConfig(taus={n: 0.0 for n in range(1, 5)})
GENERATION = GenerationConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def runtime(concept_bundle, tmp_path_factory):
    return ConceptSegmenter.from_bundle(concept_bundle, bank_dir=tmp_path_factory.mktemp("bank"), generation=GENERATION,
                                        router=ALWAYS)


@pytest.fixture(scope="module")
def reference(concept_checkpoint):
    return ConceptSegPipeline.from_checkpoint(concept_checkpoint, GENERATION, router=ALWAYS)


def test_bundle_carries_every_route_and_its_parity(concept_bundle):
    m = load_bundle(concept_bundle)
    assert set(m.routes) == {"prompt", "shortcut", "reason"}
    assert {"sam2_encoder", "sam2_decoder", "ctm", "policy_vision", "policy_embed", "policy_decoder"} <= set(m.parts)
    assert all(p.parity and p.parity.passed for p in m.parts.values())
    assert m.route_parity["shortcut"]["min_mask_iou"] >= 0.98 and m.route_parity["reason"]["min_mask_iou"] >= 0.98
    assert m.route_parity["shortcut"]["samples"] >= 1 and m.route_parity["reason"]["samples"] >= 1
    assert any(f.startswith("processor/") for f in m.files) and m.source.backbone_sha256


def test_prompt_route_matches_the_torch_pipeline(runtime, reference):
    """SAM2 alone, on samples the export did not check. (A random-init SAM2 masks most of these
    images almost whole whatever the click, so this is a smoke check; the SAM2 parts' own parity is
    checked at export against torch.)"""
    world = ConceptWorld(seed=99, image_size=192)
    for i in range(6):
        image = world.episode(i, with_supports=False).image
        a, b = runtime.segment(image, points=[[96, 96]]), reference(image, points=[[96, 96]])
        assert a.route == b.route == "prompt" and iou(a.mask, b.mask) >= 0.98


@pytest.mark.parametrize("route", ["shortcut", "reason"])
def test_concept_routes_match_the_torch_pipeline_on_partial_masks(runtime, reference, route):
    """Samples the export did not check (another ConceptWorld seed), on masks that can disagree: only
    runtime masks covering PARTIAL_COVERAGE of the image are compared (a near-whole mask matches any
    other, two empty ones have IoU 1 by convention); two or three per route, screened from images and
    their inverses as the export screens them."""
    world = ConceptWorld(seed=99, image_size=192)
    compared = 0
    for ep, image in parity_images(world, 24):
        a = runtime.segment(image, query=ep.query, route=route)
        if coverage_class(a.mask) != "partial":
            continue
        b = reference(image, query=ep.query, route=route)
        assert a.route == b.route == route
        assert iou(a.mask, b.mask) >= 0.98
        if route == "reason":
            assert a.completion == b.completion
        compared += 1
        if compared == 3:
            break
    assert compared >= 2, f"{route}: fewer than 2 partial masks among 24 images"


def test_reason_route_with_supports(runtime, reference):
    ep = ConceptWorld(seed=5, image_size=160).episode(1)
    from conceptseg_edge.episodes import Support

    supports = [Support(s.image, s.box) for s in ep.supports][:4]
    assert supports, "ConceptWorld episodes carry supports"
    a = runtime.segment(ep.image, query=ep.query, supports=supports, route="reason")
    b = reference(ep.image, query=ep.query, supports=supports, route="reason")
    assert a.completion == b.completion and iou(a.mask, b.mask) >= 0.98


def test_bank_persists_and_is_keyed_to_the_bundle(concept_bundle, tmp_path):
    first = ConceptSegmenter.from_bundle(concept_bundle, bank_dir=tmp_path)
    image = ConceptWorld(seed=1, image_size=128).episode(0).image
    a = first.segment(image, query="Red  Circle", route="shortcut")
    assert a.bank_hit is False
    second = ConceptSegmenter.from_bundle(concept_bundle, bank_dir=tmp_path)  # a new process would see the same
    b = second.segment(image, query="red circle", route="shortcut")
    assert b.bank_hit is True and np.array_equal(a.mask, b.mask)
    # another bundle (any token-determining file changed) → another key → no stale tokens served
    import dataclasses

    manifest = load_bundle(concept_bundle)
    ctm = dataclasses.replace(manifest.parts["ctm"], sha256="0" * 64)
    changed = bundle_key(manifest.with_parts(ctm=ctm))
    assert changed != bundle_key(manifest)
    other = ConceptBank(tmp_path, changed)
    assert other.get("red circle") is None
    assert other.prune() == 1 and not (tmp_path / bundle_key(manifest)).exists()


def test_corrupt_bank_entry_is_recomputed(tmp_path):
    bank = ConceptBank(tmp_path, "k")
    bank.put("dog", np.ones((8, 256), np.float32))
    path = next((tmp_path / "k").glob("*.npy"))
    path.write_bytes(b"garbage")
    fresh = ConceptBank(tmp_path, "k")
    assert fresh.get("dog") is None and not path.exists()
    assert normalise_phrase("  Ｄｏｇ\t") == "dog"


class CountingEngine:
    def __init__(self, engine):
        self.engine, self.calls = engine, 0
        self.inputs, self.outputs, self.provider = engine.inputs, engine.outputs, engine.provider

    def run(self, feeds):
        self.calls += 1
        return self.engine.run(feeds)


def test_four_concepts_share_one_encoder_and_one_decoder_run(concept_bundle):
    engines: dict[str, CountingEngine] = {}

    def counting(bundle_dir, part, provider):
        engines[part.name] = CountingEngine(open_engine(bundle_dir, part, provider))
        return engines[part.name]

    runtime = ConceptSegmenter.from_bundle(concept_bundle, generation=GENERATION, router=ALWAYS, engine_factory=counting)
    assert set(engines) == set(load_bundle(concept_bundle).parts)
    enc, dec = engines["sam2_encoder"], engines["sam2_decoder"]
    image = ConceptWorld(seed=2, image_size=160).episode(0).image
    results = runtime.segment_concepts(image, ["red circle", "blue square", "triangle", "green star"])
    assert enc.calls == 1 and dec.calls == 1
    assert [r.route for r in results] == ["shortcut"] * 4
    single = [runtime.segment(image, query=q, route="shortcut") for q in ("red circle", "triangle")]
    assert enc.calls == 1  # same image: features reused
    assert np.array_equal(single[0].mask, results[0].mask) and np.array_equal(single[1].mask, results[2].mask)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"query": ""}, "query: empty"),
        ({"query": "   "}, "query: empty"),
        ({"query": "cat", "route": "teleport"}, "unknown route"),
        ({"query": "cat", "route": "prompt"}, "no points or box"),
    ],
)
def test_bad_requests(runtime, kwargs, match):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InputError, match=match):
        runtime.segment(image, **kwargs)


def test_cli_concept_segment_and_bench_all(concept_bundle, tmp_path):
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(ConceptWorld(seed=4, image_size=128).episode(0).image).save(image)
    proc = subprocess.run([sys.executable, "-m", "conceptseg_edge", "segment", str(concept_bundle), str(image),
                           "--concept", "a long question about which thing differs here", "--bank", str(tmp_path / "bank"),
                           "--out", str(tmp_path / "m.png"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["route"] == "reason" and "policy_decode" in report["timings_ms"]
    proc = subprocess.run([sys.executable, "-m", "conceptseg_edge", "bench", str(concept_bundle), "--route", "all",
                           "--runs", "2", "--warmup", "0", "--max-new-tokens", "8", "--compare-torch",
                           "--json", str(tmp_path / "b.json"), "--png", str(tmp_path / "b.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    bench = json.loads((tmp_path / "b.json").read_text())
    assert set(bench["routes"]) == {"prompt", "shortcut_bank_hit", "shortcut_bank_miss", "reason"}
    assert bench["policy"]["decode_tokens_per_s"] > 0 and bench["concepts_per_image"]["ratio_4_over_1_p50"] > 0
    assert set(bench["torch"]) == {"prompt", "shortcut", "reason"}
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
