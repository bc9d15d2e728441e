"""The HTTP port ``TritonServer`` exposes: a guard in front of ``tritonserver``'s own HTTP frontend.

Why it exists: Triton's HTTP frontend (2.51, the ``nvidia-pytriton`` wheel's) allocates an input's
buffer from the *declared* shape before it looks at the data or the model's config. One request
declaring ``IMAGE`` of shape ``[100000, 100000, 3]`` with JSON ``data`` of 3 numbers makes it
resize a 30 GB vector; ``std::bad_alloc`` escapes and the server aborts. Nothing in ``config.pbtxt``
helps (the allocation happens before the config is consulted, for any input name and any declared
datatype), and this Triton has no request-size flag. gRPC refuses the same request cleanly.

So ``tritonserver`` listens for HTTP on a private loopback port and the public HTTP port is this
gateway. For an inference request it reads the body (bounded by ``max_body_bytes``; a body without
``Content-Length`` or with a ``Content-Encoding`` is refused), parses the JSON header and checks every
input before Triton sees it: a well-formed name, datatype and shape; for fixed-size datatypes, the
declared size within ``max_tensor_bytes`` and equal to what the request carries (``binary_data_size``,
or the number of JSON ``data`` elements). A refused request gets ``400`` (``411``/``413``/``415`` for
body framing) with Triton's error body shape, ``{"error": "..."}``; everything else is relayed as is.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conceptseg_edge.errors import InputError

# Bytes per element of Triton's fixed-size datatypes; BYTES is sized by its data, which Triton checks.
DATATYPE_BYTES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}
HEADER_LENGTH = "Inference-Header-Content-Length"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


@dataclass(frozen=True)
class GatewayLimits:
    """What one HTTP request may declare, checked before ``tritonserver`` allocates anything for it."""

    max_body_bytes: int = 256 << 20  # a 4096x4096x3 raw IMAGE is 48 MiB
    max_tensor_bytes: int = 128 << 20

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"GatewayLimits.{f.name}: {value!r}, expected an int >= 1")


class RefusedRequest(Exception):
    """A request the gateway answers itself: HTTP status and Triton-style error text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _leaf_count(data: Any) -> int:
    """Number of scalars in a (nested) JSON array, iteratively (no recursion depth to exhaust)."""
    count, stack = 0, [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        else:
            count += 1
    return count


def check_infer_header(header: Any, binary_bytes: int, limits: GatewayLimits) -> None:
    """Refuse (``RefusedRequest`` 400) an inference header whose inputs declare more than they carry.

    ``binary_bytes`` is the size of the body after the JSON header (binary tensor data).
    """
    if not isinstance(header, dict):
        raise RefusedRequest(400, "inference request: the JSON header must be an object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise RefusedRequest(400, "inference request: 'inputs' must be a list")
    claimed_binary = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise RefusedRequest(400, f"{where}: expected an object, got {type(tensor).__name__}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise RefusedRequest(400, f"{where}.name: expected a non-empty string, got {name!r}")
        where = f"input {name!r}"
        datatype = tensor.get("datatype")
        if datatype != "BYTES" and datatype not in DATATYPE_BYTES:
            raise RefusedRequest(400, f"{where}: datatype {datatype!r}, expected one of {sorted([*DATATYPE_BYTES, 'BYTES'])}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise RefusedRequest(400, f"{where}: shape {shape!r}, expected a list of non-negative integers")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise RefusedRequest(400, f"{where}: 'parameters' must be an object")
        binary = params.get("binary_data_size")
        if binary is not None:
            if not isinstance(binary, int) or isinstance(binary, bool) or binary < 0:
                raise RefusedRequest(400, f"{where}: binary_data_size {binary!r}, expected a non-negative integer")
            claimed_binary += binary
        if datatype == "BYTES":
            continue  # sized by the strings actually sent; Triton checks those against the shape
        elements = math.prod(shape)
        declared = elements * DATATYPE_BYTES[datatype]
        if declared > limits.max_tensor_bytes:
            raise RefusedRequest(400, f"{where}: shape {shape} of {datatype} is {declared} bytes, "
                                      f"more than this server accepts per tensor ({limits.max_tensor_bytes})")
        if binary is not None and binary != declared:
            raise RefusedRequest(400, f"{where}: shape {shape} of {datatype} needs {declared} bytes, binary_data_size is {binary}")
        if "data" in tensor:
            sent = _leaf_count(tensor["data"])
            if sent != elements:
                raise RefusedRequest(400, f"{where}: shape {shape} has {elements} elements, 'data' holds {sent}")
    if claimed_binary > binary_bytes:
        raise RefusedRequest(400, f"inference request: inputs claim {claimed_binary} bytes of binary data, the body carries {binary_bytes}")


def _is_infer(path: str) -> bool:
    parts = path.split("?", 1)[0].strip("/").split("/")
    return len(parts) >= 4 and parts[:2] == ["v2", "models"] and parts[-1] == "infer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _GatewayServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # tritonserver's own log is the record; the gateway stays quiet

    def do_GET(self) -> None:
        self._relay(b"")

    def do_HEAD(self) -> None:
        self._relay(b"")

    def do_POST(self) -> None:
        try:
            body = self._read_body()
            if _is_infer(self.path):
                self._check(body)
        except RefusedRequest as refused:
            self._refuse(refused.status, str(refused))
            return
        self._relay(body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise RefusedRequest(411, "request body: send Content-Length (chunked bodies are not accepted)")
        encoding = self.headers.get("Content-Encoding", "").lower()
        if encoding not in ("", "identity"):
            raise RefusedRequest(415, f"request body: Content-Encoding {encoding!r} is not accepted; send it uncompressed")
        raw = self.headers.get("Content-Length", "0")
        if not raw.isdigit():
            raise RefusedRequest(400, f"Content-Length {raw!r}: expected a non-negative integer")
        length = int(raw)
        if length > self.server.limits.max_body_bytes:
            raise RefusedRequest(413, f"request body: {length} bytes, more than this server accepts ({self.server.limits.max_body_bytes})")
        return self.rfile.read(length)

    def _check(self, body: bytes) -> None:
        raw = self.headers.get(HEADER_LENGTH)
        if raw is None:
            header_bytes = body
        elif raw.isdigit() and int(raw) <= len(body):
            header_bytes = body[: int(raw)]
        else:
            raise RefusedRequest(400, f"{HEADER_LENGTH} {raw!r}: expected an integer within the body's {len(body)} bytes")
        try:
            header = json.loads(header_bytes)
        except (ValueError, RecursionError) as exc:
            raise RefusedRequest(400, f"inference request: the JSON header does not parse ({type(exc).__name__})") from None
        check_infer_header(header, len(body) - len(header_bytes), self.server.limits)

    def _refuse(self, status: int, message: str) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status != 400:  # the body may be unread: do not reuse the connection
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)

    def _relay(self, body: bytes) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "host"}
        if body or self.command == "POST":
            headers["Content-Length"] = str(len(body))
        try:
            status, reason, out_headers, payload = self.server.upstream(self.command, self.path, body, headers)
        except (OSError, http.client.HTTPException) as exc:
            self._refuse(502, f"tritonserver unreachable ({type(exc).__name__})")
            return
        self.send_response(status, reason)
        for key, value in out_headers:
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class _GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], limits: GatewayLimits) -> None:
        super().__init__(address, _Handler)
        self.limits = limits
        self.target = upstream
        self._local = threading.local()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (a timeout on its side) is its business: no traceback on stderr."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def upstream(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        """One request to tritonserver on this thread's kept-alive connection (one retry on a stale one)."""
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(*self.target, timeout=600)
            try:
                conn.request(method, path, body=body or None, headers=headers)
                response = conn.getresponse()
                return response.status, response.reason, response.getheaders(), response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


class HttpGateway:
    """The guard on ``address`` relaying to ``tritonserver``'s HTTP frontend on ``upstream``; runs in a thread."""

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int], limits: GatewayLimits = GatewayLimits()) -> None:
        self._server = _GatewayServer(address, upstream, limits)
        self._thread = threading.Thread(target=self._server.serve_forever, name="conceptseg-http-gateway", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> HttpGateway:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
