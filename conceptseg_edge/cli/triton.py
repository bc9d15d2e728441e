"""``conceptseg-edge triton build|serve`` and ``conceptseg-edge client``.

Each handler wraps an importable function (``build_repository``, ``serve_forever``,
``TritonSegClient.segment``); the CLI only parses, calls and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from conceptseg_edge.router import AUTO, ROUTE_CHOICES
from conceptseg_edge.serve.protocol import MODEL_NAME
from conceptseg_edge.serve.repository import DEVICES, FLAVORS, GRAPH_BACKENDS, RepositoryConfig
from conceptseg_edge.serve.server import LOOPBACK


def register(sub: argparse._SubParsersAction) -> None:
    from conceptseg_edge.cli.segment import box_arg, point_arg, support_arg

    parser = sub.add_parser("triton", help="build a Triton model repository from a bundle, or serve one")
    kinds = parser.add_subparsers(dest="triton_command", required=True, metavar="COMMAND")

    build = kinds.add_parser("build", help="bundle → Triton model repository (python or native flavor)")
    build.add_argument("bundle")
    build.add_argument("--out", required=True, help="repository directory to write (replaced atomically)")
    build.add_argument("--flavor", default=RepositoryConfig.flavor, choices=FLAVORS,
                       help="python: the runtime in one python-backend model; native: graph models + BLS router "
                            "(default: native for an engine bundle, whose engines become tensorrt_plan models; else python)")
    build.add_argument("--max-batch", type=int, default=None, metavar="N",
                       help="native: max_batch_size of graphs with a shared batch axis (default 8, or an engine's "
                            "profile max; 0 disables)")
    build.add_argument("--instances", type=int, default=RepositoryConfig.instances, metavar="K", help="instances per model (default 1)")
    build.add_argument("--device", default=None, choices=DEVICES,
                       help="default: python→cpu, native→gpu (an engine bundle needs gpu)")
    build.add_argument("--graph-backend", default=RepositoryConfig.graph_backend, choices=GRAPH_BACKENDS,
                       help="native: serve onnx graphs with the onnxruntime backend, or with ORT inside the python backend")
    build.add_argument("--reference-bundle", action="store_true",
                       help="python flavor: point at the bundle by absolute path instead of copying it in")
    build.add_argument("--max-image-pixels", type=int, default=None, metavar="N", help="largest H*W a request may send")
    build.add_argument("--no-warmup", action="store_true",
                       help="skip the warm-up at model load (the router's request, the engines' model_warmup)")
    build.add_argument("--bank", default=None, help="concept bank directory for the shortcut route")
    build.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="reason-route generation budget")
    build.add_argument("--max-streams", type=int, default=RepositoryConfig.max_streams, metavar="N",
                       help="stream model (bundles exported with --video): most live video streams per instance (default 16)")
    build.add_argument("--stream-idle-s", type=float, default=RepositoryConfig.stream_idle_s, metavar="S",
                       help="stream model: free a stream after S seconds without a frame (default 30)")
    build.set_defaults(func=_build)

    serve = kinds.add_parser("serve", help="run tritonserver on a repository (loopback) until Ctrl-C")
    serve.add_argument("repository")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--host", default=LOOPBACK, help="bind address (default loopback)")
    serve.add_argument("--tritonserver", default=None, metavar="PATH", help="explicit tritonserver binary")
    serve.add_argument("--log", default=None, metavar="FILE", help="server log file (default: a temp file)")
    serve.add_argument("--startup-timeout", type=float, default=300.0, metavar="S")
    serve.set_defaults(func=_serve)

    client = sub.add_parser("client", help="segment one image through a running Triton server")
    client.add_argument("url", help="http://HOST:PORT or grpc://HOST:PORT")
    client.add_argument("image")
    client.add_argument("--point", type=point_arg, action="append", default=[], metavar="X,Y[,LABEL]")
    client.add_argument("--box", type=box_arg, default=None, metavar="X0,Y0,X1,Y1")
    client.add_argument("--concept", default=None, help="concept phrase or question")
    client.add_argument("--support", type=support_arg, action="append", default=[], metavar="IMG:MASK")
    client.add_argument("--route", default=AUTO, choices=ROUTE_CHOICES)
    client.add_argument("--out", required=True, help="mask PNG (0/255)")
    client.add_argument("--raw", action="store_true", help="decode locally and send pixels (default: send the file's bytes)")
    client.add_argument("--model", default=MODEL_NAME)
    client.add_argument("--timeout", type=float, default=120.0)
    client.add_argument("--json", action="store_true", help="print route, scores and per-stage ms as JSON")
    client.set_defaults(func=_client)


def _build(args: argparse.Namespace) -> int:
    from conceptseg_edge.generation import GenerationConfig
    from conceptseg_edge.serve.protocol import ServeLimits
    from conceptseg_edge.serve.repository import build_repository

    limits = ServeLimits() if args.max_image_pixels is None else ServeLimits(max_image_pixels=args.max_image_pixels)
    cfg = RepositoryConfig(
        flavor=args.flavor,
        max_batch=args.max_batch,
        instances=args.instances,
        device=args.device,
        bundle_mode="reference" if args.reference_bundle else "copy",
        graph_backend=args.graph_backend,
        limits=limits,
        warmup=not args.no_warmup,
        bank_dir=args.bank,
        generation=None if args.max_new_tokens is None else GenerationConfig(max_new_tokens=args.max_new_tokens),
        max_streams=args.max_streams,
        stream_idle_s=args.stream_idle_s,
    )
    manifest = build_repository(args.bundle, args.out, cfg)
    print(json.dumps({"repository": str(Path(args.out)), "flavor": manifest.flavor, "routes": list(manifest.routes),
                      "models": {name: record.to_dict() for name, record in manifest.models.items()}}, indent=2))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from conceptseg_edge.serve.server import serve_forever

    return serve_forever(args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, host=args.host, binary=args.tritonserver,
                         log_path=args.log, startup_timeout=args.startup_timeout)


def _client(args: argparse.Namespace) -> int:
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import writable_output
    from conceptseg_edge.preprocess import load_image
    from conceptseg_edge.serve.client import TritonSegClient
    from conceptseg_edge.cli.segment import mask_report
    from conceptseg_edge.visualize import save_png

    writable_output(args.out, "--out")  # before the request, not after the server answered
    path = Path(args.image)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    image = load_image(path) if args.raw else path.read_bytes()
    points = [p[:2] for p in args.point] or None
    labels = [int(p[2]) if len(p) == 3 else 1 for p in args.point] or None
    if not points and args.box is None and not (args.concept and args.concept.strip()):
        raise InputError("no prompt: give --point X,Y, --box X0,Y0,X1,Y1 or --concept TEXT")
    supports = []
    for image_path, mask_path in args.support:
        for p in (image_path, mask_path):
            if not Path(p).is_file():
                raise InputError(f"--support {image_path}:{mask_path}: {p} not found")
        supports.append((Path(image_path).read_bytes(), Path(mask_path).read_bytes()))
    with TritonSegClient(args.url, model=args.model, timeout=args.timeout) as client:
        result = client.segment(image, query=args.concept, points=points, labels=labels, box=args.box,
                                supports=supports, route=args.route)
    save_png(args.out, result.mask)
    report = mask_report(result, args.out) | {"server_timings_ms": result.timings}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.out}: route {result.route} ({result.reason}), score {result.score:.3f}, "
              f"{100 * report['area_fraction']:.1f}% of the image, server {result.timings.get('server_total', 0):.0f} ms",
              file=sys.stderr)
    return 0
