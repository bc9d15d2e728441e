"""Meta-GRPO rewards: format, box IoU, mask IoU; and the frozen SAM2 that turns concept tokens into masks.

Each reward has weight 1 and follows TRL's reward-function contract: keyword arguments
``completions`` (plain strings, or conversational ``[{"role": "assistant", "content": ...}]``),
``completion_ids`` and the dataset's extra columns as lists, one value per completion; it returns one
float per completion and never raises on what the policy wrote.

Conventions, exactly (all boxes are ``(x1, y1, x2, y2)`` integer pixels with *inclusive* corners in
the 600x600 policy frame):

- ``format_reward``: 1.0 when ``tags.is_well_formed(text, has_hidden_box)`` holds, else 0.0.
  ``<rule>`` is always required; ``<check>`` is required exactly when the episode hides a box.
- ``box_reward``: the boxes scored are the ones the inference pipeline would act on, i.e.
  ``tags.parse_output``'s tolerant parse: the first ``<bbox>``/``<check>`` wins, decimals round half
  up, swapped corners are reordered (an "inverted" box scores like its ordered twin), corners are
  clipped to the frame, and a tag that is missing, empty, holds other than four numbers, or lies
  wholly outside the frame gives no box. Then

    * no hidden box: ``IoU(bbox, gt_box) ** 2``;
    * a hidden box:  ``IoU(bbox, gt_box) * IoU(check, hidden_box)``;

  where a missing box has IoU 0, and IoU counts pixels (area = (x2 - x1 + 1) * (y2 - y1 + 1)), so a
  one-pixel box ``[x, y, x, y]`` has area 1. An episode without a ground-truth box (its mask is empty)
  gives 0.0 to every completion: a reward that is constant over a group adds nothing to the
  advantages, so "nothing to localise" is neutral rather than a guess.
- ``mask_iou`` (``MaskIoUReward``): the policy's completion hidden states go through the CTM to
  concept tokens; SAM2's decoder takes them with the tolerantly parsed ``<bbox>`` as box prompt (no
  box: the tokens alone) on the cached features of the 600x600 target; its single-mask output (SAM2's
  stability fallback included, as at inference) is upsampled bilinearly to 600x600, binarised at
  logit 0 and scored by foreground IoU against the ground truth (``metrics.iou``: an empty
  prediction of an empty ground truth scores 1.0). Malformed completions still get a mask reward:
  the CTM reads their hidden states all the same.

``ConceptMasker`` is that frozen SAM2 half, shared by the mask reward and the stage-2 segmentation
loss (sigmoid BCE + Dice, 1:1, at 600x600, ``train.sam2_batch.bce_dice``), so both judge the same mask.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from conceptseg_edge.episodes import FRAME, MetaEpisode, box_to_image
from conceptseg_edge.errors import InputError
from conceptseg_edge.metrics import iou as mask_iou
from conceptseg_edge.models.sam2 import STABILITY_DELTA, STABILITY_THRESH, SAM2ImageEncoder, SAM2PromptDecoder
from conceptseg_edge.preprocess import Prompts, encode_prompts, select_mask
from conceptseg_edge.tags import Box, is_well_formed, parse_output
from conceptseg_edge.train.sam2_batch import empty_mask_prompt, sam_input, upsample


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a string, or the content of its last (assistant) message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # structured blocks: [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def as_box(value: Any) -> Box | None:
    """A dataset box column value (list/tuple of four ints, or None) as a ``Box``."""
    if value is None:
        return None
    values = tuple(int(v) for v in value)
    if len(values) != 4:
        raise InputError(f"box column: expected four integers or null, got {value!r}")
    return values  # type: ignore[return-value]


def box_iou(a: Box | None, b: Box | None) -> float:
    """IoU of two inclusive-corner pixel boxes; 0.0 when either is missing.

    Corners are taken as given (``x1 <= x2``, ``y1 <= y2``, as ``tags.parse_box`` returns them); an
    unordered box has no area and so IoU 0.
    """
    if a is None or b is None:
        return 0.0
    area_a = max(0, a[2] - a[0] + 1) * max(0, a[3] - a[1] + 1)
    area_b = max(0, b[2] - b[0] + 1) * max(0, b[3] - b[1] + 1)
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, iw) * max(0, ih)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def format_reward(completions: Sequence[Any], has_hidden_box: Sequence[bool], **_: Any) -> list[float]:
    """1.0 for a completion in the exact tag format, else 0.0."""
    return [float(is_well_formed(completion_text(c), bool(h))) for c, h in zip(completions, has_hidden_box, strict=True)]


def box_reward(
    completions: Sequence[Any], gt_box: Sequence[Any], hidden_box: Sequence[Any], **_: Any
) -> list[float]:
    """IoU(bbox, gt)² without a hidden box, IoU(bbox, gt) × IoU(check, hidden) with one."""
    rewards = []
    for completion, gt, hidden in zip(completions, gt_box, hidden_box, strict=True):
        gt, hidden = as_box(gt), as_box(hidden)
        if gt is None:
            rewards.append(0.0)
            continue
        parsed = parse_output(completion_text(completion), has_hidden_box=hidden is not None)
        target = box_iou(parsed.bbox, gt)
        rewards.append(target * box_iou(parsed.check, hidden) if hidden is not None else target**2)
    return rewards


class ConceptMasker:
    """Frozen SAM2 for training: cached target features, differentiable in the concept tokens.

    ``features`` runs the image encoder once per key (an episode id) and keeps the last
    ``cache_size`` results; ``logits`` decodes concept tokens + an optional box into a (600, 600)
    logit map in the policy frame. SAM2's parameters never receive gradients.
    """

    def __init__(self, sam: nn.Module, cache_size: int = 256) -> None:
        if cache_size < 1:
            raise InputError(f"cache_size: expected >= 1, got {cache_size}")
        sam.eval().requires_grad_(False)
        self.encoder = SAM2ImageEncoder(sam)
        self.decoder = SAM2PromptDecoder(sam)
        self.image_size = int(sam.image_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return self.decoder.image_pe.device

    def to(self, device: str | torch.device) -> ConceptMasker:
        self.encoder.to(device)
        self.decoder.to(device)
        self._cache.clear()
        return self

    @torch.no_grad()
    def features(self, key: str, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM2 features of ``image`` ((600, 600, 3) uint8), computed once per ``key``."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        feats = self.encoder(sam_input([image], self.image_size).to(self.device))
        self._cache[key] = feats
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return feats

    def logits(
        self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], tokens: torch.Tensor, box: Box | None
    ) -> torch.Tensor:
        """(600, 600) mask logits for ``tokens`` ((1, K, 256)) and an optional policy-frame box.

        The box enters as SAM2's predictor would pass it (two corner points, labels 2 and 3, then a
        padding point); without one the tokens are the only prompt. The mask is token 0 unless SAM2's
        stability fallback picks another, as at inference; the choice itself carries no gradient.
        """
        box_px = box_to_image(box, (FRAME, FRAME))
        prompts = Prompts(box=None if box_px is None else np.asarray(box_px, np.float32))
        coords, labels = encode_prompts(prompts, (FRAME, FRAME), self.image_size)
        dev = self.device
        mask_input, has_mask_input = empty_mask_prompt(1, self.image_size)
        masks, ious, _ = self.decoder(
            *feats,
            torch.from_numpy(coords).to(dev),
            torch.from_numpy(labels).to(dev),
            tokens.to(dev, torch.float32),
            mask_input.to(dev),
            has_mask_input.to(dev),
        )
        index, _, _ = select_mask(
            masks[0].detach().float().cpu().numpy(),
            ious[0].detach().float().cpu().numpy(),
            multimask=False,
            delta=STABILITY_DELTA,
            thresh=STABILITY_THRESH,
        )
        return upsample(masks[:, index : index + 1], (FRAME, FRAME))[0, 0]


@torch.no_grad()
def mask_reward(
    masker: ConceptMasker, episode_id: str, episode: MetaEpisode, text: str, tokens: torch.Tensor | None
) -> float:
    """Mask IoU of one completion given its concept tokens ((1, K, 256); None when it has no tokens,
    hence no concept: an empty mask)."""
    if tokens is None:
        pred = np.zeros_like(episode.gt_mask, dtype=bool)
    else:
        box = parse_output(text, has_hidden_box=episode.has_hidden_box).bbox
        logits = masker.logits(masker.features(episode_id, episode.target), tokens, box)
        pred = logits.float().cpu().numpy() > 0.0
    return mask_iou(pred, episode.gt_mask)


#: Concept tokens of one completion: (episode, completion token ids) -> (1, K, 256).
TokensFn = Callable[[MetaEpisode, Sequence[int]], torch.Tensor]


class MaskIoUReward:
    """The mask reward as a TRL reward function (``__name__`` is ``"mask_iou"``).

    Args:
        masker: the frozen SAM2 half.
        episode: looks an episode up by the dataset's ``episode_id`` column.
        concept_tokens: the current policy + CTM's tokens for a completion (the trainer supplies it,
            so the reward always reads the weights being trained).
    """

    __name__ = "mask_iou"

    def __init__(self, masker: ConceptMasker, episode: Callable[[str], MetaEpisode], concept_tokens: TokensFn) -> None:
        self.masker = masker
        self.episode = episode
        self.concept_tokens = concept_tokens

    def __call__(
        self,
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        episode_id: Sequence[str],
        **_: Any,
    ) -> list[float]:
        rewards = []
        for completion, ids, eid in zip(completions, completion_ids, episode_id, strict=True):
            episode = self.episode(eid)
            with torch.no_grad():
                tokens = self.concept_tokens(episode, ids) if len(ids) else None
            rewards.append(mask_reward(self.masker, eid, episode, completion_text(completion), tokens))
        return rewards
