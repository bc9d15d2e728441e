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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from conceptseg_edge.episodes import Support
from conceptseg_edge.errors import InputError
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import BundleManifest, load_bundle
from conceptseg_edge.preprocess import as_rgb_array
from conceptseg_edge.router import AUTO, RouteDecision, RouterConfig, choose_route, dispatch, route_request
from conceptseg_edge.runtime.bank import ConceptBank, bundle_key
from conceptseg_edge.runtime.concept import ConceptEncoder, OnnxConceptEncoder, ReasonOutput
from conceptseg_edge.runtime.engine import EngineFactory, open_engine
from conceptseg_edge.runtime.predictor import Prediction, SAM2Predictor
from conceptseg_edge.timings import Timings, describe_providers, elapsed_ms

#: A bundle holding this part is a SAM 3 bundle (``export concept --backbone sam3``): ``Sam3Segmenter`` serves it.
SAM3_HEAD = "sam3_head"


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
    timings: Timings = Timings()  # milliseconds per stage

    def scores(self) -> dict[str, float]:
        return {"score": self.score, "object_score": self.object_score}


@dataclass(frozen=True)
class _Candidate:
    """A decoded shortcut mask before the router has kept or rejected it."""

    prediction: Prediction
    bank_hit: bool
    timings: Timings


def _result(prediction: Prediction, route: str, why: str, timings: Timings, **extra) -> SegmentResult:
    """A result with the request's stages so far and the prediction's decoder and postprocess."""
    own = Timings(decoder=prediction.timings.decoder, postprocess=prediction.timings.postprocess,
                  providers=prediction.timings.provider_map())
    return SegmentResult(prediction.mask, route, why, prediction.score, prediction.object_score,
                         timings=timings | own, **extra)


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
        if SAM3_HEAD in manifest.parts:  # the backbone decides the sibling: SAM 3's routes prompt it with text
            from conceptseg_edge.runtime.sam3_segmenter import Sam3Segmenter

            cls = Sam3Segmenter
        predictor = cls.open_backbone(bundle, provider, manifest, engine_factory)
        concepts = None
        if {"shortcut", "reason"} & set(manifest.routes):
            concepts = OnnxConceptEncoder.from_bundle(bundle, manifest, provider, generation, engine_factory)
        bank = ConceptBank(bank_dir, bundle_key(manifest)) if bank_dir is not None and concepts else None
        return cls(predictor, router or manifest.router or RouterConfig(), manifest.routes, concepts, bank)

    @staticmethod
    def open_backbone(bundle: Path, provider: str, manifest: BundleManifest, engine_factory: EngineFactory) -> SAM2Predictor:
        """The segmentation backbone's predictor over the bundle's graphs."""
        return SAM2Predictor.from_bundle(bundle, provider, manifest, engine_factory)

    def providers(self) -> dict[str, str]:
        """Part → the provider (or engine) that runs it: what reports record as having run."""
        return self.predictor.providers() | (self.concepts.providers() if self.concepts is not None else {})

    # ------------------------------------------------------------------ image state

    def reset(self) -> None:
        """Forget the cached image features (the next request re-runs the encoder)."""
        self._image_key = None
        self.predictor.reset()

    def set_image(self, image: np.ndarray) -> Timings:
        """Encode ``image`` unless it is the one already held; returns this call's image stages.

        The video tracker encodes its frames through here, so a re-fire of the router on the frame
        it is tracking reuses the features instead of encoding the frame twice.
        """
        key = hashlib.blake2b(image.tobytes(), digest_size=16, person=str(image.shape).encode()[:16]).hexdigest()
        if key == self._image_key:
            return Timings(preprocess=0.0, encoder=0.0)
        self._image_key = None
        self.predictor.set_image(image)
        self._image_key = key
        return self.predictor.image_timings

    # ------------------------------------------------------------------ routes

    def concept_tokens(self, phrase: str) -> tuple[np.ndarray, bool]:
        """(K, 256) tokens of a phrase and whether the bank had them (False without a bank)."""
        if self.bank is not None:
            return self.bank.get_or_compute(phrase, self.concepts.from_text)
        return self.concepts.from_text(phrase), False

    def _token_stage(self, ms: float, hit: bool) -> Timings:
        """The ``concept_tokens`` stage; a bank miss ran the text prefill and the CTM, a hit no graph."""
        if hit:
            return Timings(concept_tokens=ms)
        ran = {k: v for k, v in self.concepts.providers().items() if k in ("policy_embed", "policy_decoder", "ctm")}
        return Timings(concept_tokens=ms, providers={"concept_tokens": describe_providers(ran)})

    def segment(
        self,
        image: np.ndarray,
        query: str | None = None,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        supports: Sequence[Support] = (),
        route: str = AUTO,
    ) -> SegmentResult:
        """Segment ``image`` ((H, W, 3) uint8) for a concept query and/or points/box (original pixels)."""
        routed = route_request(image, query, points, labels, box, self.router, self.routes, route)
        request = _Request(self, routed.image, query, supports, self.set_image(routed.image), points, labels, box)
        return dispatch(routed.decision, self.router, request)

    def segment_concepts(self, image: np.ndarray, queries: Sequence[str], route: str = AUTO) -> list[SegmentResult]:
        """Several concepts on one image: one encoder run, shortcut candidates decoded as one batch."""
        image = as_rgb_array(image)
        if not queries:
            raise InputError("queries: give at least one concept")
        decisions = [self._decide(False, q, route) for q in queries]
        image_timings = self.set_image(image)
        short = [i for i, d in enumerate(decisions) if d.route == "shortcut"]
        candidates = dict(zip(short, self._decode_batch([queries[i] for i in short], image_timings))) if short else {}
        return [
            dispatch(d, self.router, _Request(self, image, q, (), image_timings, candidate=candidates.get(i)))
            for i, (q, d) in enumerate(zip(queries, decisions))
        ]

    def _decide(self, has_geometry: bool, query: str | None, route: str) -> RouteDecision:
        return choose_route(has_geometry, query, self.router, self.routes, route)

    def _shortcut_candidate(self, query: str, timings: Timings) -> _Candidate:
        """The shortcut's mask for one phrase on the current image: its concept tokens (bank or text
        prefill → CTM) into the SAM2 decoder. ``timings``: the request's stages so far."""
        t0 = time.perf_counter_ns()
        tokens, hit = self.concept_tokens(query)
        timings = timings | self._token_stage(elapsed_ms(t0), hit)
        return _Candidate(self.predictor.predict(concept_tokens=tokens, multimask=False), hit, timings)

    def _reason_prediction(self, query: str, out: ReasonOutput) -> Prediction:
        """The reason route's last step: the CTM tokens and the ``<bbox>`` (as a box prompt) into SAM2."""
        return self.predictor.predict(box=out.box, concept_tokens=out.tokens, multimask=False)

    def _decode_batch(self, phrases: Sequence[str], image_timings: Timings) -> list[_Candidate]:
        """Shortcut candidates for several phrases on the current image, in one decoder call."""
        t0 = time.perf_counter_ns()
        looked_up = [self.concept_tokens(p) for p in phrases]
        token_ms = elapsed_ms(t0)
        tokens = np.stack([t for t, _ in looked_up]).astype(np.float32)
        t1 = time.perf_counter_ns()
        no_points = np.zeros((len(phrases), 0, 2), np.float32), np.zeros((len(phrases), 0), np.int32)
        out = self.predictor.decode(*no_points, tokens)
        decode_ms = elapsed_ms(t1)
        candidates = []
        for row, (_, hit) in enumerate(looked_up):
            t2 = time.perf_counter_ns()
            prediction = self.predictor.postprocess(out, row, multimask=False)
            decoded = Timings(decoder=decode_ms, postprocess=elapsed_ms(t2), providers={"decoder": self.predictor.decoder.provider})
            stages = self._token_stage(token_ms, hit) | decoded
            candidates.append(_Candidate(replace(prediction, timings=stages), hit, image_timings | stages))
        return candidates


@dataclass
class _Request:
    """One request's routes on the segmenter (the ``RouteBackend`` that ``dispatch`` runs).

    ``timings`` holds the stages run so far; ``candidate`` is a shortcut already decoded in a batch.
    """

    seg: ConceptSegmenter
    image: np.ndarray
    query: str | None
    supports: Sequence[Support]
    timings: Timings
    points: Sequence[Sequence[float]] | None = None
    labels: Sequence[int] | None = None
    box: Sequence[float] | None = None
    candidate: _Candidate | None = None

    def prompt(self, why: str) -> SegmentResult:
        prediction = self.seg.predictor.predict(points=self.points, labels=self.labels, box=self.box)
        return _result(prediction, "prompt", why, self.timings)

    def shortcut(self, why: str) -> tuple[SegmentResult, float]:
        candidate = self.candidate
        if candidate is None:
            candidate = self.seg._shortcut_candidate(self.query, self.timings)
            self.timings = candidate.timings  # a fallback to reason reports the token stage too
        prediction = candidate.prediction
        result = _result(prediction, "shortcut", why, candidate.timings, bank_hit=candidate.bank_hit)
        return result, prediction.object_score_logit

    def reason(self, why: str) -> SegmentResult:
        out = self.seg.concepts.reason(self.image, self.query, self.supports)
        prediction = self.seg._reason_prediction(self.query, out)
        return _result(prediction, "reason", why, self.timings | out.timings, completion=out.completion,
                       box=out.box, new_tokens=out.new_tokens)
