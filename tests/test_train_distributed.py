"""Training beyond one process: ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (gloo).

accelerate 1.15's ``--cpu`` flag takes its single-process launcher whatever ``--num_processes``
says; ``--multi_gpu`` takes torch's elastic launcher, which starts the processes, and each joins a
gloo group on the CPU (stage 1's ``processes()``, stage 2's ``use_cpu: true`` config). The test
asserts that two processes did run (``world_size`` in the run's log), not only that the launch worked.

Stage 1 splits each micro-batch over the processes and sums their gradients (``train.distributed``),
so two processes must follow the one-process curve with the same global batch. The tolerances
cover float summation order only: the runs add the same per-sample gradients in a different order
(partial sums all-reduced vs one backward), ~1e-7 relative. Losses: ``CURVE_RTOL`` = 1e-4 (measured:
equal to the last digit over 4 stage-1 steps); a lost or doubled share moves them in the first
digits. Weights: ``WEIGHT_RTOL`` = 1e-3 on each tensor's relative norm difference (measured: 2.5e-5
after 4 steps), not elementwise: parameters whose true gradient is zero (attention's key bias:
softmax ignores it) get float-noise gradients that Adam's normalised update turns into steps of
about the learning rate, in whatever direction the noise points, in one run as in the other.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conceptseg_edge.train.config import save_config

# the stage-1 checkpoint stage 2's tests start from (a fixture), and their config writer
from test_train_stage2 import stage1, write_config  # noqa: F401  (stage1 is a fixture)

REPO = Path(__file__).resolve().parents[1]
CURVE_RTOL = 1e-4
WEIGHT_RTOL = 1e-3

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(*args: str, processes: int = 2) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` of the CLI with ``processes`` CPU processes, one torch thread each."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "conceptseg_edge", *args]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def launch(*args: str) -> None:
    cmd, env = launch_command(*args)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def launch_and_kill_at(path: Path, *args: str) -> None:
    """Launch, and kill every process of the run (SIGKILL, no clean-up) once ``path`` exists.

    torch's elastic agent starts each worker in a session of its own (``start_new_session``), so
    killing the launcher's process group leaves the workers training on: the "killed" run then
    writes its next checkpoints beside the relaunch. The workers are found by walking the launcher's
    process tree and are killed by pid."""
    import psutil

    cmd, env = launch_command(*args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not path.exists():
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {path} was written"
            assert time.monotonic() < deadline, f"{path} not written in 600 s"
            time.sleep(0.1)
    finally:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        os.killpg(proc.pid, signal.SIGKILL)
        for child in tree:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive, f"processes of the killed run still alive: {alive}"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(
        float((x[k].double() - y[k].double()).norm()) <= WEIGHT_RTOL * max(float(x[k].double().norm()), 1e-12)
        for k in x)


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

    assert json.loads((tmp_path / "two" / "stage1.json").read_text())["processes"] == 2
    assert json.loads((tmp_path / "one" / "stage1.json").read_text())["processes"] == 1
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(got) == 4
    assert got == pytest.approx(expected, rel=CURVE_RTOL), (got, expected)
    assert same_weights(load_checkpoint(tmp_path / "one" / "checkpoint").ctm,
                        load_checkpoint(tmp_path / "two" / "checkpoint").ctm)
    # only the main process wrote: one state, no staging left, nothing per rank
    leftovers = sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("."))
    assert leftovers == []


# --------------------------------------------------------------------------- stage 2


def metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]


def test_stage2_two_processes_follow_one_and_resume(stage1, tmp_path):
    """Two processes x one prompt against one process x two accumulated micro-batches of one prompt:
    the same global batch (2 prompts x 2 completions a step) and the same per-forward padding.
    Sampling at temperature 1e-6 is greedy, so both runs score the same completions (their sampling
    RNGs differ: TRL seeds each process apart); the groups' completions are then identical, the
    advantages zero, and the curves (loss, the CTM's segmentation loss, grad norm, rewards) compare
    the data split, the loss normalisation and DDP's gradient averaging, to ``CURVE_RTOL``."""
    from conceptseg_edge.models.checkpoint import load_checkpoint
    from conceptseg_edge.train.stage2 import run_stage2

    common = {"prompts_per_device": 1, "steps_per_generation": 1, "temperature": 1e-6, "data": {"eval_episodes": 0}}
    run_stage2(write_config(tmp_path / "one.yaml", stage1, tmp_path / "one", gradient_accumulation_steps=2, **common))
    config = write_config(tmp_path / "two.yaml", stage1, tmp_path / "two", **common)
    trainer = tmp_path / "two" / "trainer"
    launch_and_kill_at(trainer / "checkpoint-1", "train", "stage2", "--config", str(config))
    assert not (trainer / "checkpoint-2").exists()  # killed during step 2 (a step takes seconds)
    written = ((trainer / "checkpoint-1").stat().st_ino, (trainer / "checkpoint-1").stat().st_mtime_ns)
    launch("train", "stage2", "--config", str(config))  # resumes from checkpoint-1
    assert ((trainer / "checkpoint-1").stat().st_ino, (trainer / "checkpoint-1").stat().st_mtime_ns) == written

    expected, got = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in expected] == [1.0, 2.0]
    # the relaunch resumed from checkpoint-1 and stopped at max_steps: no step 3, no checkpoint-3
    assert [r["step"] for r in got] == [1.0, 2.0]
    assert sorted(p.name for p in trainer.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    assert [r["epoch"] for r in got] == pytest.approx([1 / 3, 2 / 3], rel=1e-3)  # 2 prompts a step: 2 processes
    for key in ("loss", "seg_loss", "grad_norm", "reward", "rewards/mask_iou/mean", "kl", "learning_rate"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in expected], rel=CURVE_RTOL, abs=1e-9), key
    a, b = (load_checkpoint(tmp_path / run / "checkpoint") for run in ("one", "two"))
    assert same_weights(a.ctm, b.ctm) and same_weights(a.policy, b.policy)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "two" / "trainer").iterdir())


# --------------------------------------------------------------------------- accelerate configs


def test_deepspeed_zero3_config_is_read_by_accelerates_own_launcher(monkeypatch):
    """``accelerate launch --config_file train/accelerate/deepspeed_zero3.yaml``'s own parsing: the
    file's values become the launch arguments and the environment DeepSpeedPlugin is built from.
    DeepSpeed itself is not needed for either (nor installed here); only starting the run imports it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = REPO / "train" / "accelerate" / "deepspeed_zero3.yaml"
    parsed = launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "conceptseg_edge", "train", "stage2", "--config", "stage2.yaml"])
    args, defaults, _ = _validate_launch_command(parsed)  # what launch_command runs first
    assert defaults.distributed_type == DistributedType.DEEPSPEED
    assert (args.use_deepspeed, args.num_processes, args.mixed_precision) == (True, 8, "bf16")
    assert (args.zero_stage, args.zero3_init_flag, args.zero3_save_16bit_model) == (3, False, True)
    assert (args.offload_optimizer_device, args.offload_param_device, args.gradient_clipping) == ("none", "none", 1.0)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # what Accelerator builds in each launched process
    assert plugin.zero_stage == 3 and not plugin.zero3_init_flag
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0


def test_multi_gpu_config_is_read_by_accelerates_own_launcher():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = REPO / "train" / "accelerate" / "multi_gpu.yaml"
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "conceptseg_edge", "train", "stage1", "--config", "stage1.yaml"]))
    assert (args.multi_gpu, args.use_deepspeed, args.num_processes, args.mixed_precision) == (True, False, 8, "bf16")
