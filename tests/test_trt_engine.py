"""TrtEngine and the engine-compatibility check.

On CPU: the compatibility rules (TensorRT release, compute capability, hardware-compatibility levels) on
literal ``TrtMachine`` values, the rebuild commands they give, an engine bundle (the embedded bundle with
its CTM part recorded as a TensorRT engine) refused without TensorRT or with another provider, and CUDA
failures named by call. Marked ``trt``: a small engine built with the TensorRT API from an ONNX graph
(dynamic batch, an int64, an fp16 and a bool tensor, a zero-size input) run by ``TrtEngine`` against ONNX
Runtime, its device buffers reused, a shape outside its profile refused.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptseg_edge._compat import is_available
from conceptseg_edge.cli.demo import DEFAULT_BUNDLE
from conceptseg_edge.errors import (
    DependencyError,
    EngineIOError,
    EngineCompatibilityError,
    EngineRunError,
    EngineUnavailableError,
    InputError,
    ManifestError,
)
from conceptseg_edge.fileio import sha256_file
from conceptseg_edge.manifest import EngineInfo, PartManifest, load_bundle, write_manifest
from conceptseg_edge.profiles import InputProfile, PartProfile, bundle_dim_ranges, derive_profile, parse_profile_override
from conceptseg_edge.runtime.engine import open_engine
from conceptseg_edge.runtime.predictor import SAM2Predictor
from conceptseg_edge.runtime.providers import ProviderConfig
from conceptseg_edge.runtime.trt_engine import (
    TrtEngine,
    TrtMachine,
    check_engine_compatible,
    cuda_device,
    import_cudart,
    import_tensorrt,
    open_trt_engine,
    trt_machine,
)

CTM_PROFILE = derive_profile("ctm", load_bundle(DEFAULT_BUNDLE, verify=False).part("ctm").inputs, bundle_dim_ranges(256))
# A recipe as 'export tensorrt' writes it: one trtexec command over continuation lines.
RECIPE = (
    "#!/usr/bin/env bash\n"
    "# ctm: TensorRT engine, precision fp16 (computes fp16).\n"
    "set -euo pipefail\n"
    'cd "$(dirname "$0")"\n'
    '"${TRTEXEC:-trtexec}" \\\n    --onnx=ctm.onnx \\\n    --saveEngine=ctm.plan \\\n    '
    + " \\\n    ".join(CTM_PROFILE.trtexec_flags())
    + " \\\n    --noTF32 \\\n    --fp16\n"
)
TRTEXEC_LINE = '"${TRTEXEC:-trtexec}" --onnx=ctm.onnx --saveEngine=ctm.plan ' + " ".join(CTM_PROFILE.trtexec_flags()) + " --noTF32 --fp16"
ORIN = TrtMachine("10.3.0", "Orin", "8.7")


def _info(**changes) -> EngineInfo:
    """The record of a CTM engine built on a Jetson AGX Orin (JetPack 6: TensorRT 10.3)."""
    info = EngineInfo(
        tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16", profile=CTM_PROFILE,
        builder_flags=("BuilderFlag.FP16",), hardware_compatibility="none", onnx_sha256="ab" * 32,
        recipe="ctm.trtexec.sh", workspace_gb=2.0,
    )
    return dataclasses.replace(info, **changes)


@pytest.mark.parametrize(
    ("info", "machine"),
    [
        (_info(), ORIN),
        (_info(), TrtMachine("10.3.0.26", "Orin", "8.7")),  # a build number on one side only
        (_info(builder_flags=("BuilderFlag.VERSION_COMPATIBLE",)), TrtMachine("10.8.0", "Orin", "8.7")),  # later runtime
        (_info(hardware_compatibility="ampere_plus", compute_capability="8.6", gpu_name="NVIDIA RTX A6000"),
         TrtMachine("10.3.0", "NVIDIA H200", "9.0")),
        (_info(hardware_compatibility="same_compute_capability", compute_capability="8.6", gpu_name="NVIDIA GeForce RTX 3090"),
         TrtMachine("10.3.0", "NVIDIA RTX A6000", "8.6")),
    ],
)
def test_compatible_engines_pass(info, machine, recwarn):
    check_engine_compatible(info, machine, RECIPE)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize(
    ("info", "machine", "reasons"),
    [
        (_info(), TrtMachine("10.4.0", "Orin", "8.7"),
         ["built with TensorRT 10.3.0, this machine has TensorRT 10.4.0", "only on the TensorRT release that built it"]),
        (_info(tensorrt_version="10.3.0.26"), TrtMachine("10.3.0.30", "Orin", "8.7"), ["TensorRT 10.3.0.26", "TensorRT 10.3.0.30"]),
        (_info(builder_flags=("BuilderFlag.VERSION_COMPATIBLE",), tensorrt_version="10.8.0"), ORIN,
         ["built version-compatible with TensorRT 10.8.0, this machine has TensorRT 10.3.0", "or a later one"]),
        (_info(builder_flags=("BuilderFlag.VERSION_COMPATIBLE",), tensorrt_version="8.5.3"), TrtMachine("8.6.1", "Orin", "8.7"),
         ["from 8.6 on"]),
        (_info(), TrtMachine("10.3.0", "NVIDIA H200", "9.0"),
         ["built for compute capability 8.7 (Orin, hardware compatibility 'none'); this GPU (NVIDIA H200) is 9.0"]),
        (_info(hardware_compatibility="ampere_plus", compute_capability="8.6", gpu_name="NVIDIA RTX A6000"),
         TrtMachine("10.3.0", "Tesla T4", "7.5"), ["Ampere and newer", "this GPU (Tesla T4) is 7.5, older than Ampere (8.0)"]),
        (_info(hardware_compatibility="same_compute_capability", compute_capability="8.6", gpu_name="NVIDIA GeForce RTX 3090"),
         TrtMachine("10.3.0", "NVIDIA L4", "8.9"), ["compute capability 8.6", "hardware compatibility 'same_compute_capability'",
                                                     "this GPU (NVIDIA L4) is 8.9"]),
        (_info(), TrtMachine("10.7.0", "NVIDIA H200", "9.0"), ["TensorRT 10.7.0", "this GPU (NVIDIA H200) is 9.0"]),  # both named
    ],
)
def test_incompatible_engines_are_refused_with_the_rebuild_commands(info, machine, reasons):
    with pytest.raises(EngineCompatibilityError) as caught:
        check_engine_compatible(info, machine, RECIPE)
    message = str(caught.value)
    assert message.startswith("ctm: this TensorRT engine cannot run here: ")
    for reason in reasons:
        assert reason in message
    assert f"bash ENGINE_BUNDLE/ctm.trtexec.sh, which runs {TRTEXEC_LINE};" in message
    export = message[message.index("conceptseg-edge export tensorrt ONNX_BUNDLE --out ENGINE_BUNDLE"):]
    assert "--precision fp16 --workspace 2 " in export
    # every --profile flag parses back to the recorded profile: the command rebuilds this very engine
    overrides = [parse_profile_override(flag) for flag in export.split("--profile ")[1:]]
    assert overrides == [("ctm", p) for p in info.profile.inputs] and overrides


def test_same_capability_other_gpu_model_warns_as_tensorrt_does():
    with pytest.warns(RuntimeWarning, match="engine built on Orin, running on Jetson AGX Orin Industrial"):
        check_engine_compatible(_info(), TrtMachine("10.3.0", "Jetson AGX Orin Industrial", "8.7"), RECIPE)


def test_recipe_without_trtexec_is_quoted_whole():
    with pytest.raises(EngineCompatibilityError, match="which runs echo rebuild me;"):
        check_engine_compatible(_info(), TrtMachine("10.4.0", "Orin", "8.7"), "echo rebuild me\n")


@pytest.fixture
def engine_bundle(tmp_path) -> Path:
    """The embedded bundle with its CTM and SAM2 encoder parts recorded as TensorRT engines built on an Orin.

    The .plan files are placeholders: these tests stop before anything would deserialize them. The
    manifest and hashes are real, so the bundle passes ``load_bundle``.
    """
    bundle = tmp_path / "engines"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    manifest = load_bundle(bundle)
    parts, files = {}, dict(manifest.files)
    for name, profile in (("ctm", CTM_PROFILE), ("sam2_encoder", PartProfile("sam2_encoder"))):  # the encoder is static
        plan, recipe = bundle / f"{name}.plan", bundle / f"{name}.trtexec.sh"
        plan.write_bytes(b"placeholder, not a TensorRT engine")
        recipe.write_text(RECIPE.replace("ctm", name), encoding="utf-8")
        info = _info(tensorrt_version="8.6.0", profile=profile, recipe=recipe.name)
        parts[name] = dataclasses.replace(manifest.part(name), file=plan.name, sha256=sha256_file(plan), format="tensorrt",
                                          precision="fp16", opset=None, parity=None, engine=info)
        files[recipe.name] = sha256_file(recipe)
    write_manifest(bundle, dataclasses.replace(manifest.with_parts(**parts), files=files))
    return bundle


def test_engine_part_needs_tensorrt(engine_bundle):
    part = load_bundle(engine_bundle).part("ctm")
    if is_available("tensorrt"):  # a TensorRT machine gets past the import: the recorded 8.6.0 is refused
        with pytest.raises(EngineCompatibilityError, match="built with TensorRT 8.6.0") as refused:
            open_trt_engine(engine_bundle, part, "tensorrt")
        assert f"bash {engine_bundle / 'ctm.trtexec.sh'}, which runs {TRTEXEC_LINE};" in str(refused.value)
        return
    with pytest.raises(EngineUnavailableError) as caught:
        open_trt_engine(engine_bundle, part, "tensorrt")
    assert str(caught.value).startswith(
        "tensorrt not importable: install conceptseg-edge[gpu] (on Jetson: JetPack's python3-libnvinfer)")
    assert isinstance(caught.value, DependencyError)  # the CLI's one-line error for a missing extra


@pytest.mark.parametrize("provider", ["cpu", "cuda", ProviderConfig("cpu", allow_fallback=True)])
def test_engine_part_runs_only_on_tensorrt(engine_bundle, provider):
    part = load_bundle(engine_bundle).part("ctm")
    with pytest.raises(InputError, match=r"part ctm of this bundle is a TensorRT engine.*pass --provider tensorrt, "
                                         r"or use the ONNX bundle"):
        open_trt_engine(engine_bundle, part, provider)


def test_runtime_opens_engine_parts_with_trt_engine(engine_bundle):
    """The default engine factory dispatches a tensorrt part here; a predictor over the bundle gets the same errors."""
    expected = EngineCompatibilityError if is_available("tensorrt") else EngineUnavailableError
    with pytest.raises(expected):
        open_engine(engine_bundle, load_bundle(engine_bundle).part("ctm"), "tensorrt")
    with pytest.raises(expected):
        SAM2Predictor.from_bundle(engine_bundle, "tensorrt")
    with pytest.raises(InputError, match="part sam2_encoder of this bundle is a TensorRT engine"):
        SAM2Predictor.from_bundle(engine_bundle, "cpu")


def test_onnx_part_is_not_an_engine(engine_bundle):
    part = load_bundle(engine_bundle).part("sam2_decoder")
    with pytest.raises(ManifestError, match="parts.sam2_decoder: format 'onnx' with no engine record"):
        open_trt_engine(engine_bundle, part, "tensorrt")


def test_cuda_failures_name_the_call():
    try:
        import_cudart()
    except EngineUnavailableError as exc:  # an install without the gpu extra
        assert str(exc).startswith("cuda-python not importable: install conceptseg-edge[gpu]")
        return
    # No driver here, no device 4096 anywhere: either way CUDA's error, named with the call.
    with pytest.raises(EngineRunError, match=r"^cudaGetDeviceProperties\(4096\): cudaError\w+ \("):
        cuda_device(4096)


# --- with TensorRT and a GPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt():
    try:
        return import_tensorrt()
    except EngineUnavailableError:
        pytest.skip("tensorrt not importable")


TOY_PROFILE = PartProfile("toy", (
    InputProfile("x", (1, 4), (2, 4), (4, 4)),
    InputProfile("idx", (1,), (2,), (4,)),
    InputProfile("h", (1, 4), (2, 4), (4, 4)),
    InputProfile("pts", (1, 0, 2), (2, 3, 2), (4, 16, 2)),
))


def _toy_onnx(path: Path) -> Path:
    """y = x + float(idx), positive = x > 0, idx_next = idx + 1 (int64), h2 = h * h (fp16), scaled = 2 * pts."""
    import onnx
    from onnx import TensorProto, helper

    def value(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["idx"], ["idx_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["idx_f", "axis1"], ["idx_col"]),
            helper.make_node("Add", ["x", "idx_col"], ["y"]),
            helper.make_node("Greater", ["x", "zero"], ["positive"]),
            helper.make_node("Add", ["idx", "one"], ["idx_next"]),
            helper.make_node("Mul", ["h", "h"], ["h2"]),
            helper.make_node("Mul", ["pts", "two"], ["scaled"]),
        ],
        "toy",
        [value("x", TensorProto.FLOAT, ["batch", 4]), value("idx", TensorProto.INT64, ["batch"]),
         value("h", TensorProto.FLOAT16, ["batch", 4]), value("pts", TensorProto.FLOAT, ["batch", "num_points", 2])],
        [value("y", TensorProto.FLOAT, ["batch", 4]), value("positive", TensorProto.BOOL, ["batch", 4]),
         value("idx_next", TensorProto.INT64, ["batch"]), value("h2", TensorProto.FLOAT16, ["batch", 4]),
         value("scaled", TensorProto.FLOAT, ["batch", "num_points", 2])],
        [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]), helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("one", TensorProto.INT64, [], [1]), helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _build_plan(trt, onnx_path: Path, plan_path: Path, profile: PartProfile) -> Path:
    """Build the engine with the TensorRT 10 API: ONNX parser, one optimization profile, serialized plan."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise AssertionError([str(parser.get_error(i)) for i in range(parser.num_errors)])
    config = builder.create_builder_config()
    optimization = builder.create_optimization_profile()
    for p in profile.inputs:
        optimization.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None, "TensorRT could not build the toy engine"
    with open(plan_path, "wb") as fh:
        fh.write(plan)
    return plan_path


@pytest.fixture(scope="module")
def toy(trt, tmp_path_factory):
    """(bundle dir, the toy part as an engine bundle records it, the ONNX Runtime engine of its graph)."""
    from conceptseg_edge.runtime.engine import OrtEngine

    root = tmp_path_factory.mktemp("toy")
    onnx_path = _toy_onnx(root / "toy.onnx")
    plan = _build_plan(trt, onnx_path, root / "toy.plan", TOY_PROFILE)
    (root / "toy.trtexec.sh").write_text("trtexec --onnx=toy.onnx --saveEngine=toy.plan\n", encoding="utf-8")
    ort = OrtEngine(onnx_path)
    machine = trt_machine()
    info = EngineInfo(machine.tensorrt_version, machine.gpu_name, machine.compute_capability, "fp32", TOY_PROFILE, (),
                      "none", sha256_file(onnx_path), "toy.trtexec.sh")
    part = PartManifest("toy", "toy.plan", sha256_file(plan), "tensorrt", "fp32", None, ort.inputs, ort.outputs, engine=info)
    return root, part, ort


def _feeds(batch: int, points: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 4)).astype(np.float32),
        "idx": rng.integers(-5, 5, batch).astype(np.int64),
        "h": rng.standard_normal((batch, 4)).astype(np.float16),
        "pts": rng.standard_normal((batch, points, 2)).astype(np.float32),
    }


@pytest.mark.trt
@pytest.mark.gpu
def test_trt_engine_matches_onnx_runtime(toy):
    root, part, ort = toy
    engine = open_trt_engine(root, part, "tensorrt")
    assert engine.provider.startswith("TensorRT ")
    for batch, points in [(1, 1), (2, 3), (4, 16), (2, 0), (1, 0)]:  # points 0: the concept routes' empty prompt
        feeds = _feeds(batch, points)
        got, want = engine.run(feeds), ort.run(feeds)
        assert set(got) == set(want)
        for name, expected in want.items():
            assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
            tolerance = 1e-3 if expected.dtype == np.float16 else 0
            np.testing.assert_allclose(got[name], expected, rtol=tolerance, atol=tolerance, err_msg=name)
    engine.close()


@pytest.mark.trt
@pytest.mark.gpu
def test_device_buffers_are_reused(toy):
    root, part, _ = toy
    engine = open_trt_engine(root, part, "tensorrt")
    engine.run(_feeds(2, 3))
    first = engine.device_addresses()
    assert set(first) == {t.name for t in (*part.inputs, *part.outputs)}
    engine.run(_feeds(2, 3, seed=1))
    assert engine.device_addresses() == first  # same shape: same buffers
    engine.run(_feeds(4, 16))
    grown = engine.device_addresses()
    engine.run(_feeds(1, 0))
    assert engine.device_addresses() == grown  # smaller shapes fit the grown buffers
    engine.close()
    with pytest.raises(EngineIOError, match="the TensorRT engine is closed"):
        engine.run(_feeds(1, 1))


@pytest.mark.trt
@pytest.mark.gpu
def test_shape_outside_the_profile_is_refused_by_name(toy):
    root, part, _ = toy
    engine = open_trt_engine(root, part, "tensorrt")
    with pytest.raises(InputError, match=r"toy\.x: shape \(5, 4\) is outside the engine's profile"):
        engine.run(_feeds(5, 1))
    with pytest.raises(InputError, match=r"toy\.pts: shape \(1, 17, 2\) is outside"):
        engine.run(_feeds(1, 17))
    engine.close()


@pytest.mark.trt
@pytest.mark.gpu
def test_engine_io_must_match_the_manifest(toy):
    root, part, _ = toy
    renamed = dataclasses.replace(part, outputs=tuple(dataclasses.replace(t, name=f"{t.name}_") if t.name == "y" else t
                                                      for t in part.outputs))
    with pytest.raises(ManifestError, match=r"engine inputs .* != manifest inputs"):
        TrtEngine(root / "toy.plan", renamed)
    retyped = dataclasses.replace(part, inputs=tuple(dataclasses.replace(t, dtype="int32") if t.name == "idx" else t
                                                     for t in part.inputs))
    with pytest.raises(ManifestError, match="tensor 'idx' is int64 in the engine, int32 in the manifest"):
        TrtEngine(root / "toy.plan", retyped)


@pytest.mark.parametrize("flags", [["--provider", "tensorrt"], ["--provider", "tensorrt", "--allow-fallback"]])
def test_segment_on_an_engine_bundle_asks_for_tensorrt_not_an_ort_provider(engine_bundle, tmp_path, capsys, flags):
    """An engine bundle runs on TensorRT itself: the command checks TensorRT, never ONNX Runtime's provider
    list (whose fix, "install onnxruntime-gpu", would be wrong), and no fallback pretends to run it."""
    from conceptseg_edge.cli import main

    out = tmp_path / "mask.png"
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main(["segment", str(engine_bundle), str(image), "--box", "2,2,20,20", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code != 0 and not out.exists()
    # with TensorRT the placeholder engines' recorded 8.6.0 is refused instead
    expected = "built with TensorRT 8.6.0" if is_available("tensorrt") else "tensorrt not importable: install conceptseg-edge[gpu]"
    assert expected in err
    assert "onnxruntime" not in err and "CPUExecutionProvider" not in err


def test_segment_on_an_engine_bundle_refuses_cpu(engine_bundle, tmp_path, capsys):
    from conceptseg_edge.cli import main

    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main(["segment", str(engine_bundle), str(image), "--box", "2,2,20,20", "--out", str(tmp_path / "m.png"),
                 "--provider", "cpu", "--allow-fallback"])
    assert code != 0
    assert "this bundle holds TensorRT engines, which only TensorRT runs; pass --provider tensorrt" in capsys.readouterr().err
