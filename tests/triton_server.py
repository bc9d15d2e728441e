"""Whether a real ``tritonserver`` is here (system, or the nvidia-pytriton wheel's): the mark server tests carry."""

from __future__ import annotations

import pytest


def _server_available() -> bool:
    from conceptseg_edge.serve.server import ServerStartError, find_tritonserver

    try:
        find_tritonserver()
    except ServerStartError:
        return False
    return True


needs_server = pytest.mark.skipif(not _server_available(), reason="no tritonserver (system or nvidia-pytriton wheel)")
