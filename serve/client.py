"""``TritonSegClient``: the ``conceptseg`` model over HTTP or gRPC, through tritonclient.

``URL`` picks the protocol: ``http://host:port`` (Triton's HTTP/REST, binary tensors) or
``grpc://host:port``; a bare ``host:port`` is HTTP. One client object per thread (tritonclient's
clients are not meant to be shared across threads).

A request the server refuses raises ``TritonRequestError`` with the server's message, its status
(``"400"`` over HTTP, ``"StatusCode.INVALID_ARGUMENT"`` over gRPC) and ``client_error`` telling
the caller's mistakes from the server's.

``timeout`` bounds the whole request (connect, send, answer) in seconds over both protocols: gRPC
as the call's deadline; HTTP with a ``gevent.Timeout`` around the call, because tritonclient's HTTP
timeouts apply per socket operation, so a server that answers a byte at a time never trips them. A
request that runs out of time raises ``TritonRequestError`` with ``status == "timeout"``.

``track_stream(stream_id, frames, prompts)`` sends a video stream to the ``conceptseg_stream`` model, one
request per frame under one sequence id (START on the first, END on the last); ``stream_frame`` sends one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from conceptseg_edge._compat import require
from conceptseg_edge.errors import ConceptsegError, InputError
from conceptseg_edge.router import AUTO
from conceptseg_edge.serve.model_config import WIRE_TYPES
from conceptseg_edge.serve.protocol import INPUTS, MODEL_NAME, OUTPUT_NAMES, ServedResult, decode_response, request_arrays
from conceptseg_edge.serve.stream_protocol import (
    STREAM_MODEL_NAME,
    STREAM_OUTPUT_NAMES,
    StreamFrame,
    decode_stream_response,
    stream_request_arrays,
)

PROTOCOLS = ("http", "grpc")
TIMEOUT_STATUS = "timeout"
_DEADLINE_STATUSES = {"StatusCode.DEADLINE_EXCEEDED"}
_CLIENT_STATUSES = {"400", "404", "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.UNIMPLEMENTED"}
_WIRE = {t.name: t.wire_type for t in INPUTS}


class TritonRequestError(ConceptsegError):
    """The server refused or failed a request (or could not be reached)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def client_error(self) -> bool:
        """True when the server says the request was at fault (HTTP 4xx / gRPC INVALID_ARGUMENT…)."""
        return self.status in _CLIENT_STATUSES


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """``http://h:p`` / ``grpc://h:p`` / ``h:p`` → (protocol, "h:p")."""
    scheme, sep, rest = url.partition("://")
    if sep:
        scheme = scheme.lower()
        if scheme not in PROTOCOLS:
            raise InputError(f"URL {url}: scheme {scheme!r}, expected http:// or grpc://")
        if protocol is not None and protocol != scheme:
            raise InputError(f"URL {url}: says {scheme} but protocol {protocol!r} was asked for")
        address = rest
    else:
        scheme, address = protocol or "http", url
    address = address.rstrip("/")
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise InputError(f"URL {url}: expected host:port")
    return scheme, address


class TritonSegClient:
    """Segment through a running server: ``segment(image, query=..., points=..., box=...) -> ServedResult``."""

    def __init__(self, url: str, model: str = MODEL_NAME, timeout: float = 120.0, protocol: str | None = None) -> None:
        self.protocol, self.address = parse_url(url, protocol)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (math.isfinite(timeout) and timeout > 0):
            raise InputError(f"timeout {timeout!r}: expected a number of seconds > 0")
        self.model = model
        self.timeout = float(timeout)
        require("tritonclient", extra="serve")
        if self.protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(self.address, connection_timeout=timeout, network_timeout=timeout)
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(self.address)
        self._tc = tc

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"

    # ------------------------------------------------------------------ health

    def is_ready(self) -> bool:
        """Server and model ready (False when unreachable)."""
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - unreachable or refused: not ready
            return False

    def model_config(self) -> dict[str, Any]:
        """The served model's configuration, as Triton reports it."""
        try:
            if self.protocol == "http":
                return self._client.get_model_config(self.model)
            return self._client.get_model_config(self.model, as_json=True)["config"]
        except self._exception() as exc:
            raise _wrap(exc, self.url, self.timeout) from exc

    # ------------------------------------------------------------------ inference

    def _exception(self):
        from tritonclient.utils import InferenceServerException

        return (InferenceServerException, OSError)  # OSError: refused / reset connections over HTTP

    def infer_arrays(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] = OUTPUT_NAMES, model: str | None = None,
                     sequence: tuple[int | str, bool, bool] | None = None) -> dict[str, np.ndarray]:
        """Send named arrays as one request; returns the requested outputs as numpy arrays.

        ``model`` defaults to the client's; ``sequence`` is (sequence id, start, end) for a sequence-batched model.
        """
        tc = self._tc
        inputs = []
        for name, value in feeds.items():
            wire = _WIRE.get(name) or _wire_of(value)
            tensor = tc.InferInput(name, list(value.shape), wire)
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        if self.protocol == "http":
            requested = [tc.InferRequestedOutput(name, binary_data=True) for name in outputs]
            kwargs: dict[str, Any] = {"timeout": int(self.timeout * 1e6)}
        else:
            requested = [tc.InferRequestedOutput(name) for name in outputs]
            kwargs = {"client_timeout": self.timeout}
        if sequence is not None:
            kwargs |= {"sequence_id": sequence[0], "sequence_start": sequence[1], "sequence_end": sequence[2]}
        model = model or self.model
        try:
            if self.protocol == "http":
                import gevent

                with gevent.Timeout(self.timeout, TimeoutError):
                    result = self._client.infer(model, inputs, outputs=requested, **kwargs)
            else:
                result = self._client.infer(model, inputs, outputs=requested, **kwargs)
        except self._exception() as exc:
            raise _wrap(exc, self.url, self.timeout) from exc
        return {name: result.as_numpy(name) for name in outputs}

    def segment(
        self,
        image: np.ndarray | bytes,
        query: str | None = None,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        supports: Sequence[tuple[bytes, bytes | Sequence[float]]] = (),
        route: str = AUTO,
    ) -> ServedResult:
        """One request; ``image`` is (H, W, C) uint8 pixels or an encoded image's bytes.

        See ``protocol.request_arrays`` for the arguments; the result mirrors the runtime's
        ``SegmentResult`` (mask in the original frame, route, why, scores, per-stage ms).
        """
        return decode_response(self.infer_arrays(request_arrays(image, query, points, labels, box, supports, route)))

    def stream_frame(self, stream_id: int | str, frame: np.ndarray | None, prompts: Sequence[Mapping[str, Any]] | None = None,
                     start: bool = False, end: bool = False, model: str = STREAM_MODEL_NAME) -> StreamFrame:
        """One frame of stream ``stream_id`` (a non-zero int or a string); ``frame=None`` with ``end`` just closes it.

        ``prompts``: objects to start before this frame (``{"points", "labels", "box", "concept", "obj_id"}``
        each); a START needs at least one.
        """
        outputs = self.infer_arrays(stream_request_arrays(frame, prompts), STREAM_OUTPUT_NAMES, model, (stream_id, start, end))
        return decode_stream_response(outputs)

    def track_stream(self, stream_id: int | str, frames: Iterable[np.ndarray], prompts: Sequence[Mapping[str, Any]],
                     model: str = STREAM_MODEL_NAME) -> Iterator[StreamFrame]:
        """Send ``frames`` as one stream (START with ``prompts`` on the first, END on the last); yields each answer.

        When a frame is refused, or the caller stops early, an END request frees the stream on the server
        (and its sequence slot in Triton) before the error propagates.
        """
        frames = iter(frames)
        current = next(frames, None)
        if current is None:
            raise InputError("track_stream: no frames")
        first, ended = True, False  # Triton holds the sequence from its START on, even a START the model refused
        try:
            while current is not None:
                following = next(frames, None)
                ended = following is None
                yield self.stream_frame(stream_id, current, prompts if first else None, start=first, end=ended, model=model)
                first, current = False, following
        finally:
            if not ended:
                try:
                    self.stream_frame(stream_id, None, end=True, model=model)
                except TritonRequestError:
                    pass  # the stream is gone either way; the first error is the one to report

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonSegClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wire_of(value: np.ndarray) -> str:
    if value.dtype == object:
        return "BYTES"
    try:
        return WIRE_TYPES[value.dtype.name]
    except KeyError:
        raise InputError(f"array of dtype {value.dtype} has no Triton type") from None


def _wrap(exc: Exception, url: str, timeout: float) -> TritonRequestError:
    status = exc.status() if hasattr(exc, "status") else None
    if isinstance(exc, TimeoutError) or str(status) in _DEADLINE_STATUSES:
        return TritonRequestError(f"no answer within the client's timeout of {timeout:g} s", TIMEOUT_STATUS)
    if isinstance(exc, OSError):  # the server never answered: do not present the socket's words as the server's
        return TritonRequestError(f"{url}: cannot reach the server ({exc.strerror or type(exc).__name__})")
    message = exc.message() if hasattr(exc, "message") else str(exc)
    return TritonRequestError(f"server: {message}" + (f" (status {status})" if status else ""), None if status is None else str(status))
