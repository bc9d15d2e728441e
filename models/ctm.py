"""The Concept Translation Module (CTM): policy hidden states -> 8 SAM-width prompt tokens.

Contract: ``ConceptTranslationModule(cfg)(hidden)`` maps the policy's last-layer hidden states of the
completion tokens, ``(B, T, d)``, to ``(B, N, 256)`` prompt embeddings (N = 8) that enter SAM2's mask
decoder as sparse prompt tokens. T is free: the queries attend to every row of ``hidden`` with no
padding mask (the official model has none), so callers pass exactly the tokens they mean, unpadded.

The parameter names are the official checkpoint's, so its CTM weights load with ``strict=True``::

    learnable_query.weight                      (N, d)       an nn.Embedding table, init N(0, 0.02)
    connector.pos_embed                         (1, N, d)
    connector.blocks.{i}.norm0|norm1|norm2      LayerNorm(d)
    connector.blocks.{i}.attn.q                 Linear(d, d)
    connector.blocks.{i}.attn.kv                Linear(d, 2d)   k = first d outputs, v = last d
    connector.blocks.{i}.attn.proj              Linear(d, d)
    connector.blocks.{i}.mlp.fc1|fc2            Linear(d, 4d), Linear(4d, d)
    proj_to_sam.0, proj_to_sam.2                Linear(d, d), Linear(d, 256)  (GELU between)

Two details are not pinned by the method notes and are config fields rather than guesses baked in:
the LayerNorm epsilon (torch's default 1e-5) and whether the attention projections carry biases
(``attn_bias=True``); a checkpoint that disagrees on the latter fails loading with named missing or
unexpected keys rather than loading silently.

The forward is export-friendly: plain Linear/LayerNorm, ``F.scaled_dot_product_attention`` without
a mask, no data-dependent control flow, and T may be a dynamic ONNX axis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conceptseg_edge.errors import InputError

#: State-dict prefixes the CTM owns inside a combined policy + CTM safetensors file.
CTM_PREFIXES: tuple[str, ...] = ("learnable_query.", "connector.", "proj_to_sam.")

_BLOCK = re.compile(r"connector\.blocks\.(\d+)\.")

#: SAM / SAM2 prompt-embedding width; the output width of ``proj_to_sam``.
SAM_PROMPT_DIM = 256


@dataclass(frozen=True)
class CTMConfig:
    """Shape of a CTM. ``hidden_size`` must equal the policy's text hidden size (2048 for 3B)."""

    hidden_size: int = field(metadata={"help": "policy hidden size d (2048 for Qwen2.5-VL-3B, 3584 for 7B)"})
    num_queries: int = field(default=8, metadata={"help": "learnable queries N = prompt tokens given to SAM2"})
    depth: int = field(default=4, metadata={"help": "cross-attention blocks"})
    num_heads: int = field(default=16, metadata={"help": "attention heads; must divide hidden_size"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP hidden width = mlp_ratio * hidden_size"})
    out_dim: int = field(default=SAM_PROMPT_DIM, metadata={"help": "prompt width of the segmentation backbone"})
    layer_norm_eps: float = field(default=1e-5, metadata={"help": "LayerNorm epsilon (not pinned by the paper)"})
    attn_bias: bool = field(default=True, metadata={"help": "bias on attn.q / attn.kv / attn.proj"})

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_queries", "depth", "num_heads", "mlp_ratio", "out_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"CTMConfig.{name}: expected a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise InputError(
                f"CTMConfig.num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}"
            )
        if not self.layer_norm_eps > 0:
            raise InputError(f"CTMConfig.layer_norm_eps: expected > 0, got {self.layer_norm_eps!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, tuple[int, ...]], *, num_heads: int = 16, layer_norm_eps: float = 1e-5
    ) -> CTMConfig:
        """Infer the config from a state dict's tensor shapes (a release's config.json has no CTM section).

        N and d come from ``learnable_query.weight``, the depth from the block indices, the MLP ratio
        from ``fc1``, the output width from ``proj_to_sam.2``, ``attn_bias`` from whether ``attn.q``
        has a bias. The head count and LayerNorm epsilon leave no trace in the shapes: they are
        arguments (defaults: the paper's 16 heads, torch's 1e-5).
        """
        where = "CTM weights"
        try:
            num_queries, hidden = shapes["learnable_query.weight"]
            out_dim = shapes["proj_to_sam.2.weight"][0]
            fc1_out = shapes["connector.blocks.0.mlp.fc1.weight"][0]
        except (KeyError, ValueError, IndexError) as exc:
            raise InputError(
                f"{where}: cannot infer the CTM config, missing or misshapen {exc} "
                "(a plain Qwen2.5-VL has no CTM; ConceptSeg-R1 stores one beside the policy)"
            ) from exc
        blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
        depth = max(blocks) + 1
        if blocks != set(range(depth)):
            raise InputError(f"{where}: connector block indices {sorted(blocks)} are not 0..{depth - 1}")
        if fc1_out % hidden:
            raise InputError(f"{where}: mlp.fc1 width {fc1_out} is not a multiple of hidden size {hidden}")
        return cls(
            hidden_size=hidden,
            num_queries=num_queries,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=fc1_out // hidden,
            out_dim=out_dim,
            layer_norm_eps=layer_norm_eps,
            attn_bias="connector.blocks.0.attn.q.bias" in shapes,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CTMConfig:
        """Build from JSON data; unknown keys are an error, so a config from another schema is caught."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"CTMConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InputError(f"CTMConfig: {exc}") from exc


class CrossAttention(nn.Module):
    """Multi-head attention of queries over ``kv_input``; k and v come from one fused ``kv`` Linear."""

    def __init__(self, dim: int, num_heads: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, d) attends to ``kv_input`` (B, T, d); returns (B, N, d)."""
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(kv_input).reshape(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the CLIP-style GELU approximation the CTM's MLP uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConnectorBlock(nn.Module):
    """Pre-norm cross-attention then MLP, both residual; no self-attention among the queries."""

    def __init__(self, cfg: CTMConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm0 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn = CrossAttention(d, cfg.num_heads, bias=cfg.attn_bias)
        self.mlp = Mlp(d, cfg.mlp_ratio * d)

    def forward(self, q: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q = q + self.attn(self.norm0(q), self.norm1(hidden))
        return q + self.mlp(self.norm2(q))


class Connector(nn.Module):
    def __init__(self, cfg: CTMConfig) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_queries, cfg.hidden_size))
        self.blocks = nn.ModuleList(ConnectorBlock(cfg) for _ in range(cfg.depth))

    def forward(self, queries: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q = queries + self.pos_embed
        for block in self.blocks:
            q = block(q, hidden)
        return q


class ConceptTranslationModule(nn.Module):
    """Learnable queries read the policy's completion hidden states and become SAM2 prompt tokens."""

    def __init__(self, cfg: CTMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.learnable_query = nn.Embedding(cfg.num_queries, cfg.hidden_size)
        self.connector = Connector(cfg)
        self.proj_to_sam = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.hidden_size),
            nn.GELU(),
            nn.Linear(cfg.hidden_size, cfg.out_dim),
        )
        nn.init.normal_(self.learnable_query.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.connector.pos_embed, mean=0.0, std=0.02)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Translate hidden states to prompt tokens.

        Args:
            hidden: (B, T, d) last-layer policy hidden states (after the final RMSNorm) of the
                completion tokens, any float dtype; cast to the CTM's dtype here so a bf16 policy
                can feed an fp16/fp32 CTM.

        Returns:
            (B, N, out_dim) prompt embeddings in the CTM's dtype.
        """
        # Skipped under TorchScript tracing, where shapes are tensors and the check only warns.
        if not torch.jit.is_tracing() and (hidden.dim() != 3 or hidden.shape[-1] != self.config.hidden_size):
            raise InputError(
                f"hidden: expected (B, T, {self.config.hidden_size}), got {tuple(hidden.shape)}"
            )
        hidden = hidden.to(self.connector.pos_embed.dtype)
        queries = self.learnable_query.weight.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        return self.proj_to_sam(self.connector(queries, hidden))


def split_ctm_state_dict(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a combined policy + CTM state dict into ``(ctm, policy)`` by the official CTM prefixes."""
    ctm = {k: v for k, v in state.items() if k.startswith(CTM_PREFIXES)}
    policy = {k: v for k, v in state.items() if not k.startswith(CTM_PREFIXES)}
    return ctm, policy
