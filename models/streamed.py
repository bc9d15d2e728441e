"""A policy whose decoder layers stay in their shards until a forward needs them.

Exporting a Qwen2.5-VL-3B/7B on a machine with less memory than its fp32 weights (3B: 15 GB,
7B: 31 GB) needs a model that never holds them all. ``open_streamed_policy`` builds the model on
the meta device and makes resident, in float32, only what is small next to the decoder: the vision
tower, the embedding, the final norm and the LM head (a few GB at 3B). The decoder layers stay in
the memory-mapped shards:

* ``StreamedPolicy.streaming()`` loads each layer's weights (fp32) just before it runs and drops
  them after, so the transformers modules themselves run at full depth with one layer resident:
  this is the torch reference the exported graphs are checked against, and what generates the
  quantized decoder's validation completions.
* ``StreamedPolicy.placeholders()`` gives every layer zero-memory stand-in weights (``placeholder``)
  for tracing; the real ones are bound into the graph afterwards
  through ``StreamedPolicy.weight``.

Both layouts ``models.checkpoint.load_checkpoint`` reads are accepted: ours (one
``model.safetensors``, hashes checked) and the release layout (sharded, index checked).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from conceptseg_edge.errors import CheckpointError
from conceptseg_edge.models.checkpoint import policy_source
from conceptseg_edge.models.ctm import CTM_PREFIXES
from conceptseg_edge.models.policy import ConceptSegProcessor
from conceptseg_edge.models.shards import ShardSet, TensorInfo, read_tensor

_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


@dataclass
class StreamedPolicy:
    """The policy model (decoder layers on the meta device between uses), its processor and shards."""

    model: torch.nn.Module  # Qwen2_5_VLForConditionalGeneration
    processor: ConceptSegProcessor
    shards: ShardSet
    names: dict[str, TensorInfo]  # transformers name → where the tensor is stored

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.model.language_model.layers

    def weight(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (transformers' name) in float32: the resident one, else read from its shard."""
        if not _LAYER.match(name):
            tensor = self.model.get_parameter(name)
            if tensor.device.type != "meta":
                return tensor.detach()
        if name not in self.names:
            raise KeyError(name)
        return read_tensor(self.shards, self.names[name]).float()

    def layer_state(self, index: int) -> dict[str, torch.Tensor]:
        prefix = f"model.language_model.layers.{index}."
        return {key: self.weight(prefix + key) for key in self.layers[index].state_dict()}

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Run forwards at full depth with one decoder layer's weights resident at a time."""

        def load(index: int):
            def hook(layer, args):  # noqa: ARG001 - forward pre-hook signature
                layer.load_state_dict(self.layer_state(index), strict=True, assign=True)

            return hook

        def drop(layer, args, output):  # noqa: ARG001 - forward hook signature
            layer.to("meta")

        handles = []
        for i, layer in enumerate(self.layers):
            handles += [layer.register_forward_pre_hook(load(i)), layer.register_forward_hook(drop)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.layers.to("meta")

    @contextlib.contextmanager
    def placeholders(self) -> Iterator[None]:
        """Give every decoder layer stand-in weights (no memory, distinct values) for tracing."""
        for layer in self.layers:
            state = {key: placeholder(tensor.shape) for key, tensor in layer.state_dict(keep_vars=True).items()}
            layer.load_state_dict(state, strict=True, assign=True)
        try:
            yield
        finally:
            self.layers.to("meta")


def placeholder(shape: torch.Size) -> torch.Tensor:
    """A stand-in weight for tracing: ``shape`` as a stride-0 view of one scalar, so no memory. The
    exporter takes weights as graph inputs (``export.external.export_unbound``) and never reads them."""
    return torch.zeros((), dtype=torch.float32).expand(shape)


def open_streamed_policy(path: str | os.PathLike[str]) -> StreamedPolicy:
    """Check the checkpoint at ``path`` and build its policy with only the non-layer weights resident.

    Raises:
        CheckpointError: the checkpoint is unreadable, or its tensors do not match the config.
    """
    path = Path(path)
    config, processor, shards, names = policy_source(path)
    names = {k: v for k, v in names.items() if not k.startswith(CTM_PREFIXES)}
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    expected = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False))
    allowed_missing = {"lm_head.weight"} if tied else set()
    missing = sorted(expected.keys() - names.keys() - allowed_missing)
    unexpected = sorted(names.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for key, meta in names.items():
        if tuple(expected[key].shape) != meta.shape:
            raise CheckpointError(f"{path / meta.shard}: {meta.name}: shape {list(meta.shape)}, "
                                  f"model expects {list(expected[key].shape)}")
    resident = {k: read_tensor(shards, names[k]).float() for k in names if not _LAYER.match(k)}
    model.load_state_dict(resident, strict=False, assign=True)
    if "lm_head.weight" not in names:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):  # non-persistent buffers: rebuild on CPU
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(module.config))
    return StreamedPolicy(model.eval(), processor, shards, names)
