"""Assembling a bundle directory atomically.

``staged_bundle(out)`` yields a hidden staging directory beside ``out``; when the block succeeds the
staging directory replaces ``out`` (an older bundle there is swapped out, then removed), and when it
fails the staging directory is deleted. A failed export therefore leaves nothing behind and never
half-overwrites an existing bundle. ``out`` must be absent, empty, or a bundle.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import make_dir_like_mkdir
from conceptseg_edge.manifest import MANIFEST_NAME


@contextlib.contextmanager
def staged_bundle(out: str | Path) -> Iterator[Path]:
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise InputError(f"--out {out}: exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    make_dir_like_mkdir(staging)
    try:
        yield staging
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{src.name[-8:]}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
