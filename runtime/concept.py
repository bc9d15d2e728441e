"""Concept tokens from a bundle, torch-free: the policy graphs + the CTM graph.

``from_text`` is the shortcut route's half (a text-only prefill of the concept phrase, its prompt
states through the CTM); ``reason`` is the reason route's (greedy generation on the support mosaic
and the 600×600 target, the completion's hidden states captured while decoding through the CTM, and
the ``<bbox>`` mapped back to image pixels). Both mirror ``models.pipeline.ConceptSegPipeline``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from conceptseg_edge.episodes import Support, box_to_image, build_meta_episode
from conceptseg_edge.manifest import BundleManifest
from conceptseg_edge.runtime.engine import Engine, OrtEngine
from conceptseg_edge.runtime.policy import OnnxPolicy
from conceptseg_edge.runtime.segmenter import ReasonOutput
from conceptseg_edge.tags import parse_output

DEFAULT_MAX_NEW_TOKENS = 256


class OnnxConceptEncoder:
    """The ``ConceptEncoder`` the segmenter uses, over ONNX Runtime engines."""

    def __init__(self, policy: OnnxPolicy, ctm: Engine, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
        self.policy = policy
        self.ctm = ctm
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_bundle(cls, bundle: str | Path, manifest: BundleManifest, provider: str = "cpu") -> OnnxConceptEncoder:
        bundle = Path(bundle)
        ctm = OrtEngine(bundle / manifest.part("ctm").file, provider)
        return cls(OnnxPolicy.from_bundle(bundle, manifest, provider), ctm)

    def _tokens(self, hidden: np.ndarray) -> np.ndarray:
        return self.ctm.run({"hidden_states": hidden[None].astype(np.float32)})["concept_tokens"][0]

    def from_text(self, phrase: str) -> np.ndarray:
        """(K, 256) concept tokens of a phrase, from a text-only prefill."""
        return self._tokens(self.policy.prefill_hidden_states(phrase))

    def reason(self, image: np.ndarray, query: str, supports: Sequence[Support] = ()) -> ReasonOutput:
        episode = build_meta_episode(image, None, query, supports)
        generation = self.policy.generate(episode.images(), episode.prompt, self.max_new_tokens)
        t0 = time.perf_counter_ns()
        tokens = self._tokens(generation.hidden_states)
        timings = {k: v for k, v in self.policy.timings.items() if k.startswith("policy_") and not k.endswith(("tokens", "_per_s"))}
        timings["ctm"] = (time.perf_counter_ns() - t0) / 1e6
        parsed = parse_output(generation.text, has_hidden_box=episode.has_hidden_box)
        return ReasonOutput(
            completion=generation.text,
            tokens=tokens,
            box=box_to_image(parsed.bbox, image.shape[:2]),
            timings=timings,
            new_tokens=int(self.policy.timings.get("policy_new_tokens", len(generation.token_ids))),
        )
