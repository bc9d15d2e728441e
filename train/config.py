"""Typed training configs: dataclasses are the schema, YAML is only their serialisation.

``load_config`` builds a dataclass from YAML strictly (unknown keys are an error naming the field;
nested dataclasses recurse), so a typo in a config file fails loudly instead of silently training
with a default. Every paper default is written where the field is declared. The checks each
stage's ``validate()`` runs on its config (``check_types``, ``require_positive``,
``require_fraction``) live here too, so an error names the field the same way in every stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import write_text

T = TypeVar("T")


@dataclasses.dataclass
class LoopConfig:
    """What every step-loop stage (backbone, warmstart, stage 1) shares: how often it evaluates and
    writes resumable state, its seed and torch threads, the progress bar, and whether it resumes."""

    eval_every: int = dataclasses.field(default=50, metadata={"help": "held-out evaluation every n steps"})
    save_every: int = dataclasses.field(default=50, metadata={"help": "resumable state every n steps"})
    seed: int = 0
    threads: int | None = dataclasses.field(default=None, metadata={"help": "torch threads (None: torch's default)"})
    progress: bool = True
    resume: bool = dataclasses.field(default=True, metadata={"help": "continue from out_dir's state if present"})


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from exc


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read YAML at ``path`` into dataclass ``cls``; ``InputError`` names the file and field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from exc
    return from_dict(cls, data, str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain data (tuples become lists, for YAML/JSON)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(path: str | Path, cfg: Any) -> None:
    """Write ``cfg`` as YAML atomically (checkpoints keep the config that produced them)."""
    import yaml

    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_types(cfg: Any, where: str) -> None:
    """``InputError`` for a field whose value does not match its annotation (YAML gives any type).

    Handles the annotations the training configs use: bool, int, float (an int is accepted), str,
    ``X | None``, ``tuple[T, ...]`` and nested dataclasses (checked recursively).
    """
    def ok(value: Any, hint: Any) -> bool:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return any(ok(value, h) for h in typing.get_args(hint))
        if hint is type(None):
            return value is None
        if hint is bool:
            return isinstance(value, bool)
        if hint is int:
            return isinstance(value, int) and not isinstance(value, bool)
        if hint is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if hint is str:
            return isinstance(value, str)
        if origin is tuple:
            args = typing.get_args(hint)
            return isinstance(value, tuple) and all(ok(v, args[0]) for v in value)
        if dataclasses.is_dataclass(hint):
            return isinstance(value, hint)
        return True

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not ok(value, hints[f.name]):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = " (YAML reads 1e-3 as a string: write 1.0e-3)"
                except ValueError:
                    pass
            raise InputError(f"{where}.{f.name}: expected {hints[f.name]}, got {value!r}{hint}")
        if dataclasses.is_dataclass(value):
            check_types(value, f"{where}.{f.name}")


def require_positive(where: str, **values: float) -> None:
    """``InputError`` naming the first field that is not > 0."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"{where}.{name}: expected > 0, got {value!r}")


def require_fraction(where: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"{where}.{name}: expected a fraction in [0, 1], got {value!r}")
