"""The SAM2 family: its two parts' specs, parity cases and references, and ``export sam2``.

``export sam2`` turns a SAM 2.1 checkpoint into a bundle with the encoder and decoder graphs (and,
with ``--video``, the video path's three graphs: ``export/sam2_video.py``). The
export-time modules are ``SAM2ImageEncoder`` / ``SAM2PromptDecoder`` of ``models/sam2.py`` (training
runs the same wrappers), the reference is ``SAM2Reference``, which calls the sam2 package's own
modules. The bundle is assembled in a staging directory and renamed into place only once every part
has passed parity (``fileio.staged_dir``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from conceptseg_edge.fileio import staged_dir
from conceptseg_edge.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    Preprocessing,
    SourceInfo,
    TensorSpec,
    read_manifest,
    write_manifest,
)
from conceptseg_edge.export.onnx_export import export_and_validate
from conceptseg_edge.export.parts import (
    FEATURE_ATOL,
    LOGIT_ATOL,
    MASK_IOU_FLOOR,
    SCORE_ATOL,
    PartFactory,
    PartSpec,
    weight_storage,
)
from conceptseg_edge.models.sam2_variants import DEFAULT_CONFIG

REFERENCE_NAME = "sam2 package modules, torch eager (forward_image / _embed_points / predict_masks)"


def sam2_encoder_spec(image_size: int) -> PartSpec:
    s = image_size
    return PartSpec(
        name="sam2_encoder",
        file="sam2_encoder.onnx",
        inputs=(TensorSpec("image", "float32", (1, 3, s, s)),),
        outputs=(
            TensorSpec("image_embed", "float32", (1, 256, s // 16, s // 16)),
            TensorSpec("high_res_feats_0", "float32", (1, 32, s // 4, s // 4)),
            TensorSpec("high_res_feats_1", "float32", (1, 64, s // 8, s // 8)),
        ),
        atol={"image_embed": FEATURE_ATOL, "high_res_feats_0": FEATURE_ATOL, "high_res_feats_1": FEATURE_ATOL},
        # The FPN neck's own nearest 2x upsampling is model arithmetic and stays; these may not appear.
        forbidden_ops=frozenset({"OneHot", "NonZero"}),
    )


def sam2_decoder_spec(image_size: int) -> PartSpec:
    s = image_size
    return PartSpec(
        name="sam2_decoder",
        file="sam2_decoder.onnx",
        inputs=(
            TensorSpec("image_embed", "float32", (1, 256, s // 16, s // 16)),
            TensorSpec("high_res_feats_0", "float32", (1, 32, s // 4, s // 4)),
            TensorSpec("high_res_feats_1", "float32", (1, 64, s // 8, s // 8)),
            TensorSpec("point_coords", "float32", ("batch", "num_points", 2)),
            TensorSpec("point_labels", "int32", ("batch", "num_points")),
            TensorSpec("concept_tokens", "float32", ("batch", "num_concept_tokens", 256)),
            TensorSpec("mask_input", "float32", ("batch", 1, s // 4, s // 4)),
            TensorSpec("has_mask_input", "float32", ("batch",)),
        ),
        outputs=(
            TensorSpec("low_res_masks", "float32", ("batch", 4, s // 4, s // 4)),
            TensorSpec("iou_predictions", "float32", ("batch", 4)),
            TensorSpec("object_score_logits", "float32", ("batch", 1)),
        ),
        atol={"low_res_masks": LOGIT_ATOL, "iou_predictions": SCORE_ATOL, "object_score_logits": SCORE_ATOL},
        forbidden_ops=frozenset({"OneHot", "Tile", "Resize", "NonZero", "Greater", "Less"}),
        min_mask_iou=MASK_IOU_FLOOR,
    )


#: This family's parts, for ``export/registry.py``.
PARTS: dict[str, PartFactory] = {"sam2_encoder": sam2_encoder_spec, "sam2_decoder": sam2_decoder_spec}


@dataclass(frozen=True)
class SAM2ExportConfig:
    """Arguments of ``conceptseg-edge export sam2``."""

    config: str = DEFAULT_CONFIG  # a name in models.sam2_variants.SAM2_CONFIGS
    checkpoint: str | None = None
    opset: int = 17
    image_size: int = 1024
    weight_storage: str = "fp32"  # a name in parts.WEIGHT_STORAGES: how the graphs store large weights
    video: bool = False  # also export the video path (export/sam2_video.py) for the tracker

    def __post_init__(self) -> None:
        weight_storage(self.weight_storage, f"--weight-storage {self.weight_storage}")


def random_init_banner(model: str) -> str:
    line = "!" * 78
    return (
        f"\n{line}\n!! {model}: NO CHECKPOINT GIVEN - RANDOM INITIALISATION.\n"
        "!! The graphs are structurally real but their masks are meaningless.\n"
        "!! Pass --checkpoint sam2.1_hiera_*.pt (official SAM 2.1 weights) for real masks.\n"
        f"{line}\n"
    )


def _decoder_cases(features: dict[str, np.ndarray], image_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Prompt sets that cover the decoder's dynamic axes: batch 1 and 2, K = 0 and 8, N = 0, masks."""
    rng = np.random.default_rng(seed)
    low = image_size // 4

    def case(batch: int, points: list[tuple[float, float, int]], k: int, with_mask: bool) -> dict[str, np.ndarray]:
        coords = np.array([[p[:2] for p in points]] * batch, dtype=np.float32).reshape(batch, len(points), 2)
        labels = np.array([[p[2] for p in points]] * batch, dtype=np.int32).reshape(batch, len(points))
        return {
            **features,
            "point_coords": coords * image_size,
            "point_labels": labels,
            "concept_tokens": rng.standard_normal((batch, k, 256)).astype(np.float32),
            "mask_input": (rng.standard_normal((batch, 1, low, low)) * 4).astype(np.float32),
            "has_mask_input": np.full((batch,), float(with_mask), dtype=np.float32),
        }

    return [
        case(1, [(0.4, 0.5, 1), (0.0, 0.0, -1)], 0, False),  # one click + SAM2's padding point
        case(2, [(0.2, 0.2, 2), (0.7, 0.8, 3), (0.5, 0.5, 1), (0.1, 0.9, 0)], 8, False),  # box + clicks + concept
        case(1, [], 8, False),  # concept tokens alone
        case(1, [(0.3, 0.6, 1), (0.0, 0.0, -1)], 0, True),  # a previous mask as prompt
    ]


def export_sam2_parts(cfg: SAM2ExportConfig, staging: Path, steps: tqdm | None = None):
    """Export and validate the encoder and decoder (and with ``cfg.video`` the video parts) into ``staging``.

    Returns ``(parts, source, preprocessing)`` for the manifest; the concept export reuses this.
    """
    import torch

    from conceptseg_edge.models.sam2 import SAM2ImageEncoder, SAM2PromptDecoder, SAM2Reference, build_sam2_model

    loaded = build_sam2_model(cfg.config, cfg.checkpoint, cfg.image_size)
    if loaded.random_init:
        print(random_init_banner(cfg.config), file=sys.stderr)
    sam = loaded.model
    reference = SAM2Reference(sam)
    rng = np.random.default_rng(0)
    image = reference.preprocess((rng.random((480, 640, 3)) * 255).astype(np.uint8)).numpy()

    def encoder_ref(feeds):
        return {k: v.numpy() for k, v in reference.features(torch.from_numpy(feeds["image"])).items()}

    def decoder_ref(feeds):
        feats = {k: torch.from_numpy(feeds[k]) for k in features}
        mask = torch.from_numpy(feeds["mask_input"]) if feeds["has_mask_input"].any() else None
        masks, iou, obj = reference.decode_all(
            feats,
            torch.from_numpy(feeds["point_coords"]),
            torch.from_numpy(feeds["point_labels"]),
            torch.from_numpy(feeds["concept_tokens"]),
            mask,
        )
        return {"low_res_masks": masks.numpy(), "iou_predictions": iou.numpy(), "object_score_logits": obj.numpy()}

    if steps is not None:
        steps.set_postfix_str("sam2 encoder")
    encoder = export_and_validate(
        SAM2ImageEncoder(sam).eval(), sam2_encoder_spec(cfg.image_size), [{"image": image}],
        encoder_ref, REFERENCE_NAME, staging, cfg.opset, cfg.weight_storage,
    )
    features = encoder_ref({"image": image})
    if steps is not None:
        steps.update()
        steps.set_postfix_str("sam2 decoder")
    decoder = export_and_validate(
        SAM2PromptDecoder(sam).eval(), sam2_decoder_spec(cfg.image_size),
        _decoder_cases(features, cfg.image_size), decoder_ref, REFERENCE_NAME, staging, cfg.opset, cfg.weight_storage,
    )
    if steps is not None:
        steps.update()
    parts = {"sam2_encoder": encoder, "sam2_decoder": decoder}
    if cfg.video:
        from conceptseg_edge.export.sam2_video import export_video_parts

        if steps is not None:
            steps.set_postfix_str("sam2 video parts")
        parts |= export_video_parts(sam, features, staging, cfg.opset, cfg.weight_storage)
        if steps is not None:
            steps.update()
    source = SourceInfo(model=cfg.config, checkpoint=loaded.checkpoint, checkpoint_sha256=loaded.checkpoint_sha256)
    preprocessing = Preprocessing(image_size=cfg.image_size, low_res_size=cfg.image_size // 4)
    return parts, source, preprocessing


def export_sam2(cfg: SAM2ExportConfig, out: str | Path, progress: bool = True) -> BundleManifest:
    """Export SAM2 to ``out`` as a validated bundle (prompt route) and return its manifest."""
    with tqdm(total=3 + cfg.video, desc=f"export {cfg.config}", disable=not progress, unit="step") as steps, staged_dir(out, MANIFEST_NAME, "bundle") as staging:
        parts, source, preprocessing = export_sam2_parts(cfg, staging, steps)
        write_manifest(staging, BundleManifest(source=source, preprocessing=preprocessing, parts=parts, routes=("prompt",)))
        steps.update()
    return read_manifest(out)
