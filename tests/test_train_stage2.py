"""Stage 2 (Meta-GRPO on TRL's GRPOTrainer) on CPU: tiny policy, tiny CTM, tiny SAM2, ConceptWorld.

The training tests run real TRL steps (a few seconds each on two cores), so they are ``slow``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

try:  # TRL imports datasets, which imports pyarrow: pyarrow 26+ refuses numpy < 2
    from trl import GRPOTrainer  # noqa: F401
except (ImportError, RuntimeError) as exc:
    pytest.skip(f"trl.GRPOTrainer cannot be imported in this environment: {exc}", allow_module_level=True)

from safetensors.torch import load_file

from conceptseg_edge.errors import InputError
from conceptseg_edge.models.checkpoint import load_checkpoint
from conceptseg_edge.models.policy import PolicyWrapper
from conceptseg_edge.train.config import load_config
from conceptseg_edge.train.log import MetricsLogger
from conceptseg_edge.train.stage2 import (
    EpisodeStore,
    Stage2Config,
    Stage2Data,
    build_dataset,
    build_trainer,
    capture_last_hidden,
    run_stage2,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "train" / "configs" / "tiny" / "stage2.yaml"
# The tiny config, shrunk further for tests: two completions of 16 tokens per prompt, 2 steps.
TEST_OVERRIDES = {
    "data": {"world_image_size": 64, "train_episodes": 6, "eval_episodes": 1},
    "num_generations": 2,
    "max_completion_length": 16,
    "eval_max_new_tokens": 8,
    "learning_rate": 1.0e-4,
    "max_steps": 2,
    "save_steps": 1,
    "save_total_limit": None,
    "progress": False,
}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A stage-1 checkpoint: tiny Qwen2.5-VL + 2-block CTM + the 128 px tiny SAM2, all random."""
    from conftest import save_seeded_checkpoint

    from conceptseg_edge.models.checkpoint import BackboneSpec, save_checkpoint
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
    from conceptseg_edge.models.policy import build_policy, build_processor, tiny_policy_config
    from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
    from conceptseg_edge.router import RouterConfig

    root = tmp_path_factory.mktemp("stage1")
    sam = save_seeded_checkpoint(root / "sam2.pt", "conceptseg_tiny", 128)
    tokenizer = train_tiny_tokenizer()
    policy = build_policy(tiny_policy_config(tokenizer), seed=0)
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=128, num_heads=4, depth=2))
    backbone = BackboneSpec("conceptseg_tiny", str(sam), image_size=128)
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    return save_checkpoint(root / "checkpoint", policy, ctm, processor, RouterConfig(), backbone)


def write_config(path: Path, stage1: Path, out: Path, **overrides) -> Path:
    data = yaml.safe_load(TINY.read_text())
    for source in (TEST_OVERRIDES, overrides):
        for key, value in source.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    data.update(stage1_checkpoint=str(stage1), out_dir=str(out))
    path.write_text(yaml.safe_dump(data))
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def run_a(stage1, tmp_path_factory) -> tuple[Path, Path]:
    """Two full-fine-tuning steps through the public entry point; (config, out_dir)."""
    root = tmp_path_factory.mktemp("run_a")
    config = write_config(root / "stage2.yaml", stage1, root / "out")
    run_stage2(config)
    return config, root / "out"


# --------------------------------------------------------------------------- config and data


def test_config_defaults_are_the_papers():
    cfg = Stage2Config()
    assert (cfg.num_generations, cfg.beta, cfg.epsilon, cfg.learning_rate) == (8, 0.04, 0.2, 1e-6)
    assert (cfg.temperature, cfg.max_completion_length, cfg.loss_type, cfg.seg_loss_weight) == (1.0, 2048, "grpo", 0.01)
    assert (cfg.prompts_per_device, cfg.num_iterations, cfg.bf16, cfg.lora.enabled) == (8, 1, True, False)
    shipped = load_config(REPO / "train" / "configs" / "stage2.yaml", Stage2Config)
    assert shipped.data.source == "all_meta" and shipped.num_generations == 8 and shipped.bf16
    tiny = load_config(TINY, Stage2Config)
    args = tiny.grpo_config(Path("unused"))
    assert (args.num_generations, args.beta, args.epsilon, args.loss_type) == (4, 0.04, 0.2, "grpo")
    assert args.per_device_train_batch_size == tiny.prompts_per_device * tiny.num_generations  # completions
    assert (args.scale_rewards, args.temperature, args.top_k, args.top_p) == ("group", 1.0, 0, 1.0)
    assert (args.max_completion_length, args.num_iterations, args.remove_unused_columns) == (80, 1, False)


def test_config_is_strict(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, field in [
        ("num_generation: 8\n", "num_generation"),
        ("num_generations: 1\n", "num_generations"),
        ("loss_type: ppo\n", "loss_type"),
        ("data: {source: all_meta}\n", "data.root"),
        ("data: {source: coco}\n", "data.source"),
    ]:
        bad.write_text(text)
        with pytest.raises(InputError, match=field.split(".")[-1]):
            load_config(bad, Stage2Config)


def test_episode_rows_are_conversational_and_deterministic(tmp_path):
    from PIL import Image

    from conceptseg_edge.data.world import make_world

    store = EpisodeStore(Stage2Data(world_image_size=64, train_episodes=3, eval_episodes=2))
    assert store.train_ids() == ["world/0", "world/1", "world/2"] and store.eval_ids() == ["world/3", "world/4"]
    row = store.row("world/0")  # a CI episode: four supports, the top-left box hidden
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["prompt"][1]["content"].startswith("Image 1")
    assert len(row["images"]) == 2 and all(isinstance(i, Image.Image) and i.size == (600, 600) for i in row["images"])
    assert row["has_hidden_box"] and len(row["hidden_box"]) == 4 and len(row["gt_box"]) == 4
    again = EpisodeStore(store.data).get("world/0")
    assert np.array_equal(again.mosaic, store.get("world/0").mosaic) and again.prompt == store.get("world/0").prompt
    assert build_dataset(store.train_ids())[1] == {"episode_id": "world/1"}
    with pytest.raises(InputError):
        store.get("test/0/circle")

    root = make_world(tmp_path / "world", 20, image_size=64, progress=False)
    meta = EpisodeStore(Stage2Data(source="all_meta", root=str(root), eval_episodes=2))
    train, held_out = meta.train_ids(), meta.eval_ids()
    assert train and len(held_out) == 2 and all(i.startswith("test/") for i in held_out)
    first = meta.row(train[0])
    assert first["episode_id"] == train[0] and isinstance(first["has_hidden_box"], bool)
    fresh = EpisodeStore(meta.data)
    assert np.array_equal(fresh.get(train[0]).target, meta.get(train[0]).target)  # supports seeded by id


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_run_stage2_trains_and_writes_everything(run_a, stage1):
    _, out = run_a
    before, after = load_checkpoint(stage1), load_checkpoint(out / "checkpoint")
    changed = [
        name for name, p in after.policy.state_dict().items() if not torch.equal(p, before.policy.state_dict()[name])
    ]
    assert any(n.startswith("model.language_model.") for n in changed) and any("visual" in n for n in changed)
    assert any(not torch.equal(p, before.ctm.state_dict()[n]) for n, p in after.ctm.state_dict().items())
    assert after.backbone == before.backbone

    rows = MetricsLogger(out).rows
    assert [r["step"] for r in rows] == [1.0, 2.0]
    for key in ("reward", "rewards/format_reward/mean", "rewards/box_reward/mean", "rewards/mask_iou/mean",
                "seg_loss", "kl", "loss", "entropy", "clip_ratio/region_mean"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((out / "eval.json").read_text())
    assert report["episodes"] == ["world/6"]
    for stage in ("stage1", "stage2"):
        assert set(report[stage]) == {"format_reward", "box_reward", "mask_iou", "total", "episodes"}
        assert report[stage]["total"] == pytest.approx(
            report[stage]["format_reward"] + report[stage]["box_reward"] + report[stage]["mask_iou"]
        )
    assert report["stage2_minus_stage1"] == pytest.approx(report["stage2"]["total"] - report["stage1"]["total"])

    trainer_dir = out / "trainer"
    assert sorted(p.name for p in trainer_dir.iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "reference_policy" / "config.json").is_file()  # full fine-tuning with beta > 0
    assert load_config(out / "stage2.yaml", Stage2Config).out_dir == str(out)


@pytest.mark.slow
def test_resume_takes_the_same_next_step(run_a, tmp_path):
    """A run that died after checkpoint-1 (mid-way through saving checkpoint-2) resumes to the same step 2."""
    config, out_a = run_a
    out_b = tmp_path / "out"
    (out_b / "trainer").mkdir(parents=True)
    shutil.copytree(out_a / "trainer" / "checkpoint-1", out_b / "trainer" / "checkpoint-1")
    shutil.copytree(out_a / "reference_policy", out_b / "reference_policy")
    report = json.loads((out_a / "eval.json").read_text())
    (out_b / "eval.json").write_text(json.dumps({"episodes": report["episodes"], "stage1": report["stage1"]}))
    torn = out_b / "trainer" / ".tmp-checkpoint-2" / "checkpoint-2"
    torn.mkdir(parents=True)
    (torn / "model.safetensors").write_bytes(b"half-written")

    run_stage2(config, out_dir=out_b)

    a, b = tensors(out_a / "trainer" / "checkpoint-2"), tensors(out_b / "trainer" / "checkpoint-2")
    assert a.keys() == b.keys() and any(k.startswith("ctm.") for k in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    rows_a, rows_b = MetricsLogger(out_a).rows, MetricsLogger(out_b).rows
    assert rows_b[-1]["step"] == 2.0
    for key in ("reward", "rewards/mask_iou/mean", "seg_loss", "kl"):  # the same rollouts, the same losses
        assert rows_b[-1][key] == pytest.approx(rows_a[-1][key], abs=1e-6), key
    assert not list((out_b / "trainer").glob(".tmp-*"))
    assert json.loads((out_b / "eval.json").read_text())["stage1"] == report["stage1"]


@pytest.mark.slow
def test_a_run_resumed_at_max_steps_takes_no_further_step(run_a, tmp_path):
    """Killed after saving its last trainer checkpoint (step 2, mid-epoch), before writing
    ``out_dir/checkpoint``: the relaunch loads checkpoint-2 and writes it out, and takes no step 3."""
    config, out_a = run_a
    out_c = tmp_path / "out"
    shutil.copytree(out_a, out_c, ignore=lambda d, names: ["checkpoint"] if Path(d) == out_a else [])
    assert not (out_c / "checkpoint").exists()

    run_stage2(config, out_dir=out_c)

    assert sorted(p.name for p in (out_c / "trainer").iterdir() if p.is_dir()) == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in MetricsLogger(out_c).rows] == [1.0, 2.0]
    a, c = load_checkpoint(out_a / "checkpoint"), load_checkpoint(out_c / "checkpoint")
    for x, y in ((a.policy, c.policy), (a.ctm, c.ctm)):
        assert all(torch.equal(v, y.state_dict()[k]) for k, v in x.state_dict().items())


@pytest.fixture(scope="module")
def one_step(stage1, tmp_path_factory):
    """One optimiser step on two prompts x two completions; (trainer, CTM before the step)."""
    root = tmp_path_factory.mktemp("one_step")
    config = write_config(root / "c.yaml", stage1, root / "out", prompts_per_device=2, max_steps=1, save_steps=10)
    trainer, _ = build_trainer(load_config(config, Stage2Config))
    ctm_before = copy.deepcopy(trainer.ctm)
    trainer.train()
    return trainer, ctm_before


@pytest.mark.slow
def test_one_step_moves_policy_along_the_advantages_and_ctm_down_the_seg_loss(one_step):
    trainer, ctm_before = one_step
    batch = trainer.last_batch
    advantages = batch["advantages"]
    assert advantages.abs().sum() > 0, "no reward differences in the group: nothing to learn from"
    after = trainer.completion_logps(trainer.model, batch)
    with capture_last_hidden(trainer.ref_model) as rows:
        before = trainer.completion_logps(trainer.ref_model, batch)
    torch.testing.assert_close(before, batch["ref_per_token_logps"])  # the KL reference is the stage-1 policy
    completion_mask = batch["completion_mask"]
    delta = ((after - before) * completion_mask).sum(1) / completion_mask.sum(1)
    # The clipped surrogate's first-order direction: log-probs rise where the advantage is positive.
    assert (advantages * delta).sum() > 0, (advantages, delta)

    hidden = torch.cat(rows)
    with torch.no_grad():
        seg_before = trainer.segmentation_loss(hidden, batch, ctm=ctm_before)
        seg_after = trainer.segmentation_loss(hidden, batch)
    assert seg_after < seg_before


@pytest.mark.slow
def test_loss_reads_the_rows_inference_gives_the_ctm(one_step):
    """The hooked rows at P - 1 + i equal PolicyWrapper's, and TRL's prompt is the pipeline's prompt."""
    trainer, _ = one_step
    batch = trainer.last_batch
    with capture_last_hidden(trainer.ref_model) as rows:
        trainer.completion_logps(trainer.ref_model, batch)
    hidden = torch.cat(rows)
    wrapper = PolicyWrapper(trainer.ref_model, trainer.processing_class)
    prompt_len = batch["prompt_ids"].size(1)
    assert len(set(batch["prompt_mask"].sum(1).tolist())) == 2  # two prompts of different length: left padding
    for b in range(len(batch["episode_id"])):
        episode = trainer.episodes.get(batch["episode_id"][b])
        inputs = wrapper.build_inputs(episode.images(), episode.prompt)
        assert torch.equal(batch["prompt_ids"][b][batch["prompt_mask"][b].bool()], inputs["input_ids"][0])
        n = int(batch["completion_mask"][b].sum())
        with torch.no_grad():
            expected = wrapper.teacher_forced_hidden_states(inputs, batch["completion_ids"][b, :n])
        torch.testing.assert_close(hidden[b, prompt_len - 1 : prompt_len - 1 + n], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_trains_adapters_and_the_ctm(stage1, tmp_path):
    config = write_config(tmp_path / "c.yaml", stage1, tmp_path / "out", max_steps=1, save_steps=1,
                          lora={"enabled": True, "r": 4, "alpha": 8}, data={"eval_episodes": 0})
    result = run_stage2(config)
    before, after = load_checkpoint(stage1), load_checkpoint(result)
    old = before.policy.state_dict()
    new = after.policy.state_dict()
    changed = {n for n, p in new.items() if not torch.equal(p, old[n])}
    assert changed and all(n.endswith(("_proj.weight", "attn.qkv.weight", "attn.proj.weight")) for n in changed)
    assert "lm_head.weight" not in changed and "model.language_model.embed_tokens.weight" not in changed
    assert any(not torch.equal(p, before.ctm.state_dict()[n]) for n, p in after.ctm.state_dict().items())
    assert (tmp_path / "out" / "trainer" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "reference_policy").exists()  # the reference is the base, adapters off


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_writes_no_nan(stage1, tmp_path, capsys):
    """A learning rate the policy cannot survive: Meta-GRPO stops with one error line naming the step
    (a non-finite loss, sampling from inf/NaN probabilities, or a save that would hold inf/NaN); no
    result checkpoint, and every trainer checkpoint that was written is finite."""
    from conceptseg_edge.cli import main

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", stage1, out, learning_rate=1.0e30, max_steps=4, seg_loss_weight=0.0,
                          data={"eval_episodes": 0})
    assert main(["train", "stage2", "--config", str(config)]) == 2
    err = capsys.readouterr().err  # transformers' own progress bars come before it
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.endswith(errors[0].split("\r")[-1] + "\n") and "Traceback" not in err, err
    assert re.search(r"step \d: (the loss is (nan|inf|-inf)|the policy's sampling probabilities are inf/NaN)"
                     r"|checkpoint-\d: \d+ of \d+ tensors hold inf or NaN", err), err
    assert not (out / "checkpoint").exists()
    for ckpt in (out / "trainer").glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in tensors(ckpt).values() if t.is_floating_point()), ckpt
