"""Atomic file writes and hashing: nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    The temp file lives in the same directory so ``os.replace`` is an atomic rename on one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_dir_like_mkdir(path: Path) -> None:
    """Give a ``tempfile.mkdtemp`` directory (0700) the permissions ``mkdir`` would have."""
    os.chmod(path, 0o777 & ~_umask())


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_hashes(
    root: str | os.PathLike[str],
    expected: Mapping[str, str],
    listed_in: str,
    error: Callable[[str], Exception],
    remedy: str,
) -> None:
    """Re-hash every file ``expected`` lists (paths relative to ``root`` → sha256); raise
    ``error`` naming the first one that is missing or changed.

    The one integrity check for everything written with a hash list (bundles, checkpoints):
    ``listed_in`` says where the list lives ("the manifest", "config.json"), ``remedy`` what to do
    about a changed file.
    """
    root = Path(root)
    for rel, digest in expected.items():
        path = root / rel
        if not path.is_file():
            raise error(f"{path}: listed in {listed_in} but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise error(f"{path}: sha256 mismatch ({listed_in}: {digest[:12]}…, file: {actual[:12]}…): {remedy}")


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str], marker: str, what: str) -> Iterator[Path]:
    """Build a directory atomically: yield a staging directory beside ``out``, swap it in on success.

    ``out`` must be absent, empty, or a directory of this kind (it holds ``marker``): anything else is
    refused rather than replaced. On failure the staging directory is deleted, so nothing
    half-written is left; on success an older ``out`` is swapped out, then removed.
    """
    from conceptseg_edge.errors import InputError

    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise InputError(f"--out {out}: exists and is not a {what}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    make_dir_like_mkdir(staging)
    try:
        yield staging
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{staging.name[-8:]}")
            out.rename(old)
        staging.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
