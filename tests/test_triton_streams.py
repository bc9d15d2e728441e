"""Video streams through Triton's sequence batcher: the ``conceptseg_stream`` model.

Without a server: the model config (parsed back with Triton's own protobuf), its typed parameters, the
stream store's bookkeeping (limit, LRU order, idle sweep on an injected clock) and the request checks.
With the real ``tritonserver`` (the nvidia-pytriton wheel's binary on CPU): four concurrent streams of a
synthetic clip whose masks equal the in-process ``VideoSegmenter``'s frame for frame, and every bad
stream request refused as its own error while the other streams keep being served.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge._compat import is_available
from conceptseg_edge.errors import InputError
from triton_server import needs_server  # tests/triton_server.py

pytestmark = pytest.mark.skipif(not is_available("tritonclient.grpc"), reason="tritonclient not installed (extra: serve)")

# The stream bundle: the smallest SAM2 this repo exports (ConceptSeg-Tiny's backbone layout at 128 px; ≈ 25 s
# to export with the video parts, against ≈ 105 s for SAM2.1-tiny at 256), cheap per frame on 2 cores.
CLIP_HW = (120, 160)
CLIP_FRAMES = 4




class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def clip(seed: int, frames: int = CLIP_FRAMES, hw: tuple[int, int] = CLIP_HW) -> list[np.ndarray]:
    """A square moving right over a fixed noisy background: a short, deterministic video."""
    rng = np.random.default_rng(seed)
    background = (rng.random((*hw, 3)) * 90).astype(np.uint8)
    colour = rng.integers(150, 255, 3, dtype=np.uint8)
    out = []
    for t in range(frames):
        frame = background.copy()
        y, x = 30 + 2 * seed, 20 + 12 * t
        frame[y:y + 40, x:x + 44] = colour
        out.append(frame)
    return out


def stream_prompts(seed: int) -> list[dict]:
    """One object per stream, started from a click (even seeds) or a box (odd seeds) on the square."""
    y, x = 30 + 2 * seed, 20
    if seed % 2:
        return [{"box": [x - 2, y - 2, x + 46, y + 42]}]
    return [{"points": [[x + 22, y + 20]], "labels": [1], "obj_id": 7}]


# ---------------------------------------------------------------------------- configs (no server)


def test_stream_config_parses_with_tritons_protobuf():
    from tritonclient.grpc import model_config_pb2 as pb2

    from conceptseg_edge.serve.model_config import validate_pbtxt
    from conceptseg_edge.serve.repository import RepositoryConfig, stream_model_config, stream_parameters
    from conceptseg_edge.serve.stream_protocol import STREAM_INPUTS, STREAM_OUTPUT_NAMES

    cfg = RepositoryConfig(instances=2, max_streams=5, stream_idle_s=2.5)
    config = stream_model_config(cfg, stream_parameters(cfg, "bundle"))
    text = config.to_pbtxt()
    message = validate_pbtxt(text, expected=config)
    assert message.backend == "python" and message.max_batch_size == 1 and message.instance_group[0].count == 2
    assert [i.name for i in message.input] == [t.name for t in STREAM_INPUTS] and all(i.optional for i in message.input)
    assert [o.name for o in message.output] == list(STREAM_OUTPUT_NAMES)
    sb = message.sequence_batching
    assert sb.WhichOneof("strategy_choice") == "oldest" and sb.oldest.max_candidate_sequences == 10
    assert sb.max_sequence_idle_microseconds == 2_500_000
    kinds = {c.name: (c.control[0].kind, tuple(c.control[0].int32_false_true), c.control[0].data_type) for c in sb.control_input}
    kind = pb2.ModelSequenceBatching.Control.Kind
    assert kinds == {"START": (kind.Value("CONTROL_SEQUENCE_START"), (0, 1), 0),
                     "END": (kind.Value("CONTROL_SEQUENCE_END"), (0, 1), 0),
                     "READY": (kind.Value("CONTROL_SEQUENCE_READY"), (0, 1), 0),
                     "CORRID": (kind.Value("CONTROL_SEQUENCE_CORRID"), (), pb2.DataType.Value("TYPE_UINT64"))}
    assert config.parameters["max_streams"] == "5" and config.parameters["idle_timeout_us"] == "2500000"
    assert "max_batch_size: 1" in text and "CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64" in text


def test_sequence_batching_is_checked_before_writing():
    from conceptseg_edge.serve.model_config import ModelConfig, ModelConfigError, SequenceBatching, SequenceControl, TensorConfig
    from conceptseg_edge.serve.stream_protocol import stream_controls

    tensors = ((TensorConfig("FRAME", "uint8", (-1, -1, -1)),), (TensorConfig("MASKS", "bool", (-1,)),))
    batching = SequenceBatching(stream_controls(), 1_000_000)
    with pytest.raises(ModelConfigError, match=r"sequence_batching.oldest: needs max_batch_size > 0"):
        ModelConfig("s", *tensors, backend="python", max_batch_size=0, sequence_batching=batching)
    ModelConfig("s", *tensors, backend="python", max_batch_size=0, sequence_batching=dataclasses.replace(batching, strategy="direct"))
    with pytest.raises(ModelConfigError, match=r"\['FRAME'\] are also inputs or outputs"):
        ModelConfig("s", *tensors, backend="python", max_batch_size=1,
                    sequence_batching=SequenceBatching((SequenceControl("FRAME", "start"),), 1))
    with pytest.raises(ModelConfigError, match=r"duplicate kinds \['start'\]"):
        SequenceBatching((SequenceControl("A", "start"), SequenceControl("B", "start")), 1)
    with pytest.raises(ModelConfigError, match=r"kind: 'stop'"):
        SequenceControl("END", "stop")
    with pytest.raises(ModelConfigError, match=r"max_sequence_idle_microseconds: 0"):
        SequenceBatching(stream_controls(), 0)
    with pytest.raises(ModelConfigError, match=r"strategy: 'newest'"):
        SequenceBatching(stream_controls(), 1, strategy="newest")


def test_stream_parameters_round_trip_and_are_read_strictly(tmp_path):
    from conceptseg_edge.serve.model_config import ModelConfigError, read_config
    from conceptseg_edge.serve.parameters import StreamParameters
    from conceptseg_edge.serve.protocol import ServeLimits
    from conceptseg_edge.serve.repository import RepositoryConfig, stream_model_config, stream_parameters

    cfg = RepositoryConfig(max_streams=3, stream_idle_s=0.5, bank_dir=str(tmp_path / "bank"), limits=ServeLimits(max_points=8))
    written = stream_parameters(cfg, "bundle")
    (tmp_path / "config.pbtxt").write_text(stream_model_config(cfg, written).to_pbtxt())
    parsed = {k: v.string_value for k, v in read_config(tmp_path / "config.pbtxt").parameters.items()}
    assert StreamParameters.from_parameters(parsed) == written
    assert written.idle_timeout_us == 500_000 and written.limits.max_points == 8
    good = StreamParameters().to_parameters()
    for params, match in [({**good, "max_streams": "0"}, r"parameters\[max_streams\]: '0', expected an int >= 1"),
                          ({**good, "streams": "4"}, r"unknown key\(s\) \['streams'\]"),
                          ({k: v for k, v in good.items() if k != "idle_timeout_us"}, r"parameters\[idle_timeout_us\]: missing")]:
        with pytest.raises(ModelConfigError, match=match):
            StreamParameters.from_parameters(params)
    for flags, match in [({"max_streams": 0}, "--max-streams 0"), ({"stream_idle_s": 0}, "--stream-idle-s 0")]:
        with pytest.raises(InputError, match=match):
            RepositoryConfig(**flags)


# ---------------------------------------------------------------------------- the stream store (no server)


def test_stream_store_bounds_evicts_idle_and_frees_on_end():
    from conceptseg_edge.serve.streams import StreamLimitError, StreamStore, UnknownStreamError

    clock = FakeClock()
    store: StreamStore[str] = StreamStore(max_streams=2, idle_timeout_s=10, clock=clock)
    store.start(1, "a")
    clock.now += 4
    store.start(2, "b")
    with pytest.raises(StreamLimitError, match=r"stream 3: refused, .* limit of 2 live streams"):
        store.start(3, "c")
    assert store.ids() == [1, 2] and len(store) == 2  # the refusal left the live streams alone
    clock.now += 3
    assert store.get(1) == "a" and store.ids() == [2, 1]  # used: most recent now
    clock.now += 8  # 2 idle for 11 s, 1 for 8 s
    assert store.sweep() == [2] and store.ids() == [1]
    store.start(3, "c")
    store.start(1, "a2")  # START of a live id: a restart, not a new slot
    assert store.get(1) == "a2" and len(store) == 2
    assert store.end(3) and not store.end(3) and 3 not in store
    with pytest.raises(UnknownStreamError, match=r"stream 3: unknown stream id \(sequence start missing"):
        store.get(3)
    clock.now += 10.5
    store.start(4, "d")  # a START sweeps first: the idle stream 1 makes room
    assert store.ids() == [4]
    with pytest.raises(InputError, match="max_streams"):
        StreamStore(0, 1)


# ---------------------------------------------------------------------------- request checks (no server)


BAD_PROMPTS = {
    "not-json": (b"{points", "PROMPTS: not UTF-8 JSON"),
    "not-a-list": (b'{"box": [1, 2, 3, 4]}', "PROMPTS: expected a non-empty JSON list"),
    "empty": (b"[]", "PROMPTS: expected a non-empty JSON list"),
    "unknown-key": (b'[{"boxes": [1, 2, 3, 4]}]', r"PROMPTS\[0\]: unknown key\(s\) \['boxes'\]"),
    "box-3": (b'[{"box": [1, 2, 3]}]', r"PROMPTS\[0\].box: expected a list of 4 numbers"),
    "nan-point": (b'[{"points": [[1, NaN]]}]', r"PROMPTS\[0\].points\[0\]: expected finite numbers"),
    "half-label": (b'[{"points": [[1, 2]], "labels": [0.5]}]', "labels must be exactly 0"),
    "labels-alone": (b'[{"labels": [1]}]', r"PROMPTS\[0\].labels: given without points"),
    "concept-and-box": (b'[{"concept": "cat", "box": [1, 2, 3, 4]}]', "a concept starts an object alone"),
    "nothing": (b'[{"obj_id": 2}]', r"PROMPTS\[0\]: empty prompt"),
    "bad-id": (b'[{"obj_id": -1, "box": [1, 2, 3, 4]}]', r"PROMPTS\[0\].obj_id: -1"),
    "too-many": (b"[" + b",".join([b'{"box": [1, 2, 3, 4]}'] * 3) + b"]", "3 objects, at most 2 per stream"),
}


@pytest.mark.parametrize("name", list(BAD_PROMPTS))
def test_bad_prompts_are_refused_naming_the_field(name):
    from conceptseg_edge.serve.protocol import ServeLimits
    from conceptseg_edge.serve.stream_protocol import parse_prompts

    raw, match = BAD_PROMPTS[name]
    with pytest.raises(InputError, match=match):
        parse_prompts({"PROMPTS": np.array([[raw]], dtype=object)}, ServeLimits(), max_objects=2)


def test_prompts_and_frames_decode():
    from conceptseg_edge.runtime.tracker import ObjectPrompt
    from conceptseg_edge.serve.protocol import ServeLimits
    from conceptseg_edge.serve.stream_protocol import parse_frame, parse_prompts, stream_request_arrays

    feeds = stream_request_arrays(np.zeros((6, 8, 3), np.uint8), [{"points": [[1, 2], [3, 4]], "labels": [1, 0], "obj_id": 3},
                                                                 {"box": [0, 0, 4, 4]}, {"concept": "red square"}])
    assert feeds["FRAME"].shape == (1, 6, 8, 3) and feeds["PROMPTS"].shape == (1, 1)
    def fields(p: ObjectPrompt) -> tuple:
        return p.points, p.labels, p.box, p.concept, p.mask

    assert [(obj_id, fields(p)) for obj_id, p in parse_prompts(feeds, ServeLimits(), 4)] == [
        (3, (((1.0, 2.0), (3.0, 4.0)), (1, 0), None, None, None)),
        (None, (None, None, (0.0, 0.0, 4.0, 4.0), None, None)),
        (None, (None, None, None, "red square", None)),
    ]
    assert parse_frame(feeds, ServeLimits()).shape == (6, 8, 3)
    with pytest.raises(InputError, match="FRAME: 8x6 = 48 pixels exceeds this server's limit of 40"):
        parse_frame(feeds, ServeLimits(max_image_pixels=40))
    with pytest.raises(InputError, match="FRAME: dtype float32"):
        parse_frame({"FRAME": np.zeros((1, 6, 8, 3), np.float32)}, ServeLimits())


# ---------------------------------------------------------------------------- fixtures (video_bundle: conftest)


@pytest.fixture(scope="module")
def video_segmenter(video_bundle):
    from conceptseg_edge.runtime.tracker import VideoSegmenter

    return VideoSegmenter.from_bundle(video_bundle)


def in_process(segmenter, frames, prompts) -> list:
    """The runtime's own answer for one stream: the reference the served masks must equal."""
    from conceptseg_edge.serve.protocol import ServeLimits
    from conceptseg_edge.serve.stream_protocol import parse_prompts, stream_request_arrays

    stream = segmenter.stream()
    for obj_id, prompt in parse_prompts(stream_request_arrays(None, prompts), ServeLimits(), 16):
        stream.add_object(prompt, obj_id)
    return [stream.add_frame(frame) for frame in frames]


def test_stream_model_in_process_errors_and_bookkeeping(video_segmenter):
    """The model logic behind the server, on the real tracker: controls, START all-or-nothing, END frees."""
    from conceptseg_edge.serve.stream_protocol import decode_stream_response, stream_request_arrays
    from conceptseg_edge.serve.streams import StreamModel, StreamStore

    clock = FakeClock()
    model = StreamModel(video_segmenter, StreamStore(2, 5.0, clock))

    def request(sid, frame, prompts=None, start=False, end=False, ready=True):
        feeds = stream_request_arrays(frame, prompts)
        controls = {"START": int(start), "END": int(end), "READY": int(ready), "CORRID": sid}
        return model.respond(feeds | {k: np.array([[v]], dtype=np.uint64 if k == "CORRID" else np.int32) for k, v in controls.items()})

    frames = clip(1)
    out, error = request(1, frames[0], stream_prompts(1), start=True)
    assert error is None and out["MASKS"].shape == (1, 1, *CLIP_HW)
    first = decode_stream_response(out)
    want = in_process(video_segmenter, frames[:2], stream_prompts(1))
    assert np.array_equal(first.masks[1], want[0].objects[1].mask) and first.masks[1].any()
    assert first.events and first.events[0]["kind"] == "start"
    _, error = request(1, frames[1][:-8])
    assert error[0] == "INVALID_ARG" and "differs from the stream's 160x120" in error[1]
    _, error = request(1, frames[1], [{"box": [0, 0, 400, 50], "obj_id": 5}])  # a new object outside the frame
    assert error[0] == "INVALID_ARG" and "obj_id 5 (removed from the stream)" in error[1]
    out, error = request(1, frames[1])  # the refused frames left the stream as it was
    assert error is None and np.array_equal(decode_stream_response(out).masks[1], want[1].objects[1].mask)
    assert sorted(decode_stream_response(out).masks) == [1]
    _, error = request(9, frames[0])
    assert error[0] == "INVALID_ARG" and "stream 9: unknown stream id (sequence start missing" in error[1]
    _, error = request(2, frames[0], [{"box": [1, 2, 3]}], start=True)
    assert error[0] == "INVALID_ARG" and "PROMPTS[0].box" in error[1] and 2 not in model.store
    _, error = request(2, frames[0], start=True)
    assert "START: needs FRAME and PROMPTS" in error[1]
    _, error = request(2, frames[0], [{"points": [[500, 10]]}], start=True)
    assert error[0] == "INVALID_ARG" and "removed from the stream" in error[1] and 2 not in model.store
    assert request(2, frames[0], stream_prompts(2), start=True)[1] is None
    _, error = request(3, frames[0], stream_prompts(3), start=True)
    assert error[0] == "UNAVAILABLE" and "limit of 2 live streams" in error[1]
    _, error = request(2, None)
    assert "FRAME: missing; only a request with the END flag" in error[1]
    out, error = request(2, None, end=True)  # END without a frame: closes the stream
    assert error is None and out["MASKS"].shape == (1, 0, 0, 0) and 2 not in model.store
    clock.now += 6
    assert request(3, frames[0], stream_prompts(3), start=True)[1] is None  # stream 1 was idle past 5 s: swept
    assert model.store.ids() == [3]
    assert "READY is 0" in request(3, frames[1], ready=False)[1][1]


# ---------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def stream_server(video_bundle, tmp_path_factory, request):
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository
    from conceptseg_edge.serve.server import TritonServer

    repo = tmp_path_factory.mktemp("triton-streams") / "repo"
    built = build_repository(video_bundle, repo, RepositoryConfig(flavor="python", max_streams=4, stream_idle_s=120))
    assert set(built.models) == {"conceptseg", "conceptseg_stream"}
    srv = TritonServer(repo, log_path=tmp_path_factory.mktemp("triton-streams-log") / "server.log", startup_timeout=300)
    request.addfinalizer(srv.stop)
    srv.start()
    return srv


@needs_server
@pytest.mark.slow
def test_four_concurrent_streams_equal_the_in_process_tracker(stream_server, video_segmenter):
    from conceptseg_edge.serve.client import TritonSegClient

    seeds = (1, 2, 3, 4)
    served: dict[int, list] = {}
    latency: dict[int, list[float]] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(len(seeds))

    def run(seed: int) -> None:
        url = stream_server.grpc_url if seed % 2 else stream_server.http_url
        try:
            with TritonSegClient(url, timeout=300) as client:
                barrier.wait()
                answers, times = [], []
                t0 = time.perf_counter()
                for answer in client.track_stream(1000 + seed, clip(seed), stream_prompts(seed)):
                    times.append(time.perf_counter() - t0)
                    answers.append(answer)
                    t0 = time.perf_counter()
                served[seed], latency[seed] = answers, times
        except BaseException as exc:  # noqa: BLE001 - reported below, with the server log
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not failures, f"{failures!r}\n{stream_server.log_tail()}"
    for seed in seeds:
        want = in_process(video_segmenter, clip(seed), stream_prompts(seed))
        got = served[seed]
        assert [g.index for g in got] == [w.index for w in want] == list(range(CLIP_FRAMES))
        for g, w in zip(got, want):
            assert sorted(g.masks) == sorted(w.objects)
            for obj_id, obj in w.objects.items():
                assert np.array_equal(g.masks[obj_id], obj.mask), f"stream {seed} frame {w.index} object {obj_id}"
                assert g.scores[obj_id] == pytest.approx((obj.score, obj.object_score), abs=1e-4)
                assert g.objects[obj_id] == {"present": obj.present, "source": obj.source}
            assert [e["kind"] for e in g.events] == [e.kind for e in w.events]
        assert any(m.any() for g in got for m in g.masks.values())  # not vacuous
        assert "memory_attention" in got[-1].timings and got[-1].timings["server_total"] > 0
    print("\nper-frame latency through Triton, 4 concurrent streams (s):",
          {seed: [round(v, 3) for v in times] for seed, times in latency.items()})


@needs_server
def test_bad_stream_requests_are_refused_and_other_streams_keep_being_served(stream_server, video_segmenter):
    from conceptseg_edge.serve.client import TritonRequestError, TritonSegClient
    from conceptseg_edge.serve.stream_protocol import STREAM_MODEL_NAME, STREAM_OUTPUT_NAMES, stream_request_arrays

    frames = {seed: clip(seed) for seed in (1, 2, 3, 4)}
    want = {seed: in_process(video_segmenter, frames[seed], stream_prompts(seed)) for seed in (1, 2)}
    with TritonSegClient(stream_server.grpc_url, timeout=300) as client:
        for seed in (1, 2, 3, 4):  # the limit: 4 live streams
            client.stream_frame(2000 + seed, frames[seed][0], stream_prompts(seed), start=True)

        def refused(match: str, **kwargs) -> TritonRequestError:
            with pytest.raises(TritonRequestError, match=match) as info:
                client.stream_frame(**kwargs)
            return info.value

        error = refused("limit of 4 live streams", stream_id=2005, frame=frames[1][0], prompts=stream_prompts(1), start=True)
        assert "UNAVAILABLE" in str(error.status)
        with pytest.raises(TritonRequestError, match="unknown stream id"):
            client.stream_frame(2005, None, end=True)  # frees Triton's slot; the model never held the stream
        error = refused("must specify the START flag", stream_id=2006, frame=frames[1][1])  # sequence start missing
        assert error.client_error
        with pytest.raises(TritonRequestError, match="non-zero or non-empty correlation ID"):  # no stream id at all
            client.infer_arrays(stream_request_arrays(frames[1][0], stream_prompts(1)), STREAM_OUTPUT_NAMES, STREAM_MODEL_NAME)
        error = refused(r"frame 1: size 152x120 differs from the stream's 160x120", stream_id=2001, frame=frames[1][1][:, :152])
        assert error.client_error
        error = refused(r"PROMPTS\[0\].box: expected a list of 4 numbers", stream_id=2002, frame=frames[2][1],
                        prompts=[{"box": [1, 2]}])
        # the served streams go on as if nothing happened
        got = client.stream_frame(2001, frames[1][1])
        assert np.array_equal(got.masks[1], want[1][1].objects[1].mask)
        got = client.stream_frame(2002, frames[2][1])
        assert np.array_equal(got.masks[7], want[2][1].objects[7].mask)
        for seed in (1, 2, 3, 4):
            client.stream_frame(2000 + seed, None, end=True)
        with pytest.raises(TritonRequestError, match="must specify the START flag"):
            client.stream_frame(2001, frames[1][2])  # ended: Triton needs a new START
        # a START the model refuses leaves Triton's sequence open: the next frame is an unknown stream to the model
        refused(r"PROMPTS\[0\]: unknown key", stream_id=2007, frame=frames[3][0], prompts=[{"clicks": [[1, 2]]}], start=True)
        refused(r"stream 2007: unknown stream id \(sequence start missing", stream_id=2007, frame=frames[3][1])
        with pytest.raises(TritonRequestError):
            client.stream_frame(2007, None, end=True)
        assert list(client.track_stream(2008, frames[4][:2], stream_prompts(4)))[-1].index == 1  # room again
        assert client.is_ready()




IDLE_S = 3.0  # well above two frames' time on loaded shared cores: Triton's idle clock runs while other streams' frames do


@needs_server
def test_string_stream_ids_stay_apart_and_idle_streams_are_freed_by_both_sides(video_bundle, video_segmenter, tmp_path):
    """Two streams allowed, 3 s idle timeout. String ids that Triton 2.51 packs into the same uint64 CORRID
    ("camera-0001", "camera-0002") are still two streams (the model keys on the request's own id); idle
    streams make room for a new one, and Triton has let go of them too (a next frame needs a new START)."""
    from conceptseg_edge.serve.client import TritonRequestError, TritonSegClient
    from conceptseg_edge.serve.repository import RepositoryConfig, build_repository
    from conceptseg_edge.serve.server import TritonServer

    repo = tmp_path / "repo"
    build_repository(video_bundle, repo, RepositoryConfig(flavor="python", bundle_mode="reference", max_streams=2,
                                                          stream_idle_s=IDLE_S))
    ids = {"camera-0001": 1, "camera-0002": 2}
    want = {seed: in_process(video_segmenter, clip(seed)[:2], stream_prompts(seed)) for seed in ids.values()}
    with TritonServer(repo, log_path=tmp_path / "server.log", startup_timeout=300) as srv, \
            TritonSegClient(srv.grpc_url, timeout=300) as client:
        for frame in (0, 1):
            for sid, seed in ids.items():
                got = client.stream_frame(sid, clip(seed)[frame], stream_prompts(seed) if frame == 0 else None, start=frame == 0)
                assert got.index == frame
                for obj_id, obj in want[seed][frame].objects.items():
                    assert np.array_equal(got.masks[obj_id], obj.mask), f"{sid} frame {frame}"
        with pytest.raises(TritonRequestError, match="limit of 2 live streams"):
            client.stream_frame("camera-0003", clip(3)[0], stream_prompts(3), start=True)
        with pytest.raises(TritonRequestError, match="unknown stream id"):
            client.stream_frame("camera-0003", None, end=True)  # frees Triton's slot of the refused stream
        time.sleep(IDLE_S + 1.5)
        assert client.stream_frame("camera-0003", clip(3)[0], stream_prompts(3), start=True).index == 0  # both idle: swept
        with pytest.raises(TritonRequestError, match="must specify the START flag"):
            client.stream_frame("camera-0001", clip(1)[2])
        assert client.stream_frame("camera-0003", clip(3)[1], end=True).index == 1
