"""SAM2 in torch: building it, the two exportable parts, and the eager reference predictor.

Imported by export and train only (never by the runtime). The split follows the field's convention:
an image encoder run once per image, and a prompt-encoder + mask-decoder run once per prompt set.
The decoder takes ConceptSeg-R1's concept tokens (B×K×256, K may be 0) as extra sparse prompt
embeddings beside the point/box prompts.

``SAM2Reference`` is the oracle every exported path is compared with: it calls the sam2 package's own
modules (``forward_image``, ``sam_prompt_encoder``, ``sam_mask_decoder``) the way
``SAM2ImagePredictor`` does, with torch pre/post-processing, so it shares no code with the exported
wrappers or the numpy runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from conceptseg_edge.errors import InputError
from conceptseg_edge.models.sam2_variants import SAM2_CONFIGS, MaskDecoderShape
from conceptseg_edge.models.weights import load_official_weights

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)

# build_sam2(apply_postprocessing=True) turns these on; the runtime reproduces them in numpy.
STABILITY_DELTA = 0.05
STABILITY_THRESH = 0.98


@dataclass(frozen=True)
class LoadedSAM2:
    """A built SAM2 model and where its weights came from."""

    model: nn.Module
    config: str
    image_size: int
    checkpoint: str | None
    checkpoint_sha256: str | None

    @property
    def random_init(self) -> bool:
        return self.checkpoint is None


def build_sam2_model(
    config: str,
    checkpoint: str | Path | None = None,
    image_size: int = 1024,
    overrides: list[str] | None = None,
) -> LoadedSAM2:
    """Build a SAM 2.1 model on CPU in eval mode, optionally loading an official checkpoint.

    Args:
        config: a name in ``SAM2_CONFIGS``.
        checkpoint: an official ``.pt`` whose ``model`` entry is the state dict; loaded with
            ``weights_only=True`` because checkpoints are untrusted input. ``None`` = random init.
        image_size: the square input resolution (SAM 2.1 is trained at 1024; smaller sizes trade
            accuracy for speed and are what the embedded tiny default uses).
        overrides: extra Hydra override strings (the training stage uses them for tiny backbones).
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra import initialize_config_module
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if config not in SAM2_CONFIGS:
        raise InputError(f"--config {config}: unknown SAM2 variant (known: {', '.join(SAM2_CONFIGS)})")
    variant = SAM2_CONFIGS[config]
    if image_size < 64 or image_size % 64:  # 0 and negatives pass the modulo alone
        raise InputError(f"--image-size {image_size}: must be a positive multiple of 64 (16x backbone stride x 4)")
    # apply_postprocessing=True's decoder flags, so eager single-mask calls match the runtime.
    hydra_overrides = [
        f"++model.image_size={image_size}",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        f"++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta={STABILITY_DELTA}",
        f"++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh={STABILITY_THRESH}",
        *variant.overrides,
        *(overrides or []),
    ]
    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    try:
        cfg = compose(config_name=variant.config_file, overrides=hydra_overrides)
    except Exception as exc:  # hydra raises several unrelated types for a bad name
        raise InputError(f"--config {config}: not a SAM2 config ({', '.join(SAM2_CONFIGS)})") from exc
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    if variant.mask_decoder is not None:
        reshape_mask_decoder(model, variant.mask_decoder)
    digest = None
    if checkpoint is not None:
        digest = _load_checkpoint(model, Path(checkpoint))
    model = model.to("cpu").eval()
    return LoadedSAM2(model, config, image_size, str(checkpoint) if checkpoint else None, digest)


def reshape_mask_decoder(sam: nn.Module, shape: MaskDecoderShape) -> None:
    """Rebuild the parts of ``sam.sam_mask_decoder`` that ``shape`` resizes, with sam2's own classes.

    Every other decoder module, flag and token is left as ``_build_sam_heads`` made it; the new
    modules get their classes' default initialisation (as a fresh sam2 model would).
    """
    from sam2.modeling.sam.transformer import TwoWayTransformer
    from sam2.modeling.sam2_utils import MLP

    dec = sam.sam_mask_decoder
    old = dec.transformer
    dim = dec.transformer_dim
    first_cross = old.layers[0].cross_attn_token_to_image
    rate = dim // first_cross.internal_dim
    resized = (shape.transformer_depth, shape.transformer_mlp_dim, shape.attention_downsample_rate, shape.num_heads)
    if any(v is not None for v in resized):
        dec.transformer = TwoWayTransformer(
            depth=shape.transformer_depth or old.depth,
            embedding_dim=old.embedding_dim,
            num_heads=shape.num_heads or old.num_heads,
            mlp_dim=shape.transformer_mlp_dim or old.mlp_dim,
            attention_downsample_rate=shape.attention_downsample_rate or rate,
        )
    if shape.head_hidden_dim is not None:
        hidden = shape.head_hidden_dim
        dec.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, hidden, mlp.layers[-1].out_features, mlp.num_layers) for mlp in dec.output_hypernetworks_mlps
        )
        iou = dec.iou_prediction_head
        dec.iou_prediction_head = MLP(dim, hidden, iou.layers[-1].out_features, iou.num_layers, sigmoid_output=iou.sigmoid_output)
        if isinstance(dec.pred_obj_score_head, MLP):  # pred_obj_scores_mlp; a plain Linear has no hidden layer
            obj = dec.pred_obj_score_head
            dec.pred_obj_score_head = MLP(dim, hidden, obj.layers[-1].out_features, obj.num_layers)


def _load_checkpoint(model: nn.Module, path: Path) -> str:
    """The official SAM 2.1 layout: ``{"model": state_dict}``."""
    return load_official_weights(
        model, path, lambda payload: payload.get("model") if isinstance(payload, dict) else None,
        "a dict with a 'model' state dict (official SAM 2.1 format)", "the config",
    )


class SAM2ImageEncoder(nn.Module):
    """Image → (image_embed, high_res_feats_0, high_res_feats_1), as ``SAM2ImagePredictor.set_image``.

    Folds in ``conv_s0``/``conv_s1`` (applied by ``forward_image``) and ``no_mem_embed``, so the
    decoder needs nothing else from the encoder side.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam
        size = sam.image_size
        self.feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone_out = self.sam.forward_image(image)
        _, vision_feats, _, _ = self.sam._prepare_backbone_features(backbone_out)
        if self.sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.sam.no_mem_embed
        batch = image.shape[0]
        feats = [
            feat.permute(1, 2, 0).reshape(batch, -1, h, w)
            for feat, (h, w) in zip(vision_feats, self.feat_sizes)
        ]
        return feats[2], feats[0], feats[1]


class SAM2PromptDecoder(nn.Module):
    """Prompt encoder + mask decoder with concept tokens; all four mask tokens returned.

    Differences from sam2's own ``predict_masks``, each for export:
    - ``expand`` replaces ``repeat_interleave`` (which lowers to OneHot/Tile on a shape tensor that
      TensorRT refuses);
    - the dense positional encoding is a constant buffer (it depends only on the image size);
    - the mask prompt is gated by ``has_mask_input`` instead of a Python ``if``;
    - points arrive already padded (SAM2's predictor appends one (0, 0) point with label -1 to every
      point/box prompt; the runtime does that in numpy), so N may be 0 for concept-only prompts;
    - all four masks and IoUs come out; choosing multimask vs. single (and the stability fallback)
      happens in numpy, so one graph serves both and nothing data-dependent sits in the graph.
    """

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = sam.sam_prompt_encoder
        self.mask_decoder = sam.sam_mask_decoder
        with torch.no_grad():
            self.register_buffer("image_pe", self.prompt_encoder.get_dense_pe().clone(), persistent=False)
        self.input_size = float(sam.image_size)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        coords = (coords + 0.5) / self.input_size
        emb = pe.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1)
        emb = torch.where(labels == -1, torch.zeros_like(emb) + pe.not_a_point_embed.weight, emb)
        for value in range(4):
            emb = torch.where(labels == value, emb + pe.point_embeddings[value].weight, emb)
        return emb

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        concept_tokens: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.decode(
            image_embed, high_res_feats_0, high_res_feats_1, point_coords, point_labels, concept_tokens,
            mask_input, has_mask_input,
        )[:3]

    def decode(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        concept_tokens: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward``'s outputs plus the four mask tokens (B, 4, C) the video decoder turns into
        object pointers."""
        dec = self.mask_decoder
        batch = point_coords.shape[0]
        sparse = torch.cat([self.embed_points(point_coords, point_labels), concept_tokens], dim=1)

        gate = has_mask_input.reshape(-1, 1, 1, 1)
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = gate * self.prompt_encoder.mask_downscaling(mask_input) + (1 - gate) * no_mask

        output_tokens = torch.cat(
            [dec.obj_score_token.weight, dec.iou_token.weight, dec.mask_tokens.weight], dim=0
        )
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
        src = image_embed.expand(batch, -1, -1, -1) + dense
        pos_src = self.image_pe.expand(batch, -1, -1, -1)
        _, c, h, w = src.shape

        hs, src = dec.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 1, :]
        mask_tokens_out = hs[:, 2 : 2 + dec.num_mask_tokens, :]

        src = src.transpose(1, 2).reshape(batch, c, h, w)
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        feat_s0 = high_res_feats_0.expand(batch, -1, -1, -1)
        feat_s1 = high_res_feats_1.expand(batch, -1, -1, -1)
        upscaled = act1(ln1(dc1(src) + feat_s1))
        upscaled = act2(dc2(upscaled) + feat_s0)

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )
        _, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(batch, c, h * w)).reshape(batch, -1, h, w)
        iou_pred = dec.iou_prediction_head(iou_token_out)
        object_score_logits = dec.pred_obj_score_head(hs[:, 0, :])
        return masks, iou_pred, object_score_logits, mask_tokens_out


@dataclass
class ReferencePrediction:
    """Eager-reference output for one prompt set, in the original image frame."""

    masks: np.ndarray  # (C, H, W) bool
    scores: np.ndarray  # (C,) predicted IoU
    low_res_logits: np.ndarray  # (C, s, s)
    object_score_logit: float
    timings: dict[str, float]  # ms per stage, image stages included


class SAM2Reference:
    """The PyTorch eager reference: ``SAM2ImagePredictor``'s arithmetic on sam2's own modules.

    The sam2 predictor module itself needs torchvision (which cannot be installed beside CPU torch
    here); its three transforms are reproduced with ``F.interpolate``: squash-resize bilinear with
    antialiasing (what torchvision's tensor ``Resize`` does), ImageNet normalisation, to-tensor.
    """

    def __init__(self, sam: nn.Module) -> None:
        self.sam = sam
        self.image_size = sam.image_size
        self._features: dict[str, torch.Tensor] | None = None
        self._orig_hw: tuple[int, int] | None = None
        self.image_timings: dict[str, float] = {}

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255.0)[None]
        x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Preprocessed (1, 3, S, S) image → the three feature maps, by sam2's own code path."""
        backbone_out = self.sam.forward_image(image)
        _, vision_feats, _, _ = self.sam._prepare_backbone_features(backbone_out)
        if self.sam.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.sam.no_mem_embed
        s = self.image_size
        sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        feats = [f.permute(1, 2, 0).view(1, -1, *hw) for f, hw in zip(vision_feats, sizes)]
        return {"image_embed": feats[2], "high_res_feats_0": feats[0], "high_res_feats_1": feats[1]}

    @torch.no_grad()
    def decode_all(
        self,
        features: dict[str, torch.Tensor],
        coords: torch.Tensor,
        labels: torch.Tensor,
        concept_tokens: torch.Tensor,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All four masks for already padded, model-frame prompts, via sam2's ``predict_masks``."""
        return self.decode_all_tokens(features, coords, labels, concept_tokens, mask_input)[:3]

    @torch.no_grad()
    def decode_all_tokens(
        self,
        features: dict[str, torch.Tensor],
        coords: torch.Tensor,
        labels: torch.Tensor,
        concept_tokens: torch.Tensor,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``decode_all``'s outputs plus the four mask tokens (B, 4, C) (the video path's object pointers)."""
        pe = self.sam.sam_prompt_encoder
        sparse = torch.cat([pe._embed_points(coords, labels, pad=False), concept_tokens], dim=1)
        batch = sparse.shape[0]
        if mask_input is not None:
            dense = pe._embed_masks(mask_input)
        else:
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *pe.image_embedding_size)
        masks, iou, tokens, obj = self.sam.sam_mask_decoder.predict_masks(
            image_embeddings=features["image_embed"],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=batch > 1,
            high_res_features=[features["high_res_feats_0"], features["high_res_feats_1"]],
        )
        return masks, iou, obj, tokens

    def set_image(self, image: np.ndarray) -> None:
        """``image``: (H, W, 3) uint8 RGB."""
        self._orig_hw = image.shape[:2]
        t0 = time.perf_counter_ns()
        x = self.preprocess(image)
        t1 = time.perf_counter_ns()
        feats = self.features(x)
        self.image_timings = {"preprocess": (t1 - t0) / 1e6, "encoder": (time.perf_counter_ns() - t1) / 1e6}
        self._features = {
            "image_embed": feats["image_embed"],
            "high_res_feats": [feats["high_res_feats_0"], feats["high_res_feats_1"]],
        }

    @torch.no_grad()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        concept_tokens: np.ndarray | torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> ReferencePrediction:
        """Prompts in original-image pixels, as ``SAM2ImagePredictor.predict``."""
        if self._features is None or self._orig_hw is None:
            raise RuntimeError("call set_image() before predict()")
        h, w = self._orig_hw
        t0 = time.perf_counter_ns()
        scale = torch.tensor([self.image_size / w, self.image_size / h])
        coords = labels = None
        if point_coords is not None:
            coords = torch.as_tensor(point_coords, dtype=torch.float32)[None] * scale
            labels = torch.as_tensor(point_labels, dtype=torch.int32)[None]
        if box is not None:
            box_coords = torch.as_tensor(box, dtype=torch.float32).reshape(1, 2, 2) * scale
            box_labels = torch.tensor([[2, 3]], dtype=torch.int32)
            coords = box_coords if coords is None else torch.cat([box_coords, coords], dim=1)
            labels = box_labels if labels is None else torch.cat([box_labels, labels], dim=1)
        points = (coords, labels) if coords is not None else None
        sparse, dense = self.sam.sam_prompt_encoder(points=points, boxes=None, masks=None)
        if concept_tokens is not None:
            tokens = torch.as_tensor(concept_tokens, dtype=torch.float32).reshape(1, -1, sparse.shape[-1])
            sparse = torch.cat([sparse, tokens], dim=1)
        low_res, iou, _, obj = self.sam.sam_mask_decoder(
            image_embeddings=self._features["image_embed"],
            image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=self._features["high_res_feats"],
        )
        t1 = time.perf_counter_ns()
        masks = F.interpolate(low_res, (h, w), mode="bilinear", align_corners=False) > 0.0
        t2 = time.perf_counter_ns()
        return ReferencePrediction(
            masks=masks[0].numpy(),
            scores=iou[0].numpy(),
            low_res_logits=low_res[0].numpy(),
            object_score_logit=float(obj[0, 0]),
            timings={**self.image_timings, "decoder": (t1 - t0) / 1e6, "postprocess": (t2 - t1) / 1e6},
        )
