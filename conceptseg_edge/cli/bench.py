"""``conceptseg-edge bench BUNDLE --route prompt|all ...``: latency per route and stage, JSON + table (+ PNG).

``conceptseg-edge bench BUNDLE --video``: tracking vs re-segmenting every frame (``benchmarks/video.py``).

``conceptseg-edge bench --profile real --out DIR``: the real-size SAM2 profile (``benchmarks/real.py``),
which builds its own bundles, so it takes no BUNDLE.
"""

from __future__ import annotations

import argparse
from typing import Literal

from conceptseg_edge.benchmarks.policy import BENCH_GENERATION
from conceptseg_edge.cli.providers import add_provider_arguments, provider_choice
from conceptseg_edge.router import Route

#: ``--route``: the prompt route alone (vs torch eager), or every route of a concept bundle.
BENCH_ROUTES: tuple[Route | Literal["all"], ...] = ("prompt", "all")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="benchmark a bundle's routes (per stage, p50/p90/p99)")
    parser.add_argument("bundle", nargs="?", help="the bundle to time (not with --profile)")
    parser.add_argument("--profile", choices=("real",), default=None,
                        help="real: the SAM2 profile at 1024 px vs PyTorch and ONNX Runtime's own SAM2 pipeline "
                             "(python -m conceptseg_edge.benchmarks.real --help); needs --out, no BUNDLE")
    parser.add_argument("--out", default=None, metavar="DIR", help="--profile real: directory for real.json/.md/.png")
    parser.add_argument("--sizes", nargs="+", default=None, help="--profile real: SAM 2.1 sizes (default tiny large)")
    parser.add_argument("--quick", action="store_true", help="--profile real: 3 runs, 1 warm-up (instead of --runs/--warmup)")
    parser.add_argument("--video", action="store_true",
                        help="tracking vs re-segmenting every frame, and J&F per level (a concept bundle exported with --video)")
    parser.add_argument("--frames", type=int, default=30, help="--video: frames per clip")
    parser.add_argument("--accuracy-seeds", type=int, default=1, help="--video: VideoWorld seeds scored for J&F (0: speed only)")
    parser.add_argument("--route", default="prompt", choices=BENCH_ROUTES,
                        help="prompt: the SAM2 route vs torch eager; all: every route of a concept bundle")
    parser.add_argument("--compare-torch", action="store_true", help="time the PyTorch reference in the same run")
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="--compare-torch with these weights (checked against the bundle's recorded hash) instead of "
                             "the path the manifest records, which may be where the bundle was exported, not here")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    add_provider_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=BENCH_GENERATION.max_new_tokens,
                        help="reason-route generation budget (--route all, --video)")
    parser.add_argument("--compare-bundle", action="append", default=[], metavar="BUNDLE",
                        help="the same checkpoint exported at another --policy-precision (repeatable; --route all)")
    parser.add_argument("--triton", default=None, metavar="URL",
                        help="benchmark a running Triton server (http://… or grpc://…) next to the in-process runtime")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client concurrency levels for --triton")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT.json", help="write the report here")
    parser.add_argument("--png", default=None, metavar="OUT.png", help="latency chart per route and stage (--route all)")
    parser.set_defaults(func=_bench, bench_parser=parser)


def _bench(args: argparse.Namespace) -> int:
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import writable_output, write_json

    if args.profile is not None:
        return _profile(args)
    if args.bundle is None:
        raise InputError("bench: give a BUNDLE (or --profile real --out DIR)")
    if args.runs < 1 or args.warmup < 0:
        raise InputError(f"--runs {args.runs} / --warmup {args.warmup}: need runs >= 1 and warmup >= 0")
    if args.checkpoint is not None and not args.compare_torch:
        raise InputError(f"--checkpoint {args.checkpoint}: only used with --compare-torch")
    for flag, path in (("--json", args.json_out), ("--png", args.png)):
        if path is not None:
            writable_output(path, flag)  # before minutes of timing, not after
    if args.triton:
        from conceptseg_edge.benchmarks.triton import TritonBenchConfig, bench_triton, render_triton_table

        try:
            levels = tuple(int(c) for c in args.concurrency.split(","))
        except ValueError:
            raise InputError(f"--concurrency {args.concurrency}: expected comma-separated integers") from None
        cfg = TritonBenchConfig(concurrency=levels, runs=args.runs, warmup=args.warmup, **provider_choice(args))
        served = bench_triton(args.triton, args.bundle, cfg=cfg)
        report, table = served.to_json(), render_triton_table(served)
    elif args.video:
        from conceptseg_edge.benchmarks.video import VideoBenchConfig, bench_video, plot_video, render_video_table

        runs = {} if args.runs == args.bench_parser.get_default("runs") else {"runs": args.runs}
        from conceptseg_edge.generation import GenerationConfig

        video = bench_video(args.bundle, VideoBenchConfig(frames=args.frames, accuracy_seeds=args.accuracy_seeds, **runs,
                                                          generation=GenerationConfig(args.max_new_tokens), **provider_choice(args)))
        report, table = video.to_json(), render_video_table(video)
        if args.png:
            plot_video(video, args.png)
    elif args.route == "all":
        from conceptseg_edge.benchmarks.routes import RoutesBenchConfig, bench_routes, plot_routes, render_routes_table
        from conceptseg_edge.generation import GenerationConfig

        cfg = RoutesBenchConfig(runs=args.runs, warmup=args.warmup, compare_torch=args.compare_torch,
                                checkpoint=args.checkpoint, generation=GenerationConfig(args.max_new_tokens),
                                compare_bundles=tuple(args.compare_bundle), **provider_choice(args))
        routes = bench_routes(args.bundle, cfg)
        report, table = routes.to_json(), render_routes_table(routes)
        if args.png:
            plot_routes(routes, args.png)
    else:
        from conceptseg_edge.benchmarks.prompt import BenchConfig, bench_prompt_route, render_table

        cfg = BenchConfig(runs=args.runs, warmup=args.warmup, compare_torch=args.compare_torch,
                          checkpoint=args.checkpoint, **provider_choice(args))
        prompt = bench_prompt_route(args.bundle, cfg)
        report, table = prompt.to_json(), render_table(prompt)
    if args.json_out:
        write_json(args.json_out, report)
    print(table)
    return 1 if report.get("errors") else 0


#: ``bench`` options the real profile does not take: it runs every side on CPU with the runtime's default
#: session settings and ORT's peer with ORT's, and writes its own JSON / markdown / PNG under --out.
PROFILE_UNUSED = ("video", "route", "compare_torch", "checkpoint", "provider", "allow_fallback", "trt_cache", "ort_threads",
                  "ort_spinning", "max_new_tokens", "compare_bundle", "triton", "concurrency", "json_out", "png")


def _profile(args: argparse.Namespace) -> int:
    """``--profile real``: hand the profile's own options to its command line; refuse the ones it would ignore."""
    from conceptseg_edge.benchmarks.real import main as real_main
    from conceptseg_edge.errors import InputError

    if args.bundle is not None or args.out is None:
        raise InputError(f"bench --profile {args.profile}: takes --out DIR and no BUNDLE (got bundle={args.bundle!r}, --out={args.out!r})")
    ignored = [dest for dest in PROFILE_UNUSED if getattr(args, dest) != args.bench_parser.get_default(dest)]
    if ignored:
        flags = ", ".join("--" + ("json" if d == "json_out" else d.replace("_", "-")) for d in ignored)
        raise InputError(f"bench --profile {args.profile}: {flags} not used by the profile (see --help of "
                         "python -m conceptseg_edge.benchmarks.real)")
    argv = ["--out", args.out, *(["--quick"] if args.quick else ["--runs", str(args.runs), "--warmup", str(args.warmup)])]
    argv += ["--sizes", *args.sizes] if args.sizes else []
    return real_main(argv)
