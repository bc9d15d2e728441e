"""``conceptseg-edge train``: backbone, video, warmstart, stage1, stage2, calibrate-router, tiny-default.

Each leaf reads a typed YAML config (``--config``, through ``train.config.load_config``: bytes that
are not UTF-8, duplicate or unknown keys, wrong types and non-finite numbers are one ``error:`` line
naming the file and field), checks its output directory before anything is built, runs the stage
with progress bars, and prints a one-object JSON summary on stdout. A diverging run (non-finite
loss) is an ``error:`` line naming the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

# Torch-free: the names are listed in --help while arguments are parsed.
from conceptseg_edge.models.sam2_variants import SAM2_CONFIGS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the backbone, the policy warm start, the CTM (stage 1), Meta-GRPO (stage 2), the router")
    sub = parser.add_subparsers(dest="train_command", required=True, metavar="STAGE")

    backbone = sub.add_parser("backbone", help="pretrain a small SAM2 on ConceptWorld (the offline default's backbone)")
    backbone.add_argument("--config", type=Path, required=True, help="YAML (train/configs/backbone.yaml)")
    backbone.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    backbone.set_defaults(func=_backbone)

    video = sub.add_parser("video", help="train a SAM2 backbone's memory path on VideoWorld clips (image path frozen)")
    video.add_argument("--config", type=Path, required=True, help="YAML (train/configs/tiny/video.yaml)")
    video.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    video.set_defaults(func=_video)

    warm = sub.add_parser("warmstart", help="teach the tiny policy the tag format (the offline default's stand-in for instruction tuning)")
    warm.add_argument("--config", type=Path, required=True, help="YAML (train/configs/tiny/warmstart.yaml)")
    warm.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    warm.set_defaults(func=_warmstart)

    stage1 = sub.add_parser("stage1", help="train the CTM through the frozen SAM2 on teacher-forced completions")
    stage1.add_argument("--config", type=Path, required=True, help="YAML (train/configs/stage1.yaml)")
    stage1.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    stage1.add_argument("--init-from", default=None, metavar="CHECKPOINT_DIR",
                        help="retarget: start from this checkpoint's policy + CTM (ours or a ConceptSeg-R1 release); "
                             "sets the config's init_checkpoint")
    stage1.add_argument("--backbone", default=None, metavar="NAME",
                        help=f"the frozen SAM2 to train the CTM against ({', '.join(SAM2_CONFIGS)}); "
                             "sets the config's backbone_config")
    stage1.add_argument("--backbone-checkpoint", default=None, metavar="PT",
                        help="its official .pt weights; sets the config's backbone_checkpoint (none anywhere: "
                             "a random-init SAM2, for tests only)")
    stage1.set_defaults(func=_stage1)

    stage2 = sub.add_parser("stage2", help="Meta-GRPO on TRL's GRPOTrainer (policy + CTM)")
    stage2.add_argument("--config", type=Path, required=True, help="YAML (train/configs/stage2.yaml)")
    stage2.set_defaults(func=_stage2)

    calib = sub.add_parser("calibrate-router", help="fit the shortcut threshold per word count; write it into the checkpoint")
    calib.add_argument("--config", type=Path, required=True, help="YAML (train/configs/calibrate.yaml)")
    calib.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the config's)")
    calib.set_defaults(func=_calibrate)

    tiny = sub.add_parser("tiny-default", help="train ConceptSeg-Tiny on ConceptWorld end to end and export its bundle")
    tiny.add_argument("--out", type=Path, required=True, help="run directory (stages, checkpoint, bundle, report)")
    tiny.add_argument("--configs", type=Path, default=None, help="directory of the stage YAMLs (default: train/configs/tiny)")
    tiny.add_argument("--bundle", type=Path, default=None, help="also copy the exported bundle here")
    tiny.add_argument("--skip-stage2", action="store_true", help="leave Meta-GRPO out (stage 1 checkpoint is calibrated)")
    tiny.add_argument("--no-export", action="store_true", help="stop at the calibrated checkpoint")
    tiny.set_defaults(func=_tiny)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _backbone(args: argparse.Namespace) -> int:
    from conceptseg_edge.train.backbone import BackboneConfig, train_backbone
    from conceptseg_edge.train.config import load_config

    result = train_backbone(load_config(args.config, BackboneConfig), args.out)
    _print({"out_dir": result.out_dir, "checkpoint": result.checkpoint, "heldout": result.summary.get("heldout"),
            "time": result.summary.get("time")})
    return 0


def _video(args: argparse.Namespace) -> int:
    from conceptseg_edge.train.config import load_config
    from conceptseg_edge.train.video import VideoConfig, train_video

    result = train_video(load_config(args.config, VideoConfig), args.out)
    s = result.summary
    _print({"out_dir": result.out_dir, "checkpoint": result.checkpoint, "heldout": s.get("heldout"),
            "steps_per_s": s.get("steps_per_s"), "time": s.get("time")})
    return 0


def _warmstart(args: argparse.Namespace) -> int:
    from conceptseg_edge.train.config import load_config
    from conceptseg_edge.train.warmstart import WarmstartConfig, train_warmstart

    result = train_warmstart(load_config(args.config, WarmstartConfig), args.out)
    s = result.summary
    heldout = s.get("heldout") or {}
    _print({"checkpoint": result.checkpoint, "loss_first": s.get("loss_first"), "loss_last": s.get("loss_last"),
            "heldout_format_rate": heldout.get("format_rate"), "heldout_box_reward": heldout.get("box_reward"),
            "time": s.get("time")})
    return 0


def _stage1(args: argparse.Namespace) -> int:
    from conceptseg_edge.train.config import load_config
    from conceptseg_edge.train.stage1 import Stage1Config, train_stage1

    cfg = stage1_overrides(load_config(args.config, Stage1Config), args)
    result = train_stage1(cfg, args.out)
    s = result.summary
    _print({"checkpoint": result.checkpoint, "loss_first": s.get("loss_first"), "loss_last": s.get("loss_last"),
            "ctm": s.get("ctm"), "heldout": s.get("heldout"), "time": s.get("time")})
    return 0


def stage1_overrides(cfg, args: argparse.Namespace):
    """The config with ``--init-from`` / ``--backbone`` / ``--backbone-checkpoint`` applied, checked
    (``Stage1Config.validate``: e.g. ``--init-from`` beside a config's ``policy_path`` is refused)
    before any model is built."""
    from conceptseg_edge.errors import InputError

    changes: dict[str, str | None] = {}
    if args.init_from is not None:
        changes["init_checkpoint"] = args.init_from
    if args.backbone is not None:
        if args.backbone not in SAM2_CONFIGS:
            raise InputError(f"--backbone {args.backbone}: unknown SAM2 config (choices: {', '.join(SAM2_CONFIGS)})")
        if args.backbone != cfg.backbone_config and cfg.backbone_checkpoint and args.backbone_checkpoint is None:
            raise InputError(f"--backbone {args.backbone}: the config's backbone_checkpoint {cfg.backbone_checkpoint} holds "
                             f"{cfg.backbone_config} weights; give this SAM2's with --backbone-checkpoint")
        changes["backbone_config"] = args.backbone
    if args.backbone_checkpoint is not None:
        changes["backbone_checkpoint"] = args.backbone_checkpoint
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


def _stage2(args: argparse.Namespace) -> int:
    try:
        from conceptseg_edge.train.stage2 import run_stage2
    except ModuleNotFoundError as exc:
        if exc.name != "conceptseg_edge.train.stage2":
            raise
        from conceptseg_edge.errors import DependencyError

        raise DependencyError("train stage2: conceptseg_edge.train.stage2 is not in this install") from exc
    _print({"checkpoint": run_stage2(args.config)})
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from conceptseg_edge.train.calibrate import run_calibrate

    _print(run_calibrate(args.config, args.checkpoint))
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from conceptseg_edge.train.tiny_default import run_tiny_default

    report = run_tiny_default(args.out, configs=args.configs, bundle=args.bundle,
                              stage2=not args.skip_stage2, export=not args.no_export)
    _print(report)
    return 0
