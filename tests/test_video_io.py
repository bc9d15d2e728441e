"""Frame sources and video outputs through the real PyAV: folders, files, file:// and http:// URLs, and
every bad source the tracker must refuse with a VideoError naming it."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from conceptseg_edge.errors import InputError, VideoError
from conceptseg_edge.video import CODEC_PREFERENCE, JsonLinesWriter, VideoWriter, choose_codec, open_frames

SIZE = (48, 64)  # H, W


def _frames(n: int, size: tuple[int, int] = SIZE) -> list[np.ndarray]:
    """Smooth, distinct frames (a moving gradient) that survive lossy coding recognisably."""
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    return [np.stack([(xx * 4 + 9 * t) % 256, (yy * 5) % 256, np.full(size, 30 * t % 256)], -1).astype(np.uint8)
            for t in range(n)]  # fmt: skip


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0, codec: str | None = None) -> Path:
    with VideoWriter(path, fps=fps, codec=codec) as writer:
        for frame in frames:
            writer.write(frame)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_video(tmp_path_factory.mktemp("video") / "clip.mp4", _frames(12))


def _decoded(source: str | Path) -> list[np.ndarray]:
    with open_frames(source) as frames:
        return [frame for _, frame in frames]


def test_folder_source_reads_image_files_in_natural_order(tmp_path: Path) -> None:
    frames = _frames(3)
    for name, frame in zip(("2.png", "10.png", "1.png"), (frames[1], frames[2], frames[0])):
        Image.fromarray(frame).save(tmp_path / name)
    (tmp_path / "notes.json").write_text("{}")  # not an image: ignored
    source = open_frames(tmp_path)
    assert source.n_frames == 3 and source.fps is None
    got = list(source)
    assert [i for i, _ in got] == [0, 1, 2]
    assert all(np.array_equal(a, b) for (_, a), b in zip(got, frames))
    assert len(list(source)) == 3  # a folder can be read again


def test_video_round_trip_through_the_default_encoder(video: Path) -> None:
    assert choose_codec() in CODEC_PREFERENCE
    with av.open(str(video)) as container:
        assert container.streams.video[0].codec_context.name == ("h264" if choose_codec() == "libx264" else "mpeg4")
    source = open_frames(video)
    assert source.fps == pytest.approx(10.0) and source.n_frames == 12
    decoded = [frame for _, frame in source]
    assert len(decoded) == 12 and decoded[0].shape == (*SIZE, 3) and decoded[0].dtype == np.uint8
    errors = [np.abs(a.astype(int) - b).mean() for a, b in zip(decoded, _frames(12))]
    assert max(errors) < 8.0, errors  # lossy, yet each decoded frame is the one written, in order
    assert np.abs(decoded[0].astype(int) - _frames(12)[6]).mean() > 3 * max(errors)


def test_mpeg4_fallback_and_odd_sizes_padded_to_even(tmp_path: Path) -> None:
    odd = [f[:47, :63] for f in _frames(5)]
    decoded = _decoded(_write_video(tmp_path / "odd.mkv", odd, fps=5, codec="mpeg4"))
    assert len(decoded) == 5 and decoded[0].shape == (48, 64, 3)  # 4:2:0 needs even sides: one edge pixel added
    assert np.abs(decoded[2][:47, :63].astype(int) - odd[2]).mean() < 8.0


def test_file_and_http_urls(video: Path, tmp_path: Path) -> None:
    assert len(_decoded(f"file://{video.resolve()}")) == 12

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(video.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert len(_decoded(f"{url}/clip.mp4")) == 12  # the index sits before the frames (+faststart): no seeking
        with pytest.raises(VideoError, match="none.mp4: cannot open as a video .*404"):
            open_frames(f"{url}/none.mp4")
    finally:
        server.shutdown()
        thread.join()


# ----------------------------------------------------------------------------- bad sources


def test_missing_empty_and_unsupported_sources(tmp_path: Path) -> None:
    assert issubclass(VideoError, InputError)
    with pytest.raises(VideoError, match="nope.mp4: no such file or folder"):
        open_frames(tmp_path / "nope.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match="empty: no frames"):
        open_frames(tmp_path / "empty")
    with pytest.raises(VideoError, match="unsupported URL scheme 'gopher'"):
        open_frames("gopher://example.org/x")
    with pytest.raises(VideoError, match="source: empty"):
        open_frames("")
    with pytest.raises(VideoError, match="rtsp://127.0.0.1:9/cam: cannot open as a video"):
        open_frames("rtsp://127.0.0.1:9/cam", timeout=5)


def test_not_a_video_and_a_video_without_frames(tmp_path: Path) -> None:
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="notes.mp4: cannot open as a video"):
        open_frames(tmp_path / "notes.mp4")
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="zero.mp4: cannot open as a video"):
        open_frames(tmp_path / "zero.mp4")
    headers_only = tmp_path / "headers.mkv"  # a stream declared, no frame ever written
    with av.open(str(headers_only), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match="headers.mkv"):
        _decoded(headers_only)
    no_stream = tmp_path / "nostream.mp4"
    VideoWriter(no_stream).close()  # closed before any frame: a container with no video stream
    with pytest.raises(VideoError, match="nostream.mp4"):
        _decoded(no_stream)


@pytest.mark.parametrize("damage", ["truncate_late", "truncate_early", "garble_frames"])
def test_corrupt_video_is_a_video_error(video: Path, tmp_path: Path, damage: str) -> None:
    data = bytearray(video.read_bytes())
    mdat = data.find(b"mdat")
    if damage == "truncate_late":
        data = data[: len(data) * 2 // 3]
    elif damage == "truncate_early":
        data = data[: len(data) // 5]
    else:
        data[mdat + 4 :] = np.random.default_rng(0).integers(0, 256, len(data) - mdat - 4, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(VideoError, match="bad.mp4: (corrupt video at frame|decoding ended after|cannot open as a video) "):
        _decoded(bad)


def test_unreadable_frame_and_size_change_mid_stream(tmp_path: Path) -> None:
    frames = _frames(3)
    Image.fromarray(frames[0]).save(tmp_path / "0.png")
    (tmp_path / "1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(VideoError, match="frame 1.png: .*cannot decode image"):
        _decoded(tmp_path)
    Image.fromarray(frames[1][:, :32]).save(tmp_path / "1.png")
    source = open_frames(tmp_path)
    first = next(iter(source))
    assert first[0] == 0
    with pytest.raises(VideoError, match="frame 1 is 32x48, the frames before it 64x48"):
        _decoded(tmp_path)
    # a stream that changes resolution: two MPEG-TS segments back to back, as a live source may send
    parts = [_ts_segment(frames[:2]), _ts_segment([f[:, :32].copy() for f in frames[2:]])]
    (tmp_path / "resized.ts").write_bytes(b"".join(parts))
    with pytest.raises(VideoError, match="resized.ts: frame 2 is 32x48, the frames before it 64x48"):
        _decoded(tmp_path / "resized.ts")


def _ts_segment(frames: list[np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buf.getvalue()


# ----------------------------------------------------------------------------- outputs


def test_outputs_appear_whole_or_not_at_all(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), VideoWriter(tmp_path / "half.mp4") as writer:
        writer.write(_frames(1)[0])
        raise RuntimeError("the tracker failed")
    lines = tmp_path / "frames.jsonl"
    with pytest.raises(RuntimeError), JsonLinesWriter(lines) as log:
        log.write({"index": 0})
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither file, nor a temporary
    with JsonLinesWriter(lines) as log:
        for i in range(3):
            log.write({"index": i, "objects": {"1": {"score": 0.5}}})
    assert [json.loads(line)["index"] for line in lines.read_text().splitlines()] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames.jsonl"]


def test_video_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="clip.gif: unsupported video suffix"):
        VideoWriter(tmp_path / "clip.gif")
    with pytest.raises(InputError, match="fps: must be > 0"):
        VideoWriter(tmp_path / "clip.mp4", fps=0)
    writer = VideoWriter(tmp_path / "clip.mp4")
    writer.write(_frames(1)[0])
    with pytest.raises(InputError, match="frame 1 is 32x48, the video is 64x48"):
        writer.write(_frames(1)[0][:, :32])
    with pytest.raises(InputError, match=r"frame 1: expected \(H, W, 3\) uint8"):
        writer.write(np.zeros((48, 64), np.float32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []

