"""Resumable training state: a directory written atomically, safetensors + JSON, never pickle::

    state/
      tensors.safetensors   model weights ("model.<name>.*") and optimizer tensors ("optim.<i>.<key>")
      state.json            step, optimizer param groups and scalar state, torch RNG, the stage's
                            extra JSON, and the sha256 of tensors.safetensors

Every stage draws its data from ``numpy.random.default_rng([seed, step])`` and has no dropout, so
weights + optimizer state + step are the whole state: a resumed run takes exactly the step an
uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from conceptseg_edge.errors import CheckpointError
from conceptseg_edge.fileio import sha256_file, verify_hashes, write_json

STATE_DIR = "state"
_TENSORS = "tensors.safetensors"
_META = "state.json"
_STATE_FORMAT = "conceptseg-edge-train-state"


class ParamBank(torch.nn.Module):
    """Free-standing trainable tensors (e.g. the backbone's concept table) as a module for ``save_state``."""

    def __init__(self, **params: torch.Tensor) -> None:
        super().__init__()
        for name, value in params.items():
            self.register_parameter(name, torch.nn.Parameter(value))


def _optimizer_split(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_load(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(
    out_dir: str | os.PathLike[str],
    step: int,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/state`` atomically: built beside it, then swapped in; returns its path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final = out_dir / STATE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{STATE_DIR}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        tensors: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for mod_name, module in modules.items():
            for key, value in module.state_dict().items():
                # safetensors refuses shared storage; a tied alias is stored once and re-tied on load
                if value.numel() and value.data_ptr() in seen:
                    continue
                seen[value.data_ptr()] = key
                tensors[f"model.{mod_name}.{key}"] = value.detach().cpu().contiguous()
        optim_tensors, optim_meta = _optimizer_split(optimizer)
        tensors.update({k: v.detach().cpu().contiguous() for k, v in optim_tensors.items()})
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, tmp / _TENSORS)
        write_json(tmp / _META, {
            "format": _STATE_FORMAT,
            "step": step,
            "optimizer": optim_meta,
            "extra": extra or {},
            "sha256": sha256_file(tmp / _TENSORS),
        })
        if final.exists():
            old = out_dir / f".{STATE_DIR}.{uuid.uuid4().hex[:12]}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def has_state(out_dir: str | os.PathLike[str]) -> bool:
    return (Path(out_dir) / STATE_DIR / _META).is_file()


def load_state(
    out_dir: str | os.PathLike[str],
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
) -> tuple[int, dict[str, Any]]:
    """Restore modules, optimizer and torch RNG from ``out_dir/state``; returns ``(step, extra)``.

    Raises:
        CheckpointError: missing or tampered files, or weights that do not fit the modules.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(out_dir) / STATE_DIR
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / _META}: unreadable training state ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{path / _META}: not a {_STATE_FORMAT} file")
    verify_hashes(path, {_TENSORS: str(meta.get("sha256"))}, _META, CheckpointError,
                  "the state was changed after it was written; delete the state directory to start over")
    try:
        tensors = load_file(path / _TENSORS)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / _TENSORS}: unreadable ({exc})") from exc
    for mod_name, module in modules.items():
        prefix = f"model.{mod_name}."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = module.state_dict()
        missing = [k for k in expected if k not in weights]
        # a key absent from the file is fine only when it aliases a stored tensor (tied weights)
        ptrs = {v.data_ptr(): k for k, v in expected.items() if k in weights and v.numel()}
        missing = [k for k in missing if expected[k].data_ptr() not in ptrs]
        unexpected = [k for k in weights if k not in expected]
        if missing or unexpected:
            raise CheckpointError(
                f"{path / _TENSORS}: {mod_name} does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        try:
            module.load_state_dict(weights, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{path / _TENSORS}: {mod_name}: {exc}") from exc
    try:
        _optimizer_load(optimizer, tensors, meta["optimizer"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: optimizer state does not fit: {exc}") from exc
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), meta.get("extra", {})
