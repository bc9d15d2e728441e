"""Training beyond one process: ``accelerate launch --num_processes 2 --cpu`` (gloo) on the tiny stages.

Stage 1 splits each micro-batch over the processes and sums their gradients (``train.distributed``),
so two processes must follow the one-process curve with the same global batch. The tolerance
(``CURVE_RTOL``) covers float summation order only: the two runs add the same per-sample gradients
in a different order (two partial sums all-reduced vs one backward), ~1e-7 relative per step, and
Adam's normalised update can grow that on near-zero gradient entries over a few steps; 1e-4 is far
below any real difference (a lost or doubled share changes the loss in the first digits).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptseg_edge.train.config import save_config

REPO = Path(__file__).resolve().parents[1]
CURVE_RTOL = 1e-4

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch`` of the CLI on CPU, one torch thread per process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--cpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "conceptseg_edge", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def losses(out: Path) -> list[float]:
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    return [float(r["loss"]) for r in rows]


# --------------------------------------------------------------------------- stage 1


@pytest.fixture(scope="module")
def backbone_pt(tmp_path_factory) -> Path:
    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.train.backbone import write_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "backbone.pt"
    write_backbone(path, build_sam2_model("conceptseg_tiny", image_size=64).model)
    return path


def stage1_cfg(backbone_pt: Path, out: Path, **kw):
    from test_train_stage1 import tiny_cfg

    # a micro-batch of 4 split 2 + 2, two of them per step; the second phase changes the learning
    # rate, so a launch that restarted instead of resuming would log other losses for steps 1-2
    return tiny_cfg(backbone_pt, out, grad_accum=2, steps=2, save_every=1, eval_every=2, threads=1, **kw)


def test_stage1_two_processes_follow_one_and_resume(backbone_pt, tmp_path):
    from safetensors.torch import load_file

    from conceptseg_edge.models.checkpoint import load_checkpoint
    from conceptseg_edge.train.stage1 import train_stage1
    from conceptseg_edge.train.state import STATE_DIR

    one = stage1_cfg(backbone_pt, tmp_path / "one")
    train_stage1(one)
    train_stage1(dataclasses.replace(one, steps=4, lr=3e-3))

    two = stage1_cfg(backbone_pt, tmp_path / "two")
    for phase, cfg in (("a", two), ("b", dataclasses.replace(two, steps=4, lr=3e-3))):
        save_config(tmp_path / f"{phase}.yaml", cfg)
        launch("train", "stage1", "--config", str(tmp_path / f"{phase}.yaml"))
        if phase == "a":
            assert len(losses(tmp_path / "two")) == 2
            assert load_file(tmp_path / "two" / STATE_DIR / "tensors.safetensors")  # written, complete

    expected, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(got) == 4
    assert got == pytest.approx(expected, rel=CURVE_RTOL), (got, expected)
    a = load_checkpoint(tmp_path / "one" / "checkpoint").ctm.state_dict()
    b = load_checkpoint(tmp_path / "two" / "checkpoint").ctm.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=CURVE_RTOL, atol=1e-6) for k in a)
    # only the main process wrote: one state, no staging left, nothing per rank
    leftovers = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("."))
    assert leftovers == []
