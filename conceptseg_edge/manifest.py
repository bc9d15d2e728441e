"""The bundle manifest: the only contract between export, runtime, benchmarks and Triton.

A bundle is a directory holding ``manifest.json`` and the files it lists. The manifest records, per
part, its file and sha256, its inputs and outputs (names, dtypes, shapes with symbolic dims),
precision and opset, and the parity measured at export (``ParityReport`` for graphs held to an fp32
tolerance, ``QuantizedParity`` for quantized ones); for the bundle, the source checkpoint and its
hash, the image size and preprocessing constants, the router settings (``RouterConfig``), and tool
versions.

Reading is strict, as a bundle is untrusted input: an unknown key, a missing key, a value of the
wrong type or out of range, nesting deeper than ``MAX_DEPTH``, another schema version, or a file
path that is absolute or climbs out with ``..`` is a ``ManifestError`` that names the field;
``load_bundle`` also re-hashes every file, names the one that changed, and refuses symlinks that
lead out of the bundle (``fileio.contained``).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from conceptseg_edge.errors import ManifestError
from conceptseg_edge.fileio import contained, contained_tree, relative_path, verify_hashes, write_json
from conceptseg_edge.profiles import PartProfile
from conceptseg_edge.router import ROUTES, RouterConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: Where a bundle with the policy keeps its processor files (tokenizer.json, processor_config.json).
PROCESSOR_DIR = "processor"

#: Deepest nesting a manifest may have; its own structure is five levels deep. Checked before any
#: recursive reader walks it, so a hostile file is a ManifestError, never a RecursionError.
MAX_DEPTH = 32
#: Largest manifest.json read (a real one is tens of kB): a hostile file is refused, not loaded into memory.
MAX_MANIFEST_BYTES = 16 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")

#: The one resize the runtime implements (``preprocess.preprocess_image``); a manifest naming another is refused.
RESIZE = "squash_bilinear_antialias"

Dim = int | str  # a fixed size, or a symbolic name for a dynamic axis
Check = Callable[[Any, str], Any]  # (value, field path) → the value typed, or a ManifestError naming the field


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {type(data).__name__}")
    return data


def _list(data: Any, where: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(data, (list, tuple)):  # JSON gives lists; to_dict() of a manifest keeps tuples
        raise ManifestError(f"{where}: expected a list, got {_shown(data)}")
    return data


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{where}: expected a string, got {_shown(value)}")
    return value


def _optional(check: Check) -> Check:
    """``check`` for a field that may also be null."""
    return lambda value, where: None if value is None else check(value, where)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{where}: expected true or false, got {_shown(value)}")
    return value


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ManifestError(f"{where}: expected an integer >= {minimum}, got {_shown(value)}")
    return value


def _float(value: Any, where: str, positive: bool = False) -> float:
    """A finite number (``positive``: > 0); NaN and infinities, which JSON readers accept, are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ManifestError(f"{where}: expected a finite {'positive ' if positive else ''}number, got {_shown(value)}")
    return float(value)


def _floats(data: Any, where: str, n: int, positive: bool = False) -> tuple[float, ...]:
    values = _list(data, where)
    if len(values) != n:
        raise ManifestError(f"{where}: expected {n} numbers, got {len(values)}")
    return tuple(_float(v, f"{where}[{i}]", positive) for i, v in enumerate(values))


def _float_map(data: Any, where: str) -> dict[str, float]:
    return {k: _float(v, f"{where}.{k}") for k, v in _object(data, where).items()}


def _sha256(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ManifestError(f"{where}: expected a sha256 (64 lowercase hex digits), got {_shown(value)}")
    return value


def _check_depth(data: Any, where: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` (walked with a stack, not recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ManifestError(f"{where}: nested deeper than {MAX_DEPTH} levels; not a conceptseg-edge manifest")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def read_fields(data: Any, cls: type, where: str, checks: dict[str, Check]) -> dict[str, Any]:
    """``check_keys``, then every field present through its check: the typed keyword arguments of ``cls``."""
    return {key: checks[key](value, f"{where}.{key}") for key, value in check_keys(data, cls, where).items()}


def check_keys(data: Any, cls: type, where: str) -> dict[str, Any]:
    """Reject non-objects, unknown keys and missing required keys, naming the field."""
    _object(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}")
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {missing}")
    return data


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``dtype`` is a numpy dtype name; string dims are dynamic."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        return cls(**read_fields(data, cls, where, {"name": _str, "dtype": _dtype, "shape": _shape}))


def _shape(value: Any, where: str) -> tuple[Dim, ...]:
    return tuple(_dim(d, f"{where}[{i}]") for i, d in enumerate(_list(value, where)))


def _dtype(value: Any, where: str) -> str:
    try:
        np.dtype(_str(value, where))
    except TypeError:
        raise ManifestError(f"{where}: {value!r} is not a numpy dtype name (float32, int64, ...)") from None
    return value


def _dim(value: Any, where: str) -> Dim:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ManifestError(f"{where}: expected a size >= 0 or a dynamic axis name, got {_shown(value)}")


@dataclass(frozen=True)
class ParityReport:
    """Export-time agreement of a graph with its reference module, on fixed inputs."""

    reference: str
    max_abs_diff: dict[str, float]
    atol: dict[str, float]
    passed: bool
    mask_iou: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ParityReport:
        checks = {"reference": _str, "max_abs_diff": _float_map, "atol": _float_map, "passed": _bool, "mask_iou": _optional(_float)}
        return cls(**read_fields(data, cls, where, checks))


# Manifests written before ``QuantizedParity`` kept a quantized decoder's measures in its
# ``ParityReport`` as distances (1 - measure) under these keys, the slot counts in the reference text.
_LEGACY_DISTANCES = {
    "greedy_token_agreement": "greedy_token_disagreement",
    "decisive_token_agreement": "decisive_token_disagreement",
    "hidden_cosine": "hidden_cosine_distance",
}
_LEGACY_SLOTS = re.compile(r"(\d+) slots \((\d+) decisive\)")


@dataclass(frozen=True)
class QuantizedParity:
    """A quantized graph's agreement with the fp32 torch model, measured on its behaviour.

    A quantized graph cannot meet an fp32 ``atol``, so it is compared on torch's greedy completions,
    teacher-forced through the runtime: the fraction of completion tokens where the runtime's top-1
    equals torch's (over all ``tokens``, and over the ``decisive_tokens`` where torch's top-1 leads
    the runner-up clearly), and the mean cosine of the hidden states the CTM consumes. ``floors``
    holds the minimum the export required of each measure (keyed like ``measures()``).
    """

    reference: str
    precision: str
    tokens: int
    decisive_tokens: int
    greedy_token_agreement: float
    decisive_token_agreement: float
    hidden_cosine: float
    floors: dict[str, float]
    passed: bool

    def measures(self) -> dict[str, float]:
        return {
            "greedy_token_agreement": self.greedy_token_agreement,
            "decisive_token_agreement": self.decisive_token_agreement,
            "hidden_cosine": self.hidden_cosine,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> QuantizedParity:
        checks = {"reference": _str, "precision": _str, "tokens": _int, "decisive_tokens": _int, "floors": _float_map,
                  "passed": _bool} | dict.fromkeys(_LEGACY_DISTANCES, _float)
        return cls(**read_fields(data, cls, where, checks))

    @classmethod
    def from_legacy(cls, report: ParityReport, precision: str, where: str) -> QuantizedParity:
        """The measures an older manifest stored as ``ParityReport`` distances."""
        slots = _LEGACY_SLOTS.search(report.reference)
        if slots is None:
            raise ManifestError(f"{where}.reference: no '<n> slots (<m> decisive)' in {report.reference!r}")
        measured = {k: 1.0 - report.max_abs_diff[d] for k, d in _LEGACY_DISTANCES.items()}
        return cls(
            reference=report.reference,
            precision=precision,
            tokens=int(slots.group(1)),
            decisive_tokens=int(slots.group(2)),
            floors={k: 1.0 - report.atol[d] for k, d in _LEGACY_DISTANCES.items()},
            passed=report.passed,
            **measured,
        )

    @staticmethod
    def is_legacy(report: ParityReport) -> bool:
        return set(report.max_abs_diff) == set(_LEGACY_DISTANCES.values())


@dataclass(frozen=True)
class QdqReport:
    """A part's explicit (Q/DQ) quantization, measured on ONNX Runtime CPU against its fp32 graph.

    Calibrated on ``calibration`` (``calibration_samples`` inputs), measured on ``held_out`` images the
    calibration never saw: end-to-end ``mask_iou`` of the bundle with this part quantized against the
    fp32 bundle, and the part's own ``max_abs_diff`` per output. ``passed`` says every measure met its
    floor; a part that failed keeps its fp32 graph and this record of why.
    """

    precision: str  # "int8" | "fp8": the precision tried
    tool: str
    calibration: str
    calibration_samples: int
    held_out: str
    held_out_samples: int
    mask_iou: float | None
    max_abs_diff: dict[str, float]
    floors: dict[str, float]
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> QdqReport:
        checks = {"precision": _str, "tool": _str, "calibration": _str, "calibration_samples": _int, "held_out": _str,
                  "held_out_samples": _int, "mask_iou": _optional(_float), "max_abs_diff": _float_map,
                  "floors": _float_map, "passed": _bool}
        return cls(**read_fields(data, cls, where, checks))


#: TensorRT's hardware-compatibility levels (``trt.HardwareCompatibilityLevel``, trtexec ``--hardwareCompatibilityLevel``).
HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
_COMPUTE_CAPABILITY = re.compile(r"\d+\.\d+")


@dataclass(frozen=True)
class EngineInfo:
    """How and where a TensorRT engine was built: it deserializes only on a matching TensorRT and GPU.

    ``onnx_sha256`` is the graph it was built from; ``recipe`` the ``trtexec`` command file beside it (in
    the manifest's ``files``), written from the same ``profile`` and ``builder_flags``.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Orin), "9.0" (H100/H200)
    precision: str  # the build precision asked for: fp32 | fp16 | int8 | best
    profile: PartProfile
    builder_flags: tuple[str, ...]
    hardware_compatibility: str
    onnx_sha256: str
    recipe: str
    workspace_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "profile": self.profile.to_dict(), "builder_flags": list(self.builder_flags)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> EngineInfo:
        checks = {
            "tensorrt_version": _str, "gpu_name": _str, "compute_capability": _compute_capability, "precision": _str,
            "profile": PartProfile.from_dict,
            "builder_flags": lambda v, w: tuple(_str(f, f"{w}[{i}]") for i, f in enumerate(_list(v, w))),
            "hardware_compatibility": _hardware_compatibility, "onnx_sha256": _sha256, "recipe": relative_path,
            "workspace_gb": _optional(lambda v, w: _float(v, w, positive=True)),
        }
        return cls(**read_fields(data, cls, where, checks))


def _compute_capability(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _COMPUTE_CAPABILITY.fullmatch(value):
        raise ManifestError(f"{where}: expected a compute capability like '8.7', got {_shown(value)}")
    return value


def _hardware_compatibility(value: Any, where: str) -> str:
    if value not in HARDWARE_COMPATIBILITY:
        raise ManifestError(f"{where}: expected one of {list(HARDWARE_COMPATIBILITY)}, got {_shown(value)}")
    return value


@dataclass(frozen=True)
class PartManifest:
    """One exported graph (or engine) inside the bundle."""

    name: str
    file: str
    sha256: str
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "int8" | "int4": what the graph computes in
    opset: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parity: ParityReport | None = None  # graphs held to an fp32 tolerance
    # How large float weights sit in the file: "fp16" = stored half precision, cast to fp32 in the
    # graph (folded by ONNX Runtime at load). Manifests written before this field read as "fp32".
    weight_storage: str = "fp32"
    quantized_parity: QuantizedParity | None = None  # quantized graphs (precision int8 / int4)
    qdq: QdqReport | None = None  # explicit quantization tried (``export qdq``), kept or not
    engine: EngineInfo | None = None  # format "tensorrt": how and where the engine was built

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "sha256": self.sha256,
            "format": self.format,
            "precision": self.precision,
            "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "parity": self.parity.to_dict() if self.parity else None,
            "weight_storage": self.weight_storage,
            "quantized_parity": self.quantized_parity.to_dict() if self.quantized_parity else None,
            "qdq": self.qdq.to_dict() if self.qdq else None,
            "engine": self.engine.to_dict() if self.engine else None,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> PartManifest:
        fields = read_fields(data, cls, where, {
            "name": _str, "file": relative_path, "sha256": _sha256, "format": _str, "precision": _str,
            "opset": _optional(lambda v, w: _int(v, w, minimum=1)), "inputs": _specs, "outputs": _specs,
            "parity": _optional(ParityReport.from_dict), "weight_storage": _str,
            "quantized_parity": _optional(QuantizedParity.from_dict), "qdq": _optional(QdqReport.from_dict),
            "engine": _optional(EngineInfo.from_dict),
        })
        if (fields["format"] == "tensorrt") != (fields.get("engine") is not None):
            raise ManifestError(f"{where}.engine: a 'tensorrt' part records its engine, and only a 'tensorrt' part "
                                f"(format {fields['format']!r}, engine {'set' if fields.get('engine') else 'missing'})")
        parity = fields.get("parity")
        if parity is not None and QuantizedParity.is_legacy(parity):
            fields["quantized_parity"] = QuantizedParity.from_legacy(parity, fields["precision"], f"{where}.parity")
            fields["parity"] = None
        return cls(**fields)


def _specs(data: Any, where: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_dict(t, f"{where}[{i}]") for i, t in enumerate(_list(data, where)))


@dataclass(frozen=True)
class SourceInfo:
    """Where the weights came from. ``checkpoint`` None means random init (said loudly at export)."""

    model: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    backbone_checkpoint: str | None = None  # concept bundles: the SAM2 weights beside the policy/CTM
    backbone_sha256: str | None = None

    @property
    def random_init(self) -> bool:
        return self.checkpoint is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> SourceInfo:
        checks = {"model": _str} | dict.fromkeys(
            ("checkpoint", "checkpoint_sha256", "backbone_checkpoint", "backbone_sha256"), _optional(_str))
        return cls(**read_fields(data, cls, where, checks))


@dataclass(frozen=True)
class Preprocessing:
    """What the runtime must do around the graphs, exactly as SAM2 does it.

    SAM2 squashes the image to ``image_size``² (bilinear with antialiasing, no aspect preservation,
    no padding), scales to [0, 1], then normalises with ImageNet mean/std. The decoder's low-res masks
    are upsampled bilinearly to the original size and thresholded at ``mask_threshold``.
    """

    image_size: int
    resize: str = RESIZE
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    mask_threshold: float = 0.0
    low_res_size: int = 0
    stability_delta: float = 0.05
    stability_thresh: float = 0.98

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Preprocessing:
        """Read and range-check: a zero ``pixel_std`` or ``image_size`` would not fail, but give NaN
        scores or an empty input, so both are refused here."""
        checks = {
            "image_size": lambda v, w: _int(v, w, minimum=1),
            "resize": _resize,
            "pixel_mean": lambda v, w: _floats(v, w, 3),
            "pixel_std": lambda v, w: _floats(v, w, 3, positive=True),
            "mask_threshold": _float,
            "low_res_size": _int,
            "stability_delta": _float,
            "stability_thresh": _float,
        }
        return cls(**read_fields(data, cls, where, checks))


def _resize(value: Any, where: str) -> str:
    if value != RESIZE:
        raise ManifestError(f"{where}: {value!r} is not implemented by this runtime (it resizes with {RESIZE!r})")
    return value


def produced_by() -> str:
    """``git describe --always --dirty`` of the checkout this code runs from, or why there is none:
    a report says which commit produced it, and "dirty" when the tree had uncommitted changes."""
    import subprocess

    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown (git: {exc})"
    return proc.stdout.strip() if proc.returncode == 0 else "unknown (not a git checkout)"


def tool_versions() -> dict[str, str]:
    """Versions of the tools that produced the bundle (only those importable now)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("conceptseg-edge", "torch", "onnx", "onnxruntime", "sam2", "transformers", "tensorrt"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


@dataclass(frozen=True)
class BundleManifest:
    """Everything a stage needs to know about a bundle; frozen, and round-trips through JSON."""

    source: SourceInfo
    preprocessing: Preprocessing
    parts: dict[str, PartManifest]
    routes: tuple[str, ...] = ("prompt",)
    router: RouterConfig | None = None  # None: the bundle has no text routes (written as {})
    files: dict[str, str] = field(default_factory=dict)  # extra files (tokenizer, ...) → sha256
    route_parity: dict[str, dict[str, Any]] = field(default_factory=dict)  # route → runtime vs torch pipeline
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def part(self, name: str) -> PartManifest:
        try:
            return self.parts[name]
        except KeyError:
            raise ManifestError(f"manifest: no part '{name}' (has {sorted(self.parts)})") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "created": self.created,
            "source": self.source.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "routes": list(self.routes),
            "router": self.router.to_dict() if self.router is not None else {},
            "parts": {name: part.to_dict() for name, part in self.parts.items()},
            "files": self.files,
            "route_parity": self.route_parity,
            "versions": self.versions,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_NAME) -> BundleManifest:
        _check_depth(data, where)
        if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(
                f"{where}: schema_version {data.get('schema_version')!r} is not supported "
                f"(this conceptseg-edge reads version {SCHEMA_VERSION}); re-export the bundle"
            )
        data = check_keys(data, cls, where)
        parts = data["parts"]
        if not isinstance(parts, dict) or not parts:
            raise ManifestError(f"{where}.parts: expected a non-empty object")
        files = _object(data.get("files", {}), f"{where}.files")
        route_parity = _object(data.get("route_parity", {}), f"{where}.route_parity")
        return cls(
            schema_version=SCHEMA_VERSION,
            created=_str(data.get("created", ""), f"{where}.created"),
            source=SourceInfo.from_dict(data["source"], f"{where}.source"),
            preprocessing=Preprocessing.from_dict(data["preprocessing"], f"{where}.preprocessing"),
            routes=_routes(data.get("routes", ["prompt"]), f"{where}.routes"),
            router=_router(data.get("router", {}), f"{where}.router"),
            parts={name: PartManifest.from_dict(p, f"{where}.parts.{name}") for name, p in parts.items()},
            files={relative_path(rel, f"{where}.files[{rel!r}]"): _sha256(sha, f"{where}.files[{rel!r}]")
                   for rel, sha in files.items()},
            route_parity={route: _object(v, f"{where}.route_parity.{route}") for route, v in route_parity.items()},
            versions={k: _str(v, f"{where}.versions.{k}") for k, v in _object(data.get("versions", {}), f"{where}.versions").items()},
        )

    def with_parts(self, **parts: PartManifest) -> BundleManifest:
        return dataclasses.replace(self, parts={**self.parts, **parts})


def _routes(data: Any, where: str) -> tuple[str, ...]:
    routes = tuple(_str(r, f"{where}[{i}]") for i, r in enumerate(_list(data, where)))
    unknown = [r for r in routes if r not in ROUTES]
    if not routes or unknown or len(set(routes)) != len(routes):
        raise ManifestError(f"{where}: expected distinct routes among {list(ROUTES)}, got {list(routes)}")
    return routes


def _router(data: Any, where: str) -> RouterConfig | None:
    """``{}`` or null (no text routes) → None; otherwise every field typed and in range, naming it."""
    if data is None or not check_keys(data, RouterConfig, where):
        return None
    fields: dict[str, Any] = {key: _float(data[key], f"{where}.{key}") for key in ("base_tau", "growth") if key in data}
    if "max_shortcut_words" in data:
        fields["max_shortcut_words"] = _int(data["max_shortcut_words"], f"{where}.max_shortcut_words")
    taus = _object(data.get("taus", {}), f"{where}.taus")
    fields["taus"] = {_word_count(n, f"{where}.taus"): _float(tau, f"{where}.taus.{n}") for n, tau in taus.items()}
    return RouterConfig(**fields)


def _word_count(key: str, where: str) -> int:
    if not key.isdecimal() or int(key) < 1:
        raise ManifestError(f"{where}: key {key!r} is not a word count (an integer >= 1)")
    return int(key)


def write_manifest(bundle_dir: str | Path, manifest: BundleManifest) -> Path:
    """Write ``manifest.json`` atomically, stamping creation time and tool versions."""
    manifest = dataclasses.replace(
        manifest,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=manifest.versions or tool_versions(),
    )
    path = Path(bundle_dir) / MANIFEST_NAME
    write_json(path, manifest.to_dict())
    return path


def read_manifest(bundle_dir: str | Path) -> BundleManifest:
    """Parse and validate ``manifest.json`` (structure only; ``verify_files`` checks the hashes)."""
    import json

    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (is {bundle_dir} a conceptseg-edge bundle?)")
    contained(bundle_dir, MANIFEST_NAME, str(path))
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: {path.stat().st_size} bytes, more than a manifest's {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError:
        raise ManifestError(f"{path}: nested deeper than {MAX_DEPTH} levels; not a conceptseg-edge manifest") from None
    return BundleManifest.from_dict(data, str(path))


def verify_files(bundle_dir: str | Path, manifest: BundleManifest) -> None:
    """Re-hash every file the manifest lists; name the first that is missing, changed, or outside
    the bundle, and refuse any symlink in the bundle that leads out of it."""
    expected = {part.file: part.sha256 for part in manifest.parts.values()} | manifest.files
    verify_hashes(bundle_dir, expected, "the manifest", ManifestError, "the file changed after export; re-export the bundle")
    contained_tree(bundle_dir)


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> BundleManifest:
    """Read the manifest and (by default) verify every file hash: the runtime's only entry."""
    manifest = read_manifest(bundle_dir)
    if verify:
        verify_files(bundle_dir, manifest)
    return manifest
