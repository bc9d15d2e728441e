"""Training under bad input and bad luck (issue P7), one test per class, parametrised over its cases:

- every stage's config YAML is read by one strict reader: not UTF-8, a duplicate key, nesting too
  deep, a non-finite or out-of-float32 number, a string where a number goes: each one ``error:`` line
  naming the file and field, before anything is built or created;
- a diverging run stops at the first non-finite loss, naming the step, and inf/NaN is never saved;
- a kill at any instant of a state save resumes from the last complete state (each crash window is
  laid out on disk as the kill would leave it);
- a stage that fails before its first state leaves no out_dir behind, and a failed rerun leaves an
  existing run's directory exactly as it was;
- a bad out_dir (under a file, a file itself, somewhere nothing can be created) is one clean error
  before training starts.

Toy loops use a real ``torch.nn.Linear`` + AdamW through the stages' own ``run_steps``; the real
stages run at micro sizes on one thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptseg_edge.cli import main
from conceptseg_edge.errors import InputError, TrainingError
from conceptseg_edge.train.backbone import BackboneConfig, BackboneDataConfig, train_backbone
from conceptseg_edge.train.calibrate import CalibrateConfig
from conceptseg_edge.train.config import LoopConfig, load_config
from conceptseg_edge.train.loop import run_steps
from conceptseg_edge.train.stage1 import Stage1Config
from conceptseg_edge.train.state import STATE_DIR, has_state, load_state, save_state
from conceptseg_edge.train.tiny_default import ReportConfig
from conceptseg_edge.train.warmstart import WarmstartConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- config YAML

#: CLI stage -> (its config class, a float field, a string field, an int field)
CLI_STAGES = {
    "backbone": (BackboneConfig, "lr", "sam2_config", "steps"),
    "warmstart": (WarmstartConfig, "lr", "out_dir", "steps"),
    "stage1": (Stage1Config, "lr", "backbone_config", "batch_size"),
    "stage2": (None, "learning_rate", "loss_type", "num_generations"),  # Stage2Config: imported lazily (TRL)
    "calibrate-router": (CalibrateConfig, "tolerance", "checkpoint", "max_new_tokens"),
}


def bad_yaml_cases(float_field: str, int_field: str) -> dict[str, tuple[bytes, str]]:
    """Case -> (YAML bytes after an ``out_dir:`` line, what the error must say)."""
    return {
        "not-utf8": ("# café\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
        "duplicate-key": (f"{int_field}: 2\nprogress: false\n{int_field}: 3\n".encode(),
                          f"line 4, column 1: duplicate key '{int_field}' (first on line 2)"),
        "deep": (("x: " + "[" * 5000 + "]" * 5000 + "\n").encode(), "nested too deeply"),
        "inf": (f"{float_field}: .inf\n".encode(), f".{float_field}: expected float, got inf"),
        "minus-inf": (f"{float_field}: -.inf\n".encode(), f".{float_field}: expected float, got -inf"),
        "nan": (f"{float_field}: .nan\n".encode(), f".{float_field}: expected float, got nan"),
        "beyond-float32": (f"{float_field}: 1.0e+39\n".encode(), f".{float_field}: expected float, got 1e+39"),
        "string-for-number": (f"{float_field}: x\n".encode(), f".{float_field}: expected float, got 'x'"),
        "string-for-int": (f"{int_field}: many\n".encode(), f".{int_field}: expected int, got 'many'"),
    }


@pytest.mark.parametrize("case", list(bad_yaml_cases("f", "i")))
@pytest.mark.parametrize("stage", list(CLI_STAGES))
def test_cli_config_yaml_is_read_strictly(stage, case, tmp_path, capsys):
    _, float_field, _, int_field = CLI_STAGES[stage]
    text, needle = bad_yaml_cases(float_field, int_field)[case]
    out = tmp_path / "run"
    path = tmp_path / "bad.yaml"
    path.write_bytes(f"out_dir: {out}\n".encode() + text)
    assert main(["train", stage, "--config", str(path)]) == 2
    err = one_error_line(capsys)
    assert str(path) in err and needle in err, err
    assert not out.exists()  # refused before anything was created


@pytest.mark.parametrize("cls,float_field,int_field", [
    (BackboneConfig, "concept_lr_mult", "max_clicks"), (WarmstartConfig, "min_lr_ratio", "eval_max_new_tokens"),
    (Stage1Config, "dice_weight", "max_shortcut_words"), (CalibrateConfig, "tolerance", "max_new_tokens"),
    (ReportConfig, None, "episodes"),
])
def test_every_stage_config_shares_the_reader(cls, float_field, int_field, tmp_path):
    """Also the configs only ``tiny-default`` reads, and nested fields (named by their path)."""
    path = tmp_path / "c.yaml"
    cases = [(f"{int_field}: .inf\n", f"{cls.__name__}.{int_field}: expected int, got inf"),
             (f"{int_field}: 1\n{int_field}: 1\n", "duplicate key")]
    if float_field:
        cases.append((f"{float_field}: .nan\n", f"{cls.__name__}.{float_field}: expected float, got nan"))
    if dataclasses.is_dataclass(getattr(cls(), "data", None)):
        cases.append(("data: {seed: 1.5}\n", f"{cls.__name__}.data.seed: expected int, got 1.5"))
    for text, needle in cases:
        path.write_text(text)
        with pytest.raises(InputError) as info:
            load_config(path, cls)
        assert str(info.value).startswith(f"{path}: ") and needle in str(info.value), info.value


def test_stage2_config_types_checked_before_its_comparisons():
    """``learning_rate: x`` used to reach ``"x" > 0`` (a TypeError); built in code it is refused too."""
    from conceptseg_edge.train.stage2 import Stage2Config, Stage2Data

    for kwargs, needle in [({"learning_rate": "x"}, "stage2.learning_rate: expected float, got 'x'"),
                           ({"beta": float("inf")}, "stage2.beta: expected float, got inf"),
                           ({"data": Stage2Data(world_seed=0)}, None)]:
        if needle is None:
            Stage2Config(**kwargs)
            continue
        with pytest.raises(InputError) as info:
            Stage2Config(**kwargs)
        assert needle in str(info.value)
    with pytest.raises(InputError, match=r"stage2.data.cache_size: expected int, got '8'"):
        Stage2Data(cache_size="8")


# --------------------------------------------------------------------------- toy loop


class Toy:
    """A real Linear + AdamW whose step ``i`` draws its batch from ``default_rng([0, i])``."""

    def __init__(self, seed: int = 0, bad_at: int | None = None, bad_loss: float = float("nan")) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.bad_at, self.bad_loss = bad_at, bad_loss
        self.steps: list[int] = []

    def step(self, i: int) -> dict[str, float]:
        self.steps.append(i)
        rng = np.random.default_rng([0, i])
        x = torch.from_numpy(rng.normal(size=(8, 4)).astype(np.float32))
        loss = ((self.model(x) - x[:, :2]) ** 2).mean()
        if i + 1 == self.bad_at:
            loss = loss + self.bad_loss
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def run(self, out: Path, total: int, stop_after: int | None = None, save_every: int = 1) -> int:
        cfg = LoopConfig(eval_every=1000, save_every=save_every, progress=False)
        return run_steps("toy", cfg, out, {"toy": self.model}, self.optimizer, total, self.step,
                         evaluate=dict, postfix=lambda row: {}, stop_after=stop_after)[0]

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def state_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(f".{STATE_DIR}") or p.name == STATE_DIR)


# --------------------------------------------------------------------------- non-finite training


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("at", [1, 3])
def test_a_non_finite_loss_stops_the_loop_naming_the_step(bad, at, tmp_path):
    toy = Toy(bad_at=at, bad_loss=float(bad))
    with pytest.raises(TrainingError, match=rf": step {at}: the loss is {bad}"):
        toy.run(tmp_path, total=5, save_every=2)
    assert toy.steps == list(range(at))  # stopped at once
    if at == 1:
        assert not has_state(tmp_path) and not (tmp_path / "metrics.csv").exists()
        return
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == at  # header + the steps before it
    resumed = Toy(seed=1)  # the state of step 2 is intact, and finite
    assert load_state(tmp_path, {"toy": resumed.model}, resumed.optimizer)[0] == 2
    assert all(torch.isfinite(v).all() for v in resumed.model.state_dict().values())


@pytest.mark.parametrize("where", ["weight-nan", "weight-inf", "optimizer-inf"])
def test_non_finite_tensors_are_never_saved(where, tmp_path):
    toy = Toy()
    toy.run(tmp_path, total=2)
    assert load_state(tmp_path, {"toy": Toy(seed=1).model}, Toy(seed=1).optimizer)[0] == 2
    with torch.no_grad():
        if where == "weight-nan":
            toy.model.weight[0, 0] = float("nan")
        elif where == "weight-inf":
            toy.model.bias[1] = float("inf")
        else:
            toy.optimizer.state[toy.model.weight]["exp_avg"][0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"state of step 3: 1 of \d+ tensors hold inf or NaN"):
        save_state(tmp_path, 3, {"toy": toy.model}, toy.optimizer)
    fresh = Toy(seed=1)
    assert load_state(tmp_path, {"toy": fresh.model}, fresh.optimizer)[0] == 2  # the last good state stays
    assert state_files(tmp_path) == [STATE_DIR]


def test_a_diverging_stage_stops_with_one_error_line(tmp_path, capsys):
    """The issue's case through the CLI: a learning rate the loss cannot survive. The run stops at
    step 2 (the first NaN loss), keeps the finite state of step 1, and writes no checkpoint."""
    out = tmp_path / "run"
    cfg = tmp_path / "bb.yaml"
    cfg.write_text(f"out_dir: {out}\nimage_size: 64\nsteps: 4\nimages_per_step: 1\nprompts_per_image: 2\n"
                   "fill_steps: 0\nlocalize_steps: 0\nlr: 1.0e+30\nwarmup_steps: 0\nsave_every: 1\n"
                   "progress: false\neval_images: 1\ndata: {image_size: 64, train_episodes: 2, val_episodes: 1}\n")
    assert main(["train", "backbone", "--config", str(cfg)]) == 2
    err = one_error_line(capsys)
    assert f"{out}: step 2: the loss is nan" in err
    assert not (out / "backbone.pt").exists()
    from safetensors.torch import load_file

    tensors = load_file(out / STATE_DIR / "tensors.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


# --------------------------------------------------------------------------- durable state


@pytest.fixture(scope="module")
def toy_states(tmp_path_factory) -> dict[str, Path]:
    """Real state directories of the toy run after steps 2 and 3, and the uninterrupted run's end."""
    root = tmp_path_factory.mktemp("toy")
    states = {}
    for step in (2, 3):
        Toy().run(root / f"run{step}", total=5, stop_after=step)
        states[f"s{step}"] = root / f"run{step}" / STATE_DIR
    straight = Toy()
    straight.run(root / "straight", total=5)
    states["straight"] = root / "straight"
    return states


def _half_written(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    data = (dst / "tensors.safetensors").read_bytes()
    (dst / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    (dst / "state.json").unlink()


#: Crash window -> (the directories a kill leaves there, the step the resumed run must continue from)
CRASH_WINDOWS = {
    # killed while the new state was being written: the old one is in place
    "writing-tmp": (lambda s, out: (shutil.copytree(s["s2"], out / STATE_DIR),
                                    _half_written(s["s3"], out / ".state.0a1b2c3d4e5f.tmp")), 2),
    # killed during the very first save
    "first-save": (lambda s, out: _half_written(s["s2"], out / ".state.0a1b2c3d4e5f.tmp"), 0),
    # killed between the two renames: no state/, the previous one moved aside, the new one complete in tmp
    "between-renames": (lambda s, out: (shutil.copytree(s["s2"], out / ".state.0a1b2c3d4e5f.old"),
                                        shutil.copytree(s["s3"], out / ".state.f5e4d3c2b1a0.tmp")), 2),
    # killed after the swap, before the moved-aside state was deleted (or half-way through deleting it)
    "old-not-removed": (lambda s, out: (shutil.copytree(s["s3"], out / STATE_DIR),
                                        shutil.copytree(s["s2"], out / ".state.0a1b2c3d4e5f.old")), 3),
    "old-half-removed": (lambda s, out: (shutil.copytree(s["s3"], out / STATE_DIR),
                                         _half_written(s["s2"], out / ".state.0a1b2c3d4e5f.old")), 3),
}


@pytest.mark.parametrize("window", list(CRASH_WINDOWS))
def test_a_kill_in_any_window_of_a_save_resumes_from_the_last_complete_state(window, toy_states, tmp_path):
    layout, start = CRASH_WINDOWS[window]
    out = tmp_path / "run"
    out.mkdir()
    layout(toy_states, out)
    if start:
        shutil.copy(toy_states["straight"] / "metrics.csv", out / "metrics.csv")
    assert has_state(out) == bool(start)
    resumed = Toy(seed=7 if start else 0)  # resuming, another init: everything must come from the state
    assert resumed.run(out, total=5) == 5
    assert resumed.steps == list(range(start, 5))  # continued where the last complete state ended
    straight = Toy(seed=3)
    assert load_state(toy_states["straight"], {"toy": straight.model}, straight.optimizer)[0] == 5
    for name, value in resumed.model.state_dict().items():  # exactly the uninterrupted run's weights
        assert torch.equal(value, straight.model.state_dict()[name]), name
    assert state_files(out) == [STATE_DIR]  # stale tmp and moved-aside directories cleaned
    assert (out / "metrics.csv").read_text() == (toy_states["straight"] / "metrics.csv").read_text()


def test_the_real_backbone_resumes_from_a_moved_aside_state(tmp_path):
    """The between-renames window on a real stage: the resumed run equals an uninterrupted one."""
    cfg = BackboneConfig(
        image_size=64, steps=3, images_per_step=1, prompts_per_image=2, warmup_steps=0, fill_steps=1,
        localize_steps=1, eval_every=100, save_every=1, eval_images=1, progress=False,
        data=BackboneDataConfig(image_size=64, train_episodes=4, val_episodes=1))
    a, b = tmp_path / "a", tmp_path / "b"
    train_backbone(cfg, a, stop_after=1)
    step1 = tmp_path / "step1"
    shutil.copytree(a / STATE_DIR, step1)
    train_backbone(cfg, a, stop_after=2)
    (a / STATE_DIR).rename(a / ".state.f5e4d3c2b1a0.tmp")  # the new state, never swapped in
    step1.rename(a / ".state.0a1b2c3d4e5f.old")  # the previous one, moved aside
    done = train_backbone(cfg, a)
    straight = train_backbone(cfg, b)
    x = torch.load(done.checkpoint, weights_only=True)["model"]
    y = torch.load(straight.checkpoint, weights_only=True)["model"]
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert state_files(a) == [STATE_DIR]


# --------------------------------------------------------------------------- failed stages, bad out_dir


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _tiny_backbone_yaml(out: Path, **extra: str) -> str:
    fields = {"out_dir": str(out), "image_size": "64", "steps": "2", "images_per_step": "1", "prompts_per_image": "2",
              "fill_steps": "0", "localize_steps": "0", "progress": "false", "eval_images": "1",
              "data": "{image_size: 64, train_episodes: 2, val_episodes: 1}", **extra}
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


#: CLI stage -> a config whose run fails after the out_dir check, before the first state
FAILING = {
    "backbone": lambda out, tmp: _tiny_backbone_yaml(out, init_checkpoint=str(tmp / "missing.pt")),
    "backbone-nan": lambda out, tmp: _tiny_backbone_yaml(out, lr="1.0e+30", save_every="100"),
    "warmstart": lambda out, tmp: f"out_dir: {out}\nprogress: false\ndata: {{source: meta, root: {tmp / 'nowhere'}}}\n",
    "stage1": lambda out, tmp: f"out_dir: {out}\nprogress: false\npolicy_checkpoint: {tmp / 'nowhere'}\n"
                               "backbone_config: conceptseg_tiny\nbackbone_image_size: 64\n"
                               "data: {image_size: 64, train_episodes: 2, val_episodes: 1}\n",
    "stage2": lambda out, tmp: f"out_dir: {out}\nprogress: false\nstage1_checkpoint: {tmp / 'nowhere'}\n"
                               "bf16: false\nuse_cpu: true\n",
    "calibrate-router": lambda out, tmp: f"out_dir: {out}\nprogress: false\ncheckpoint: {tmp / 'nowhere'}\n",
}


@pytest.mark.parametrize("case", list(FAILING))
def test_a_failed_first_run_leaves_no_out_dir(case, tmp_path, capsys):
    out = tmp_path / "deep" / "run"  # parents created by the run go too
    cfg = tmp_path / "c.yaml"
    cfg.write_text(FAILING[case](out, tmp_path))
    assert main(["train", case.split("-nan")[0], "--config", str(cfg)]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize("case", ["backbone", "warmstart", "stage1", "stage2", "calibrate-router"])
def test_a_failed_rerun_leaves_an_existing_run_as_it_was(case, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("the run that was here\n")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("kept")
    before = _tree_digest(out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(FAILING[case](out, tmp_path))
    assert main(["train", case, "--config", str(cfg)]) == 2
    one_error_line(capsys)
    assert _tree_digest(out) == before


#: How an out_dir can be unusable -> (the path, given tmp_path; what the error says)
BAD_OUT = {
    "under-a-file": (lambda tmp: tmp / "file" / "run", "is a file, expected a directory among its parents"),
    "a-file": (lambda tmp: tmp / "file", "exists and is not a directory"),
    "unwritable": (lambda tmp: Path("/proc/conceptseg-run"), "cannot create files in /proc"),
}


@pytest.mark.parametrize("kind", list(BAD_OUT))
@pytest.mark.parametrize("stage", ["backbone", "warmstart", "stage1", "stage2", "calibrate-router", "tiny-default"])
def test_a_bad_out_dir_is_one_error_before_training(stage, kind, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    path, needle = BAD_OUT[kind]
    out = path(tmp_path)
    if stage == "tiny-default":
        argv = ["train", "tiny-default", "--out", str(out)]
    else:
        cfg = tmp_path / "c.yaml"
        body = _tiny_backbone_yaml(out) if stage == "backbone" else f"out_dir: {out}\nprogress: false\n"
        if stage == "stage2":
            body += "bf16: false\nuse_cpu: true\n"
        if stage == "calibrate-router":
            body += f"checkpoint: {tmp_path / 'nowhere'}\n"
        cfg.write_text(body)
        argv = ["train", stage, "--config", str(cfg)]
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert str(out) in err and needle in err, err
    assert (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.parametrize("name,edit,needle", [
    *[(n, "zzz: 1\nzzz: 2\n", "duplicate key 'zzz'")
      for n in ("backbone", "warmstart", "stage1", "stage2", "calibrate", "export", "report")],
    ("report", "episodes: .nan\n", "ReportConfig.episodes: expected int, got nan"),
    ("calibrate", "tolerance: 2.0\n", "calibrate.tolerance: expected a fraction"),
])
def test_tiny_default_checks_every_stage_config_before_training(name, edit, needle, tmp_path, capsys):
    """A bad value in the last stage's YAML is an error before the first stage trains, not after."""
    from conceptseg_edge.train.tiny_default import CONFIG_DIR

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    path = configs / f"{name}.yaml"
    lines = [line for line in path.read_text().splitlines(keepends=True)
             if line.split(":")[0] not in ("episodes", "tolerance")]
    path.write_text("".join(lines) + edit)
    out = tmp_path / "run"
    assert main(["train", "tiny-default", "--out", str(out), "--configs", str(configs)]) == 2
    err = one_error_line(capsys)
    assert needle in err and (str(path) in err or name == "calibrate" and edit.startswith("tol")), err
    assert not out.exists()
