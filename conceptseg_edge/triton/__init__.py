"""Serving through Triton Inference Server.

- ``model_config``: typed ``config.pbtxt`` descriptions, validated with Triton's own protobuf;
- ``protocol``: the ``conceptseg`` model's input/output contract (one source of tensor names);
- ``repository``: ``build_repository(bundle, out, RepositoryConfig(flavor=...))``;
- ``serving``: what runs inside the python backend (router model, BLS engine, python-served graphs);
- ``server``: ``TritonServer`` (find, prepare, start on loopback, wait, stop);
- ``client``: ``TritonSegClient`` over HTTP or gRPC (tritonclient).

Public names load lazily: importing this package imports neither tritonclient nor the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "conceptseg_edge.triton.model_config",
    "TensorConfig": "conceptseg_edge.triton.model_config",
    "RepositoryConfig": "conceptseg_edge.triton.repository",
    "RepositoryManifest": "conceptseg_edge.triton.repository",
    "build_repository": "conceptseg_edge.triton.repository",
    "TritonServer": "conceptseg_edge.triton.server",
    "find_tritonserver": "conceptseg_edge.triton.server",
    "TritonSegClient": "conceptseg_edge.triton.client",
    "ServedResult": "conceptseg_edge.triton.protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conceptseg_edge.triton' has no attribute {name!r}")
