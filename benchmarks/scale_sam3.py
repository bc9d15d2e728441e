"""SAM 3 as a ConceptSeg backbone: the small model's numbers, and what the full size costs (P12).

``python -m conceptseg_edge.benchmarks.scale_sam3 small --out runs/sam3_small`` (the small SAM 3,
``SAM3_SMALL``, random seeded weights; minutes on 2 cores): a tiny policy + CTM saved in the official
release layout (``save_sam3_release``) and exported with ``export concept --backbone sam3_small``, then

- latency, ONNX Runtime CPU vs PyTorch eager in the same run, interleaved: per SAM 3 part (the
  ``sam3`` package's modules vs the graphs, same feeds) and per route (``bench_routes`` with
  ``compare_torch``: ``Sam3Segmenter`` vs ``Sam3ConceptPipeline``);
- fp16 weight storage: each part's recorded parity, and the end-to-end mask IoU of the fp16 bundle
  against the fp32 one on held-out ConceptWorld images, both routes;
- INT8 Q/DQ per SAM 3 part through ``export qdq`` (end-to-end mask IoU vs the fp32 bundle).

``python -m conceptseg_edge.benchmarks.scale_sam3 full --out runs/sam3_full`` (not in the suite:
> 10 GB RAM): the full SAM 3 (840 M parameters, 1008 px, random init: no weights are downloaded)
exported with ``export sam3`` in a child process, then one image through ``Sam3Predictor`` in
another; wall time, each child's own peak RSS (``stats.run_step``) and the graphs' sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.benchmarks.scale import machine, photo
from conceptseg_edge.benchmarks.scale_policy import dir_bytes
from conceptseg_edge.benchmarks.stats import own_peak_rss_mib, peak_file, run_step

SAM3_PART_NAMES = ("sam3_vision", "sam3_text", "sam3_head")
FULL_CONCEPT = "a person"


def save_sam3_release(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(release directory, sam3_small.pt): a tiny Qwen2.5-VL policy + CTM (16 heads, 256-d tokens: SAM 3's
    prompt width) as published (the Hugging Face config alone, shards under the release names, no
    ``conceptseg_edge`` section), and a seeded small SAM 3 in the official ``sam3.pt`` layout."""
    import torch

    from conceptseg_edge.export.sam3_compat import bpe_path, sam3_compat
    from conceptseg_edge.models.checkpoint import CONFIG_NAME, SECTION, save_checkpoint
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
    from conceptseg_edge.models.policy import build_policy, build_processor, tiny_policy_config
    from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
    from conceptseg_edge.router import RouterConfig

    root.mkdir(parents=True, exist_ok=True)
    with sam3_compat():
        from conceptseg_edge.models.sam3 import build_sam3

        torch.manual_seed(seed)
        sam = build_sam3("sam3_small", bpe_path()).model
        weights = root / "sam3_small.pt"
        torch.save({"model": {f"detector.{k}": v for k, v in sam.state_dict().items()}}, weights)
    tokenizer = train_tiny_tokenizer()
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    policy = build_policy(tiny_policy_config(tokenizer), seed=seed)
    torch.manual_seed(seed)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=128, num_heads=16)).eval()  # 16: what a release is read with
    release = save_checkpoint(root / "release", policy, ctm, processor, RouterConfig(), None, max_shard_size="1MB",
                              overwrite=True)
    config = json.loads((release / CONFIG_NAME).read_text())
    del config[SECTION]  # as published: only the Hugging Face config
    (release / CONFIG_NAME).write_text(json.dumps(config))
    return release, weights


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def part_latency(bundle: Path, weights: Path, runs: int) -> dict[str, dict[str, float]]:
    """Median ms per SAM 3 part: the ONNX graph on ORT CPU vs the package's modules in torch eager, same
    feeds (one photo, one phrase, 8 concept tokens), one call of each in turn so both see the same load."""
    import torch

    from conceptseg_edge.export.sam3_compat import bpe_path, sam3_compat
    from conceptseg_edge.preprocess import preprocess_image
    from conceptseg_edge.runtime.engine import OrtEngine
    from conceptseg_edge.runtime.sam3 import Sam3Predictor, encode_prompts, pad_concept_tokens

    pred = Sam3Predictor.from_bundle(bundle)
    image = photo("astronaut")
    pixels = preprocess_image(image, pred.pre.image_size, pred.pre.pixel_mean, pred.pre.pixel_std)
    fpn = pred.vision.run({"image": pixels})
    text, mask = pred.text_features("a red car")
    tokens, token_mask = pad_concept_tokens(np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32),
                                            pred.concept_slots)
    feeds = {
        "sam3_vision": {"image": pixels},
        "sam3_text": {"input_ids": encode_prompts(pred.tokenizer, ["a red car"])},
        "sam3_head": {**fpn, "text_features": text, "text_mask": mask, "concept_tokens": tokens, "concept_mask": token_mask},
    }
    out: dict[str, dict[str, float]] = {}
    with sam3_compat(), torch.no_grad():
        from conceptseg_edge.models.sam3 import Sam3GroundingHead, Sam3TextEncoder, Sam3VisionEncoder, build_sam3

        sam = build_sam3("sam3_small", bpe_path(), weights).model
        modules = {"sam3_vision": Sam3VisionEncoder(sam), "sam3_text": Sam3TextEncoder(sam), "sam3_head": Sam3GroundingHead(sam)}
        for name, module in modules.items():
            engine = OrtEngine(bundle / f"{name}.onnx")
            args = [torch.from_numpy(np.asarray(v)) for v in feeds[name].values()]
            module.eval()(*args), engine.run(feeds[name])  # warm-up
            ort, eager = [], []
            for _ in range(runs):
                ort.append(_ms(lambda: engine.run(feeds[name])))
                eager.append(_ms(lambda: module(*args)))
            out[name] = {"ort_ms_p50": round(statistics.median(ort), 2), "torch_ms_p50": round(statistics.median(eager), 2)}
    return out


def storage_iou(fp32: Path, other: Path, images: int) -> dict[str, float]:
    """Mean and min end-to-end mask IoU of ``other`` vs the ``fp32`` bundle per route on held-out
    ConceptWorld images (τ = 0 on both, so each route is compared on its own mask)."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.export.qdq import ALWAYS_SHORTCUT, HELD_OUT_OFFSET
    from conceptseg_edge.metrics import iou
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    a = ConceptSegmenter.from_bundle(fp32, router=ALWAYS_SHORTCUT)
    b = ConceptSegmenter.from_bundle(other, router=ALWAYS_SHORTCUT)
    world = ConceptWorld(seed=0, image_size=256)
    out: dict[str, float] = {}
    for route in ("shortcut", "reason"):
        ious = []
        for i in range(images):
            ep = world.episode(HELD_OUT_OFFSET + i, with_supports=False)
            ious.append(float(iou(a.segment(ep.image, query=ep.query, route=route).mask,
                                  b.segment(ep.image, query=ep.query, route=route).mask)))
        out[f"{route}_mean"], out[f"{route}_min"] = round(float(np.mean(ious)), 4), round(float(np.min(ious)), 4)
    return out


def small(out: Path, runs: int, held_out: int) -> dict[str, Any]:
    """Every number of the small SAM 3 (see the module docstring)."""
    from dataclasses import asdict

    from conceptseg_edge.benchmarks.routes import RoutesBenchConfig, bench_routes
    from conceptseg_edge.export.concept import ConceptExportConfig, export_concept
    from conceptseg_edge.export.qdq import QdqConfig, export_qdq
    from conceptseg_edge.generation import GenerationConfig

    release, weights = save_sam3_release(out / "checkpoint")
    report: dict[str, Any] = {"model": "sam3_small (SAM3_SMALL: 224 px, 14.6 M parameters), random seeded weights",
                              "machine": machine()}
    bundles = {}
    for storage in ("fp32", "fp16"):
        t0 = time.perf_counter()
        bundles[storage] = out / f"bundle-{storage}"
        manifest = export_concept(ConceptExportConfig(str(release), weight_storage=storage, backbone="sam3_small",
                                                      backbone_checkpoint=str(weights), route_parity=storage == "fp32"),
                                  bundles[storage], progress=False)
        report[f"export_{storage}"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "bytes": {n: (bundles[storage] / manifest.parts[n].file).stat().st_size for n in SAM3_PART_NAMES},
            "parity": {n: manifest.parts[n].parity.to_dict() for n in SAM3_PART_NAMES},
            "route_parity": manifest.route_parity,
        }
    report["fp16_vs_fp32_mask_iou"] = storage_iou(bundles["fp32"], bundles["fp16"], held_out)
    report["part_latency"] = part_latency(bundles["fp32"], weights, runs)
    routes = bench_routes(bundles["fp32"], RoutesBenchConfig(runs=runs, warmup=1, compare_torch=True, capture=False,
                                                             generation=GenerationConfig(16)), progress=False)
    report["route_latency"] = {"runtime_ort_p50_ms": {r: s.total.p50 for r, s in routes.routes.items()},
                               "torch_eager_p50_ms": {r: s.total.p50 for r, s in (routes.torch or {}).items()},
                               "ratio_runtime_over_torch_p50": routes.ratio_runtime_over_torch_p50,
                               "providers": dict(routes.providers), "max_new_tokens": 16}
    qdq = export_qdq(bundles["fp32"], out / "bundle-int8", QdqConfig("int8", f"world:{2 * held_out}", held_out,
                                                                     parts=SAM3_PART_NAMES), progress=False)
    report["int8_qdq"] = {n: asdict(qdq.parts[n].qdq) for n in SAM3_PART_NAMES}
    report["peak_rss_mib"] = own_peak_rss_mib()
    return report


# ------------------------------------------------------------------------------------------ full size


def _full_export(out: Path, variant: str) -> dict[str, Any]:
    from conceptseg_edge.export.sam3 import Sam3ExportConfig, export_sam3

    manifest = export_sam3(Sam3ExportConfig(variant), out / "bundle", progress=False)
    return {"bytes": {n: (out / "bundle" / manifest.parts[n].file).stat().st_size for n in SAM3_PART_NAMES},
            "bundle_bytes": dir_bytes(out / "bundle"),
            "parity": {n: manifest.parts[n].parity.to_dict() for n in SAM3_PART_NAMES}}


def _full_run(out: Path, variant: str) -> dict[str, Any]:
    from conceptseg_edge.runtime.sam3 import Sam3Predictor

    t0 = time.perf_counter()
    pred = Sam3Predictor.from_bundle(out / "bundle")
    load = time.perf_counter() - t0
    image = photo("astronaut")
    pred.set_image(image)
    result = pred.predict(FULL_CONCEPT)
    return {"load_s": round(load, 1), "image_hw": list(image.shape[:2]), "concept": FULL_CONCEPT,
            "timings_ms": {k: round(v, 1) for k, v in result.timings.to_dict().items()},
            "instances": int(len(result.scores)), "presence": round(result.presence, 4)}


def full(out: Path, variant: str = "sam3") -> dict[str, Any]:
    """Export and one image, each in its own child process (``run_step``: wall, own peak RSS).
    ``variant`` sam3_small runs the same path in a minute (a check of the script, not a number)."""
    report: dict[str, Any] = {"model": f"{variant}, random init", "machine": machine(), "steps": {}}
    for step in ("export", "run"):
        report["steps"][step] = run_step(__spec__.name, ["full", "--out", str(out), "--variant", variant, "--step", step],
                                         step, out / f"{step}.log", out)
        if "error" in report["steps"][step]:
            break
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("small", "full"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=10, help="small: timed runs per part and per route")
    parser.add_argument("--held-out", type=int, default=8, help="small: held-out images for fp16 and INT8 IoU")
    parser.add_argument("--variant", choices=("sam3", "sam3_small"), default="sam3", help="full: the SAM 3 to export")
    parser.add_argument("--step", choices=("export", "run"), help=argparse.SUPPRESS)  # internal: one child step
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:
        try:
            print(json.dumps((_full_export if args.step == "export" else _full_run)(args.out, args.variant)))
        finally:  # a failed step's peak counts too
            peak_file(args.out, args.step).write_text(str(own_peak_rss_mib()))
        return 0
    report = small(args.out, args.runs, args.held_out) if args.what == "small" else full(args.out, args.variant)
    (args.out / f"sam3_{args.what}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    return 0 if "error" not in json.dumps(report.get("steps", {})) else 1


if __name__ == "__main__":
    sys.exit(main())
