"""``conceptseg-edge segment BUNDLE IMAGE ...``: one image, prompts in, mask PNG out."""

from __future__ import annotations

import argparse
import json
import sys


def _floats(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} '{text}': expected comma-separated numbers") from None
    if len(values) not in n:
        raise argparse.ArgumentTypeError(f"{what} '{text}': expected {' or '.join(map(str, n))} numbers")
    return values


def point_arg(text: str) -> list[float]:
    """``X,Y`` or ``X,Y,LABEL`` (label 1 foreground, 0 background)."""
    return _floats(text, (2, 3), "--point")


def box_arg(text: str) -> list[float]:
    """``X0,Y0,X1,Y1`` in pixels."""
    return _floats(text, (4,), "--box")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("segment", help="segment one image from a bundle (torch-free)")
    parser.add_argument("bundle")
    parser.add_argument("image")
    parser.add_argument("--point", type=point_arg, action="append", default=[], metavar="X,Y[,LABEL]")
    parser.add_argument("--box", type=box_arg, default=None, metavar="X0,Y0,X1,Y1")
    parser.add_argument("--out", required=True, help="mask PNG (0/255)")
    parser.add_argument("--overlay", default=None, help="also write the mask tinted over the image")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--json", action="store_true", help="print scores, route and per-stage ms as JSON")
    parser.set_defaults(func=_segment)


def _segment(args: argparse.Namespace) -> int:
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.preprocess import load_image, make_prompts
    from conceptseg_edge.runtime.predictor import SAM2Predictor
    from conceptseg_edge.visualize import overlay, save_png

    image = load_image(args.image)
    predictor = SAM2Predictor.from_bundle(args.bundle, provider=args.provider)
    points = [p[:2] for p in args.point] or None
    labels = [int(p[2]) if len(p) == 3 else 1 for p in args.point] or None
    prompts = make_prompts(points, labels, args.box, image.shape[:2])  # fail fast, before the encoder
    if prompts.empty:
        raise InputError("no prompt: give --point X,Y and/or --box X0,Y0,X1,Y1")
    predictor.set_image(image)
    result = predictor.predict(points=points, labels=labels, box=args.box)
    save_png(args.out, result.mask)
    if args.overlay:
        save_png(args.overlay, overlay(image, result.mask, prompts))
    report = {
        "route": result.route,
        "mask": args.out,
        "score": round(result.score, 4),
        "object_score": round(result.object_score, 4),
        "mask_index": result.mask_index,
        "area_fraction": round(float(result.mask.mean()), 4),
        "timings_ms": {k: round(v, 2) for k, v in result.timings.items()} | {"total": round(sum(result.timings.values()), 2)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.out}: route {result.route}, score {result.score:.3f}, "
              f"{100 * report['area_fraction']:.1f}% of the image, {report['timings_ms']['total']:.0f} ms", file=sys.stderr)
    return 0
