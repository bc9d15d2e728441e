"""SAM2 variants by name: the sam2 config, Hydra overrides, and decoder rebuilds; no torch.

The names are what ``--config`` / ``BackboneSpec.config`` / ``sam2_config`` accept. They live apart
from ``models/sam2.py`` so the CLI can list them while it parses arguments without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The variant ``export sam2`` builds when none is named.
DEFAULT_CONFIG = "sam2.1_hiera_t"


@dataclass(frozen=True)
class MaskDecoderShape:
    """How a variant's mask decoder differs from the one ``SAM2Base._build_sam_heads`` hard-codes.

    ``_build_sam_heads`` always builds a depth-2 ``TwoWayTransformer`` with ``mlp_dim=2048`` and
    256-wide hypernetwork / IoU / object-score MLPs. A variant that wants a smaller decoder names the
    sizes here and ``build_sam2_model`` rebuilds those submodules with the sam2 package's own classes
    (``TwoWayTransformer``, ``MLP``) right after instantiation, before any checkpoint is loaded. The
    prompt/transformer width stays the model's ``hidden_dim`` (256): concept tokens and the runtime
    assume it. ``None`` keeps sam2's value.
    """

    transformer_depth: int | None = None
    transformer_mlp_dim: int | None = None
    attention_downsample_rate: int | None = None  # cross attentions (token<->image); sam2: 2
    num_heads: int | None = None  # transformer attention heads; sam2: 8
    head_hidden_dim: int | None = None  # hypernetwork, IoU and object-score MLPs; sam2: 256


@dataclass(frozen=True)
class SAM2Variant:
    """A config inside the sam2 package, Hydra overrides on it, and optional decoder rebuilds."""

    config_file: str
    overrides: tuple[str, ...] = ()
    mask_decoder: MaskDecoderShape | None = None


# SAM2 variants by the names the CLI and checkpoints use. The four official SAM 2.1 sizes take no
# changes; smaller variants (the embedded default's backbone) are the same sam2 modules with
# narrower, shallower settings.
SAM2_CONFIGS: dict[str, SAM2Variant] = {
    "sam2.1_hiera_t": SAM2Variant("configs/sam2.1/sam2.1_hiera_t.yaml"),
    "sam2.1_hiera_s": SAM2Variant("configs/sam2.1/sam2.1_hiera_s.yaml"),
    "sam2.1_hiera_b+": SAM2Variant("configs/sam2.1/sam2.1_hiera_b+.yaml"),
    "sam2.1_hiera_l": SAM2Variant("configs/sam2.1/sam2.1_hiera_l.yaml"),
    # ConceptSeg-Tiny's backbone (train/backbone.py pretrains it on ConceptWorld at 128 px), sized
    # so the whole bundle can be committed: a 6-block Hiera, widths 16/32/64/128, global attention
    # in the third stage; the memory modules (unused on images) cut to one layer; a one-block
    # two-way transformer with a 256-wide MLP and 64-wide output heads. The prompt / transformer
    # width stays SAM2's 256 (the CTM's concept tokens and the runtime assume it).
    "conceptseg_tiny": SAM2Variant(
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        (
            "++model.image_encoder.trunk.embed_dim=16",
            "++model.image_encoder.trunk.num_heads=1",
            "++model.image_encoder.trunk.stages=[1,1,3,1]",
            "++model.image_encoder.trunk.global_att_blocks=[3,4]",
            "++model.image_encoder.trunk.window_spec=[8,4,8,4]",
            "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[8,8]",
            "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
            "++model.memory_attention.num_layers=1",
            "++model.memory_attention.layer.dim_feedforward=256",
            "++model.memory_encoder.fuser.num_layers=1",
        ),
        MaskDecoderShape(transformer_depth=1, transformer_mlp_dim=256, attention_downsample_rate=4, head_hidden_dim=64),
    ),
}
