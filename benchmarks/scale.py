"""What exporting each SAM 2.1 size costs, and whether each export still equals upstream.

``python -m conceptseg_edge.benchmarks.scale sam2 --out runs/scale_sam2.json`` does, per size
(tiny, small, base+, large): write a seeded random-init checkpoint in the official ``.pt`` layout
(``{"model": state_dict}``), export it with ``export_sam2`` in a fresh process, and record the
export's wall time, that process's peak RSS (its ``VmHWM``, ``stats.own_peak_rss_mib``, read right
after the export, before anything else runs in it), the bundle's size on disk, and the mask IoU between
the exported bundle on our runtime (``SAM2Predictor``, ONNX Runtime CPU) and the sam2 package's own
``SAM2ImagePredictor`` on scikit-image's sample photographs, for a click and a box per photo.

Each size runs in its own spawned process so one size's memory never counts toward another's. The
checkpoint is written in a separate process first, so its cost is not the export's. Results are JSON
(``docs/scale.md`` renders them); random weights mean the masks are meaningless as segmentations,
but both sides compute them from the same weights, which is what parity needs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np

from conceptseg_edge.benchmarks.stats import own_peak_rss_mib
from conceptseg_edge.fileio import write_json

#: The four official SAM 2.1 sizes, by their ``export sam2 --config`` names.
SAM2_SIZES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")

#: scikit-image's bundled photographs (they ship inside its wheel; nothing is downloaded).
PHOTOS = ("astronaut", "coffee", "chelsea")

#: Prompts in fractions of the photo's width / height: a single click (multimask, best by predicted
#: IoU, as both predictors pick) and a box (one mask).
PROMPTS: dict[str, dict[str, Any]] = {
    "point": {"points": [[0.5, 0.4]], "labels": [1]},
    "box": {"box": [0.25, 0.2, 0.75, 0.8]},
}


@dataclass(frozen=True)
class MaskParity:
    """One photo × prompt: our runtime's mask against ``SAM2ImagePredictor``'s."""

    photo: str
    prompt: str
    iou: float
    background_iou: float  # IoU of the complements: the stricter number when the mask covers most of the photo
    fraction: float  # foreground fraction of the upstream mask: shows how much of the photo the mask covers


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph, (H, W, 3) uint8 RGB."""
    from skimage import data

    return getattr(data, name)()


def save_seeded_checkpoint(path: Path, config: str, image_size: int, seed: int = 0) -> Path:
    """A random-init SAM2 saved like the official ``.pt`` (``{"model": state_dict}``)."""
    import torch

    from conceptseg_edge.models.sam2 import build_sam2_model

    torch.manual_seed(seed)
    model = build_sam2_model(config, image_size=image_size).model
    torch.save({"model": model.state_dict()}, path)
    return path


def upstream_parity(
    bundle: Path, config: str, checkpoint: Path, image_size: int, photos: tuple[str, ...] = PHOTOS
) -> list[MaskParity]:
    """Mask IoU of ``bundle`` on our runtime vs ``SAM2ImagePredictor`` on ``checkpoint``, per photo × prompt.

    Both sides take prompts in original-image pixels and return masks at the photo's size; a click
    takes the highest-scoring of the three multimask outputs on both sides, a box the single mask.
    """
    from conceptseg_edge.metrics import iou
    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.models.upstream import upstream_predictor
    from conceptseg_edge.runtime.predictor import SAM2Predictor

    ours = SAM2Predictor.from_bundle(bundle)
    theirs = upstream_predictor(build_sam2_model(config, checkpoint, image_size).model)
    rows = []
    for name in photos:
        image = photo(name)
        h, w = image.shape[:2]
        ours.set_image(image)
        theirs.set_image(image)
        for prompt, rel in PROMPTS.items():
            points = np.array(rel["points"], np.float32) * [w, h] if "points" in rel else None
            labels = np.array(rel["labels"], np.int32) if "labels" in rel else None
            box = np.array(rel["box"], np.float32) * [w, h, w, h] if "box" in rel else None
            multimask = box is None
            got = ours.predict(points=points, labels=labels, box=box, multimask=multimask)
            masks, scores, _ = theirs.predict(point_coords=points, point_labels=labels, box=box, multimask_output=multimask)
            ref = masks[int(np.argmax(scores))].astype(bool)
            rows.append(MaskParity(name, prompt, iou(got.mask, ref), iou(~got.mask, ~ref), float(ref.mean())))
    return rows


def _bundle_bytes(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())


def _export_and_compare(config: str, checkpoint: str, image_size: int, out: str) -> dict[str, Any]:
    """In a fresh process: export, read this process's peak RSS, then check parity (after the peak read)."""
    from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2

    t0 = time.perf_counter()
    export_sam2(SAM2ExportConfig(config, checkpoint, image_size=image_size), out, progress=False)
    seconds = time.perf_counter() - t0
    peak_mib = own_peak_rss_mib()
    load = os.getloadavg()[0]  # wall time is only comparable between runs on equally loaded machines
    parity = upstream_parity(Path(out), config, Path(checkpoint), image_size)
    return {
        "export_seconds": round(seconds, 1),
        "export_peak_rss_mib": round(peak_mib),
        "bundle_mib": round(_bundle_bytes(Path(out)) / 2**20, 1),
        "load_average_1m": round(load, 1),
        "min_mask_iou": min(p.iou for p in parity),
        "min_background_iou": min(p.background_iou for p in parity),
        "parity": [asdict(p) for p in parity],
    }


def _in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a new spawned process, so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def measure_sam2(config: str, image_size: int, workdir: Path, seed: int = 0) -> dict[str, Any]:
    """Export one size from a seeded official-layout checkpoint and measure it (see module docstring)."""
    checkpoint = workdir / f"{config}.pt"
    _in_fresh_process(save_seeded_checkpoint, checkpoint, config, image_size, seed)
    bundle = workdir / config
    row = _in_fresh_process(_export_and_compare, config, str(checkpoint), image_size, str(bundle))
    checkpoint_mib = round(checkpoint.stat().st_size / 2**20, 1)
    checkpoint.unlink()  # large's checkpoint and bundle are ~1.7 GB: free them before the next size
    shutil.rmtree(bundle)
    return {"config": config, "image_size": image_size, "seed": seed,
            "checkpoint_mib": checkpoint_mib, **row}


def machine() -> dict[str, Any]:
    """This machine, the library versions and the commit (``+dirty`` with uncommitted changes) of a run."""
    import onnxruntime
    import torch

    mem_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    here = Path(__file__).resolve().parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip() or None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=here).stdout.strip()
    if commit and dirty:
        commit += "+dirty"  # the figures come from uncommitted code
    return {"cpus": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conceptseg_edge.benchmarks.scale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sam2 = sub.add_parser("sam2", help="export each SAM 2.1 size and measure it")
    sam2.add_argument("--out", required=True, help="JSON file to write")
    sam2.add_argument("--sizes", nargs="+", default=list(SAM2_SIZES), choices=SAM2_SIZES, help="which sizes")
    sam2.add_argument("--image-size", type=int, default=1024, help="export input size (SAM 2.1: 1024)")
    args = parser.parse_args(argv)
    info, rows = machine(), []
    with tempfile.TemporaryDirectory(prefix="scale-sam2-") as tmp:
        for config in args.sizes:
            row = measure_sam2(config, args.image_size, Path(tmp))
            print(f"{config}: export {row['export_seconds']} s, peak RSS {row['export_peak_rss_mib']} MiB, "
                  f"bundle {row['bundle_mib']} MiB, min IoU {row['min_mask_iou']:.4f}", file=sys.stderr, flush=True)
            rows.append(row)
            write_json(args.out, {"machine": info, "sam2": rows})  # after each size: large takes minutes
    return 0


if __name__ == "__main__":
    sys.exit(main())
