"""Stage 1: the CTM learns through the frozen SAM2 from the frozen policy's hidden states.

A random-init ``conceptseg_tiny`` SAM2 at 64 px, a one-layer tiny Qwen2.5-VL, a one-block CTM, 64 px
ConceptWorld: every test runs in seconds on one thread.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conceptseg_edge.train.items import EpisodeData, load_items, template_completion
from conceptseg_edge.train.stage1 import (
    CTMSettings,
    FeatureCache,
    Stage1Config,
    TinyPolicyConfig,
    batch_loss,
    forward_samples,
    load_frozen,
    plan_batch,
    sample_losses,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone_pt(tmp_path_factory) -> Path:
    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.train.backbone import write_backbone

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "backbone.pt"
    write_backbone(path, build_sam2_model("conceptseg_tiny", image_size=64).model)
    return path


def tiny_cfg(backbone_pt: Path, out: Path, **kw) -> Stage1Config:
    base = Stage1Config(
        out_dir=str(out), backbone_config="conceptseg_tiny", backbone_checkpoint=str(backbone_pt),
        backbone_image_size=64, max_pixels=56 * 56,
        tiny_policy=TinyPolicyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64, vision_depth=1, vision_hidden_size=32, vision_heads=1,
                                     corpus="default"),
        ctm=CTMSettings(depth=1, num_heads=2),
        data=EpisodeData(image_size=64, train_episodes=6, val_episodes=3),
        lr=1e-3, batch_size=4, grad_accum=2, steps=3, shortcut_fraction=0.5, negative_fraction=0.5,
        drop_box_fraction=0.25, presence_weight=0.5, eval_every=100, save_every=100, progress=False,
    )
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def setup(backbone_pt, tmp_path_factory):
    cfg = tiny_cfg(backbone_pt, tmp_path_factory.mktemp("stage1"))
    frozen, ctm = load_frozen(cfg, Path(cfg.out_dir))
    cache = FeatureCache(frozen, load_items(cfg.data, "train"), True, False, "")
    return cfg, frozen, ctm, cache


def test_template_holds_the_ground_truth_boxes(setup):
    cfg, _, _, cache = setup
    from conceptseg_edge.tags import parse_output

    for item in cache.items:
        parsed = parse_output(template_completion(item.meta), has_hidden_box=item.meta.has_hidden_box)
        assert parsed.well_formed
        assert parsed.bbox == item.meta.gt_box and parsed.check == item.meta.hidden_box
        assert parsed.answer == item.query


def test_loss_falls_on_a_fixed_batch_only_the_ctm_moves(setup):
    import copy

    cfg, frozen, ctm0, cache = setup
    ctm = copy.deepcopy(ctm0).train()  # the fixture's CTM stays untouched
    policy_before = {k: v.clone() for k, v in frozen.policy.model.state_dict().items()}
    sam_before = {k: v.clone() for k, v in frozen.decoder.state_dict().items()}
    ctm_before = {k: v.clone() for k, v in ctm.state_dict().items()}
    optimizer = torch.optim.AdamW(ctm.parameters(), lr=1e-2)
    samples = plan_batch(cfg, cache.items, 0, 0)
    assert {s.route for s in samples} == {"reason", "shortcut"}
    losses = []
    for _ in range(8):
        loss = batch_loss(cfg, sample_losses(cfg, samples, forward_samples(cfg, frozen, cache, ctm, samples)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.96 * losses[0], losses
    assert all(not torch.equal(ctm_before[k], v) for k, v in ctm.state_dict().items() if k.endswith("weight"))
    assert all(torch.equal(policy_before[k], v) for k, v in frozen.policy.model.state_dict().items())
    assert all(torch.equal(sam_before[k], v) for k, v in frozen.decoder.state_dict().items())


def test_resume_takes_exactly_the_uninterrupted_step(setup, tmp_path):
    import copy

    from conceptseg_edge.errors import CheckpointError
    from conceptseg_edge.train.state import STATE_DIR, load_state, save_state

    cfg, frozen, ctm0, cache = setup
    ctm = copy.deepcopy(ctm0).train()
    optimizer = torch.optim.AdamW(ctm.parameters(), lr=cfg.lr)
    for step in range(2):
        train_step(cfg, frozen, cache, ctm, optimizer, step, 10)
    save_state(tmp_path, 2, {"ctm": ctm}, optimizer)
    expected = train_step(cfg, frozen, cache, ctm, optimizer, 2, 10)

    resumed = copy.deepcopy(ctm0).train()
    torch.nn.init.normal_(resumed.learnable_query.weight)  # must be overwritten by the state
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=cfg.lr)
    assert load_state(tmp_path, {"ctm": resumed}, resumed_opt)[0] == 2
    got = train_step(cfg, frozen, cache, resumed, resumed_opt, 2, 10)
    assert got["loss"] == expected["loss"]
    assert all(torch.equal(a, b) for a, b in zip(ctm.state_dict().values(), resumed.state_dict().values()))
    (tmp_path / STATE_DIR / "tensors.safetensors").write_bytes(b"half-written")
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: sha256 mismatch \(state\.json"):
        load_state(tmp_path, {"ctm": resumed}, resumed_opt)


def test_shortcut_tokens_match_the_inference_pipeline(setup):
    """What stage 1 trains on is what the pipeline computes at inference (same prefill, same rows)."""
    from conceptseg_edge.models.pipeline import ConceptSegPipeline
    from conceptseg_edge.router import RouterConfig

    cfg, frozen, ctm, cache = setup
    pipeline = ConceptSegPipeline(frozen.encoder.sam, frozen.policy, ctm, RouterConfig())
    with torch.no_grad():
        trained = ctm.eval()(cache.phrase("red circle")[None])[0].numpy()
    ctm.train()
    assert np.allclose(pipeline.concept_tokens_from_text("red circle"), trained, atol=1e-6)


def test_train_stage1_interrupted_resumed_and_checkpoint_loads(backbone_pt, tmp_path):
    from conceptseg_edge.models.checkpoint import load_checkpoint
    from conceptseg_edge.models.pipeline import ConceptSegPipeline
    from conceptseg_edge.train.stage1 import train_stage1

    cfg = tiny_cfg(backbone_pt, tmp_path / "a", save_every=1, grad_accum=1)
    assert train_stage1(cfg, stop_after=2).summary == {"stopped_at": 2}
    done = train_stage1(cfg)
    straight = train_stage1(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")))
    a, b = load_checkpoint(done.checkpoint), load_checkpoint(straight.checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(a.ctm.state_dict().values(), b.ctm.state_dict().values()))
    assert a.backbone.config == "conceptseg_tiny" and a.backbone.image_size == 64
    assert Path(a.backbone.checkpoint) == backbone_pt.resolve() and a.backbone.sha256
    s = done.summary
    assert s["loss_first"] is not None and s["heldout"]["fg_iou"]
    assert (tmp_path / "a" / "curves.png").is_file() and (tmp_path / "a" / "metrics.csv").is_file()
    ConceptSegPipeline.from_checkpoint(done.checkpoint)  # the backbone it names builds and loads


def test_cli_stage1_and_bad_configs(backbone_pt, tmp_path, capsys):
    import yaml

    from conceptseg_edge.cli import main
    from conceptseg_edge.train.config import to_dict

    cfg = to_dict(tiny_cfg(backbone_pt, tmp_path / "run", steps=1, grad_accum=1))
    path = tmp_path / "s1.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "stage1", "--config", str(path)]) == 0
    assert (tmp_path / "run" / "checkpoint" / "config.json").is_file()
    capsys.readouterr()
    for patch, needle in [({"batch_size": 0}, "batch_size"), ({"data": {"source": "web"}}, "source"),
                          ({"shortcut_fraction": 1.5}, "shortcut_fraction"), ({"ctm": {"heads": 2}}, "unknown key"),
                          ({"data": {"source": "meta"}}, "root"),
                          ({"policy_checkpoint": "w", "init_checkpoint": "s"}, "give one of")]:
        bad = {**cfg, **patch}
        if "data" in patch:
            bad["data"] = {**cfg["data"], **patch["data"]}
        path.write_text(yaml.safe_dump(bad))
        assert main(["train", "stage1", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err, err
