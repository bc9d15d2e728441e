"""Optimization profiles derived from the manifest's symbolic dims, and the engine record's round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conceptseg_edge.errors import InputError, ManifestError
from conceptseg_edge.manifest import BundleManifest, EngineInfo, QdqReport, load_bundle
from conceptseg_edge.profiles import DimRange, InputProfile, PartProfile, bundle_dim_ranges, derive_profile, parse_profile_override
from conceptseg_edge.cli.demo import DEFAULT_BUNDLE


@pytest.fixture(scope="module")
def manifest():
    return load_bundle(DEFAULT_BUNDLE)


def test_every_symbolic_dim_gets_its_range(manifest):
    ranges = bundle_dim_ranges(max_new_tokens=100)
    for name, part in manifest.parts.items():
        profile = derive_profile(name, part.inputs, ranges)
        dynamic = [t for t in part.inputs if any(isinstance(d, str) for d in t.shape)]
        assert [p.name for p in profile.inputs] == [t.name for t in dynamic]
        for spec in dynamic:
            p = profile.input(spec.name)
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int):  # static axes are pinned
                    assert p.min[axis] == p.opt[axis] == p.max[axis] == dim
                else:
                    assert (p.min[axis], p.opt[axis], p.max[axis]) == dataclasses.astuple(ranges[dim])
    decoder = derive_profile("sam2_decoder", manifest.part("sam2_decoder").inputs, ranges)
    assert decoder.input("point_coords").min[1] == 0  # concept routes send no geometry
    assert decoder.input("concept_tokens").max[1] == 8  # the CTM's 8 tokens
    ctm = derive_profile("ctm", manifest.part("ctm").inputs, ranges)
    assert ctm.input("hidden_states").max[1] == 100  # the completion can be max_new_tokens long


def test_one_profile_many_spellings(manifest):
    profile = derive_profile("ctm", manifest.part("ctm").inputs, bundle_dim_ranges(256))
    lists = profile.shape_lists()
    assert profile.trtexec_flags() == [f"--minShapes={lists['min']}", f"--optShapes={lists['opt']}", f"--maxShapes={lists['max']}"]
    assert lists["max"] == "hidden_states:1x256x128"
    assert profile.ort_trt_options() == {f"trt_profile_{k}_shapes": v for k, v in lists.items()}
    encoder = derive_profile("sam2_encoder", manifest.part("sam2_encoder").inputs, bundle_dim_ranges(256))
    assert encoder.inputs == () and encoder.trtexec_flags() == [] and encoder.ort_trt_options() == {}


def test_overrides_replace_one_input_and_are_checked(manifest):
    part = manifest.part("sam2_decoder")
    name, override = parse_profile_override("sam2_decoder:point_coords=1x1x2,1x4x2,1x64x2")
    assert name == "sam2_decoder"
    profile = derive_profile(name, part.inputs, bundle_dim_ranges(256), [override])
    assert profile.input("point_coords") == InputProfile("point_coords", (1, 1, 2), (1, 4, 2), (1, 64, 2))
    with pytest.raises(InputError, match="no input 'nope'"):
        derive_profile(name, part.inputs, bundle_dim_ranges(256), [InputProfile("nope", (1,), (1,), (1,))])
    with pytest.raises(InputError, match="axis 2 is fixed at 2"):
        derive_profile(name, part.inputs, bundle_dim_ranges(256), [InputProfile("point_coords", (1, 1, 3), (1, 1, 3), (1, 1, 3))])
    for bad in ("sam2_decoder:point_coords=1x2", "point_coords=1,2,3", "a:b=1xx2,1x2,1x2", "a:b=2,1,3"):
        with pytest.raises(InputError):
            parse_profile_override(bad)
    with pytest.raises(InputError, match="no size range for dim 'num_points'"):
        derive_profile(name, part.inputs, {"batch": DimRange(1, 1, 1)})


def test_shapes_outside_the_profile_are_refused_by_name(manifest):
    profile = derive_profile("sam2_decoder", manifest.part("sam2_decoder").inputs, bundle_dim_ranges(256))
    profile.check({"point_coords": (1, 3, 2), "concept_tokens": (1, 8, 256)})
    with pytest.raises(InputError, match=r"sam2_decoder.point_coords: shape \(1, 17, 2\) is outside"):
        profile.check({"point_coords": (1, 17, 2)})


def test_engine_record_round_trips_and_is_checked(manifest):
    part = manifest.part("ctm")
    info = EngineInfo(
        tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
        profile=derive_profile("ctm", part.inputs, bundle_dim_ranges(256)), builder_flags=("FP16",),
        hardware_compatibility="none", onnx_sha256=part.sha256, recipe="ctm.trtexec.sh", workspace_gb=2.0,
    )
    qdq = QdqReport("int8", "onnxruntime quantize_static", "world:8", 8, "world:4 (seed 1)", 4, 0.97, {"concept_tokens": 0.05},
                    {"mask_iou": 0.9}, True)
    engine_part = dataclasses.replace(part, format="tensorrt", file="ctm.plan", engine=info, qdq=qdq)
    m = manifest.with_parts(ctm=engine_part)
    back = BundleManifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.part("ctm") == engine_part
    data = json.loads(json.dumps(m.to_dict()))
    data["parts"]["ctm"]["engine"]["compute_capability"] = "sm87"
    with pytest.raises(ManifestError, match=r"parts.ctm.engine.compute_capability"):
        BundleManifest.from_dict(data)
    data["parts"]["ctm"]["engine"] = None
    with pytest.raises(ManifestError, match=r"parts.ctm.engine: a 'tensorrt' part records its engine"):
        BundleManifest.from_dict(data)
    data = json.loads(json.dumps(m.to_dict()))
    data["parts"]["ctm"]["engine"]["profile"]["inputs"][0]["max"] = [1, 0, 128]  # max below min
    with pytest.raises(ManifestError, match="min <= opt <= max"):
        BundleManifest.from_dict(data)


def test_dim_range_is_ordered():
    with pytest.raises(InputError):
        DimRange(2, 1, 3)
    assert PartProfile("x").inputs == ()
