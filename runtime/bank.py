"""The concept bank: concept tokens cached on disk per normalised phrase, keyed to the bundle.

A production line asks for the same few concepts all day; the bank makes it pay the policy prefill
once per concept. Entries live under ``<root>/<bundle key>/``, where the key hashes the files that
determine the tokens (policy graphs, CTM, tokenizer): a re-exported bundle gets a new key, so stale
tokens are never served, and ``prune()`` removes the other keys' entries. Each entry is one ``.npy``
written atomically; a corrupt entry is dropped and recomputed, never served.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conceptseg_edge.fileio import writable_output, write_bytes
from conceptseg_edge.manifest import BundleManifest

# Parts and files whose bytes decide what tokens a phrase maps to.
TOKEN_PARTS = ("policy_embed", "policy_decoder", "ctm")


def normalise_phrase(phrase: str) -> str:
    """Case-, width- and whitespace-insensitive key: 'Red  Circle ' == 'red circle'."""
    text = unicodedata.normalize("NFKC", phrase).casefold()
    return re.sub(r"\s+", " ", text).strip()


def bundle_key(manifest: BundleManifest) -> str:
    """A short digest of everything that determines the concept tokens."""
    digest = hashlib.sha256()
    for name in TOKEN_PARTS:
        if name in manifest.parts:
            digest.update(f"{name}:{manifest.parts[name].sha256}\n".encode())
    for rel, sha in sorted(manifest.files.items()):
        digest.update(f"{rel}:{sha}\n".encode())
    return digest.hexdigest()[:16]


class ConceptBank:
    """Disk cache of (K, 256) float32 concept tokens, with in-memory hits after the first read."""

    def __init__(self, root: str | Path, key: str) -> None:
        """Raises ``InputError`` when ``root`` cannot hold the bank (a file, an unwritable place)."""
        self.root = writable_output(root, "bank", directory=True)
        self.key = key
        self.dir = self.root / key
        self._memory: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, phrase: str) -> Path:
        return self.dir / (hashlib.sha256(phrase.encode()).hexdigest()[:24] + ".npy")

    def get(self, phrase: str) -> np.ndarray | None:
        phrase = normalise_phrase(phrase)
        if phrase in self._memory:
            self.hits += 1
            return self._memory[phrase]
        path = self._path(phrase)
        if path.is_file():
            try:
                tokens = np.load(path, allow_pickle=False)
            except (ValueError, OSError):
                path.unlink(missing_ok=True)  # corrupt: recompute rather than serve it
            else:
                self._memory[phrase] = tokens
                self.hits += 1
                return tokens
        self.misses += 1
        return None

    def put(self, phrase: str, tokens: np.ndarray) -> None:
        phrase = normalise_phrase(phrase)
        tokens = np.ascontiguousarray(tokens, dtype=np.float32)
        buf = io.BytesIO()
        np.save(buf, tokens, allow_pickle=False)
        write_bytes(self._path(phrase), buf.getvalue())
        self._memory[phrase] = tokens

    def get_or_compute(self, phrase: str, compute: Callable[[str], np.ndarray]) -> tuple[np.ndarray, bool]:
        """Tokens for ``phrase`` and whether they came from the bank."""
        cached = self.get(phrase)
        if cached is not None:
            return cached, True
        tokens = compute(phrase)
        self.put(phrase, tokens)
        return tokens, False

    def prune(self) -> int:
        """Delete entries of other bundle keys; returns how many key directories were removed."""
        if not self.root.is_dir():
            return 0
        stale = [d for d in self.root.iterdir() if d.is_dir() and d.name != self.key]
        for d in stale:
            shutil.rmtree(d, ignore_errors=True)
        return len(stale)
