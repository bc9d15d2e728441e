"""``Sam3Predictor``: SAM 3's text and concept prompts over three engines, torch-free.

State is explicit, as in ``SAM2Predictor``: ``set_image()`` preprocesses and runs the vision encoder
once and caches the FPN features; text features are cached per concept phrase (tokenized with the
bundle's CLIP BPE through ``tokenizers``, encoded once, reused for every image); each ``predict()``
runs only the grounding head. ``from_bundle()`` is the only entry that reads files.

Routes: ``predict(text)`` is the ``prompt`` route (a text concept straight to SAM 3, the paper's
shortcut): it is *accepted* when the presence score sigmoid(presence_logit) >= ``presence_threshold``.
``predict(text, concept_tokens)`` is the reason route's last step: the policy → CTM tokens enter
through SAM 3's visual-prompt slot beside the text. Points and boxes are not exported (the head is
traced with the empty geometric prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import InputError
from conceptseg_edge.manifest import BundleManifest, Preprocessing, load_bundle
from conceptseg_edge.preprocess import resize, upsample_mask
from conceptseg_edge.runtime.engine import Engine, EngineFactory, open_engine, open_part
from conceptseg_edge.runtime.predictor import encode_image
from conceptseg_edge.timings import Timings, elapsed_ms

SAM3_PARTS = ("sam3_vision", "sam3_text", "sam3_head")
TOKENIZER_FILE = "sam3_tokenizer.json"
#: Tokens per text prompt (SAM 3's ``VETextEncoder.context_length``) and the prompt width.
CONTEXT_LENGTH = 32
PROMPT_DIM = 256
SOT, EOT = "<start_of_text>", "<end_of_text>"
#: Concept-token slots a head is exported with unless told otherwise (ConceptSeg's CTM emits 8 tokens).
#: The slot count is static (the trace bakes the prompt length into the attention reshapes); K below it
#: is padded with ``concept_mask`` True, and K = 0 is all padding (equal to the text prompt alone).
DEFAULT_CONCEPT_SLOTS = 8


def encode_prompts(tokenizer, texts: list[str]) -> np.ndarray:
    """(B, 32) int64 ids framed as SAM 3's tokenizer frames them: start, BPE ids, end, zeros; truncated
    to 32 keeping the end token. ``tokenizer``: a ``tokenizers.Tokenizer`` (the bundle's)."""
    sot, eot = tokenizer.token_to_id(SOT), tokenizer.token_to_id(EOT)
    out = np.zeros((len(texts), CONTEXT_LENGTH), np.int64)
    for i, text in enumerate(texts):
        ids = [sot, *tokenizer.encode(text, add_special_tokens=False).ids, eot][:CONTEXT_LENGTH]
        ids[-1] = eot
        out[i, : len(ids)] = ids
    return out


def pad_concept_tokens(tokens: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, 256) concept tokens → the head's ``concept_tokens`` (1, slots, 256) and ``concept_mask``
    (1, slots), True = padding."""
    tokens = np.asarray(tokens, np.float32)
    if tokens.ndim != 2 or tokens.shape[1] != PROMPT_DIM or tokens.shape[0] > slots:
        raise InputError(f"concept tokens: expected (K <= {slots}, {PROMPT_DIM}), got {tokens.shape}")
    k = tokens.shape[0]
    padded = np.zeros((1, slots, PROMPT_DIM), np.float32)
    padded[0, :k] = tokens
    mask = np.ones((1, slots), bool)
    mask[0, :k] = False
    return padded, mask


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Sam3Prediction:
    """Instances above the score threshold and the semantic mask, in the original image frame.

    ``masks``: (N, H, W) bool; ``scores``: (N,) sigmoid(logit) x presence, descending; ``boxes``: (N, 4)
    XYXY pixels; ``presence``: sigmoid of the presence logit; ``accepted``: presence >= the predictor's
    ``presence_threshold`` (the prompt route's acceptance); ``semantic_mask``: (H, W) bool;
    ``low_res_logits``: (Q, s, s) every query's mask logits at the head's resolution; ``query_scores``:
    (Q,) every query's score, kept or not; ``presence_logit``: what the router thresholds.
    """

    masks: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    presence: float
    accepted: bool
    semantic_mask: np.ndarray
    low_res_logits: np.ndarray
    query_scores: np.ndarray
    presence_logit: float
    timings: Timings = field(default_factory=Timings)


class Sam3Predictor:
    """Vision once per image, text once per concept, head once per prompt; numpy in, numpy out."""

    def __init__(self, vision: Engine, text: Engine, head: Engine, tokenizer, preprocessing: Preprocessing,
                 presence_threshold: float = 0.5, score_threshold: float = 0.5) -> None:
        self.vision, self.text, self.head = vision, text, head
        self.concept_slots = int(next(t.shape[1] for t in head.inputs if t.name == "concept_tokens"))
        self.tokenizer = tokenizer
        self.pre = preprocessing
        self.presence_threshold = presence_threshold
        self.score_threshold = score_threshold
        self._features: dict[str, np.ndarray] | None = None
        self._image_hw: tuple[int, int] | None = None
        self._concepts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.image_timings = Timings()

    @classmethod
    def from_bundle(cls, bundle: str | Path, provider: str = "cpu", manifest: BundleManifest | None = None,
                    engine_factory: EngineFactory = open_engine, **thresholds: float) -> Sam3Predictor:
        """Load a verified SAM 3 bundle's three parts on ``provider`` and its tokenizer."""
        from tokenizers import Tokenizer

        bundle = Path(bundle)
        manifest = manifest or load_bundle(bundle)
        if TOKENIZER_FILE not in manifest.files:
            raise InputError(f"{bundle}: not a SAM 3 bundle (no {TOKENIZER_FILE} in its manifest)")
        vision, text, head = (open_part(bundle, manifest, name, provider, engine_factory) for name in SAM3_PARTS)
        return cls(vision, text, head, Tokenizer.from_file(str(bundle / TOKENIZER_FILE)), manifest.preprocessing,
                   **thresholds)

    def providers(self) -> dict[str, str]:
        """Part → the provider (or engine) that runs it."""
        return {"sam3_vision": self.vision.provider, "sam3_text": self.text.provider, "sam3_head": self.head.provider}

    def set_image(self, image: np.ndarray) -> None:
        """Preprocess and encode ``image`` ((H, W, 3) uint8 RGB; (H, W) and RGBA are converted)."""
        self.reset()
        self._features, self.image_timings, self._image_hw = encode_image(self.vision, image, self.pre)

    def reset(self) -> None:
        """Forget the image (the per-concept text features stay: they do not depend on it)."""
        self._features = None
        self._image_hw = None
        self.image_timings = Timings()

    def text_features(self, concept: str) -> tuple[np.ndarray, np.ndarray]:
        """(1, 32, 256) features and (1, 32) padding mask of ``concept``, encoded once per phrase."""
        if not concept.strip():
            raise InputError("text prompt: empty")
        if concept not in self._concepts:
            ids = encode_prompts(self.tokenizer, [concept])
            self._concepts[concept] = (self.text.run({"input_ids": ids})["text_features"], ids == 0)
        return self._concepts[concept]

    def predict(self, text: str, concept_tokens: np.ndarray | None = None) -> Sam3Prediction:
        """Segment every instance of ``text`` (plus ``concept_tokens`` (K, 256), K <= ``concept_slots``) in the
        current image."""
        if self._features is None or self._image_hw is None:
            raise RuntimeError("no image set: call set_image() before predict()")
        features, mask = self.text_features(text)
        empty = np.zeros((0, PROMPT_DIM), np.float32)
        tokens, token_mask = pad_concept_tokens(empty if concept_tokens is None else concept_tokens, self.concept_slots)
        t0 = time.perf_counter_ns()
        out = self.head.run({**self._features, "text_features": features, "text_mask": mask,
                             "concept_tokens": tokens, "concept_mask": token_mask})
        t1 = time.perf_counter_ns()
        prediction = self.postprocess(out)
        prediction.timings = self.image_timings | Timings(decoder=(t1 - t0) / 1e6, postprocess=elapsed_ms(t1),
                                                          providers={"decoder": self.head.provider})
        return prediction

    def postprocess(self, out: dict[str, np.ndarray]) -> Sam3Prediction:
        """``Sam3Processor``'s post-processing: score = sigmoid(logit) x sigmoid(presence), keep above the
        threshold, boxes to pixels, masks bilinearly to the original size at sigmoid 0.5 (logit 0)."""
        h, w = self._image_hw
        presence_logit = float(out["presence_logit"][0, 0])
        presence = float(_sigmoid(presence_logit))
        scores = _sigmoid(out["pred_logits"][0]) * presence
        keep = np.flatnonzero(scores > self.score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        low = out["pred_masks"][0]
        masks = np.stack([upsample_mask(low[i], (h, w)) for i in keep]) if keep.size else np.zeros((0, h, w), bool)
        boxes = out["pred_boxes"][0, keep] * np.array([w, h, w, h], np.float32)
        semantic = resize(out["semantic_seg"][0, 0].astype(np.float32), (h, w), antialias=False) > 0.0
        return Sam3Prediction(masks=masks, scores=scores[keep], boxes=boxes, presence=presence,
                              accepted=presence >= self.presence_threshold, semantic_mask=semantic, low_res_logits=low,
                              query_scores=scores, presence_logit=presence_logit)
