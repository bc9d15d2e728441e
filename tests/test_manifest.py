"""The bundle manifest: strict reading, round trip, hash verification."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from conceptseg_edge.errors import ManifestError
from conceptseg_edge.manifest import SCHEMA_VERSION, BundleManifest, load_bundle, read_manifest, write_manifest

EMBEDDED = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"


def _raw(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_round_trip_is_identity(tiny_bundle, tmp_path):
    manifest = read_manifest(tiny_bundle)
    assert BundleManifest.from_dict(manifest.to_dict()) == manifest
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert again.parts == manifest.parts and again.source == manifest.source
    assert again.preprocessing == manifest.preprocessing


def test_manifest_records_what_the_issue_asks(tiny_bundle, tiny_checkpoint):
    m = load_bundle(tiny_bundle)
    assert m.schema_version == SCHEMA_VERSION
    assert m.source.checkpoint == str(tiny_checkpoint) and len(m.source.checkpoint_sha256) == 64
    assert m.preprocessing.image_size == 512 and m.preprocessing.pixel_mean == (0.485, 0.456, 0.406)
    dec = m.part("sam2_decoder")
    assert dec.opset == 17 and dec.precision == "fp32" and len(dec.sha256) == 64
    shapes = {t.name: t.shape for t in dec.inputs}
    assert shapes["concept_tokens"] == ("batch", "num_concept_tokens", 256)
    assert shapes["point_coords"] == ("batch", "num_points", 2)
    assert {"torch", "onnxruntime", "onnx", "sam2"} <= set(m.versions)
    assert all(p.parity and p.parity.passed for p in m.parts.values())


def test_other_schema_version_is_refused(bundle_copy):
    raw = _raw(bundle_copy)
    raw["schema_version"] = SCHEMA_VERSION + 1
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"schema_version 2 is not supported"):
        load_bundle(bundle_copy)


def test_unknown_and_missing_keys_name_the_field(bundle_copy):
    raw = _raw(bundle_copy)
    raw["parts"]["sam2_encoder"]["surprise"] = 1
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"parts\.sam2_encoder: unknown key\(s\) \['surprise'\]"):
        read_manifest(bundle_copy)
    raw = _raw(bundle_copy)
    del raw["parts"]["sam2_encoder"]["surprise"], raw["parts"]["sam2_encoder"]["sha256"]
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"sam2_encoder: missing key\(s\) \['sha256'\]"):
        read_manifest(bundle_copy)


def test_tampered_and_missing_files_are_named(bundle_copy):
    onnx_file = bundle_copy / "sam2_decoder.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"sam2_decoder\.onnx: sha256 mismatch"):
        load_bundle(bundle_copy)
    onnx_file.unlink()
    with pytest.raises(ManifestError, match=r"sam2_decoder\.onnx: listed in the manifest but missing"):
        load_bundle(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_weight_storage_is_recorded_and_old_manifests_read_as_fp32(bundle_copy):
    import dataclasses

    raw = _raw(bundle_copy)
    assert {p["weight_storage"] for p in raw["parts"].values()} == {"fp32"}
    for part in raw["parts"].values():  # a manifest written before the field existed
        del part["weight_storage"]
    (bundle_copy / "manifest.json").write_text(json.dumps(raw))
    old = load_bundle(bundle_copy)
    assert {p.weight_storage for p in old.parts.values()} == {"fp32"}
    half = old.with_parts(sam2_decoder=dataclasses.replace(old.part("sam2_decoder"), weight_storage="fp16"))
    again = BundleManifest.from_dict(half.to_dict())
    assert again.part("sam2_decoder").weight_storage == "fp16" and again.part("sam2_encoder").weight_storage == "fp32"


def test_router_is_typed_and_written_as_before(bundle_copy):
    from conceptseg_edge.router import RouterConfig

    m = load_bundle(bundle_copy)
    assert m.router is None and _raw(bundle_copy)["router"] == {}  # a prompt-only bundle
    router = RouterConfig(base_tau=0.2, taus={1: 0.65, 3: 0.0})
    again = BundleManifest.from_dict(json.loads(json.dumps(dataclasses.replace(m, router=router).to_dict())))
    assert again.router == router
    assert again.to_dict()["router"] == {"base_tau": 0.2, "growth": 2.0, "max_shortcut_words": 4, "taus": {"1": 0.65, "3": 0.0}}
    raw = again.to_dict()
    raw["router"]["surprise"] = 1
    with pytest.raises(ManifestError, match=r"router: unknown key\(s\) \['surprise'\]"):
        BundleManifest.from_dict(raw)


# The INT8 decoder's record as manifests before QuantizedParity wrote it (ConceptSeg-Tiny at 7d13ad9):
# the measures were distances in parity.max_abs_diff.
LEGACY_QUANTIZED_PARITY = {
    "reference": "transformers Qwen2_5_VLForConditionalGeneration modules, torch eager fp32; teacher-forced greedy "
                 "completions, 156 slots (122 decisive); distances are 1 - agreement / 1 - mean cosine",
    "max_abs_diff": {"greedy_token_disagreement": 0.02564102564102566, "decisive_token_disagreement": 0.0,
                     "hidden_cosine_distance": 0.00047713518142700195},
    "atol": {"greedy_token_disagreement": 1.0, "decisive_token_disagreement": 0.09999999999999998,
             "hidden_cosine_distance": 0.09999999999999998},
    "passed": True,
    "mask_iou": None,
}


def test_quantized_parity_round_trips_and_old_manifests_read_it():
    """The committed ConceptSeg-Tiny carries a QuantizedParity record; a manifest written before it
    (measures as distances in ``parity.max_abs_diff``) reads back as the same typed record."""
    from conceptseg_edge.manifest import PartManifest, QuantizedParity

    raw = _raw(EMBEDDED)["parts"]["policy_decoder"]
    assert raw["parity"] is None and raw["quantized_parity"]["precision"] == "int8"
    current = read_manifest(EMBEDDED).part("policy_decoder")
    legacy_raw = {**raw, "parity": LEGACY_QUANTIZED_PARITY}
    del legacy_raw["quantized_parity"]
    decoder = PartManifest.from_dict(json.loads(json.dumps(legacy_raw)), "decoder")
    q = decoder.quantized_parity
    assert decoder.parity is None and isinstance(q, QuantizedParity) and q.passed and q.precision == "int8"
    assert (q.tokens, q.decisive_tokens) == (156, 122)
    assert q.greedy_token_agreement == pytest.approx(1 - LEGACY_QUANTIZED_PARITY["max_abs_diff"]["greedy_token_disagreement"])
    assert q.floors == pytest.approx({"greedy_token_agreement": 0.0, "decisive_token_agreement": 0.9, "hidden_cosine": 0.9})
    # the retrained bundle measured the same decoder on the same slots (its greedy figure uses today's budget)
    cq = current.quantized_parity
    assert (cq.tokens, cq.decisive_tokens, cq.decisive_token_agreement) == (q.tokens, q.decisive_tokens, 1.0)
    written = decoder.to_dict()
    assert written["parity"] is None and written["quantized_parity"]["tokens"] == 156
    assert PartManifest.from_dict(json.loads(json.dumps(written)), "decoder") == decoder


# ---------------------------------------------------------------------------- hostile field values

DEEP = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit
NESTED = "[" * 100 + "]" * 100  # parses, but deeper than any manifest


def _set(path: str, value):
    """A change to the raw manifest: set the value at a dotted path (list indices as numbers)."""

    def change(raw):
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return change


# (change, the field the error must name). Each would be read (and run) without complaint, or
# crash with a traceback, before the manifest reader checked types, ranges and depth.
BAD_FIELDS = {
    "image_size_string": (_set("preprocessing.image_size", "128"), r"preprocessing\.image_size: expected an integer"),
    "image_size_zero": (_set("preprocessing.image_size", 0), r"preprocessing\.image_size: expected an integer >= 1"),
    "image_size_bool": (_set("preprocessing.image_size", True), r"preprocessing\.image_size"),
    "resize_unknown": (_set("preprocessing.resize", "letterbox"), r"preprocessing\.resize: 'letterbox' is not implemented"),
    "pixel_std_zeros": (_set("preprocessing.pixel_std", [0, 0, 0]), r"preprocessing\.pixel_std\[0\]: expected a finite positive"),
    "pixel_mean_two": (_set("preprocessing.pixel_mean", [0.4, 0.4]), r"preprocessing\.pixel_mean: expected 3 numbers"),
    "mask_threshold_nan": (_set("preprocessing.mask_threshold", float("nan")), r"preprocessing\.mask_threshold: expected a finite"),
    "shape_int": (_set("parts.sam2_encoder.inputs.0.shape", 3), r"parts\.sam2_encoder\.inputs\[0\]\.shape: expected a list"),
    "dim_float": (_set("parts.sam2_encoder.inputs.0.shape.2", 128.5), r"parts\.sam2_encoder\.inputs\[0\]\.shape\[2\]"),
    "dim_negative": (_set("parts.sam2_decoder.inputs.0.shape.0", -1), r"parts\.sam2_decoder\.inputs\[0\]\.shape\[0\]"),
    "dtype_unknown": (_set("parts.sam2_encoder.inputs.0.dtype", "floaty"), r"parts\.sam2_encoder\.inputs\[0\]\.dtype"),
    "inputs_object": (_set("parts.sam2_encoder.inputs", {"image": 1}), r"parts\.sam2_encoder\.inputs: expected a list"),
    "opset_string": (_set("parts.sam2_encoder.opset", "17"), r"parts\.sam2_encoder\.opset"),
    "sha256_short": (_set("parts.ctm.sha256", "abc"), r"parts\.ctm\.sha256: expected a sha256"),
    "file_number": (_set("parts.ctm.file", 7), r"parts\.ctm\.file: expected a non-empty relative path"),
    "router_string": (_set("router", "fast"), r"router: expected an object"),
    "router_empty_list": (_set("router", []), r"router: expected an object"),
    "router_zero": (_set("router", 0), r"router: expected an object"),
    "taus_string": (_set("router.taus", "0.5"), r"router\.taus: expected an object"),
    "taus_key": (_set("router.taus", {"one": 0.5}), r"router\.taus: key 'one' is not a word count"),
    "taus_value": (_set("router.taus", {"1": "high"}), r"router\.taus\.1: expected a finite number"),
    "base_tau_nan": (_set("router.base_tau", float("nan")), r"router\.base_tau: expected a finite number"),
    "files_list": (_set("files", ["processor/tokenizer.json"]), r"\.files: expected an object"),
    "files_hash_number": (lambda raw: raw["files"].update({"processor/tokenizer.json": 5}), r"files\['processor/tokenizer\.json'\]: expected a sha256"),
    "routes_string": (_set("routes", "prompt"), r"routes: expected a list"),
    "routes_unknown": (_set("routes", ["prompt", "teleport"]), r"routes: expected distinct routes"),
    "versions_number": (_set("versions.python", 3.11), r"versions\.python: expected a string"),
    "source_model_list": (_set("source.model", ["x"]), r"source\.model: expected a string"),
    "nested_deep": (_set("route_parity", "DEEP"), r"nested deeper than"),
    "nested_past_limit": (_set("route_parity", "NESTED"), r"nested deeper than"),
}


@pytest.fixture
def embedded_copy(tmp_path):
    return shutil.copytree(EMBEDDED, tmp_path / "bundle")


def _write_bad(bundle, change) -> None:
    raw = _raw(bundle)
    change(raw)
    text = json.dumps(raw).replace('"DEEP"', DEEP).replace('"NESTED"', NESTED)
    (bundle / "manifest.json").write_text(text)


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_bad_field_values_name_the_field(embedded_copy, case):
    change, field = BAD_FIELDS[case]
    _write_bad(embedded_copy, change)
    with pytest.raises(ManifestError, match=field):
        read_manifest(embedded_copy)


@pytest.mark.parametrize("case", BAD_FIELDS)
def test_bad_field_values_are_one_error_line_from_segment(embedded_copy, tmp_path, case, capsys):
    from conceptseg_edge.cli import main

    change, field = BAD_FIELDS[case]
    _write_bad(embedded_copy, change)
    out = tmp_path / "mask.png"
    rc = main(["segment", str(embedded_copy), str(EMBEDDED.parent / "sample.png"), "--point", "10,10",
               "--out", str(out), "--no-bank"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(field, err[0]) and not out.exists()
