"""Typed training configs: dataclasses are the schema, YAML is only their serialisation.

``load_config`` builds a dataclass from YAML strictly (UTF-8 only; a duplicate or unknown key, a
value of the wrong type or a non-finite number is an error naming the file and field; nested
dataclasses recurse), so a typo in a config file fails loudly instead of silently training with a
default or comparing a string to a number. Every stage's config is read through it. Every paper default is written where the field is declared. The checks each
stage's ``validate()`` runs on its config (``check_types``, ``require_positive``,
``require_fraction``) live here too, so an error names the field the same way in every stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import write_text

T = TypeVar("T")

#: The largest finite float32, the precision training computes in: a float config value must not
#: exceed it in magnitude (NaN fails the comparison too).
FLOAT32_MAX = 3.4028234663852886e38


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


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last one silently, so a config would train with whichever value came second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader's own error names an unhashable key
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first[key]})", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML document at ``path``, read strictly: UTF-8 only, no duplicate keys.

    Raises:
        InputError: naming the file; for bad bytes the offset, for bad YAML the line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InputError(f"{path}: unreadable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InputError(f"{path}: not valid YAML ({at}{exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({exc})") from None
    except RecursionError:
        raise InputError(f"{path}: not valid YAML (nested too deeply)") from None


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML or code) matches annotation ``hint``.

    Handles the annotations the training configs use: bool, int, float (an int is accepted; NaN and
    anything beyond float32's range are not: no config number means "unbounded", training computes
    in float32, where 1e39 is inf, and a non-finite rate or weight only trains to NaN), str,
    ``Literal``, ``X | None``, ``tuple[T, ...]`` and dataclasses; anything else passes.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(hint)
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return True


def _check_field(where: str, value: Any, hint: Any) -> None:
    """``InputError`` naming the field ``where`` unless ``value`` fits ``hint``."""
    if _fits(value, hint):
        return
    expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    note = ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        note = f" (not a finite float32: at most {FLOAT32_MAX:.4g} in magnitude)"
    elif isinstance(value, str):
        try:
            float(value)
            note = " (YAML reads 1e-3 as a string: write 1.0e-3)"
        except ValueError:
            pass
    raise InputError(f"{where}: expected {expected}, got {value!r}{note}")


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    Every value is checked against its field's annotation before ``cls`` is built, so a
    ``__post_init__`` comparing a field to a number never sees a string.
    """
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        _check_field(f"{where}.{name}", value, hint)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from exc


def load_config(path: str | Path, cls: type[T]) -> T:
    """Read YAML at ``path`` (``read_yaml``) into dataclass ``cls``; ``InputError`` names the file and
    the field (``file: Class.field``)."""
    data = read_yaml(path)
    return from_dict(cls, {} if data is None else data, f"{path}: {cls.__name__}")


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
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_types(cfg: Any, where: str) -> None:
    """``InputError`` for a field of a built config whose value does not match its annotation
    (``_fits``), recursing into nested dataclasses: the same check ``from_dict`` runs on YAML values,
    for configs built or replaced in code."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _check_field(f"{where}.{f.name}", value, hints[f.name])
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
