"""Backbone pretraining: the loss falls on a fixed batch, weights move, resume is exact, the CLI runs.

Tiny everything: the ``conceptseg_tiny`` SAM2 at 64 px on 64 px ConceptWorld images, 2 images x 2
prompts per step, one torch thread.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptseg_edge.data.world import ConceptWorld
from conceptseg_edge.train.backbone import (
    CONCEPTS,
    BackboneConfig,
    BackboneDataConfig,
    absent_concepts,
    build_model,
    make_optimizer,
    sample_batch,
    step_loss,
    train_step,
)
from conceptseg_edge.train.state import load_state, save_state

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw) -> BackboneConfig:
    base = BackboneConfig(
        image_size=64, steps=4, images_per_step=2, prompts_per_image=2, warmup_steps=0, lr=1e-3,
        fill_steps=1, localize_steps=1,  # steps 0 / 1 / 2+: box-fill pretext, instance scenes, full mix
        eval_every=100, save_every=100, eval_images=2, progress=False,
        data=BackboneDataConfig(image_size=64, train_episodes=6, val_episodes=3),
    )
    return dataclasses.replace(base, **kw)


def test_batches_are_a_pure_function_of_the_step():
    cfg = tiny_cfg()
    world = ConceptWorld(0, 64)
    a_images, a_groups = sample_batch(cfg, world, 3)
    b_images, b_groups = sample_batch(cfg, world, 3)
    assert np.array_equal(a_images, b_images)
    assert [g.image_index for g in a_groups] == [g.image_index for g in b_groups]
    assert all(np.array_equal(x, y) for g, h in zip(a_groups, b_groups) for x, y in zip(g.coords, h.coords))
    c_images, _ = sample_batch(cfg, world, 4)
    assert not np.array_equal(a_images, c_images)


def test_curriculum_phases():
    cfg = tiny_cfg()
    world = ConceptWorld(0, 64)
    _, fill = sample_batch(cfg, world, 0)
    assert len(fill) == 1 and all(t.sum() == (t.any(0).sum() * t.any(1).sum()) for t in fill[0].targets)  # filled boxes
    _, local = sample_batch(cfg, world, 1)
    assert all(not g.concepts for g in local)  # geometric prompts only
    kinds = set()
    for step in range(2, 12):
        kinds |= {"concept" if g.concepts else "geometry" for g in sample_batch(cfg, world, step)[1]}
    assert kinds == {"concept", "geometry"}


def test_instance_scene_concepts_are_exact():
    from conceptseg_edge.data.world import CI_CLASSES
    from conceptseg_edge.train.backbone import instance_scene

    view = instance_scene(np.random.default_rng(3), 64)
    assert len(view.instances) == len(view.looks) >= 3
    rng = np.random.default_rng(0)
    for _ in range(20):
        name, target = view.concept_prompt(rng, negative_prob=0.5)
        cls = next(c for c in CI_CLASSES if c.name == name)
        expected = np.zeros_like(target)
        for look, mask in zip(view.looks, view.instances):
            if cls.matches(look):
                expected |= mask
        assert np.array_equal(target, expected)


def test_negative_concepts_are_really_absent():
    # a CI shape never appears in a shape-free CD scene; a lesion query never names a shape scene
    assert "circle" in absent_concepts("polyp")
    assert "polyp colon segmentation" not in absent_concepts("polyp")
    assert all(c not in absent_concepts("shape") for c in CONCEPTS[:15])
    assert "salient object segmentation" not in absent_concepts("shape")


def test_loss_falls_on_a_fixed_batch_and_weights_change():
    cfg = tiny_cfg()
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model)
    world = ConceptWorld(0, 64)
    # a full-mix batch holding both geometric and concept prompts
    images, groups = next(b for b in (sample_batch(cfg, world, k) for k in range(2, 40))
                          if any(g.concepts for g in b[1]) and any(not g.concepts for g in b[1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(5):
        loss, _ = step_loss(cfg, model, images, groups)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = model.state_dict()
    for name in ("sam.image_encoder.trunk.patch_embed.proj.weight", "sam.sam_mask_decoder.iou_token.weight",
                 "concepts.table"):
        assert not torch.equal(before[name], after[name]), name
    # parts that images never reach (the video memory modules) do not move
    assert torch.equal(before["sam.memory_attention.norm.weight"], after["sam.memory_attention.norm.weight"])


def test_resume_takes_exactly_the_uninterrupted_step(tmp_path):
    cfg = tiny_cfg()
    world = ConceptWorld(0, 64)
    model = build_model(cfg)
    optimizer = make_optimizer(cfg, model)
    for step in range(2):
        train_step(cfg, model, optimizer, world, step)
    save_state(tmp_path, 2, {"backbone": model}, optimizer)
    expected = train_step(cfg, model, optimizer, world, 2)

    torch.manual_seed(123)  # a different init: everything must come from the saved state
    resumed = build_model(dataclasses.replace(cfg, seed=5))
    resumed_opt = make_optimizer(cfg, resumed)
    step, _ = load_state(tmp_path, {"backbone": resumed}, resumed_opt)
    assert step == 2
    got = train_step(cfg, resumed, resumed_opt, world, 2)
    assert got["loss"] == expected["loss"]
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_train_backbone_interrupted_then_resumed_matches_and_checkpoint_loads(tmp_path):
    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.train.backbone import train_backbone

    cfg = tiny_cfg(steps=3, save_every=1)
    first = train_backbone(cfg, tmp_path / "a", stop_after=2)
    assert first.summary == {"stopped_at": 2} and not (tmp_path / "a" / "backbone.pt").exists()
    done = train_backbone(cfg, tmp_path / "a")
    straight = train_backbone(cfg, tmp_path / "b")
    a = torch.load(done.checkpoint, weights_only=True)["model"]
    b = torch.load(straight.checkpoint, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert rows == (tmp_path / "b" / "metrics.csv").read_text().splitlines() and len(rows) == 4
    assert (tmp_path / "a" / "curves.png").stat().st_size > 0
    # the saved weights load through the official-format reader the export uses
    build_sam2_model("conceptseg_tiny", done.checkpoint, 64)
    heldout = done.summary["heldout"]["fg_iou"]["all"]
    assert {"box", "click", "empty", "whole"} <= set(heldout) and heldout["empty"] == 0.0


def test_cli_runs_a_tiny_yaml_and_rejects_bad_configs(tmp_path, capsys):
    from conceptseg_edge.cli import main

    cfg = tmp_path / "bb.yaml"
    cfg.write_text(
        f"out_dir: {tmp_path / 'run'}\nimage_size: 64\nsteps: 1\nimages_per_step: 1\nprompts_per_image: 2\n"
        "fill_steps: 0\nlocalize_steps: 0\n"
        "progress: false\neval_images: 1\ndata: {image_size: 64, train_episodes: 2, val_episodes: 1}\n"
    )
    assert main(["train", "backbone", "--config", str(cfg)]) == 0
    assert (tmp_path / "run" / "backbone.pt").is_file() and (tmp_path / "run" / "backbone.json").is_file()
    capsys.readouterr()

    for text, needle in [("stepz: 1\n", "unknown key"), ("steps: 0\n", "steps"), ("lr: 1e-3\n", "1.0e-3"),
                         ("image_size: 100\n", "multiple of 64"), ("sam2_config: nope\n", "sam2_config")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main(["train", "backbone", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err and "Traceback" not in err
    assert main(["train", "backbone", "--config", str(tmp_path / "missing.yaml")]) == 2
