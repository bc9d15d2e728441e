"""What runs inside the ``conceptseg_stream`` python-backend model: per-stream tracker state under sequence batching.

Triton's sequence batcher sends every request of one correlation id, in order, to one model instance
and tells the model through control inputs whether a request starts or ends its sequence. The model
keeps one runtime ``VideoStream`` (``VideoSegmenter.stream()``: the stream's memory bank, bounded by the
tracker's own rules) per live correlation id in a ``StreamStore``:

- bounded: at most ``max_streams`` live streams per instance; a START beyond that is refused with
  ``StreamLimitError`` (Triton ``UNAVAILABLE``), the live streams untouched;
- freed on END (even when the END request itself fails), on a new START of the same id (a restart),
  and when idle past ``idle_timeout_s`` — the sequence batcher's ``max_sequence_idle_microseconds``, after
  which Triton has released the sequence too. The python backend has no timer, so idle streams are swept
  at the start of every ``execute``; an idle instance keeps its streams until its next request.

``StreamStore`` is plain python with an injectable clock, so its bookkeeping is tested without Triton.
Nothing here imports torch or ``pb_utils``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from conceptseg_edge.errors import ConceptsegError, InputError
from conceptseg_edge.serve.parameters import StreamParameters
from conceptseg_edge.serve.protocol import ServeLimits
from conceptseg_edge.serve.serving import WARMUP_HW, classify_error
from conceptseg_edge.serve.stream_protocol import encode_frame, parse_controls, parse_frame, parse_prompts
from conceptseg_edge.timings import elapsed_ms

State = TypeVar("State")


class StreamLimitError(ConceptsegError):
    """A new stream was refused: the instance already holds its maximum of live streams."""


class UnknownStreamError(InputError):
    """A frame names a stream this instance does not hold (never started, ended, refused or idle too long)."""


@dataclass
class _Entry(Generic[State]):
    state: State
    last_used: float


class StreamStore(Generic[State]):
    """Live per-stream state keyed by stream id: bounded, least recently used first, idle entries swept.

    Args:
        max_streams: most live streams; ``start`` beyond it raises ``StreamLimitError`` (after sweeping).
        idle_timeout_s: an entry unused for longer is dropped by ``sweep``.
        clock: seconds, monotonic (``time.monotonic``; tests pass their own).
    """

    def __init__(self, max_streams: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or max_streams < 1:
            raise InputError(f"max_streams: {max_streams!r}, expected an int >= 1")
        if not idle_timeout_s > 0:
            raise InputError(f"idle_timeout_s: {idle_timeout_s!r}, expected seconds > 0")
        self.max_streams = max_streams
        self.idle_timeout_s = float(idle_timeout_s)
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry[State]] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, stream_id: Hashable) -> bool:
        return stream_id in self._entries

    def ids(self) -> list[Hashable]:
        """Live stream ids, least recently used first."""
        return list(self._entries)

    def sweep(self) -> list[Hashable]:
        """Drop the streams idle past the timeout; returns their ids."""
        cutoff = self._clock() - self.idle_timeout_s
        stale = [key for key, entry in self._entries.items() if entry.last_used < cutoff]
        for key in stale:
            del self._entries[key]
        return stale

    def check_room(self, stream_id: Hashable) -> None:
        """Raise ``StreamLimitError`` when ``start(stream_id, ...)`` would be refused (idle streams swept first)."""
        self.sweep()
        if stream_id not in self._entries and len(self._entries) >= self.max_streams:
            raise StreamLimitError(
                f"stream {stream_id}: refused, this instance already holds its limit of {self.max_streams} live streams; "
                f"end one (a request with the END flag) or retry after an idle stream times out "
                f"({self.idle_timeout_s:g} s)")

    def start(self, stream_id: Hashable, state: State) -> None:
        """Hold ``state`` for a new stream (replacing a live one of the same id: a restart)."""
        self.check_room(stream_id)
        self._entries.pop(stream_id, None)
        self._entries[stream_id] = _Entry(state, self._clock())

    def get(self, stream_id: Hashable) -> State:
        """The live state of ``stream_id``, marked used now; ``UnknownStreamError`` when there is none."""
        entry = self._entries.get(stream_id)
        if entry is None:
            raise UnknownStreamError(
                f"stream {stream_id}: unknown stream id (sequence start missing: no live stream; it was never started, "
                f"its START was refused, it ended, or it was idle longer than {self.idle_timeout_s:g} s)")
        entry.last_used = self._clock()
        self._entries.move_to_end(stream_id)
        return entry.state

    def end(self, stream_id: Hashable) -> bool:
        """Free a stream; False when it was not live."""
        return self._entries.pop(stream_id, None) is not None


def classify_stream_error(exc: BaseException) -> tuple[str, str]:
    """``classify_error`` plus the stream limit, which is the server's capacity (``UNAVAILABLE``), not the caller's fault."""
    if isinstance(exc, StreamLimitError):
        return "UNAVAILABLE", str(exc)
    return classify_error(exc)


class StreamModel:
    """The stream model: one request (one frame of one stream) in, one response or one typed error out.

    ``segmenter`` is a runtime ``VideoSegmenter`` (engines shared by every stream); each stream's state is
    the ``VideoStream`` it hands out.
    """

    def __init__(self, segmenter: Any, store: StreamStore, limits: ServeLimits = ServeLimits(), max_objects: int = 16) -> None:
        self.segmenter = segmenter
        self.store = store
        self.limits = limits
        self.max_objects = max_objects

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], version_dir: str | Path) -> StreamModel:
        """Build from the ``parameters`` of the generated ``config.pbtxt`` (``StreamParameters``)."""
        from conceptseg_edge.runtime.tracker import TrackerConfig, VideoSegmenter

        parameters = StreamParameters.from_parameters(params)
        config = TrackerConfig()
        segmenter = VideoSegmenter.from_bundle(parameters.bundle_dir(version_dir), provider=parameters.provider,
                                               bank_dir=parameters.bank_dir, config=config)
        store = StreamStore(parameters.max_streams, parameters.idle_timeout_us / 1e6)
        model = cls(segmenter, store, parameters.limits, config.max_objects)
        model.warmup()
        return model

    def warmup(self) -> None:
        """One throw-away stream of one frame, so the first client does not pay for the engines' first runs."""
        from conceptseg_edge.runtime.tracker import ObjectPrompt

        h, w = WARMUP_HW
        image = (np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3) % 251).astype(np.uint8)
        stream = self.segmenter.stream()
        stream.add_object(ObjectPrompt(points=((w / 2, h / 2),), labels=(1,)))
        stream.add_frame(image)
        stream.add_frame(image)  # the second frame runs memory attention and the tracking decoder

    def handle(self, tensors: Mapping[str, np.ndarray], correlation_id: int | str | None = None) -> dict[str, np.ndarray]:
        """Decode the request and its controls, run the frame on its stream, encode. Raises on a bad request.

        ``correlation_id``: the request's own sequence id, which names the stream (``parse_controls``).
        """
        t0 = time.perf_counter_ns()
        controls = parse_controls(tensors, correlation_id)
        self.store.sweep()
        if not controls.ready:
            raise InputError("READY is 0: no request in this batch slot")
        try:
            frame = parse_frame(tensors, self.limits)
            prompts = parse_prompts(tensors, self.limits, self.max_objects)
            if controls.start:
                # A START is all or nothing: the stream is held only once its first frame has run.
                if frame is None or not prompts:
                    raise InputError("START: needs FRAME and PROMPTS (at least one object to track)")
                self.store.check_room(controls.stream_id)
                stream = self.segmenter.stream()
            else:
                stream = self.store.get(controls.stream_id)
                if frame is None and not controls.end:
                    raise InputError("FRAME: missing; only a request with the END flag may leave it out")
            added = []
            try:  # a failed request adds no object to a live stream
                for obj_id, prompt in prompts:
                    added.append(stream.add_object(prompt, obj_id))
                decode_ms = elapsed_ms(t0)
                result = None if frame is None else stream.add_frame(frame)
            except Exception:
                for obj_id in added:
                    if obj_id in stream.objects:  # the tracker drops a prompt that misfits the frame itself
                        stream.remove_object(obj_id)
                raise
            if controls.start:
                self.store.start(controls.stream_id, stream)
        finally:
            if controls.end:
                self.store.end(controls.stream_id)
        hw = (0, 0) if frame is None else frame.shape[:2]
        timings = {"decode_request": decode_ms, **({} if result is None else result.timings)}
        timings["server_total"] = elapsed_ms(t0)
        return _batched(encode_frame(result, hw, timings))

    def respond(self, tensors: Mapping[str, np.ndarray],
                correlation_id: int | str | None = None) -> tuple[dict[str, np.ndarray] | None, tuple[str, str] | None]:
        """``handle`` that never raises: (outputs, None) or (None, (error code name, message))."""
        try:
            return self.handle(tensors, correlation_id), None
        except Exception as exc:  # noqa: BLE001 - every failure becomes this request's error, never the server's
            return None, classify_stream_error(exc)


def _batched(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the batch axis of 1 the batching model config puts in front of every output."""
    return {name: value[None] for name, value in outputs.items()}
