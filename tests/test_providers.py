"""Execution providers: no silent fallback, the provider that ran recorded everywhere, GPU provider options.

This machine's onnxruntime has no CUDA or TensorRT provider, so asking for one is the real refusal path;
``--allow-fallback`` runs on CPU and every report says so. The option builders are pure and are checked
against the embedded bundle's manifest. The ``gpu`` test runs only where ONNX Runtime has CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conceptseg_edge.errors import InputError, ProviderError
from conceptseg_edge.manifest import QdqReport, load_bundle
from conceptseg_edge.profiles import bundle_dim_ranges
from conceptseg_edge.runtime.engine import OrtEngine, OrtEngineFactory, engine_factory_for, open_engine
from conceptseg_edge.runtime.providers import (
    CPU_EP,
    CUDA_EP,
    TENSORRT_EP,
    ProviderConfig,
    check_provider,
    check_session,
    cuda_options,
    explicit_int8,
    ort_providers,
    provider_note,
    provider_record,
    tensorrt_options,
    warmup_feeds,
)
from conceptseg_edge.runtime.segmenter import ConceptSegmenter
from conceptseg_edge.runtime.tracker import VIDEO_PARTS
from conceptseg_edge.timings import Timings

BUNDLE = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"
SAMPLE = BUNDLE.parent / "sample.png"
GPU_EPS = {"cuda": CUDA_EP, "tensorrt": TENSORRT_EP}
MISSING = [name for name, ep in GPU_EPS.items() if ep not in ort.get_available_providers()]


@pytest.fixture(scope="module")
def manifest():
    return load_bundle(BUNDLE)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conceptseg_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


# ---------------------------------------------------------------------------- choosing a provider


@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_a_missing_provider_is_an_error_naming_the_fix(name):
    with pytest.raises(ProviderError) as err:
        check_provider(ProviderConfig(name), [CPU_EP])
    message = str(err.value)
    assert f"provider '{name}'" in message and GPU_EPS[name] in message and "['CPUExecutionProvider']" in message
    assert "onnxruntime-gpu" in message and "--allow-fallback" in message
    assert isinstance(err.value, InputError)  # a request this machine cannot serve: exit code 2


def test_fallback_warns_and_takes_the_next_provider_in_the_chain():
    with pytest.warns(RuntimeWarning, match=r"'tensorrt'.*TensorrtExecutionProvider is not in.*running on CUDAExecutionProvider"):
        chosen = check_provider(ProviderConfig("tensorrt", allow_fallback=True), [CUDA_EP, CPU_EP])
    assert chosen == [CUDA_EP, CPU_EP]
    with pytest.warns(RuntimeWarning, match="running on CPUExecutionProvider"):
        assert check_provider(ProviderConfig("cuda", allow_fallback=True), [CPU_EP]) == [CPU_EP]
    assert check_provider(ProviderConfig("cuda"), [CUDA_EP, CPU_EP]) == [CUDA_EP, CPU_EP]  # present: no warning


def test_unknown_provider_name_is_refused():
    with pytest.raises(InputError, match="provider 'metal'"):
        ProviderConfig("metal")


def test_a_provider_dropped_at_session_creation_is_caught():
    """onnxruntime-gpu without its CUDA libraries (or a GPU) builds the session on CPU and only logs it."""
    with pytest.raises(ProviderError, match=r"enc\.onnx: ONNX Runtime could not start CUDAExecutionProvider.*--allow-fallback"):
        check_session(ProviderConfig("cuda"), [CUDA_EP, CPU_EP], [CPU_EP], "enc.onnx")
    with pytest.warns(RuntimeWarning, match="could not start TensorrtExecutionProvider"):
        ran = check_session(ProviderConfig("tensorrt", allow_fallback=True), [TENSORRT_EP, CUDA_EP, CPU_EP], [CUDA_EP, CPU_EP], "x")
    assert ran == CUDA_EP
    assert check_session(ProviderConfig("cuda"), [CUDA_EP, CPU_EP], [CUDA_EP, CPU_EP], "x") == CUDA_EP


@pytest.mark.skipif(not MISSING, reason="this onnxruntime has CUDA and TensorRT: no refusal to observe")
def test_engines_refuse_a_missing_provider_and_report_the_one_that_ran(manifest):
    name = MISSING[0]
    part = manifest.part("ctm")
    with pytest.raises(ProviderError, match=GPU_EPS[name]):
        open_engine(BUNDLE, part, name)  # the default factory is strict
    with pytest.raises(ProviderError):
        engine_factory_for(ProviderConfig(name))  # refused before any part is opened
    with pytest.warns(RuntimeWarning, match="--allow-fallback"):
        engine = OrtEngine(BUNDLE / part.file, ProviderConfig(name, allow_fallback=True), part)
    assert engine.provider == CPU_EP


@pytest.mark.skipif(not MISSING, reason="this onnxruntime has CUDA and TensorRT: no fallback to observe")
def test_segmenter_with_fallback_records_cpu_per_stage_and_part(manifest, sample_image):
    name = MISSING[0]
    config = ProviderConfig(name, allow_fallback=True)
    with pytest.warns(RuntimeWarning):
        seg = ConceptSegmenter.from_bundle(BUNDLE, name, engine_factory=OrtEngineFactory(config))
    image_parts = [part for part in manifest.parts if part not in VIDEO_PARTS]  # the tracker runs the others
    assert seg.providers() == {part: CPU_EP for part in image_parts}
    result = seg.segment(sample_image, points=[[40, 40]])
    assert result.timings.provider_map() == {"encoder": CPU_EP, "decoder": CPU_EP}
    assert provider_record(name, result.timings.provider_map())["provider"] == CPU_EP
    with pytest.raises(InputError, match="configured for"):
        ConceptSegmenter.from_bundle(BUNDLE, "cpu", engine_factory=OrtEngineFactory(config))


# ---------------------------------------------------------------------------- what ran, recorded


def test_timings_carry_providers_beside_the_stages():
    request = Timings(encoder=5.0, providers={"encoder": TENSORRT_EP}) | Timings(decoder=1.0, providers={"decoder": CPU_EP})
    assert dict(request) == request.to_dict() == {"encoder": 5.0, "decoder": 1.0}  # the JSON keys reports always had
    assert request.provider_map() == {"encoder": TENSORRT_EP, "decoder": CPU_EP}
    assert request.provider == "TensorrtExecutionProvider (encoder); CPUExecutionProvider (decoder)"
    assert Timings(decoder=1.0, providers={"decoder": CPU_EP}).provider == CPU_EP and Timings().provider == "none"
    assert hash(request) == hash(Timings(encoder=5.0, decoder=1.0, providers={"decoder": CPU_EP, "encoder": TENSORRT_EP}))


def test_provider_record_and_note_show_a_fallback():
    ran = {"sam2_encoder": CPU_EP, "sam2_decoder": CPU_EP}
    assert provider_record("cuda", ran) == {"provider_requested": "cuda", "provider": CPU_EP, "providers": ran}
    assert provider_note("cpu", ran) == CPU_EP
    assert provider_note("cuda", ran) == "CPUExecutionProvider (asked for cuda: FALLBACK)"
    mixed = {"sam2_encoder": TENSORRT_EP, "sam2_decoder": CUDA_EP}
    assert provider_note("tensorrt", mixed) == (
        "TensorrtExecutionProvider (sam2_encoder); CUDAExecutionProvider (sam2_decoder) (asked for tensorrt: FALLBACK on sam2_decoder)")


# ---------------------------------------------------------------------------- GPU provider options


def _shapes(option: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split("x")] for name, dims in (e.rsplit(":", 1) for e in option.split(","))}


@pytest.mark.parametrize("name", ["sam2_decoder", "ctm", "policy_decoder", "policy_embed"])
def test_tensorrt_profile_shapes_follow_the_manifest_dims(manifest, name):
    part = manifest.part(name)
    ranges = bundle_dim_ranges(ProviderConfig().max_new_tokens)
    options = tensorrt_options(ProviderConfig("tensorrt"), part)
    dynamic = [spec for spec in part.inputs if any(isinstance(d, str) for d in spec.shape)]
    for key in ("min", "opt", "max"):
        shapes = _shapes(options[f"trt_profile_{key}_shapes"])
        assert list(shapes) == [spec.name for spec in dynamic]  # static inputs need no profile
        for spec in dynamic:
            expected = [d if isinstance(d, int) else getattr(ranges[d], key) for d in spec.shape]
            assert shapes[spec.name] == expected, (key, spec)


def test_profile_ranges_come_from_the_bundles_processor(tmp_path):
    from conceptseg_edge.runtime.policy_image import PolicyImageConfig

    image = PolicyImageConfig.from_dir(BUNDLE / "processor")
    ranges = ProviderConfig("tensorrt").for_bundle(BUNDLE).ranges()
    patches = ranges["num_patches"]
    assert (patches.min, patches.max) == (image.min_pixels // image.patch_size**2, image.max_pixels // image.patch_size**2)
    explicit = ProviderConfig(dim_ranges=bundle_dim_ranges(8))
    assert explicit.for_bundle(BUNDLE) is explicit  # ranges given by the caller are kept
    assert ProviderConfig().for_bundle(tmp_path).ranges() == bundle_dim_ranges(ProviderConfig().max_new_tokens)  # no processor


def test_tensorrt_options_flags_and_caches(manifest, tmp_path):
    encoder = manifest.part("sam2_encoder")  # all static: no profile
    plain = tensorrt_options(ProviderConfig("tensorrt"), encoder)
    assert plain == {"device_id": "0", "trt_fp16_enable": "0", "trt_int8_enable": "0"}
    tuned = tensorrt_options(ProviderConfig("tensorrt", fp16=True, cache_dir=tmp_path, workspace_gb=2, device_id=1), encoder)
    assert tuned == {"device_id": "1", "trt_fp16_enable": "1", "trt_int8_enable": "0", "trt_max_workspace_size": str(2 << 30),
                     "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(tmp_path),
                     "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(tmp_path)}


def test_int8_flag_only_for_kept_qdq_graphs(manifest):
    dynamic_int8 = manifest.part("policy_decoder")  # ORT dynamic quantization (MatMulInteger): not TensorRT INT8
    assert dynamic_int8.precision == "int8" and not explicit_int8(dynamic_int8)
    assert tensorrt_options(ProviderConfig("tensorrt"), dynamic_int8)["trt_int8_enable"] == "0"
    report = QdqReport("int8", "onnxruntime quantize_static", "world:8", 8, "world:4", 4, 0.97, {"logits": 0.1}, {"mask_iou": 0.9}, True)
    ctm = dataclasses.replace(manifest.part("ctm"), precision="int8", qdq=report)
    assert tensorrt_options(ProviderConfig("tensorrt"), ctm)["trt_int8_enable"] == "1"
    failed = dataclasses.replace(ctm, precision="fp32", qdq=dataclasses.replace(report, passed=False))
    assert tensorrt_options(ProviderConfig("tensorrt"), failed)["trt_int8_enable"] == "0"  # kept its fp32 graph


def test_ort_provider_list_carries_each_providers_options(manifest):
    part = manifest.part("ctm")
    config = ProviderConfig("tensorrt", cudnn_conv_algo_search="EXHAUSTIVE")
    listed = ort_providers(config, part, [TENSORRT_EP, CUDA_EP, CPU_EP])
    assert [name for name, _ in listed] == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert listed[0][1] == tensorrt_options(config, part) and listed[2][1] == {}
    assert listed[1][1] == cuda_options(config) == {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE",
                                                    "do_copy_in_default_stream": "1", "arena_extend_strategy": "kSameAsRequested"}
    assert ort_providers(ProviderConfig(), part, [CPU_EP]) == [(CPU_EP, {})]


def test_warmup_feeds_run_on_cpu_at_the_profile_opt_shapes(manifest):
    config = ProviderConfig()
    for name in ("sam2_encoder", "sam2_decoder", "ctm", "policy_decoder"):
        part = manifest.part(name)
        feeds = warmup_feeds(part, config)
        for spec in part.inputs:
            assert feeds[spec.name].dtype == np.dtype(spec.dtype)
            assert all(s == d for s, d in zip(feeds[spec.name].shape, spec.shape) if isinstance(d, int))
        OrtEngine(BUNDLE / part.file, config, part).run(feeds)  # shapes the real graph accepts


# ---------------------------------------------------------------------------- the commands


def test_command_configs_build_their_provider_config(tmp_path):
    from conceptseg_edge.benchmarks.prompt import BenchConfig
    from conceptseg_edge.benchmarks.routes import RoutesBenchConfig
    from conceptseg_edge.benchmarks.triton import TritonBenchConfig
    from conceptseg_edge.cli.demo import DemoConfig
    from conceptseg_edge.generation import GenerationConfig

    expected = ProviderConfig("tensorrt", allow_fallback=True, cache_dir=tmp_path)
    for cls in (BenchConfig, TritonBenchConfig, DemoConfig):
        assert cls(provider="tensorrt", allow_fallback=True, trt_cache=str(tmp_path)).provider_config == expected
    routes = RoutesBenchConfig(provider="tensorrt", allow_fallback=True, trt_cache=str(tmp_path),
                               generation=GenerationConfig(max_new_tokens=32))
    assert routes.provider_config == dataclasses.replace(expected, max_new_tokens=32)  # the KV-cache profile's bound
    assert BenchConfig().provider_config == ProviderConfig()  # cpu, strict


def test_trt_cache_must_be_a_directory(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = cli("segment", BUNDLE, SAMPLE, "--point", "40,40", "--out", tmp_path / "m.png", "--no-bank", "--trt-cache", not_a_dir)
    assert proc.returncode == 2 and "--trt-cache" in proc.stderr and "not a directory" in proc.stderr
    assert not (tmp_path / "m.png").exists()


@pytest.mark.skipif(not MISSING, reason="this onnxruntime has CUDA and TensorRT: no refusal to observe")
@pytest.mark.parametrize("name", MISSING or ["cuda"])
def test_segment_refuses_a_missing_provider_and_writes_nothing(name, tmp_path):
    out, bank = tmp_path / "mask.png", tmp_path / "bank"
    proc = cli("segment", BUNDLE, SAMPLE, "--point", "40,40", "--out", out, "--bank", bank, "--provider", name)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert GPU_EPS[name] in proc.stderr and "--allow-fallback" in proc.stderr
    assert not out.exists() and not bank.exists()

    proc = cli("segment", BUNDLE, SAMPLE, "--concept", "red circle", "--out", out, "--bank", bank, "--provider", name,
               "--allow-fallback", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["provider_requested"] == name and report["provider"] == CPU_EP
    assert set(report["providers"]) <= set(report["timings_ms"]) and set(report["providers"].values()) == {CPU_EP}
    assert "encoder" in report["providers"] and "decoder" in report["providers"] and out.exists()


@pytest.mark.skipif(not MISSING, reason="this onnxruntime has CUDA and TensorRT: no refusal to observe")
def test_bench_refuses_a_missing_provider_and_records_the_fallback(tmp_path):
    name = MISSING[0]
    out = tmp_path / "bench.json"
    proc = cli("bench", BUNDLE, "--runs", "1", "--warmup", "0", "--provider", name, "--json", out)
    assert proc.returncode == 2 and GPU_EPS[name] in proc.stderr and "--allow-fallback" in proc.stderr
    assert not out.exists()
    proc = cli("bench", BUNDLE, "--runs", "1", "--warmup", "0", "--provider", name, "--allow-fallback", "--json", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["provider_requested"] == name and report["provider"] == CPU_EP
    assert report["providers"] == {"sam2_encoder": CPU_EP, "sam2_decoder": CPU_EP}
    assert f"CPUExecutionProvider (asked for {name}: FALLBACK)" in proc.stdout  # the table says so too


@pytest.mark.skipif(not MISSING, reason="this onnxruntime has CUDA and TensorRT: no refusal to observe")
def test_demo_refuses_a_missing_provider_and_records_the_fallback(tmp_path):
    name = MISSING[-1]
    out = tmp_path / "demo"
    proc = cli("demo", "--out", out, "--per-level", "1", "--repeats", "1", "--provider", name)
    assert proc.returncode == 2 and GPU_EPS[name] in proc.stderr and "--allow-fallback" in proc.stderr
    assert not out.exists()
    proc = cli("demo", "--out", out, "--per-level", "1", "--repeats", "1", "--provider", name, "--allow-fallback")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "demo.json").read_text())
    assert report["provider_requested"] == name and report["provider"] == CPU_EP
    assert set(report["providers"]) == set(load_bundle(BUNDLE).parts) - set(VIDEO_PARTS)  # the demo does not track
    assert all(set(s["providers"].values()) == {CPU_EP} and "encoder" in s["providers"] for s in report["samples"])
    assert f"provider: CPUExecutionProvider (asked for {name}: FALLBACK)" in proc.stdout


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_EP not in ort.get_available_providers(),
                    reason=f"{CUDA_EP} is not in this onnxruntime build ({ort.get_available_providers()})")
def test_cuda_runs_the_bundle_and_says_so(sample_image):
    seg = ConceptSegmenter.from_bundle(BUNDLE, "cuda", engine_factory=engine_factory_for(ProviderConfig("cuda")))
    assert set(seg.providers().values()) == {CUDA_EP}
    result = seg.segment(sample_image, points=[[40, 40]])
    assert result.timings.provider_map() == {"encoder": CUDA_EP, "decoder": CUDA_EP}
    reference = ConceptSegmenter.from_bundle(BUNDLE, "cpu").segment(sample_image, points=[[40, 40]])
    assert (result.mask == reference.mask).mean() > 0.99
