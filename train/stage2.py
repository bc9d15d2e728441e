"""Stage 2, Meta-GRPO: the policy (and the CTM) trained by group-relative RL on meta episodes.

Built on TRL's ``GRPOTrainer`` and overriding only what the method adds or what breaks otherwise:

- ``_generate_and_score_completions`` expands each dataset row (an episode id) into its prompt,
  images and reward columns, and hands each completion's episode id and parsed ``<bbox>`` on to the
  loss (the three rewards themselves are ordinary TRL reward functions, ``train.rewards``);
- ``_compute_loss`` adds ``seg_loss_weight`` (paper: 0.01) x the CTM segmentation loss (sigmoid BCE +
  Dice through the frozen SAM2 decoder). The completion's last hidden states are caught by a forward
  hook on the policy's final norm during TRL's own forward pass (no second pass) and *detached*, so
  the segmentation loss trains the CTM only, as in the paper;
- ``_save_checkpoint`` writes each TRL checkpoint into a staging directory and renames it into place,
  so an interrupted save never leaves a ``checkpoint-N`` that resuming would pick up; ``_save`` keeps
  the model's own weight names, without which ``Trainer`` cannot resume a Qwen2.5-VL
  (transformers#43701).

The advantage, clipped surrogate, k3 KL and per-sequence length averaging are TRL's with
``loss_type="grpo"``, ``scale_rewards="group"`` (advantage = (r - group mean) / (group std + 1e-4)),
``epsilon`` = clip, ``beta`` = KL weight. The CTM rides on the policy as a submodule named ``ctm``, so
TRL's optimiser and checkpoints carry it (under LoRA it is a ``modules_to_save`` module, trained in
full); SAM2 stays outside, frozen, its target features computed once per episode and cached.

The mask reward needs the completion's hidden states at scoring time, before TRL's loss forward; it
takes them from one teacher-forced forward per completion (``PolicyWrapper``), as the official code
does, so it works with any generation backend.

``train_stage2(cfg)`` (``run_stage2(config_path)`` from YAML) is the whole stage: load the stage-1
checkpoint, score it on held-out episodes, train (resuming from the newest TRL checkpoint in
``out_dir/trainer``), score again, and write a ``save_checkpoint`` directory. A non-finite loss stops
training naming the step, and no checkpoint is written with inf/NaN weights. Outputs under
``out_dir``::

    stage2.yaml           the config as run
    reference_policy/     the KL reference (stage-1 policy, transformers format; full fine-tuning, beta > 0)
    trainer/checkpoint-N  TRL checkpoints (weights, optimiser, RNG, trainer state)
    metrics.csv, curves.png   per-step metrics and the reward / loss curves
    eval.json             held-out rewards of stage 1 (before) and stage 2 (after)
    checkpoint/           the stage-2 policy + CTM (``models.checkpoint`` format)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from conceptseg_edge.data.meta import ConceptSegDataset
from conceptseg_edge.data.world import ConceptWorld
from conceptseg_edge.episodes import SYSTEM_PROMPT, MetaEpisode, build_meta_episode
from conceptseg_edge.errors import InputError, TrainingError
from conceptseg_edge.fileio import write_json
from conceptseg_edge.models.checkpoint import ConceptCheckpoint, load_checkpoint, save_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule
from conceptseg_edge.models.policy import PolicyWrapper
from conceptseg_edge.models.sam2 import build_sam2_model
from conceptseg_edge.tags import parse_output
from conceptseg_edge.train.config import check_types, load_config, save_config
from conceptseg_edge.train.log import MetricsLogger
from conceptseg_edge.train.rewards import (
    ConceptMasker,
    MaskIoUReward,
    box_reward,
    format_reward,
    mask_reward,
)
from conceptseg_edge.train.loop import require_finite_loss, set_threads, stage_output
from conceptseg_edge.train.sam2_batch import bce_dice
from conceptseg_edge.train.state import require_finite

#: Name of the CTM submodule on the policy while training.
CTM_ATTR = "ctm"
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SOURCES = ("conceptworld", "all_meta")
#: Reward names as TRL logs them (``rewards/<name>/mean``), in order.
REWARD_NAMES = ("format_reward", "box_reward", "mask_iou")
CURVES = ("reward", *(f"rewards/{n}/mean" for n in REWARD_NAMES), "loss", "seg_loss", "kl")
_STAGING = ".tmp-"


# --------------------------------------------------------------------------- config


@dataclass
class Stage2Data:
    """Where meta episodes come from."""

    source: str = field(default="conceptworld", metadata={"help": "conceptworld | all_meta"})
    root: str | None = field(default=None, metadata={"help": "all_meta: dataset root holding all_meta.json"})
    world_seed: int = field(default=0, metadata={"help": "conceptworld: world seed"})
    world_image_size: int = field(default=256, metadata={"help": "conceptworld: image side, pixels"})
    train_episodes: int = field(
        default=1000, metadata={"help": "conceptworld: train on episodes [0, n); all_meta: ignored (whole train split)"}
    )
    eval_episodes: int = field(
        default=50,
        metadata={"help": "held-out episodes: conceptworld [n, n + m); all_meta: the first m of the test split"},
    )
    support_seed: int = field(default=0, metadata={"help": "all_meta: seed of the support draws (one per episode)"})
    cache_size: int = field(default=256, metadata={"help": "episodes (and their SAM2 features) kept in memory"})

    def __post_init__(self) -> None:
        check_types(self, "stage2.data")
        if self.source not in SOURCES:
            raise InputError(f"data.source: expected one of {SOURCES}, got {self.source!r}")
        if self.source == "all_meta" and not self.root:
            raise InputError("data.root: required with source all_meta")
        if self.train_episodes < 1 or self.eval_episodes < 0 or self.cache_size < 1:
            raise InputError(
                "data: need train_episodes >= 1, eval_episodes >= 0, cache_size >= 1, got "
                f"{self.train_episodes}, {self.eval_episodes}, {self.cache_size}"
            )


@dataclass
class Stage2Lora:
    """LoRA on the policy (the paper fine-tunes it fully); the CTM is always trained in full."""

    enabled: bool = field(default=False, metadata={"help": "LoRA instead of full fine-tuning (paper: full)"})
    r: int = field(default=64, metadata={"help": "LoRA rank"})
    alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "attn.qkv", "attn.proj"),
        metadata={"help": "Linear names adapted inside the language model and the vision tower"},
    )

    def peft_config(self) -> Any:
        """A ``LoraConfig`` limited to the policy's own layers: the CTM's Linears are never adapted."""
        from peft import LoraConfig

        names = "|".join(re.escape(n) for n in self.target_modules)
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=rf"model\.(?:language_model|visual)\..*\.(?:{names})",
            modules_to_save=[CTM_ATTR],
            task_type="CAUSAL_LM",
        )


@dataclass
class Stage2Config:
    """Stage-2 settings. Defaults are the paper's where it sets them (G = 8, beta = 0.04, epsilon =
    0.2, lr 1e-6, temperature 1, 2048 new tokens, loss "grpo", segmentation weight 0.01, 8 prompts per
    GPU, full fine-tuning in bf16); the tiny configs override them for CPU runs."""

    stage1_checkpoint: str = field(
        default="runs/stage1/checkpoint", metadata={"help": "stage-1 checkpoint directory (models.checkpoint format)"}
    )
    out_dir: str = field(default="runs/stage2", metadata={"help": "trainer checkpoints, metrics, eval and the result"})
    data: Stage2Data = field(default_factory=Stage2Data)
    lora: Stage2Lora = field(default_factory=Stage2Lora)
    num_generations: int = field(default=8, metadata={"help": "group size G (paper: 8)"})
    beta: float = field(default=0.04, metadata={"help": "KL weight to the stage-1 policy, k3 estimator (paper: 0.04)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the surrogate (paper: 0.2)"})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate (paper: 1e-6)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (paper: 1)"})
    max_completion_length: int = field(default=2048, metadata={"help": "max new tokens per completion (paper: 2048)"})
    loss_type: str = field(default="grpo", metadata={"help": "TRL loss aggregation; grpo = per-sequence mean (paper)"})
    seg_loss_weight: float = field(default=0.01, metadata={"help": "weight of the CTM segmentation loss (paper: 0.01)"})
    prompts_per_device: int = field(default=8, metadata={"help": "prompts per device per step (paper: 8 per GPU)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimiser step"})
    steps_per_generation: int | None = field(default=None, metadata={
        "help": "micro-steps each generation batch feeds (null: gradient_accumulation_steps, TRL's default); "
                "1 generates per micro-batch, padding its prompts as a process of a multi-process run does"})
    num_iterations: int = field(default=1, metadata={"help": "updates per generation batch (paper: 1, on-policy)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the train episodes"})
    max_steps: int = field(default=-1, metadata={"help": "optimiser steps; > 0 overrides num_train_epochs"})
    bf16: bool = field(default=True, metadata={"help": "bf16 mixed precision (paper: bf16; CPU runs: false)"})
    use_cpu: bool = field(default=False, metadata={"help": "train on CPU even when a GPU is present"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations to save memory"})
    seed: int = field(default=42, metadata={"help": "seed of sampling, shuffling and initialisation"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every n steps"})
    save_steps: int = field(default=100, metadata={"help": "write a resumable trainer checkpoint every n steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "trainer checkpoints kept (null: all)"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest trainer checkpoint in out_dir/trainer"})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "held-out evaluation: greedy new tokens (null: max_completion_length)"}
    )
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (null: torch's default)"})

    def __post_init__(self) -> None:
        check_types(self, "stage2")  # before the comparisons below: a string or inf never reaches them
        checks = {
            "num_generations": self.num_generations >= 2,
            "beta": self.beta >= 0,
            "epsilon": self.epsilon > 0,
            "learning_rate": self.learning_rate > 0,
            "temperature": self.temperature > 0,
            "max_completion_length": self.max_completion_length >= 1,
            "seg_loss_weight": self.seg_loss_weight >= 0,
            "prompts_per_device": self.prompts_per_device >= 1,
            "gradient_accumulation_steps": self.gradient_accumulation_steps >= 1,
            "num_iterations": self.num_iterations >= 1,
            "steps_per_generation": self.steps_per_generation is None or self.steps_per_generation >= 1,
            "save_steps": self.save_steps >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"Stage2Config: out of range: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
        if self.loss_type not in LOSS_TYPES:
            raise InputError(f"Stage2Config.loss_type: expected one of {LOSS_TYPES}, got {self.loss_type!r}")

    def grpo_config(self, output_dir: Path) -> GRPOConfig:
        """TRL's config for this stage; ``per_device_train_batch_size`` counts completions.

        Raises:
            InputError: TRL refuses the combination (e.g. bf16 on a machine without bf16 support).
        """
        try:
            return GRPOConfig(
                output_dir=str(output_dir),
                num_generations=self.num_generations,
                beta=self.beta,
                epsilon=self.epsilon,
                learning_rate=self.learning_rate,
                temperature=self.temperature,
                top_p=1.0,
                top_k=0,
                max_completion_length=self.max_completion_length,
                loss_type=self.loss_type,
                scale_rewards="group",
                num_iterations=self.num_iterations,
                per_device_train_batch_size=self.prompts_per_device * self.num_generations,
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                steps_per_generation=self.steps_per_generation,
                # DDP: the CTM runs after the policy's forward, so with find_unused_parameters DDP
                # would mark its parameters ready (unused) in the forward and again when the
                # segmentation loss reaches them in the same backward; every parameter gets a
                # gradient in that backward, except the CTM's when the segmentation loss is off
                ddp_find_unused_parameters=self.seg_loss_weight == 0,
                num_train_epochs=self.num_train_epochs,
                max_steps=self.max_steps,
                bf16=self.bf16,
                use_cpu=self.use_cpu,
                activation_checkpointing=self.gradient_checkpointing,
                seed=self.seed,
                logging_steps=self.logging_steps,
                save_strategy="steps",
                save_steps=self.save_steps,
                save_total_limit=self.save_total_limit,
                remove_unused_columns=False,
                report_to="none",
                disable_tqdm=not self.progress,
                dataloader_num_workers=0,
            )
        except ValueError as exc:
            raise InputError(f"stage2: TRL refuses these settings: {exc}") from None


# --------------------------------------------------------------------------- episodes and dataset


class EpisodeStore:
    """Meta episodes by id, built on demand and kept in a small LRU cache.

    Ids: ``world/<i>`` (ConceptWorld episode i) or ``<split>/<index>/<cls_name>`` (an all_meta item);
    ``get(id)`` returns the episode.
    An id always yields the same episode: ConceptWorld episodes are pure functions of (seed, i), and
    all_meta supports are drawn from a generator seeded by (support_seed, crc32(id)).
    """

    def __init__(self, data: Stage2Data) -> None:
        self.data = data
        self.get: Callable[[str], MetaEpisode] = functools.lru_cache(maxsize=data.cache_size)(self._build)
        if data.source == "conceptworld":
            self._world = ConceptWorld(data.world_seed, data.world_image_size)
            self._dataset = None
        else:
            self._world = None
            self._dataset = ConceptSegDataset.open(data.root)

    def train_ids(self) -> list[str]:
        if self._world is not None:
            return [f"world/{i}" for i in range(self.data.train_episodes)]
        return [f"train/{i}/{cls}" for _, cls, i, _ in self._dataset.items("train")]

    def eval_ids(self) -> list[str]:
        n, m = self.data.train_episodes, self.data.eval_episodes
        if self._world is not None:
            return [f"world/{i}" for i in range(n, n + m)]
        return [f"test/{i}/{cls}" for _, cls, i, _ in self._dataset.items("test")][:m]

    def _build(self, episode_id: str) -> MetaEpisode:
        kind, _, rest = episode_id.partition("/")
        if self._world is not None and kind == "world" and rest.isdigit():
            ep = self._world.episode(int(rest))
            return build_meta_episode(ep.image, ep.mask, ep.query, ep.supports)
        if self._dataset is not None and rest.partition("/")[0].isdigit():
            index, _, cls_name = rest.partition("/")
            rng = np.random.default_rng([self.data.support_seed, zlib.crc32(episode_id.encode())])
            return self._dataset.meta_episode(kind, cls_name, int(index), rng)
        raise InputError(f"episode id {episode_id!r}: not an id of this {self.data.source} store")

    def row(self, episode_id: str) -> dict[str, Any]:
        """One TRL example: a conversational prompt, its images, and the reward columns."""
        ep = self.get(episode_id)
        return {
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": ep.prompt}],
            "images": [Image.fromarray(image) for image in ep.images()],
            "episode_id": episode_id,
            "gt_box": None if ep.gt_box is None else list(ep.gt_box),
            "hidden_box": None if ep.hidden_box is None else list(ep.hidden_box),
            "has_hidden_box": ep.has_hidden_box,
        }


def build_dataset(ids: Sequence[str]) -> Any:
    """A ``datasets.Dataset`` with one ``episode_id`` column; ``MetaGRPOTrainer`` expands each row
    into its prompt, images and reward columns (``EpisodeStore.row``) when it generates.

    Images never go through Arrow, and the fingerprint is the ids' sha256 rather than datasets'
    pickle-based hash of the table.
    """
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if not ids:
        raise InputError("dataset: no episodes")
    ids = list(ids)
    fingerprint = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:16]
    return Dataset(InMemoryTable.from_pydict({"episode_id": ids}), fingerprint=fingerprint)


# --------------------------------------------------------------------------- trainer


@contextmanager
def capture_last_hidden(policy: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the final norm's outputs ((B, L, d) last hidden states, detached) during the block."""
    rows: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        rows.append(output.detach())

    handle = policy.model.language_model.norm.register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


class MetaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with ConceptSeg-R1's rewards, the CTM segmentation loss and atomic checkpoints.

    Args:
        model: the policy with the CTM attached as ``model.ctm`` (``attach_ctm``).
        masker: the frozen SAM2 half (moved to the trainer's device here).
        episodes: resolves the dataset's ``episode_id`` column.
        seg_loss_weight: weight of the segmentation loss (paper: 0.01); 0 turns it off.
        **kwargs: ``GRPOTrainer`` arguments except ``reward_funcs``, which this class fixes to
            format, box IoU and mask IoU (weight 1 each).

    ``last_batch`` is the scored batch the last loss was computed on (None before the first step),
    and ``completion_logps`` scores a batch's completions under a model as the loss does: together
    the public view of a step, so a test need not reach into TRL's buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        masker: ConceptMasker,
        episodes: EpisodeStore,
        seg_loss_weight: float = 0.01,
        **kwargs: Any,
    ) -> None:
        if not isinstance(getattr(model, CTM_ATTR, None), ConceptTranslationModule):
            raise InputError(f"model.{CTM_ATTR}: attach the CTM to the policy first (attach_ctm)")
        self.masker = masker
        self.episodes = episodes
        self.seg_loss_weight = seg_loss_weight
        rewards = [format_reward, box_reward, MaskIoUReward(masker, episodes.get, self._concept_tokens)]
        # TRL left-pads prompt ids itself but takes mm_token_type_ids from the processor, padded on the
        # processor's side: right padding would shift a shorter prompt's image-token types (and so its
        # M-RoPE positions) in every log-prob forward. TRL sets "left" on processors it loads itself.
        kwargs["processing_class"].tokenizer.padding_side = "left"
        super().__init__(model=model, reward_funcs=rewards, **kwargs)
        self.masker.to(self.accelerator.device)
        if self.accelerator.is_main_process:
            for stale in Path(self.args.output_dir).glob(f"{_STAGING}{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(stale, ignore_errors=True)  # an interrupted save
        self._staging: Path | None = None
        self.last_batch: dict[str, Any] | None = None

    @property
    def policy(self) -> nn.Module:
        """The transformers policy being trained (LoRA layers injected, if any), unwrapped."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def ctm(self) -> nn.Module:
        """The trained CTM (under LoRA a ``modules_to_save`` wrapper that calls the trained copy)."""
        return getattr(self.policy, CTM_ATTR)

    def heldout_rewards(self, ids: Sequence[str], max_new_tokens: int, desc: str = "held-out") -> dict[str, float]:
        """``evaluate_rewards`` of the policy + CTM as they stand (greedy, the inference setting)."""
        return evaluate_rewards(
            self.policy, self.ctm, self.processing_class, self.masker, self.episodes, ids, max_new_tokens,
            progress=not self.args.disable_tqdm, desc=desc,
        )

    def _concept_tokens(self, episode: MetaEpisode, completion_ids: Sequence[int]) -> torch.Tensor:
        wrapper = PolicyWrapper(self.policy, self.processing_class)
        states = wrapper.teacher_forced_hidden_states(wrapper.build_inputs(episode.images(), episode.prompt), completion_ids)
        return self.ctm(states[None])

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [{**x, **self.episodes.row(x["episode_id"])} for x in inputs]
        try:
            output = super()._generate_and_score_completions(inputs)
        except RuntimeError as exc:  # torch.multinomial's refusal: a diverged policy samples from NaN
            if "probability tensor contains" not in str(exc):
                raise
            raise TrainingError(
                f"{Path(self.args.output_dir).parent}: step {self.state.global_step + 1}: the policy's sampling "
                "probabilities are inf/NaN (its weights diverged); training stopped. A learning rate this high "
                "does not train") from None
        ids, mask = output["completion_ids"], output["completion_mask"].bool()
        texts = self.processing_class.batch_decode(
            [row[m].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True
        )
        output["episode_id"] = [x["episode_id"] for x in inputs]
        output["seg_box"] = [
            parse_output(text, has_hidden_box=x["has_hidden_box"]).bbox for text, x in zip(texts, inputs, strict=True)
        ]
        return output

    @torch.no_grad()
    def completion_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Per-token log-probabilities ((B, C)) of ``batch``'s completions under ``model`` (the trained
        policy or ``ref_model``), computed as the loss computes them: prompt + completion in one
        teacher-forced forward with the batch's images."""
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        images = {k: batch.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "mm_token_type_ids")}
        logps, _, _ = self._get_per_token_logps_and_entropies(model, ids, mask, batch["completion_ids"].size(1), **images)
        return logps

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        self.last_batch = inputs  # the scored rollouts this loss saw: completions, advantages, reference log-probs
        with capture_last_hidden(self.policy) as captured:
            loss = super()._compute_loss(model, inputs)
        if self.seg_loss_weight != 0:
            seg = self.segmentation_loss(torch.cat(captured), inputs)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["seg_loss"].append(self.accelerator.gather(seg.detach()).mean().item())
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + self.seg_loss_weight * seg / normalizer
        require_finite_loss(loss.item(), str(Path(self.args.output_dir).parent), self.state.global_step + 1)
        return loss

    def segmentation_loss(
        self, hidden: torch.Tensor, inputs: dict[str, Any], ctm: nn.Module | None = None
    ) -> torch.Tensor:
        """Mean BCE + Dice over the batch's completions, from ``hidden`` ((B, P + C, d), detached).

        Row ``P - 1 + i`` is the state that produced completion token ``i`` (``P`` = padded prompt
        length), the rows ``PolicyWrapper`` gives the CTM at inference. ``ctm`` defaults to the
        trained one.
        """
        ctm = self.ctm if ctm is None else ctm
        prompt_len = inputs["prompt_ids"].size(1)
        lengths = inputs["completion_mask"].sum(1).tolist()
        if hidden.shape[0] != len(lengths) or hidden.shape[1] != prompt_len + inputs["completion_ids"].size(1):
            raise RuntimeError(
                f"captured hidden states {tuple(hidden.shape)} do not match the batch "
                f"({len(lengths)} x {prompt_len} + {inputs['completion_ids'].size(1)}): did TRL's forward change?"
            )
        logits, targets = [], []
        for b, (eid, box, n) in enumerate(zip(inputs["episode_id"], inputs["seg_box"], lengths, strict=True)):
            if n == 0:
                continue
            episode = self.episodes.get(eid)
            tokens = ctm(hidden[b : b + 1, prompt_len - 1 : prompt_len - 1 + n])
            logits.append(self.masker.logits(self.masker.features(eid, episode.target), tokens, box))
            targets.append(torch.from_numpy(episode.gt_mask))
        if not logits:
            return hidden.new_zeros(())
        stacked = torch.stack(logits)
        bce, dice = bce_dice(stacked, torch.stack(targets).to(stacked))
        return (bce + dice).mean()

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The parent's, except that full weights keep the model's own key names.

        ``save_pretrained`` writes Qwen2.5-VL's original names (``visual.*``, ``model.layers.*``) by
        default, and ``Trainer``'s resume loads them without renaming them back (transformers#43701):
        it only warns, and the resumed run silently restarts from the stage-1 weights. LoRA runs save
        adapter files, which resume reads correctly. No pickled ``training_args.bin`` either.
        """
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config"):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(
            output_dir, state_dict=state_dict, is_main_process=self.args.should_save, save_original_format=False
        )
        self.processing_class.save_pretrained(output_dir)
        return None

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """No batch once ``max_steps`` is reached. ``Trainer`` resumed mid-epoch from a checkpoint at
        ``max_steps`` (a run killed after its last save, before ``out_dir/checkpoint``) fetches the
        next batch and takes one more optimizer step, at the schedule's learning rate 0, before it
        first checks the step count; without a batch the epoch ends there."""
        if 0 < self.state.max_steps <= self.state.global_step:
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    # Atomic checkpoints: the parent writes <staging>/checkpoint-N, which is then renamed into place.
    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        require_finite(self.accelerator.unwrap_model(model).state_dict(), str(run_dir / name))
        self._staging = run_dir / f"{_STAGING}{name}"
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                final = run_dir / name
                if final.exists():
                    shutil.rmtree(final)
                os.replace(self._staging / name, final)
                shutil.rmtree(self._staging, ignore_errors=True)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )


def attach_ctm(policy: nn.Module, ctm: ConceptTranslationModule) -> nn.Module:
    """Make the CTM a submodule of the policy (TRL then optimises and checkpoints it); returns ``policy``."""
    setattr(policy, CTM_ATTR, ctm)
    return policy


def detach_ctm(policy: nn.Module) -> ConceptTranslationModule:
    """Take the CTM back off a (merged, unwrapped) policy, so ``save_checkpoint`` sees two modules."""
    ctm = getattr(policy, CTM_ATTR)
    delattr(policy, CTM_ATTR)
    return ctm


class MetricsCallback(TrainerCallback):
    """Mirrors TRL's logs to ``metrics.csv`` and redraws ``curves.png`` at every save and at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.logger = MetricsLogger(out_dir)
        self.png = Path(out_dir) / "curves.png"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if not state.is_world_process_zero or not logs or "train_runtime" in logs:  # skip the end-of-run summary
            return
        numeric = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.logger.log(state.global_step, **numeric)

    def plot(self) -> None:
        keys = [k for k in CURVES if self.logger.series(k)[0]]
        if keys:
            self.logger.plot(self.png, keys, title="Meta-GRPO (stage 2)")

    def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.is_world_process_zero:
            self.plot()

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        if state.is_world_process_zero:
            self.plot()


# --------------------------------------------------------------------------- evaluation and the stage


@torch.no_grad()
def evaluate_rewards(
    policy: nn.Module,
    ctm: nn.Module,
    processor: Any,
    masker: ConceptMasker,
    store: EpisodeStore,
    ids: Sequence[str],
    max_new_tokens: int,
    *,
    progress: bool = True,
    desc: str = "held-out",
) -> dict[str, float]:
    """Mean rewards of greedy completions on ``ids`` (the inference setting): each reward and their sum."""
    was_training = policy.training
    policy.eval()
    wrapper = PolicyWrapper(policy, processor)
    sums = dict.fromkeys(REWARD_NAMES, 0.0)
    try:
        for eid in tqdm(ids, desc=desc, unit="episode", disable=not progress):
            ep = store.get(eid)
            out = wrapper.generate(ep.images(), ep.prompt, max_new_tokens, greedy=True)
            sums["format_reward"] += format_reward([out.text], [ep.has_hidden_box])[0]
            sums["box_reward"] += box_reward([out.text], [ep.gt_box], [ep.hidden_box])[0]
            tokens = ctm(out.hidden_states[None]) if len(out.token_ids) else None
            sums["mask_iou"] += mask_reward(masker, eid, ep, out.text, tokens)
    finally:
        policy.train(was_training)
    means = {k: v / max(len(ids), 1) for k, v in sums.items()}
    return {**means, "total": sum(means.values()), "episodes": len(ids)}


def build_trainer(cfg: Stage2Config) -> tuple[MetaGRPOTrainer, ConceptCheckpoint]:
    """The stage-2 trainer on the stage-1 checkpoint, and that checkpoint (router, backbone, processor).

    With full fine-tuning and ``beta > 0`` the stage-1 policy is also written to
    ``out_dir/reference_policy``: TRL builds its KL reference model from a path.
    """
    set_threads(cfg.threads)
    out = Path(cfg.out_dir)
    args = cfg.grpo_config(out / "trainer")
    stage1 = load_checkpoint(cfg.stage1_checkpoint)
    backbone = stage1.backbone
    sam = build_sam2_model(backbone.config, backbone.checkpoint, backbone.image_size).model
    store = EpisodeStore(cfg.data)
    policy = stage1.policy
    if cfg.beta > 0 and not cfg.lora.enabled:
        reference = out / "reference_policy"
        with args.main_process_first(desc="KL reference"):  # the others then find it written
            if not (reference / "config.json").is_file():  # else written by the run being resumed
                tmp = out / f"{_STAGING}{reference.name}"
                shutil.rmtree(tmp, ignore_errors=True)
                policy.save_pretrained(tmp)
                os.replace(tmp, reference)
        policy.config._name_or_path = str(reference)
    trainer = MetaGRPOTrainer(
        attach_ctm(policy, stage1.ctm),
        masker=ConceptMasker(sam, cfg.data.cache_size),
        episodes=store,
        seg_loss_weight=cfg.seg_loss_weight,
        args=args,
        train_dataset=build_dataset(store.train_ids()),
        processing_class=stage1.processor,
        peft_config=cfg.lora.peft_config() if cfg.lora.enabled else None,
        callbacks=[MetricsCallback(out)],
    )
    return trainer, stage1


def run_stage2(config_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Run stage 2 from a YAML config (``Stage2Config``, ``out_dir`` overriding the config's); returns
    the output checkpoint directory (``train_stage2``)."""
    cfg = load_config(config_path, Stage2Config)
    if out_dir is not None:
        cfg = dataclasses.replace(cfg, out_dir=os.fspath(out_dir))
    return train_stage2(cfg)


def _has_trainer_checkpoint(out: Path) -> bool:
    return any((out / "trainer").glob(f"{PREFIX_CHECKPOINT_DIR}-*"))


def train_stage2(cfg: Stage2Config) -> Path:
    """Stage 2 as configured; returns the output checkpoint directory.

    Scores the stage-1 policy + CTM on the held-out episodes (reused from ``eval.json`` when resuming
    on the same episodes), trains, resuming from the newest trainer checkpoint when ``resume`` is
    set, scores again, and writes ``out_dir/checkpoint`` with ``save_checkpoint``. ``out_dir`` is
    checked before anything loads; a first run that fails before its first trainer checkpoint leaves
    no ``out_dir`` (``stage_output``), and ``stage2.yaml`` is written only once training starts.

    Raises:
        TrainingError: a non-finite loss, or non-finite weights at a save.
    """
    with stage_output(cfg.out_dir, "stage2.out_dir", _has_trainer_checkpoint) as out:
        trainer, stage1 = build_trainer(cfg)
        main = trainer.accelerator.is_main_process
        eval_ids = trainer.episodes.eval_ids()
        max_new = cfg.eval_max_new_tokens or cfg.max_completion_length
        report_path = out / "eval.json"
        report: dict[str, Any] = {"episodes": eval_ids}
        previous = _read_json(report_path)
        if previous.get("episodes") == eval_ids and "stage1" in previous:
            report["stage1"] = previous["stage1"]
        elif eval_ids and main:
            report["stage1"] = trainer.heldout_rewards(eval_ids, max_new, desc="stage1")
        if main:
            write_json(report_path, report)
            save_config(out / "stage2.yaml", cfg)

        last = get_last_checkpoint(trainer.args.output_dir) if cfg.resume and os.path.isdir(trainer.args.output_dir) else None
        trainer.train(resume_from_checkpoint=last)

        result = out / "checkpoint"
        if main:
            if eval_ids:
                report["stage2"] = trainer.heldout_rewards(eval_ids, max_new, desc="stage2")
                report["stage2_minus_stage1"] = report["stage2"]["total"] - report["stage1"]["total"]
            write_json(report_path, report)
            model = trainer.accelerator.unwrap_model(trainer.model)
            if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters into the weights
                model = model.merge_and_unload()
            require_finite(model.state_dict(), str(result))
            ctm = detach_ctm(model)
            save_checkpoint(result, model.eval(), ctm.eval(), stage1.processor, stage1.router, stage1.backbone,
                            overwrite=True)
        trainer.accelerator.wait_for_everyone()
    return result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
