"""Which torch weights a ``--compare-torch`` run times against a bundle, refused rather than guessed.

A bundle records the checkpoint it was exported from (``source.checkpoint``) and its hash. That path
is where the export ran, often a temporary directory on another machine (the embedded bundle names
one): timing torch must then either be given the checkpoint (``--checkpoint``) or refuse, naming the
recorded path, never quietly drop the torch side. A checkpoint whose weights differ from the hash the
bundle recorded is refused too: its numbers would compare two different models.
"""

from __future__ import annotations

from pathlib import Path

from conceptseg_edge.errors import CheckpointError
from conceptseg_edge.fileio import sha256_file
from conceptseg_edge.manifest import BundleManifest

#: The weights file of a ConceptSeg checkpoint directory, the one ``source.checkpoint_sha256`` hashes.
CONCEPT_WEIGHTS = "model.safetensors"


def is_concept_bundle(manifest: BundleManifest) -> bool:
    """A ConceptSeg bundle (policy + CTM + SAM2): its source is a checkpoint directory, not a SAM2 ``.pt``."""
    return manifest.source.backbone_checkpoint is not None or "shortcut" in manifest.routes


def torch_checkpoint(manifest: BundleManifest, override: str | Path | None = None) -> Path | None:
    """The checkpoint to time torch with: ``override`` or the recorded one, checked against the
    recorded hash. None: the bundle was exported from random init (a SAM2 bundle times random
    weights then, said in its report); a concept bundle has no random-init reference.

    Raises ``CheckpointError`` naming the path and what to pass instead.
    """
    source = manifest.source
    if override is None and source.checkpoint is None:
        if is_concept_bundle(manifest):
            raise CheckpointError("source.checkpoint: the bundle records none; pass --checkpoint DIR to compare with torch")
        return None
    path = Path(override if override is not None else source.checkpoint)
    where = "--checkpoint" if override is not None else "source.checkpoint"
    concept = is_concept_bundle(manifest)
    weights = path / CONCEPT_WEIGHTS if concept else path
    if not weights.is_file():
        expected = f"a checkpoint directory holding {CONCEPT_WEIGHTS}" if concept else "a SAM2 .pt file"
        hint = "" if override is not None else "; the bundle was exported elsewhere: pass --checkpoint with a copy of it"
        raise CheckpointError(f"{where} {path}: not found (expected {expected}){hint}")
    if source.checkpoint_sha256 is not None:
        actual = sha256_file(weights)
        if actual != source.checkpoint_sha256:
            raise CheckpointError(f"{where} {path}: sha256 {actual[:12]}… differs from the bundle's "
                                  f"source.checkpoint_sha256 {source.checkpoint_sha256[:12]}…: torch would time other weights")
    return path
