"""ConceptSeg-Tiny, the embedded default: this repo's whole training recipe on ConceptWorld, on CPU.

One command::

    conceptseg-edge train tiny-default --out runs/tiny [--bundle conceptseg_edge/assets/conceptseg_tiny]

runs, with the YAMLs in ``train/configs/tiny/``:

1. ``backbone``  pretrain the ``conceptseg_tiny`` SAM2 (128 px) on ConceptWorld prompts;
2. ``warmstart`` build a random-init tiny Qwen2.5-VL and teach it the tag format (supervised
   fine-tuning on template completions), the stand-in for an instruction-tuned policy;
3. ``stage1``    train the CTM of that frozen policy through the frozen SAM2;
4. ``stage2``    Meta-GRPO (``conceptseg_edge.train.stage2.run_stage2``), policy + CTM;
5. ``calibrate`` fit the router's τ per word count, written into ``OUT/checkpoint``;
6. ``export``    ``export_concept`` → ``OUT/bundle`` (ONNX graphs, parity-checked route by route),
   with ``export.yaml``'s policy precision and weight storage; ``--bundle`` copies it there atomically;
7. ``report``    held-out foreground IoU per level (CI/CD/CR) and per route the router took, against
   baselines it can lose to (each route forced alone, the policy's box, the whole image), run
   through the exported torch-free bundle (through the torch pipeline with ``--no-export``);
   warmstart's held-out format rate; stage 2's held-out reward next to stage 1's; the route mix
   after calibration; wall and CPU seconds per stage; the commit
   (``git describe --dirty``) and command that produced it. Written to ``OUT/report.json`` and
   ``OUT/report.md``, the page ``docs/conceptseg_tiny_report.md`` copies from the run that trained
   the committed bundle.

Each stage writes its own directory (metrics.csv, curves.png, a JSON summary); a rerun with the same
``--out`` resumes the stage that was interrupted and skips the finished ones (their summaries are
kept). Stage paths inside the YAMLs are placeholders the run replaces with ``OUT/<stage>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from conceptseg_edge.episodes import Support
from conceptseg_edge.errors import InputError
from conceptseg_edge.fileio import staged_dir, write_text
from conceptseg_edge.generation import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from conceptseg_edge.data.meta import LEVELS
from conceptseg_edge.manifest import MANIFEST_NAME, produced_by
from conceptseg_edge.router import AUTO, RouterConfig
from conceptseg_edge.train.items import VAL_OFFSET
from conceptseg_edge.train.loop import StageClock, write_summary

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "tiny"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _config(configs: Path, name: str) -> Path:
    path = configs / name
    if not path.is_file():
        raise InputError(f"{path}: missing (tiny-default reads backbone/warmstart/stage1/stage2/calibrate/export/report "
                         f".yaml from {configs})")
    return path


@dataclasses.dataclass
class ReportConfig:
    """The final held-out report (``report.yaml``)."""

    seed: int = 0
    image_size: int = 128
    episodes: int = 60
    with_supports: bool = True
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


class Segment(Protocol):
    """A route-forcing segmenter: ``ConceptSegmenter.segment`` or a ``ConceptSegPipeline``."""

    def __call__(self, image: np.ndarray, *, query: str, supports: Sequence[Support], route: str) -> Any:
        """A result with ``mask``, ``route`` and ``box`` (the reason route's box in image pixels, or None)."""


#: Thresholds under which the shortcut keeps every mask, whatever the query's length: a forced shortcut
#: under the calibrated router still falls back to reason when rejected, so it is no "shortcut only".
SHORTCUT_ALONE = RouterConfig(base_tau=0.0, max_shortcut_words=1 << 16)


#: The held-out table's columns: the router's result, then the baselines it can lose to.
BASELINES = {"shortcut_only": "shortcut only", "reason_only": "reason only", "policy_box": "policy box",
             "whole_image": "whole image"}


def _box_mask(box: tuple[float, float, float, float] | None, shape: tuple[int, int]) -> np.ndarray:
    """The filled box (image pixels, exclusive corners) as a mask; empty without a box."""
    mask = np.zeros(shape, bool)
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return mask


def evaluate_default(segment: Segment, shortcut_alone: Segment, cfg: ReportConfig, progress: bool = True) -> dict[str, Any]:
    """Held-out foreground IoU of ``segment``'s routed result per level and per route taken, next to
    baselines on the same items that it can lose to: each route alone (shortcut only through
    ``shortcut_alone``, a segmenter under ``SHORTCUT_ALONE``; reason only), the
    box from the policy's ``<bbox>`` filled as a mask (what the policy localised without SAM2), and
    the whole image. (An empty mask is no baseline here: the items are filtered to non-empty masks,
    so it scores 0 by construction.)"""
    from tqdm import tqdm

    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.metrics import iou

    world = ConceptWorld(cfg.seed, cfg.image_size)
    rows: list[dict[str, Any]] = []
    for i in tqdm(range(VAL_OFFSET, VAL_OFFSET + cfg.episodes), desc="report", unit="episode", disable=not progress):
        ep = world.episode(i)
        if not ep.mask.any():
            continue
        supports = ep.supports if cfg.with_supports else ()
        routed = segment(ep.image, query=ep.query, supports=supports, route=AUTO)
        forced = {r: routed if routed.route == r else alone(ep.image, query=ep.query, supports=supports, route=r)
                  for r, alone in (("shortcut", shortcut_alone), ("reason", segment))}
        rows.append({"level": ep.level, "route": routed.route, "fg_iou": iou(routed.mask, ep.mask),
                     "shortcut_only": iou(forced["shortcut"].mask, ep.mask), "reason_only": iou(forced["reason"].mask, ep.mask),
                     "policy_box": iou(_box_mask(forced["reason"].box, ep.mask.shape), ep.mask),
                     "whole_image": iou(np.ones_like(ep.mask), ep.mask)})

    def summary(sel: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(sel), **{k: round(float(np.mean([r[k] for r in sel])), 4) for k in ("fg_iou", *BASELINES)}}

    by_level = {lv: summary([r for r in rows if r["level"] == lv]) for lv in LEVELS if any(r["level"] == lv for r in rows)}
    by_route = {rt: summary([r for r in rows if r["route"] == rt]) for rt in sorted({r["route"] for r in rows})}
    by_level_route = {
        f"{lv}/{rt}": summary(sel)
        for lv in LEVELS for rt in ("shortcut", "reason")
        if (sel := [r for r in rows if r["level"] == lv and r["route"] == rt])
    }
    return {"all": summary(rows), "by_level": by_level, "by_route": by_route, "by_level_route": by_level_route}


def _command(out: Path, configs: Path, bundle: str | os.PathLike[str] | None, stage2: bool, export: bool) -> str:
    """The ``conceptseg-edge`` command line equivalent to this run, paths relative to the working directory."""
    def rel(p: str | os.PathLike[str]) -> str:
        return os.path.relpath(p) if Path(p).resolve().is_relative_to(Path.cwd()) else str(p)

    parts = ["conceptseg-edge train tiny-default --out", rel(out)]
    if Path(configs).resolve() != CONFIG_DIR:
        parts += ["--configs", rel(configs)]
    if bundle is not None:
        parts += ["--bundle", rel(bundle)]
    parts += [flag for flag, on in (("--skip-stage2", not stage2), ("--no-export", not export)) if on]
    return " ".join(parts)


def _stage_time(summary: dict[str, Any] | None) -> dict[str, float] | None:
    if not summary:
        return None
    t = summary.get("time", {})
    return t.get("total", t) if isinstance(t, dict) else None


@dataclasses.dataclass(frozen=True)
class TinyStages:
    """Every stage's config of one run, as the stages will run it (the run's paths filled in)."""

    backbone: Any  # BackboneConfig
    warmstart: Any  # WarmstartConfig
    stage1: Any  # Stage1Config
    stage2: Any | None  # Stage2Config; None with --skip-stage2
    calibrate: Any  # CalibrateConfig
    export: Any | None  # ConceptExportConfig; None with --no-export
    report: ReportConfig


def stage_configs(out: Path, configs: Path, *, stage2: bool, export: bool, progress: bool) -> TinyStages:
    """Every stage's config for a run into ``out``: read from ``configs`` with ``load_config``, the
    paths the run chains (``OUT/<stage>``, each stage's input checkpoint) filled in, and validated,
    all before the first stage runs, so a bad value in report.yaml is an error now, not after an
    hour of training."""
    from conceptseg_edge.train.backbone import BackboneConfig
    from conceptseg_edge.train.calibrate import CalibrateConfig
    from conceptseg_edge.train.config import load_config
    from conceptseg_edge.train.stage1 import Stage1Config
    from conceptseg_edge.train.warmstart import WarmstartConfig

    def read(name: str, cls: type) -> Any:
        return load_config(_config(configs, f"{name}.yaml"), cls)

    bb = dataclasses.replace(read("backbone", BackboneConfig), out_dir=str(out / "backbone"), progress=progress)
    ws = dataclasses.replace(read("warmstart", WarmstartConfig), out_dir=str(out / "warmstart"), progress=progress)
    s1 = dataclasses.replace(
        read("stage1", Stage1Config), out_dir=str(out / "stage1"), progress=progress,
        backbone_config=bb.sam2_config, backbone_checkpoint=str(out / "backbone" / "backbone.pt"),
        backbone_image_size=bb.image_size, init_checkpoint=None, policy_path=None,
        policy_checkpoint=str(out / "warmstart" / "checkpoint"),
    )
    policy_ckpt = out / "stage1" / "checkpoint"
    s2 = None
    if stage2:
        from conceptseg_edge.train.stage2 import Stage2Config

        s2 = read("stage2", Stage2Config)
        # Stage 1 trains on world seed 0, episodes [0, n): stage 2's held-out episodes ([m, m + k) of
        # its own world) must come from another world, or "stage 1 vs stage 2" is scored on stage-1
        # training data.
        data = s2.data
        if data.source == "conceptworld" and data.world_seed == s1.data.seed:
            data = dataclasses.replace(data, world_seed=s1.data.seed + 1)
        s2 = dataclasses.replace(s2, stage1_checkpoint=str(policy_ckpt), out_dir=str(out / "stage2"),
                                 progress=progress, data=data)
        policy_ckpt = out / "stage2" / "checkpoint"
    cal = dataclasses.replace(read("calibrate", CalibrateConfig), checkpoint=str(policy_ckpt),
                              out_checkpoint=str(out / "checkpoint"), out_dir=str(out / "calibrate"),
                              progress=progress)
    ex = None
    if export:
        from conceptseg_edge.export.concept import ConceptExportConfig

        ex = dataclasses.replace(read("export", ConceptExportConfig), checkpoint=str(out / "checkpoint"))
    for cfg in (bb, ws, s1, cal):  # stage 2 and export check themselves when built
        cfg.validate()
    return TinyStages(bb, ws, s1, s2, cal, ex, read("report", ReportConfig))


def run_tiny_default(
    out: str | os.PathLike[str],
    *,
    configs: str | os.PathLike[str] | None = None,
    bundle: str | os.PathLike[str] | None = None,
    stage2: bool = True,
    export: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ConceptSeg-Tiny under ``out``; returns the report (also ``out/report.json``).

    Every stage's config is read and checked (``stage_configs``) and ``out`` checked writable before
    the first stage runs; a first run that fails before any stage kept something leaves no ``out``.
    """
    from conceptseg_edge.train.loop import stage_output

    out = Path(out).resolve()
    configs = Path(configs) if configs else CONFIG_DIR
    cfgs = stage_configs(out, configs, stage2=stage2, export=export, progress=progress)
    with stage_output(out, "--out", resumable=lambda p: any(p.iterdir())) as out:
        return _run_stages(out, cfgs, configs, bundle, stage2, export, progress)


def _run_stages(out: Path, cfgs: TinyStages, configs: Path, bundle: str | os.PathLike[str] | None,
                stage2: bool, export: bool, progress: bool) -> dict[str, Any]:
    """``run_tiny_default`` once everything is checked: each stage in turn, skipping finished ones.

    The commit is read before the first stage: with ``bundle`` the run itself rewrites tracked files
    (the embedded bundle), which must not make the report call its own checkout dirty.
    """
    commit = produced_by()
    from conceptseg_edge.train.backbone import train_backbone
    from conceptseg_edge.train.calibrate import calibrate_router
    from conceptseg_edge.train.config import save_config
    from conceptseg_edge.train.stage1 import train_stage1
    from conceptseg_edge.train.warmstart import train_warmstart

    times: dict[str, Any] = {}

    def step_stage(name: str, cfg: Any, train: Any) -> dict[str, Any]:
        """Run one step-loop stage into ``out/name`` unless its summary says it finished."""
        summary = _read_json(out / name / f"{name}.json")
        if summary is None:
            summary = train(cfg).summary
        times[name] = _stage_time(summary)
        return summary

    # 1. backbone, 2. policy warm start, 3. stage 1 (the CTM of the warm policy through that backbone)
    bb_summary = step_stage("backbone", cfgs.backbone, train_backbone)
    ws_summary = step_stage("warmstart", cfgs.warmstart, train_warmstart)
    s1_summary = step_stage("stage1", cfgs.stage1, train_stage1)

    # 4. stage 2
    s2_report = None
    if cfgs.stage2 is not None:
        from conceptseg_edge.train.stage2 import train_stage2

        s2_dir = Path(cfgs.stage2.out_dir)
        done = _read_json(s2_dir / "tiny_default_stage2.json")
        if done is None:
            clock = StageClock()
            done = {"checkpoint": str(train_stage2(cfgs.stage2)), "time": {"total": clock.elapsed()}}
            write_summary(s2_dir / "tiny_default_stage2.json", done)
        times["stage2"] = _stage_time(done)
        s2_report = _read_json(s2_dir / "eval.json")

    # 5. calibrate the router into OUT/checkpoint
    final_ckpt = Path(cfgs.calibrate.out_checkpoint)
    cal_summary = _read_json(Path(cfgs.calibrate.out_dir) / "calibrate.json")
    if cal_summary is None or not final_ckpt.is_dir():
        cal_summary = calibrate_router(cfgs.calibrate)
    times["calibrate"] = _stage_time(cal_summary)

    # 6. export
    bundle_dir = out / "bundle"
    export_info: dict[str, Any] | None = None
    if cfgs.export is not None:
        from conceptseg_edge.export.concept import export_concept

        ex_cfg = cfgs.export
        if not (bundle_dir / MANIFEST_NAME).is_file():
            clock = StageClock()
            export_concept(ex_cfg, bundle_dir, progress=progress)
            write_summary(out / "export.json", {"time": {"total": clock.elapsed()}})
        times["export"] = _stage_time(_read_json(out / "export.json"))
        size = sum(p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file())
        export_info = {"bundle": str(bundle_dir), "bytes": size, "mb": round(size / 2**20, 2),
                       "policy_precision": ex_cfg.policy_precision, "weight_storage": ex_cfg.weight_storage}
        if bundle is not None:
            with staged_dir(bundle, MANIFEST_NAME, "bundle") as staging:
                shutil.copytree(bundle_dir, staging, dirs_exist_ok=True)
            export_info["copied_to"] = str(bundle)

    # 7. held-out report
    rep_cfg = cfgs.report
    save_config(out / "report.yaml", rep_cfg)
    clock = StageClock()
    if export:
        from conceptseg_edge.runtime.segmenter import ConceptSegmenter

        generation = GenerationConfig(rep_cfg.max_new_tokens)
        segment = ConceptSegmenter.from_bundle(bundle_dir, generation=generation).segment
        shortcut_alone = ConceptSegmenter.from_bundle(bundle_dir, generation=generation, router=SHORTCUT_ALONE).segment

        evaluated_with = "exported bundle, torch-free runtime (ConceptSegmenter)"
    else:
        from conceptseg_edge.models.pipeline import ConceptSegPipeline

        segment = ConceptSegPipeline.from_checkpoint(final_ckpt, GenerationConfig(rep_cfg.max_new_tokens))
        shortcut_alone = segment.with_router(SHORTCUT_ALONE)

        evaluated_with = "torch pipeline (ConceptSegPipeline)"
    heldout = evaluate_default(segment, shortcut_alone, rep_cfg, progress)
    times["report"] = clock.elapsed()
    train_stages = [t for k, t in times.items() if k in ("backbone", "warmstart", "stage1", "stage2", "calibrate") and t]
    report = {
        "produced_by": {"commit": commit, "command": _command(out, configs, bundle, stage2, export)},
        "checkpoint": str(final_ckpt),
        "export": export_info,
        "heldout": {"evaluated_with": evaluated_with, "episodes": rep_cfg.episodes, **heldout},
        "backbone_heldout": bb_summary.get("heldout"),
        "warmstart_heldout": _warmstart_heldout(ws_summary),
        "stage1": {k: s1_summary.get(k) for k in ("loss_first", "loss_last", "loss_first10_mean", "loss_last10_mean", "steps")},
        "stage2_heldout_reward": s2_report,
        "router": {"taus": cal_summary.get("taus"), "route_mix_calibration_split": cal_summary.get("route_mix"),
                   "short_query_fg_iou": cal_summary.get("short_query_fg_iou")},
        "time": times,
        "train_cpu_s": round(sum(t["cpu_s"] for t in train_stages), 1),
        "train_wall_s": round(sum(t["wall_s"] for t in train_stages), 1),
    }
    write_summary(out / "report.json", report)
    write_text(out / "report.md", render_report(report))
    return report


def _warmstart_heldout(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Warmstart's held-out greedy completions: rates overall and per level (samples left out)."""
    heldout = summary.get("heldout")
    return {k: v for k, v in heldout.items() if k != "samples"} if isinstance(heldout, dict) else None


def _route_mix_lines(router: dict[str, Any], heldout: dict[str, Any]) -> list[str]:
    """The route mix after calibration: on the calibration split (per level, shares) and on the
    held-out episodes above (counts)."""
    lines = ["Route mix after calibration:", "", "| split | queries | shortcut | reason |", "|---|---|---|---|"]
    for level, row in (router.get("route_mix_calibration_split") or {}).items():
        lines.append(f"| calibration {level} | {row['queries']} | {row['shortcut']:.3f} | {row['reason']:.3f} |")
    n = heldout["all"]["n"]
    taken = {rt: row["n"] for rt, row in heldout["by_route"].items()}
    if n:
        lines.append(f"| held-out all | {n} | {taken.get('shortcut', 0) / n:.3f} | {taken.get('reason', 0) / n:.3f} |")
    return lines


def render_report(report: dict[str, Any]) -> str:
    """The report as a short Markdown page."""
    h = report["heldout"]
    made = report["produced_by"]
    cols = ("fg_iou", *BASELINES)
    lines = ["# ConceptSeg-Tiny: held-out report", "",
             f"Produced by commit `{made['commit']}` with `{made['command']}` (bundle, checkpoint and this report "
             "come from that one run).", "",
             f"Evaluated with: {h['evaluated_with']}; {h['all']['n']} ConceptWorld episodes never trained on. "
             "fg IoU is the routed result; the other columns are baselines on the same episodes: each route forced "
             "alone, the policy's `<bbox>` filled as a mask, the whole image.", "",
             "| split | n | fg IoU | " + " | ".join(BASELINES.values()) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, row in [("all", h["all"]), *h["by_level"].items(), *[(f"route {k}", v) for k, v in h["by_route"].items()],
                      *h["by_level_route"].items()]:
        lines.append(f"| {name} | {row['n']} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    lines += ["", *_route_mix_lines(report["router"], h)]
    ws = report.get("warmstart_heldout")
    if ws:
        lines += ["", f"Warmstart, held-out greedy completions ({ws['n']} episodes, at most {ws['max_new_tokens']} tokens):", "",
                  "| split | n | format rate | box reward | answer = query | stopped | tokens |", "|---|---|---|---|---|---|---|"]
        for name, row in [("all", ws), *ws.get("by_level", {}).items()]:
            lines.append(f"| {name} | {row['n']} | {row['format_rate']:.3f} | {row['box_reward']:.3f} | "
                         f"{row['answer_is_query']:.3f} | {row['stopped']:.3f} | {row['tokens']:.1f} |")
    lines += ["", f"Router taus: {report['router']['taus']}", ""]
    s2 = report.get("stage2_heldout_reward") or {}
    if isinstance(s2.get("stage1"), dict):
        cols = [c for c in ("stage1", "stage2") if isinstance(s2.get(c), dict)]
        lines += [f"Held-out rewards, greedy ({s2['stage1'].get('episodes')} stage-2 episodes of another world):", "",
                  "| reward | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for key in ("format_reward", "box_reward", "mask_iou", "total"):
            lines.append(f"| {key} | " + " | ".join(f"{s2[c].get(key, float('nan')):.4f}" for c in cols) + " |")
        lines.append("")
    lines += ["| stage | wall s | CPU s |", "|---|---|---|"]
    for stage, t in report["time"].items():
        if t:
            lines.append(f"| {stage} | {t['wall_s']} | {t['cpu_s']} |")
    lines += ["", f"Training total: {report['train_wall_s']} s wall, {report['train_cpu_s']} s CPU."]
    return "\n".join(lines) + "\n"
