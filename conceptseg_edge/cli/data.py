"""``conceptseg-edge data``: make ConceptWorld datasets and check ConceptSeg-layout roots."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="make and check concept-segmentation datasets")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")

    make = sub.add_parser("make-world", help="write a ConceptWorld dataset in the ConceptSeg layout")
    make.add_argument("--out", required=True, help="dataset root to write")
    make.add_argument("--n", type=int, required=True, help="number of episodes")
    make.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    make.add_argument("--image-size", type=int, default=256, help="image side in pixels (default 256)")
    make.add_argument("--test-fraction", type=float, default=0.2, help="share of test items (default 0.2)")
    make.set_defaults(func=_make_world)

    check = sub.add_parser("check", help="validate a ConceptSeg-layout root and count its items")
    check.add_argument("root", type=Path, help="dataset root holding all_meta.json")
    check.set_defaults(func=_check)


def _make_world(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.world import make_world
    from conceptseg_edge.fileio import writable_output

    root = make_world(writable_output(args.out, "--out", directory=True), args.n, seed=args.seed, test_fraction=args.test_fraction, image_size=args.image_size)
    print(f"wrote {args.n} episodes to {root}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from collections import Counter

    from conceptseg_edge.data.meta import ConceptSegDataset

    dataset = ConceptSegDataset.open(args.root)
    for split in dataset.splits:
        counts = Counter((item.level, item.task_name) for _, _, _, item in dataset.items(split))
        total = sum(counts.values())
        print(f"{split}: {total} items in {len(dataset.splits[split])} classes")
        for (level, task), n in sorted(counts.items()):
            print(f"  {level} {task}: {n}")
    return 0
