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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from conceptseg_edge.episodes import Support, box_to_image, build_meta_episode
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.models.checkpoint import load_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule
from conceptseg_edge.models.policy import PolicyWrapper
from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model
from conceptseg_edge.preprocess import as_rgb_array, make_prompts
from conceptseg_edge.router import RouterConfig, accept_shortcut, choose_route
from conceptseg_edge.tags import ParsedCompletion, parse_output

ROUTES_AVAILABLE = frozenset({"prompt", "shortcut", "reason"})


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
    timings: dict[str, float] = field(default_factory=dict)


def _ms(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


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
        cls, path: str | Path, generation: GenerationConfig = GenerationConfig(), router: RouterConfig | None = None
    ) -> ConceptSegPipeline:
        """Load a checkpoint directory and the SAM2 backbone it names (``router``: None = the checkpoint's)."""
        ckpt = load_checkpoint(path)
        sam = build_sam2_model(ckpt.backbone.config, ckpt.backbone.checkpoint, ckpt.backbone.image_size).model
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
        route: str = "auto",
    ) -> ConceptResult:
        """Segment ``image`` ((H, W, 3) uint8) for a query and/or geometric prompts."""
        image = as_rgb_array(image)
        prompts = make_prompts(points, labels, box, image.shape[:2])
        decision = choose_route(not prompts.empty, query, self.router, ROUTES_AVAILABLE, None if route == "auto" else route)
        self.sam.set_image(image)
        timings = dict(self.sam.image_timings)

        if decision.route == "prompt":
            ref = self.sam.predict(prompts.points, prompts.labels, prompts.box, multimask_output=prompts.multimask)
            return self._result(ref, "prompt", decision.reason, timings, box=None if prompts.box is None else tuple(prompts.box))

        if decision.route == "shortcut":
            t0 = time.perf_counter_ns()
            tokens = self.concept_tokens_from_text(query)
            timings["policy_prefill"] = _ms(t0)
            ref = self.sam.predict(concept_tokens=tokens, multimask_output=False)
            if accept_shortcut(ref.object_score_logit, decision.n_words, self.router) or decision.fallback is None:
                return self._result(ref, "shortcut", decision.reason, timings)
            presence = 1 / (1 + np.exp(-ref.object_score_logit))
            why = f"shortcut rejected: presence {presence:.3f} < tau {self.router.tau(decision.n_words):.3f}"
        else:
            why = decision.reason

        t0 = time.perf_counter_ns()
        text, parsed, tokens, box_px = self.reason(image, query, supports)
        timings["policy_generate"] = _ms(t0)
        ref = self.sam.predict(box=None if box_px is None else np.array(box_px), concept_tokens=tokens, multimask_output=False)
        return self._result(ref, "reason", why, timings, completion=text, parsed=parsed, box=box_px)

    @staticmethod
    def _result(ref, route: str, reason: str, timings: dict[str, float], **extra) -> ConceptResult:
        timings.update({k: v for k, v in ref.timings.items() if k in ("decoder", "postprocess")})
        return ConceptResult(
            mask=ref.masks[int(np.argmax(ref.scores))],
            route=route,
            reason=reason,
            score=float(ref.scores.max()),
            object_score=float(1 / (1 + np.exp(-ref.object_score_logit))),
            timings=timings,
            **extra,
        )
