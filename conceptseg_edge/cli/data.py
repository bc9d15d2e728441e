"""``conceptseg-edge data``: make ConceptWorld datasets, import users' datasets, check ConceptSeg-layout roots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conceptseg_edge.data.importers import ImportSummary, SplitRule
    from conceptseg_edge.data.meta import ConceptSegDataset


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

    video = sub.add_parser("make-video", help="write one synthetic video clip (ConceptWorld in motion) with its ground truth")
    video.add_argument("--out", required=True, help="clip folder to write: frames/00000.jpg..., masks/, clip.json")
    video.add_argument("--kind", default=None, help="clip kind (move, occlusion, reenter, distractor, saliency, "
                       "camouflage, colour change); --index then counts clips of that kind")  # fmt: skip
    video.add_argument("--index", type=int, default=0, help="clip index (default 0)")
    video.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    video.add_argument("--image-size", type=int, default=256, help="frame side in pixels (default 256)")
    video.add_argument("--length", type=int, default=30, help="frames (default 30)")
    video.add_argument("--png", action="store_true", help="lossless PNG frames instead of JPEG")
    video.set_defaults(func=_make_video)

    imp = sub.add_parser("import", help="convert an MVTec-AD, image/mask folder or COCO dataset to the ConceptSeg layout")
    kinds = imp.add_subparsers(dest="import_kind", required=True, metavar="LAYOUT")
    mvtec = kinds.add_parser("mvtec", help="MVTec-AD: <category>/test/<defect>/ + ground_truth/<defect>/*_mask.png (CD)")
    mvtec.add_argument("src", type=Path, help="MVTec-AD root, or one category folder")
    folder = kinds.add_parser("folder", help="image/mask folder pairs of one class (Kvasir-SEG style)")
    folder.add_argument("src", type=Path, help="folder holding the image and mask folders")
    folder.add_argument("--class", dest="cls_name", required=True, help="class name, e.g. polyp")
    folder.add_argument("--level", choices=("CI", "CD"), help="concept level (default: the one the class name implies)")
    folder.add_argument("--images", default="images", help="image folder inside SRC (default images)")
    folder.add_argument("--masks", default="masks", help="mask folder inside SRC (default masks)")
    folder.add_argument("--mask-suffix", default="", help="mask name = image stem + this suffix (default none)")
    coco = kinds.add_parser("coco", help="COCO instance annotations: one CI item per image and category")
    coco.add_argument("src", type=Path, help="instances JSON file")
    coco.add_argument("--images", type=Path, help="folder the file_name entries are relative to (default: the JSON's)")
    for kind, func in ((mvtec, _import_mvtec), (folder, _import_folder), (coco, _import_coco)):
        kind.add_argument("--out", required=True, help="dataset root to write (absent, empty, or a ConceptSeg root)")
        kind.add_argument("--name", help="dataset_name of the items (default: the source's name)")
        kind.add_argument("--test-fraction", type=float, default=0.2, help="share of images in the test split (default 0.2)")
        kind.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
        kind.set_defaults(func=func)

    check = sub.add_parser("check", help="validate a ConceptSeg-layout root and count its items")
    check.add_argument("root", type=Path, help="dataset root holding all_meta.json")
    check.set_defaults(func=_check)


def _make_world(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.world import make_world
    from conceptseg_edge.fileio import writable_output

    root = make_world(writable_output(args.out, "--out", directory=True), args.n, seed=args.seed, test_fraction=args.test_fraction, image_size=args.image_size)
    print(f"wrote {args.n} episodes to {root}")
    return 0


def _make_video(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.video_world import VideoWorld, write_clip

    world = VideoWorld(args.seed, args.image_size, args.length)
    index = args.index if args.kind is None else world.index_of(args.kind, args.index)
    clip = world.clip(index)
    root = write_clip(clip, args.out, image_format="png" if args.png else "jpg")
    print(f"wrote clip {index} ({clip.kind}, {clip.level}: {clip.query!r}, targets {list(clip.targets)}, "
          f"{len(clip)} frames) to {root}")  # fmt: skip
    return 0


def _split(args: argparse.Namespace) -> SplitRule:
    from conceptseg_edge.data.importers import SplitRule

    return SplitRule(args.test_fraction, args.seed)


def _import_mvtec(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.importers import import_mvtec

    return _imported(import_mvtec(args.src, args.out, name=args.name, split=_split(args)))


def _import_folder(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.importers import import_folder

    summary = import_folder(args.src, args.out, args.cls_name, level=args.level, images=args.images, masks=args.masks,
                            mask_suffix=args.mask_suffix, name=args.name, split=_split(args))  # fmt: skip
    return _imported(summary)


def _import_coco(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.importers import import_coco

    return _imported(import_coco(args.src, args.out, images=args.images, name=args.name, split=_split(args)))


def _imported(summary: ImportSummary) -> int:
    from conceptseg_edge.data.meta import ConceptSegDataset

    print(f"imported {summary.total} items to {summary.root}")
    _print_counts(ConceptSegDataset.open(summary.root))
    return 0


def _check(args: argparse.Namespace) -> int:
    from conceptseg_edge.data.meta import ConceptSegDataset

    _print_counts(ConceptSegDataset.open(args.root))
    return 0


def _print_counts(dataset: ConceptSegDataset) -> None:
    from collections import Counter

    for split in dataset.splits:
        counts = Counter((item.level, item.task_name) for _, _, _, item in dataset.items(split))
        total = sum(counts.values())
        print(f"{split}: {total} items in {len(dataset.splits[split])} classes")
        for (level, task), n in sorted(counts.items()):
            print(f"  {level} {task}: {n}")
