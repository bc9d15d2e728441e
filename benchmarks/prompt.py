"""Prompt-route benchmark: the runtime per stage, and optionally PyTorch eager side by side.

Timing scope: end to end on one image and one click — numpy preprocessing, encoder, decoder,
postprocessing (upsample + threshold) — on this host, no device transfers. Warm-up runs are kept
out of the statistics. With ``compare_torch`` the eager reference (sam2's modules with torch pre/post
processing) is timed **in the same process, interleaved run by run**, so both see the same machine
load and the ratios are meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.manifest import BundleManifest, load_bundle
from conceptseg_edge.benchmarks.stats import LatencyStats, environment, peak_rss_mb

STAGES = ("preprocess", "encoder", "decoder", "postprocess")


@dataclass(frozen=True)
class BenchConfig:
    runs: int = field(default=10, metadata={"help": "timed runs per series"})
    warmup: int = field(default=2, metadata={"help": "untimed warm-up runs"})
    compare_torch: bool = field(default=False, metadata={"help": "time PyTorch eager in the same run"})
    provider: str = field(default="cpu", metadata={"help": "ONNX Runtime provider: cpu, cuda, tensorrt"})


def bench_image(size_hw: tuple[int, int] = (480, 640), seed: int = 0) -> np.ndarray:
    """A fixed textured test image (latency does not depend on content for these graphs)."""
    rng = np.random.default_rng(seed)
    return (rng.random((*size_hw, 3)) * 255).astype(np.uint8)


def _torch_runner(manifest: BundleManifest):
    """One prompt-route call of the eager reference (upsampling all three masks, as SAM2 does)."""
    import torch

    from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model

    loaded = build_sam2_model(manifest.source.model, manifest.source.checkpoint, manifest.preprocessing.image_size)
    ref = SAM2Reference(loaded.model)

    def run(image: np.ndarray, point: tuple[float, float]) -> dict[str, float]:
        with torch.no_grad():
            ref.set_image(image)
            return ref.predict(np.array([point]), np.array([1]), multimask_output=True).timings

    return run, loaded.random_init


def _series(samples: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {stage: LatencyStats.from_samples([s[stage] for s in samples]).to_dict() for stage in STAGES}
    out["total"] = LatencyStats.from_samples([sum(s[k] for k in STAGES) for s in samples]).to_dict()
    return out


def bench_prompt_route(bundle: str | Path, cfg: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Time the prompt route; returns a JSON-ready report (see ``render_table``)."""
    from conceptseg_edge.runtime.predictor import SAM2Predictor

    manifest = load_bundle(bundle)
    predictor = SAM2Predictor.from_bundle(bundle, provider=cfg.provider, manifest=manifest)
    image = bench_image()
    point = (image.shape[1] * 0.45, image.shape[0] * 0.55)
    torch_run = None
    torch_random = None
    if cfg.compare_torch:
        torch_run, torch_random = _torch_runner(manifest)

    def runtime_once() -> dict[str, float]:
        predictor.set_image(image)
        return predictor.predict(points=[point]).timings

    ort_samples: list[dict[str, float]] = []
    torch_samples: list[dict[str, float]] = []
    total = cfg.warmup + cfg.runs
    for i in tqdm(range(total), desc="bench prompt route", disable=not progress, unit="run"):
        t = runtime_once()
        tt = torch_run(image, point) if torch_run else None
        if i >= cfg.warmup:
            ort_samples.append(t)
            if tt is not None:
                torch_samples.append(tt)

    report: dict[str, Any] = {
        "route": "prompt",
        "bundle": str(bundle),
        "model": manifest.source.model,
        "image_size": manifest.preprocessing.image_size,
        "input_image_hw": list(image.shape[:2]),
        "precision": {name: p.precision for name, p in manifest.parts.items()},
        "manifest_sha256": {name: p.sha256 for name, p in manifest.parts.items()},
        "timing_scope": "end-to-end prompt route on host: numpy preprocess + encoder + decoder + postprocess; one click; no device transfers",
        "provider": predictor.encoder.provider,
        "warmup": cfg.warmup,
        "runs": cfg.runs,
        "runtime": _series(ort_samples),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "environment": environment(),
    }
    if torch_samples:
        report["torch"] = _series(torch_samples)
        report["torch_weights"] = "random init (timing only)" if torch_random else "bundle checkpoint"
        report["ratio_runtime_over_torch_p50"] = {
            k: round(report["runtime"][k]["p50"] / report["torch"][k]["p50"], 3) for k in (*STAGES, "total")
        }
    report["stable"] = all(s["stable"] for s in report["runtime"].values())
    return report


def render_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per stage, runtime percentiles, torch p50 and ratio when present."""
    has_torch = "torch" in report
    head = "| stage | p50 ms | p90 ms | p99 ms |" + (" torch p50 ms | runtime/torch |" if has_torch else "")
    sep = "|---|---:|---:|---:|" + ("---:|---:|" if has_torch else "")
    rows = [f"route `{report['route']}` · {report['model']} @ {report['image_size']}px · {report['provider']} · "
            f"{report['runs']} runs · peak RSS {report['peak_rss_mb']} MB" + ("" if report["stable"] else " · UNSTABLE (inconclusive)"),
            "", head, sep]
    for stage in (*STAGES, "total"):
        r = report["runtime"][stage]
        line = f"| {stage} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} |"
        if has_torch:
            line += f" {report['torch'][stage]['p50']:.1f} | {report['ratio_runtime_over_torch_p50'][stage]:.2f} |"
        rows.append(line)
    return "\n".join(rows)
