"""``conceptseg-edge demo [--bundle B] --out DIR``: the embedded ConceptSeg-Tiny on held-out samples."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from conceptseg_edge.demo import DEFAULT_BUNDLE

    parser = sub.add_parser("demo", help="segment CI/CD/CR samples with the embedded default; table + overlay grid")
    parser.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="a concept bundle (default: the embedded ConceptSeg-Tiny)")
    parser.add_argument("--out", default="out/demo", help="writes demo.json and grid.png here")
    parser.add_argument("--per-level", type=int, default=3, help="samples per concept level (CI, CD, CR)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per sample; the median is reported")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from conceptseg_edge.demo import DEFAULT_BUNDLE, DemoConfig, render_demo_table, run_demo

    report = run_demo(args.bundle, args.out, DemoConfig(per_level=args.per_level, repeats=args.repeats, provider=args.provider))
    print(render_demo_table(report))
    if Path(args.bundle).resolve() == DEFAULT_BUNDLE:
        print(f"\n{args.per_level} samples per level; ConceptSeg-Tiny's held-out report over 60 episodes, per level "
              "and route: docs/conceptseg_tiny_report.md")
    print("\nwrote " + ", ".join(report["files"]))
    return 0
