"""Warmstart: the tiny policy's supervised fine-tuning on template completions.

A one-layer 32-wide tiny Qwen2.5-VL on the default tokenizer corpus, 56 x 56 images and 64 px
ConceptWorld: every test runs in seconds on one thread.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conceptseg_edge.train.items import EpisodeData, load_items, template_completion
from conceptseg_edge.train.warmstart import (
    IGNORE,
    TinyPolicyConfig,
    WarmstartConfig,
    build_examples,
    build_tiny_policy,
    collate,
    completion_loss,
    train_step,
    train_warmstart,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TinyPolicyConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=64, vision_depth=1, vision_hidden_size=32, vision_heads=1,
                        corpus="default")


def tiny_cfg(out: Path, **kw) -> WarmstartConfig:
    base = WarmstartConfig(
        out_dir=str(out), tiny_policy=TINY, max_pixels=56 * 56,
        data=EpisodeData(image_size=64, train_episodes=6, val_episodes=2, support_prob=0.5),
        lr=3e-3, warmup_steps=0, batch_size=3, steps=3, eval_every=2, save_every=100, eval_max_new_tokens=4,
        progress=False,
    )
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg(Path("unused"))
    policy, processor = build_tiny_policy(cfg.tiny_policy, cfg.max_pixels)
    items = load_items(cfg.data, "train")
    examples = build_examples(policy, processor, items, False, "")
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return cfg, policy.float(), processor, items, examples, pad_id


def test_labels_are_the_template_completion_and_eos_only(setup):
    _, _, processor, items, examples, _ = setup
    tok = processor.tokenizer
    assert {len(it.meta.images()) for it in items} == {1, 2}  # with and without a support mosaic
    for item, ex in zip(items, examples):
        completion = tok(template_completion(item.meta), add_special_tokens=False)["input_ids"]
        completion.append(tok.convert_tokens_to_ids("<|im_end|>"))
        n = len(completion)
        assert ex.labels[-n:].tolist() == completion == ex.input_ids[-n:].tolist()
        assert (ex.labels[:-n] == IGNORE).all() and ex.completion_tokens == n
        prompt = tok.decode(ex.input_ids[:-n])
        assert prompt.endswith("<|im_start|>assistant\n") and item.meta.prompt in prompt


def test_loss_counts_exactly_the_completion_tokens(setup):
    """The loss is the mean CE over completion positions only: the prompt, images and padding add
    nothing, whatever the model predicts there."""
    _, policy, _, _, examples, pad_id = setup
    batch_examples = examples[:3]
    assert len({len(e.input_ids) for e in batch_examples}) > 1  # right padding is exercised
    batch = collate(batch_examples, pad_id)
    with torch.no_grad():
        loss, logs = completion_loss(policy, batch)
        logits = policy(**{k: v for k, v in batch.items() if k != "labels"}).logits  # every position
    terms = []
    for b, ex in enumerate(batch_examples):
        n, length = ex.completion_tokens, len(ex.input_ids)
        # completion token t sits at position length - n + t and is predicted from the one before
        pred = logits[b, length - n - 1 : length - 1]
        terms.append(F.cross_entropy(pred.float(), ex.input_ids[length - n :], reduction="none"))
    expected = torch.cat(terms).mean()
    assert logs["tokens"] == sum(e.completion_tokens for e in batch_examples)
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)
    # the same numbers one example at a time: padding never leaks into the loss
    with torch.no_grad():
        singles = [completion_loss(policy, collate([e], pad_id))[0] * e.completion_tokens for e in batch_examples]
    assert torch.allclose(loss, sum(singles) / logs["tokens"], atol=1e-5)


def test_loss_falls_on_a_fixed_batch(setup):
    _, policy0, _, _, examples, pad_id = setup
    policy = copy.deepcopy(policy0).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    batch = collate(examples[:4], pad_id)
    losses = []
    for _ in range(8):
        loss, _ = completion_loss(policy, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    moved = [k for k, v in policy.state_dict().items() if not torch.equal(v, policy0.state_dict()[k])]
    assert any(k.startswith("model.visual.") for k in moved) and "lm_head.weight" in moved


def test_resume_takes_exactly_the_uninterrupted_step(setup, tmp_path):
    from conceptseg_edge.train.state import load_state, save_state

    cfg, policy0, _, _, examples, pad_id = setup
    cfg = dataclasses.replace(cfg, steps=10)
    policy = copy.deepcopy(policy0).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)
    for step in range(2):
        train_step(cfg, policy, examples, pad_id, optimizer, step)
    save_state(tmp_path, 2, {"policy": policy}, optimizer)
    expected = train_step(cfg, policy, examples, pad_id, optimizer, 2)

    resumed = copy.deepcopy(policy0).train()  # the initial weights: the state must overwrite them
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=cfg.lr)
    assert load_state(tmp_path, {"policy": resumed}, resumed_opt)[0] == 2
    got = train_step(cfg, resumed, examples, pad_id, resumed_opt, 2)
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(policy.state_dict().values(), resumed.state_dict().values()))


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    """An interrupted-then-resumed run and an uninterrupted one: (resumed result, straight result)."""
    root = tmp_path_factory.mktemp("warm")
    cfg = tiny_cfg(root / "a", save_every=1)
    assert train_warmstart(cfg, stop_after=2).summary == {"stopped_at": 2}
    resumed = train_warmstart(cfg)
    straight = train_warmstart(dataclasses.replace(cfg, out_dir=str(root / "b")))
    return resumed, straight


def test_train_warmstart_resumes_to_the_same_checkpoint(warm_run):
    from conceptseg_edge.models.checkpoint import load_checkpoint

    resumed, straight = warm_run
    a, b = load_checkpoint(resumed.checkpoint), load_checkpoint(straight.checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values()))
    init = load_checkpoint(resumed.out_dir / "init_policy")
    assert not torch.equal(init.policy.lm_head.weight, a.policy.lm_head.weight)
    assert a.processor.tokenizer.get_vocab() == init.processor.tokenizer.get_vocab()
    s = resumed.summary
    assert s["steps"] == 3 and s["loss_first"] is not None and s["val_loss"] is not None
    h = s["heldout"]
    assert h["n"] == 2 and 0.0 <= h["format_rate"] <= 1.0 and h["max_new_tokens"] == 4 and h["by_level"]
    for name in ("metrics.csv", "curves.png", "warmstart.json", "config.yaml"):
        assert (resumed.out_dir / name).is_file(), name


def test_stage1_trains_on_a_warmstart_checkpoint(warm_run, tmp_path):
    import test_train_stage1 as s1

    from conceptseg_edge.models.checkpoint import load_checkpoint
    from conceptseg_edge.models.sam2 import build_sam2_model
    from conceptseg_edge.train.backbone import write_backbone
    from conceptseg_edge.train.stage1 import load_frozen, train_stage1

    resumed, _ = warm_run
    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pt"
    write_backbone(backbone, build_sam2_model("conceptseg_tiny", image_size=64).model)
    cfg = s1.tiny_cfg(backbone, tmp_path / "s1", policy_checkpoint=str(resumed.checkpoint), steps=1, grad_accum=1,
                      tiny_policy=TinyPolicyConfig(hidden_size=8, num_heads=2))  # ignored: the checkpoint's policy
    warm = load_checkpoint(resumed.checkpoint)
    frozen, ctm = load_frozen(cfg, Path(cfg.out_dir))
    assert frozen.policy.processor.tokenizer.get_vocab() == warm.processor.tokenizer.get_vocab()
    assert ctm.config.depth == cfg.ctm.depth and ctm.config.num_heads == cfg.ctm.num_heads  # a new CTM
    result = train_stage1(cfg)
    out = load_checkpoint(result.checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(out.policy.state_dict().values(), warm.policy.state_dict().values()))
    assert out.backbone.config == "conceptseg_tiny" and warm.backbone.config == "none"


def test_cli_warmstart_and_bad_configs(tmp_path, capsys):
    import json

    import yaml

    from conceptseg_edge.cli import main
    from conceptseg_edge.train.config import to_dict

    cfg = to_dict(tiny_cfg(tmp_path / "run", steps=1, eval_max_new_tokens=2))
    cfg["data"]["val_episodes"] = 1
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "warmstart", "--config", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert Path(printed["checkpoint"]) == tmp_path / "run" / "checkpoint" and printed["heldout_format_rate"] is not None
    for patch, needle in [({"batch_size": 0}, "batch_size"), ({"lr": "1e-3"}, "lr"), ({"tiny_policy": {"layers": 1}}, "unknown key"),
                          ({"data": {"source": "meta"}}, "root"), ({"tiny_policy": {"corpus": "web"}}, "corpus")]:
        bad = {**cfg, **patch}
        for key in ("data", "tiny_policy"):
            if key in patch:
                bad[key] = {**cfg[key], **patch[key]}
        path.write_text(yaml.safe_dump(bad))
        assert main(["train", "warmstart", "--config", str(path), "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and needle in err, err
