"""Triton ``tensorrt_plan`` models from an engine bundle (issue 12, deliverable 7).

The repository writer never runs an engine, so the CPU tests build an engine bundle as data: the embedded
bundle with every part rewritten to format ``tensorrt``, an ``EngineInfo`` whose profile is
``derive_profile`` of that part, a placeholder ``.plan`` and a trtexec recipe, all with their sha256s. Every
generated ``config.pbtxt`` is read back through Triton's protobuf and checked against the profile the way
the tensorrt backend checks it at load (tensorrt_backend ``ValidateDimension``: a config dim that is not -1
must lie in the profile's [min, max]; ``max_batch_size`` at most the profile's batch max). A real CPU
tritonserver (the nvidia-pytriton wheel's, no tensorrt backend) runs a plan model's warm-up sample on the
decoder's python-backend graph model, and fails the load on a sample that fails. The ``trt``+``gpu`` test
serves real engines through a tritonserver that has the tensorrt backend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.cli.demo import DEFAULT_BUNDLE
from conceptseg_edge.errors import InputError, ManifestError
from conceptseg_edge.generation import DEFAULT_MAX_NEW_TOKENS
from conceptseg_edge.manifest import PROCESSOR_DIR, EngineInfo, PartManifest, TensorSpec, load_bundle, write_manifest
from conceptseg_edge.profiles import InputProfile, PartProfile, bundle_dim_ranges, derive_profile
from conceptseg_edge.runtime.policy_image import PolicyImageConfig
from conceptseg_edge.serve.model_config import (
    TRITON_TYPES,
    ModelConfig,
    ModelConfigError,
    ModelWarmup,
    TensorConfig,
    WarmupInput,
    read_config,
    validate_pbtxt,
)
from conceptseg_edge.serve.repository import NO_ZERO_WARMUP, PLAN_FILE, RepositoryConfig, build_repository, plan_model_config
from conceptseg_edge.runtime.tracker import VIDEO_PARTS

from test_triton import needs_server  # the same tritonserver check as the other Triton tests

KIND_CPU, KIND_GPU = 2, 1  # model_config_pb2.ModelInstanceGroup.Kind


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def engine_info(part: PartManifest, profile: PartProfile, recipe: str) -> EngineInfo:
    return EngineInfo(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                      profile=profile, builder_flags=("FP16",), hardware_compatibility="none", onnx_sha256=part.sha256,
                      recipe=recipe, workspace_gb=None)


def make_engine_bundle(src: Path, dst: Path) -> Path:
    """``src`` with every part an 'engine': placeholder plan bytes, a recipe, an EngineInfo with its real profile."""
    manifest = load_bundle(src)
    image = PolicyImageConfig.from_dir(src / PROCESSOR_DIR)
    ranges = bundle_dim_ranges(DEFAULT_MAX_NEW_TOKENS, min_patches=image.min_pixels // image.patch_size**2,
                               max_patches=image.max_pixels // image.patch_size**2, merge_size=image.merge_size)
    dst.mkdir()
    for rel in manifest.files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst / rel)
    files = dict(manifest.files)
    parts = {}
    for name, part in manifest.parts.items():
        profile = derive_profile(name, part.inputs, ranges)
        plan = f"placeholder engine of {name}\n".encode() + bytes(range(256))
        recipe = f"{name}.trtexec.sh"
        recipe_text = " ".join(["trtexec", f"--onnx={name}.onnx", f"--saveEngine={name}.plan", *profile.trtexec_flags()]) + "\n"
        (dst / f"{name}.plan").write_bytes(plan)
        (dst / recipe).write_text(recipe_text)
        files[recipe] = _sha256(recipe_text.encode())
        parts[name] = dataclasses.replace(part, file=f"{name}.plan", sha256=_sha256(plan), format="tensorrt", precision="fp16",
                                          opset=None, engine=engine_info(part, profile, recipe))
    write_manifest(dst, dataclasses.replace(manifest, parts=parts, files=files))
    load_bundle(dst)  # a valid engine bundle: the strict reader and every hash agree
    return dst


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory) -> Path:
    return make_engine_bundle(DEFAULT_BUNDLE, tmp_path_factory.mktemp("engines") / "bundle")


@pytest.fixture(scope="module")
def plan_repo(engine_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan-repo") / "repo"
    build_repository(engine_bundle, out, RepositoryConfig(instances=2))  # no flavor: the bundle decides
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conceptseg_edge", *map(str, args)], capture_output=True, text=True, timeout=120)


def _dtype(dtype: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Value(TRITON_TYPES[dtype])


def _fits(config_dims, lo, hi) -> bool:
    """The tensorrt backend's ``ValidateDimension``: -1 passes, any other dim must lie in [min, max]."""
    return len(config_dims) == len(lo) and all(d == -1 or a <= d <= b for d, a, b in zip(config_dims, lo, hi))


# ---------------------------------------------------------------------------- the engine bundle's repository


def test_an_engine_bundle_builds_plan_models_shaped_by_their_profiles(engine_bundle, plan_repo):
    from conceptseg_edge.serve.repository import read_repository

    manifest = load_bundle(engine_bundle)
    repo = read_repository(plan_repo)
    assert repo.flavor == "native" and repo.config.flavor == "native"
    assert set(repo.models) == {*manifest.parts, "conceptseg"}
    for name, part in manifest.parts.items():
        profile = {p.name: p for p in part.engine.profile.inputs}
        message = read_config(plan_repo / name / "config.pbtxt")  # Triton's own protobuf
        assert message.platform == "tensorrt_plan" and not message.backend and message.default_model_filename == PLAN_FILE
        assert [(g.kind, g.count) for g in message.instance_group] == [(KIND_GPU, 2)]
        # No part of this bundle shares one symbolic leading axis across all its IO (the decoder's image
        # features are batch-1 fixed, the policy graphs lead with 1): no implicit batch dimension anywhere.
        assert message.max_batch_size == 0 and not message.HasField("dynamic_batching")
        assert repo.models[name].backend == "tensorrt_plan" and repo.models[name].max_batch_size == 0
        assert (plan_repo / name / "1" / PLAN_FILE).read_bytes() == (engine_bundle / part.file).read_bytes()
        assert sorted(p.name for p in (plan_repo / name / "1").iterdir()) == [PLAN_FILE]
        assert [i.name for i in message.input] == [t.name for t in part.inputs]
        for got, spec in zip(message.input, part.inputs):
            assert got.data_type == _dtype(spec.dtype)
            p = profile.get(spec.name)
            if p is None:  # static input: exactly its shape
                assert list(got.dims) == list(spec.shape)
                continue
            assert list(got.dims) == [-1 if lo != hi else lo for lo, hi in zip(p.min, p.max)], spec.name
            assert _fits(list(got.dims), p.min, p.max)
        for got, spec in zip(message.output, part.outputs):
            assert got.name == spec.name and list(got.dims) == [d if isinstance(d, int) else -1 for d in spec.shape]
        if NO_ZERO_WARMUP & {t.name for t in part.inputs}:  # zeros are no valid sample: no warm-up
            assert name == "policy_vision" and not message.model_warmup
            continue
        (warmup,) = message.model_warmup
        assert warmup.batch_size == 1 and set(warmup.inputs) == {t.name for t in part.inputs}
        for spec in part.inputs:
            sample = warmup.inputs[spec.name]
            opt = profile[spec.name].opt if spec.name in profile else spec.shape
            assert list(sample.dims) == list(opt) and sample.WhichOneof("input_data_type") == "zero_data"
            assert sample.data_type == next(i.data_type for i in message.input if i.name == spec.name)
            lo, hi = (profile[spec.name].min, profile[spec.name].max) if spec.name in profile else (spec.shape, spec.shape)
            assert _fits(list(sample.dims), lo, hi)
    decoder = read_config(plan_repo / "sam2_decoder" / "config.pbtxt")
    dims = {i.name: list(i.dims) for i in decoder.input}
    assert dims["image_embed"] == [1, 256, 8, 8] and dims["point_coords"] == [-1, -1, 2] and dims["concept_tokens"] == [-1, -1, 256]
    assert list(decoder.model_warmup[0].inputs["point_coords"].dims) == [1, 2, 2]  # one click + padding
    policy = {i.name: list(i.dims) for i in read_config(plan_repo / "policy_decoder" / "config.pbtxt").input}
    assert policy["position_ids"] == [3, 1, -1] and policy["past_key_values.0.key"] == [1, 2, -1, 32]


def test_the_router_calls_the_plan_models_by_part_name(engine_bundle, plan_repo):
    """BLS calls carry the manifest's names and dtypes: the router finds each part's model and the same IO."""
    from conceptseg_edge.serve.parameters import RouterParameters
    from conceptseg_edge.serve.serving import ServedModel

    def params_dict(message) -> dict[str, str]:
        return {k: v.string_value for k, v in message.parameters.items()}

    manifest = load_bundle(engine_bundle)
    router = read_config(plan_repo / "conceptseg" / "config.pbtxt")
    params = RouterParameters.from_parameters(params_dict(router))
    assert params.engines == "bls" and dict(params.graph_models) == {n: n for n in manifest.parts}
    assert router.instance_group[0].kind == KIND_CPU  # the BLS glue needs no GPU
    copied = plan_repo / "conceptseg" / "1" / "bundle"
    assert (copied / "manifest.json").is_file() and all((copied / rel).is_file() for rel in manifest.files)
    assert not list(copied.glob("*.plan"))  # the engines live in their own models only
    # The router model as Triton's python backend builds it (no BLS call is made while building): every
    # route of the engine bundle comes up, each part a BLS engine to its plan model.
    served = ServedModel.from_parameters(params_dict(router), plan_repo / "conceptseg" / "1", pb_utils=object())
    # the segmenter runs every part but the tracker's (the stream model serves those)
    assert served.segmenter.providers() == {n: f"triton-bls:{n}" for n in manifest.parts if n not in VIDEO_PARTS}
    for name, part in manifest.parts.items():
        message = read_config(plan_repo / name / "config.pbtxt")
        assert [(t.name, _dtype(t.dtype)) for t in part.inputs] == [(i.name, i.data_type) for i in message.input]
        assert [(t.name, _dtype(t.dtype)) for t in part.outputs] == [(o.name, o.data_type) for o in message.output]


def test_engine_bundle_on_cpu_is_refused_before_anything_is_written(engine_bundle, tmp_path):
    for cfg in (RepositoryConfig(device="cpu"), RepositoryConfig(flavor="python"), RepositoryConfig(flavor="native", device="cpu")):
        with pytest.raises(InputError, match=r"TensorRT engines, which run on a GPU only"):
            build_repository(engine_bundle, tmp_path / "repo", cfg)
    with pytest.raises(InputError, match=r"part sam2_encoder is tensorrt, only onnx parts run under ORT"):
        build_repository(engine_bundle, tmp_path / "repo", RepositoryConfig(graph_backend="python"))
    proc = cli("triton", "build", engine_bundle, "--out", tmp_path / "repo", "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--device cpu: parts ['ctm', 'policy_decoder', 'policy_embed', 'policy_vision', 'sam2_decoder', 'sam2_encoder', " \
           "'sam2_memory_attention', 'sam2_memory_encoder', 'sam2_video_decoder'] " \
           "are TensorRT engines, which run on a GPU only" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_build_cli_picks_the_native_flavor_for_an_engine_bundle(engine_bundle, tmp_path):
    proc = cli("triton", "build", engine_bundle, "--out", tmp_path / "repo", "--no-warmup")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["flavor"] == "native"
    assert {name: m["backend"] for name, m in printed["models"].items()} == {
        **{name: "tensorrt_plan" for name in load_bundle(engine_bundle).parts}, "conceptseg": "python"}
    assert not read_config(tmp_path / "repo" / "ctm" / "config.pbtxt").model_warmup  # --no-warmup: none


def test_an_onnx_bundle_still_defaults_to_the_python_flavor(tmp_path):
    from conceptseg_edge.serve.repository import read_repository

    build_repository(DEFAULT_BUNDLE, tmp_path / "repo")
    assert read_repository(tmp_path / "repo").flavor == "python"
    assert RepositoryConfig().for_bundle(load_bundle(DEFAULT_BUNDLE)).flavor == "python"


# ---------------------------------------------------------------------------- batching from the profile


def _batched_part(ranges_max_batch: int = 4, overrides=(), batch_min: int | None = None) -> PartManifest:
    """A CTM-like engine whose every input and output leads with the symbolic ``batch``."""
    inputs = (TensorSpec("hidden_states", "float32", ("batch", "seq", 128)), TensorSpec("lengths", "int64", ("batch", 1)))
    outputs = (TensorSpec("concept_tokens", "float32", ("batch", 8, 256)), TensorSpec("echo", "float32", ("batch", "seq")))
    ranges = bundle_dim_ranges(64, max_batch=ranges_max_batch) | {"seq": bundle_dim_ranges(64)["completion_len"]}
    if batch_min is not None:
        ranges["batch"] = dataclasses.replace(ranges["batch"], min=batch_min, opt=batch_min)
    part = PartManifest("ctm_b", "ctm_b.plan", "0" * 64, "tensorrt", "fp16", None, inputs, outputs)
    return dataclasses.replace(part, engine=engine_info(part, derive_profile("ctm_b", inputs, ranges, overrides), "ctm_b.sh"))


def test_a_shared_batch_axis_batches_up_to_the_profile_max():
    part = _batched_part(ranges_max_batch=4)
    config = plan_model_config(part, None, 1)
    assert config.max_batch_size == 4 and config.dynamic_batching.preferred_batch_size == (2, 4)
    assert [t.dims for t in config.inputs] == [(-1, 128), (1,)] and [t.dims for t in config.outputs] == [(8, 256), (-1,)]
    (warmup,) = config.warmup
    assert warmup.batch_size == 1 and {k: v.dims for k, v in warmup.inputs.items()} == {"hidden_states": (64, 128), "lengths": (1,)}
    message = validate_pbtxt(config.to_pbtxt(), expected=config)
    assert message.max_batch_size == 4 and list(message.model_warmup[0].inputs["hidden_states"].dims) == [64, 128]
    assert plan_model_config(part, 2, 1).max_batch_size == 2  # fewer than the engine allows is fine
    unbatched = plan_model_config(part, 0, 1)  # --max-batch 0: full shapes, the batch axis dynamic
    assert unbatched.max_batch_size == 0 and unbatched.dynamic_batching is None
    assert [t.dims for t in unbatched.inputs] == [(-1, -1, 128), (-1, 1)] and unbatched.warmup[0].inputs["lengths"].dims == (1, 1)
    with pytest.raises(InputError, match=r"--max-batch 16: the ctm_b engine serves batches up to 4 \(its profile\)"):
        plan_model_config(part, 16, 1)
    no_single = plan_model_config(_batched_part(batch_min=2), None, 1)  # the batcher's single requests would not fit
    assert no_single.max_batch_size == 0 and no_single.inputs[0].dims == (-1, -1, 128)
    # A [batch]-only tensor would have empty dims once batched, which Triton refuses: not batched.
    flat = dataclasses.replace(part, inputs=(part.inputs[0], TensorSpec("lengths", "int64", ("batch",))),
                               engine=dataclasses.replace(part.engine, profile=PartProfile("ctm_b", (
                                   part.engine.profile.inputs[0], InputProfile("lengths", (1,), (1,), (4,))))))
    assert plan_model_config(flat, None, 1).max_batch_size == 0 and plan_model_config(flat, None, 1).inputs[1].dims == (-1,)
    with pytest.raises(ModelConfigError, match="lengths: empty dims"):
        ModelConfig("m", (TensorConfig("lengths", "int64", ()),), (TensorConfig("y", "float32", (2,)),),
                    platform="tensorrt_plan", max_batch_size=4)


def test_a_dim_the_profile_fixes_is_written_and_carried_to_outputs_of_that_name():
    fixed = InputProfile("hidden_states", (1, 5, 128), (1, 5, 128), (4, 5, 128))
    config = plan_model_config(_batched_part(overrides=[fixed]), None, 1)
    assert config.inputs[0].dims == (5, 128) and config.outputs[1].dims == (5,)  # output 'echo' is ('batch', 'seq')
    assert config.warmup[0].inputs["hidden_states"].dims == (5, 128)


def test_a_profile_that_does_not_fit_the_part_is_a_manifest_error():
    part = _batched_part()
    stray = dataclasses.replace(part.engine, profile=PartProfile("ctm_b", (*part.engine.profile.inputs,
                                                                           InputProfile("nope", (1,), (1,), (1,)))))
    with pytest.raises(ManifestError, match=r"parts.ctm_b.engine.profile: profiles for \['nope'\]"):
        plan_model_config(dataclasses.replace(part, engine=stray), None, 1)
    missing = dataclasses.replace(part.engine, profile=PartProfile("ctm_b", part.engine.profile.inputs[:1]))
    with pytest.raises(ManifestError, match=r"input lengths has dynamic shape \['batch', 1\] but no profile"):
        plan_model_config(dataclasses.replace(part, engine=missing), None, 1)
    rank = dataclasses.replace(part.engine, profile=PartProfile("ctm_b", (InputProfile("hidden_states", (1, 1), (1, 1), (1, 1)),
                                                                         part.engine.profile.inputs[1])))
    with pytest.raises(ManifestError, match=r"hidden_states: min \[1, 1\] / max \[1, 1\] do not fit"):
        plan_model_config(dataclasses.replace(part, engine=rank), None, 1)
    with pytest.raises(ManifestError, match=r"parts.ctm_b.engine: a 'tensorrt' part must record its engine"):
        plan_model_config(dataclasses.replace(part, engine=None), None, 1)


@needs_server
def test_tritonserver_runs_the_plan_warmup_at_load_and_fails_the_load_when_it_fails(tiny_bundle, tmp_path):
    """The warm-up a plan model gets, as Triton's core reads and runs it. Without the tensorrt backend here,
    the decoder's python-backend graph model (ONNX Runtime) carries the decoder engine's sample: it loads READY,
    and a sample ONNX Runtime refuses (2 points, 3 labels) fails the load, so the first one really ran."""
    from conceptseg_edge.serve.repository import graph_model_config
    from conceptseg_edge.serve.server import ServerStartError, TritonServer

    built = tmp_path / "built"
    build_repository(tiny_bundle, built, RepositoryConfig(flavor="native", device="cpu", graph_backend="python"))
    part = load_bundle(tiny_bundle).part("sam2_decoder")
    profile = derive_profile(part.name, part.inputs, bundle_dim_ranges(DEFAULT_MAX_NEW_TOKENS))
    plan = plan_model_config(dataclasses.replace(part, format="tensorrt", engine=engine_info(part, profile, "r.sh")), None, 1)
    (warmup,) = plan.warmup
    bad = ModelWarmup("mismatched", {**warmup.inputs, "point_labels": WarmupInput("int32", (1, 3))})
    served = graph_model_config(part, None, "cpu", 1, "python")
    for sample in (warmup, bad):
        repo = tmp_path / sample.name
        shutil.copytree(built / "sam2_decoder", repo / "sam2_decoder")
        (repo / "sam2_decoder" / "config.pbtxt").write_text(dataclasses.replace(served, warmup=(sample,)).to_pbtxt())
        server = TritonServer(repo, log_path=tmp_path / f"{sample.name}.log", startup_timeout=300)
        if sample is warmup:
            with server:
                assert server.is_ready()
            continue
        try:
            with pytest.raises(ServerStartError, match="failed to run warmup sample 'mismatched'"):
                server.start()
        finally:
            server.stop()


# ---------------------------------------------------------------------------- model_warmup in ModelConfig


def _config(**kw) -> ModelConfig:
    inputs = (TensorConfig("x", "float32", (-1, 4)), TensorConfig("ids", "int64", (-1,)), TensorConfig("opt", "float32", (2,), optional=True))
    return ModelConfig("m", inputs, (TensorConfig("y", "float32", (-1,)),), platform="tensorrt_plan", **kw)


def test_warmup_samples_are_checked_against_the_inputs():
    good = ModelWarmup("w", {"x": WarmupInput("float32", (3, 4)), "ids": WarmupInput("int64", (0,), "random_data")})
    config = _config(warmup=(good,))
    message = validate_pbtxt(config.to_pbtxt(), expected=config)
    assert message.model_warmup[0].inputs["ids"].WhichOneof("input_data_type") == "random_data"
    for sample, match in [
        (ModelWarmup("w", {"x": WarmupInput("float32", (3, 4))}), r"required inputs \['ids'\] have no warm-up data"),
        (ModelWarmup("w", {**good.inputs, "z": WarmupInput("float32", (1,))}), r"inputs \['z'\] are not inputs"),
        (ModelWarmup("w", {**good.inputs, "x": WarmupInput("float32", (3, 5))}), r"inputs\[x\].dims: \[3, 5\] do not fit"),
        (ModelWarmup("w", {**good.inputs, "ids": WarmupInput("int32", (2,))}), r"inputs\[ids\].dtype: int32, the input is int64"),
        (ModelWarmup("w", good.inputs, batch_size=2), r"batch_size: 2, a model without batching takes 1"),
    ]:
        with pytest.raises(ModelConfigError, match=match):
            _config(warmup=(sample,))
    for bad, match in [(lambda: WarmupInput("float32", (-1,)), r"each dim must be an int >= 0"),
                       (lambda: WarmupInput("float32", (1,), "file_data"), r"expected one of \('zero_data', 'random_data'\)"),
                       (lambda: ModelWarmup("w", {}), "needs at least one input")]:
        with pytest.raises(ModelConfigError, match=match):
            bad()


def test_a_warmup_that_parses_differently_is_caught():
    config = _config(warmup=(ModelWarmup("w", {"x": WarmupInput("float32", (3, 4)), "ids": WarmupInput("int64", (2,))}),))
    text = config.to_pbtxt()
    assert "zero_data: true" in text
    with pytest.raises(ModelConfigError, match=r"model_warmup w.inputs parsed as"):
        validate_pbtxt(text.replace("zero_data: true", "random_data: true", 1), expected=config)


# ---------------------------------------------------------------------------- real engines (TensorRT + GPU)


def _tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_available(), reason="tensorrt not importable")
def test_tritonserver_serves_real_engines_like_the_onnx_runtime(tiny_bundle, sample_image, tmp_path):
    """Real fp32 engines of the SAM2-tiny prompt bundle under tritonserver's tensorrt backend: the plan
    models load (their model_warmup runs at the profile's opt shapes) and the router's mask over BLS agrees
    with ONNX Runtime CPU on the source bundle."""
    from export.tensorrt import TrtBuildConfig, build_engine_bundle

    from conceptseg_edge.runtime.segmenter import ConceptSegmenter
    from conceptseg_edge.serve.client import TritonSegClient
    from conceptseg_edge.serve.server import TritonServer, find_tritonserver

    install = find_tritonserver()
    if not (install.backends / "tensorrt").is_dir():
        pytest.skip(f"{install.binary}: no tensorrt backend under {install.backends} (use the NGC Triton container)")
    build_engine_bundle(tiny_bundle, tmp_path / "engines", TrtBuildConfig(precision="fp32"), progress=False)
    build_repository(tmp_path / "engines", tmp_path / "repo")
    prompt = {"box": [110, 190, 290, 370]}
    expected = ConceptSegmenter.from_bundle(tiny_bundle).segment(sample_image, **prompt)
    with TritonServer(tmp_path / "repo", log_path=tmp_path / "server.log", startup_timeout=600) as srv:
        with TritonSegClient(srv.grpc_url) as client:
            got = client.segment(sample_image, **prompt)
    inter = np.logical_and(got.mask, expected.mask).sum()
    union = np.logical_or(got.mask, expected.mask).sum()
    assert union == 0 or inter / union >= 0.98, f"mask IoU {inter / union:.4f} vs ONNX Runtime CPU"
    assert got.score == pytest.approx(expected.score, abs=1e-2)
