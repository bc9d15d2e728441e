"""All-routes benchmark: prompt, shortcut (bank hit and miss), reason, and several concepts per image.

Timing scope: each route end to end on host as the runtime serves it — numpy preprocessing, encoder
(re-run every time: the image cache is reset before each timed call), concept tokens or policy,
decoder, postprocessing; CPU/GPU transfers inside ONNX Runtime included, none outside. The torch
reference pipeline is timed in the same process, interleaved run by run, when a checkpoint is known.
The shortcut is measured on its own (τ = 0, no fallback) so its latency is not mixed with reason's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.benchmarks.stats import LatencyStats, environment, peak_rss_mb
from conceptseg_edge.errors import BenchmarkError
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.router import RouterConfig

ROUTES = ("prompt", "shortcut", "reason")
CONCEPTS = ("red circle", "blue square", "striped triangle", "green star")
ALWAYS = RouterConfig(taus={n: 0.0 for n in range(1, 5)})


@dataclass(frozen=True)
class RoutesBenchConfig:
    runs: int = field(default=5, metadata={"help": "timed runs per series"})
    warmup: int = field(default=1, metadata={"help": "untimed warm-up runs per series"})
    compare_torch: bool = field(default=True, metadata={"help": "time the torch reference pipeline too"})
    provider: str = field(default="cpu", metadata={"help": "ONNX Runtime provider"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation budget of the reason route"})
    compare_bundles: tuple[str, ...] = field(default=(), metadata={"help": "same checkpoint at other policy precisions"})


def _series(samples: list[dict[str, float]]) -> dict[str, Any]:
    stages = sorted({k for s in samples for k in s})
    out = {k: LatencyStats.from_samples([s.get(k, 0.0) for s in samples]).to_dict() for k in stages}
    out["total"] = LatencyStats.from_samples([sum(s.values()) for s in samples]).to_dict()
    return out


def _timed(fns: dict[str, Callable[[], dict[str, float]]], warmup: int, runs: int,
           progress: bool = False) -> dict[str, list[dict[str, float]]]:
    """Run the series round-robin, one call of each per round, so the ratios between them see the
    same machine load (a busy minute hits every series alike instead of skewing one)."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    for i in tqdm(range(warmup + runs), desc="bench rounds", disable=not progress, unit="round"):
        for name, fn in fns.items():
            t = fn()
            if i >= warmup:
                samples[name].append(t)
    return samples


def bench_routes(bundle: str | Path, cfg: RoutesBenchConfig, progress: bool = True) -> dict[str, Any]:
    """Time every route the bundle serves; returns a JSON-ready report."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    manifest = load_bundle(bundle)
    missing = set(ROUTES) - set(manifest.routes)
    if missing:
        raise BenchmarkError("setup", f"{bundle}: bundle lacks routes {sorted(missing)}; export it with `export concept`")
    image = ConceptWorld(seed=7, image_size=256).episode(0, with_supports=False).image
    point = (image.shape[1] / 2, image.shape[0] / 2)
    with tempfile.TemporaryDirectory(prefix="cse-bank-") as bank_dir:
        seg = ConceptSegmenter.from_bundle(bundle, cfg.provider, bank_dir=bank_dir)
        seg.router = ALWAYS
        seg.concepts.max_new_tokens = cfg.max_new_tokens

        def fresh(call: Callable[[], Any]) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                seg.reset()
                return dict(call().timings)
            return run

        def shortcut_miss() -> dict[str, float]:
            seg.bank = None
            try:
                return fresh(lambda: seg.segment(image, query=CONCEPTS[0], route="shortcut"))()
            finally:
                seg.bank = bank
        bank = seg.bank
        seg.segment(image, query=CONCEPTS[0], route="shortcut")  # warm the bank for the hit series
        series = {
            "prompt": fresh(lambda: seg.segment(image, points=[point])),
            "shortcut_bank_hit": fresh(lambda: seg.segment(image, query=CONCEPTS[0], route="shortcut")),
            "shortcut_bank_miss": shortcut_miss,
            "reason": fresh(lambda: seg.segment(image, query=CONCEPTS[0], route="reason")),
        }
        for q in CONCEPTS:
            seg.segment(image, query=q, route="shortcut")  # every concept in the bank

        def concepts(n: int) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                seg.reset()
                out = seg.segment_concepts(image, CONCEPTS[:n], route="shortcut")
                return {"total_ms": sum(out[0].timings.values()) + sum(
                    r.timings.get("postprocess", 0.0) for r in out[1:])}
            return run

        timed = _timed({**series, "concepts_1": concepts(1), "concepts_4": concepts(4)}, cfg.warmup, cfg.runs, progress)
        results: dict[str, Any] = {name: _series(timed[name]) for name in series}
        multi = {n: LatencyStats.from_samples([t["total_ms"] for t in timed[f"concepts_{n}"]]).to_dict() for n in (1, 4)}
        generations = [seg.segment(image, query=CONCEPTS[0], route="reason") for _ in range(max(2, cfg.runs // 2))]

    decode_ms = [g.timings.get("policy_decode", 0.0) for g in generations]
    steps = [max(0, (g.new_tokens or 0) - 1) for g in generations]  # the first token comes from the prefill
    report: dict[str, Any] = {
        "bundle": str(bundle),
        "model": manifest.source.model,
        "image_size": manifest.preprocessing.image_size,
        "input_image_hw": list(image.shape[:2]),
        "precision": {name: p.precision for name, p in manifest.parts.items()},
        "provider": cfg.provider,
        "timing_scope": "end-to-end per route on host, encoder re-run each call; shortcut measured alone (tau=0)",
        "runs": cfg.runs,
        "warmup": cfg.warmup,
        "routes": results,
        "concepts_per_image": {"1": multi[1], "4": multi[4], "ratio_4_over_1_p50": round(multi[4]["p50"] / multi[1]["p50"], 3)},
        "ratio_shortcut_hit_over_prompt_p50": round(results["shortcut_bank_hit"]["total"]["p50"] / results["prompt"]["total"]["p50"], 3),
        "policy": {
            "prefill_ms_p50": results["shortcut_bank_miss"].get("concept_tokens", {}).get("p50"),
            "decode_tokens_per_s": round(float(np.sum(steps) / max(np.sum(decode_ms) / 1e3, 1e-9)), 2),
        },
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "environment": environment(),
    }
    from conceptseg_edge.benchmarks.policy import bench_policy, bench_torch_capture, cross_capture

    report["policy"].update(bench_policy(bundle, cfg.compare_bundles, runs=max(2, cfg.runs // 2), max_new_tokens=cfg.max_new_tokens))
    if cfg.compare_torch and manifest.source.checkpoint and Path(manifest.source.checkpoint).is_dir():
        capture = report["policy"]["capture"]
        capture.update(bench_torch_capture(manifest.source.checkpoint, max(2, cfg.runs // 2), cfg.max_new_tokens))
        capture.update(cross_capture(capture))
        report["torch"] = _torch_routes(manifest.source.checkpoint, image, point, cfg)
        report["ratio_runtime_over_torch_p50"] = {
            r: round(report["routes"][k]["total"]["p50"] / report["torch"][r]["total"]["p50"], 3)
            for r, k in (("prompt", "prompt"), ("shortcut", "shortcut_bank_miss"), ("reason", "reason"))
        }
    report["stable"] = all(s["stable"] for route in results.values() for s in route.values())
    return report


def _torch_routes(checkpoint: str, image: np.ndarray, point, cfg: RoutesBenchConfig) -> dict[str, Any]:
    from conceptseg_edge.models.pipeline import ConceptSegPipeline

    pipe = ConceptSegPipeline.from_checkpoint(checkpoint, max_new_tokens=cfg.max_new_tokens)
    pipe.router = ALWAYS
    calls = {
        "prompt": lambda: pipe(image, points=[point]).timings,
        "shortcut": lambda: pipe(image, query=CONCEPTS[0], route="shortcut").timings,
        "reason": lambda: pipe(image, query=CONCEPTS[0], route="reason").timings,
    }
    return {name: _series(samples) for name, samples in _timed(calls, cfg.warmup, cfg.runs).items()}


def render_routes_table(report: dict[str, Any]) -> str:
    """Markdown: one row per route series with p50/p90/p99 and the main stages."""
    head = [f"all routes · {report['model']} @ {report['image_size']}px · {report['provider']} · {report['runs']} runs · "
            f"peak RSS {report['peak_rss_mb']} MB" + ("" if report["stable"] else " · UNSTABLE (inconclusive)"), "",
            "| route | p50 ms | p90 ms | p99 ms | encoder | concept tokens / policy | decoder |" + (" torch p50 |" if "torch" in report else ""),
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if "torch" in report else "")]
    torch_key = {"prompt": "prompt", "shortcut_bank_miss": "shortcut", "reason": "reason"}
    for name, s in report["routes"].items():
        policy = s.get("concept_tokens", {}).get("p50", 0.0) + sum(
            s.get(k, {}).get("p50", 0.0) for k in ("policy_vision", "policy_prefill", "policy_decode", "ctm"))
        row = (f"| {name} | {s['total']['p50']:.1f} | {s['total']['p90']:.1f} | {s['total']['p99']:.1f} | "
               f"{s.get('encoder', {}).get('p50', 0.0):.1f} | {policy:.1f} | {s.get('decoder', {}).get('p50', 0.0):.1f} |")
        if "torch" in report:
            t = report["torch"].get(torch_key.get(name, ""), {}).get("total", {}).get("p50")
            row += f" {t:.1f} |" if t is not None else " – |"
        head.append(row)
    head += ["", f"shortcut (bank hit) / prompt p50: {report['ratio_shortcut_hit_over_prompt_p50']}; "
                 f"4 concepts / 1 concept p50: {report['concepts_per_image']['ratio_4_over_1_p50']}; "
                 f"policy prefill p50 {report['policy']['prefill_ms_p50']} ms, decode {report['policy']['decode_tokens_per_s']} tok/s",
             "", "| policy precision | prefill ms | decode tok/s | speedup | greedy agreement |", "|---|---:|---:|---:|---:|"]
    for row in report["policy"].get("precisions", []):
        head.append(f"| {row['precision']} | {row['prefill_ms_p50']} | {row['decode_tokens_per_s']} | "
                    f"{row.get('decode_speedup_vs_first', '–')} | {row.get('greedy_agreement_vs_first', 'reference')} |")
    head += ["", "| hidden-state capture | engines | setting | prompt / new tokens | with capture ms | generate + forward ms "
                 "| ratio | target |", "|---|---|---|---:|---:|---:|---:|---|"]
    for name, c in report["policy"].get("capture", {}).items():
        tokens = f"{c['prompt_tokens']} / {c['new_tokens']}" if "prompt_tokens" in c else "–"
        head.append(f"| {name} | {c['engines']} | {c['setting']} | {tokens} | {c['generate_with_capture_ms']} | "
                    f"{c['generate_then_forward_ms']} | {c['ratio']} | {'met' if c['meets_target'] else 'NOT met'} (≤ {c['target']}) |")
    return "\n".join(head)


def plot_routes(report: dict[str, Any], png: str | Path) -> Path:
    """Stacked bars of p50 per stage for each route (PNG, written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptseg_edge.fileio import write_bytes

    routes = list(report["routes"])
    stages = sorted({k for r in routes for k in report["routes"][r] if k != "total"})
    fig, ax = plt.subplots(figsize=(10, 4))
    bottom = np.zeros(len(routes))
    for stage in stages:
        vals = np.array([report["routes"][r].get(stage, {}).get("p50", 0.0) for r in routes])
        ax.bar(routes, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(f"{report['model']} @ {report['image_size']}px, {report['provider']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(png, buf.getvalue())
    return Path(png)
