"""Video benchmark: tracking vs re-segmenting every frame, per stage, and J&F per concept level.

Speed (one run, the series interleaved frame by frame so they see the same machine load):

- ``track_prompt``: a tracked frame of an object started from a box (encoder, memory attention,
  decoder, memory encoder), against ``prompt_every_frame``: the prompt route on every frame with that
  frame's box (encoder + decoder). Target: a tracked frame ≤ ``TRACK_TARGET`` × the prompt route.
- ``track_concept``: every frame of a clip tracked from a concept query that routes to ``reason``
  (frame 0 runs the policy, later frames only track, plus any re-fire), against ``reason_every_frame``:
  the reason route on every frame. Target: the clip's mean ≤ ``CONCEPT_TARGET`` × reason's mean.
- ``refire``: a tracker whose threshold forces a re-fire on every frame; the cost of a re-fire is the
  ``route`` stage (the router on the frame, features reused) plus the mask's decoder and memory runs.

Accuracy: J&F (DAVIS) per concept level over VideoWorld clips of every kind, tracked from the concept
query, next to the router on every frame (a baseline tracking has to beat to be worth its memory).
A prompt-only bundle (``export sam2 --video``) gets the first pair alone. Each series records the
provider that ran it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.benchmarks.policy import BENCH_GENERATION
from conceptseg_edge.benchmarks.stats import BenchedBundle, StageSeries, all_stable, environment, plot_stages, stability_note
from conceptseg_edge.data.video_world import KINDS, VideoWorld
from conceptseg_edge.episodes import box_from_mask
from conceptseg_edge.errors import BenchmarkError
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.metrics import JFScores, jf_sequence
from conceptseg_edge.runtime.engine import engine_factory_for
from conceptseg_edge.runtime.providers import ProviderChoice, provider_note, provider_record
from conceptseg_edge.runtime.segmenter import ConceptSegmenter
from conceptseg_edge.runtime.tracker import ObjectPrompt, TrackerConfig, VideoSegmenter

TRACK_TARGET = 1.5  # a tracked frame vs the prompt route on that frame (issue P11)
CONCEPT_TARGET = 0.3  # a concept clip's mean frame vs the reason route on every frame
SPEED_KIND = "colour change"  # a CR query (7 words): the router sends it to reason
FRAME_SIZE = 256
TIMING_SCOPE = "end-to-end per frame on host: preprocess, encoder, memory, decoder, postprocess, router when it runs"


@dataclass(frozen=True)
class VideoBenchConfig(ProviderChoice):
    frames: int = 30  # frames per clip (VideoWorld's minimum is 12)
    runs: int = 2  # passes over the speed clip
    accuracy_seeds: int = 1  # VideoWorld seeds for J&F (one clip of every kind per seed)
    generation: GenerationConfig = BENCH_GENERATION  # the reason route's budget, as the routes benchmark's

    def __post_init__(self) -> None:
        if self.frames < 12 or self.runs < 1 or self.accuracy_seeds < 0:
            raise BenchmarkError("setup", f"frames {self.frames} (>= 12), runs {self.runs} (>= 1), "
                                 f"accuracy_seeds {self.accuracy_seeds} (>= 0)")


@dataclass(frozen=True)
class VideoBenchReport:
    subject: BenchedBundle
    provider_requested: str
    providers: Mapping[str, str]
    frames: int
    runs: int
    series: Mapping[str, StageSeries]
    refire_routes: Mapping[str, int]  # route the forced re-fires took → count
    accuracy: Mapping[str, Mapping[str, float]]  # level → {"track": J&F, "router_every_frame": J&F, "clips": n}
    environment: Mapping[str, Any] = field(default_factory=dict)

    @property
    def track_over_prompt_p50(self) -> float:
        return round(self.series["track_prompt"].total.p50 / self.series["prompt_every_frame"].total.p50, 3)

    @property
    def concepts(self) -> bool:
        """Whether the concept series ran (a bundle with the reason route)."""
        return "track_concept" in self.series

    @property
    def concept_clip_over_reason_mean(self) -> float | None:
        if not self.concepts:
            return None
        return round(self.series["track_concept"].total.mean / self.series["reason_every_frame"].total.mean, 3)

    @property
    def memory_attention_share(self) -> float:
        """Memory attention's share of a tracked frame (p50 over p50)."""
        s = self.series["track_prompt"]
        return round(s.p50("memory_attention") / s.total.p50, 3)

    @property
    def refire_ms_p50(self) -> float | None:
        """A re-fire's extra cost: a forced re-fire frame minus a plain tracked frame (p50s)."""
        if not self.concepts:
            return None
        return round(self.series["refire"].total.p50 - self.series["track_prompt"].total.p50, 3)

    @property
    def stable(self) -> bool | None:
        return all_stable(s.stable for s in self.series.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "video", "timing_scope": TIMING_SCOPE, **self.subject.to_json(),
            **provider_record(self.provider_requested, self.providers),
            "frames": self.frames, "runs": self.runs,
            "series": {name: s.to_json() for name, s in self.series.items()},
            "track_over_prompt_p50": self.track_over_prompt_p50, "track_target": TRACK_TARGET,
            "track_target_met": self.track_over_prompt_p50 <= TRACK_TARGET,
            "concept_clip_over_reason_mean": self.concept_clip_over_reason_mean, "concept_target": CONCEPT_TARGET,
            "concept_target_met": None if not self.concepts else self.concept_clip_over_reason_mean <= CONCEPT_TARGET,
            "memory_attention_share": self.memory_attention_share,
            "refire_ms_p50": self.refire_ms_p50, "refire_routes": dict(self.refire_routes),
            "accuracy_jf": {level: dict(v) for level, v in self.accuracy.items()},
            "stable": self.stable, "environment": dict(self.environment),
        }  # fmt: skip


def bench_video(bundle: str | Path, cfg: VideoBenchConfig = VideoBenchConfig(), progress: bool = True) -> VideoBenchReport:
    """Time and score tracking on ``bundle`` (exported with ``--video``; the concept series need its reason route)."""
    manifest = load_bundle(bundle)
    concepts = "reason" in manifest.routes
    factory = engine_factory_for(cfg.provider_config, manifest)

    def tracker(config: TrackerConfig = TrackerConfig()) -> VideoSegmenter:
        return VideoSegmenter.from_bundle(bundle, cfg.provider, config=config, engine_factory=factory, generation=cfg.generation)

    world = VideoWorld(seed=0, image_size=FRAME_SIZE, length=cfg.frames)
    clip = world.clip(world.index_of(SPEED_KIND))
    target = clip.target_masks()
    mover = max(clip.masks, key=lambda k: int(clip.masks[k].any(axis=(1, 2)).sum()))  # the object in view longest
    boxes = [box_from_mask(m) if m.any() else None for m in clip.masks[mover]]
    first = next(i for i, b in enumerate(boxes) if b is not None)
    per_frame = ConceptSegmenter.from_bundle(bundle, cfg.provider, generation=cfg.generation, engine_factory=factory,
                                             manifest=manifest)
    names = ("track_prompt", "prompt_every_frame") + (("track_concept", "reason_every_frame", "refire") if concepts else ())
    samples: dict[str, list[Mapping[str, float]]] = {k: [] for k in names}
    refire_routes: dict[str, int] = {}
    rounds = tqdm(total=cfg.runs * (len(clip) - first), desc="video bench frames", disable=not progress, unit="frame")
    for _ in range(cfg.runs):
        boxed = tracker().stream()
        boxed.add_object(ObjectPrompt(box=tuple(boxes[first])))
        if concepts:
            concept, forced = tracker().stream(), tracker(TrackerConfig(lost_threshold=0.999, lost_frames=1)).stream()
            concept.add_object(ObjectPrompt(concept=clip.query))
            forced.add_object(ObjectPrompt(concept=clip.query))
        for t in range(first, len(clip)):
            frame = clip.frames[t]
            tracked = boxed.add_frame(frame)
            if t > first:
                samples["track_prompt"].append(tracked.timings)
            box = boxes[t] if boxes[t] is not None else boxes[first]
            samples["prompt_every_frame"].append(_fresh(per_frame, lambda s: s.segment(frame, box=list(box))))
            rounds.update()
            if not concepts:
                continue
            samples["track_concept"].append(concept.add_frame(frame).timings)
            samples["reason_every_frame"].append(_fresh(per_frame, lambda s: s.segment(frame, query=clip.query, route="reason")))
            refired = forced.add_frame(frame)
            if t > first:
                samples["refire"].append(refired.timings)
                for event in refired.events:
                    if event.kind == "refire":
                        refire_routes[event.route] = refire_routes.get(event.route, 0) + 1
    rounds.close()
    scorer = tracker()  # one load serves the J&F clips and the provider record
    accuracy = _accuracy(scorer, per_frame, cfg, progress) if concepts else {}
    return VideoBenchReport(
        subject=BenchedBundle.of(bundle, manifest, clip.size),
        provider_requested=cfg.provider,
        providers=scorer.providers(),
        frames=len(clip),
        runs=cfg.runs,
        series={name: StageSeries.from_samples(s) for name, s in samples.items()},
        refire_routes=refire_routes,
        accuracy=accuracy,
        environment=environment(),
    )


def _fresh(seg: ConceptSegmenter, call: Callable[[ConceptSegmenter], Any]) -> Mapping[str, float]:
    seg.reset()
    return call(seg).timings


def _accuracy(video: VideoSegmenter, per_frame: ConceptSegmenter, cfg: VideoBenchConfig, progress: bool) -> dict[str, dict[str, float]]:
    """J&F per level: each clip tracked from its query, and the router run on every frame alone."""
    scores: dict[str, dict[str, list[JFScores]]] = {}
    clips = [(seed, kind) for seed in range(cfg.accuracy_seeds) for kind in KINDS]
    for seed, kind in tqdm(clips, desc="video J&F clips", disable=not progress, unit="clip"):
        world = VideoWorld(seed=seed, image_size=FRAME_SIZE, length=cfg.frames)
        clip = world.clip(world.index_of(kind))
        gt = list(clip.target_masks())
        tracked = [r.objects[1].mask for r in video.track(clip.frames, {1: ObjectPrompt(concept=clip.query)})]
        routed = [_routed(per_frame, f, clip.query) for f in clip.frames]
        level = scores.setdefault(clip.level, {"track": [], "router_every_frame": []})
        level["track"].append(jf_sequence(tracked, gt))
        level["router_every_frame"].append(jf_sequence(routed, gt))
    return {level: {"track": round(JFScores.mean(s["track"]).jf_mean, 4),
                    "router_every_frame": round(JFScores.mean(s["router_every_frame"]).jf_mean, 4),
                    "clips": len(s["track"])} for level, s in scores.items()}


def _routed(seg: ConceptSegmenter, frame: np.ndarray, query: str) -> np.ndarray:
    seg.reset()
    return seg.segment(frame, query=query).mask


def render_video_table(report: VideoBenchReport) -> str:
    """Markdown: per series p50 per stage; the targets; J&F per level."""
    stages = ("encoder", "route", "concept_tokens", "policy_decode", "memory_attention", "decoder", "memory_encoder")
    lines = [f"video · {report.subject.model} @ {report.subject.image_size}px · "
             f"{provider_note(report.provider_requested, report.providers)} · {report.frames}-frame clip × {report.runs}"
             + stability_note(report.stable), "",
             "| series | p50 ms | mean ms | " + " | ".join(stages) + " |", "|---|---:|---:|" + "---:|" * len(stages)]
    for name, s in report.series.items():
        lines.append(f"| {name} | {s.total.p50:.1f} | {s.total.mean:.1f} | " + " | ".join(f"{s.p50(k):.1f}" for k in stages) + " |")
    met = {True: "met", False: "NOT met"}
    lines += ["", f"tracked frame / prompt route p50: {report.track_over_prompt_p50} (target ≤ {TRACK_TARGET}: "
                  f"{met[report.track_over_prompt_p50 <= TRACK_TARGET]}); memory attention {report.memory_attention_share:.1%} of a tracked frame"]
    if report.concepts:
        lines.append(f"concept clip mean / reason every frame mean: {report.concept_clip_over_reason_mean} (target ≤ {CONCEPT_TARGET}: "
                     f"{met[report.concept_clip_over_reason_mean <= CONCEPT_TARGET]}); a re-fire adds {report.refire_ms_p50} ms p50 "
                     f"(routes {dict(report.refire_routes)})")
    else:
        lines.append("concept series not run: the bundle has no reason route (export concept --video)")
    if report.accuracy:
        lines += ["", "| level | clips | J&F tracked | J&F router every frame |", "|---|---:|---:|---:|"]
        for level in sorted(report.accuracy):
            a = report.accuracy[level]
            lines.append(f"| {level} | {a['clips']} | {a['track']:.3f} | {a['router_every_frame']:.3f} |")
    return "\n".join(lines)


def plot_video(report: VideoBenchReport, png: str | Path) -> Path:
    """Stacked p50 per stage for each series (PNG, written atomically)."""
    title = f"tracking vs per-frame routes · {report.subject.model} @ {report.subject.image_size}px"
    return plot_stages(report.series, title, "p50 ms per frame", png)
