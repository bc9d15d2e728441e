"""Resumable training state: a directory written atomically, safetensors + JSON, never pickle::

    state/
      tensors.safetensors   model weights ("model.<name>.*") and optimizer tensors ("optim.<i>.<key>")
      state.json            step, optimizer param groups and scalar state, torch RNG, the stage's
                            extra JSON, and the sha256 of tensors.safetensors

Every stage draws its data from ``numpy.random.default_rng([seed, step])`` and has no dropout, so
weights + optimizer state + step are the whole state: a resumed run takes exactly the step an
uninterrupted one would.

A kill at any instant leaves a complete state to resume from. ``save_state`` builds the new state in
``.state.<id>.tmp`` (files and directory fsynced), moves the current ``state`` aside to
``.state.<id>.old``, renames the new one into place, fsyncs ``out_dir`` and only then deletes the old
one. Between the two renames there is no ``state/``: ``state_path`` then falls back to the moved-aside
one, the last complete state. ``clean_state_dir`` removes what a kill leaves behind. Inf or NaN in any
tensor is refused (``require_finite``): a diverged run never overwrites the last good state.
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

from conceptseg_edge.errors import CheckpointError, TrainingError
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


def require_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """``TrainingError`` if a floating-point tensor holds inf or NaN; ``what`` names what would have
    been written (the run's directory and step)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingError(f"{what}: {len(bad)} of {len(tensors)} tensors hold inf or NaN (first: {bad[0]}); "
                            "not written. The run diverged: lower the learning rate and start again, or resume "
                            "from the last state")


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk: a rename is durable once its directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _moved_aside(out_dir: Path) -> list[Path]:
    """The ``.state.<id>.old`` directories in ``out_dir`` (at most one outside a ``save_state`` call)."""
    return sorted(p for p in out_dir.glob(f".{STATE_DIR}.*.old") if p.is_dir())


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def save_state(
    out_dir: str | os.PathLike[str],
    step: int,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/state`` durably: built beside it, then swapped in; returns its path.

    Raises:
        TrainingError: a weight or optimizer tensor holds inf or NaN (nothing is written).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final = out_dir / STATE_DIR
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
    require_finite(tensors, f"{final}: state of step {step}")
    tensors["rng.torch"] = torch.get_rng_state()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{STATE_DIR}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        save_file(tensors, tmp / _TENSORS)
        write_json(tmp / _META, {
            "format": _STATE_FORMAT,
            "step": step,
            "optimizer": optim_meta,
            "extra": extra or {},
            "sha256": sha256_file(tmp / _TENSORS),
        })
        for path in (tmp / _TENSORS, tmp / _META, tmp):
            _fsync(path)
        if final.exists():
            _remove(_moved_aside(out_dir))  # ``state`` is complete: anything moved aside before it is stale
            os.replace(final, out_dir / f".{STATE_DIR}.{uuid.uuid4().hex[:12]}.old")
        # a kill here leaves no ``state``: state_path() falls back to the one just moved aside
        os.replace(tmp, final)
        _fsync(out_dir)
        _remove(_moved_aside(out_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def state_path(out_dir: str | os.PathLike[str]) -> Path | None:
    """The directory holding ``out_dir``'s last complete state: ``state``, or, after a kill between
    ``save_state``'s two renames, the state it had just moved aside; ``None`` when there is none."""
    out_dir = Path(out_dir)
    candidates = [out_dir / STATE_DIR, *_moved_aside(out_dir)]
    return next((p for p in candidates if (p / _META).is_file()), None)


def has_state(out_dir: str | os.PathLike[str]) -> bool:
    return state_path(out_dir) is not None


def clean_state_dir(out_dir: str | os.PathLike[str]) -> None:
    """Remove what a killed ``save_state`` left in ``out_dir``: ``.state.*.tmp`` staging directories
    (never swapped in, so never the last complete state), and moved-aside ``.state.*.old`` ones once
    ``state`` is complete."""
    out_dir = Path(out_dir)
    _remove(sorted(p for p in out_dir.glob(f".{STATE_DIR}.*.tmp") if p.is_dir()))
    if (out_dir / STATE_DIR / _META).is_file():
        _remove(_moved_aside(out_dir))


def load_state(
    out_dir: str | os.PathLike[str],
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
) -> tuple[int, dict[str, Any]]:
    """Restore modules, optimizer and torch RNG from ``out_dir``'s last complete state
    (``state_path``); returns ``(step, extra)``.

    Raises:
        CheckpointError: no state, missing or tampered files, or weights that do not fit the modules.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = state_path(out_dir)
    if path is None:
        raise CheckpointError(f"{Path(out_dir) / STATE_DIR}: no training state to resume from")
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
