"""``train warmstart``: teach the offline default's random-init tiny policy the tag format.

A real deployment starts stage 1 from an instruction-tuned Qwen2.5-VL that already writes
``<think>…</think> <rule>…</rule> [<check>[…]</check>] <bbox>[…]</bbox> <answer>…</answer>`` when
the prompt asks for it. ConceptSeg-Tiny's policy is built here from nothing (a tokenizer trained on
ConceptWorld text and a random-init Qwen2.5-VL, ``TinyPolicyConfig``), so without this stage it
never writes the format: the format and box rewards stay 0 and the reason route never gets a box.
This stage stands in for the instruction tuning. Like ``backbone``, it exists for the offline
default only.

What a step does: ``batch_size`` examples, an epoch-shuffled pure function of ``(seed, step)``
(``train.items.epoch_picks``). An example is a meta episode exactly as the policy sees it (chat
prompt with the support mosaic and the target, ``PolicyWrapper.build_inputs``) followed by the
teacher-forced completion stage 1 uses (``train.items.template_completion``: ground-truth
``<bbox>``/``<check>``, the query as ``<answer>``) and ``<|im_end|>``. The loss is the causal LM
cross-entropy on the completion tokens and that final ``<|im_end|>`` only, averaged over those tokens
in the batch; system prompt, images, prompt text and padding carry none (``completion_loss``). The
whole policy trains (vision tower included), AdamW with warmup + cosine; there is no dropout, so a
resumed run takes exactly the step an uninterrupted one would.

Held-out (``evaluate``, episodes from ``VAL_OFFSET`` on, never trained on): greedy completions as
at inference; the format rate (``tags.is_well_formed``, the stage-2 format reward), the box reward
(``train.rewards.box_reward``), how often the answer is the query, completion length; per level.

Outputs in ``out_dir``: ``init_policy/`` (the random-init policy and its tokenizer, written on the
first run, so a resumed run reloads the very same tokenizer), ``state/`` (resumable), ``metrics.csv``
+ ``curves.png``, ``config.yaml``, ``warmstart.json`` (summary: held-out rates, loss, timings) and
``checkpoint/`` in the ``models.checkpoint`` format. That format also holds a CTM and names a
backbone: here a one-block placeholder CTM and backbone ``"none"``; stage 1 (``policy_checkpoint``)
takes only the policy and the processor.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from conceptseg_edge.data.meta import LEVELS
from conceptseg_edge.errors import InputError
from conceptseg_edge.train.config import LoopConfig, check_types, load_config, require_positive
from conceptseg_edge.train.items import EpisodeData, Item, epoch_picks, load_items, template_completion
from conceptseg_edge.train.loop import StageResult, begin_stage, eval_mode, lr_at, run_steps, seed_everything, set_lr, write_summary

#: Label of a token that carries no loss (prompt, image, padding), as in transformers.
IGNORE = -100
#: The checkpoint format names a backbone; a warmstart checkpoint has none yet (stage 1 sets it).
NO_BACKBONE = "none"


@dataclass
class TinyPolicyConfig:
    """A random-init Qwen2.5-VL for the offline default and tests. Defaults: ConceptSeg-Tiny's."""

    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary cap (the corpus may stop short)"})
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    seed: int = field(default=0, metadata={"help": "weight init seed"})
    corpus: str = field(default="conceptworld", metadata={"help": "tokenizer corpus: 'conceptworld' or 'default'"})


def tiny_tokenizer_corpus() -> list[str]:
    """The tiny tokenizer's corpus: the package's default lines plus ConceptWorld's concepts,
    problems, prompts and template completions, so the tiny policy reads and writes them in few tokens."""
    from conceptseg_edge.data.world import ConceptWorld
    from conceptseg_edge.episodes import build_meta_episode
    from conceptseg_edge.models.tokenizer import tiny_corpus

    lines = tiny_corpus()
    world = ConceptWorld(12345, 32)
    for i in range(20):
        ep = world.episode(i)
        for supports in (ep.supports, ()):
            meta = build_meta_episode(ep.image, ep.mask, ep.query, supports)
            lines.append(meta.prompt)
            if meta.gt_box is not None:
                lines.append(template_completion(meta))
    return lines


def build_tiny_policy(tp: TinyPolicyConfig, max_pixels: int, where: str = "tiny_policy"):
    """A freshly trained tiny tokenizer and a random-init policy on it: ``(policy, processor)``."""
    from conceptseg_edge.models.policy import build_policy, build_processor, tiny_policy_config
    from conceptseg_edge.models.tokenizer import train_tiny_tokenizer

    if tp.corpus not in ("conceptworld", "default"):
        raise InputError(f"{where}.corpus: expected 'conceptworld' or 'default', got {tp.corpus!r}")
    tokenizer = train_tiny_tokenizer(tp.vocab_size, tiny_tokenizer_corpus() if tp.corpus == "conceptworld" else None)
    processor = build_processor(tokenizer, max_pixels=max_pixels)
    config = tiny_policy_config(
        tokenizer, hidden_size=tp.hidden_size, num_layers=tp.num_layers, num_heads=tp.num_heads,
        num_kv_heads=tp.num_kv_heads, intermediate_size=tp.intermediate_size, vision_depth=tp.vision_depth,
        vision_hidden_size=tp.vision_hidden_size, vision_heads=tp.vision_heads,
    )
    return build_policy(config, seed=tp.seed), processor


@dataclass
class WarmstartConfig(LoopConfig):
    """``train warmstart`` settings. The paper has no such stage; defaults are ConceptSeg-Tiny's."""

    out_dir: str = "runs/warmstart"
    tiny_policy: TinyPolicyConfig = field(default_factory=TinyPolicyConfig)
    max_pixels: int = field(default=112 * 112, metadata={"help": "policy image cap: 112 x 112 = 16 vision tokens"})
    data: EpisodeData = field(default_factory=EpisodeData)
    lr: float = 4e-3  # a random-init 2-layer policy must learn the format in minutes: high, with warmup
    warmup_steps: int = 20
    min_lr_ratio: float = field(default=0.05, metadata={"help": "cosine floor, as a fraction of lr"})
    batch_size: int = 8  # many small steps: 300 x 8 learnt the format where 150 x 16 did not
    steps: int = 300
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_max_new_tokens: int = field(default=80, metadata={"help": "greedy tokens per held-out completion"})

    def validate(self) -> None:
        where = "warmstart"
        check_types(self, where)
        require_positive(where, max_pixels=self.max_pixels, lr=self.lr, batch_size=self.batch_size, steps=self.steps,
                         eval_every=self.eval_every, save_every=self.save_every,
                         eval_max_new_tokens=self.eval_max_new_tokens)
        if self.warmup_steps < 0 or self.grad_clip <= 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"{where}: need warmup_steps >= 0, grad_clip > 0, weight_decay >= 0, 0 <= min_lr_ratio "
                             f"<= 1; got {self.warmup_steps}, {self.grad_clip}, {self.weight_decay}, {self.min_lr_ratio}")
        self.data.validate(f"{where}.data")


# --------------------------------------------------------------------------- examples and the loss


@dataclass
class Example:
    """One tokenised training sequence (batch-free tensors, CPU).

    Attributes:
        input_ids: (L,) int64: chat prompt (images expanded), completion, ``<|im_end|>``.
        labels: (L,) int64: ``input_ids`` on the completion and ``<|im_end|>``, ``IGNORE`` before.
        mm_token_type_ids: (L,) the processor's token types (images nonzero, text 0).
        pixel_values: (patches, C) float, or None for a text-only prompt.
        image_grid_thw: (images, 3) int64, or None.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None

    @property
    def completion_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def build_example(wrapper, item: Item) -> Example:
    """``item``'s prompt as ``PolicyWrapper.build_inputs`` makes it, plus the template completion."""
    from conceptseg_edge.models.tokenizer import EOS_TOKEN

    inputs = wrapper.build_inputs(item.meta.images(), item.meta.prompt)
    tok = wrapper.processor.tokenizer
    completion = tok(template_completion(item.meta), add_special_tokens=False)["input_ids"]
    completion = torch.tensor([*completion, tok.convert_tokens_to_ids(EOS_TOKEN)], dtype=torch.long)
    prompt = inputs["input_ids"][0].cpu()
    mm = inputs.get("mm_token_type_ids")
    mm = torch.zeros_like(prompt) if mm is None else mm[0].cpu()
    return Example(
        input_ids=torch.cat([prompt, completion]),
        labels=torch.cat([torch.full_like(prompt, IGNORE), completion]),
        mm_token_type_ids=torch.cat([mm, torch.zeros_like(completion, dtype=mm.dtype)]),
        pixel_values=inputs["pixel_values"].cpu() if inputs.get("pixel_values") is not None else None,
        image_grid_thw=inputs["image_grid_thw"].cpu() if inputs.get("image_grid_thw") is not None else None,
    )


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (``IGNORE`` on padding),
    ``mm_token_type_ids``, and the images of every example concatenated in order."""
    length = max(len(e.input_ids) for e in examples)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, length - len(t)), value=value)

    batch = {
        "input_ids": torch.stack([pad(e.input_ids, pad_id) for e in examples]),
        "attention_mask": torch.stack([pad(torch.ones_like(e.input_ids), 0) for e in examples]),
        "labels": torch.stack([pad(e.labels, IGNORE) for e in examples]),
        "mm_token_type_ids": torch.stack([pad(e.mm_token_type_ids, 0) for e in examples]),
    }
    pixels = [e.pixel_values for e in examples if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in examples if e.image_grid_thw is not None])
    return batch


def completion_loss(policy, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over the labelled (completion) positions of ``batch``.

    Logits are computed for those positions only (the LM head never sees prompt rows). Returns the
    loss and ``{"token_acc": greedy next-token accuracy on them, "tokens": how many}``.
    """
    model_inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = policy.model(**model_inputs, use_cache=False).last_hidden_state  # (B, L, d)
    target = batch["labels"][:, 1:]
    sel = target != IGNORE
    if not bool(sel.any()):
        raise InputError("completion_loss: the batch has no completion tokens")
    logits = policy.lm_head(hidden[:, :-1][sel]).float()
    loss = F.cross_entropy(logits, target[sel])
    with torch.no_grad():
        acc = (logits.argmax(-1) == target[sel]).float().mean().item()
    return loss, {"token_acc": acc, "tokens": float(sel.sum())}


def train_step(cfg: WarmstartConfig, policy, examples: list[Example], pad_id: int, optimizer, step: int) -> dict[str, float]:
    """One optimizer step on step ``step``'s batch; returns its metrics."""
    set_lr(optimizer, lr_at(step, cfg.lr, cfg.steps, cfg.warmup_steps, min_ratio=cfg.min_lr_ratio))
    picks = epoch_picks(cfg.seed, len(examples), step, cfg.batch_size, 0, cfg.batch_size)
    optimizer.zero_grad(set_to_none=True)
    loss, logs = completion_loss(policy, collate([examples[i] for i in picks], pad_id))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "token_acc": logs["token_acc"], "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm)}


def heldout_loss(policy, examples: list[Example], pad_id: int, batch_size: int) -> float:
    """Teacher-forced completion loss on ``examples`` (token-weighted mean)."""
    total, count = 0.0, 0.0
    with eval_mode(policy):
        for start in range(0, len(examples), batch_size):
            loss, logs = completion_loss(policy, collate(examples[start : start + batch_size], pad_id))
            total += loss.item() * logs["tokens"]
            count += logs["tokens"]
    return total / max(count, 1.0)


# --------------------------------------------------------------------------- held-out generation


def evaluate(policy, processor, items: list[Item], max_new_tokens: int, progress: bool = False) -> dict[str, Any]:
    """Greedy completions on ``items`` as at inference; rates overall and per level.

    ``format_rate``: strict tag format (the format reward); ``box_reward``: stage 2's box reward;
    ``answer_is_query``: the parsed ``<answer>`` equals the query; ``stopped``: ``<|im_end|>`` came
    within ``max_new_tokens``; ``tokens``: mean completion length.
    """
    from tqdm import tqdm

    from conceptseg_edge.models.policy import PolicyWrapper
    from conceptseg_edge.models.tokenizer import EOS_TOKEN
    from conceptseg_edge.tags import parse_output
    from conceptseg_edge.train.rewards import box_reward

    wrapper = PolicyWrapper(policy, processor)
    eos = processor.tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    rows: list[dict[str, Any]] = []
    samples: list[str] = []
    with eval_mode(policy):
        for item in tqdm(items, desc="warmstart held-out", unit="episode", disable=not progress):
            meta = item.meta
            out = wrapper.generate(meta.images(), meta.prompt, max_new_tokens, greedy=True)
            parsed = parse_output(out.text, has_hidden_box=meta.has_hidden_box)
            rows.append({
                "level": item.level,
                "format_rate": float(parsed.well_formed),
                "box_reward": box_reward([out.text], [meta.gt_box], [meta.hidden_box])[0],
                "answer_is_query": float(parsed.answer == meta.query),
                "stopped": float(len(out.token_ids) > 0 and int(out.token_ids[-1]) == eos),
                "tokens": float(len(out.token_ids)),
            })
            if len(samples) < 3:
                samples.append(out.text)
    keys = ("format_rate", "box_reward", "answer_is_query", "stopped", "tokens")

    def mean(sel: list[dict[str, Any]]) -> dict[str, float]:
        return {"n": len(sel), **{k: round(float(np.mean([r[k] for r in sel])), 4) for k in keys}}

    levels = {lv: mean([r for r in rows if r["level"] == lv]) for lv in LEVELS if any(r["level"] == lv for r in rows)}
    return {**mean(rows), "by_level": levels, "max_new_tokens": max_new_tokens, "samples": samples}


# --------------------------------------------------------------------------- the stage


def _placeholder_ctm(hidden_size: int):
    from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig

    with torch.random.fork_rng(devices=[]):  # deterministic, and the caller's RNG stream untouched
        torch.manual_seed(0)
        return ConceptTranslationModule(CTMConfig(hidden_size=hidden_size, depth=1, num_heads=1, mlp_ratio=1))


def _save(path: Path, policy, processor, overwrite: bool = False) -> Path:
    from conceptseg_edge.models.checkpoint import BackboneSpec, save_checkpoint
    from conceptseg_edge.router import RouterConfig

    hidden = policy.config.text_config.hidden_size
    return save_checkpoint(path, policy, _placeholder_ctm(hidden), processor, RouterConfig(),
                           BackboneSpec(NO_BACKBONE), overwrite=overwrite)


def initial_policy(cfg: WarmstartConfig, out: Path):
    """The random-init policy and processor: built and written to ``out/init_policy`` on the first
    run, read back from there on a resumed one."""
    from conceptseg_edge.models.checkpoint import load_checkpoint

    init_dir = out / "init_policy"
    if init_dir.is_dir():
        ckpt = load_checkpoint(init_dir)
        return ckpt.policy, ckpt.processor
    policy, processor = build_tiny_policy(cfg.tiny_policy, cfg.max_pixels, "warmstart.tiny_policy")
    _save(init_dir, policy, processor)
    return policy, processor


def build_examples(policy, processor, items: list[Item], progress: bool, desc: str) -> list[Example]:
    from tqdm import tqdm

    from conceptseg_edge.models.policy import PolicyWrapper

    wrapper = PolicyWrapper(policy, processor)
    return [build_example(wrapper, item) for item in tqdm(items, desc=desc, unit="item", disable=not progress)]


def train_warmstart(
    cfg: WarmstartConfig, out_dir: str | os.PathLike[str] | None = None, *, stop_after: int | None = None,
) -> StageResult:
    """Train (or resume) the tiny policy on template completions; ``stop_after`` interrupts after
    that many total steps (tests)."""
    from conceptseg_edge.models.tokenizer import PAD_TOKEN

    with begin_stage(cfg, out_dir) as (out, clock):
        seed_everything(cfg.seed)
        items = load_items(cfg.data, "train", "warmstart.data")  # bad data fails before a model is built
        policy, processor = initial_policy(cfg, out)
        policy.float().train()
        pad_id = processor.tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        examples = build_examples(policy, processor, items, cfg.progress, "warmstart examples")
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        modules = {"policy": policy}
        val_items = functools.cache(lambda: load_items(cfg.data, "val", "warmstart.data"))
        val_examples = functools.cache(lambda: build_examples(policy, processor, val_items(), False, ""))
        end, logger = run_steps(
            "warmstart", cfg, out, modules, optimizer, cfg.steps,
            step=lambda i: train_step(cfg, policy, examples, pad_id, optimizer, i),
            evaluate=lambda: {"val_loss": heldout_loss(policy, val_examples(), pad_id, cfg.batch_size)},
            postfix=lambda row: {"loss": f"{row['loss']:.3f}", "acc": f"{row['token_acc']:.2f}"},
            stop_after=stop_after,
        )
        logger.plot(out / "curves.png", title="warmstart (policy SFT on the tag template)")
        if end < cfg.steps:
            return StageResult(out, out / "checkpoint", {"stopped_at": end})
        policy.eval()
        ckpt = _save(out / "checkpoint", policy, processor, overwrite=True)
        train_time = clock.elapsed()
        heldout = evaluate(policy, processor, val_items(), cfg.eval_max_new_tokens, cfg.progress)
        losses = [r["loss"] for r in logger.rows if "loss" in r]
        lengths = [e.completion_tokens for e in examples]
        summary = {
            "checkpoint": str(ckpt),
            "steps": cfg.steps,
            "train_items": len(items),
            "completion_tokens": {"mean": round(float(np.mean(lengths)), 1), "max": int(max(lengths))},
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "loss_last10_mean": float(np.mean(losses[-10:])) if losses else None,
            "val_loss": next((r["val_loss"] for r in reversed(logger.rows) if "val_loss" in r), None),
            "heldout": heldout,
            "time": {"train": train_time, "total": clock.elapsed()},
        }
        write_summary(out / "warmstart.json", summary)
        return StageResult(out, ckpt, summary)


def run_warmstart(config_path: str | os.PathLike[str], out_dir: str | None = None) -> Path:
    """CLI entry: load the YAML config, train, return the checkpoint directory."""
    return train_warmstart(load_config(config_path, WarmstartConfig), out_dir).checkpoint
