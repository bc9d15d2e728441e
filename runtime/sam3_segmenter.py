"""``Sam3Segmenter``: ``ConceptSegmenter``'s routes over SAM 3 (a bundle from ``export concept --backbone sam3``).

The router, the bank-free policy half (``OnnxConceptEncoder``) and the result type are the SAM2
segmenter's; only the two places a route meets the backbone differ (the paper's SAM 3 routing):

- ``shortcut``: the concept phrase goes to SAM 3 itself as its text prompt; the router keeps the mask
  when sigmoid(presence logit) >= τ(words), else the request falls back to ``reason``. No policy, no
  CTM, no bank.
- ``reason``: policy generation → CTM on the completion's hidden states → the tokens into the head's
  visual-prompt slot beside the query's text. SAM 3's head was exported without geometric prompts,
  so the ``<bbox>`` is reported in the result, not prompted.

Either way the answer is one mask, as SAM2's routes give: the highest-scoring query's (all of SAM 3's
instances are ``Sam3Predictor.predict``'s). There is no ``prompt`` route (points and boxes are not
exported).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conceptseg_edge.manifest import BundleManifest
from conceptseg_edge.preprocess import upsample_mask
from conceptseg_edge.runtime.concept import ReasonOutput
from conceptseg_edge.runtime.engine import EngineFactory
from conceptseg_edge.runtime.predictor import Prediction
from conceptseg_edge.runtime.sam3 import Sam3Prediction, Sam3Predictor
from conceptseg_edge.runtime.segmenter import ConceptSegmenter, _Candidate
from conceptseg_edge.timings import Timings, elapsed_ms

#: The routes a SAM 3 concept bundle serves.
SAM3_ROUTES = ("shortcut", "reason")


def best_query(prediction: Sam3Prediction) -> Prediction:
    """SAM 3's answer as one mask: the highest-scoring query's, at the original size, with the presence
    score standing where SAM2's object score stands (what ``accept_shortcut`` thresholds)."""
    top = int(np.argmax(prediction.query_scores))
    return Prediction(
        mask=upsample_mask(prediction.low_res_logits[top], prediction.semantic_mask.shape),
        score=float(prediction.query_scores[top]),
        object_score=prediction.presence,
        mask_index=top,
        low_res_logits=prediction.low_res_logits[top][None],
        object_score_logit=prediction.presence_logit,
        timings=prediction.timings,
    )


class Sam3Segmenter(ConceptSegmenter):
    """``ConceptSegmenter`` with SAM 3 as the backbone; chosen by ``ConceptSegmenter.from_bundle``."""

    predictor: Sam3Predictor

    @staticmethod
    def open_backbone(bundle: Path, provider: str, manifest: BundleManifest, engine_factory: EngineFactory) -> Sam3Predictor:
        return Sam3Predictor.from_bundle(bundle, provider, manifest, engine_factory)

    def _shortcut_candidate(self, query: str, timings: Timings) -> _Candidate:
        """SAM 3 on the phrase as its text prompt. The ``concept_tokens`` stage is the phrase's text
        features (the text encoder on a phrase's first use, a cache lookup after)."""
        t0 = time.perf_counter_ns()
        self.predictor.text_features(query)
        text = Timings(concept_tokens=elapsed_ms(t0), providers={"concept_tokens": self.predictor.text.provider})
        return _Candidate(best_query(self.predictor.predict(query)), None, timings | text)

    def _reason_prediction(self, query: str, out: ReasonOutput) -> Prediction:
        """The CTM's tokens through the visual-prompt slot, beside the query as the text prompt."""
        return best_query(self.predictor.predict(query, out.tokens))

    def _decode_batch(self, phrases: Sequence[str], image_timings: Timings) -> list[_Candidate]:
        """One head call per phrase: the head is exported for one text prompt at a time."""
        return [self._shortcut_candidate(p, image_timings) for p in phrases]
