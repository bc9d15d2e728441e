"""``conceptseg-edge demo``: the embedded ConceptSeg-Tiny bundle on held-out ConceptWorld samples.

What a newcomer sees after ``make demo``: for a few CI, CD and CR samples the torch-free runtime picks
a route (shortcut or reason; plus one box prompt for the prompt route), and the demo prints each
sample's query, route, foreground IoU against the ground truth and per-stage latency, then the
latency per route. It writes ``demo.json`` (everything printed) and ``grid.png`` (per sample: the
input with its supports, the ground truth, the prediction).

The samples come from ConceptWorld indices no training stage, calibration or held-out report uses
(``SAMPLE_OFFSET`` on), at the bundle's training image size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.data.meta import LEVELS
from conceptseg_edge.errors import InputError
from conceptseg_edge.cli.providers import add_provider_arguments, provider_choice
from conceptseg_edge.runtime.providers import ProviderChoice, provider_note, provider_record
from conceptseg_edge.timings import elapsed_ms

#: The committed ConceptSeg-Tiny bundle (``conceptseg-edge train tiny-default`` writes it).
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "assets" / "conceptseg_tiny"
#: Training uses ConceptWorld indices < 300 000, the report 1 000 000+, calibration 2 000 000+.
SAMPLE_OFFSET = 3_000_000


@dataclass(frozen=True)
class DemoConfig(ProviderChoice):
    """What the demo runs. ``image_size`` None: the bundle's own preprocessing size."""

    per_level: int = 3
    seed: int = 0
    image_size: int | None = None
    repeats: int = 3  # timed calls per sample (the encoder included each time); the median is reported


@dataclass
class DemoSample:
    level: str
    query: str
    route: str
    reason: str
    iou: float
    latency_ms: float
    timings: dict[str, float]
    completion: str | None
    providers: dict[str, str]  # stage → the provider that ran it


def pick_samples(world: Any, per_level: int) -> list[Any]:
    """The first ``per_level`` episodes of each level with a non-empty mask, from ``SAMPLE_OFFSET`` on."""
    picked: dict[str, list[Any]] = {lv: [] for lv in LEVELS}
    index = SAMPLE_OFFSET
    while any(len(v) < per_level for v in picked.values()):
        if index - SAMPLE_OFFSET > 1000 * per_level:
            raise InputError(f"per_level {per_level}: ConceptWorld did not yield enough samples of every level")
        ep = world.episode(index)
        index += 1
        if ep.mask.any() and len(picked[ep.level]) < per_level:
            picked[ep.level].append(ep)
    return [ep for lv in LEVELS for ep in picked[lv]]


def _timed(fn, repeats: int) -> tuple[Any, float]:
    """The last result and the median wall time (ms) of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        result = fn()
        times.append(elapsed_ms(t0))
    return result, statistics.median(times)


def run_demo(bundle: str | Path = DEFAULT_BUNDLE, out: str | Path | None = None, cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Segment the samples through ``bundle``; write ``demo.json`` and ``grid.png`` under ``out``."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.episodes import box_from_mask
    from conceptseg_edge.manifest import load_bundle
    from conceptseg_edge.metrics import iou
    from conceptseg_edge.runtime.engine import engine_factory_for
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    if cfg.per_level < 1 or cfg.repeats < 1:
        raise InputError(f"per_level {cfg.per_level} / repeats {cfg.repeats}: both must be >= 1")
    bundle = Path(bundle)
    manifest = load_bundle(bundle)
    factory = engine_factory_for(cfg.provider_config, manifest)  # a missing provider is refused before anything loads
    if "reason" not in manifest.routes:
        raise InputError(f"{bundle}: a concept bundle is needed (routes {manifest.routes}); export one with `export concept`")
    segmenter = ConceptSegmenter.from_bundle(bundle, cfg.provider, engine_factory=factory)
    world = ConceptWorld(cfg.seed, cfg.image_size or manifest.preprocessing.image_size)
    episodes = pick_samples(world, cfg.per_level)

    def run(ep, **kwargs):
        def call():
            segmenter.reset()  # every timed call pays the encoder, as a new frame would
            return segmenter.segment(ep.image, **kwargs)
        return _timed(call, cfg.repeats)

    samples, panels = [], []
    for ep in episodes:
        result, ms = run(ep, query=ep.query, supports=ep.supports)
        samples.append(_sample(ep.level, ep.query, result, iou(result.mask, ep.mask), ms))
        panels.append((ep, result, result.box))  # the reason route's <bbox>, drawn on the prediction
    first = episodes[0]  # the prompt route: the ground truth's box as a box prompt
    box = box_from_mask(first.mask)
    result, ms = run(first, box=box)
    samples.append(_sample(first.level, "(box prompt)", result, iou(result.mask, first.mask), ms))
    panels.append((first, result, box))

    report = {
        "bundle": str(bundle),
        "checkpoint": manifest.source.checkpoint,
        "image_size": int(world.size),
        "repeats": cfg.repeats,
        **provider_record(cfg.provider, segmenter.providers()),
        "samples": [vars(s) for s in samples],
        "by_route": _summarise(samples, "route"),
        "by_level": _summarise([s for s in samples if s.query != "(box prompt)"], "level"),
    }
    if out is not None:
        from conceptseg_edge.fileio import write_json
        from conceptseg_edge.visualize import save_png

        out = Path(out)
        write_json(out / "demo.json", report)
        save_png(out / "grid.png", render_grid(panels, samples))
        report["files"] = [str(out / "demo.json"), str(out / "grid.png")]
    return report


def _sample(level: str, query: str, result: Any, score: float, ms: float) -> DemoSample:
    return DemoSample(level, query, result.route, result.reason, round(score, 4), round(ms, 2),
                      {k: round(v, 2) for k, v in result.timings.to_dict().items()}, result.completion,
                      result.timings.provider_map())


def _summarise(samples: list[DemoSample], key: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[DemoSample]] = {}
    for s in samples:
        groups.setdefault(getattr(s, key), []).append(s)
    return {k: {"n": len(v), "fg_iou": round(float(np.mean([s.iou for s in v])), 4),
                "latency_ms_p50": round(statistics.median(s.latency_ms for s in v), 2)} for k, v in groups.items()}


def render_grid(panels: list[tuple[Any, Any, Any]], samples: list[DemoSample], scale: int = 2) -> np.ndarray:
    """One row per sample: input (supports below it, small), ground truth, prediction (with its box
    prompt, if any, in green); a caption above each row and column titles on top."""
    from PIL import Image, ImageDraw

    from conceptseg_edge.preprocess import Prompts
    from conceptseg_edge.visualize import overlay

    size = panels[0][0].image.shape[0] * scale
    caption, thumbs, pad = 28, size // 4, 8
    row_h = caption + size + thumbs
    grid = Image.new("RGB", (3 * size + 4 * pad, len(panels) * row_h + 2 * pad + 12), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("input (supports below)", "ground truth", "prediction")):
        draw.text((pad + c * (size + pad), pad), title, fill=(0, 0, 0))
    for r, ((ep, result, box), s) in enumerate(zip(panels, samples)):
        top = 2 * pad + 12 + r * row_h
        draw.text((pad, top), f"{s.level} | {s.query[:60]}", fill=(0, 0, 0))
        draw.text((pad, top + 12), f"route {s.route} | IoU {s.iou:.2f} | {s.latency_ms:.0f} ms", fill=(60, 60, 60))
        drawn = Prompts(None, None, np.asarray(box, np.float32)) if box is not None else None
        tiles = (ep.image, overlay(ep.image, ep.mask), overlay(ep.image, result.mask, drawn))
        for c, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (pad + c * (size + pad), top + caption))
        for k, sup in enumerate(ep.supports[:4] if s.query != "(box prompt)" else ()):
            thumb = Image.fromarray(sup.image).resize((thumbs - 2, thumbs - 2), Image.BILINEAR)
            grid.paste(thumb, (pad + k * thumbs, top + caption + size + 1))
    return np.asarray(grid)


def render_demo_table(report: dict[str, Any]) -> str:
    """The markdown the CLI prints: one line per sample, then latency and IoU per route."""
    lines = [f"provider: {provider_note(report['provider_requested'], report['providers'])}", "",
             "| level | query | route | fg IoU | ms | stages (ms) |", "|---|---|---|---|---|---|"]
    for s in report["samples"]:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in s["timings"].items() if "tokens" not in k)
        lines.append(f"| {s['level']} | {s['query'][:48]} | {s['route']} | {s['iou']:.3f} | {s['latency_ms']:.1f} | {stages} |")
    lines += ["", "| route | n | fg IoU | p50 ms |", "|---|---|---|---|"]
    for route, v in report["by_route"].items():
        lines.append(f"| {route} | {v['n']} | {v['fg_iou']:.3f} | {v['latency_ms_p50']:.1f} |")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="segment CI/CD/CR samples with the embedded default; table + overlay grid")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="a concept bundle (default: the embedded ConceptSeg-Tiny)")
    parser.add_argument("--out", default="out/demo", help="writes demo.json and grid.png here")
    parser.add_argument("--per-level", type=int, default=3, help="samples per concept level (CI, CD, CR)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per sample; the median is reported")
    add_provider_arguments(parser)
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from conceptseg_edge.fileio import writable_output

    cfg = DemoConfig(per_level=args.per_level, repeats=args.repeats, **provider_choice(args))
    writable_output(args.out, "--out", directory=True)
    report = run_demo(args.bundle, args.out, cfg)
    print(render_demo_table(report))
    if Path(args.bundle).resolve() == DEFAULT_BUNDLE:
        print(f"\n{args.per_level} samples per level; ConceptSeg-Tiny's held-out report over 60 episodes, per level "
              "and route: docs/conceptseg_tiny_report.md")
    print("\nwrote " + ", ".join(report["files"]))
    return 0
