"""``train calibrate-router``: fit the shortcut threshold τ per word count on a validation split.

For every validation query of n ≤ ``max_shortcut_words`` words, the checkpoint's own torch pipeline
runs both routes: the shortcut (text-only prefill → CTM → SAM2; its mask and presence score p) and
the reason route (policy generation → CTM + ``<bbox>`` → SAM2). For each τ on ``tau_grid`` a query
skips the policy when p ≥ τ, and its answer is then the shortcut mask, else the reason mask; that
gives, per n,

    accuracy(τ) = mean foreground IoU of the routed masks vs the ground truth
    skip(τ)     = share of queries that skip the policy.

The chosen τ(n) is the smallest τ on the grid (the most skipping) whose accuracy is within
``tolerance`` of the best accuracy any τ reaches: the policy runs only where it buys accuracy. Word
counts without validation queries keep the paper's rule τ = base_tau · growth^(n−1).

The taus are written into the checkpoint's ``router.taus`` by loading and re-saving it through
``save_checkpoint`` (atomic; every file hash in ``config.json`` recomputed, so ``load_checkpoint``
verifies it). Outputs in ``out_dir``: ``calibration.csv`` (n, τ, accuracy, skip), ``calibration.png``,
``calibrate.json`` (the taus, the route mix they give on the split, per level too, accuracy vs
always-reason and always-shortcut, timings).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import writable_output
from conceptseg_edge.generation import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from conceptseg_edge.metrics import iou
from conceptseg_edge.router import RouterConfig, count_words
from conceptseg_edge.train.config import check_types, load_config, require_fraction, require_positive, save_config
from conceptseg_edge.train.items import DataSource, check_source
from conceptseg_edge.train.loop import StageClock, set_threads, stage_output, write_summary

#: Calibration episodes of ConceptWorld start here: apart from training ([0, n)) and from the
#: held-out report (1_000_000 on), so τ is never fitted on the data it is judged on.
CALIB_OFFSET = 2_000_000
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(21)) + (1.01,)


@dataclass
class CalibrateDataConfig:
    source: DataSource = field(default="world", metadata={"help": "'world' or 'meta'"})
    root: str | None = None
    split: str = field(default="val", metadata={"help": "meta: the split to calibrate on"})
    seed: int = 0
    image_size: int = 128
    episodes: int = 80
    with_supports: bool = field(default=True, metadata={"help": "the reason route sees the episode's supports"})


@dataclass
class CalibrateConfig:
    checkpoint: str = ""
    out_checkpoint: str | None = field(default=None, metadata={"help": "write here; default: rewrite in place"})
    out_dir: str = "runs/calibrate"
    data: CalibrateDataConfig = field(default_factory=CalibrateDataConfig)
    tau_grid: tuple[float, ...] = DEFAULT_GRID
    tolerance: float = field(default=0.02, metadata={"help": "accuracy (mean IoU) given up for skipping"})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "reason-route generation budget"})
    threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        where = "calibrate"
        check_types(self, where)
        if not self.checkpoint:
            raise InputError(f"{where}.checkpoint: required (the checkpoint directory to calibrate)")
        if not self.tau_grid or any(not isinstance(t, (int, float)) or t < 0 for t in self.tau_grid):
            raise InputError(f"{where}.tau_grid: expected non-negative numbers, got {self.tau_grid!r}")
        require_fraction(where, tolerance=self.tolerance)
        require_positive(where, max_new_tokens=self.max_new_tokens)
        require_positive(f"{where}.data", episodes=self.data.episodes, image_size=self.data.image_size)
        check_source(f"{where}.data", self.data.source, self.data.root)


@dataclass
class Query:
    """One validation query with both routes' outcomes."""

    level: str
    n_words: int
    presence: float
    iou_shortcut: float
    iou_reason: float


def _episodes(cfg: CalibrateConfig):
    """(image, mask, query, level, supports) of the calibration split."""
    d = cfg.data
    if d.source == "world":
        from conceptseg_edge.data.world import ConceptWorld

        world = ConceptWorld(d.seed, d.image_size)
        for i in range(CALIB_OFFSET, CALIB_OFFSET + d.episodes):
            ep = world.episode(i)
            yield ep.image, ep.mask, ep.query, ep.level, ep.supports
        return
    from conceptseg_edge.data.meta import ConceptSegDataset

    dataset = ConceptSegDataset.open(d.root)
    if d.split not in dataset.splits:
        raise InputError(f"{d.root}: no {d.split!r} split to calibrate on (has {sorted(dataset.splits)})")
    rng = np.random.default_rng(d.seed)
    for k, (_, cls_name, index, item) in enumerate(dataset.items(d.split)):
        if k >= d.episodes:
            break
        ep = dataset.load(item)
        supports = ep.supports
        if not supports and d.with_supports:
            from conceptseg_edge.episodes import Support, box_from_mask, choose_supports

            pool = dataset.splits.get("train", {}).get(cls_name, ())
            picked = [dataset.load(pool[j]) for j in choose_supports(len(pool), None, rng)]
            supports = tuple(Support(s.image, box_from_mask(s.mask), s.mask) for s in picked)
        yield ep.image, ep.mask, ep.query, ep.level, supports


def measure(cfg: CalibrateConfig, pipeline) -> tuple[list[Query], dict[str, int]]:
    """Run both routes on every short query of the split; count the long ones (always reason)."""
    from tqdm import tqdm

    router = pipeline.router
    # τ = 0 everywhere: the shortcut is measured as it is, never rejected into a reason run
    forced = pipeline.with_router(RouterConfig(max_shortcut_words=router.max_shortcut_words,
                                               taus={n: 0.0 for n in range(1, router.max_shortcut_words + 1)}))
    queries: list[Query] = []
    long_by_level: dict[str, int] = {}
    for image, mask, query, level, supports in tqdm(list(_episodes(cfg)), desc="calibrate", unit="query",
                                                   disable=not cfg.progress):
        n = count_words(query)
        if not 1 <= n <= router.max_shortcut_words:
            long_by_level[level] = long_by_level.get(level, 0) + 1
            continue
        shortcut = forced(image, query, route="shortcut")
        reason = forced(image, query, supports=supports if cfg.data.with_supports else (), route="reason")
        queries.append(Query(level, n, shortcut.object_score, iou(shortcut.mask, mask), iou(reason.mask, mask)))
    return queries, long_by_level


def sweep(queries: list[Query], grid: tuple[float, ...]) -> dict[int, list[tuple[float, float, float]]]:
    """Per word count: (τ, accuracy, skip share) for every τ on the grid."""
    curves: dict[int, list[tuple[float, float, float]]] = {}
    for n in sorted({q.n_words for q in queries}):
        qs = [q for q in queries if q.n_words == n]
        p = np.array([q.presence for q in qs])
        s = np.array([q.iou_shortcut for q in qs])
        r = np.array([q.iou_reason for q in qs])
        curves[n] = [(float(t), float(np.where(p >= t, s, r).mean()), float((p >= t).mean())) for t in grid]
    return curves


def choose_taus(curves: dict[int, list[tuple[float, float, float]]], tolerance: float) -> dict[int, float]:
    """Per n, the smallest τ whose accuracy is within ``tolerance`` of the best on the grid."""
    taus = {}
    for n, curve in curves.items():
        best = max(acc for _, acc, _ in curve)
        taus[n] = min(t for t, acc, _ in curve if acc >= best - tolerance)
    return taus


def route_mix(queries: list[Query], long_by_level: dict[str, int], router: RouterConfig) -> dict[str, Any]:
    """Share of queries the calibrated router sends to each route, overall and per level, and the
    mean IoU of the routed short-query masks vs always-reason and always-shortcut."""
    from conceptseg_edge.router import accept_shortcut

    def logit(p: float) -> float:
        p = min(max(p, 1e-7), 1 - 1e-7)
        return float(np.log(p / (1 - p)))

    accepted = [accept_shortcut(logit(q.presence), q.n_words, router) for q in queries]
    levels = sorted({q.level for q in queries} | set(long_by_level))
    mix: dict[str, Any] = {}
    for level in [*levels, "all"]:
        sel = [a for q, a in zip(queries, accepted) if level in ("all", q.level)]
        n_long = sum(long_by_level.values()) if level == "all" else long_by_level.get(level, 0)
        total = len(sel) + n_long
        if total:
            mix[level] = {"queries": total, "shortcut": round(sum(sel) / total, 4),
                          "reason": round((total - sum(sel)) / total, 4)}
    routed = [q.iou_shortcut if a else q.iou_reason for q, a in zip(queries, accepted)]
    accuracy = {
        "routed": round(float(np.mean(routed)), 4) if routed else None,
        "always_reason": round(float(np.mean([q.iou_reason for q in queries])), 4) if queries else None,
        "always_shortcut": round(float(np.mean([q.iou_shortcut for q in queries])), 4) if queries else None,
    }
    return {"route_mix": mix, "short_query_fg_iou": accuracy}


def write_curves(out: Path, curves: dict[int, list[tuple[float, float, float]]], taus: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conceptseg_edge.fileio import write_bytes, write_text

    lines = ["n_words,tau,accuracy,skip"]
    lines += [f"{n},{t},{a:.6f},{s:.6f}" for n, curve in curves.items() for t, a, s in curve]
    write_text(out / "calibration.csv", "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, max(1, len(curves)), figsize=(3.6 * max(1, len(curves)), 3.2), squeeze=False)
    for ax, (n, curve) in zip(axes[0], curves.items()):
        t = [c[0] for c in curve]
        ax.plot(t, [c[1] for c in curve], label="accuracy (mean IoU)")
        ax.plot(t, [c[2] for c in curve], label="skips the policy")
        ax.axvline(taus[n], color="k", ls="--", lw=0.8)
        ax.set_title(f"{n} word{'s' if n > 1 else ''}: tau={taus[n]:g}")
        ax.set_xlabel("tau")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(out / "calibration.png", buf.getvalue())


def write_taus(checkpoint: str | os.PathLike[str], out_checkpoint: str | os.PathLike[str] | None,
               taus: dict[int, float]) -> tuple[Path, RouterConfig]:
    """Re-save the checkpoint with ``router.taus`` set (in place unless ``out_checkpoint``)."""
    import dataclasses

    from conceptseg_edge.models.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoint)
    router = dataclasses.replace(ckpt.router, taus=dict(sorted(taus.items())))
    target = Path(out_checkpoint) if out_checkpoint else Path(checkpoint)
    save_checkpoint(target, ckpt.policy, ckpt.ctm, ckpt.processor, router, ckpt.backbone, overwrite=True)
    return target, router


def calibrate_router(cfg: CalibrateConfig, checkpoint: str | None = None) -> dict[str, Any]:
    """Calibrate ``cfg.checkpoint`` (or ``checkpoint``); returns the summary written to calibrate.json."""
    import dataclasses

    import torch

    from conceptseg_edge.models.pipeline import ConceptSegPipeline

    if checkpoint is not None:
        cfg = dataclasses.replace(cfg, checkpoint=str(checkpoint))
    cfg.validate()
    if cfg.out_checkpoint:
        writable_output(cfg.out_checkpoint, "calibrate.out_checkpoint", directory=True)
    # nothing here resumes: a failed first run leaves no out_dir; config.yaml is written with the outputs
    with stage_output(cfg.out_dir, "calibrate.out_dir", resumable=lambda _: False) as out:
        set_threads(cfg.threads)
        clock = StageClock()
        # float32, as the exported graphs that will serve these thresholds compute (a retargeted bf16 release too)
        pipeline = ConceptSegPipeline.from_checkpoint(cfg.checkpoint, GenerationConfig(cfg.max_new_tokens),
                                                      dtype=torch.float32)
        queries, long_by_level = measure(cfg, pipeline)
        if not queries:
            raise InputError(f"calibrate.data: no queries of 1..{pipeline.router.max_shortcut_words} words to calibrate on")
        curves = sweep(queries, cfg.tau_grid)
        taus = choose_taus(curves, cfg.tolerance)
        target, router = write_taus(cfg.checkpoint, cfg.out_checkpoint, taus)
        write_curves(out, curves, taus)
        save_config(out / "config.yaml", cfg)
        summary = {
            "checkpoint": str(target),
            "taus": {str(n): t for n, t in sorted(taus.items())},
            "queries_per_word_count": {str(n): sum(q.n_words == n for q in queries) for n in sorted(curves)},
            **route_mix(queries, long_by_level, router),
            "tolerance": cfg.tolerance,
            "time": clock.elapsed(),
        }
        write_summary(out / "calibrate.json", summary)
    return summary


def run_calibrate(config_path: str | os.PathLike[str], checkpoint: str | None = None) -> dict[str, Any]:
    """CLI entry."""
    return calibrate_router(load_config(config_path, CalibrateConfig), checkpoint)
