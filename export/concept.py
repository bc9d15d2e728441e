"""``export concept``: a ConceptSeg checkpoint → a bundle serving all three routes.

The bundle holds the SAM2 encoder/decoder (from the backbone the checkpoint names), the CTM graph,
the policy as the three graphs ONNX Runtime GenAI uses (vision encoder, token embedding, decoder
with KV cache that also returns the last hidden state), and the processor/tokenizer files. Each graph
is validated against torch when exported (each family module: ``sam2``, ``ctm``, ``policy``); then
the assembled bundle is run through the torch-free runtime and compared with the torch
``ConceptSegPipeline`` on ConceptWorld samples whose masks cover part of the image, route by route,
and the mask IoUs go into the manifest. At fp32 a route below ``ROUTE_IOU_FLOOR``, or with no partial
mask to measure, fails the export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from conceptseg_edge.data.meta import Episode
    from conceptseg_edge.data.world import ConceptWorld

from conceptseg_edge.errors import ExportParityError, InputError
from conceptseg_edge.export.ctm import export_ctm
from conceptseg_edge.export.external import data_files
from conceptseg_edge.export.parts import check_precision, weight_storage
from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2_parts
from conceptseg_edge.export.sam3 import SAM3_VARIANTS, Sam3ExportConfig, export_sam3_parts
from conceptseg_edge.fileio import sha256_file, staged_dir
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import MANIFEST_NAME, PROCESSOR_DIR, BundleManifest, read_manifest, write_manifest
from conceptseg_edge.metrics import iou

# The bar for fp32: the exported routes reproduce the torch pipeline's masks.
ROUTE_IOU_FLOOR = 0.98
PARITY_SAMPLES = 4
#: Route parity compares masks covering this share of the image (``route_parity``): partial masks,
#: where a disagreement between runtime and torch shows in the IoU.
PARTIAL_COVERAGE = (0.05, 0.60)
#: Images screened per route for ``PARITY_SAMPLES`` partial masks.
PARITY_CANDIDATES = 24
#: Both sides of the route parity generate this much: enough for the tiny policy's completions to
#: reach the CTM, short enough for an export-time check.
PARITY_GENERATION = GenerationConfig(max_new_tokens=24)


@dataclass(frozen=True)
class ConceptExportConfig:
    """Arguments of ``conceptseg-edge export concept``."""

    checkpoint: str
    policy_precision: str = "fp32"  # the policy decoder's: a name in parts.PRECISIONS
    opset: int = 17
    # How every fp32 graph (SAM2 encoder/decoder, CTM, policy vision/embedding, an fp32 policy
    # decoder) stores its large weights (parts.WEIGHT_STORAGES); "fp16" halves those files,
    # computation stays fp32. A quantized decoder holds its own quantized weights.
    weight_storage: str = "fp32"
    # Export the policy with ``export_policy_streamed``: decoder layers read from the shards one at
    # a time, weights written as ONNX external data (``<graph>.data``, listed in the manifest's
    # files). For policies whose fp32 copy does not fit in memory, or whose graphs pass 2 GB (3B/7B).
    stream_policy: bool = False
    # Compare the shortcut and reason routes with the torch pipeline (``route_parity``). It holds the
    # fp32 torch policy beside the runtime's and generates on up to PARITY_CANDIDATES images per route:
    # at 3B that is ~27 GB and tens of minutes. Off, the manifest's route_parity stays empty (a bundle
    # that says it was never compared); every graph's own parity check still runs.
    route_parity: bool = True
    # Also export SAM2's video path (memory encoder, memory attention, video decoder) for the tracker.
    video: bool = False
    # A SAM 3 variant (export.sam3.SAM3_VARIANTS) to pair the CTM with instead of the checkpoint's SAM2:
    # an official release's CTM projects into SAM 3's prompt space, so it needs no retraining.
    backbone: str | None = None
    backbone_checkpoint: str | None = None  # the SAM 3 weights (official sam3.pt layout); None = random init

    def __post_init__(self) -> None:
        check_precision(self.policy_precision, f"--policy-precision {self.policy_precision}")
        weight_storage(self.weight_storage, f"--weight-storage {self.weight_storage}")
        if self.backbone is not None and self.backbone not in SAM3_VARIANTS:
            raise InputError(f"--backbone {self.backbone}: expected one of {', '.join(SAM3_VARIANTS)} (a SAM2 comes from the checkpoint)")
        if self.backbone_checkpoint is not None and self.backbone is None:
            raise InputError("--backbone-checkpoint: needs --backbone (a SAM2's weights are the checkpoint's)")
        if self.backbone is not None and self.video:
            raise InputError("--video: SAM2's video path; SAM 3 has no exported video path")
        if self.stream_policy and self.weight_storage != "fp32":
            raise InputError(f"--stream-policy: streamed graphs store fp32 weights (got --weight-storage {self.weight_storage})")


def _save_processor(processor, staging: Path) -> dict[str, str]:
    target = staging / PROCESSOR_DIR
    processor.save_pretrained(str(target))
    return {f"{PROCESSOR_DIR}/{p.name}": sha256_file(p) for p in sorted(target.iterdir()) if p.is_file()}


def coverage_class(mask: np.ndarray) -> str:
    """"partial" when the mask covers ``PARTIAL_COVERAGE`` of the image, else "empty", "under" or "over"."""
    share = float(np.mean(mask))
    if share == 0.0:
        return "empty"
    lo, hi = PARTIAL_COVERAGE
    return "under" if share < lo else "over" if share > hi else "partial"


def parity_images(world: ConceptWorld, candidates: int) -> Iterator[tuple[Episode, np.ndarray]]:
    """``candidates`` (episode, image) pairs: ConceptWorld images alternating with their colour inverses
    (see ``route_parity``)."""
    for i in range(candidates):
        ep = world.episode(i // 2, with_supports=False)
        yield ep, ep.image if i % 2 == 0 else 255 - ep.image


def route_parity(bundle: Path, checkpoint: str | Path, samples: int = PARITY_SAMPLES,
                 candidates: int = PARITY_CANDIDATES, sam3: Sam3ExportConfig | None = None) -> dict[str, dict[str, Any]]:
    """Mask IoU of the runtime's shortcut and reason routes vs the torch pipeline on ConceptWorld.

    Only masks that can disagree count: a mask covering (nearly) the whole image matches any other
    such mask, and two empty masks have IoU 1 by convention, so neither says the routes agree. Per
    route, candidate images are screened (up to ``candidates``) until ``samples`` runtime masks cover
    ``PARTIAL_COVERAGE`` of the image; only those are compared with torch. The candidates are
    ConceptWorld images alternating with their colour inverses: a random-init model (the tests')
    masks most ConceptWorld images almost whole, their inverses mostly in part, and parity is about
    the two implementations agreeing, on any input. The record says how many qualified out of how
    many were screened, what the others were (``not_partial``: empty, under, over; empty runtime
    masks are counted there, never scored as IoU 1), and how many compared torch masks were empty
    (each an IoU of 0). Both sides accept every shortcut (τ = 0) so the shortcut route is compared on
    its own mask, and both generate as ``PARITY_GENERATION`` allows. ``sam3``: the bundle's SAM 3 (the torch
    side is then ``Sam3ConceptPipeline``).
    """
    import torch

    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.models.pipeline import ConceptSegPipeline
    from conceptseg_edge.router import RouterConfig
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    always = RouterConfig(taus={n: 0.0 for n in range(1, 5)})
    # float32 as the graphs compute: a bf16 checkpoint (a retargeted release) would otherwise be compared
    # through its own rounding (measured: half the tiny release's completions differ, reason IoU 0.980)
    if sam3 is None:
        torch_pipe = ConceptSegPipeline.from_checkpoint(checkpoint, generation=PARITY_GENERATION, router=always,
                                                        dtype=torch.float32)
    else:
        from conceptseg_edge.export.sam3_pipeline import Sam3ConceptPipeline

        torch_pipe = Sam3ConceptPipeline.from_checkpoint(checkpoint, sam3.variant, sam3.checkpoint, PARITY_GENERATION,
                                                         always, torch.float32)
    runtime = ConceptSegmenter.from_bundle(bundle, generation=PARITY_GENERATION, router=always)
    world = ConceptWorld(seed=1234, image_size=256)
    report: dict[str, dict[str, Any]] = {}
    for route in ("shortcut", "reason"):
        ious, same_text, screened = [], [], {"partial": 0, "empty": 0, "under": 0, "over": 0}
        torch_empty = 0
        for ep, image in parity_images(world, candidates):
            if screened["partial"] == samples:
                break
            a = runtime.segment(image, query=ep.query, route=route)
            screened[coverage_class(a.mask)] += 1
            if coverage_class(a.mask) != "partial":
                continue
            b = torch_pipe(image, query=ep.query, route=route)
            torch_empty += not b.mask.any()
            ious.append(float(iou(a.mask, b.mask)))
            if route == "reason":
                same_text.append(a.completion == b.completion)
        entry: dict[str, Any] = {
            "samples": len(ious), "screened": sum(screened.values()), "coverage": list(PARTIAL_COVERAGE),
            "not_partial": {k: v for k, v in screened.items() if k != "partial"}, "torch_empty": torch_empty,
            "min_mask_iou": min(ious) if ious else None, "mean_mask_iou": float(np.mean(ious)) if ious else None,
        }
        if same_text:
            entry["same_completion"] = float(np.mean(same_text))
        report[route] = entry
    return report


def _check_route_parity(staging: Path, cfg: ConceptExportConfig, manifest: BundleManifest) -> None:
    """``route_parity`` of the staged bundle, enforced at fp32 and recorded in its manifest."""
    parity = route_parity(staging, cfg.checkpoint, sam3=_sam3_config(cfg, None))
    if cfg.policy_precision == "fp32":
        unmeasured = {r: v["not_partial"] for r, v in parity.items() if not v["samples"]}
        if unmeasured:
            raise ExportParityError(f"route_parity {unmeasured}: no mask covering {PARTIAL_COVERAGE} of the image "
                                    f"among {PARITY_CANDIDATES} episodes, so runtime vs torch is unmeasured")
        bad = {r: v["min_mask_iou"] for r, v in parity.items() if v["min_mask_iou"] < ROUTE_IOU_FLOOR}
        if bad:
            raise ExportParityError(f"routes {bad}: runtime masks differ from the torch pipeline (floor {ROUTE_IOU_FLOOR})")
    write_manifest(staging, dataclasses.replace(manifest, route_parity=parity))


def _sam3_config(cfg: ConceptExportConfig, ctm_queries: int | None) -> Sam3ExportConfig | None:
    """The SAM 3 half of a ``--backbone sam3`` export (None for a SAM2 one); the head gets one slot per CTM query."""
    if cfg.backbone is None:
        return None
    slots = ctm_queries or Sam3ExportConfig.concept_slots
    return Sam3ExportConfig(cfg.backbone, cfg.backbone_checkpoint, cfg.opset, cfg.weight_storage, slots)


def export_concept(cfg: ConceptExportConfig, out: str | Path, progress: bool = True) -> BundleManifest:
    """Export a ConceptSeg checkpoint to ``out`` and return the manifest."""
    from conceptseg_edge.export.policy import export_policy, export_policy_streamed
    from conceptseg_edge.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.checkpoint)
    sam3 = _sam3_config(cfg, ckpt.ctm.config.num_queries)
    # without --backbone, a release (SAM 3's CTM) is refused before anything is written
    backbone = ckpt.sam2_backbone() if sam3 is None else None
    with tqdm(total=5 + cfg.video, desc="export concept", disable=not progress, unit="step") as steps, staged_dir(out, MANIFEST_NAME, "bundle") as staging:
        sam_files: dict[str, str] = {}
        if sam3 is None:
            sam_parts, sam_source, preprocessing = export_sam2_parts(
                SAM2ExportConfig(backbone.config, backbone.checkpoint, cfg.opset, backbone.image_size, cfg.weight_storage,
                                 video=cfg.video),
                staging, steps,
            )
        else:
            sam_parts, sam_files, sam_source, preprocessing = export_sam3_parts(sam3, staging, steps)
        steps.set_postfix_str("ctm")
        ctm = export_ctm(ckpt.ctm, staging, cfg.opset, cfg.weight_storage)
        steps.update()
        steps.set_postfix_str(f"policy ({cfg.policy_precision})")
        if cfg.stream_policy:
            ckpt.policy = None  # the streamed export reads the shards itself: free the loaded copy first
            policy_parts = export_policy_streamed(cfg.checkpoint, staging, opset=cfg.opset, precision=cfg.policy_precision)
        else:
            policy_parts = export_policy(ckpt.policy, ckpt.processor, staging, opset=cfg.opset,
                                         precision=cfg.policy_precision, weight_storage=cfg.weight_storage)
        steps.update()
        files = _save_processor(ckpt.processor, staging) | data_files(staging, policy_parts.values()) | sam_files
        weights = Path(cfg.checkpoint) / "model.safetensors"
        manifest = BundleManifest(
            source=dataclasses.replace(
                sam_source,
                model=f"conceptseg({backbone.config if sam3 is None else sam3.variant})",
                checkpoint=str(cfg.checkpoint),
                checkpoint_sha256=sha256_file(weights) if weights.is_file() else None,
                backbone_checkpoint=sam_source.checkpoint,
                backbone_sha256=sam_source.checkpoint_sha256,
            ),
            preprocessing=preprocessing,
            parts={**sam_parts, "ctm": ctm, **policy_parts},
            routes=("prompt", "shortcut", "reason") if sam3 is None else ("shortcut", "reason"),  # SAM 3: no points/boxes
            router=ckpt.router,
            files=files,
        )
        write_manifest(staging, manifest)
        if cfg.route_parity:
            steps.set_postfix_str("route parity")
            _check_route_parity(staging, cfg, manifest)
        steps.update()
    return read_manifest(out)
