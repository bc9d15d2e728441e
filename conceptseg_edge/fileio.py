"""Atomic file writes, hashing and path checks: nothing half-written is left behind, nothing read or
written outside the place it belongs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from conceptseg_edge.errors import InputError, ManifestError


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike[str]) -> Iterator[tuple[Path, ...]]:
    """Yield a temporary path beside each of ``paths``; rename them all over ``paths`` only if the
    block succeeds: several outputs of one command are written all or none.

    The temp files live in the same directories so each ``os.replace`` is an atomic rename on one
    filesystem; the renames run only after the block wrote every file.
    """
    temps: list[Path] = []
    try:
        for path in map(Path, paths):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield tuple(temps)
        for tmp, path in zip(temps, paths):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``atomic_paths`` for one file: a temporary path renamed over ``path`` if the block succeeds."""
    with atomic_paths(path) as (tmp,):
        yield tmp


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


def read_json_object(path: Path, missing: str, expected: str) -> dict[str, Any]:
    """The JSON object in ``path``, for user-supplied files: ``InputError`` "<path>: <missing>" when it
    is absent, "<path>: unreadable JSON (...)" when it does not parse, "<path>: <expected>" when the
    top level is not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path}: {missing}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: {expected}")
    return data


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def relative_path(rel: Any, where: str, error: Callable[[str], Exception] = ManifestError) -> str:
    """``rel`` if it is a non-empty relative path with no ``..``: the only kind a bundle or checkpoint
    may list, so that joining it to its directory cannot leave that directory."""
    if not isinstance(rel, str) or not rel:
        raise error(f"{where}: expected a non-empty relative path, got {rel!r}")
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
        raise error(f"{where}: {rel!r} must be a relative path inside its directory (no absolute path, no '..')")
    return rel


def contained(
    root: str | os.PathLike[str], rel: Any, where: str, error: Callable[[str], Exception] = ManifestError
) -> Path:
    """``root / rel`` resolved, refused unless ``rel`` is a ``relative_path`` that, after following
    symlinks, still lies inside ``root``.

    The one gate for every path read from a manifest or hash list: a bundle is untrusted input, and
    its entries must not make a reader load, hash or copy a file from elsewhere.
    """
    base = Path(root).resolve()
    path = (base / relative_path(rel, where, error)).resolve()
    if not path.is_relative_to(base):
        raise error(f"{where}: {rel!r} leads to {path}, outside {base} (a symlink leaving the directory)")
    return path


def contained_tree(root: str | os.PathLike[str], error: Callable[[str], Exception] = ManifestError) -> None:
    """Refuse any symlink under ``root`` that leads outside it, naming the link.

    Readers open files a manifest does not list (a tokenizer's side files); this check makes sure
    none of them can be a link out of the bundle either.
    """
    root = Path(root)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder) / name
            if path.is_symlink():
                contained(root, path.relative_to(root).as_posix(), str(path), error)


def verify_hashes(
    root: str | os.PathLike[str],
    expected: Mapping[str, str],
    listed_in: str,
    error: Callable[[str], Exception],
    remedy: str,
) -> None:
    """Re-hash every file ``expected`` lists (paths relative to ``root`` → sha256); raise
    ``error`` naming the first one that is missing, changed, or outside ``root`` (``contained``).

    The one integrity check for everything written with a hash list (bundles, checkpoints):
    ``listed_in`` says where the list lives ("the manifest", "config.json"), ``remedy`` what to do
    about a changed file.
    """
    root = Path(root)
    for rel, digest in expected.items():
        contained(root, rel, f"{listed_in}: entry {rel!r}", error)
        path = root / rel
        if not path.is_file():
            raise error(f"{path}: listed in {listed_in} but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise error(f"{path}: sha256 mismatch ({listed_in}: {digest[:12]}…, file: {actual[:12]}…): {remedy}")


def writable_output(path: str | os.PathLike[str], where: str, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work is done: an empty path, a
    directory where a file goes (or a file where a directory goes), a file among its parents, or a
    place where nothing may be created (probed by creating a file, as permissions alone do not tell
    for root or a read-only mount).

    ``where`` names the option ("--out"); ``directory``: the output is a directory (absent or one
    already). Missing parents are fine: writers create them.
    """
    if not str(path):
        raise InputError(f"{where}: empty path, expected a {'directory' if directory else 'file'}")
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{where} {path}: exists and is not a directory")
    if not directory and path.is_dir():
        raise InputError(f"{where} {path}: is a directory, expected a file path")
    existing = path if directory and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{where} {path}: {existing} is a file, expected a directory among its parents")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"{where} {path}: cannot create files in {existing} ({exc.strerror or exc})") from None
    return path


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str], marker: str, what: str) -> Iterator[Path]:
    """Build a directory atomically: yield a staging directory beside ``out``, swap it in on success.

    ``out`` must be absent, empty, or a directory of this kind (it holds ``marker``): anything else is
    refused rather than replaced. On failure the staging directory is deleted, and so are the
    parents this call created, so nothing half-written is left; on success an older ``out`` is
    swapped out, then removed.
    """
    out = writable_output(out, "--out", directory=True)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise InputError(f"--out {out}: exists and is not a {what}; refusing to replace it")
    created = [parent for parent in out.parents if not parent.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    make_dir_like_mkdir(staging)
    done = False
    try:
        yield staging
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{staging.name[-8:]}")
            out.rename(old)
        staging.rename(out)
        done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in [] if done else created:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                parent.rmdir()
