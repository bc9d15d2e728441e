"""Video in and out for tracking: frame sources (a folder of frames, a video file, a stream URL) and
outputs (an encoded video, per-frame JSON lines) that are written whole or not at all.

Decoding and encoding go through PyAV (FFmpeg's libraries, bundled in its wheel): no ffmpeg binary,
no OpenCV. Sources yield ``(index, frame)`` with frame an (H, W, 3) uint8 RGB array and index counting
from 0 in decoding order; every way a source can fail is a ``VideoError`` naming the source: it is
missing or unreadable, not a video or corrupt, holds no frame, or changes frame size mid-stream.
Outputs write to a temporary name beside the target and rename it over the target on ``close()``;
an aborted output (an exception inside its ``with`` block) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import InputError, VideoError
from conceptseg_edge.fileio import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "file", "udp", "tcp", "srt")
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}
CODEC_PREFERENCE = ("libx264", "mpeg4")  # H.264 when this FFmpeg build encodes it, else MPEG-4 part 2
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class FrameSource(ABC):
    """Frames of one video, in order: iterate for ``(index, (H, W, 3) uint8)``.

    The size is fixed by the first frame; a later frame of another size raises ``VideoError``, as
    does a source that yields no frame at all (raised when iteration ends). Close it, or use it as
    a context manager, to release the decoder early.

    Attributes:
        name: the source as given (path or URL), for messages.
        fps: frames per second when the source says (a folder does not), else None.
        n_frames: the frame count when known before decoding (a folder; most files), else None.
    """

    def __init__(self, name: str, fps: float | None, n_frames: int | None) -> None:
        self.name = name
        self.fps = fps
        self.n_frames = n_frames

    @abstractmethod
    def _frames(self) -> Iterator[np.ndarray]:
        """The decoded frames, (H, W, 3) uint8 each; raise ``VideoError`` on a decoding failure."""

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        size = None
        index = -1
        for index, frame in enumerate(self._frames()):
            if size is None:
                size = frame.shape[:2]
            elif frame.shape[:2] != size:
                raise VideoError(f"{self.name}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, the frames before it "
                                 f"{size[1]}x{size[0]}; a tracked video keeps one frame size")  # fmt: skip
            yield index, frame
        if index < 0:
            raise VideoError(f"{self.name}: no frames decoded")

    def close(self) -> None:
        """Release the decoder (nothing to release for a folder)."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderFrames(FrameSource):
    """The image files of a folder, in natural order (``2.jpg`` before ``10.jpg``; sam2's ``<int>.jpg``
    layout reads in its order). Files with other suffixes (masks in a subfolder, a JSON) are ignored."""

    def __init__(self, folder: Path) -> None:
        try:
            self.paths = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                                 and not p.name.startswith(".")), key=_natural_key)  # fmt: skip
        except OSError as exc:
            raise VideoError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from exc
        if not self.paths:
            raise VideoError(f"{folder}: no frames: a folder source holds image files ({', '.join(IMAGE_SUFFIXES)})")
        super().__init__(str(folder), None, len(self.paths))

    def _frames(self) -> Iterator[np.ndarray]:
        from conceptseg_edge.preprocess import load_image

        for path in self.paths:
            try:
                yield load_image(path)
            except InputError as exc:
                raise VideoError(f"{self.name}: frame {path.name}: {exc}") from exc


class AvFrames(FrameSource):
    """A video file or a stream URL decoded by PyAV: the first video stream, as RGB.

    Opening probes the source, so a missing file, a file that is no video, a corrupt header or an
    unreachable stream fail here rather than at the first frame. ``timeout`` (seconds) bounds the
    wait for a network stream to open and for each read.
    """

    def __init__(self, source: str, timeout: float = 10.0) -> None:
        self._source = source
        self._timeout = timeout
        self._container = self._open()
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        super().__init__(source, float(rate) if rate else None, stream.frames or None)

    def _open(self) -> Any:
        import av

        is_url = _URL.match(self._source) is not None
        options = {"rtsp_transport": "tcp"} if self._source.lower().startswith("rtsp") else {}
        try:
            container = av.open(self._source, options=options, timeout=self._timeout if is_url else None)
        except av.error.FFmpegError as exc:
            raise VideoError(f"{self._source}: cannot open as a video ({_ffmpeg_reason(exc)})") from exc
        if not container.streams.video:
            container.close()
            raise VideoError(f"{self._source}: holds no video stream")
        return container

    def _frames(self) -> Iterator[np.ndarray]:
        import av

        container, self._container = self._container or self._open(), None  # a second pass decodes afresh
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            index = 0
            try:
                for frame in container.decode(stream):
                    yield frame.to_ndarray(format="rgb24")
                    index += 1
            except av.error.FFmpegError as exc:
                raise VideoError(f"{self.name}: corrupt video at frame {index} ({_ffmpeg_reason(exc)})") from exc
            if self.n_frames is not None and 0 < index < self.n_frames:
                raise VideoError(f"{self.name}: decoding ended after {index} of the {self.n_frames} frames the container "
                                 "lists: a truncated or corrupt file")  # fmt: skip
        finally:
            container.close()

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def open_frames(source: str | Path, timeout: float = 10.0) -> FrameSource:
    """The frames of ``source``: a folder of image files, a video file, or a stream URL
    (``rtsp://``, ``http(s)://``, ``file://``, ...; ``timeout`` seconds to connect and per read).

    Raises:
        VideoError: the source does not exist, cannot be opened or decoded, or holds no frames.
    """
    text = str(source)
    if not text:
        raise VideoError("source: empty, expected a folder of frames, a video file or a stream URL")
    match = _URL.match(text)
    if match is not None:
        if match.group(1).lower() not in URL_SCHEMES:
            raise VideoError(f"{text}: unsupported URL scheme {match.group(1)!r}, expected one of {', '.join(URL_SCHEMES)}")
        return AvFrames(text, timeout)
    path = Path(text)
    if path.is_dir():
        return FolderFrames(path)
    if not path.exists():
        raise VideoError(f"{path}: no such file or folder")
    if not path.is_file():
        raise VideoError(f"{path}: not a regular file (a device or pipe: pass it as a URL instead)")
    return AvFrames(text, timeout)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's own words for a failure, without the file name PyAV appends."""
    import av

    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- outputs


class _StagedOutput:
    """An output written under a temporary name and renamed over ``path`` by ``close()``; ``abort()``
    (or an exception in its ``with`` block) deletes it instead."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        self._closed = False

    def _finish(self) -> None:
        """Flush and close the handle on the temporary file."""

    def close(self) -> Path:
        """Finish writing and put the file in place; return its path."""
        if not self._closed:
            self._closed = True
            try:
                self._finish()
            except BaseException:
                self._stack.__exit__(VideoError, VideoError(f"{self.path}: not written"), None)
                raise
            self._stack.close()
        return self.path

    def abort(self) -> None:
        """Drop what was written: no file appears at ``path``."""
        if not self._closed:
            self._closed = True
            try:
                with contextlib.suppress(Exception):
                    self._finish()
            finally:
                self._stack.__exit__(VideoError, VideoError(f"{self.path}: aborted"), None)

    def __enter__(self) -> _StagedOutput:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def choose_codec() -> str:
    """The first encoder of ``CODEC_PREFERENCE`` that this PyAV build's FFmpeg has."""
    import av

    for name in CODEC_PREFERENCE:
        try:
            av.codec.Codec(name, "w")
        except (av.error.FFmpegError, ValueError):
            continue
        return name
    raise VideoError(f"no video encoder: this FFmpeg build has none of {', '.join(CODEC_PREFERENCE)}")


class VideoWriter(_StagedOutput):
    """Encode RGB frames to a video file (``.mp4``, ``.mov``, ``.mkv``, ``.avi``) at ``fps``.

    The frame size is fixed by the first frame; an odd width or height is padded by one edge pixel
    (4:2:0 chroma needs even sizes). ``codec``: an FFmpeg encoder name, default ``choose_codec()``.

    Raises:
        InputError: an unsupported suffix, a non-positive fps, a frame of another size or not uint8 RGB.
    """

    def __init__(self, path: str | Path, fps: float = 10.0, codec: str | None = None) -> None:
        import av

        fmt = CONTAINER_FORMATS.get(Path(path).suffix.lower())
        if fmt is None:
            raise InputError(f"{path}: unsupported video suffix, expected one of {', '.join(CONTAINER_FORMATS)}")
        if not fps > 0:
            raise InputError(f"fps: must be > 0, got {fps}")
        self.codec = codec or choose_codec()
        self.fps = fps
        self.frames = 0
        self._size: tuple[int, int] | None = None
        self._stream: Any = None
        super().__init__(path)
        try:
            # +faststart: the index goes before the frames, so the file plays while it downloads
            options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
            self._container = av.open(str(self._tmp), "w", format=fmt, options=options)
        except av.error.FFmpegError as exc:
            self._stack.close()  # the temporary file, empty, goes away with the failed writer
            raise VideoError(f"{path}: cannot create the video ({_ffmpeg_reason(exc)})") from exc

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        import av

        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise InputError(f"{self.path}: frame {self.frames}: expected (H, W, 3) uint8, got "
                             f"{getattr(frame, 'shape', type(frame).__name__)} {getattr(frame, 'dtype', '')}")  # fmt: skip
        if self._size is None:
            self._size = frame.shape[:2]
            self._stream = self._container.add_stream(self.codec, rate=Fraction(self.fps).limit_denominator(1001))
            self._stream.height, self._stream.width = (v + v % 2 for v in self._size)
            self._stream.pix_fmt = "yuv420p"
            if self.codec == "libx264":
                # ultrafast: 5.4 ms a 256² frame (14.6 at 512²) against veryfast's 18 (48), files ~1.6x
                # larger; the overlay must keep up with a tracker that may run at GPU speed
                self._stream.options = {"preset": "ultrafast", "crf": "20"}
            else:
                self._stream.bit_rate = 8 * self._stream.width * self._stream.height * max(int(self.fps), 1) // 10
        elif frame.shape[:2] != self._size:
            raise InputError(f"{self.path}: frame {self.frames} is {frame.shape[1]}x{frame.shape[0]}, "
                             f"the video is {self._size[1]}x{self._size[0]}")  # fmt: skip
        h, w = self._size
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def _finish(self) -> None:
        try:
            if self._stream is not None:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
        finally:
            self._container.close()


class JsonLinesWriter(_StagedOutput):
    """One JSON object per line (``frames.jsonl``), flushed as written so a reader can follow the
    temporary file; the file appears under its name on ``close()``."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._fh = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed by _finish
        self.lines = 0

    def write(self, record: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()
        self.lines += 1

    def _finish(self) -> None:
        self._fh.close()
