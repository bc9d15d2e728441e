"""What every exported part is described with: ``PartSpec``, tolerances, weight storages, precisions.

The spec is the single source of IO names: export uses it to name graph inputs/outputs and dynamic
axes, the manifest copies it, and the runtime reads names back from the manifest. Each model family
(``export/sam2.py``, ``export/ctm.py``, ``export/policy.py``) builds its specs with factories (their
shapes depend on the image size or the model config) and lists them in its ``PARTS``;
``export/registry.py`` imports the families explicitly, and the test suite checks that every
registered part has an export test.

This module imports neither torch nor onnx: the CLI reads its choices from ``WEIGHT_STORAGES`` and
``PRECISIONS`` while it parses arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from conceptseg_edge.errors import InputError

from conceptseg_edge.manifest import TensorSpec

PartFactory = Callable[..., "PartSpec"]


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

    def with_storage(self, storage: str) -> PartSpec:
        """This spec with the tolerances of ``storage`` (a name in ``WEIGHT_STORAGES``)."""
        declared = weight_storage(storage, f"weight storage '{storage}'")
        floor = self.min_mask_iou
        if floor is not None and declared.mask_iou_floor is not None:
            floor = min(floor, declared.mask_iou_floor)
        atol = {name: atol * declared.atol_scale if atol > 0 else declared.exact_atol for name, atol in self.atol.items()}
        return replace(self, atol=atol, min_mask_iou=floor)

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


@dataclass(frozen=True)
class WeightStorage:
    """How a graph's large float initializers are stored in the file (computation stays fp32).

    ``fp16`` stores each large fp32 initializer as float16 followed by a ``Cast`` to float32;
    ONNX Runtime constant-folds the casts when it loads the session, so kernels and activations are
    exactly the fp32 graph's, with weights rounded to the nearest float16. The file is about half.
    """

    name: str
    onnx_dtype: int  # onnx.TensorProto data type of the stored initializers
    atol_scale: float  # the fp32 tolerances above, multiplied by this
    mask_iou_floor: float | None  # lowers a part's mask IoU floor to this; None keeps the part's
    exact_atol: float  # replaces an atol of 0 (a part that copies weights: the policy's embedding Gather)


# Why fp16 storage gets 10x the fp32 tolerances: rounding a weight to float16 moves it by at most
# 2^-11 relative (~4.9e-4, half an ulp of the 11-bit significand), independently per weight, so a
# linear layer's output moves by ~4.9e-4 x |y| / sqrt(fan-in) (random rounding errors add in
# quadrature) and at worst ~4.9e-4 x |y|. Through the encoder's ~20-40 weight layers, with norms
# keeping features of order 1, that compounds to ~1e-3 on features, and to ~1e-2 on a trained
# decoder's mask logits (order 10-30). Measured max |ONNX Runtime - torch fp32| at fp16 storage
# (fp32 storage: 1e-7 to 4e-6 on the same cases):
#   model (weights)                       image_embed  high_res_0/1   masks    iou      obj score
#   sam2.1_hiera_t @512 (seeded random)   2.2e-3       3.3e-4/5.6e-4  2.7e-4   2.5e-5   9.7e-5
#   conceptseg_tiny @128 (seeded random)  1.2e-3       1.7e-4/2.4e-4  2.6e-4   2.4e-5   4.1e-5
#   conceptseg_tiny @128 (trained)        7.4e-4       2.1e-4/6.6e-4  1.8e-2   4.7e-5   7.4e-4
#   CTM (128-d, random; tiny-default's)  concept_tokens 2.1e-4; 2.4e-4 (fp32: 3e-7; 5e-7)
# 10x the fp32 atol (1e-2 on features and tokens, 1e-1 on mask logits, 1e-2 on scores) leaves a 4-10x
# margin over the worst of these (deeper official trunks accumulate more; an export that exceeds it
# fails loudly and can be redone at fp32), while an export bug (a wrong op, a dropped embedding, a
# swapped axis, an fp16 overflow to inf) still moves outputs by 1e-1 to >1. The mask check stays
# decisive: IoU at logit 0 >= 0.98 (pixels whose logit sits within ~2e-2 of 0 may flip; measured
# 0.9989-1.0).
# A part that only copies weights (an embedding Gather, atol 0 at fp32) returns them rounded: by at
# most half an fp16 ulp, 2^-11 relative, i.e. <= 4.9e-4 for |w| < 1 and <= 9.8e-4 for |w| < 4
# (embedding rows are of order 0.01-1). Its fp16 tolerance is that bound, 1e-3; a wrong row or a
# dropped scale still moves outputs by the size of the weights themselves.
WEIGHT_STORAGES: dict[str, WeightStorage] = {
    "fp32": WeightStorage("fp32", onnx_dtype=1, atol_scale=1.0, mask_iou_floor=None, exact_atol=0.0),
    "fp16": WeightStorage("fp16", onnx_dtype=10, atol_scale=10.0, mask_iou_floor=0.98, exact_atol=1e-3),
}


def weight_storage(name: str, label: str) -> WeightStorage:
    """The ``WEIGHT_STORAGES`` entry called ``name``; ``InputError`` under ``label`` (the flag or
    field the caller read it from) when there is none."""
    if name not in WEIGHT_STORAGES:
        raise InputError(f"{label}: expected one of {', '.join(WEIGHT_STORAGES)}")
    return WEIGHT_STORAGES[name]


# Initializers below this many elements (biases, norms, scales, shape constants) stay fp32: they
# are a few percent of the bytes and some feed shape arithmetic.
STORAGE_MIN_ELEMENTS = 1024


# What a part computes in. fp16 is a TensorRT build precision on GPU (strongly typed, per part), not an
# ONNX variant ONNX Runtime's CPU provider can run and validate here; int8 and int4 are quantization
# steps after the fp32 export (export/quantize.py), applied to the policy decoder.
PRECISIONS = ("fp32", "int8", "int4")


def check_precision(name: str, label: str) -> str:
    """``name`` if it is in ``PRECISIONS``; ``InputError`` under ``label`` (the flag or field) otherwise."""
    if name not in PRECISIONS:
        raise InputError(f"{label}: expected one of {', '.join(PRECISIONS)}")
    return name
