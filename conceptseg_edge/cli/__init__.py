"""``conceptseg-edge`` command line.

Each command group lives in its own module with a ``register(subparsers)`` function, and every
handler wraps an importable function: the CLI only parses, calls, and prints. Heavy imports (torch,
onnx) happen inside handlers so ``conceptseg-edge segment`` never loads torch.
A ``ConceptsegError`` becomes one ``error:`` line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from conceptseg_edge.errors import ConceptsegError

# Command-group modules, in the order `--help` lists them.
_GROUPS = ("demo", "export", "segment", "track", "bench", "data", "train", "triton")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conceptseg-edge",
        description="ConceptSeg-R1 on the edge: export, run, train, benchmark and serve concept segmentation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(f"conceptseg_edge.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"conceptseg_edge.cli.{name}":
                raise
            continue  # group not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConceptsegError as exc:  # anything else is a bug, and keeps its traceback
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever the message holds
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
