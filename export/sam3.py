"""The SAM 3 family: its three parts' specs, parity cases and references, the tokenizer file, and ``export sam3``.

``export sam3`` turns a SAM 3 checkpoint (or a random build of a variant) into a bundle with the
vision encoder (once per image), the text encoder (once per concept) and the grounding head (once
per prompt: text features + K >= 0 concept tokens → per-query logits, boxes, masks, the presence
logit and the semantic mask). Every part is validated in ONNX Runtime against the ``sam3`` package's
own modules (``models/sam3.py``: ``Sam3Reference``); the CLIP BPE tokenizer ships beside the graphs as
a ``tokenizers`` JSON file so the runtime tokenizes without torch or ftfy. The package is imported only
inside ``export/sam3_compat.sam3_compat()``.

This module imports neither torch nor sam3 at import time (the registry lists its parts).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from conceptseg_edge.errors import InputError
from conceptseg_edge.export.onnx_export import export_and_validate
from conceptseg_edge.export.parts import (
    FEATURE_ATOL,
    LOGIT_ATOL,
    MASK_IOU_FLOOR,
    SCORE_ATOL,
    PartFactory,
    PartSpec,
    weight_storage,
)
from conceptseg_edge.fileio import atomic_path, sha256_file, staged_dir
from conceptseg_edge.manifest import (
    MANIFEST_NAME,
    BundleManifest,
    Preprocessing,
    SourceInfo,
    TensorSpec,
    read_manifest,
    write_manifest,
)
from conceptseg_edge.runtime.sam3 import (
    CONTEXT_LENGTH,
    EOT,
    DEFAULT_CONCEPT_SLOTS,
    PROMPT_DIM,
    SOT,
    TOKENIZER_FILE,
    encode_prompts,
    pad_concept_tokens,
)

REFERENCE_NAME = "sam3 package modules, torch eager (forward_image / forward_text / Sam3Image grounding steps)"
PATCH = 14
SAM3_VARIANTS = ("sam3", "sam3_small")


def _grid(image_size: int) -> int:
    if image_size <= 0 or image_size % (2 * PATCH):
        raise InputError(f"image size {image_size}: must be a positive multiple of {2 * PATCH}")
    return image_size // PATCH


def sam3_vision_spec(image_size: int) -> PartSpec:
    g = _grid(image_size)
    return PartSpec(
        name="sam3_vision",
        file="sam3_vision.onnx",
        inputs=(TensorSpec("image", "float32", (1, 3, image_size, image_size)),),
        outputs=(
            TensorSpec("fpn_0", "float32", (1, PROMPT_DIM, 4 * g, 4 * g)),
            TensorSpec("fpn_1", "float32", (1, PROMPT_DIM, 2 * g, 2 * g)),
            TensorSpec("fpn_2", "float32", (1, PROMPT_DIM, g, g)),
        ),
        atol={"fpn_0": FEATURE_ATOL, "fpn_1": FEATURE_ATOL, "fpn_2": FEATURE_ATOL},
        forbidden_ops=frozenset({"OneHot", "NonZero"}),
    )


def sam3_text_spec() -> PartSpec:
    return PartSpec(
        name="sam3_text",
        file="sam3_text.onnx",
        inputs=(TensorSpec("input_ids", "int64", ("batch", CONTEXT_LENGTH)),),
        outputs=(TensorSpec("text_features", "float32", ("batch", CONTEXT_LENGTH, PROMPT_DIM)),),
        atol={"text_features": FEATURE_ATOL},
    )


def sam3_head_spec(image_size: int, num_queries: int, concept_slots: int = DEFAULT_CONCEPT_SLOTS) -> PartSpec:
    """The grounding head; ``pred_masks`` comes first, so the parity check's mask IoU is taken on it."""
    g = _grid(image_size)
    low = 4 * g
    return PartSpec(
        name="sam3_head",
        file="sam3_head.onnx",
        inputs=(
            TensorSpec("fpn_0", "float32", (1, PROMPT_DIM, low, low)),
            TensorSpec("fpn_1", "float32", (1, PROMPT_DIM, 2 * g, 2 * g)),
            TensorSpec("fpn_2", "float32", (1, PROMPT_DIM, g, g)),
            TensorSpec("text_features", "float32", (1, CONTEXT_LENGTH, PROMPT_DIM)),
            TensorSpec("text_mask", "bool", (1, CONTEXT_LENGTH)),
            TensorSpec("concept_tokens", "float32", (1, concept_slots, PROMPT_DIM)),
            TensorSpec("concept_mask", "bool", (1, concept_slots)),
        ),
        outputs=(
            TensorSpec("pred_masks", "float32", (1, num_queries, low, low)),
            TensorSpec("pred_logits", "float32", (1, num_queries)),
            TensorSpec("pred_boxes", "float32", (1, num_queries, 4)),
            TensorSpec("presence_logit", "float32", (1, 1)),
            TensorSpec("semantic_seg", "float32", (1, 1, low, low)),
        ),
        atol={"pred_masks": LOGIT_ATOL, "pred_logits": SCORE_ATOL, "pred_boxes": SCORE_ATOL,
              "presence_logit": SCORE_ATOL, "semantic_seg": LOGIT_ATOL},
        forbidden_ops=frozenset({"OneHot", "NonZero"}),
        min_mask_iou=MASK_IOU_FLOOR,
    )


#: This family's parts, for ``export/registry.py``.
PARTS: dict[str, PartFactory] = {"sam3_vision": sam3_vision_spec, "sam3_text": sam3_text_spec, "sam3_head": sam3_head_spec}


@dataclass(frozen=True)
class Sam3ExportConfig:
    """Arguments of ``conceptseg-edge export sam3``."""

    variant: str = "sam3"  # a name in SAM3_VARIANTS; sam3_small is the reduced build for tests
    checkpoint: str | None = None
    opset: int = 17
    weight_storage: str = "fp32"  # a name in parts.WEIGHT_STORAGES
    concept_slots: int = DEFAULT_CONCEPT_SLOTS  # the head's static concept-token count (K <= this, padded)

    def __post_init__(self) -> None:
        if self.concept_slots < 1:
            raise InputError(f"--concept-slots {self.concept_slots}: must be at least 1")
        if self.variant not in SAM3_VARIANTS:
            raise InputError(f"--variant {self.variant}: expected one of {', '.join(SAM3_VARIANTS)}")
        weight_storage(self.weight_storage, f"--weight-storage {self.weight_storage}")


def clip_tokenizer(bpe_path: str | Path):
    """SAM 3's ``SimpleTokenizer`` (CLIP BPE, lower-cased) as a ``tokenizers.Tokenizer``.

    Same vocabulary and ids (byte-level symbols, their ``</w>`` forms, the first 48,894 merges, then
    ``<start_of_text>`` / ``<end_of_text>``), the same word regex, whitespace collapsing and lower-casing.
    The framing (start, end, 0-padding to 32, truncation keeping the end token) is
    ``runtime.sam3.encode_prompts``'s.
    ``ftfy.fix_text`` (mojibake repair) has no counterpart: NFC normalisation stands in for it.
    """
    import gzip

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    merges_text = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in merges_text]
    symbols = list(ByteLevel.alphabet())
    byte_symbols = _bytes_to_unicode()
    vocab_list = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    assert sorted(symbols) == sorted(byte_symbols)  # tokenizers' byte alphabet is CLIP's
    vocab = {token: i for i, token in enumerate(vocab_list)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tokenizer


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's byte → printable-symbol table, in byte order of its construction (the vocab's first 256)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def random_init_banner(model: str) -> str:
    line = "!" * 78
    return (
        f"\n{line}\n!! {model}: NO CHECKPOINT GIVEN - RANDOM INITIALISATION.\n"
        "!! The graphs are structurally real but their masks are meaningless.\n"
        "!! Pass --checkpoint sam3.pt (official SAM 3 weights) for real masks.\n"
        f"{line}\n"
    )


def export_sam3_parts(cfg: Sam3ExportConfig, staging: Path, steps: tqdm | None = None):
    """Export and validate the three parts and the tokenizer into ``staging``.

    Returns ``(parts, files, source, preprocessing)`` for the manifest.
    """
    import torch

    from conceptseg_edge.export.sam3_compat import bpe_path, sam3_compat

    with sam3_compat():
        from conceptseg_edge.models.sam3 import (
            PIXEL_MEAN,
            PIXEL_STD,
            Sam3GroundingHead,
            Sam3Reference,
            Sam3TextEncoder,
            Sam3VisionEncoder,
            build_sam3,
        )

        bpe = bpe_path()
        loaded = build_sam3(cfg.variant, bpe, cfg.checkpoint)
        if loaded.random_init:
            print(random_init_banner(cfg.variant), file=sys.stderr)
        sam, size = loaded.model, loaded.image_size
        reference = Sam3Reference(sam, size)
        tokenizer = clip_tokenizer(bpe)
        with atomic_path(staging / TOKENIZER_FILE) as tmp:
            tokenizer.save(str(tmp))

        def advance(label: str) -> None:
            if steps is not None:
                steps.update()
                steps.set_postfix_str(label)

        # Vision: one preprocessed random image (the reference's own forward_image).
        image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        image_out = reference.image_features(torch.from_numpy(image))
        fpn = {f"fpn_{i}": t.numpy() for i, t in enumerate(image_out["backbone_fpn"])}
        vision = export_and_validate(
            Sam3VisionEncoder(sam).eval(), sam3_vision_spec(size), [{"image": image}],
            lambda feeds: {f"fpn_{i}": t.numpy() for i, t in enumerate(reference.image_features(torch.from_numpy(feeds["image"]))["backbone_fpn"])},
            REFERENCE_NAME, staging, cfg.opset, cfg.weight_storage,
        )
        advance("sam3 text")

        # Text: the ids come from the shipped tokenizer, the reference tokenizes the strings itself.
        prompts = [["a red car"], ["person", "the dog on the left", "2 cats!"]]
        by_ids = {encode_prompts(tokenizer, texts).tobytes(): texts for texts in prompts}

        def text_ref(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = reference.text_features(by_ids[feeds["input_ids"].tobytes()])
            return {"text_features": out["language_features"].transpose(0, 1).numpy()}

        text = export_and_validate(
            Sam3TextEncoder(sam).eval(), sam3_text_spec(), [{"input_ids": encode_prompts(tokenizer, t)} for t in prompts],
            text_ref, REFERENCE_NAME, staging, cfg.opset, cfg.weight_storage,
        )
        advance("sam3 head")

        # Head: text prompts with K = half the slots, 0 and all of them.
        rng = np.random.default_rng(1)
        by_text: dict[bytes, str] = {}

        def head_case(prompt: str, k: int) -> dict[str, np.ndarray]:
            lang = reference.text_features([prompt])
            features = lang["language_features"].transpose(0, 1).numpy()
            by_text[features.tobytes()] = prompt
            tokens, mask = pad_concept_tokens(rng.standard_normal((k, PROMPT_DIM)).astype(np.float32), cfg.concept_slots)
            return {**fpn, "text_features": features, "text_mask": lang["language_mask"].numpy(),
                    "concept_tokens": tokens, "concept_mask": mask}

        def head_ref(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = reference.predict(image_out, by_text[feeds["text_features"].tobytes()],
                                    torch.from_numpy(feeds["concept_tokens"]), torch.from_numpy(feeds["concept_mask"]))
            return {"pred_masks": out["pred_masks"].numpy(), "pred_logits": out["pred_logits"][..., 0].numpy(),
                    "pred_boxes": out["pred_boxes_xyxy"].numpy(), "presence_logit": out["presence_logit_dec"].numpy(),
                    "semantic_seg": out["semantic_seg"].numpy()}

        slots = cfg.concept_slots
        cases = [head_case("a red car", (slots + 1) // 2), head_case("a red car", 0), head_case("person", slots)]
        head = export_and_validate(
            Sam3GroundingHead(sam).eval(), sam3_head_spec(size, loaded.num_queries, slots), cases, head_ref, REFERENCE_NAME,
            staging, cfg.opset, cfg.weight_storage,
        )
        advance("manifest")
    source = SourceInfo(model=cfg.variant, checkpoint=loaded.checkpoint, checkpoint_sha256=loaded.checkpoint_sha256)
    preprocessing = Preprocessing(image_size=size, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD, low_res_size=4 * _grid(size))
    files = {TOKENIZER_FILE: sha256_file(staging / TOKENIZER_FILE)}
    return {"sam3_vision": vision, "sam3_text": text, "sam3_head": head}, files, source, preprocessing


def export_sam3(cfg: Sam3ExportConfig, out: str | Path, progress: bool = True) -> BundleManifest:
    """Export SAM 3 to ``out`` as a validated bundle and return its manifest.

    The bundle's route list says ``prompt`` (a text concept straight to SAM 3); the torch-free SAM 3
    predictor that serves it is not written yet.
    """
    with tqdm(total=4, desc=f"export {cfg.variant}", disable=not progress, unit="step") as steps, \
            staged_dir(out, MANIFEST_NAME, "bundle") as staging:
        steps.set_postfix_str("sam3 vision")
        parts, files, source, preprocessing = export_sam3_parts(cfg, staging, steps)
        write_manifest(staging, BundleManifest(source=source, preprocessing=preprocessing, parts=parts,
                                               routes=("prompt",), files=files))
        steps.update()
    return read_manifest(out)
