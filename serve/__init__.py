"""Serving through Triton Inference Server.

- ``model_config``: typed ``config.pbtxt`` descriptions, validated with Triton's own protobuf;
- ``protocol``: the ``conceptseg`` model's input/output contract (one source of tensor names);
- ``parameters``: the typed parameters of each generated python-backend model (``RouterParameters``,
  ``GraphParameters``): ``to_parameters()`` for ``config.pbtxt``, a strict ``from_parameters()`` back;
- ``repository``: ``build_repository(bundle, out, RepositoryConfig(flavor=...))``;
- ``serving``: what runs inside the python backend (router model, the BLS engine factory, python-served graphs);
- ``server``: ``TritonServer`` (find, prepare, start on loopback, wait, restart, stop) and ``serve_forever``
  (the supervisor behind ``triton serve``: restarts a crashed server with backoff);
- ``gateway``: ``HttpGateway``, the public HTTP port, refusing requests whose declared tensors Triton's
  own HTTP frontend would allocate before checking (``GatewayLimits``);
- ``stream_protocol`` / ``streams``: the ``conceptseg_stream`` model (video tracking per sequence id under
  Triton's sequence batcher): its contract, and ``StreamModel`` with its bounded ``StreamStore``;
- ``client``: ``TritonSegClient`` over HTTP or gRPC (tritonclient); ``track_stream`` sends a video stream.

Public names load lazily: importing this package imports neither tritonclient nor the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "conceptseg_edge.serve.model_config",
    "TensorConfig": "conceptseg_edge.serve.model_config",
    "RouterParameters": "conceptseg_edge.serve.parameters",
    "GraphParameters": "conceptseg_edge.serve.parameters",
    "RepositoryConfig": "conceptseg_edge.serve.repository",
    "RepositoryManifest": "conceptseg_edge.serve.repository",
    "build_repository": "conceptseg_edge.serve.repository",
    "TritonServer": "conceptseg_edge.serve.server",
    "RestartPolicy": "conceptseg_edge.serve.server",
    "GatewayLimits": "conceptseg_edge.serve.gateway",
    "HttpGateway": "conceptseg_edge.serve.gateway",
    "find_tritonserver": "conceptseg_edge.serve.server",
    "TritonSegClient": "conceptseg_edge.serve.client",
    "ServedResult": "conceptseg_edge.serve.protocol",
    "StreamFrame": "conceptseg_edge.serve.stream_protocol",
    "StreamParameters": "conceptseg_edge.serve.parameters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conceptseg_edge.serve' has no attribute {name!r}")
