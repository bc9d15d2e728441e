"""The torch-free runtime: runs a bundle with numpy + ONNX Runtime (or TensorRT).

Nothing under ``conceptseg_edge.runtime`` imports torch; a test enforces it. Public names load lazily
so ``import conceptseg_edge.runtime`` costs nothing until a predictor is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "conceptseg_edge.runtime.engine",
    "EngineFactory": "conceptseg_edge.runtime.engine",
    "OrtEngine": "conceptseg_edge.runtime.engine",
    "open_engine": "conceptseg_edge.runtime.engine",
    "SAM2Predictor": "conceptseg_edge.runtime.predictor",
    "Prediction": "conceptseg_edge.runtime.predictor",
    "ConceptSegmenter": "conceptseg_edge.runtime.segmenter",
    "SegmentResult": "conceptseg_edge.runtime.segmenter",
    "ConceptBank": "conceptseg_edge.runtime.bank",
    "ConceptEncoder": "conceptseg_edge.runtime.concept",
    "OnnxConceptEncoder": "conceptseg_edge.runtime.concept",
    "OnnxPolicy": "conceptseg_edge.runtime.policy",
    "VideoSegmenter": "conceptseg_edge.runtime.tracker",
    "VideoStream": "conceptseg_edge.runtime.tracker",
    "ObjectPrompt": "conceptseg_edge.runtime.tracker",
    "TrackerConfig": "conceptseg_edge.runtime.tracker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conceptseg_edge.runtime' has no attribute {name!r}")
