"""``Sam3ConceptPipeline``: the torch reference of a SAM 3 concept bundle (policy + CTM + the ``sam3`` package).

What ``export concept --backbone sam3`` compares ``Sam3Segmenter`` with, route by route, and what the
SAM 3 numbers time as PyTorch eager. The policy half is ``ConceptSegPipeline``'s (text prefill,
generation, CTM); the backbone half is ``Sam3Reference`` (the package's own ``forward_image``,
``forward_text`` and grounding steps), run inside ``sam3_compat()``:

- ``shortcut``: the phrase as SAM 3's text prompt, kept when sigmoid(presence) >= τ(words);
- ``reason``: generation → CTM → the tokens through the visual-prompt slot beside the query's text.

The answer is the highest-scoring query's mask, bilinearly resized to the image at logit 0.
It lives in export (not models) because it needs ``sam3_compat``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from conceptseg_edge.episodes import Support
from conceptseg_edge.errors import CheckpointError
from conceptseg_edge.export.sam3_compat import bpe_path, sam3_compat
from conceptseg_edge.export.sam3 import SAM3_VARIANTS
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import BundleManifest
from conceptseg_edge.models.checkpoint import load_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule
from conceptseg_edge.models.pipeline import ConceptResult, ConceptSegPipeline
from conceptseg_edge.models.policy import PolicyWrapper
from conceptseg_edge.router import AUTO, RouterConfig, dispatch, route_request
from conceptseg_edge.timings import Timings, elapsed_ms

SAM3_ROUTES = frozenset({"shortcut", "reason"})


class Sam3ConceptPipeline(ConceptSegPipeline):
    """Policy + CTM + SAM 3, routed; eager torch on CPU."""

    def __init__(self, reference, policy: PolicyWrapper, ctm: ConceptTranslationModule, router: RouterConfig,
                 generation: GenerationConfig = GenerationConfig()) -> None:
        self.reference = reference  # models.sam3.Sam3Reference
        self.policy = policy
        self.ctm = ctm.eval()
        self.router = router
        self.generation = generation

    @classmethod
    def from_checkpoint(cls, path: str | Path, variant: str = "sam3", sam3_checkpoint: str | None = None,
                        generation: GenerationConfig = GenerationConfig(), router: RouterConfig | None = None,
                        dtype: torch.dtype | None = None) -> Sam3ConceptPipeline:
        """A checkpoint's policy and CTM (any layout ``load_checkpoint`` reads) with SAM 3 ``variant`` built
        from ``sam3_checkpoint`` (None: random init)."""
        ckpt = load_checkpoint(path, dtype=dtype)
        with sam3_compat():
            from conceptseg_edge.models.sam3 import Sam3Reference, build_sam3

            loaded = build_sam3(variant, bpe_path(), sam3_checkpoint)
        return cls(Sam3Reference(loaded.model, loaded.image_size), PolicyWrapper(ckpt.policy, ckpt.processor), ckpt.ctm,
                   router or ckpt.router, generation)

    @classmethod
    def for_bundle(cls, manifest: BundleManifest, checkpoint: str | Path | None = None,
                   generation: GenerationConfig = GenerationConfig(), router: RouterConfig | None = None) -> Sam3ConceptPipeline:
        """The torch side of a bundle from ``export concept --backbone``: the recorded checkpoint (or
        ``checkpoint``), the recorded SAM 3 variant and weights; float32, as the graphs compute."""
        variant = manifest.source.model.removeprefix("conceptseg(").removesuffix(")")
        path = checkpoint if checkpoint is not None else manifest.source.checkpoint
        if variant not in SAM3_VARIANTS or path is None or not Path(path).is_dir():
            raise CheckpointError(f"source: a SAM 3 concept bundle's checkpoint directory and variant are needed to "
                                  f"compare with torch (model {manifest.source.model!r}, checkpoint {path!r}); pass --checkpoint DIR")
        return cls.from_checkpoint(path, variant, manifest.source.backbone_checkpoint, generation, router, torch.float32)

    def with_router(self, router: RouterConfig) -> Sam3ConceptPipeline:
        return Sam3ConceptPipeline(self.reference, self.policy, self.ctm, router, self.generation)

    @torch.no_grad()
    def ground(self, image_out: dict, query: str, tokens: np.ndarray | None, hw: tuple[int, int]) -> tuple[np.ndarray, float, float]:
        """SAM 3 on one text prompt (+ (K, 256) concept tokens): the best query's (H, W) mask, its score,
        and the presence logit."""
        with sam3_compat():
            if tokens is None:
                out = self.reference.predict(image_out, query)
            else:
                concept = torch.from_numpy(np.asarray(tokens, np.float32))[None]
                out = self.reference.predict(image_out, query, concept, torch.zeros(concept.shape[:2], dtype=torch.bool))
        presence_logit = float(out["presence_logit_dec"][0, 0])
        scores = torch.sigmoid(out["pred_logits"][0, :, 0]) * torch.sigmoid(torch.tensor(presence_logit))
        top = int(torch.argmax(scores))
        mask = F.interpolate(out["pred_masks"][:, top : top + 1], hw, mode="bilinear", align_corners=False)[0, 0] > 0
        return mask.numpy(), float(scores[top]), presence_logit

    def __call__(self, image: np.ndarray, query: str | None = None, points=None, labels=None, box=None,
                 supports: Sequence[Support] = (), route: str = AUTO) -> ConceptResult:
        """Segment ``image`` ((H, W, 3) uint8) for a concept query; points and boxes have no SAM 3 route."""
        routed = route_request(image, query, points, labels, box, self.router, SAM3_ROUTES, route)
        t0 = time.perf_counter_ns()
        with sam3_compat():
            image_out = self.reference.image_features(self.reference.preprocess(routed.image))
        request = _Sam3TorchRequest(self, routed.image, query, supports, image_out, Timings(encoder=elapsed_ms(t0)))
        return dispatch(routed.decision, self.router, request)


@dataclass
class _Sam3TorchRequest:
    """One request's routes on the SAM 3 torch pipeline (the ``RouteBackend`` that ``dispatch`` runs)."""

    pipe: Sam3ConceptPipeline
    image: np.ndarray
    query: str
    supports: Sequence[Support]
    image_out: dict
    timings: Timings

    def _result(self, route: str, why: str, tokens: np.ndarray | None, timings: Timings, **extra) -> tuple[ConceptResult, float]:
        t0 = time.perf_counter_ns()
        mask, score, logit = self.pipe.ground(self.image_out, self.query, tokens, self.image.shape[:2])
        result = ConceptResult(mask=mask, route=route, reason=why, score=score,
                               object_score=float(1 / (1 + np.exp(-logit))), timings=timings | Timings(decoder=elapsed_ms(t0)),
                               **extra)
        return result, logit

    def prompt(self, why: str) -> ConceptResult:
        raise AssertionError("SAM 3 has no prompt route")  # route_request never picks it: not in SAM3_ROUTES

    def shortcut(self, why: str) -> tuple[ConceptResult, float]:
        return self._result("shortcut", why, None, self.timings)

    def reason(self, why: str) -> ConceptResult:
        t0 = time.perf_counter_ns()
        text, parsed, tokens, box_px = self.pipe.reason(self.image, self.query, self.supports)
        timings = self.timings | Timings(policy_generate=elapsed_ms(t0))
        return self._result("reason", why, tokens, timings, completion=text, parsed=parsed, box=box_px)[0]
