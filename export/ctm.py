"""The CTM family: the Concept Translation Module's part spec, parity cases, reference and export.

The CTM is exported as it is (``models/ctm.py``'s module needs no export-time wrapper): completion
hidden states of any length → the concept tokens the SAM2 decoder takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptseg_edge.export.onnx_export import export_and_validate
from conceptseg_edge.export.parts import FEATURE_ATOL, PartFactory, PartSpec
from conceptseg_edge.manifest import PartManifest, TensorSpec

REFERENCE_NAME = "ConceptTranslationModule, torch eager"


def ctm_spec(hidden_size: int, num_queries: int = 8) -> PartSpec:
    """Concept Translation Module: completion hidden states (any length) → concept tokens.

    Batch 1: the CTM has no padding mask (as the paper), so completions of different lengths cannot
    share a batch without changing the result.
    """
    return PartSpec(
        name="ctm",
        file="ctm.onnx",
        inputs=(TensorSpec("hidden_states", "float32", (1, "completion_len", hidden_size)),),
        outputs=(TensorSpec("concept_tokens", "float32", (1, num_queries, 256)),),
        atol={"concept_tokens": FEATURE_ATOL},
        forbidden_ops=frozenset({"OneHot", "NonZero"}),
    )


#: This family's parts, for ``export/registry.py``.
PARTS: dict[str, PartFactory] = {"ctm": ctm_spec}


def ctm_cases(hidden_size: int) -> list[dict[str, np.ndarray]]:
    """Completions of 7, 31 and 1 tokens (the first is traced, so no length is specialised)."""
    rng = np.random.default_rng(0)
    return [{"hidden_states": rng.standard_normal((1, t, hidden_size)).astype(np.float32)} for t in (7, 31, 1)]


def export_ctm(ctm, out_dir: Path, opset: int, weight_storage: str = "fp32") -> PartManifest:
    """Export and validate ``ctm`` (a ``ConceptTranslationModule``) into ``out_dir``."""
    import torch

    def reference(feeds):
        with torch.no_grad():
            return {"concept_tokens": ctm(torch.from_numpy(feeds["hidden_states"])).numpy()}

    d = ctm.config.hidden_size
    return export_and_validate(ctm.eval(), ctm_spec(d, ctm.config.num_queries), ctm_cases(d), reference,
                               REFERENCE_NAME, out_dir, opset, weight_storage)
