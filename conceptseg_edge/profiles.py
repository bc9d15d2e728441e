"""Optimization profiles: the min/opt/max shape of every dynamic input of a part.

A TensorRT engine built from a graph with dynamic axes serves only the shapes inside its profile, so the
profile is part of the engine's contract. It is derived in one place from the manifest's symbolic dims
(``num_points``, ``num_concept_tokens``, ``batch``, ``completion_len``, ``num_patches``, ``sequence``,
``past_sequence``, ``total_sequence``) and a table of ranges per dim name (``DimRange``), then written
out as what each consumer wants: ``trtexec`` flags (the recipe beside an engine), ONNX Runtime's
TensorRT provider options, polygraphy's profile, Triton's dims, and the manifest record of a built engine.
Every consumer reads the same ``PartProfile``, so a recipe, an engine and a runtime check cannot disagree.

Pure Python: the runtime (ORT's TensorRT EP options, ``TrtEngine``'s shape check) reads profiles too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conceptseg_edge.errors import InputError, ManifestError

if TYPE_CHECKING:
    from conceptseg_edge.manifest import TensorSpec

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DimRange:
    """The sizes one symbolic dim takes: the engine accepts [min, max] and is tuned for ``opt``."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise InputError(f"dim range: expected 0 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")


# Why these ranges (all overridable, per dim by ``bundle_dim_ranges`` and per input by ``--profile``):
# * num_points 0..16: the concept routes send no geometry (N = 0); a box is two points plus one padding
#   point; 16 covers interactive clicks. Optimised for a single click (1 point + padding).
# * num_concept_tokens 0..8: the prompt route sends none; the CTM writes 8 (method notes).
# * batch 1..8: prompt sets decoded against one image; the runtime sends 1, Triton may batch.
TEXT_BUDGET = 512  # prompt tokens besides the images: system text, query, template


def bundle_dim_ranges(
    max_new_tokens: int,
    *,
    min_patches: int = 16,
    max_patches: int = 64,
    merge_size: int = 2,
    images_per_prompt: int = 2,
    max_points: int = 16,
    concept_tokens: int = 8,
    max_batch: int = 8,
) -> dict[str, DimRange]:
    """The range of every symbolic dim our graphs use, from the policy's limits.

    ``min_patches``/``max_patches`` are the vision patches of the smallest and largest image the
    policy's processor produces (its min/max pixels over patch size²); ``images_per_prompt`` images (the
    reason route sends two: the support mosaic, then the target) of
    ``max_patches / merge_size²`` tokens each plus ``TEXT_BUDGET`` text tokens bound the prompt; the KV
    cache holds the prompt and ``max_new_tokens`` generated tokens.
    """
    image_tokens = max_patches // merge_size**2
    prompt = images_per_prompt * image_tokens + TEXT_BUDGET
    context = prompt + max_new_tokens
    typical = image_tokens + 64  # one image and a short query: the prompt the decoder sees most
    return {
        "batch": DimRange(1, 1, max_batch),
        "num_points": DimRange(0, 2, max_points),
        "num_concept_tokens": DimRange(0, concept_tokens, concept_tokens),
        "completion_len": DimRange(1, min(64, max_new_tokens), max_new_tokens),
        "num_patches": DimRange(min_patches, max_patches, max_patches),
        # Decoding runs one token at a time after one prefill: optimise for the step, allow the prompt.
        "sequence": DimRange(1, 1, prompt),
        "past_sequence": DimRange(0, typical, context),
        "total_sequence": DimRange(1, typical + 1, context),
        # Video memory attention (runtime.tracker.TrackerConfig defaults): the conditioning frames (<= 4)
        # and the 6 previous frames; the pointers of those (<= 4) and of the 15 previous frames. The
        # steady state after the 7th frame is the opt; the max leaves room for larger tracker configs.
        "num_memories": DimRange(1, 7, 16),
        "num_obj_ptrs": DimRange(1, 16, 32),
    }


@dataclass(frozen=True)
class InputProfile:
    """One dynamic input's min/opt/max shapes."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise InputError(f"profile {self.name}: min/opt/max ranks differ ({self.min}, {self.opt}, {self.max})")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 0 <= lo <= mid <= hi:
                raise InputError(f"profile {self.name}: expected min <= opt <= max per axis, got {self.min}, {self.opt}, {self.max}")

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> InputProfile:
        if not isinstance(data, dict) or set(data) != {"name", "min", "opt", "max"}:
            raise ManifestError(f"{where}: expected an object with keys name, min, opt, max")
        if not isinstance(data["name"], str):
            raise ManifestError(f"{where}.name: expected a string")
        shapes = {k: _shape(data[k], f"{where}.{k}") for k in ("min", "opt", "max")}
        try:
            return cls(data["name"], **shapes)
        except InputError as exc:
            raise ManifestError(f"{where}: {exc}") from None


def _shape(value: Any, where: str) -> Shape:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise ManifestError(f"{where}: expected a list of sizes >= 0, got {value!r}")
    return tuple(value)


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


@dataclass(frozen=True)
class PartProfile:
    """The optimization profile of one part: every dynamic input, in graph order (static ones need none)."""

    part: str
    inputs: tuple[InputProfile, ...] = field(default_factory=tuple)

    def input(self, name: str) -> InputProfile:
        for profile in self.inputs:
            if profile.name == name:
                return profile
        raise InputError(f"{self.part}: no profile for input {name!r} (has {[p.name for p in self.inputs]})")

    def shape_lists(self) -> dict[str, str]:
        """``{"min": "a:1x2,b:3", "opt": ..., "max": ...}``: the ``name:AxB`` lists trtexec and ORT both read."""
        return {key: ",".join(f"{p.name}:{_dims(getattr(p, key))}" for p in self.inputs) for key in ("min", "opt", "max")}

    def trtexec_flags(self) -> list[str]:
        """``--minShapes=... --optShapes=... --maxShapes=...`` (nothing for an all-static part)."""
        if not self.inputs:
            return []
        return [f"--{key}Shapes={value}" for key, value in self.shape_lists().items()]

    def ort_trt_options(self) -> dict[str, str]:
        """ONNX Runtime TensorRT provider options pinning the same profile (explicit profile shapes)."""
        if not self.inputs:
            return {}
        return {f"trt_profile_{key}_shapes": value for key, value in self.shape_lists().items()}

    def check(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Raise ``InputError`` naming the first input whose shape falls outside the profile."""
        for profile in self.inputs:
            shape = shapes.get(profile.name)
            if shape is not None and not profile.contains(shape):
                raise InputError(
                    f"{self.part}.{profile.name}: shape {tuple(shape)} is outside the engine's profile "
                    f"(min {profile.min}, max {profile.max}); rebuild the engine with --profile "
                    f"{self.part}:{profile.name}=MIN,OPT,MAX"
                )

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "inputs": [p.to_dict() for p in self.inputs]}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> PartProfile:
        if not isinstance(data, dict) or set(data) != {"part", "inputs"} or not isinstance(data["part"], str):
            raise ManifestError(f"{where}: expected an object with keys part (a string) and inputs")
        if not isinstance(data["inputs"], list):
            raise ManifestError(f"{where}.inputs: expected a list")
        return cls(data["part"], tuple(InputProfile.from_dict(p, f"{where}.inputs[{i}]") for i, p in enumerate(data["inputs"])))


def derive_profile(
    part: str,
    inputs: Iterable[TensorSpec],
    ranges: Mapping[str, DimRange],
    overrides: Iterable[InputProfile] = (),
) -> PartProfile:
    """The profile of ``part`` from its inputs' symbolic dims, each sized by ``ranges``.

    ``overrides`` replace a derived input profile whole (``--profile PART:INPUT=...``); an override for an
    input the part does not have, or of the wrong rank, or that moves a static dim, is an ``InputError``.

    Raises:
        InputError: a symbolic dim has no range (naming the dim, the input and the part), or a bad override.
    """
    inputs = tuple(inputs)
    by_name = {spec.name: spec for spec in inputs}
    replaced = {}
    for override in overrides:
        spec = by_name.get(override.name)
        if spec is None:
            raise InputError(f"--profile {part}:{override.name}: {part} has no input {override.name!r} (has {sorted(by_name)})")
        if len(override.min) != len(spec.shape):
            raise InputError(f"--profile {part}:{override.name}: rank {len(override.min)}, the input's shape is {list(spec.shape)}")
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and not override.min[axis] == override.opt[axis] == override.max[axis] == dim:
                raise InputError(f"--profile {part}:{override.name}: axis {axis} is fixed at {dim} in the graph ({list(spec.shape)})")
        replaced[override.name] = override
    profiles = []
    for spec in inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        if spec.name in replaced:
            profiles.append(replaced[spec.name])
            continue
        missing = [d for d in spec.shape if isinstance(d, str) and d not in ranges]
        if missing:
            raise InputError(f"{part}.{spec.name}: no size range for dim {missing[0]!r}; pass --profile {part}:{spec.name}=MIN,OPT,MAX")
        pick = {key: tuple(d if isinstance(d, int) else getattr(ranges[d], key) for d in spec.shape) for key in ("min", "opt", "max")}
        profiles.append(InputProfile(spec.name, **pick))
    return PartProfile(part, tuple(profiles))


_OVERRIDE = re.compile(r"(?P<part>[A-Za-z0-9_.]+):(?P<input>[^=]+)=(?P<min>[0-9x]+),(?P<opt>[0-9x]+),(?P<max>[0-9x]+)")


def parse_profile_override(text: str) -> tuple[str, InputProfile]:
    """``PART:INPUT=MIN,OPT,MAX`` with shapes written ``AxBxC`` (trtexec's form) → (part, profile).

    Raises:
        InputError: the text does not have that form, or min <= opt <= max fails on an axis.
    """
    match = _OVERRIDE.fullmatch(text.strip())
    if match is None:
        raise InputError(f"--profile {text!r}: expected PART:INPUT=MIN,OPT,MAX with shapes like 1x8x256")
    if any("" in match.group(key).split("x") for key in ("min", "opt", "max")):
        raise InputError(f"--profile {text!r}: empty axis in a shape")
    shapes = {key: tuple(int(d) for d in match.group(key).split("x")) for key in ("min", "opt", "max")}
    return match.group("part"), InputProfile(match.group("input"), **shapes)
