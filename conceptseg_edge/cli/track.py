"""``conceptseg-edge track BUNDLE SOURCE ...``: objects tracked through a video, masks and JSON out.

SOURCE is a folder of frames, a video file or a stream URL (``video.open_frames``). Objects start on
the first frame: one from ``--point``/``--box`` (together they make one object), and one per
``--concept``. ``--out DIR`` receives ``masks/<frame>_<object>.png`` for every frame and object,
``frames.jsonl`` (one line per frame: objects, scores, route events, ms per stage) and
``summary.json``; the folder appears whole when the run ends. Ctrl-C stops a stream cleanly: what
was tracked so far is written, marked ``interrupted``. ``--video`` also encodes the overlay.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from conceptseg_edge.cli.providers import add_provider_arguments, provider_config
from conceptseg_edge.cli.segment import box_arg, default_bank_dir, point_arg

if TYPE_CHECKING:
    from conceptseg_edge.runtime.tracker import FrameResult, ObjectPrompt, VideoSegmenter
    from conceptseg_edge.video import FrameSource

SUMMARY = "summary.json"  # written last: marks a complete track folder
# Overlay colours per object (RGB), cycling: distinct on both light and dark frames.
OBJECT_COLORS = ((30, 144, 255), (255, 64, 64), (60, 200, 60), (255, 190, 0), (190, 80, 255), (0, 210, 210))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("track", help="track objects or a concept through a video (torch-free)")
    parser.add_argument("bundle", help="bundle exported with --video")
    parser.add_argument("source", help="folder of frames, video file, or stream URL (rtsp://, http(s)://, file://)")
    parser.add_argument("--point", type=point_arg, action="append", default=[], metavar="X,Y[,LABEL]",
                        help="a point on the first frame (label 1 foreground, 0 background); with --box, one object")
    parser.add_argument("--label", type=int, choices=(0, 1), action="append", default=[],
                        help="the labels of the --point's in order (as X,Y,LABEL does; one per point)")
    parser.add_argument("--box", type=box_arg, default=None, metavar="X0,Y0,X1,Y1", help="a box on the first frame")
    parser.add_argument("--concept", action="append", default=[], metavar="TEXT",
                        help="a concept to find on the first frame and track (repeat for several objects)")
    parser.add_argument("--out", required=True, help="output folder: masks/, frames.jsonl, summary.json")
    parser.add_argument("--video", default=None, metavar="OVERLAY.mp4", help="also encode the masks over the frames")
    parser.add_argument("--fps", type=float, default=None, help="overlay frame rate (default: the source's, else 10)")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a stream URL (default 10)")
    add_provider_arguments(parser)
    parser.add_argument("--bank", default=None, help=f"concept bank directory (default {default_bank_dir()})")
    parser.add_argument("--no-bank", action="store_true", help="do not read or write the concept bank")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=_track)


def object_prompts(
    points: list[list[float]], box: list[float] | None, concepts: list[str], labels: list[int] | None = None
) -> dict[int, ObjectPrompt]:
    """Object id → prompt: the points and box together as object 1 (when given), then one per concept.
    ``labels``: the points' labels in order (``--label``), for points given as X,Y.

    Raises:
        InputError: no prompt at all, an empty concept, or labels that do not pair with the points.
    """
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.runtime.tracker import ObjectPrompt

    if labels:
        if len(labels) != len(points) or any(len(p) == 3 for p in points):
            raise InputError(f"--label: {len(labels)} labels for {len(points)} points; give one --label per --point X,Y "
                             "(or write each point as X,Y,LABEL)")  # fmt: skip
        points = [[*p, float(label)] for p, label in zip(points, labels)]
    prompts: list[ObjectPrompt] = []
    if points or box is not None:
        prompts.append(ObjectPrompt(
            points=tuple((p[0], p[1]) for p in points) or None,
            labels=tuple(int(p[2]) if len(p) == 3 else 1 for p in points) or None,
            box=tuple(box) if box is not None else None,
        ))  # fmt: skip
    prompts += [ObjectPrompt(concept=text) for text in concepts]
    if not prompts:
        raise InputError("no prompt: give --point X,Y, --box X0,Y0,X1,Y1 or --concept TEXT")
    return {i + 1: p for i, p in enumerate(prompts)}


def track_to_folder(
    video: VideoSegmenter,
    frames: FrameSource,
    prompts: Mapping[int, ObjectPrompt],
    out: str | Path,
    overlay: str | Path | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Track ``prompts`` through ``frames`` into the folder ``out``; return the summary it wrote
    (``extra`` merged in: the bundle, the providers).

    The folder is staged and swapped in at the end, so a failed run leaves nothing; a Ctrl-C keeps
    the frames tracked so far, with ``"interrupted": true``. ``overlay``: a video file to encode too,
    written whole or not at all (inside ``out``, it is staged with the folder).

    Raises:
        InputError: bad prompts or ``max_frames``; a frame size change (``VideoError`` from the source).
        VideoError: the source fails to decode.
    """
    import contextlib

    from tqdm import tqdm

    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import staged_dir
    from conceptseg_edge.video import JsonLinesWriter, VideoWriter

    if max_frames is not None and max_frames < 1:
        raise InputError(f"--max-frames {max_frames}: expected at least 1")
    known = [n for n in (frames.n_frames, max_frames) if n is not None]
    total = min(known) if known else None
    stream = video.stream(total)
    for obj_id, prompt in prompts.items():
        stream.add_object(prompt, obj_id)
    out = Path(out)
    rate = fps or frames.fps or 10.0
    stats = _Stats(prompts)
    interrupted = False
    with staged_dir(out, SUMMARY, "track output folder") as staging:
        (staging / "masks").mkdir()
        target = None if overlay is None else Path(overlay).resolve()
        if target is not None and target.is_relative_to(out.resolve()):
            target = staging / target.relative_to(out.resolve())
        writer = None if target is None else VideoWriter(target, fps=rate)
        decoded = iter(frames)
        with JsonLinesWriter(staging / "frames.jsonl") as log, writer or contextlib.nullcontext():
            bar = tqdm(total=total, desc="track", unit="frame", disable=None if progress else True, file=sys.stderr)
            try:
                for _, image in itertools.islice(decoded, max_frames):
                    result = stream.add_frame(image)
                    log.write(_frame_record(result, staging))
                    stats.add(result, image.shape[:2])
                    if writer is not None:
                        writer.write(_overlay(image, result))
                    bar.update()
            except KeyboardInterrupt:
                interrupted = True
            finally:
                bar.close()
                decoded.close()
        summary = stats.summary() | {
            "source": frames.name, "fps": rate, "interrupted": interrupted,
            "frames_jsonl": "frames.jsonl", "masks": "masks/<frame>_<object>.png",
            "video": None if overlay is None else str(overlay), "video_codec": None if writer is None else writer.codec,
        } | dict(extra or {})  # fmt: skip
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _frame_record(result: FrameResult, staging: Path) -> dict[str, Any]:
    """One ``frames.jsonl`` line; writes the frame's mask PNGs on the way."""
    from conceptseg_edge.episodes import box_from_mask
    from conceptseg_edge.visualize import save_png

    objects = {}
    for obj_id, obj in result.objects.items():
        rel = f"masks/{result.index:05d}_{obj_id}.png"
        save_png(staging / rel, obj.mask)
        box = box_from_mask(obj.mask)
        objects[str(obj_id)] = {
            "mask": rel, "present": bool(obj.present), "source": obj.source,
            "score": round(float(obj.score), 4), "object_score": round(float(obj.object_score), 4),
            "area_fraction": round(float(obj.mask.mean()), 5), "box": list(box) if box else None,
        }  # fmt: skip
    return {
        "frame": result.index,
        "objects": objects,
        "events": [_event(e) for e in result.events],
        "timings_ms": {k: round(v, 2) for k, v in result.timings.to_dict().items()} | {"total": round(result.timings.total(), 2)},
    }


def _event(event: Any) -> dict[str, Any]:
    return {"frame": event.frame, "obj_id": event.obj_id, "kind": event.kind, "route": event.route, "reason": event.reason}


def _overlay(image: np.ndarray, result: FrameResult) -> np.ndarray:
    from conceptseg_edge.visualize import overlay

    shown = image
    for obj_id, obj in sorted(result.objects.items()):
        if obj.mask.any():
            shown = overlay(shown, obj.mask, color=np.array(OBJECT_COLORS[(obj_id - 1) % len(OBJECT_COLORS)], np.float32))
    return shown


class _Stats:
    """What ``summary.json`` says over the whole run: per object, per stage, every event."""

    def __init__(self, prompts: Mapping[int, ObjectPrompt]) -> None:
        self.prompts = prompts
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self.present = {k: 0 for k in prompts}
        self.events: list[dict[str, Any]] = []
        self.stage_ms: dict[str, list[float]] = {}
        self.total_ms: list[float] = []

    def add(self, result: FrameResult, hw: tuple[int, int]) -> None:
        self.frames += 1
        self.size = hw
        for obj_id, obj in result.objects.items():
            self.present[obj_id] = self.present.get(obj_id, 0) + bool(obj.present)
        self.events += [_event(e) for e in result.events]
        for stage, ms in result.timings.to_dict().items():
            self.stage_ms.setdefault(stage, []).append(ms)
        self.total_ms.append(result.timings.total())

    def summary(self) -> dict[str, Any]:
        def prompt(p: ObjectPrompt) -> dict[str, Any]:
            return {k: v for k, v in (("points", p.points), ("labels", p.labels), ("box", p.box), ("concept", p.concept))
                    if v is not None}  # fmt: skip

        return {
            "frames": self.frames,
            "size": None if self.size is None else [self.size[1], self.size[0]],
            "objects": {str(k): {"prompt": prompt(p), "frames_present": self.present.get(k, 0)} for k, p in self.prompts.items()},
            "events": self.events,
            "mean_ms": {k: round(float(np.mean(v)), 2) for k, v in self.stage_ms.items()}
            | {"total": round(float(np.mean(self.total_ms)), 2) if self.total_ms else None},
        }


def _track(args: argparse.Namespace) -> int:
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import writable_output
    from conceptseg_edge.manifest import read_manifest
    from conceptseg_edge.runtime.engine import engine_factory_for
    from conceptseg_edge.runtime.providers import provider_record
    from conceptseg_edge.runtime.tracker import VideoSegmenter
    from conceptseg_edge.video import CONTAINER_FORMATS, open_frames

    config = provider_config(args)
    prompts = object_prompts(args.point, args.box, args.concept, args.label)  # fail fast, before any engine or decoder
    out = writable_output(args.out, "--out", directory=True)
    if args.video is not None:
        writable_output(args.video, "--video")
        if Path(args.video).suffix.lower() not in CONTAINER_FORMATS:
            raise InputError(f"--video {args.video}: expected one of {', '.join(CONTAINER_FORMATS)}")
    if args.fps is not None and not args.fps > 0:
        raise InputError(f"--fps {args.fps}: expected a positive frame rate")
    bank = None if args.no_bank else writable_output(default_bank_dir() if args.bank is None else args.bank, "--bank", directory=True)
    factory = engine_factory_for(config, read_manifest(args.bundle))
    with open_frames(args.source, timeout=args.timeout) as frames:  # a bad source fails before the engines load
        video = VideoSegmenter.from_bundle(args.bundle, provider=config.name, bank_dir=bank, engine_factory=factory)
        extra = {"bundle": str(args.bundle), **provider_record(config.name, video.providers())}
        summary = track_to_folder(video, frames, prompts, out, args.video, args.fps, args.max_frames, extra=extra)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        present = ", ".join(f"object {k} in {v['frames_present']}" for k, v in summary["objects"].items())
        refires = sum(e["kind"] == "refire" for e in summary["events"])
        print(f"{out}: {summary['frames']} frames{' (interrupted)' if summary['interrupted'] else ''}, {present}; "
              f"{refires} re-fires, {summary['mean_ms']['total']} ms a frame on {summary['provider']}", file=sys.stderr)  # fmt: skip
    return 130 if summary["interrupted"] else 0
