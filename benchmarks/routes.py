"""All-routes benchmark: prompt, shortcut (bank hit and miss), reason, and several concepts per image.

Timing scope: each route end to end on host as the runtime serves it — numpy preprocessing, encoder
(re-run every time: the image cache is reset before each timed call), concept tokens or policy,
decoder, postprocessing; CPU/GPU transfers inside ONNX Runtime included, none outside. The torch
reference pipeline is timed in the same process, interleaved run by run, when a checkpoint is known.
The shortcut is measured on its own (τ = 0, no fallback) so its latency is not mixed with reason's.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.benchmarks.policy import (
    BENCH_GENERATION,
    CAPTURE_SETTINGS,
    CAPTURE_TARGET,
    PolicyBenchReport,
    bench_policy,
    bench_torch_capture,
    cross_capture,
)
from conceptseg_edge.benchmarks.reference import torch_checkpoint
from conceptseg_edge.benchmarks.stats import (
    BenchedBundle,
    LatencyStats,
    StageSeries,
    all_stable,
    environment,
    p50_ratio,
    peak_rss_mb,
    plot_stages,
    stability_note,
)
from conceptseg_edge.errors import BenchmarkError
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.router import ROUTES, Route, RouterConfig
from conceptseg_edge.runtime.bank import ConceptBank
from conceptseg_edge.runtime.engine import engine_factory_for
from conceptseg_edge.runtime.providers import ProviderChoice, ProviderConfig, provider_note, provider_record
from conceptseg_edge.runtime.segmenter import SAM3_HEAD, ConceptSegmenter
from conceptseg_edge.timings import describe_providers

CONCEPTS = ("red circle", "blue square", "striped triangle", "green star")
#: τ = 0 for every word count: the shortcut is measured on its own, never rejected into a reason run.
ALWAYS = RouterConfig(taus={n: 0.0 for n in range(1, 5)})
#: Torch reference routes ↔ the runtime series timed under the same route.
TORCH_SERIES: dict[Route, str] = {"prompt": "prompt", "shortcut": "shortcut_bank_miss", "reason": "reason"}
#: Torch pipeline stage → the runtime's name for the same work (``_runtime_names``).
TORCH_STAGE_NAMES = {"policy_prefill": "concept_tokens"}
TIMING_SCOPE = "end-to-end per route on host, encoder re-run each call; shortcut measured alone (tau=0)"


@dataclass(frozen=True)
class RoutesBenchConfig(ProviderChoice):
    runs: int = field(default=5, metadata={"help": "timed runs per series"})
    warmup: int = field(default=1, metadata={"help": "untimed warm-up runs per series"})
    compare_torch: bool = field(default=True, metadata={"help": "time the torch reference pipeline too"})
    checkpoint: str | None = field(default=None, metadata={"help": "torch weights instead of the bundle's recorded ones"})
    generation: GenerationConfig = field(default=BENCH_GENERATION, metadata={"help": "the reason route's budget"})
    compare_bundles: tuple[str, ...] = field(default=(), metadata={"help": "same checkpoint at other policy precisions"})
    capture: bool = field(default=True, metadata={"help": "time capture vs generate-then-forward (two prompts, 3 generations each per run)"})

    @property
    def provider_config(self) -> ProviderConfig:
        return replace(super().provider_config, max_new_tokens=self.generation.max_new_tokens)  # sizes the KV profile


@dataclass(frozen=True)
class ConceptsPerImage:
    """Several concepts on one image: the encoder runs once, each concept adds its decoder pass."""

    one: LatencyStats
    four: LatencyStats

    @property
    def ratio_4_over_1_p50(self) -> float:
        return p50_ratio(self.four, self.one)

    def to_json(self) -> dict[str, Any]:
        return {"1": self.one.to_dict(), "4": self.four.to_dict(), "ratio_4_over_1_p50": self.ratio_4_over_1_p50}


@dataclass(frozen=True)
class RoutesBenchReport:
    """Every route of a concept bundle, per stage; the policy's precisions and capture; torch alongside."""

    subject: BenchedBundle
    provider_requested: str
    providers: Mapping[str, str]  # part → the provider that ran it
    runs: int
    warmup: int
    routes: Mapping[str, StageSeries]  # prompt, shortcut_bank_hit, shortcut_bank_miss, reason
    concepts_per_image: ConceptsPerImage
    decode_tokens_per_s: float  # the reason route's decoding steps per second
    policy: PolicyBenchReport
    peak_rss_mb: float
    environment: Mapping[str, Any]
    torch: Mapping[Route, StageSeries] | None = None

    @property
    def provider(self) -> str:
        """The provider that ran (or each one with its parts, if they differ)."""
        return describe_providers(self.providers)

    @property
    def ratio_shortcut_hit_over_prompt_p50(self) -> float | None:
        """None for a SAM 3 bundle (no prompt route, no bank)."""
        if not {"shortcut_bank_hit", "prompt"} <= set(self.routes):
            return None
        return p50_ratio(self.routes["shortcut_bank_hit"].total, self.routes["prompt"].total)

    @property
    def concept_tokens_ms_p50(self) -> float | None:
        """A bank miss's concept tokens: the policy's text prefill, the CTM and the bank write (not the
        policy prefill alone, which ``policy.precisions`` reports); None when the series ran no such stage."""
        miss = self.routes.get("shortcut_bank_miss")
        stage = None if miss is None else miss.stages.get("concept_tokens")
        return None if stage is None else stage.p50

    @property
    def ratio_runtime_over_torch_p50(self) -> dict[str, float]:
        if self.torch is None:
            return {}
        return {r: p50_ratio(self.routes[k].total, self.torch[r].total) for r, k in _torch_series(self.routes).items()}

    @property
    def stable(self) -> bool | None:
        return all_stable(series.stable for series in self.routes.values())

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.subject.to_json(),
            **provider_record(self.provider_requested, self.providers),
            "timing_scope": TIMING_SCOPE,
            "runs": self.runs,
            "warmup": self.warmup,
            "routes": {name: series.to_json() for name, series in self.routes.items()},
            "concepts_per_image": self.concepts_per_image.to_json(),
            "ratio_shortcut_hit_over_prompt_p50": self.ratio_shortcut_hit_over_prompt_p50,
            "policy": {"concept_tokens_ms_p50": self.concept_tokens_ms_p50, "decode_tokens_per_s": self.decode_tokens_per_s,
                       **self.policy.to_json()},
            "peak_rss_mb": self.peak_rss_mb,
            "environment": dict(self.environment),
        }
        if self.torch is not None:
            out["torch"] = {route: series.to_json() for route, series in self.torch.items()}
            out["ratio_runtime_over_torch_p50"] = self.ratio_runtime_over_torch_p50
        out["stable"] = self.stable
        return out


def _timed(fns: dict[str, Callable[[], Mapping[str, float]]], warmup: int, runs: int,
           progress: bool = False) -> dict[str, list[Mapping[str, float]]]:
    """Run the series round-robin, one call of each per round, so the ratios between them see the
    same machine load (a busy minute hits every series alike instead of skewing one)."""
    samples: dict[str, list[Mapping[str, float]]] = {name: [] for name in fns}
    for i in tqdm(range(warmup + runs), desc="bench rounds", disable=not progress, unit="round"):
        for name, fn in fns.items():
            t = fn()
            if i >= warmup:
                samples[name].append(t)
    return samples


def bench_routes(bundle: str | Path, cfg: RoutesBenchConfig, progress: bool = True) -> RoutesBenchReport:
    """Time every route the bundle serves (see ``render_routes_table``, ``plot_routes``, ``to_json``)."""
    from conceptseg_edge.data.world import ConceptWorld

    manifest = load_bundle(bundle)
    factory = engine_factory_for(cfg.provider_config, manifest)  # a missing provider is refused before anything loads
    sam3 = SAM3_HEAD in manifest.parts  # SAM 3: shortcut = its text prompt (no bank), reason; no prompt route
    missing = ({"shortcut", "reason"} if sam3 else set(ROUTES)) - set(manifest.routes)
    if missing:
        raise BenchmarkError("setup", f"{bundle}: bundle lacks routes {sorted(missing)}; export it with `export concept`")
    image = ConceptWorld(seed=7, image_size=256).episode(0, with_supports=False).image
    point = (image.shape[1] / 2, image.shape[0] / 2)
    checkpoint = None
    if cfg.compare_torch:  # refused before any timing
        checkpoint = _sam3_pipeline(manifest, cfg) if sam3 else torch_checkpoint(manifest, cfg.checkpoint)
    with tempfile.TemporaryDirectory(prefix="cse-bank-") as bank_dir:
        seg = ConceptSegmenter.from_bundle(bundle, cfg.provider, bank_dir=bank_dir, generation=cfg.generation,
                                           router=ALWAYS, engine_factory=factory, manifest=manifest)

        def fresh(segmenter: ConceptSegmenter, call: Callable[[ConceptSegmenter], Any]) -> Callable[[], Mapping[str, float]]:
            def run() -> Mapping[str, float]:
                segmenter.reset()
                return call(segmenter).timings
            return run

        seg.segment(image, query=CONCEPTS[0], route="shortcut")  # warm the bank for the hit series
        shortcut = fresh(seg, lambda s: s.segment(image, query=CONCEPTS[0], route="shortcut"))
        series = {"shortcut": shortcut} if sam3 else {
            "prompt": fresh(seg, lambda s: s.segment(image, points=[point])),
            "shortcut_bank_hit": shortcut,
            "shortcut_bank_miss": bank_miss(seg, Path(bank_dir) / "misses", image),
        }
        series["reason"] = fresh(seg, lambda s: s.segment(image, query=CONCEPTS[0], route="reason"))
        for q in CONCEPTS:
            seg.segment(image, query=q, route="shortcut")  # every concept in the bank

        def concepts(n: int) -> Callable[[], Mapping[str, float]]:
            def run() -> Mapping[str, float]:
                seg.reset()
                out = seg.segment_concepts(image, CONCEPTS[:n], route="shortcut")
                return {"total_ms": out[0].timings.total() + sum(r.timings.get("postprocess", 0.0) for r in out[1:])}
            return run

        timed = _timed({**series, "concepts_1": concepts(1), "concepts_4": concepts(4)}, cfg.warmup, cfg.runs, progress)
        routes = {name: StageSeries.from_samples(timed[name]) for name in series}
        multi = ConceptsPerImage(*(LatencyStats.from_samples([t["total_ms"] for t in timed[f"concepts_{n}"]]) for n in (1, 4)))
        generations = [seg.segment(image, query=CONCEPTS[0], route="reason") for _ in range(max(2, cfg.runs // 2))]
        providers = seg.providers()

    rss_mb = round(peak_rss_mb(), 1)  # the routes' footprint, before the policy and torch benchmarks load more
    decode_ms = [g.timings.get("policy_decode", 0.0) for g in generations]
    steps = [max(0, (g.new_tokens or 0) - 1) for g in generations]  # the first token comes from the prefill
    policy_runs = max(2, cfg.runs // 2)
    policy = bench_policy(bundle, cfg.compare_bundles, runs=policy_runs, generation=cfg.generation,
                          provider=cfg.provider_config, capture=cfg.capture, loaded=getattr(seg.concepts, "policy", None))
    torch_routes = None
    if checkpoint is not None:
        if not sam3:
            policy = policy.with_capture(bench_torch_capture(checkpoint, policy_runs, cfg.generation))
            policy = policy.with_capture(cross_capture(policy.capture))
        torch_routes = _torch_routes(checkpoint, image, point, cfg)
    return RoutesBenchReport(
        subject=BenchedBundle.of(bundle, manifest, image.shape[:2]),
        provider_requested=cfg.provider,
        providers=providers,
        runs=cfg.runs,
        warmup=cfg.warmup,
        routes=routes,
        concepts_per_image=multi,
        decode_tokens_per_s=round(float(np.sum(steps) / max(np.sum(decode_ms) / 1e3, 1e-9)), 2),
        policy=policy,
        peak_rss_mb=rss_mb,
        environment=environment(),
        torch=torch_routes,
    )


def bank_miss(seg: ConceptSegmenter, root: Path, image: np.ndarray) -> Callable[[], Mapping[str, float]]:
    """A shortcut request whose concept is not in the bank yet, as a first request meets it: the
    lookup misses, the text prefill and CTM run, the tokens are written to the bank, all inside
    ``concept_tokens``. Each call gets a new empty bank (under ``root``), created before the clock."""
    calls = itertools.count()

    def run() -> Mapping[str, float]:
        bank = ConceptBank(root / str(next(calls)), seg.bank.key)
        first = ConceptSegmenter(seg.predictor, seg.router, seg.routes, seg.concepts, bank)
        first.reset()
        result = first.segment(image, query=CONCEPTS[0], route="shortcut")
        if result.bank_hit is not False or bank.misses != 1:
            raise BenchmarkError("bank miss", f"{bank.dir}: expected one miss and a write, got hit={result.bank_hit}")
        return result.timings

    return run


def _torch_series(routes: Mapping[str, StageSeries]) -> dict[Route, str]:
    """``TORCH_SERIES`` for the series a bundle has (a SAM 3 bundle's shortcut series is ``shortcut``)."""
    return {"shortcut": "shortcut", "reason": "reason"} if "shortcut" in routes else TORCH_SERIES


def _sam3_pipeline(manifest, cfg: RoutesBenchConfig):
    """The torch side of a SAM 3 concept bundle (``Sam3ConceptPipeline``), loaded before any timing."""
    from conceptseg_edge.export.sam3_pipeline import Sam3ConceptPipeline

    return Sam3ConceptPipeline.for_bundle(manifest, cfg.checkpoint, cfg.generation, ALWAYS)


def _torch_routes(checkpoint, image: np.ndarray, point, cfg: RoutesBenchConfig) -> dict[Route, StageSeries]:
    """Torch eager per route; ``checkpoint``: a concept checkpoint directory, or an already loaded
    ``Sam3ConceptPipeline`` (no prompt route)."""
    from conceptseg_edge.models.pipeline import ConceptSegPipeline

    sam3 = isinstance(checkpoint, ConceptSegPipeline)
    pipe = checkpoint if sam3 else ConceptSegPipeline.from_checkpoint(checkpoint, cfg.generation, router=ALWAYS)
    calls: dict[Route, Callable[[], Mapping[str, float]]] = {} if sam3 else {"prompt": lambda: pipe(image, points=[point]).timings}
    calls |= {
        "shortcut": lambda: pipe(image, query=CONCEPTS[0], route="shortcut").timings,
        "reason": lambda: pipe(image, query=CONCEPTS[0], route="reason").timings,
    }
    timed = _timed(calls, cfg.warmup, cfg.runs)
    return {name: StageSeries.from_samples([_runtime_names(s) for s in samples]) for name, samples in timed.items()}


def _runtime_names(timings: Mapping[str, float]) -> dict[str, float]:
    """Torch stages under the runtime's names: the torch shortcut's ``policy_prefill`` is the text
    prefill *and* the CTM, which the runtime calls ``concept_tokens``."""
    return {TORCH_STAGE_NAMES.get(k, k): v for k, v in timings.items()}


def render_routes_table(report: RoutesBenchReport) -> str:
    """Markdown: one row per route series with p50/p90/p99 and the main stages."""
    torch_route = {series: route for route, series in _torch_series(report.routes).items()}
    head = [f"all routes · {report.subject.model} @ {report.subject.image_size}px · "
            f"{provider_note(report.provider_requested, report.providers)} · {report.runs} runs · "
            f"peak RSS {report.peak_rss_mb} MB" + stability_note(report.stable), "",
            "| route | p50 ms | p90 ms | p99 ms | encoder | concept tokens / policy | decoder |" + (" torch p50 |" if report.torch else ""),
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if report.torch else "")]
    for name, s in report.routes.items():
        policy = sum(s.p50(k) for k in ("concept_tokens", "policy_vision", "policy_prefill", "policy_decode", "ctm"))
        row = (f"| {name} | {s.total.p50:.1f} | {s.total.p90:.1f} | {s.total.p99:.1f} | "
               f"{s.p50('encoder'):.1f} | {policy:.1f} | {s.p50('decoder'):.1f} |")
        if report.torch:
            route = torch_route.get(name)
            row += f" {report.torch[route].total.p50:.1f} |" if route in report.torch else " – |"
        head.append(row)
    head += ["", f"shortcut (bank hit) / prompt p50: {report.ratio_shortcut_hit_over_prompt_p50}; "
                 f"4 concepts / 1 concept p50: {report.concepts_per_image.ratio_4_over_1_p50}; "
                 f"concept tokens on a bank miss (text prefill + CTM + bank write) p50 {report.concept_tokens_ms_p50} ms, decode {report.decode_tokens_per_s} tok/s",
             "", "| policy precision | provider | prefill ms | decode tok/s | speedup | greedy agreement |",
             "|---|---|---:|---:|---:|---:|"]
    for row in report.policy.precisions:
        speedup = report.policy.decode_speedup_vs_first(row)
        agreement = row.greedy_agreement_vs_first
        head.append(f"| {row.precision} | {row.provider} | {row.prefill_ms_p50} | {row.decode_tokens_per_s} | "
                    f"{'–' if speedup is None else speedup} | {'reference' if agreement is None else agreement} |")
    head += ["", "| hidden-state capture | engines | setting | prompt / new tokens | with capture ms | generate + forward ms "
                 "| ratio | target |", "|---|---|---|---:|---:|---:|---:|---|"]
    for name, c in report.policy.capture.items():
        head.append(f"| {name} | {c.engines} | {CAPTURE_SETTINGS[c.setting]} | {c.prompt_tokens} / {c.new_tokens} | "
                    f"{c.generate_with_capture_ms} | {c.generate_then_forward_ms} | {c.ratio} | "
                    f"{'met' if c.meets_target else 'NOT met'} (≤ {CAPTURE_TARGET}) |")
    return "\n".join(head)


def plot_routes(report: RoutesBenchReport, png: str | Path) -> Path:
    """Stacked bars of p50 per stage for each route (PNG, written atomically)."""
    return plot_stages(report.routes, f"{report.subject.model} @ {report.subject.image_size}px, {report.provider}",
                       "p50 latency (ms)", png)
