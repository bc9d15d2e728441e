"""``SAM2Predictor``: the prompt route over two engines, with SAM2's predictor boundary.

State is explicit, as in sam2's ``SAM2ImagePredictor``: ``set_image()`` preprocesses and runs the
encoder **once** and caches the features; each ``predict()`` reuses them and runs only the decoder;
``reset()`` clears. Calling ``predict()`` first raises a ``RuntimeError`` naming the call to make.
``from_bundle()`` is the only entry that reads files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import InputError
from conceptseg_edge.manifest import BundleManifest, Preprocessing, load_bundle
from conceptseg_edge.preprocess import (
    Prompts,
    as_rgb_array,
    encode_prompts,
    make_prompts,
    preprocess_image,
    select_mask,
    upsample_mask,
)
from conceptseg_edge.runtime.engine import Engine, EngineFactory, open_engine, open_part
from conceptseg_edge.timings import Timings, elapsed_ms

SAM2_PARTS = ("sam2_encoder", "sam2_decoder")


@dataclass
class Prediction:
    """One mask in the original image frame.

    ``mask``: (H, W) bool; ``score``: the decoder's predicted IoU of the chosen mask;
    ``object_score``: sigmoid of the object-score logit (the presence score the router uses);
    ``object_score_logit``: the logit itself, what ``accept_shortcut`` takes;
    ``timings``: milliseconds per stage of this prediction.
    """

    mask: np.ndarray
    score: float
    object_score: float
    mask_index: int
    low_res_logits: np.ndarray
    object_score_logit: float = 0.0
    timings: Timings = Timings()


def encode_image(encoder: Engine, image: np.ndarray, pre: Preprocessing) -> tuple[dict[str, np.ndarray], Timings, tuple[int, int]]:
    """Preprocess ``image`` and run an image encoder: (its outputs, the image's stages, the original (H, W)).
    SAM2's and SAM 3's predictors both hold their image this way."""
    image = as_rgb_array(image)
    t0 = time.perf_counter_ns()
    x = preprocess_image(image, pre.image_size, pre.pixel_mean, pre.pixel_std)
    t1 = time.perf_counter_ns()
    features = encoder.run({"image": x})
    stages = Timings(preprocess=(t1 - t0) / 1e6, encoder=elapsed_ms(t1), providers={"encoder": encoder.provider})
    return features, stages, image.shape[:2]


class SAM2Predictor:
    """Encoder once per image, decoder once per prompt set; numpy in, numpy out."""

    def __init__(self, encoder: Engine, decoder: Engine, preprocessing: Preprocessing) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.pre = preprocessing
        self._features: dict[str, np.ndarray] | None = None
        self._image_hw: tuple[int, int] | None = None
        self.image_timings = Timings()

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        provider: str = "cpu",
        manifest: BundleManifest | None = None,
        engine_factory: EngineFactory = open_engine,
    ) -> SAM2Predictor:
        """Load a verified bundle's SAM2 parts on ``provider`` ("cpu", "cuda", "tensorrt").

        ``manifest``: one already read (and verified) by the caller; ``engine_factory``: what opens
        each part (default: ONNX parts on ONNX Runtime).
        """
        bundle = Path(bundle)
        manifest = manifest or load_bundle(bundle)
        encoder, decoder = (open_part(bundle, manifest, name, provider, engine_factory) for name in SAM2_PARTS)
        return cls(encoder, decoder, manifest.preprocessing)

    def providers(self) -> dict[str, str]:
        """Part → the provider (or engine) that runs it."""
        return {"sam2_encoder": self.encoder.provider, "sam2_decoder": self.decoder.provider}

    # ------------------------------------------------------------------ image state

    def set_image(self, image: np.ndarray) -> None:
        """Preprocess and encode ``image`` ((H, W, 3) uint8 RGB; (H, W) and RGBA are converted)."""
        self.reset()
        self._features, self.image_timings, self._image_hw = encode_image(self.encoder, image, self.pre)

    def reset(self) -> None:
        self._features = None
        self._image_hw = None
        self.image_timings = Timings()

    @property
    def features(self) -> dict[str, np.ndarray]:
        """The encoder's outputs for the current image (what the video parts read beside the decoder)."""
        if self._features is None:
            raise RuntimeError("no image set: call set_image() first")
        return self._features

    @property
    def image_hw(self) -> tuple[int, int]:
        if self._image_hw is None:
            raise RuntimeError("no image set: call set_image() before predict()")
        return self._image_hw

    # ------------------------------------------------------------------ prompts

    def prompts(self, points=None, labels=None, box=None) -> Prompts:
        """Validate prompts in original-image pixels against the current image."""
        return make_prompts(points, labels, box, self.image_hw)

    def decode(self, coords: np.ndarray, labels: np.ndarray, concept_tokens: np.ndarray) -> dict[str, np.ndarray]:
        """Run the decoder on model-frame prompts for a batch of B prompt sets (shared image)."""
        if self._features is None:
            raise RuntimeError("no image set: call set_image() before predict()")
        batch = coords.shape[0]
        low = self.pre.low_res_size
        return self.decoder.run(
            {
                **self._features,
                "point_coords": coords,
                "point_labels": labels,
                "concept_tokens": concept_tokens,
                "mask_input": np.zeros((batch, 1, low, low), np.float32),
                "has_mask_input": np.zeros((batch,), np.float32),
            }
        )

    def predict(
        self,
        points: np.ndarray | list | None = None,
        labels: np.ndarray | list | None = None,
        box: np.ndarray | list | None = None,
        concept_tokens: np.ndarray | None = None,
        multimask: bool | None = None,
    ) -> Prediction:
        """Segment the current image.

        Args:
            points: (N, 2) XY pixels in the original image.
            labels: (N,) 1 foreground / 0 background (default all 1).
            box: (4,) X0, Y0, X1, Y1 pixels in the original image.
            concept_tokens: (K, 256) float32 from the concept translator (concept routes).
            multimask: return the best of three masks; default: only for a single click.
        """
        hw = self.image_hw
        prompts = self.prompts(points, labels, box)
        if prompts.empty and concept_tokens is None:
            raise InputError("no prompt: give at least one point, a box, or a concept")
        tokens = np.zeros((1, 0, 256), np.float32)
        if concept_tokens is not None:
            tokens = np.asarray(concept_tokens, np.float32).reshape(1, -1, 256)
        coords, point_labels = encode_prompts(prompts, hw, self.pre.image_size)
        t0 = time.perf_counter_ns()
        out = self.decode(coords, point_labels, tokens)
        t1 = time.perf_counter_ns()
        prediction = self.postprocess(out, 0, prompts.multimask if multimask is None else multimask)
        stages = Timings(decoder=(t1 - t0) / 1e6, postprocess=elapsed_ms(t1), providers={"decoder": self.decoder.provider})
        return replace(prediction, timings=self.image_timings | stages)

    def postprocess(self, out: dict[str, np.ndarray], index: int, multimask: bool) -> Prediction:
        """Pick a mask from row ``index`` of a decoder output and bring it to the original size."""
        chosen, logits, score = select_mask(
            out["low_res_masks"][index], out["iou_predictions"][index], multimask,
            self.pre.stability_delta, self.pre.stability_thresh,
        )
        obj = float(out["object_score_logits"][index, 0])
        return Prediction(
            mask=upsample_mask(logits, self.image_hw, self.pre.mask_threshold),
            score=score,
            object_score=float(1.0 / (1.0 + np.exp(-obj))),
            mask_index=chosen,
            low_res_logits=logits,
            object_score_logit=obj,
        )
