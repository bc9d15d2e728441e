"""Serving through a real ``tritonserver`` on loopback (the nvidia-pytriton wheel's binary when no system one).

One python-flavor server runs for the whole session (built from ``tiny_bundle``, one instance, random
free loopback ports) and is stopped by a finalizer whatever happens. Masks through the server must
equal the in-process runtime's bit for bit; bad requests must come back as client errors with the
server still ready; a bounded concurrent load must finish without an error. Config generation is
checked against Triton's own protobuf without a server.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptseg_edge._compat import is_available
from conceptseg_edge.errors import InputError
from conceptseg_edge.manifest import PartManifest, TensorSpec, load_bundle
from triton_server import needs_server  # tests/triton_server.py

pytestmark = pytest.mark.skipif(not is_available("tritonclient.grpc"), reason="tritonclient not installed (extra: serve)")




# ---------------------------------------------------------------------------- helpers


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a huge size, with one tiny IDAT: refused from the header, never decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conceptseg_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def py_repo(tiny_bundle, tmp_path_factory) -> Path:
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository

    out = tmp_path_factory.mktemp("triton") / "repo"
    build_repository(tiny_bundle, out, RepositoryConfig(flavor="python", instances=1))
    return out


@pytest.fixture(scope="session")
def server(py_repo, tmp_path_factory, request):
    """The session's server; the finalizer is registered before start, so a failed start is cleaned up too."""
    from conceptseg_edge.serve.server import TritonServer

    srv = TritonServer(py_repo, log_path=tmp_path_factory.mktemp("triton-log") / "server.log", startup_timeout=300)
    request.addfinalizer(srv.stop)
    srv.start()
    return srv


@pytest.fixture(scope="module")
def segmenter(tiny_bundle):
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    return ConceptSegmenter.from_bundle(tiny_bundle)


@pytest.fixture(params=["http", "grpc"])
def client(server, request):
    from conceptseg_edge.serve.client import TritonSegClient

    url = server.http_url if request.param == "http" else server.grpc_url
    with TritonSegClient(url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def small_image() -> np.ndarray:
    rng = np.random.default_rng(7)
    img = (rng.random((72, 96, 3)) * 255).astype(np.uint8)
    img[20:50, 30:70] = (220, 40, 40)
    return img


# ---------------------------------------------------------------------------- configs (no server)


def test_router_config_parses_with_tritons_protobuf():
    from conceptseg_edge.serve.model_config import validate_pbtxt
    from conceptseg_edge.serve.protocol import INPUT_NAMES, OUTPUT_NAMES
    from conceptseg_edge.serve.repository import RepositoryConfig, router_model_config, router_parameters

    cfg = RepositoryConfig(instances=2)
    config = router_model_config(cfg, router_parameters(cfg, "bundle"))
    message = validate_pbtxt(config.to_pbtxt(), expected=config)
    assert message.backend == "python" and message.max_batch_size == 0
    assert [i.name for i in message.input] == list(INPUT_NAMES) and all(i.optional for i in message.input)
    assert [o.name for o in message.output] == list(OUTPUT_NAMES)
    assert message.instance_group[0].count == 2
    assert config.to_pbtxt() == config.to_pbtxt()  # deterministic
    as_json = config.to_dict()
    assert as_json["parameters"]["engines"]["string_value"] == "local"


def test_model_parameters_round_trip_through_config_pbtxt(tmp_path):
    """What the builder writes is what the served model reads back: typed, through Triton's own parser."""
    from conceptseg_edge.generation import GenerationConfig
    from conceptseg_edge.serve.model_config import read_config
    from conceptseg_edge.serve.parameters import GraphParameters, RouterParameters
    from conceptseg_edge.serve.protocol import ServeLimits
    from conceptseg_edge.serve.repository import RepositoryConfig, graph_model_config, router_model_config, router_parameters

    cfg = RepositoryConfig(flavor="native", device="cpu", bank_dir=str(tmp_path / "bank"), generation=GenerationConfig(16),
                           limits=ServeLimits(max_points=8))
    written = router_parameters(cfg, "bundle", {"sam2_encoder": "enc", "sam2_decoder": "dec"})
    (tmp_path / "config.pbtxt").write_text(router_model_config(cfg, written).to_pbtxt())
    parsed = {k: v.string_value for k, v in read_config(tmp_path / "config.pbtxt").parameters.items()}
    assert RouterParameters.from_parameters(parsed) == written
    assert written.engines == "bls" and not written.warmup and written.generation.max_new_tokens == 16
    assert written.limits.max_points == 8 and written.bank_dir == str((tmp_path / "bank").resolve())
    assert RouterParameters.from_parameters(RouterParameters().to_parameters()) == RouterParameters()  # unset keys left out
    assert "max_new_tokens" not in RouterParameters().to_parameters()

    part = _part("ctm", [("hidden_states", "float32", ("batch", "seq", 128))], [("concept_tokens", "float32", ("batch", 8, 256))])
    graph = graph_model_config(part, max_batch=8, device="gpu", instances=1, graph_backend="python")
    assert GraphParameters.from_parameters(graph.parameters) == GraphParameters("ctm.onnx", provider="cuda", batched=True)


BASE = {"engines": "local", "bundle": "bundle", "provider": "cpu"}
BAD_PARAMETERS = {
    "unknown-key": ({**BASE, "max_new_tokenz": "16"}, r"unknown key\(s\) \['max_new_tokenz'\]"),
    "missing-engines": ({"bundle": "bundle", "provider": "cpu"}, r"parameters\[engines\]: missing"),
    "bad-engines": ({**BASE, "engines": "remote"}, r"parameters\[engines\]: 'remote'"),
    "bad-provider": ({**BASE, "provider": "npu"}, r"parameters\[provider\]: 'npu'"),
    "flag-not-0-1": ({**BASE, "warmup": "true"}, r"parameters\[warmup\]: 'true', expected 1 or 0"),
    "zero-limit": ({**BASE, "max_points": "0"}, r"parameters\[max_points\]: '0', expected an int >= 1"),
    "not-an-int": ({**BASE, "max_new_tokens": "16.5"}, r"parameters\[max_new_tokens\]: '16.5'"),
    "empty-bank": ({**BASE, "bank_dir": ""}, r"parameters\[bank_dir\]: empty"),
    "bls-without-graphs": ({**BASE, "engines": "bls", "warmup": "0"}, r"parameters\[graph_models\]: missing"),
    "graphs-not-json": ({**BASE, "engines": "bls", "warmup": "0", "graph_models": "ctm=ctm"}, r"parameters\[graph_models\]: not JSON"),
    "graphs-not-object": ({**BASE, "engines": "bls", "warmup": "0", "graph_models": '["ctm"]'}, r"parameters\[graph_models\]: .*JSON object"),
    "bls-warmup": ({**BASE, "engines": "bls", "warmup": "1", "graph_models": '{"ctm": "ctm"}'}, "warmup: a BLS router cannot"),
    "graphs-on-local": ({**BASE, "graph_models": '{"ctm": "ctm"}'}, r"unknown key\(s\) \['graph_models'\]"),
}


@pytest.mark.parametrize("name", list(BAD_PARAMETERS))
def test_router_parameters_are_read_strictly(name):
    from conceptseg_edge.serve.model_config import ModelConfigError
    from conceptseg_edge.serve.parameters import RouterParameters

    params, match = BAD_PARAMETERS[name]
    with pytest.raises(ModelConfigError, match=match):
        RouterParameters.from_parameters(params)


def test_graph_parameters_are_read_strictly():
    from conceptseg_edge.serve.model_config import ModelConfigError
    from conceptseg_edge.serve.parameters import GraphParameters

    good = GraphParameters("enc.onnx").to_parameters()
    assert good == {"graph_file": "enc.onnx", "provider": "cpu", "batched": "0"}
    with pytest.raises(ModelConfigError, match=r"model 'sam2_encoder': parameters\[batched\]: 'yes'"):
        GraphParameters.from_parameters({**good, "batched": "yes"}, "sam2_encoder")
    with pytest.raises(ModelConfigError, match=r"unknown key\(s\) \['bundle'\]"):
        GraphParameters.from_parameters({**good, "bundle": "b"})
    with pytest.raises(ModelConfigError, match="graph_file"):
        GraphParameters("../elsewhere/enc.onnx")


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda M, T, D: M("m", (T("x", "float32", (2,)),), (T("y", "float32", (2,)),), backend="python",
                           dynamic_batching=D()), "needs max_batch_size > 0"),
        (lambda M, T, D: M("m", (T("x", "float32", (2,)), T("x", "float32", (2,))), (T("y", "float32", (2,)),),
                           backend="python"), "duplicate names"),
        (lambda M, T, D: M("m", (T("x", "float32", (2,)),), (T("y", "float32", (2,)),), backend="python",
                           platform="onnxruntime_onnx"), "exactly one of backend / platform"),
        (lambda M, T, D: M("m", (T("x", "float32", (2,)),), (T("y", "float32", (2,)),), backend="python",
                           max_batch_size=4, dynamic_batching=D((8,))), "> max_batch_size"),
        (lambda M, T, D: T("x", "float32", (0, 3)), "positive int or -1"),
        (lambda M, T, D: T("x", "complex64", (3,)), "dtype"),
        (lambda M, T, D: M("m", (T("x", "float32", (2,)),), (T("x", "float32", (2,)),), backend="python"),
         "both input and output"),
    ],
    ids=["batching-without-batch", "duplicate", "backend-and-platform", "preferred-too-big", "zero-dim", "dtype", "in-out-clash"],
)
def test_invalid_configs_are_refused(build, match):
    from conceptseg_edge.serve.model_config import DynamicBatching, ModelConfig, ModelConfigError, TensorConfig

    with pytest.raises(ModelConfigError, match=match):
        build(ModelConfig, TensorConfig, DynamicBatching)


def test_protobuf_rejects_bad_text_and_a_different_parse_is_caught():
    from conceptseg_edge.serve.model_config import ModelConfig, ModelConfigError, TensorConfig, validate_pbtxt

    with pytest.raises(ModelConfigError, match="protobuf rejects"):
        validate_pbtxt('name: "m"\nbogus_field: 3\n')
    config = ModelConfig("m", (TensorConfig("x", "float32", (-1, 2)),), (TensorConfig("y", "bool", (-1,)),), backend="python")
    tampered = config.to_pbtxt().replace("dims: [ -1, 2 ]", "dims: [ -1, 3 ]")
    with pytest.raises(ModelConfigError, match=r"input x\.dims"):
        validate_pbtxt(tampered, expected=config)


def _part(name: str, inputs, outputs) -> PartManifest:
    return PartManifest(name, f"{name}.onnx", "0" * 64, "onnx", "fp32", 17,
                        tuple(TensorSpec(*t) for t in inputs), tuple(TensorSpec(*t) for t in outputs))


def test_shared_batch_axis_gets_dynamic_batching():
    from conceptseg_edge.errors import ManifestError
    from conceptseg_edge.serve.repository import batch_axis, graph_model_config

    ctm = _part("ctm", [("hidden_states", "float32", ("batch", "seq", 128))], [("concept_tokens", "float32", ("batch", 8, 256))])
    config = graph_model_config(ctm, max_batch=8, device="gpu", instances=1)
    assert batch_axis(ctm) == "batch"
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    assert config.inputs[0].dims == (-1, 128) and config.outputs[0].dims == (8, 256)
    assert config.dynamic_batching.preferred_batch_size == (2, 4, 8)
    assert graph_model_config(ctm, max_batch=0, device="gpu", instances=1).dynamic_batching is None
    mixed = _part("dec", [("feats", "float32", (1, 256)), ("pts", "float32", ("batch", "n", 2))], [("m", "float32", ("batch", 4))])
    assert batch_axis(mixed) is None
    assert graph_model_config(mixed, max_batch=8, device="gpu", instances=1).max_batch_size == 0
    plan = PartManifest("enc", "enc.plan", "0" * 64, "tensorrt", "fp16", None, ctm.inputs, ctm.outputs)
    with pytest.raises(ManifestError, match="must record its engine"):  # plan models: tests/test_triton_plan.py
        graph_model_config(plan, 8, "gpu", 1)


def test_bls_engine_factory_builds_each_part_from_its_manifest(tiny_bundle):
    """The native router's EngineFactory: IO from the PartManifest, the Triton model from graph_models."""
    from conceptseg_edge.errors import ManifestError
    from conceptseg_edge.serve.serving import BlsEngineFactory

    manifest = load_bundle(tiny_bundle)
    factory = BlsEngineFactory(pb_utils=None, graph_models={"sam2_encoder": "enc"})  # no call is made here
    engine = factory(tiny_bundle, manifest.part("sam2_encoder"), "cpu")
    assert engine.provider == "triton-bls:enc" and engine.inputs == manifest.part("sam2_encoder").inputs
    assert engine.outputs == manifest.part("sam2_encoder").outputs
    with pytest.raises(ManifestError, match="no Triton model serves part 'sam2_decoder'"):
        factory(tiny_bundle, manifest.part("sam2_decoder"), "cpu")


def test_native_repository_follows_the_manifest(tiny_bundle, tmp_path):
    from conceptseg_edge.fileio import sha256_file
    from conceptseg_edge.serve.model_config import TRITON_TYPES, read_config
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository

    repo = build_repository(tiny_bundle, tmp_path / "native", RepositoryConfig(flavor="native"))
    manifest = load_bundle(tiny_bundle)
    assert repo.flavor == "native" and set(repo.models) == {*manifest.parts, "conceptseg"}
    for name, part in manifest.parts.items():
        message = read_config(tmp_path / "native" / name / "config.pbtxt")
        assert message.platform == "onnxruntime_onnx" and message.default_model_filename == Path(part.file).name
        assert [(i.name, i.data_type, list(i.dims)) for i in message.input] == [
            (t.name, _enum(TRITON_TYPES[t.dtype]), [d if isinstance(d, int) else -1 for d in t.shape]) for t in part.inputs
        ]
        assert [o.name for o in message.output] == [t.name for t in part.outputs]
        assert message.instance_group[0].kind == 1  # KIND_GPU: the native flavor is for GPU servers
        assert sha256_file(tmp_path / "native" / name / "1" / Path(part.file).name) == part.sha256
    router = read_config(tmp_path / "native" / "conceptseg" / "config.pbtxt")
    assert router.parameters["engines"].string_value == "bls"
    assert json.loads(router.parameters["graph_models"].string_value) == {n: n for n in manifest.parts}
    assert (tmp_path / "native" / "conceptseg" / "1" / "bundle" / "manifest.json").is_file()


def _enum(name: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Value(name)


def test_build_is_atomic_and_refuses_foreign_directories(tiny_bundle, tmp_path):
    from conceptseg_edge.serve.repository import REPOSITORY_MANIFEST, RepositoryConfig, build_repository

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a conceptseg-edge Triton repository"):
        build_repository(tiny_bundle, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    with pytest.raises(InputError, match="python flavor serves one image per request"):
        RepositoryConfig(flavor="python", max_batch=4)
    out = tmp_path / "repo"
    build_repository(tiny_bundle, out, RepositoryConfig(bundle_mode="reference"))
    build_repository(tiny_bundle, out)  # rebuilding over our own repository replaces it
    assert (out / REPOSITORY_MANIFEST).is_file() and (out / "conceptseg" / "1" / "bundle" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "repo"]  # no staging debris


def test_repository_manifest_is_typed_and_read_strictly(tiny_bundle, tmp_path):
    from conceptseg_edge.errors import ManifestError
    from conceptseg_edge.generation import GenerationConfig
    from conceptseg_edge.serve.repository import REPOSITORY_MANIFEST, RepositoryConfig, RepositoryManifest, build_repository

    cfg = RepositoryConfig(flavor="native", device="cpu", generation=GenerationConfig(16))
    repo = build_repository(tiny_bundle, tmp_path / "repo", cfg)
    assert repo.config == cfg and repo.bundle.mode == "split" and repo.models["conceptseg"].part is None
    assert repo.models["sam2_encoder"].part == "sam2_encoder" and repo.models["sam2_encoder"].backend == "onnxruntime_onnx"
    data = json.loads((tmp_path / "repo" / REPOSITORY_MANIFEST).read_text())
    assert list(data) == ["flavor", "models", "routes", "bundle", "config", "created", "versions", "schema_version"]
    assert list(data["models"]["sam2_encoder"]) == ["role", "backend", "max_batch_size", "dynamic_batching", "part", "instances"]
    assert list(data["models"]["conceptseg"]) == ["role", "backend", "max_batch_size", "instances"]
    assert list(data["bundle"]) == ["source", "mode", "model", "manifest_sha256", "routes"]
    assert data["config"]["max_new_tokens"] == 16 and "generation" not in data["config"]
    assert RepositoryManifest.from_dict(data, "repo.json") == repo
    for where, bad, match in [
        ("config", {**data["config"], "flavour": "native"}, r"repo.json.config: unknown key\(s\) \['flavour'\]"),
        ("config", {**data["config"], "max_new_tokens": 0}, r"repo.json.config: max_new_tokens"),
        ("models", {**data["models"], "ctm": {"role": "graph ctm"}}, r"repo.json.models.ctm: missing key\(s\)"),
        ("bundle", {k: v for k, v in data["bundle"].items() if k != "routes"}, r"repo.json.bundle: missing key\(s\) \['routes'\]"),
    ]:
        with pytest.raises(ManifestError, match=match):
            RepositoryManifest.from_dict({**data, where: bad}, "repo.json")


def test_build_cli_prints_the_repository_and_refuses_bad_flags(tiny_bundle, tmp_path):
    from conceptseg_edge.serve.model_config import read_config
    from conceptseg_edge.serve.parameters import RouterParameters

    out = tmp_path / "repo"
    proc = cli("triton", "build", tiny_bundle, "--out", out, "--flavor", "native", "--device", "cpu", "--graph-backend",
               "python", "--instances", "2", "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert list(printed) == ["repository", "flavor", "routes", "models"] and printed["flavor"] == "native"
    assert printed["models"]["conceptseg"] == {"role": "router (BLS python model calling the graph models)", "backend": "python",
                                               "max_batch_size": 0, "instances": 2}
    params = {k: v.string_value for k, v in read_config(out / "conceptseg" / "config.pbtxt").parameters.items()}
    assert RouterParameters.from_parameters(params).generation.max_new_tokens == 16
    for flags, match in [(["--max-new-tokens", "0"], "max_new_tokens"), (["--max-batch", "4"], "python flavor serves one image"),
                         (["--flavor", "grpc"], "invalid choice")]:
        proc = cli("triton", "build", tiny_bundle, "--out", tmp_path / "bad", *flags)
        assert proc.returncode == 2 and match in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "bad").exists()


def test_served_code_is_torch_free(py_repo):
    model_py = (py_repo / "conceptseg" / "1" / "model.py").read_text()
    imports = [line for line in model_py.splitlines() if line.lstrip().startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "torch" in line]
    code = ("import sys; import conceptseg_edge.serve.serving, conceptseg_edge.serve.protocol, "
            "conceptseg_edge.runtime.segmenter; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_request_limits_are_checked_before_decoding():
    from conceptseg_edge.serve.protocol import ServeLimits, parse_request

    limits = ServeLimits(max_image_pixels=10_000)
    bomb = {"IMAGE_BYTES": np.array([png_header_claiming(100_000, 100_000)], dtype=object), "POINTS": np.zeros((1, 2), np.float32)}
    with pytest.raises(InputError, match="exceeds this server's limit"):
        parse_request(bomb, limits)
    with pytest.raises(InputError, match="exceeds this server's limit"):
        parse_request({"IMAGE": np.zeros((200, 200, 3), np.uint8), "QUERY": np.array([b"cat"], dtype=object)}, limits)


# ---------------------------------------------------------------------------- the real server


@needs_server
def test_server_is_ready_and_serves_the_generated_config(server, client):
    from conceptseg_edge.serve.protocol import INPUT_NAMES

    assert server.running and server.host == "127.0.0.1"
    assert client.is_ready()
    config = client.model_config()
    assert [i["name"] for i in config["input"]] == list(INPUT_NAMES)


CASES = [
    ("http", "raw", {"points": [[200, 280]], "labels": [1]}),
    ("grpc", "raw", {"box": [110, 190, 290, 370]}),
    ("http", "png", {"points": [[450, 300], [200, 280]], "labels": [1, 0]}),
    ("grpc", "png", {"points": [[450, 300]], "labels": [1], "box": [370, 220, 530, 380]}),
]


@needs_server
@pytest.mark.parametrize("protocol, payload, prompt", CASES, ids=["http-raw-click", "grpc-raw-box", "http-png-fg+bg", "grpc-png-box+click"])
def test_prompt_route_masks_equal_the_in_process_runtime(server, segmenter, sample_image, protocol, payload, prompt):
    from conceptseg_edge.serve.client import TritonSegClient

    expected = segmenter.segment(sample_image, **prompt)
    image = sample_image if payload == "raw" else png_bytes(sample_image)
    with TritonSegClient(server.http_url if protocol == "http" else server.grpc_url) as c:
        got = c.segment(image, **prompt)
    assert got.route == expected.route == "prompt" and got.reason == expected.reason
    assert got.mask.shape == sample_image.shape[:2] and got.mask.dtype == bool
    assert np.array_equal(got.mask, expected.mask)
    assert got.score == pytest.approx(expected.score, abs=1e-6)
    assert got.object_score == pytest.approx(expected.object_score, abs=1e-6)
    assert {"preprocess", "encoder", "decoder", "postprocess", "server_total"} <= set(got.timings)


def _raw_infer(url: str, tensors: list[tuple[str, np.ndarray, str]]):
    """Send tensors with explicit wire types (to get past the client's own dtype checks)."""
    import tritonclient.http as th

    c = th.InferenceServerClient(url.removeprefix("http://"))
    try:
        inputs = []
        for name, value, wire in tensors:
            t = th.InferInput(name, list(value.shape), wire)
            t.set_data_from_numpy(value)
            inputs.append(t)
        return c.infer("conceptseg", inputs)
    finally:
        c.close()


IMG = np.full((40, 50, 3), 90, np.uint8)
PT = np.array([[10, 10]], np.float32)
BAD_REQUESTS = {
    "missing-image": ({"POINTS": PT}, "IMAGE / IMAGE_BYTES"),
    "two-images": ({"IMAGE": IMG, "IMAGE_BYTES": np.array([png_bytes(IMG)], dtype=object), "POINTS": PT}, "exactly one"),
    "no-prompt": ({"IMAGE": IMG}, "no prompt"),
    "corrupt-bytes": ({"IMAGE_BYTES": np.array([b"\x89PNG\r\n\x1a\nnot a png at all"], dtype=object), "POINTS": PT}, "cannot decode"),
    "truncated-png": ({"IMAGE_BYTES": np.array([png_bytes(IMG)[:60]], dtype=object), "POINTS": PT}, "cannot decode"),
    "absurd-declared-size": ({"IMAGE_BYTES": np.array([png_header_claiming(100_000, 100_000)], dtype=object), "POINTS": PT},
                             "exceeds this server's limit"),
    "one-pixel": ({"IMAGE": np.zeros((1, 1, 3), np.uint8), "POINTS": np.zeros((1, 2), np.float32)}, "too small"),
    "five-channels": ({"IMAGE": np.zeros((8, 8, 5), np.uint8), "POINTS": PT}, "shape"),
    "too-many-points": ({"IMAGE": IMG, "POINTS": np.full((5000, 2), 5, np.float32)}, "at most 64"),
    "point-outside": ({"IMAGE": IMG, "POINTS": np.array([[500, 10]], np.float32)}, "outside"),
    "nan-point": ({"IMAGE": IMG, "POINTS": np.array([[np.nan, 1]], np.float32)}, "NaN"),
    "labels-mismatch": ({"IMAGE": IMG, "POINTS": PT, "POINT_LABELS": np.array([1, 0], np.int32)}, "labels"),
    "bad-box": ({"IMAGE": IMG, "BOX": np.array([30, 30, 10, 10], np.float32)}, "X1 > X0"),
    "unknown-route": ({"IMAGE": IMG, "POINTS": PT, "FORCE_ROUTE": np.array([b"teleport"], dtype=object)}, "FORCE_ROUTE"),
    "concept-on-prompt-bundle": ({"IMAGE": IMG, "QUERY": np.array([b"red square"], dtype=object)}, "not available"),
    "not-utf8": ({"IMAGE": IMG, "QUERY": np.array([b"\xff\xfe"], dtype=object)}, "UTF-8"),
    "orphan-support-masks": ({"IMAGE": IMG, "POINTS": PT, "SUPPORT_MASKS": np.array([png_bytes(IMG)], dtype=object)},
                             "without SUPPORT_IMAGES"),
}


@needs_server
@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_client_error_and_the_server_stays_ready(server, client, name):
    from conceptseg_edge.serve.client import TritonRequestError

    feeds, match = BAD_REQUESTS[name]
    with pytest.raises(TritonRequestError, match=match) as info:
        client.infer_arrays(feeds)
    assert info.value.client_error, info.value.status
    assert " at 0x" not in str(info.value)  # no object reprs (PIL's "<_io.BytesIO object at 0x…>") in served text
    assert server.running and client.is_ready()


@needs_server
@pytest.mark.parametrize(
    "tensors, match",
    [
        ([("IMAGE", np.zeros((8, 8, 3), np.float32), "FP32"), ("POINTS", PT, "FP32")], "data-type"),
        ([("IMAGE", IMG, "UINT8"), ("POINTS", np.zeros((1, 3), np.float32), "FP32")], "shape"),
        ([("IMAGE", IMG, "UINT8"), ("NOT_AN_INPUT", PT, "FP32")], "NOT_AN_INPUT"),
    ],
    ids=["wrong-dtype", "wrong-shape", "unknown-input"],
)
def test_triton_itself_refuses_malformed_tensors(server, tensors, match):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match=match) as info:
        _raw_infer(server.http_url, tensors)
    assert str(info.value.status()) == "400"
    assert server.is_ready()


def _http(server, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection(server.host, server.http_port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def infer_body(inputs: list[dict], binary: bytes = b"") -> tuple[bytes, dict[str, str]]:
    """A raw KServe-v2 HTTP inference body: JSON header, then binary tensor data."""
    header = json.dumps({"inputs": inputs}).encode()
    return header + binary, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


_POINTS_JSON = {"name": "POINTS", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]}
_DEEP = "[" * 100_000 + "]" * 100_000
# Raw HTTP that Triton 2.51's own frontend mishandles: the declared shape is allocated before anything is
# checked (the first case is the probe's: std::bad_alloc, server aborted), or a parse error comes back 500.
HOSTILE_HTTP = {
    "json-data-declares-30GB": (*infer_body([{"name": "IMAGE", "shape": [100_000, 100_000, 3], "datatype": "UINT8",
                                              "data": [1, 2, 3]}, _POINTS_JSON]), 400, "30000000000 bytes"),
    "binary-3-bytes-declares-30GB": (*infer_body([{"name": "IMAGE", "shape": [100_000, 100_000, 3], "datatype": "UINT8",
                                                   "parameters": {"binary_data_size": 3}}, _POINTS_JSON], b"abc"),
                                     400, "30000000000 bytes"),
    "unknown-input-declares-30GB": (*infer_body([{"name": "NOPE", "shape": [100_000, 100_000, 3], "datatype": "UINT8",
                                                  "data": [1]}]), 400, "'NOPE'"),
    "fixed-dims-input-declares-40GB": (*infer_body([{"name": "BOX", "shape": [10**10], "datatype": "FP32", "data": [1]}]),
                                       400, "'BOX'"),
    "int64-overflowing-shape": (*infer_body([{"name": "IMAGE", "shape": [2**31, 2**31, 3], "datatype": "UINT8",
                                              "data": [1]}]), 400, "IMAGE"),
    "negative-dim": (*infer_body([{"name": "IMAGE", "shape": [-5, 3, 3], "datatype": "UINT8", "data": [1]}]), 400,
                     "non-negative"),
    "data-count-mismatch": (*infer_body([{"name": "IMAGE", "shape": [4, 4, 3], "datatype": "UINT8", "data": [1, 2, 3]},
                                         _POINTS_JSON]), 400, "'data' holds 3"),
    "unknown-datatype": (*infer_body([{"name": "IMAGE", "shape": [1], "datatype": "UINT128", "data": [1]}]), 400,
                         "datatype"),
    "header-not-json": (b"{not json", {"Content-Type": "application/json"}, 400, "does not parse"),
    "header-length-past-body": (b"{}", {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length"),
    "json-nested-100k-deep": (f'{{"inputs": [{{"name": "IMAGE", "shape": [1], "datatype": "UINT8", "data": {_DEEP}}}]}}'.encode(),
                              {"Content-Type": "application/json"}, 400, "IMAGE|does not parse"),
    "gzip-body": (b"\x1f\x8b\x08\x00", {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
}


@needs_server
@pytest.mark.parametrize("name", list(HOSTILE_HTTP))
def test_hostile_http_is_refused_before_triton_allocates_and_the_server_stays_up(server, small_image, name):
    """The HTTP port is the gateway: each case is a 4xx with a JSON error, and the same server answers next."""
    from conceptseg_edge.serve.client import TritonSegClient

    body, headers, status, match = HOSTILE_HTTP[name]
    got, payload = _http(server, "POST", "/v2/models/conceptseg/infer", body, headers)
    assert got == status, payload[:300]
    message = json.loads(payload)["error"]
    assert re.search(match, message), message
    assert " at 0x" not in message
    assert server.running and server.is_ready()
    with TritonSegClient(server.http_url) as c:
        assert c.segment(small_image, points=[[60.0, 35.0]]).mask.shape == small_image.shape[:2]


@needs_server
def test_gateway_relays_the_rest_of_the_http_api(server):
    """Health, metadata, config and Triton's own 4xx pass through unchanged."""
    assert _http(server, "GET", "/v2/health/ready")[0] == 200
    status, payload = _http(server, "GET", "/v2/models/conceptseg/config")
    assert status == 200 and json.loads(payload)["name"] == "conceptseg"
    status, payload = _http(server, "GET", "/v2/models/no_such_model")
    assert 400 <= status < 500 and "no_such_model" in json.loads(payload)["error"]
    status, payload = _http(server, "POST", "/v2/models/no_such_model/infer", *infer_body([_POINTS_JSON]))
    assert 400 <= status < 500


LOAD_THREADS = 8
LOAD_PER_THREAD = 60  # 4 HTTP + 4 gRPC threads: 240 requests each way
MIXED_PER_THREAD = 10  # good and bad alternating: 80 + 80


@needs_server
@pytest.mark.slow
def test_load_figures_no_failures_and_every_bad_request_refused(server, segmenter, small_image):
    """The load figures the docs quote (python flavor, 1 instance): 240 HTTP + 240 gRPC requests from 8 threads,
    0 failed, every mask identical to the in-process runtime's; then 80 bad requests mixed into 80 good ones
    (a quarter of the bad ones the raw bad_alloc request), every bad one refused as the client's fault (HTTP 400,
    gRPC INVALID_ARGUMENT), every good one answered."""
    from conceptseg_edge.serve.client import TritonRequestError, TritonSegClient

    point = [[60.0, 35.0]]
    expected = segmenter.segment(small_image, points=point).mask
    bad_feeds = [feeds for feeds, _ in BAD_REQUESTS.values()]
    hostile_body, hostile_headers, *_ = HOSTILE_HTTP["json-data-declares-30GB"]
    tally = {"ok": 0, "mismatch": 0, "failed": [], "refused": 0, "bad_answered": [], "wrong_status": []}
    lock = threading.Lock()

    def count(key: str, item: str | None = None) -> None:
        with lock:
            if item is None:
                tally[key] += 1
            else:
                tally[key].append(item)

    def good(c) -> None:
        try:
            result = c.segment(small_image, points=point)
        except Exception as exc:  # noqa: BLE001 - counted and asserted below
            count("failed", f"{type(exc).__name__}: {exc}")
            return
        count("ok" if np.array_equal(result.mask, expected) else "mismatch")

    def bad(c, i: int, k: int) -> None:
        if c.protocol == "http" and k % 4 == 0:
            status, _ = _http(server, "POST", "/v2/models/conceptseg/infer", hostile_body, hostile_headers)
            count("refused") if status == 400 else count("wrong_status", str(status))
            return
        try:
            c.infer_arrays(bad_feeds[(i + k) % len(bad_feeds)])
        except TritonRequestError as exc:
            want = "400" if c.protocol == "http" else "StatusCode.INVALID_ARGUMENT"
            count("refused") if exc.status == want else count("wrong_status", f"{exc.status}: {exc}")
            return
        count("bad_answered", str(i))

    def worker(i: int, mixed: bool) -> None:
        with TritonSegClient(server.http_url if i % 2 == 0 else server.grpc_url, timeout=120) as c:
            for k in range(MIXED_PER_THREAD if mixed else LOAD_PER_THREAD):
                if mixed:
                    bad(c, i, k)
                good(c)

    for mixed in (False, True):
        threads = [threading.Thread(target=worker, args=(i, mixed), daemon=True) for i in range(LOAD_THREADS)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "clients still running after 300 s"
        print(f"{'mixed' if mixed else 'load'}: {tally['ok']} ok in {time.perf_counter() - t0:.1f} s (cumulative)")
    good_total = LOAD_THREADS * (LOAD_PER_THREAD + MIXED_PER_THREAD)
    assert tally["failed"] == [] and tally["mismatch"] == 0 and tally["ok"] == good_total == 560
    assert tally["bad_answered"] == [] and tally["wrong_status"] == []
    assert tally["refused"] == LOAD_THREADS * MIXED_PER_THREAD == 80
    assert server.running and server.is_ready()


@needs_server
def test_client_cli_writes_the_mask(server, segmenter, sample_image, tmp_path):
    sample = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "sample.png"
    out = tmp_path / "mask.png"
    proc = cli("client", server.http_url, sample, "--point", "200,280", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["route"] == "prompt" and "server_total" in report["server_timings_ms"]
    expected = segmenter.segment(sample_image, points=[[200, 280]]).mask
    assert np.array_equal(np.asarray(Image.open(out)) > 127, expected)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    proc = cli("client", server.grpc_url, bad, "--point", "1,1", "--out", tmp_path / "m2.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot decode" in proc.stderr and not (tmp_path / "m2.png").exists()


@pytest.fixture
def trickling_http_server():
    """A loopback HTTP server that answers one byte every 50 ms: per-socket-operation timeouts never fire."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def trickle(conn) -> None:
        with conn:
            try:
                conn.recv(1 << 20)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000:
                    if stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()


def test_http_timeout_bounds_the_whole_request(trickling_http_server):
    """tritonclient's HTTP timeouts are per socket operation: against a server that trickles, --timeout was ignored."""
    from conceptseg_edge.serve.client import TIMEOUT_STATUS, TritonRequestError, TritonSegClient

    t0 = time.monotonic()
    with TritonSegClient(trickling_http_server, timeout=1.0) as c, pytest.raises(TritonRequestError, match="timeout of 1 s") as info:
        c.segment(np.zeros((8, 8, 3), np.uint8), points=[[1, 1]])
    assert time.monotonic() - t0 < 3.0
    assert info.value.status == TIMEOUT_STATUS and not info.value.client_error


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_cli_timeout_is_honoured_against_the_real_server(server, protocol, tmp_path):
    """A 2000x2000 image takes the tiny model ~0.5 s; --timeout 0.05 ends the call, one error line, server unharmed."""
    big = tmp_path / "big.png"
    Image.fromarray((np.random.default_rng(0).random((2000, 2000, 3)) * 255).astype(np.uint8)).save(big)
    url = server.http_url if protocol == "http" else server.grpc_url
    out = tmp_path / "mask.png"
    proc = cli("client", url, big, "--point", "10,10", "--out", out, "--timeout", "0.05")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: no answer within the client's timeout of 0.05 s", proc.stderr
    assert not out.exists() and server.is_ready()
    assert cli("client", url, big, "--point", "10,10", "--out", out, "--timeout", "60").returncode == 0


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_client_refuses_a_timeout_that_is_not_positive_seconds(timeout, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(IMG).save(image)
    proc = cli("client", "http://127.0.0.1:9", image, "--point", "10,10", "--out", tmp_path / "m.png", "--timeout", timeout)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: timeout {float(timeout)!r}: expected a number of seconds > 0"], proc.stderr


def test_client_cli_names_an_unreachable_server(tmp_path):
    """Nothing listens on port 9: the error names the URL, it does not quote the socket as the server's words."""
    from conceptseg_edge.serve.server import free_port

    image = tmp_path / "img.png"
    Image.fromarray(IMG).save(image)
    url = f"http://127.0.0.1:{free_port()}"
    proc = cli("client", url, image, "--point", "10,10", "--out", tmp_path / "m.png", "--timeout", "5")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {url}: cannot reach the server (Connection refused)", proc.stderr


@pytest.mark.parametrize("label", [0.5, 2, -1, "1"], ids=str)
def test_client_point_labels_must_be_exactly_0_or_1(label, tmp_path):
    """Over the wire labels are INT32: the client used to cast 0.5 to 0 before sending."""
    from conceptseg_edge.serve.protocol import request_arrays

    with pytest.raises(InputError, match="labels must be exactly 0"):
        request_arrays(IMG, points=[[5, 5]], labels=[label])
    if isinstance(label, str):
        return  # a flag's text is a number: "1" is a valid --point label
    image = tmp_path / "img.png"
    Image.fromarray(IMG).save(image)
    proc = cli("client", "http://127.0.0.1:9", image, "--point", f"10,10,{label}", "--out", tmp_path / "m.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "expected 0 (background) or 1" in proc.stderr


@needs_server
def test_native_flavor_bls_router_matches_the_runtime(tiny_bundle, segmenter, sample_image, tmp_path):
    """The native layout end to end: graphs as their own models (ORT under the python backend here, since
    the wheel has no onnxruntime backend), the router calling them through BLS."""
    from conceptseg_edge.serve.client import TritonRequestError, TritonSegClient
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository
    from conceptseg_edge.serve.server import TritonServer

    build_repository(tiny_bundle, tmp_path / "native", RepositoryConfig(flavor="native", device="cpu", graph_backend="python"))
    prompt = {"box": [110, 190, 290, 370]}
    expected = segmenter.segment(sample_image, **prompt)
    srv = TritonServer(tmp_path / "native", log_path=tmp_path / "native.log", startup_timeout=300)
    with srv:
        pid = srv.process.pid
        with TritonSegClient(srv.grpc_url) as c:
            got = c.segment(sample_image, **prompt)
            with pytest.raises(TritonRequestError, match="outside"):
                c.segment(sample_image, points=[[5000, 1]])
            assert c.is_ready()
    assert np.array_equal(got.mask, expected.mask) and got.score == pytest.approx(expected.score, abs=1e-6)
    assert srv.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


class ServeCli:
    """``conceptseg-edge triton serve`` in a subprocess on three free ports; stderr collected by a thread."""

    def __init__(self, repo: Path, log: Path) -> None:
        from conceptseg_edge.serve.server import free_port

        ports: list[int] = []
        for _ in range(50):
            if len(ports) == 3:
                break
            if (p := free_port()) not in ports:
                ports.append(p)
        assert len(ports) == 3, "the OS kept handing out the same free port"
        self.http, self.grpc, self.metrics = ports
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "conceptseg_edge", "triton", "serve", str(repo),
                                      "--http-port", str(self.http), "--grpc-port", str(self.grpc),
                                      "--metrics-port", str(self.metrics), "--log", str(log)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(iter(self.proc.stderr.readline, "")), daemon=True).start()
        self.pids: list[int] = []

    def described(self, timeout: float = 300) -> dict:
        lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            lines.append(line)
            if line.startswith("}"):
                break
        assert lines and lines[-1].startswith("}"), f"serve did not report readiness: {''.join(lines)} {self.stderr}"
        described = json.loads("".join(lines))
        self.pids.append(described["pid"])
        return described

    def wait_stderr(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, f"serve exited: {self.stderr}"
            time.sleep(0.2)
        raise AssertionError(f"no stderr line matching {pattern!r} within {timeout} s: {self.stderr}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)  # the server leads its own process group
            except ProcessLookupError:
                pass


@pytest.fixture
def serve_cli(py_repo, tmp_path):
    cli = ServeCli(py_repo, tmp_path / "serve.log")
    yield cli
    cli.close()


@needs_server
def test_serve_cli_runs_until_sigterm(serve_cli):
    from conceptseg_edge.serve.client import TritonSegClient

    described = serve_cli.described()
    assert described["http"] == f"http://127.0.0.1:{serve_cli.http}"
    with TritonSegClient(described["grpc"]) as c:
        assert c.is_ready()
    serve_cli.proc.send_signal(signal.SIGTERM)
    assert serve_cli.proc.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(described["pid"], 0)


@needs_server
def test_serve_supervises_and_restarts_a_killed_tritonserver(serve_cli, segmenter, small_image):
    """kill -9 the tritonserver child: the supervisor reports it, restarts it on the same ports, keeps the log."""
    from conceptseg_edge.serve.client import TritonSegClient

    described = serve_cli.described()
    expected = segmenter.segment(small_image, points=[[60.0, 35.0]]).mask
    os.kill(described["pid"], signal.SIGKILL)
    serve_cli.wait_stderr(r"warning: tritonserver exited \(status -9\); restart 1 in 1 s; log " + re.escape(str(serve_cli.log)))
    pid = int(serve_cli.wait_stderr(r"warning: tritonserver restarted \(pid (\d+)\) and ready").group(1))
    serve_cli.pids.append(pid)
    assert pid != described["pid"]
    for url in (described["http"], described["grpc"]):  # the same addresses serve again
        with TritonSegClient(url) as c:
            assert np.array_equal(c.segment(small_image, points=[[60.0, 35.0]]).mask, expected)
    log = serve_cli.log.read_text(errors="replace")
    assert log.count("Started GRPCInferenceService") == 2  # both runs' output kept in one log
    serve_cli.proc.send_signal(signal.SIGTERM)
    assert serve_cli.proc.wait(timeout=60) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_restart_backoff_grows_and_is_capped():
    from conceptseg_edge.serve.server import RestartPolicy

    policy = RestartPolicy(first_delay=1.0, max_delay=10.0)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


# ---------------------------------------------------------------------------- concept routes

CONCEPT_MAX_NEW_TOKENS = 16


def _concept_export_available() -> bool:
    return all(is_available(m) for m in ("conceptseg_edge.export.policy", "conceptseg_edge.runtime.concept"))


@pytest.mark.slow
@needs_server
@pytest.mark.skipif(not _concept_export_available(), reason="concept export / runtime not built yet (export.policy, runtime.concept)")
@pytest.mark.parametrize("flavor", ["python", "native"])
def test_concept_routes_through_triton_equal_the_runtime(concept_bundle, tmp_path, flavor):
    """Shortcut, reason, and reason with a support image; native = every graph (policy and CTM too) a BLS call."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.generation import GenerationConfig
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter
    from conceptseg_edge.serve.client import TritonSegClient
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository
    from conceptseg_edge.serve.server import TritonServer

    generation = GenerationConfig(max_new_tokens=CONCEPT_MAX_NEW_TOKENS)
    cfg = RepositoryConfig(flavor=flavor, device="cpu", graph_backend="python", generation=generation)
    build_repository(concept_bundle, tmp_path / "repo", cfg)
    runtime = ConceptSegmenter.from_bundle(concept_bundle, generation=generation)
    ep = ConceptWorld(seed=5, image_size=128).episode(0)
    support = ep.supports[0]
    with TritonServer(tmp_path / "repo", log_path=tmp_path / "concept.log", startup_timeout=300) as srv, \
            TritonSegClient(srv.http_url) as c:
        for route in ("shortcut", "reason", "auto"):
            expected = runtime.segment(ep.image, query=ep.query, route=route)
            got = c.segment(png_bytes(ep.image), query=ep.query, route=route)
            assert (got.route, got.reason, got.completion) == (expected.route, expected.reason, expected.completion)
            assert np.array_equal(got.mask, expected.mask), route
        expected = runtime.segment(ep.image, query=ep.query, route="reason", supports=[support])
        got = c.segment(ep.image, query=ep.query, route="reason",
                        supports=[(png_bytes(support.image), png_bytes((support.mask * 255).astype(np.uint8)))])
        assert got.completion == expected.completion and np.array_equal(got.mask, expected.mask)
        assert got.box == (None if expected.box is None else tuple(float(v) for v in expected.box))


@needs_server
def test_benchmark_reports_both_sides_per_concurrency(server, tiny_bundle):
    from conceptseg_edge.benchmarks.triton import bench_triton, render_triton_table

    report = bench_triton(server.grpc_url, tiny_bundle, concurrency=(1, 2), runs=1, warmup=0, progress=False)
    assert report.errors == 0 and report.served_instances == report.inprocess_instances == 1
    assert report.served_provider == "cpu" and report.provider_requested == "cpu"  # the served model's engines are strict
    assert set(report.providers.values()) == {"CPUExecutionProvider"}
    assert [lv.concurrency for lv in report.levels] == [1, 2]
    for level in report.levels:
        for side in level.sides():
            assert side.completed == 1 and side.latency_ms.n == 1
        assert level.ratio_p50 > 0
    assert report.levels[0].triton.server_total_ms is not None
    table = render_triton_table(report)
    assert table.count("\n| ") == 3 and "p50 Triton/in-process" in table  # header + one row per level
    as_json = json.loads(json.dumps(report.to_json()))  # results are data, with the keys reports always had
    assert list(as_json) == REPORT_KEYS
    level = as_json["levels"][0]
    assert list(level) == ["concurrency", "order", "triton", "inprocess", "ratio_p50_triton_over_inprocess",
                           "ratio_throughput_triton_over_inprocess"]
    assert list(level["triton"]) == ["completed", "errors", "error_examples", "wall_s", "throughput_rps", "latency_ms",
                                     "server_total_ms"]
    assert list(level["inprocess"]) == ["completed", "errors", "error_examples", "wall_s", "throughput_rps", "latency_ms"]


REPORT_KEYS = ["route", "url", "protocol", "bundle", "model", "image_size", "input_image_hw", "precision", "manifest_sha256",
               "payload", "timing_scope", "served_instances", "inprocess_instances", "served_provider", "provider_requested",
               "provider", "providers", "runs", "warmup", "levels",
               "errors", "stable", "peak_rss_mb", "environment"]


@needs_server
def test_bench_cli_writes_the_triton_report(server, tiny_bundle, tmp_path):
    out = tmp_path / "triton.json"
    proc = cli("bench", tiny_bundle, "--triton", server.http_url, "--concurrency", "1", "--runs", "1", "--warmup", "0",
               "--json", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert list(report) == REPORT_KEYS and report["errors"] == 0 and report["protocol"] == "http"
    assert "| clients | Triton p50 ms" in proc.stdout
