"""Sharded safetensors as Hugging Face releases them: ``model-0000i-of-0000n.safetensors`` + an index.

Contract: ``read_shards(root)`` checks the index against the files before any tensor is read and
names what disagrees: a shard the index lists that is missing, a tensor the index maps to a shard
that lacks it, a tensor a shard holds that the index does not map to it, a shard file the index
does not list. Only headers are read to check (``safe_open`` memory-maps the file), so a 7B release
is checked in milliseconds; ``ShardSet.tensors()`` then yields one tensor at a time in its stored
dtype, so a loader can copy it into place and drop it before the next is read.

``write_shards`` writes the same layout: greedy packing in key order up to ``max_shard_size`` bytes
per shard (a tensor larger than that gets a shard of its own, as transformers does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from conceptseg_edge.errors import CheckpointError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from its shard's header."""

    name: str  # as stored, which a loader may rename
    shard: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ShardSet:
    """A checked set of shards: every tensor name → its shard, shape and stored dtype."""

    root: Path
    tensors_info: Mapping[str, TensorInfo]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` shard by shard, each tensor read on its own in its stored dtype."""
        by_shard: dict[str, list[str]] = {}
        for name, info in self.tensors_info.items():
            by_shard.setdefault(info.shard, []).append(name)
        for shard, names in by_shard.items():
            with _open(self.root / shard) as handle:
                for name in names:
                    yield name, handle.get_tensor(name)


def read_tensor(shards: ShardSet, info: TensorInfo) -> torch.Tensor:
    """One tensor in its stored dtype; its shard is mapped only for the read (the pages leave this
    process's memory with the mapping), so streaming loaders stay at one tensor's size."""
    with _open(shards.root / info.shard) as handle:
        return handle.get_tensor(info.name)


def parse_size(size: int | str) -> int:
    """``max_shard_size`` as bytes: an int, or a string such as ``"5GB"`` / ``"500MB"`` (decimal units)."""
    if isinstance(size, bool):
        raise InputError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(str(size).strip())
        if not match:
            raise InputError(f"max_shard_size: expected bytes or a size like '5GB', got {size!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise InputError(f"max_shard_size: expected > 0 bytes, got {size!r}")
    return value


def write_shards(root: Path, tensors: Mapping[str, torch.Tensor], max_shard_size: int | str) -> dict[str, str]:
    """Write ``tensors`` as numbered shards plus the index into ``root``; returns the weight map."""
    limit = parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    filled = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and filled + nbytes > limit:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n].detach().cpu().contiguous() for n in names}, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return weight_map


def read_shards(root: Path) -> ShardSet:
    """Check ``root``'s index against its shard files (headers only) and return the tensor table.

    Without an index, a lone ``model.safetensors`` is the one shard (small releases ship that way).
    """
    weight_map = _read_weight_map(root)
    listed = sorted(set(weight_map.values()))
    on_disk = {p.name for p in root.iterdir() if p.is_file() and _SHARD_NAME.fullmatch(p.name)}
    unlisted = sorted(on_disk - set(listed))
    if unlisted:
        raise CheckpointError(f"{root / unlisted[0]}: shard file not listed in {INDEX_NAME}")
    info: dict[str, TensorInfo] = {}
    for shard in listed:
        path = root / shard
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {INDEX_NAME} but missing")
        with _open(path) as handle:
            held = set(handle.keys())
            expected = {name for name, where in weight_map.items() if where == shard}
            lacking = sorted(expected - held)
            if lacking:
                raise CheckpointError(f"{path}: lacks tensor {lacking[0]!r} that {INDEX_NAME} maps to it")
            stray = sorted(held - expected)
            if stray:
                raise CheckpointError(f"{path}: holds tensor {stray[0]!r} that {INDEX_NAME} does not map to it")
            for name in sorted(held):
                piece = handle.get_slice(name)
                info[name] = TensorInfo(name, shard, tuple(piece.get_shape()), _DTYPES[piece.get_dtype()])
    return ShardSet(root, info)


def _read_weight_map(root: Path) -> dict[str, str]:
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        if (root / SINGLE_NAME).is_file():
            with _open(root / SINGLE_NAME) as handle:
                return dict.fromkeys(handle.keys(), SINGLE_NAME)
        raise CheckpointError(f"{root}: neither {INDEX_NAME} nor {SINGLE_NAME}")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: not valid JSON: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: weight_map: expected a non-empty object of tensor → shard")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}]: {shard!r} is not a .safetensors file name")
    return weight_map


def _open(path: Path):  # noqa: ANN202 - safetensors' handle type is private
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors: {exc}") from exc


_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
