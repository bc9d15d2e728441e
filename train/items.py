"""The episode items warmstart and stage 1 train on, the order a step draws them in, and the template.

``EpisodeData`` says where targets come from (ConceptWorld, or an ``all_meta.json`` root) and
``load_items`` lays each target out as the policy sees it (an ``Item`` with its ``MetaEpisode``).
``epoch_picks`` is the data order: a pure function of seed and step, so a resumed run draws exactly
the items an uninterrupted one would. ``template_completion`` is the tag-format completion with
the ground truth filled in: what warmstart teaches and stage 1 teacher-forces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from conceptseg_edge.episodes import MetaEpisode, box_to_image, build_meta_episode
from conceptseg_edge.errors import InputError
from conceptseg_edge.tags import format_output
from conceptseg_edge.train.config import require_fraction, require_positive

#: Held-out ConceptWorld episodes start here (as in train/backbone.py); training uses [0, n).
VAL_OFFSET = 1_000_000


def epoch_picks(seed: int, n: int, step: int, per_step: int, start: int, count: int) -> list[int]:
    """``count`` item indices from position ``start`` of step ``step``'s share of a shuffled epoch.

    Each epoch is a fresh permutation of ``range(n)`` from ``default_rng([seed, epoch])``; steps take
    consecutive runs of ``per_step`` from it (wrapping around). A pure function of its arguments.
    """
    steps_per_epoch = max(1, math.ceil(n / per_step))
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    first = k * per_step + start
    return [int(order[(first + j) % n]) for j in range(count)]


#: Where targets come from: ConceptWorld, or a dataset root holding all_meta.json.
DataSource = Literal["world", "meta"]
DATA_SOURCES: tuple[DataSource, ...] = get_args(DataSource)


def check_source(where: str, source: str, root: str | None) -> None:
    """``InputError`` for an unknown source, or for 'meta' without a dataset root."""
    if source not in DATA_SOURCES:
        raise InputError(f"{where}.source: expected 'world' or 'meta', got {source!r}")
    if source == "meta" and not root:
        raise InputError(f"{where}.root: required when data.source is 'meta'")


#: The template's ``<think>`` and ``<rule>`` text: fixed and short, so a tiny policy writes the whole
#: format in few tokens and what it has to work out is in the boxes and the answer.
TEMPLATE_THINK = "Find the query."
TEMPLATE_RULE = "Box the match."


def template_completion(meta: MetaEpisode) -> str:
    """The tag-format completion with the ground-truth ``<bbox>`` (and ``<check>`` when a support box
    is hidden) and the query as ``<answer>``: what warmstart teaches and stage 1 teacher-forces.

    Raises:
        InputError: the episode has no ground-truth box (an empty target mask).
    """
    if meta.gt_box is None:
        raise InputError(f"template: episode {meta.query!r} has an empty target mask, so no <bbox>")
    return format_output(think=TEMPLATE_THINK, rule=TEMPLATE_RULE, bbox=meta.gt_box, answer=meta.query,
                         check=meta.hidden_box)


@dataclass
class EpisodeData:
    """Where training and held-out targets come from (warmstart, stage 1)."""

    source: DataSource = field(default="world", metadata={"help": "'world' (ConceptWorld) or 'meta' (an all_meta.json root)"})
    root: str | None = field(default=None, metadata={"help": "dataset root for source 'meta'"})
    seed: int = 0
    image_size: int = field(default=128, metadata={"help": "ConceptWorld image side, px"})
    train_episodes: int = field(default=400, metadata={"help": "world: indices [0, n); meta: at most n train items"})
    val_episodes: int = field(default=40, metadata={"help": "world: from VAL_OFFSET; meta: the test split"})
    support_prob: float = field(default=0.5, metadata={"help": "CI/CD items shown with their supports (CR always)"})

    def validate(self, where: str) -> None:
        check_source(where, self.source, self.root)
        require_positive(where, train_episodes=self.train_episodes, val_episodes=self.val_episodes)
        require_fraction(where, support_prob=self.support_prob)


@dataclass
class Item:
    """One training/eval target with what the policy stages need from it."""

    image: np.ndarray  # (H, W, 3) uint8, the target
    mask: np.ndarray  # (H, W) bool
    query: str
    level: str
    task: str
    meta: MetaEpisode  # the policy's view, ground truth in the 600x600 frame

    @property
    def box_px(self) -> tuple[float, float, float, float] | None:
        """The ground-truth ``<bbox>`` as the pipeline would pass it to SAM2 (image pixels)."""
        return box_to_image(self.meta.gt_box, self.image.shape[:2])

    @property
    def shortcut_ok(self) -> bool:
        return self.level != "CR"


def world_items(data: EpisodeData, split: str) -> list[Item]:
    from conceptseg_edge.data.world import ConceptWorld

    world = ConceptWorld(data.seed, data.image_size)
    if split == "train":
        indices = range(data.train_episodes)
    else:
        indices = range(VAL_OFFSET, VAL_OFFSET + data.val_episodes)
    items = []
    for i in indices:
        ep = world.episode(i)
        if not ep.mask.any():
            continue
        rng = np.random.default_rng([data.seed, i, 7])
        supports = ep.supports if (ep.level == "CR" or rng.random() < data.support_prob) else ()
        meta = build_meta_episode(ep.image, ep.mask, ep.query, supports)
        items.append(Item(ep.image, ep.mask, ep.query, ep.level, ep.task_name, meta))
    return items


def meta_items(data: EpisodeData, split: str) -> list[Item]:
    from conceptseg_edge.data.meta import ConceptSegDataset

    dataset = ConceptSegDataset.open(data.root)
    name = "train" if split == "train" else "test"
    if name not in dataset.splits:
        raise InputError(f"{data.root}: no {name!r} split in all_meta.json")
    limit = data.train_episodes if split == "train" else data.val_episodes
    items = []
    for k, (_, cls_name, index, meta_item) in enumerate(dataset.items(name)):
        if k >= limit:
            break
        rng = np.random.default_rng([data.seed, k, 7])
        ep = dataset.load(meta_item)
        if not ep.mask.any():
            continue
        if ep.level != "CR" and rng.random() >= data.support_prob:
            meta = build_meta_episode(ep.image, ep.mask, ep.query, ())
        else:
            meta = dataset.meta_episode(name, cls_name, index, rng)
        items.append(Item(ep.image, ep.mask, ep.query, ep.level, ep.task_name, meta))
    return items


def load_items(data: EpisodeData, split: str, where: str = "data") -> list[Item]:
    """Targets with a non-empty mask: ``split`` "train" or "val" (world) / "test" split (meta)."""
    items = world_items(data, split) if data.source == "world" else meta_items(data, split)
    if not items:
        raise InputError(f"{where}: no {split} items with a non-empty mask")
    return items
