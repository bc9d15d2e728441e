"""``--provider``, ``--allow-fallback``, ``--trt-cache`` and ONNX Runtime's ``--ort-threads`` /
``--ort-spinning``, shared by every command that runs a bundle (segment, bench, demo)."""

from __future__ import annotations

import argparse
from typing import Any

from conceptseg_edge.runtime.providers import PROVIDER_NAMES, ProviderChoice, ProviderConfig


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES,
                        help="ONNX Runtime execution provider; cuda/tensorrt need onnxruntime-gpu (conceptseg-edge[gpu])")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="if the provider is not available, warn and run on the next one (CUDA, then CPU) "
                             "instead of failing; reports record the provider that ran")
    parser.add_argument("--trt-cache", default=None, metavar="DIR",
                        help="--provider tensorrt: keep TensorRT's engines and timing cache here, so the next run "
                             "loads them instead of rebuilding (default: rebuild at every load)")
    parser.add_argument("--ort-threads", type=int, default=0, metavar="N",
                        help="ONNX Runtime intra-op threads per session (default 0: one per physical core)")
    parser.add_argument("--ort-spinning", action="store_true",
                        help="let ONNX Runtime's idle threads spin for work (default off: on a shared CPU they "
                             "hold a core the rest of the request needs)")


def provider_choice(args: argparse.Namespace) -> dict[str, Any]:
    """The ``ProviderChoice`` fields of a command's config, from its arguments.

    Raises:
        InputError: ``--trt-cache`` is not a writable directory; ``--ort-threads`` is negative.
    """
    from conceptseg_edge.errors import InputError
    from conceptseg_edge.fileio import writable_output

    if args.trt_cache is not None:
        writable_output(args.trt_cache, "--trt-cache", directory=True)
    if args.ort_threads < 0:
        raise InputError(f"--ort-threads {args.ort_threads}: expected 0 (ONNX Runtime's default) or more")
    return {"provider": args.provider, "allow_fallback": args.allow_fallback, "trt_cache": args.trt_cache,
            "ort_threads": args.ort_threads, "ort_spinning": args.ort_spinning}


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    return ProviderChoice(**provider_choice(args)).provider_config
