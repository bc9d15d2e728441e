"""``export tensorrt``: build plans, trtexec recipes and refusals on CPU; real engines where TensorRT imports."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conceptseg_edge.cli import main
from conceptseg_edge.errors import ConceptsegError, ExportError, InputError
from conceptseg_edge.export.tensorrt import (
    BUILD_SCRIPT,
    FP32_OPS,
    RECIPE_SUFFIX,
    BuildPlan,
    TrtBuildConfig,
    build_engine_bundle,
    plan_bundle,
)
from conceptseg_edge.generation import DEFAULT_MAX_NEW_TOKENS
from conceptseg_edge.manifest import PROCESSOR_DIR, load_bundle
from conceptseg_edge.profiles import DimRange, InputProfile, PartProfile, bundle_dim_ranges
from conceptseg_edge.runtime.providers import bundle_ranges
from conceptseg_edge.runtime.policy_image import PolicyImageConfig
from conceptseg_edge.runtime.predictor import SAM2Predictor

EMBEDDED = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"


def _plans(bundle: Path, **cfg) -> dict[str, BuildPlan]:
    return plan_bundle(bundle, load_bundle(bundle), TrtBuildConfig(**cfg))


def _expected_profile(part, ranges) -> PartProfile:
    """What the manifest's symbolic dims say, written out axis by axis."""
    inputs = []
    for spec in part.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        shapes = {k: tuple(d if isinstance(d, int) else getattr(ranges[d], k) for d in spec.shape) for k in ("min", "opt", "max")}
        inputs.append(InputProfile(spec.name, **shapes))
    return PartProfile(part.name, tuple(inputs))


def _recipe_args(path: Path) -> list[str]:
    """The arguments the recipe hands to trtexec, read back by the shell's own word splitting."""
    lines = path.read_text().replace("\\\n", " ").splitlines()
    command = [line for line in lines if line.startswith('"${TRTEXEC:-trtexec}"')]
    assert len(command) == 1, path.read_text()
    words = shlex.split(command[0])
    assert words[0] == "${TRTEXEC:-trtexec}"
    return words[1:]


def _shapes(flag_value: str) -> dict[str, tuple[int, ...]]:
    return {name: tuple(int(d) for d in dims.split("x")) for name, dims in (item.rsplit(":", 1) for item in flag_value.split(","))}


def _profile_from_args(part: str, args: list[str]) -> PartProfile:
    flags = dict(arg[2:].split("=", 1) for arg in args if arg.startswith("--") and "Shapes=" in arg)
    if not flags:
        return PartProfile(part, ())
    lists = {key: _shapes(flags[f"{key}Shapes"]) for key in ("min", "opt", "max")}
    return PartProfile(part, tuple(InputProfile(name, lists["min"][name], lists["opt"][name], lists["max"][name])
                                   for name in lists["min"]))


# --- plans: profiles and precisions -----------------------------------------------------------------------------------


def test_plan_profiles_come_from_the_manifest_dims(tiny_bundle):
    manifest = load_bundle(tiny_bundle)
    plans = _plans(tiny_bundle, precision="fp32")
    ranges = bundle_dim_ranges(DEFAULT_MAX_NEW_TOKENS)
    assert set(plans) == set(manifest.parts)
    for name, plan in plans.items():
        assert plan.profile == _expected_profile(manifest.parts[name], ranges)
    assert plans["sam2_encoder"].profile.inputs == ()  # a static graph needs no profile
    decoder = plans["sam2_decoder"].profile
    assert decoder.input("point_coords").min[1] == ranges["num_points"].min == 0  # concept routes send no points
    assert decoder.input("concept_tokens").max[1] == ranges["num_concept_tokens"].max


def test_profile_override_replaces_one_input(tiny_bundle):
    override = "sam2_decoder:point_coords=1x1x2,2x4x2,4x8x2"
    plans = _plans(tiny_bundle, precision="fp32", profiles=(override,))
    default = _plans(tiny_bundle, precision="fp32")
    profile = plans["sam2_decoder"].profile
    assert profile.input("point_coords") == InputProfile("point_coords", (1, 1, 2), (2, 4, 2), (4, 8, 2))
    others = [p for p in profile.inputs if p.name != "point_coords"]
    assert others == [p for p in default["sam2_decoder"].profile.inputs if p.name != "point_coords"]


def test_profile_override_for_an_unknown_part_names_the_parts(tiny_bundle):
    with pytest.raises(InputError, match=r"no part 'policy_vision'.*sam2_encoder, sam2_decoder"):
        _plans(tiny_bundle, profiles=("policy_vision:pixel_values=16x1176,64x1176,64x1176",))
    with pytest.raises(InputError, match="no input 'points'"):
        _plans(tiny_bundle, profiles=("sam2_decoder:points=1x1x2,1x1x2,1x1x2",))


def test_policy_patch_range_comes_from_the_processor_config():
    image = PolicyImageConfig.from_dir(EMBEDDED / PROCESSOR_DIR)
    ranges = bundle_ranges(EMBEDDED, 96)
    assert (ranges["num_patches"].min, ranges["num_patches"].max) == (image.min_pixels // image.patch_size**2,
                                                                       image.max_pixels // image.patch_size**2)
    assert ranges == bundle_dim_ranges(96, min_patches=ranges["num_patches"].min, max_patches=ranges["num_patches"].max,
                                       merge_size=image.merge_size)
    assert ranges["past_sequence"].max > bundle_ranges(EMBEDDED, 32)["past_sequence"].max  # the KV range follows the budget


@pytest.mark.slow
def test_every_concept_part_gets_a_plan_with_its_manifest_profile(concept_bundle):
    manifest = load_bundle(concept_bundle)
    plans = _plans(concept_bundle, precision="fp16", max_new_tokens=64)
    ranges = bundle_ranges(concept_bundle, 64)
    assert set(plans) == set(manifest.parts) == {"sam2_encoder", "sam2_decoder", "ctm", "policy_vision", "policy_embed",
                                                 "policy_decoder"}
    for name, plan in plans.items():
        assert plan.profile == _expected_profile(manifest.parts[name], ranges)
        assert plan.computes == "fp16" and plan.fp16 and not plan.strongly_typed
    kv = plans["policy_decoder"].profile.input("past_key_values.0.key")
    assert kv.max[2] == ranges["past_sequence"].max


def test_fp16_pins_norms_and_softmax_to_fp32(tiny_bundle):
    plans = _plans(tiny_bundle, precision="fp16")
    for name, plan in plans.items():
        model = onnx.load(str(tiny_bundle / plan.onnx), load_external_data=False)
        pinned = dict(plan.fp32_layers)
        norms = [n.name for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert norms and set(norms) <= set(pinned), name
        ops = {n.name: n.op_type for n in model.graph.node}
        assert {ops[layer] for layer in pinned} <= FP32_OPS
        assert plan.builder_flags() == ("BuilderFlag.FP16", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS")
    assert _plans(tiny_bundle, precision="fp32")["sam2_decoder"].fp32_layers == ()


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "fp8"}, "--precision 'fp8'"),
    ({"hardware_compatibility": "turing"}, "--hardware-compatibility 'turing'"),
    ({"workspace_gb": 0.0}, "--workspace 0.0"),
    ({"calib": "world:8", "precision": "fp16"}, "--calib: only int8 and best"),
    ({"profiles": ("sam2_decoder:point_coords=1x2",)}, "expected PART:INPUT=MIN,OPT,MAX"),
    ({"max_new_tokens": 0}, "--max-new-tokens 0"),
])
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(InputError, match=message):
        TrtBuildConfig(**kwargs)


# --- recipes ----------------------------------------------------------------------------------------------------------


def test_recipe_flags_are_the_plan(tiny_bundle, tmp_path):
    cache = tmp_path / "timing.cache"
    cfg = dict(precision="fp16", workspace_gb=1.5, timing_cache=str(cache), hardware_compatibility="ampere_plus")
    plans = _plans(tiny_bundle, **cfg)
    for name, plan in plans.items():
        path = tmp_path / plan.recipe
        path.write_text(plan.recipe_text())
        subprocess.run(["bash", "-n", str(path)], check=True)
        args = _recipe_args(path)
        assert args == plan.trtexec_args()
        assert args[:2] == [f"--onnx={name}.onnx", f"--saveEngine={name}.plan"]
        assert "--fp16" in args and "--noTF32" in args and "--precisionConstraints=obey" in args
        assert "--memPoolSize=workspace:1536M" in args
        assert f"--timingCacheFile={cache.resolve()}" in args
        assert "--hardwareCompatibilityLevel=ampere+" in args
        layers = next(a for a in args if a.startswith("--layerPrecisions=")).split("=", 1)[1].split(",")
        assert layers == [f"{layer}:fp32" for layer, _ in plan.fp32_layers]
        assert _profile_from_args(name, args) == plan.profile
    fp32 = _plans(tiny_bundle, precision="fp32")["sam2_decoder"].trtexec_args()
    assert not {"--fp16", "--int8", "--stronglyTyped"} & set(fp32)
    assert not any(a.startswith(("--layerPrecisions", "--memPoolSize", "--timingCacheFile", "--hardware")) for a in fp32)


def test_recipes_only_bundle(tiny_bundle, sample_image, tmp_path, capsys):
    out = tmp_path / "recipes"
    code = main(["export", "tensorrt", str(tiny_bundle), "--out", str(out), "--recipes-only", "--precision", "fp16",
                 "--profile", "sam2_decoder:point_coords=1x1x2,1x2x2,2x4x2"])
    assert code == 0, capsys.readouterr().err
    manifest = load_bundle(out)  # every listed file re-hashed
    source = load_bundle(tiny_bundle)
    assert {n: (p.format, p.sha256) for n, p in manifest.parts.items()} == {n: ("onnx", p.sha256) for n, p in source.parts.items()}
    recipes = sorted(f for f in manifest.files if f.endswith(RECIPE_SUFFIX))
    assert recipes == sorted(f"{name}{RECIPE_SUFFIX}" for name in source.parts)
    assert BUILD_SCRIPT in manifest.files
    plans = plan_bundle(out, manifest, TrtBuildConfig(precision="fp16", profiles=("sam2_decoder:point_coords=1x1x2,1x2x2,2x4x2",)))
    for name, plan in plans.items():
        assert _recipe_args(out / plan.recipe) == plan.trtexec_args()
        assert os.access(out / plan.recipe, os.X_OK)
    assert plans["sam2_decoder"].profile.input("point_coords").max == (2, 4, 2)
    for script in [*recipes, BUILD_SCRIPT]:
        subprocess.run(["bash", "-n", str(out / script)], check=True)
    # The scripts run as written: trtexec here is a stand-in that records its arguments, one per line.
    recorder = tmp_path / "trtexec"
    recorder.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "$RECORD"\n')
    recorder.chmod(0o755)
    record = tmp_path / "record.txt"
    subprocess.run(["bash", str(out / BUILD_SCRIPT)], check=True, cwd=tmp_path,
                   env={**os.environ, "TRTEXEC": str(recorder), "RECORD": str(record)})
    assert record.read_text().splitlines() == [arg for plan in plans.values() for arg in plan.trtexec_args()]
    assert all((out / plan.onnx).is_file() and not (out / plan.engine).exists() for plan in plans.values())
    # Still an ONNX bundle: it segments with ONNX Runtime as its source does.
    masks = []
    for bundle in (tiny_bundle, out):
        predictor = SAM2Predictor.from_bundle(bundle)
        predictor.set_image(sample_image)
        masks.append(predictor.predict(box=[40, 30, 200, 160]).mask)
    assert np.array_equal(*masks)


# --- refusals ---------------------------------------------------------------------------------------------------------


def test_ort_only_policy_decoder_is_refused_with_the_fix(tmp_path):
    out = tmp_path / "engines"
    with pytest.raises(ExportError) as info:
        build_engine_bundle(EMBEDDED, out, TrtBuildConfig(recipes_only=True), progress=False)
    message = str(info.value)
    assert message.startswith("policy_decoder: TensorRT's ONNX parser cannot take this graph")
    assert "MatMulInteger" in message or "DynamicQuantizeLinear" in message
    assert "--policy-precision fp32" in message and "export qdq" in message
    assert "builds every part" in message  # no half-engine bundle: there is no flag to leave a part out
    assert not out.exists()


def test_int8_without_qdq_or_calib_is_refused(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "engines"
    assert main(["export", "tensorrt", str(tiny_bundle), "--out", str(out), "--precision", "int8", "--recipes-only"]) == 2
    err = capsys.readouterr().err
    assert "no Q/DQ graph" in err and "export qdq" in err and "--calib" in err
    assert not out.exists()


def test_missing_tensorrt_fails_before_any_work(tiny_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError, as on this machine
    out = tmp_path / "new" / "engines"
    with pytest.raises(ConceptsegError, match=r"tensorrt not importable: install conceptseg-edge\[gpu\]"):
        build_engine_bundle(tiny_bundle, out, TrtBuildConfig(), progress=False)
    assert main(["export", "tensorrt", str(tiny_bundle), "--out", str(out)]) == 2
    assert "tensorrt not importable" in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()


@pytest.fixture(scope="module")
def qdq_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with its decoder as a Q/DQ graph (floor 0: kept whatever it measures)."""
    from conceptseg_edge.export.qdq import QdqConfig, export_qdq

    out = tmp_path_factory.mktemp("qdq") / "bundle"
    export_qdq(tiny_bundle, out, QdqConfig(calibration="world:2", held_out=2, parts=("sam2_decoder",),
                                           floors={"sam2_decoder": 0.0}), progress=False)
    return out


@pytest.mark.slow
def test_int8_builds_qdq_parts_strongly_typed(qdq_bundle):
    manifest = load_bundle(qdq_bundle)
    assert manifest.parts["sam2_decoder"].qdq.passed and manifest.parts["sam2_encoder"].qdq is None
    int8 = _plans(qdq_bundle, precision="int8")
    decoder, encoder = int8["sam2_decoder"], int8["sam2_encoder"]
    assert (decoder.computes, decoder.strongly_typed, decoder.fp16, decoder.int8) == ("int8", True, False, False)
    assert decoder.builder_flags() == ("NetworkDefinitionCreationFlag.STRONGLY_TYPED",)
    assert "--stronglyTyped" in decoder.trtexec_args() and not {"--fp16", "--int8"} & set(decoder.trtexec_args())
    assert (encoder.computes, encoder.strongly_typed, encoder.builder_flags()) == ("fp32", False, ())  # no Q/DQ graph
    best = _plans(qdq_bundle, precision="best")
    assert (best["sam2_decoder"].computes, best["sam2_decoder"].strongly_typed) == ("int8", False)
    assert {"--fp16", "--int8", "--precisionConstraints=obey"} <= set(best["sam2_decoder"].trtexec_args())
    assert best["sam2_encoder"].computes == "fp16" and not best["sam2_encoder"].int8


@pytest.mark.slow
def test_calib_on_a_qdq_bundle_is_refused(qdq_bundle, tmp_path):
    out = tmp_path / "engines"
    with pytest.raises(InputError, match="already went through 'export qdq'"):
        build_engine_bundle(qdq_bundle, out, TrtBuildConfig(precision="int8", calib="world:2", recipes_only=True), progress=False)
    assert not out.exists()


# --- real engines (TensorRT + a CUDA device) --------------------------------------------------------------------------


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _feeds(part, profile: PartProfile, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at the profile's opt shapes, valued as the runtime sends them (labels, ids, masks, grid)."""
    opt = {p.name: p.opt for p in profile.inputs}
    shapes = {spec.name: opt.get(spec.name, spec.shape) for spec in part.inputs}
    feeds = {}
    for spec in part.inputs:
        shape = shapes[spec.name]
        if spec.name == "point_labels":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(spec.dtype)
        elif spec.name == "image_grid_thw":
            side = int(np.sqrt(shapes["pixel_values"][0]))
            feeds[spec.name] = np.array([[1, side, side]], dtype=spec.dtype)
        elif spec.name == "input_ids":
            feeds[spec.name] = rng.integers(0, 100, shape).astype(spec.dtype)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        elif spec.name == "position_ids":
            past = shapes["attention_mask"][1] - shape[2]
            feeds[spec.name] = np.broadcast_to(np.arange(past, past + shape[2]), shape).astype(spec.dtype)
        elif spec.name == "has_mask_input":
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return feeds


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_onnx_runtime(concept_bundle, tmp_path, precision):
    if not _tensorrt_importable():
        pytest.skip("tensorrt not importable")
    from conceptseg_edge.export.parts import MASK_IOU_FLOOR, PartSpec
    from conceptseg_edge.metrics import iou
    from conceptseg_edge.runtime.engine import OrtEngine
    from conceptseg_edge.runtime.trt_engine import open_trt_engine

    out = tmp_path / f"engines-{precision}"
    engines = build_engine_bundle(concept_bundle, out, TrtBuildConfig(precision=precision), progress=False)
    source = load_bundle(concept_bundle)
    rng = np.random.default_rng(0)
    for name, part in engines.parts.items():
        assert part.format == "tensorrt" and part.engine is not None and part.precision == precision
        assert part.engine.onnx_sha256 == source.parts[name].sha256
        onnx_part = source.parts[name]
        # The parity report's tolerances; an fp16 engine gets the fp16 table (PartSpec.with_storage).
        spec = PartSpec(name, onnx_part.file, onnx_part.inputs, onnx_part.outputs, dict(onnx_part.parity.atol),
                        min_mask_iou=MASK_IOU_FLOOR if "low_res_masks" in onnx_part.parity.atol else None)
        spec = spec.with_storage(precision)
        feeds = _feeds(part, part.engine.profile, rng)
        got = open_trt_engine(out, part, "tensorrt").run(feeds)
        want = OrtEngine(concept_bundle / onnx_part.file, "cpu", onnx_part).run(feeds)
        for output, atol in spec.atol.items():
            diff = float(np.max(np.abs(got[output].astype(np.float64) - want[output]))) if want[output].size else 0.0
            assert diff <= atol, f"{name}.{output} ({precision}): max |trt - ort| {diff:.3g} > {atol}"
        if spec.min_mask_iou is not None:
            assert iou(got["low_res_masks"] > 0, want["low_res_masks"] > 0) >= spec.min_mask_iou


def test_a_patch_range_past_tensorrts_topk_limit_is_refused():
    """policy_vision sorts its patches with TopK: a processor allowing 3840 patches or more has no engine."""
    from conceptseg_edge.export.tensorrt import _check_topk_patches

    _check_topk_patches({"num_patches": DimRange(16, 1836, 3839)})  # Qwen2.5-VL at 600x600 max pixels: 1836
    with pytest.raises(ExportError, match=r"allows 5329 patches per image.*K < 3840"):
        _check_topk_patches({"num_patches": DimRange(16, 5329, 5329)})  # a 1022x1022 image at patch 14
