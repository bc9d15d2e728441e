"""Concept tokens from a bundle, torch-free: the policy graphs + the CTM graph.

``ConceptEncoder`` is what ``ConceptSegmenter`` needs from this half of the model, and
``OnnxConceptEncoder`` implements it over engines. ``from_text`` is the shortcut route's half (a
text-only prefill of the concept phrase, its prompt states through the CTM); ``reason`` is the
reason route's (greedy generation on the support mosaic and the 600×600 target, the completion's
hidden states captured while decoding through the CTM, and the ``<bbox>`` mapped back to image
pixels). Both mirror ``models.pipeline.ConceptSegPipeline``. The segmenter imports this module,
never the other way round.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from conceptseg_edge.episodes import Support, box_to_image, build_meta_episode
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import BundleManifest
from conceptseg_edge.runtime.engine import Engine, EngineFactory, open_engine, open_part
from conceptseg_edge.runtime.policy import OnnxPolicy
from conceptseg_edge.tags import parse_output
from conceptseg_edge.timings import Timings, elapsed_ms


@dataclass(frozen=True)
class ReasonOutput:
    """The policy half of the reason route."""

    completion: str
    tokens: np.ndarray  # (K, 256)
    box: tuple[float, float, float, float] | None  # the <bbox>, in image pixels
    timings: Timings  # the policy's stages and the CTM's
    new_tokens: int  # tokens the policy generated, stop token included


class ConceptEncoder(Protocol):
    """Turns text (and images) into concept tokens; implemented over the policy + CTM engines."""

    def from_text(self, phrase: str) -> np.ndarray: ...

    def reason(self, image: np.ndarray, query: str, supports: Sequence[Support]) -> ReasonOutput: ...

    def providers(self) -> dict[str, str]: ...


class OnnxConceptEncoder:
    """The ``ConceptEncoder`` the segmenter uses, over the policy's and the CTM's engines."""

    def __init__(self, policy: OnnxPolicy, ctm: Engine, generation: GenerationConfig = GenerationConfig()) -> None:
        self.policy = policy
        self.ctm = ctm
        self.generation = generation

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        manifest: BundleManifest,
        provider: str = "cpu",
        generation: GenerationConfig = GenerationConfig(),
        engine_factory: EngineFactory = open_engine,
    ) -> OnnxConceptEncoder:
        bundle = Path(bundle)
        ctm = open_part(bundle, manifest, "ctm", provider, engine_factory)
        return cls(OnnxPolicy.from_bundle(bundle, manifest, provider, engine_factory), ctm, generation)

    def providers(self) -> dict[str, str]:
        """Part → the provider (or engine) that runs it."""
        return {"ctm": self.ctm.provider} | self.policy.providers()  # the order bundles list their parts

    def _tokens(self, hidden: np.ndarray) -> np.ndarray:
        return self.ctm.run({"hidden_states": hidden[None].astype(np.float32)})["concept_tokens"][0]

    def from_text(self, phrase: str) -> np.ndarray:
        """(K, 256) concept tokens of a phrase, from a text-only prefill."""
        return self._tokens(self.policy.prefill_hidden_states(phrase))

    def reason(self, image: np.ndarray, query: str, supports: Sequence[Support] = ()) -> ReasonOutput:
        episode = build_meta_episode(image, None, query, supports)
        generation = self.policy.generate(episode.images(), episode.prompt, self.generation.max_new_tokens)
        t0 = time.perf_counter_ns()
        tokens = self._tokens(generation.hidden_states)
        ctm = Timings(ctm=elapsed_ms(t0), providers={"ctm": self.ctm.provider})
        parsed = parse_output(generation.text, has_hidden_box=episode.has_hidden_box)
        return ReasonOutput(
            completion=generation.text,
            tokens=tokens,
            box=box_to_image(parsed.bbox, image.shape[:2]),
            timings=generation.timings | ctm,
            new_tokens=generation.new_tokens,
        )
