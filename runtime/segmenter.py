"""``ConceptSegmenter``: the router and all three routes over one bundle, torch-free.

- ``prompt``: points / box → SAM2 decoder;
- ``shortcut``: concept tokens from the bank (or a text-only policy prefill → CTM) → SAM2 decoder,
  kept when sigmoid(object score) ≥ τ(words), else the request falls back to ``reason``;
- ``reason``: policy generation on the target (and support mosaic) → CTM on the completion's hidden
  states → SAM2 decoder with the ``<bbox>`` as a box prompt beside the tokens.

The encoder runs once per distinct image: a request on the image the segmenter already holds reuses
its features, and ``segment_concepts`` decodes several concepts on one image in one batched decoder
call. Every result names its route, why, and per-stage milliseconds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptseg_edge.episodes import Support
from conceptseg_edge.errors import InputError
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import BundleManifest, load_bundle
from conceptseg_edge.preprocess import as_rgb_array, make_prompts
from conceptseg_edge.router import RouteDecision, RouterConfig, accept_shortcut, choose_route
from conceptseg_edge.runtime.bank import ConceptBank, bundle_key
from conceptseg_edge.runtime.concept import ConceptEncoder, OnnxConceptEncoder
from conceptseg_edge.runtime.engine import EngineFactory, open_engine
from conceptseg_edge.runtime.predictor import Prediction, SAM2Predictor

CONCEPT_TOKEN_DIM = 256


@dataclass
class SegmentResult:
    """One mask in the original frame, with the route that produced it and why."""

    mask: np.ndarray  # (H, W) bool
    route: str
    reason: str
    score: float  # SAM2's predicted IoU
    object_score: float  # sigmoid of SAM2's object-score logit
    completion: str | None = None
    box: tuple[float, float, float, float] | None = None
    bank_hit: bool | None = None
    new_tokens: int | None = None  # tokens the policy generated (reason route)
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage

    def scores(self) -> dict[str, float]:
        return {"score": self.score, "object_score": self.object_score}


def _ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


class ConceptSegmenter:
    """Router + routes; numpy in, numpy out."""

    def __init__(
        self,
        predictor: SAM2Predictor,
        router: RouterConfig,
        routes: Sequence[str],
        concepts: ConceptEncoder | None = None,
        bank: ConceptBank | None = None,
    ) -> None:
        self.predictor = predictor
        self.router = router
        self.routes = frozenset(routes)
        self.concepts = concepts
        self.bank = bank
        self._image_key: str | None = None

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        provider: str = "cpu",
        bank_dir: str | Path | None = None,
        generation: GenerationConfig = GenerationConfig(),
        router: RouterConfig | None = None,
        engine_factory: EngineFactory = open_engine,
        manifest: BundleManifest | None = None,
    ) -> ConceptSegmenter:
        """Load a verified bundle; concept routes come up when the bundle carries their parts.

        Args:
            bundle: the bundle directory (graphs, processor files, manifest).
            provider: "cpu", "cuda" or "tensorrt", handed to ``engine_factory``.
            bank_dir: concept bank root; None runs the shortcut without a bank.
            generation: the reason route's decoding budget.
            router: shortcut thresholds; None takes the manifest's (or the paper's defaults).
            engine_factory: opens each part (default: ONNX parts on ONNX Runtime).
            manifest: one the caller already read (Triton's BLS path, whose graphs live in other
                models, reads it without verifying files); None loads and verifies the bundle's.
        """
        bundle = Path(bundle)
        manifest = manifest or load_bundle(bundle)
        predictor = SAM2Predictor.from_bundle(bundle, provider, manifest, engine_factory)
        concepts = None
        if {"shortcut", "reason"} & set(manifest.routes):
            concepts = OnnxConceptEncoder.from_bundle(bundle, manifest, provider, generation, engine_factory)
        bank = ConceptBank(bank_dir, bundle_key(manifest)) if bank_dir is not None and concepts else None
        return cls(predictor, router or manifest.router or RouterConfig(), manifest.routes, concepts, bank)

    # ------------------------------------------------------------------ image state

    def reset(self) -> None:
        """Forget the cached image features (the next request re-runs the encoder)."""
        self._image_key = None
        self.predictor.reset()

    def _set_image(self, image: np.ndarray) -> dict[str, float]:
        """Encode ``image`` unless it is the one already held; returns this call's image stage ms."""
        key = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16]).hexdigest()
        if key == self._image_key:
            return {"preprocess": 0.0, "encoder": 0.0}
        self._image_key = None
        self.predictor.set_image(image)
        self._image_key = key
        return dict(self.predictor.image_timings)

    # ------------------------------------------------------------------ routes

    def _concept_tokens(self, phrase: str) -> tuple[np.ndarray, bool, float]:
        t0 = time.perf_counter_ns()
        if self.bank is not None:
            tokens, hit = self.bank.get_or_compute(phrase, self.concepts.from_text)
        else:
            tokens, hit = self.concepts.from_text(phrase), False
        return tokens, hit, _ms(t0)

    def _decode(self, prediction: Prediction, route: str, reason: str, timings: dict[str, float], **extra) -> SegmentResult:
        return SegmentResult(
            mask=prediction.mask,
            route=route,
            reason=reason,
            score=prediction.score,
            object_score=prediction.object_score,
            timings={**timings, **{k: prediction.timings[k] for k in ("decoder", "postprocess") if k in prediction.timings}},
            **extra,
        )

    def _reason(self, image, query, supports, why: str, timings: dict[str, float]) -> SegmentResult:
        out = self.concepts.reason(image, query, supports)
        timings.update(out.timings)
        prediction = self.predictor.predict(box=out.box, concept_tokens=out.tokens, multimask=False)
        return self._decode(prediction, "reason", why, timings, completion=out.completion, box=out.box,
                            new_tokens=out.new_tokens)

    def _decide(self, has_geometry: bool, query: str | None, route: str) -> RouteDecision:
        if route not in ("auto", "prompt", "shortcut", "reason"):
            raise InputError(f"route: unknown route {route!r}; expected auto, prompt, shortcut or reason")
        return choose_route(has_geometry, query, self.router, self.routes, None if route == "auto" else route)

    def segment(
        self,
        image: np.ndarray,
        query: str | None = None,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        supports: Sequence[Support] = (),
        route: str = "auto",
    ) -> SegmentResult:
        """Segment ``image`` ((H, W, 3) uint8) for a concept query and/or points/box (original pixels)."""
        image = as_rgb_array(image)
        prompts = make_prompts(points, labels, box, image.shape[:2])
        decision = self._decide(not prompts.empty, query, route)
        timings = self._set_image(image)
        if decision.route == "prompt":
            prediction = self.predictor.predict(points=points, labels=labels, box=box)
            return self._decode(prediction, "prompt", decision.reason, timings)
        if decision.route == "shortcut":
            tokens, hit, ms = self._concept_tokens(query)
            timings["concept_tokens"] = ms
            prediction = self.predictor.predict(concept_tokens=tokens, multimask=False)
            if decision.fallback is None or accept_shortcut(prediction.object_score_logit, decision.n_words, self.router):
                return self._decode(prediction, "shortcut", decision.reason, timings, bank_hit=hit)
            why = (f"shortcut rejected: presence {prediction.object_score:.3f} < "
                   f"tau {self.router.tau(decision.n_words):.3f}")
            return self._reason(image, query, supports, why, timings)
        return self._reason(image, query, supports, decision.reason, timings)

    def segment_concepts(self, image: np.ndarray, queries: Sequence[str], route: str = "auto") -> list[SegmentResult]:
        """Several concepts on one image: one encoder run, shortcut candidates decoded as one batch."""
        image = as_rgb_array(image)
        if not queries:
            raise InputError("queries: give at least one concept")
        decisions = [self._decide(False, q, route) for q in queries]
        image_timings = self._set_image(image)
        results: list[SegmentResult | None] = [None] * len(queries)
        short = [i for i, d in enumerate(decisions) if d.route == "shortcut"]
        if short:
            t0 = time.perf_counter_ns()
            looked_up = [self._concept_tokens(queries[i]) for i in short]
            token_ms = _ms(t0)
            tokens = np.stack([t for t, _, _ in looked_up]).astype(np.float32)
            t1 = time.perf_counter_ns()
            no_points = np.zeros((len(short), 0, 2), np.float32), np.zeros((len(short), 0), np.int32)
            out = self.predictor.decode(*no_points, tokens)
            decode_ms = _ms(t1)
            for row, i in enumerate(short):
                d = decisions[i]
                t2 = time.perf_counter_ns()
                prediction = self.predictor.postprocess(out, row, multimask=False)
                timings = {**image_timings, "concept_tokens": token_ms, "decoder": decode_ms, "postprocess": _ms(t2)}
                if d.fallback is None or accept_shortcut(prediction.object_score_logit, d.n_words, self.router):
                    results[i] = SegmentResult(prediction.mask, "shortcut", d.reason, prediction.score,
                                               prediction.object_score, bank_hit=looked_up[row][1], timings=timings)
                else:
                    why = f"shortcut rejected: presence {prediction.object_score:.3f} < tau {self.router.tau(d.n_words):.3f}"
                    results[i] = self._reason(image, queries[i], (), why, {**image_timings})
        for i, d in enumerate(decisions):
            if results[i] is None:
                results[i] = self._reason(image, queries[i], (), d.reason, {**image_timings})
        return results  # type: ignore[return-value]
