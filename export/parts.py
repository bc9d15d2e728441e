"""One ``PartSpec`` per exported graph: tensor names, dynamic axes, dtypes, tolerances, banned ops.

The spec is the single source of IO names: export uses it to name graph inputs/outputs and dynamic
axes, the manifest copies it, and the runtime reads names back from the manifest. Specs are built by
factories registered with ``@register_part`` (their shapes depend on the image size); the test suite
checks that every registered part has an export test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from conceptseg_edge.manifest import TensorSpec

PartFactory = Callable[..., "PartSpec"]
PART_REGISTRY: dict[str, PartFactory] = {}


def register_part(name: str) -> Callable[[PartFactory], PartFactory]:
    def deco(factory: PartFactory) -> PartFactory:
        PART_REGISTRY[name] = factory
        return factory

    return deco


@dataclass(frozen=True)
class PartSpec:
    """What an exported graph looks like from outside, and how closely it must match torch.

    ``atol`` is per output; ``forbidden_ops`` are ONNX op types that must not appear (TensorRT
    refuses them on shape tensors, or they would hide pre/post-processing inside the graph).
    """

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    atol: dict[str, float]
    forbidden_ops: frozenset[str] = field(default_factory=frozenset)
    min_mask_iou: float | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for tensor in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes


# Why these tolerances: the exported graphs are float32 like the eager modules, so differences come
# only from ONNX Runtime's kernel choices and summation order. Measured on SAM2.1-tiny they are
# ~4e-6 on encoder features and ~5e-7 on decoder outputs; larger trunks accumulate more. 1e-3 on
# features (values of order 1) leaves a 100x margin for that, while any real export bug (a wrong op,
# a dropped embedding, a swapped axis) moves outputs by 1e-1 or more. Mask logits are of order 10, so
# they get 1e-2; the decisive check for masks is the IoU at logit 0, which must stay >= 0.99.
FEATURE_ATOL = 1e-3
LOGIT_ATOL = 1e-2
SCORE_ATOL = 1e-3
MASK_IOU_FLOOR = 0.99


@register_part("sam2_encoder")
def sam2_encoder_spec(image_size: int) -> PartSpec:
    s = image_size
    return PartSpec(
        name="sam2_encoder",
        file="sam2_encoder.onnx",
        inputs=(TensorSpec("image", "float32", (1, 3, s, s)),),
        outputs=(
            TensorSpec("image_embed", "float32", (1, 256, s // 16, s // 16)),
            TensorSpec("high_res_feats_0", "float32", (1, 32, s // 4, s // 4)),
            TensorSpec("high_res_feats_1", "float32", (1, 64, s // 8, s // 8)),
        ),
        atol={"image_embed": FEATURE_ATOL, "high_res_feats_0": FEATURE_ATOL, "high_res_feats_1": FEATURE_ATOL},
        # The FPN neck's own nearest 2x upsampling is model arithmetic and stays; these may not appear.
        forbidden_ops=frozenset({"OneHot", "NonZero"}),
    )


@register_part("sam2_decoder")
def sam2_decoder_spec(image_size: int) -> PartSpec:
    s = image_size
    return PartSpec(
        name="sam2_decoder",
        file="sam2_decoder.onnx",
        inputs=(
            TensorSpec("image_embed", "float32", (1, 256, s // 16, s // 16)),
            TensorSpec("high_res_feats_0", "float32", (1, 32, s // 4, s // 4)),
            TensorSpec("high_res_feats_1", "float32", (1, 64, s // 8, s // 8)),
            TensorSpec("point_coords", "float32", ("batch", "num_points", 2)),
            TensorSpec("point_labels", "int32", ("batch", "num_points")),
            TensorSpec("concept_tokens", "float32", ("batch", "num_concept_tokens", 256)),
            TensorSpec("mask_input", "float32", ("batch", 1, s // 4, s // 4)),
            TensorSpec("has_mask_input", "float32", ("batch",)),
        ),
        outputs=(
            TensorSpec("low_res_masks", "float32", ("batch", 4, s // 4, s // 4)),
            TensorSpec("iou_predictions", "float32", ("batch", 4)),
            TensorSpec("object_score_logits", "float32", ("batch", 1)),
        ),
        atol={"low_res_masks": LOGIT_ATOL, "iou_predictions": SCORE_ATOL, "object_score_logits": SCORE_ATOL},
        forbidden_ops=frozenset({"OneHot", "Tile", "Resize", "NonZero", "Greater", "Less"}),
        min_mask_iou=MASK_IOU_FLOOR,
    )


@register_part("ctm")
def ctm_spec(hidden_size: int, num_queries: int = 8) -> PartSpec:
    """Concept Translation Module: completion hidden states (any length) → concept tokens.

    Batch 1: the CTM has no padding mask (as the paper), so completions of different lengths cannot
    share a batch without changing the result.
    """
    return PartSpec(
        name="ctm",
        file="ctm.onnx",
        inputs=(TensorSpec("hidden_states", "float32", (1, "completion_len", hidden_size)),),
        outputs=(TensorSpec("concept_tokens", "float32", (1, num_queries, 256)),),
        atol={"concept_tokens": FEATURE_ATOL},
        forbidden_ops=frozenset({"OneHot", "NonZero"}),
    )
