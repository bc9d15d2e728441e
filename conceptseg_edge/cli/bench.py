"""``conceptseg-edge bench BUNDLE --route prompt ...``: latency per stage, JSON + markdown table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmark a bundle's routes (per stage, p50/p90/p99)")
    parser.add_argument("bundle")
    parser.add_argument("--route", default="prompt", choices=["prompt"])
    parser.add_argument("--compare-torch", action="store_true", help="time PyTorch eager in the same run")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT.json", help="write the report here")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import json

    from conceptseg_edge.benchmarks.prompt import BenchConfig, bench_prompt_route, render_table
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import write_json

    if args.runs < 1 or args.warmup < 0:
        raise InputError(f"--runs {args.runs} / --warmup {args.warmup}: need runs >= 1 and warmup >= 0")
    cfg = BenchConfig(runs=args.runs, warmup=args.warmup, compare_torch=args.compare_torch, provider=args.provider)
    report = bench_prompt_route(args.bundle, cfg)
    if args.json_out:
        write_json(args.json_out, report)
    print(render_table(report))
    return 0
