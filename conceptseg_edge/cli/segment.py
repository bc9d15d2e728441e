"""``conceptseg-edge segment BUNDLE IMAGE ...``: one image, prompts in, mask PNG out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from conceptseg_edge.cli.providers import add_provider_arguments, provider_config
from conceptseg_edge.router import AUTO, ROUTE_CHOICES


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} '{text}': expected comma-separated numbers") from None
    if len(values) not in n:
        raise argparse.ArgumentTypeError(f"{what} '{text}': expected {' or '.join(map(str, n))} numbers")
    return values


def point_arg(text: str) -> list[float]:
    """``X,Y`` or ``X,Y,LABEL`` (label exactly 1 foreground or 0 background: ``0.5`` is refused, not truncated)."""
    values = _floats(text, (2, 3), "--point")
    if len(values) == 3 and values[2] not in (0.0, 1.0):
        raise argparse.ArgumentTypeError(f"--point '{text}': label {values[2]:g}, expected 0 (background) or 1 (foreground)")
    return values


def box_arg(text: str) -> list[float]:
    """``X0,Y0,X1,Y1`` in pixels."""
    return _floats(text, (4,), "--box")


def support_arg(text: str) -> tuple[str, str]:
    """``IMG:MASK``: a support image and its mask (the box shown to the policy is the mask's box)."""
    image, sep, mask = text.rpartition(":")
    if not sep or not image or not mask:
        raise argparse.ArgumentTypeError(f"--support '{text}': expected IMG:MASK (a support image needs its mask)")
    return image, mask


def default_bank_dir() -> Path:
    """Concept bank under the user's cache dir (XDG), never the working directory."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "conceptseg-edge" / "bank"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("segment", help="segment one image from a bundle (torch-free)")
    parser.add_argument("bundle")
    parser.add_argument("image")
    parser.add_argument("--point", type=point_arg, action="append", default=[], metavar="X,Y[,LABEL]")
    parser.add_argument("--box", type=box_arg, default=None, metavar="X0,Y0,X1,Y1")
    parser.add_argument("--concept", default=None, help="concept phrase or question (shortcut / reason routes)")
    parser.add_argument("--support", type=support_arg, action="append", default=[], metavar="IMG:MASK",
                        help="support image with its mask (up to 4), shown to the policy as a mosaic")
    parser.add_argument("--route", default=AUTO, choices=ROUTE_CHOICES,
                        help="auto (router decides), prompt, shortcut or reason")
    parser.add_argument("--out", required=True, help="mask PNG (0/255)")
    parser.add_argument("--overlay", default=None, help="also write the mask tinted over the image")
    add_provider_arguments(parser)
    parser.add_argument("--bank", default=None, help=f"concept bank directory (default {default_bank_dir()})")
    parser.add_argument("--no-bank", action="store_true", help="do not read or write the concept bank")
    parser.add_argument("--json", action="store_true", help="print route, scores and per-stage ms as JSON")
    parser.set_defaults(func=_segment)


def load_supports(pairs: list[tuple[str, str]]):
    """Support images with their masks → ``Support``s (box = the mask's tight box)."""
    from conceptseg_edge.episodes import Support, box_from_mask
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.preprocess import load_image

    supports = []
    for image_path, mask_path in pairs:
        image = load_image(image_path)
        mask = load_image(mask_path)[..., 0] > 127
        if mask.shape != image.shape[:2]:
            raise InputError(f"--support {image_path}:{mask_path}: mask {mask.shape[::-1]} and image {image.shape[1::-1]} differ in size")
        supports.append(Support(image, box_from_mask(mask), mask))
    return supports


def mask_report(result, mask_path: str) -> dict:
    """What ``--json`` prints about a mask, for in-process and served results alike."""
    return {
        "route": result.route,
        "reason": result.reason,
        "mask": mask_path,
        "score": round(result.score, 4),
        "object_score": round(result.object_score, 4),
        "area_fraction": round(float(result.mask.mean()), 4),
        "box": result.box,
        "completion": result.completion,
    }


def output_paths(args: argparse.Namespace) -> tuple[list[Path], Path | None]:
    """The mask (and overlay) files and the bank directory, each checked writable before any work."""
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import writable_output

    outputs = [writable_output(args.out, "--out")]
    if args.overlay is not None:
        outputs.append(writable_output(args.overlay, "--overlay"))
        if outputs[1].resolve() == outputs[0].resolve():
            raise InputError(f"--overlay {args.overlay}: the same file as --out; give the overlay its own path")
    bank = None if args.no_bank else writable_output(default_bank_dir() if args.bank is None else args.bank, "--bank", directory=True)
    return outputs, bank


def _segment(args: argparse.Namespace) -> int:
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import atomic_paths
    from conceptseg_edge.manifest import read_manifest
    from conceptseg_edge.preprocess import load_image, make_prompts
    from conceptseg_edge.runtime.engine import engine_factory_for
    from conceptseg_edge.runtime.providers import provider_record
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter
    from conceptseg_edge.visualize import overlay, save_png

    config = provider_config(args)
    outputs, bank = output_paths(args)
    # a missing GPU provider (or TensorRT, for an engine bundle) fails here, before any image or model is read
    factory = engine_factory_for(config, read_manifest(args.bundle))
    image = load_image(args.image)
    points = [p[:2] for p in args.point] or None
    labels = [int(p[2]) if len(p) == 3 else 1 for p in args.point] or None
    prompts = make_prompts(points, labels, args.box, image.shape[:2])  # fail fast, before any engine
    if prompts.empty and not (args.concept and args.concept.strip()):
        raise InputError("no prompt: give --point X,Y, --box X0,Y0,X1,Y1 or --concept TEXT")
    supports = load_supports(args.support)
    segmenter = ConceptSegmenter.from_bundle(args.bundle, provider=config.name, bank_dir=bank, engine_factory=factory)
    result = segmenter.segment(image, query=args.concept, points=points, labels=labels, box=args.box,
                               supports=supports, route=args.route)
    with atomic_paths(*outputs) as staged:  # the mask and its overlay are written both or neither
        save_png(staged[0], result.mask)
        if args.overlay is not None:
            shown = prompts if result.box is None else make_prompts(None, None, result.box, image.shape[:2])
            save_png(staged[1], overlay(image, result.mask, shown))
    report = mask_report(result, args.out) | {
        "bank_hit": result.bank_hit,
        **provider_record(config.name, result.timings.provider_map()),
        "timings_ms": {k: round(v, 2) for k, v in result.timings.to_dict().items()} | {"total": round(result.timings.total(), 2)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.out}: route {result.route} ({result.reason}), score {result.score:.3f}, "
              f"{100 * report['area_fraction']:.1f}% of the image, {report['timings_ms']['total']:.0f} ms on {report['provider']}",
              file=sys.stderr)
    return 0
