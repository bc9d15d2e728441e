"""SAM 3 in torch: building it from the ``sam3`` package, the three exportable parts, and the eager reference.

Imported by export only, and only inside ``export/sam3_compat.sam3_compat()`` (the package needs
its CPU workarounds to import and run); never by the runtime. The split follows SAM 3's own
inference (``Sam3Processor``): the vision backbone once per image, the text encoder once per
concept, and the grounding head (geometry encoder on an empty prompt, fusion encoder, decoder with
its presence token, dot-product scoring, segmentation head) once per prompt. ConceptSeg-R1's
concept tokens enter the head through SAM 3's visual-prompt slot (``visual_prompt_embed`` /
``visual_prompt_mask`` of ``Sam3Image._encode_prompt``), after the text and geometry tokens.

``Sam3Reference`` is the oracle: it calls the package's own ``forward_image``, ``forward_text`` (with
the package's tokenizer) and ``Sam3Image`` grounding steps on its own inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conceptseg_edge.errors import InputError
from conceptseg_edge.models.weights import load_official_weights

#: SAM 3's prompt width: text features, geometry and concept tokens are all this wide.
PROMPT_DIM = 256
#: Tokens per text prompt (``VETextEncoder.context_length``); shorter prompts are padded with id 0.
CONTEXT_LENGTH = 32
PIXEL_MEAN = (0.5, 0.5, 0.5)  # Sam3Processor's Normalize
PIXEL_STD = (0.5, 0.5, 0.5)
PATCH = 14


@dataclass(frozen=True)
class Sam3Size:
    """How a SAM 3 variant sizes the package's modules (the official values are ``model_builder``'s).

    The prompt/transformer width stays 256 (concept tokens and the runtime assume it); everything else
    may shrink. ``image_size`` must be a multiple of 14 x 2 (patch size, and the FPN's 0.5 level).
    """

    image_size: int
    vit_dim: int
    vit_depth: int
    vit_heads: int
    vit_window: int
    vit_global_blocks: tuple[int, ...]
    vit_pretrain_size: int
    text_width: int
    text_heads: int
    text_layers: int
    ffn_dim: int  # fusion encoder, decoder and geometry encoder feed-forward width
    encoder_layers: int
    decoder_layers: int
    geometry_layers: int
    num_queries: int


#: The small SAM 3 for tests and the offline default: the official architecture, 224 px (16x16 tokens),
#: a 2-block 64-wide ViT, a 1-layer 64-wide text transformer, one layer each in the fusion encoder,
#: decoder and geometry encoder, 16 queries. Builds in about a second; every part exports in seconds.
SAM3_SMALL = Sam3Size(
    image_size=224, vit_dim=64, vit_depth=2, vit_heads=2, vit_window=8, vit_global_blocks=(1,), vit_pretrain_size=112,
    text_width=64, text_heads=2, text_layers=1, ffn_dim=256, encoder_layers=1, decoder_layers=1, geometry_layers=1,
    num_queries=16,
)
#: SAM 3 as released (``build_sam3_image_model``): 840M parameters, 1008 px.
SAM3_FULL_IMAGE_SIZE = 1008
SAM3_VARIANTS = ("sam3", "sam3_small")


@dataclass(frozen=True)
class LoadedSAM3:
    """A built SAM 3 image model and where its weights came from."""

    model: nn.Module
    variant: str
    image_size: int
    num_queries: int
    checkpoint: str | None
    checkpoint_sha256: str | None

    @property
    def random_init(self) -> bool:
        return self.checkpoint is None


def build_sam3(variant: str, bpe_path: str | Path, checkpoint: str | Path | None = None) -> LoadedSAM3:
    """Build a SAM 3 image model on CPU in eval mode (call inside ``sam3_compat()``).

    Args:
        variant: ``"sam3"`` (the release, via the package's ``build_sam3_image_model``) or
            ``"sam3_small"`` (``SAM3_SMALL``, built from the same module classes).
        bpe_path: the CLIP BPE merges file the package's tokenizer reads.
        checkpoint: an official ``sam3.pt`` (``model`` entry or a flat dict, ``detector.``-prefixed keys);
            loaded with ``weights_only=True``. ``None`` = random init.
    """
    if variant not in SAM3_VARIANTS:
        raise InputError(f"--variant {variant}: unknown SAM 3 variant (known: {', '.join(SAM3_VARIANTS)})")
    if variant == "sam3":
        from sam3.model_builder import build_sam3_image_model

        model = build_sam3_image_model(bpe_path=str(bpe_path), device="cpu", checkpoint_path=None, load_from_HF=False)
        image_size, queries = SAM3_FULL_IMAGE_SIZE, model.transformer.decoder.num_queries
    else:
        model = _build_sized(SAM3_SMALL, str(bpe_path))
        image_size, queries = SAM3_SMALL.image_size, SAM3_SMALL.num_queries
    digest = _load_checkpoint(model, Path(checkpoint)) if checkpoint is not None else None
    return LoadedSAM3(model.to("cpu").eval(), variant, image_size, queries, str(checkpoint) if checkpoint else None, digest)


def _build_sized(size: Sam3Size, bpe_path: str) -> nn.Module:
    """``build_sam3_image_model``'s composition at ``size`` (eval mode, no tracker, segmentation on)."""
    from sam3 import model_builder as mb
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MultiheadAttention
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    d = PROMPT_DIM
    if size.image_size % (2 * PATCH):
        raise InputError(f"image size {size.image_size}: must be a multiple of {2 * PATCH}")

    def attention(batch_first: bool | None = None, dropout: float = 0.1) -> nn.Module:
        kwargs = {} if batch_first is None else {"batch_first": batch_first}
        return MultiheadAttention(num_heads=8, dropout=dropout, embed_dim=d, **kwargs)

    def encoder_layer(pos_at_attn: bool, keys: bool, batch_first: bool) -> nn.Module:
        return TransformerEncoderLayer(
            activation="relu", d_model=d, dim_feedforward=size.ffn_dim, dropout=0.1, pos_enc_at_attn=pos_at_attn,
            pos_enc_at_cross_attn_keys=keys, pos_enc_at_cross_attn_queries=False, pre_norm=True,
            self_attention=attention(batch_first), cross_attention=attention(batch_first),
        )

    vit = ViT(
        img_size=size.image_size, pretrain_img_size=size.vit_pretrain_size, patch_size=PATCH, embed_dim=size.vit_dim,
        depth=size.vit_depth, num_heads=size.vit_heads, mlp_ratio=4.625, norm_layer="LayerNorm", drop_path_rate=0.0,
        qkv_bias=True, use_abs_pos=True, tile_abs_pos=True, global_att_blocks=size.vit_global_blocks, rel_pos_blocks=(),
        use_rope=True, use_interp_rope=True, window_size=size.vit_window, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False, bias_patch_embed=False,
    )
    neck = Sam3DualViTDetNeck(
        position_encoding=mb._create_position_encoding(precompute_resolution=size.image_size), d_model=d,
        scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit, add_sam2_neck=False,
    )
    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=bpe_path), d_model=d, width=size.text_width, heads=size.text_heads,
        layers=size.text_layers,
    )
    encoder = TransformerEncoderFusion(
        layer=encoder_layer(True, False, True), num_layers=size.encoder_layers, d_model=d, num_feature_levels=1,
        frozen=False, use_act_checkpoint=False, add_pooled_text_to_img_feat=False, pool_text_with_mask=True,
    )
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(
            activation="relu", d_model=d, dim_feedforward=size.ffn_dim, dropout=0.1, cross_attention=attention(),
            n_heads=8, use_text_cross_attention=True,
        ),
        num_layers=size.decoder_layers, num_queries=size.num_queries, return_intermediate=True, box_refine=True,
        num_o2m_queries=0, dac=True, boxRPB="log", d_model=d, frozen=False, interaction_layer=None,
        dac_use_selfatt_ln=True, resolution=size.image_size, stride=PATCH, use_act_checkpoint=False,
        presence_token=True,
    )
    scoring = DotProductScoring(
        d_model=d, d_proj=d,
        prompt_mlp=MLP(input_dim=d, hidden_dim=size.ffn_dim, output_dim=d, num_layers=2, dropout=0.1, residual=True,
                       out_norm=nn.LayerNorm(d)),
    )
    segmentation = UniversalSegmentationHead(
        hidden_dim=d, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=False, cross_attend_prompt=attention(dropout=0.0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d),
    )
    geometry = SequenceGeometryEncoder(
        pos_enc=mb._create_position_encoding(), encode_boxes_as_points=False, points_direct_project=True,
        points_pool=True, points_pos_enc=True, boxes_direct_project=True, boxes_pool=True, boxes_pos_enc=True,
        d_model=d, num_layers=size.geometry_layers, layer=encoder_layer(False, True, False), use_act_ckpt=False,
        add_cls=True, add_post_encode_proj=True,
    )
    return Sam3Image(
        backbone=SAM3VLBackbone(visual=neck, text=text, scalp=1),
        transformer=TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
        input_geometry_encoder=geometry, segmentation_head=segmentation, num_feature_levels=1, o2m_mask_predict=True,
        dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True, inst_interactive_predictor=None,
        matcher=None,
    ).eval()


def _load_checkpoint(model: nn.Module, path: Path) -> str:
    """The release's layout (``detector.``-prefixed keys, optionally under ``model``), strictly matched."""

    def detector(payload) -> dict | None:
        state = payload.get("model", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict):
            return None
        return {k.removeprefix("detector."): v for k, v in state.items() if k.startswith("detector.")} or state

    return load_official_weights(model, path, detector, "a state dict (official sam3.pt format)", "the SAM 3 variant")


class Sam3VisionEncoder(nn.Module):
    """Preprocessed image (1, 3, S, S) → the three FPN levels the head reads (S/14 x 4, x 2, x 1)."""

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.sam.backbone.forward_image(image)["backbone_fpn"]
        return fpn[0], fpn[1], fpn[2]


class Sam3TextEncoder(nn.Module):
    """Token ids (B, 32) int64, 0-padded → text features (B, 32, 256), batch-first.

    ``VETextEncoder.forward`` tokenizes strings itself; the export takes ids (the tokenizer runs outside
    the graph) and runs the same steps: the text transformer's token outputs, then ``resizer``.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.text = sam.backbone.language_backbone

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        _, memory = self.text.encoder(input_ids)
        return self.text.resizer(memory)


class Sam3GroundingHead(nn.Module):
    """FPN levels + one text prompt + K concept tokens → per-query logits, boxes, masks; presence; semantic mask.

    Runs ``Sam3Image``'s own grounding steps (``_encode_prompt`` with the empty geometric prompt and
    the concept tokens as ``visual_prompt_embed``, ``_run_encoder``, ``_run_decoder``,
    ``_run_segmentation_heads``) on a ``backbone_out`` assembled from the inputs; the positional
    encodings of the FPN levels depend only on their sizes and are recomputed in the graph's constants.

    Inputs: ``fpn_0..2`` (1, 256, ·, ·); ``text_features`` (1, 32, 256); ``text_mask`` (1, 32) bool,
    True = padding; ``concept_tokens`` (1, K, 256); ``concept_mask`` (1, K) bool, True = padding.
    Outputs, in this order: ``pred_masks`` (1, Q, S/14·4, S/14·4) logits, ``pred_logits`` (1, Q),
    ``pred_boxes`` (1, Q, 4) normalised xyxy, ``presence_logit`` (1, 1), ``semantic_seg`` (1, 1, S/14·4, S/14·4) logits.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam

    def forward(
        self,
        fpn_0: torch.Tensor,
        fpn_1: torch.Tensor,
        fpn_2: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        concept_tokens: torch.Tensor,
        concept_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        fpn = [fpn_0, fpn_1, fpn_2]
        pos = self.sam.backbone.vision_backbone.position_encoding
        backbone_out = {
            "backbone_fpn": fpn,
            "vision_pos_enc": [pos(f).to(f.dtype) for f in fpn],
            "language_features": text_features.transpose(0, 1),
            "language_mask": text_mask,
        }
        out = ground(self.sam, backbone_out, concept_tokens.transpose(0, 1), concept_mask)
        return (out["pred_masks"], out["pred_logits"][..., 0], out["pred_boxes_xyxy"], out["presence_logit_dec"],
                out["semantic_seg"])


def ground(sam: nn.Module, backbone_out: dict, visual_prompt_embed: torch.Tensor | None,
           visual_prompt_mask: torch.Tensor | None) -> dict:
    """``Sam3Image.forward_grounding`` for one image and one text prompt, with the visual-prompt slot filled.

    ``forward_grounding`` itself calls ``_encode_prompt`` without visual prompts; this is the same
    sequence of the package's methods with them passed through (K = 0 tokens is the plain text prompt).
    """
    find = _find_stage()
    prompt, prompt_mask, backbone_out = sam._encode_prompt(
        backbone_out, find, sam._get_dummy_prompt(), visual_prompt_embed=visual_prompt_embed,
        visual_prompt_mask=visual_prompt_mask,
    )
    backbone_out, encoder_out, _ = sam._run_encoder(backbone_out, find, prompt, prompt_mask)
    out = {"encoder_hidden_states": encoder_out["encoder_hidden_states"]}
    out, hs = sam._run_decoder(
        memory=out["encoder_hidden_states"], pos_embed=encoder_out["pos_embed"], src_mask=encoder_out["padding_mask"],
        out=out, prompt=prompt, prompt_mask=prompt_mask, encoder_out=encoder_out,
    )
    sam._run_segmentation_heads(
        out=out, backbone_out=backbone_out, img_ids=find.img_ids, vis_feat_sizes=encoder_out["vis_feat_sizes"],
        encoder_hidden_states=out["encoder_hidden_states"], prompt=prompt, prompt_mask=prompt_mask, hs=hs,
    )
    return out


class Sam3Reference:
    """The PyTorch eager reference on the package's own entry points (``Sam3Processor``'s arithmetic)."""

    def __init__(self, sam: nn.Module, image_size: int) -> None:
        self.sam = sam
        self.image_size = image_size

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 → (1, 3, S, S): ``Sam3Processor``'s squash resize (bilinear, antialiased) and
        normalisation to [-1, 1]. torchvision's resize is reproduced with ``F.interpolate`` on floats
        (``Sam3Processor`` resizes the uint8 tensor, which rounds to integers in between)."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)[None]
        x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """The package's tokenizer: (B, 32) int64, 0-padded."""
        return self.sam.backbone.language_backbone.tokenizer(texts, context_length=CONTEXT_LENGTH)

    @torch.no_grad()
    def image_features(self, image: torch.Tensor) -> dict:
        """``backbone.forward_image`` on a preprocessed (1, 3, S, S) image."""
        return self.sam.backbone.forward_image(image)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> dict:
        """``backbone.forward_text`` (tokenizer included): language_features (32, B, 256), language_mask (B, 32)."""
        return self.sam.backbone.forward_text(texts, device="cpu")

    @torch.no_grad()
    def predict(self, image_out: dict, text: str, concept_tokens: torch.Tensor | None = None,
                concept_mask: torch.Tensor | None = None) -> dict:
        """Grounding for one text prompt and optional (1, K, 256) concept tokens; K = 0 / None is the text prompt.

        Returns ``pred_logits`` (1, Q, 1), ``pred_boxes_xyxy``, ``pred_masks``, ``presence_logit_dec``,
        ``semantic_seg`` as the package computes them.
        """
        backbone_out = {**image_out, **self.text_features([text])}
        if concept_tokens is None or concept_tokens.shape[1] == 0:
            return self.sam.forward_grounding(backbone_out, _find_stage(), None, self.sam._get_dummy_prompt())
        return ground(self.sam, backbone_out, concept_tokens.transpose(0, 1), concept_mask)


def _find_stage():
    from sam3.model.data_misc import FindStage

    return FindStage(img_ids=torch.tensor([0]), text_ids=torch.tensor([0]), input_boxes=None, input_boxes_mask=None,
                     input_boxes_label=None, input_points=None, input_points_mask=None)
