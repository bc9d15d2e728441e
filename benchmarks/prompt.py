"""Prompt-route benchmark: the runtime per stage, and optionally PyTorch eager side by side.

Timing scope: end to end on one image and one click — numpy preprocessing, encoder, decoder,
postprocessing (upsample + threshold) — on this host, no device transfers. Warm-up runs are kept
out of the statistics. With ``compare_torch`` the eager reference (sam2's modules with torch pre/post
processing) is timed **in the same process, interleaved run by run**, so both see the same machine
load and the ratios are meaningful.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from conceptseg_edge.benchmarks.reference import is_concept_bundle, torch_checkpoint
from conceptseg_edge.benchmarks.stats import (
    BenchedBundle,
    StageSeries,
    environment,
    p50_ratio,
    peak_rss_mb,
    stability_note,
)
from conceptseg_edge.manifest import BundleManifest, load_bundle
from conceptseg_edge.runtime.providers import ProviderChoice, provider_note, provider_record
from conceptseg_edge.timings import describe_providers

STAGES = ("preprocess", "encoder", "decoder", "postprocess")


@dataclass(frozen=True)
class BenchConfig(ProviderChoice):
    runs: int = field(default=10, metadata={"help": "timed runs per series"})
    warmup: int = field(default=2, metadata={"help": "untimed warm-up runs"})
    compare_torch: bool = field(default=False, metadata={"help": "time PyTorch eager in the same run"})
    checkpoint: str | None = field(default=None, metadata={"help": "torch weights instead of the bundle's recorded ones"})


def bench_image(size_hw: tuple[int, int] = (480, 640), seed: int = 0) -> np.ndarray:
    """A fixed textured test image (latency does not depend on content for these graphs)."""
    rng = np.random.default_rng(seed)
    return (rng.random((*size_hw, 3)) * 255).astype(np.uint8)


def _torch_runner(manifest: BundleManifest, checkpoint: Path | None):
    """One prompt-route call of the eager reference (upsampling all three masks, as SAM2 does).

    A concept bundle's prompt route is its SAM2 backbone: the one its checkpoint names.
    """
    import torch

    from conceptseg_edge.models.sam2 import SAM2Reference, build_sam2_model

    if is_concept_bundle(manifest):
        from conceptseg_edge.models.checkpoint import load_checkpoint

        backbone = load_checkpoint(checkpoint).backbone
        loaded = build_sam2_model(backbone.config, backbone.checkpoint, backbone.image_size)
    else:
        loaded = build_sam2_model(manifest.source.model, checkpoint, manifest.preprocessing.image_size)
    ref = SAM2Reference(loaded.model)

    def run(image: np.ndarray, point: tuple[float, float]) -> dict[str, float]:
        with torch.no_grad():
            ref.set_image(image)
            return ref.predict(np.array([point]), np.array([1]), multimask_output=True).timings

    return run, loaded.random_init


@dataclass(frozen=True)
class PromptBenchReport:
    """The prompt-route benchmark: the runtime per stage and, with ``compare_torch``, the eager reference."""

    subject: BenchedBundle
    manifest_sha256: Mapping[str, str]  # per part
    provider_requested: str
    providers: Mapping[str, str]  # part → the provider that ran it
    warmup: int
    runs: int
    runtime: StageSeries
    peak_rss_mb: float
    environment: Mapping[str, Any]
    torch: StageSeries | None = None
    torch_random_init: bool = False  # the eager reference timed random weights (no checkpoint)
    ort_session: Mapping[str, Any] | None = None  # the ONNX Runtime session settings the parts were opened with

    route: ClassVar[str] = "prompt"
    timing_scope: ClassVar[str] = ("end-to-end prompt route on host: numpy preprocess + encoder + decoder + "
                                   "postprocess; one click; no device transfers")

    @property
    def provider(self) -> str:
        """The provider that ran (or each one with its parts, if they differ)."""
        return describe_providers(self.providers)

    @property
    def ratio_runtime_over_torch_p50(self) -> dict[str, float]:
        """Runtime p50 / torch p50 per stage and for the total; empty without the torch series."""
        if self.torch is None:
            return {}
        ratios = {k: p50_ratio(self.runtime.stages[k], self.torch.stages[k]) for k in STAGES}
        return {**ratios, "total": p50_ratio(self.runtime.total, self.torch.total)}

    @property
    def stable(self) -> bool | None:
        return self.runtime.stable

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "route": self.route,
            **self.subject.to_json(),
            "manifest_sha256": dict(self.manifest_sha256),
            "timing_scope": self.timing_scope,
            **provider_record(self.provider_requested, self.providers),
            "warmup": self.warmup,
            "runs": self.runs,
            "runtime": self.runtime.to_json(),
            "peak_rss_mb": self.peak_rss_mb,
            "environment": dict(self.environment),
        }
        if self.ort_session is not None:
            out["ort_session"] = dict(self.ort_session)
        if self.torch is not None:
            out["torch"] = self.torch.to_json()
            out["torch_weights"] = "random init (timing only)" if self.torch_random_init else "bundle checkpoint"
            out["ratio_runtime_over_torch_p50"] = self.ratio_runtime_over_torch_p50
        out["stable"] = self.stable
        return out


def bench_prompt_route(bundle: str | Path, cfg: BenchConfig, progress: bool = True) -> PromptBenchReport:
    """Time the prompt route (see ``render_table`` for the table, ``to_json`` for the JSON)."""
    from conceptseg_edge.runtime.engine import engine_factory_for
    from conceptseg_edge.runtime.predictor import SAM2Predictor

    manifest = load_bundle(bundle)
    factory = engine_factory_for(cfg.provider_config, manifest)  # a missing provider is refused before anything loads
    checkpoint = torch_checkpoint(manifest, cfg.checkpoint) if cfg.compare_torch else None  # refused before any timing
    predictor = SAM2Predictor.from_bundle(bundle, provider=cfg.provider, manifest=manifest, engine_factory=factory)
    image = bench_image()
    point = (image.shape[1] * 0.45, image.shape[0] * 0.55)
    torch_run = None
    torch_random = False
    if cfg.compare_torch:
        torch_run, torch_random = _torch_runner(manifest, checkpoint)

    def runtime_once() -> Mapping[str, float]:
        predictor.set_image(image)
        return predictor.predict(points=[point]).timings

    ort_samples: list[Mapping[str, float]] = []
    torch_samples: list[Mapping[str, float]] = []
    total = cfg.warmup + cfg.runs
    for i in tqdm(range(total), desc="bench prompt route", disable=not progress, unit="run"):
        t = runtime_once()
        tt = torch_run(image, point) if torch_run else None
        if i >= cfg.warmup:
            ort_samples.append(t)
            if tt is not None:
                torch_samples.append(tt)

    return PromptBenchReport(
        subject=BenchedBundle.of(bundle, manifest, image.shape[:2]),
        manifest_sha256={name: p.sha256 for name, p in manifest.parts.items()},
        provider_requested=cfg.provider,
        providers=predictor.providers(),
        warmup=cfg.warmup,
        runs=cfg.runs,
        runtime=StageSeries.from_samples(ort_samples, STAGES),
        peak_rss_mb=round(peak_rss_mb(), 1),
        environment=environment(),
        torch=StageSeries.from_samples(torch_samples, STAGES) if torch_samples else None,
        torch_random_init=bool(torch_random),
        ort_session=cfg.provider_config.session.to_json() if any(p.format == "onnx" for p in manifest.parts.values()) else None,
    )


def render_table(report: PromptBenchReport) -> str:
    """Markdown table: one row per stage, runtime percentiles, torch p50 and ratio when present."""
    has_torch = report.torch is not None
    head = "| stage | p50 ms | p90 ms | p99 ms |" + (" torch p50 ms | runtime/torch |" if has_torch else "")
    sep = "|---|---:|---:|---:|" + ("---:|---:|" if has_torch else "")
    rows = [f"route `{report.route}` · {report.subject.model} @ {report.subject.image_size}px · {provider_note(report.provider_requested, report.providers)} · "
            f"{report.runs} runs · peak RSS {report.peak_rss_mb} MB" + stability_note(report.stable),
            "", head, sep]
    ratios = report.ratio_runtime_over_torch_p50
    for stage in (*STAGES, "total"):
        r = report.runtime.total if stage == "total" else report.runtime.stages[stage]
        line = f"| {stage} | {r.p50:.1f} | {r.p90:.1f} | {r.p99:.1f} |"
        if report.torch is not None:
            t = report.torch.total if stage == "total" else report.torch.stages[stage]
            line += f" {t.p50:.1f} | {ratios[stage]:.2f} |"
        rows.append(line)
    return "\n".join(rows)
