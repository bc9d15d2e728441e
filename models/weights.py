"""Loading an official ``.pt`` into a model built from its config: the one path SAM2 and SAM 3 share.

A checkpoint is untrusted input: it is read with ``weights_only=True``, its layout is checked, and it
must match the built model key for key; every failure is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conceptseg_edge.errors import CheckpointError
from conceptseg_edge.fileio import sha256_file


def load_official_weights(
    model: nn.Module, path: Path, state_of: Callable[[Any], dict | None], layout: str, what: str
) -> str:
    """Load ``path`` into ``model`` and return the file's sha256.

    Args:
        state_of: the loaded payload → the state dict in the model's key names (None: wrong layout).
        layout: the layout ``state_of`` expects, for the error ("a dict with a 'model' state dict").
        what: what the keys must match, for the error ("the config").
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    state = state_of(payload)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected {layout}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match {what}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return sha256_file(path)
