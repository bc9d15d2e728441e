"""``ConceptSegPipeline``: the torch reference that every exported path is compared with.

image + query (+ support images, + optional points/box) → router → route → mask, all in eager torch:
- ``prompt``: points/box straight into SAM2;
- ``shortcut``: a text-only prefill of the concept phrase → CTM → 8×256 concept tokens → SAM2 decoder;
  kept when sigmoid(object score) ≥ τ(words), otherwise the request falls back to ``reason``;
- ``reason``: the policy generates ``<think>…<bbox>…<answer>`` on the 600×600 target (after the
  support mosaic, if any); its completion hidden states, captured during decoding, go through the CTM;
  the tokens and the ``<bbox>`` (as a box prompt, rescaled to the image) go to the SAM2 decoder.
The result names the route taken, why, and per-stage milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conceptseg_edge.episodes import Support, box_to_image, build_meta_episode
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.models.checkpoint import load_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule
from conceptseg_edge.models.policy import PolicyWrapper
from conceptseg_edge.models.sam2 import ReferencePrediction, SAM2Reference, build_sam2_model
from conceptseg_edge.preprocess import Prompts
from conceptseg_edge.router import AUTO, ROUTES, RouterConfig, dispatch, route_request
from conceptseg_edge.tags import ParsedCompletion, parse_output
from conceptseg_edge.timings import Timings, elapsed_ms

ROUTES_AVAILABLE = frozenset(ROUTES)


@dataclass
class ConceptResult:
    """One request's answer, in the original image frame."""

    mask: np.ndarray  # (H, W) bool
    route: str
    reason: str
    score: float  # SAM2's predicted IoU of the mask
    object_score: float  # sigmoid of SAM2's object-score logit (the router's presence score)
    completion: str | None = None  # the policy's text (reason route)
    parsed: ParsedCompletion | None = None
    box: tuple[float, float, float, float] | None = None  # box prompt given to SAM2, image pixels
    timings: Timings = Timings()


class ConceptSegPipeline:
    """Policy + CTM + SAM2, routed; eager torch on CPU."""

    def __init__(
        self,
        sam: torch.nn.Module,
        policy: PolicyWrapper,
        ctm: ConceptTranslationModule,
        router: RouterConfig,
        generation: GenerationConfig = GenerationConfig(),
    ) -> None:
        self.sam = SAM2Reference(sam)
        self.policy = policy
        self.ctm = ctm.eval()
        self.router = router
        self.generation = generation

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, generation: GenerationConfig = GenerationConfig(), router: RouterConfig | None = None,
        dtype: torch.dtype | None = None,
    ) -> ConceptSegPipeline:
        """Load a checkpoint directory and the SAM2 backbone it names (``router``: None = the checkpoint's;
        ``dtype``: None = as ``load_checkpoint`` builds it, e.g. a retargeted release's policy in bf16;
        float32 computes as the exported graphs do)."""
        ckpt = load_checkpoint(path, dtype=dtype)
        backbone = ckpt.sam2_backbone()
        sam = build_sam2_model(backbone.config, backbone.checkpoint, backbone.image_size).model
        return cls(sam, PolicyWrapper(ckpt.policy, ckpt.processor), ckpt.ctm, router or ckpt.router, generation)

    def with_router(self, router: RouterConfig) -> ConceptSegPipeline:
        """The same models under other thresholds (a calibration sweep, a forced-shortcut check)."""
        return ConceptSegPipeline(self.sam.sam, self.policy, self.ctm, router, self.generation)

    @torch.no_grad()
    def concept_tokens_from_text(self, query: str) -> np.ndarray:
        """Shortcut route: (8, 256) tokens from a text-only prefill of the concept phrase."""
        states = self.policy.prompt_hidden_states(self.policy.build_inputs([], query))
        return self.ctm(states[None])[0].float().numpy()

    @torch.no_grad()
    def reason(self, image: np.ndarray, query: str, supports: Sequence[Support] = ()):
        """Reason route's policy half: completion text, parsed tags, (8, 256) tokens, box in image pixels."""
        episode = build_meta_episode(image, None, query, supports)
        out = self.policy.generate(episode.images(), episode.prompt, self.generation.max_new_tokens)
        tokens = self.ctm(out.hidden_states[None])[0].float().numpy()
        parsed = parse_output(out.text, has_hidden_box=episode.has_hidden_box)
        return out.text, parsed, tokens, box_to_image(parsed.bbox, image.shape[:2])

    def __call__(
        self,
        image: np.ndarray,
        query: str | None = None,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[int] | None = None,
        box: Sequence[float] | None = None,
        supports: Sequence[Support] = (),
        route: str = AUTO,
    ) -> ConceptResult:
        """Segment ``image`` ((H, W, 3) uint8) for a query and/or geometric prompts."""
        routed = route_request(image, query, points, labels, box, self.router, ROUTES_AVAILABLE, route)
        self.sam.set_image(routed.image)
        request = _TorchRequest(self, routed.image, query, supports, routed.prompts, Timings(**self.sam.image_timings))
        return dispatch(routed.decision, self.router, request)


def _result(ref: ReferencePrediction, route: str, reason: str, timings: Timings, **extra) -> ConceptResult:
    own = Timings(decoder=ref.timings["decoder"], postprocess=ref.timings["postprocess"])
    return ConceptResult(
        mask=ref.masks[int(np.argmax(ref.scores))],
        route=route,
        reason=reason,
        score=float(ref.scores.max()),
        object_score=float(1 / (1 + np.exp(-ref.object_score_logit))),
        timings=timings | own,
        **extra,
    )


@dataclass
class _TorchRequest:
    """One request's routes on the torch pipeline (the ``RouteBackend`` that ``dispatch`` runs)."""

    pipe: ConceptSegPipeline
    image: np.ndarray
    query: str | None
    supports: Sequence[Support]
    prompts: Prompts
    timings: Timings  # stages run so far

    def prompt(self, why: str) -> ConceptResult:
        p = self.prompts
        ref = self.pipe.sam.predict(p.points, p.labels, p.box, multimask_output=p.multimask)
        return _result(ref, "prompt", why, self.timings, box=None if p.box is None else tuple(p.box))

    def shortcut(self, why: str) -> tuple[ConceptResult, float]:
        t0 = time.perf_counter_ns()
        tokens = self.pipe.concept_tokens_from_text(self.query)
        self.timings = self.timings | Timings(policy_prefill=elapsed_ms(t0))
        ref = self.pipe.sam.predict(concept_tokens=tokens, multimask_output=False)
        return _result(ref, "shortcut", why, self.timings), ref.object_score_logit

    def reason(self, why: str) -> ConceptResult:
        t0 = time.perf_counter_ns()
        text, parsed, tokens, box_px = self.pipe.reason(self.image, self.query, self.supports)
        timings = self.timings | Timings(policy_generate=elapsed_ms(t0))
        box = None if box_px is None else np.array(box_px)
        ref = self.pipe.sam.predict(box=box, concept_tokens=tokens, multimask_output=False)
        return _result(ref, "reason", why, timings, completion=text, parsed=parsed, box=box_px)
