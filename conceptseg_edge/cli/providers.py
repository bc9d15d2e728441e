"""``--provider`` and ``--allow-fallback``, shared by every command that runs a bundle (segment, bench, demo)."""

from __future__ import annotations

import argparse

from conceptseg_edge.runtime.providers import PROVIDER_NAMES, ProviderConfig


def add_provider_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="cpu", choices=PROVIDER_NAMES,
                        help="ONNX Runtime execution provider; cuda/tensorrt need onnxruntime-gpu (conceptseg-edge[gpu])")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="if the provider is not available, warn and run on the next one (CUDA, then CPU) "
                             "instead of failing; reports record the provider that ran")


def provider_config(args: argparse.Namespace) -> ProviderConfig:
    return ProviderConfig(args.provider, allow_fallback=args.allow_fallback)
