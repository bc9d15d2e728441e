"""``export tensorrt``: one TensorRT engine per bundle part, and the ``trtexec`` recipe that rebuilds it.

Every part of an ONNX bundle becomes ``<part>.plan`` (format ``"tensorrt"``), built through polygraphy's
TensorRT backend with an optimization profile derived from the manifest's symbolic dims
(``conceptseg_edge.profiles``; ``--profile PART:INPUT=MIN,OPT,MAX`` overrides one input). Beside each
engine sit the graph it was built from (``<part>.onnx``) and ``<part>.trtexec.sh``, the same build as a
``trtexec`` command a user can run by hand on a Jetson, plus ``build_engines.sh`` running them all. Both
the polygraphy build and the recipe are rendered from one ``BuildPlan`` per part, so they cannot disagree.

Precisions (``TrtBuildConfig.precision``):

* ``fp32``: TF32 off, every layer fp32 (the engine to compare with ONNX Runtime).
* ``fp16``: TensorRT's FP16 flag, with the layers where fp16 overflows or loses the sum pinned to fp32
  (normalizations, softmax, exp, mean/sum reductions, powers, square roots: ``FP32_OPS``) by per-layer
  precision and output-type constraints that the build must obey. A plain ``--fp16`` build lets TensorRT
  run LayerNorms and Qwen2.5-VL's vision tower in fp16, which drifts badly (docs/deployment-notes.md);
  TensorRT 10's other remedy, a strongly typed network, needs a graph already cast to fp16, which these
  fp32 exports are not. The pinned layers are named after their ONNX nodes (the parser gives a node's
  first layer the node's name), so the recipe pins the same ones with ``--layerPrecisions``.
* ``int8``: explicit quantization only. A part whose graph carries Q/DQ nodes (``export qdq``) is built
  as a strongly typed network, so every precision comes from the graph; a part ``export qdq`` measured
  and kept at fp32 builds at fp32. A bundle that never went through ``export qdq`` is refused unless
  ``--calib`` is given, which runs ``export qdq`` into a temporary bundle first. Implicit calibration
  (deprecated in TensorRT 10) is not offered.
* ``best``: ``fp16``, plus the INT8 flag on Q/DQ parts (weakly typed: TensorRT may run the rest in fp16).

A graph TensorRT's ONNX parser cannot take (``export/trt_check.py``; e.g. ONNX Runtime's dynamic INT8
policy decoder) is refused before anything is built, naming the part, the violations and the fix. Every
part is built: a bundle's runtime opens all parts with one provider, so a bundle half engines and half
ONNX graphs would run half of a route somewhere the user did not ask for.

Without TensorRT the command fails before any work with the ``install conceptseg-edge[gpu]`` error
(``runtime/trt_engine.import_tensorrt``); ``--recipes-only`` needs no TensorRT: it writes the ONNX
bundle as it is (still runnable with ONNX Runtime) plus the recipes and ``build_engines.sh``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from conceptseg_edge.errors import ExportError, InputError
from conceptseg_edge.fileio import atomic_path, sha256_file, staged_dir, write_text
from conceptseg_edge.generation import DEFAULT_MAX_NEW_TOKENS
from conceptseg_edge.manifest import (
    HARDWARE_COMPATIBILITY,
    MANIFEST_NAME,
    BundleManifest,
    EngineInfo,
    PartManifest,
    load_bundle,
    tool_versions,
    write_manifest,
)
from conceptseg_edge.profiles import DimRange, InputProfile, PartProfile, derive_profile, parse_profile_override
from conceptseg_edge.runtime.providers import bundle_ranges

#: ``--precision`` choices.
TRT_PRECISIONS = ("fp32", "fp16", "int8", "best")
ENGINE_SUFFIX = ".plan"
RECIPE_SUFFIX = ".trtexec.sh"
BUILD_SCRIPT = "build_engines.sh"

# ONNX ops kept in fp32 in an fp16 engine: their values or partial sums leave fp16's range (max 65504)
# or lose the small terms first: normalizations and softmax (TensorRT's own fp16 warning for LayerNorm),
# and the pieces of the decomposed norms (SAM2's LayerNorm2d, Qwen's RMSNorm: x², mean, sqrt) and of
# attention (exp).
FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "LogSoftmax", "Exp",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "Pow", "Sqrt", "Reciprocal",
})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# trtexec's ``--hardwareCompatibilityLevel`` values (TensorRT 10.x; sameComputeCapability since 10.9).
_TRTEXEC_HARDWARE = {"none": "none", "ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}
# TensorRT's ``trt.HardwareCompatibilityLevel`` members.
_TRT_HARDWARE = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


@dataclass(frozen=True)
class TrtBuildConfig:
    """What ``export tensorrt`` builds; each field is one CLI flag."""

    precision: str = field(default="fp16", metadata={"help": "fp32 | fp16 | int8 (Q/DQ parts) | best (fp16 + int8)"})
    calib: str | None = field(
        default=None, metadata={"help": "int8/best on a bundle without Q/DQ: calibrate with export qdq first (DIR or world:N)"}
    )
    profiles: tuple[str, ...] = field(default=(), metadata={"help": "PART:INPUT=MIN,OPT,MAX overrides (shapes AxBxC)"})
    workspace_gb: float | None = field(default=None, metadata={"help": "builder workspace limit, GiB (None: TensorRT's)"})
    timing_cache: str | None = field(default=None, metadata={"help": "timing cache file, loaded if present and saved"})
    hardware_compatibility: str = field(default="none", metadata={"help": "none | ampere_plus | same_compute_capability"})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={"help": "the policy's token budget (KV profile)"})
    recipes_only: bool = field(default=False, metadata={"help": "write ONNX + trtexec recipes, build nothing (no TensorRT)"})

    def __post_init__(self) -> None:
        if self.precision not in TRT_PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: expected one of {', '.join(TRT_PRECISIONS)}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise InputError(f"--hardware-compatibility {self.hardware_compatibility!r}: expected one of "
                             f"{', '.join(HARDWARE_COMPATIBILITY)}")
        if self.workspace_gb is not None and not (math.isfinite(self.workspace_gb) and self.workspace_gb > 0):
            raise InputError(f"--workspace {self.workspace_gb}: expected a size in GiB > 0")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {self.max_new_tokens!r}: expected an integer >= 1")
        if self.calib is not None and self.precision not in ("int8", "best"):
            raise InputError(f"--calib: only int8 and best use calibration (--precision is {self.precision})")
        self.overrides()  # a malformed --profile is refused here, before any work

    @property
    def workspace_mib(self) -> int | None:
        return None if self.workspace_gb is None else max(1, round(self.workspace_gb * 1024))

    def overrides(self) -> dict[str, list[InputProfile]]:
        """``--profile`` texts parsed, by part."""
        by_part: dict[str, list[InputProfile]] = {}
        for text in self.profiles:
            part, profile = parse_profile_override(text)
            by_part.setdefault(part, []).append(profile)
        return by_part


@dataclass(frozen=True)
class BuildPlan:
    """How one part's engine is built: rendered as polygraphy loaders (``build_engine``) and as a
    ``trtexec`` command line (``trtexec_args``), so the engine and its recipe come from one record.

    ``computes`` is what the engine computes in (the part's manifest precision: fp32, fp16 or int8);
    ``fp32_layers`` the layers (named after ONNX nodes, with their output counts) pinned to fp32.
    """

    part: str
    onnx: str
    engine: str
    precision: str
    computes: str
    profile: PartProfile
    strongly_typed: bool = False
    fp16: bool = False
    int8: bool = False
    fp32_layers: tuple[tuple[str, int], ...] = ()
    workspace_mib: int | None = None
    timing_cache: str | None = None
    hardware_compatibility: str = "none"

    @property
    def recipe(self) -> str:
        return f"{self.part}{RECIPE_SUFFIX}"

    def builder_flags(self) -> tuple[str, ...]:
        """TensorRT's names for what is set: the network flag, then the builder flags (TF32 cleared)."""
        flags = ["NetworkDefinitionCreationFlag.STRONGLY_TYPED"] if self.strongly_typed else []
        flags += [f"BuilderFlag.{name}" for name, on in (("FP16", self.fp16), ("INT8", self.int8),
                                                          ("OBEY_PRECISION_CONSTRAINTS", bool(self.fp32_layers))) if on]
        return tuple(flags)

    def trtexec_args(self) -> list[str]:
        """The ``trtexec`` arguments of this build, paths relative to the bundle directory."""
        # polygraphy's defaults, spelled out: TF32 off, detailed layer info; and no timing run after the build.
        args = [f"--onnx={self.onnx}", f"--saveEngine={self.engine}", *self.profile.trtexec_flags(), "--noTF32",
                "--profilingVerbosity=detailed", "--skipInference"]
        if self.strongly_typed:
            args.append("--stronglyTyped")
        if self.fp16:
            args.append("--fp16")
        if self.int8:
            args.append("--int8")
        if self.fp32_layers:
            args += [
                "--precisionConstraints=obey",
                "--layerPrecisions=" + ",".join(f"{name}:fp32" for name, _ in self.fp32_layers),
                "--layerOutputTypes=" + ",".join(f"{name}:{'+'.join(['fp32'] * n)}" for name, n in self.fp32_layers),
            ]
        if self.workspace_mib is not None:
            args.append(f"--memPoolSize=workspace:{self.workspace_mib}M")
        if self.timing_cache is not None:
            args.append(f"--timingCacheFile={self.timing_cache}")
        if self.hardware_compatibility != "none":
            args.append(f"--hardwareCompatibilityLevel={_TRTEXEC_HARDWARE[self.hardware_compatibility]}")
        return args

    def recipe_text(self) -> str:
        """``<part>.trtexec.sh``: run from anywhere; ``TRTEXEC`` names the binary (JetPack: /usr/src/tensorrt/bin/trtexec)."""
        lines = " \\\n    ".join(shlex.quote(arg) for arg in self.trtexec_args())
        return (
            "#!/usr/bin/env bash\n"
            f"# {self.part}: TensorRT engine, precision {self.precision} (computes {self.computes}).\n"
            "# Written by 'conceptseg-edge export tensorrt' from the same plan as the engine it records.\n"
            "set -euo pipefail\n"
            'cd "$(dirname "$0")"\n'
            f'"${{TRTEXEC:-trtexec}}" \\\n    {lines}\n'
        )


def build_script(plans: Iterable[BuildPlan]) -> str:
    """``build_engines.sh``: every recipe in turn; stops at the first that fails."""
    runs = "".join(f"bash {shlex.quote(plan.recipe)}\n" for plan in plans)
    return ("#!/usr/bin/env bash\n"
            "# Builds every engine of this bundle with trtexec (TRTEXEC overrides the binary).\n"
            'set -euo pipefail\ncd "$(dirname "$0")"\n' + runs)


def _check_topk_patches(ranges: Mapping[str, DimRange]) -> None:
    """The policy's vision graph sorts its patches with TopK (K = the patch count), and TensorRT's parser
    takes K < ``TOPK_K_LIMIT`` only: a processor allowing more patches cannot have a TensorRT vision engine.

    Raises:
        ExportError: the bundle's patch range reaches the limit (naming it and the fix).
    """
    from conceptseg_edge.export.trt_check import TOPK_K_LIMIT

    patches = ranges.get("num_patches")
    if patches is not None and patches.max >= TOPK_K_LIMIT:
        raise ExportError(
            f"num_patches: the policy processor allows {patches.max} patches per image, but policy_vision's "
            f"TopK over them needs K < {TOPK_K_LIMIT} in TensorRT; lower the processor's max_pixels "
            f"(longest_edge) below {TOPK_K_LIMIT} x patch_size**2"
        )


def plan_bundle(bundle_dir: str | Path, manifest: BundleManifest, cfg: TrtBuildConfig) -> dict[str, BuildPlan]:
    """The ``BuildPlan`` of every part, or the refusal of the first part that cannot be built.

    Raises:
        InputError: a ``--profile`` names a part the bundle lacks or an input its part lacks; int8/best
            asked of a bundle that never went through ``export qdq``.
        ExportError: TensorRT's ONNX parser documents a node of a part as unsupported, or a pinned layer
            name cannot be written in a trtexec recipe.
    """
    bundle_dir = Path(bundle_dir)
    models = check_buildable(bundle_dir, manifest, cfg)
    ranges = bundle_ranges(bundle_dir, cfg.max_new_tokens)
    _check_topk_patches(ranges)
    qdq = {name: any(node.op_type in _QDQ_OPS for node in model.graph.node) for name, model in models.items()}
    if cfg.precision in ("int8", "best") and not any(qdq.values()) and not _has_qdq_record(manifest):
        raise InputError(
            f"--precision {cfg.precision}: {bundle_dir} has no Q/DQ graph and no 'export qdq' record; TensorRT 10 "
            "builds INT8 from explicit quantization only: run 'conceptseg-edge export qdq' first, or pass --calib DIR|world:N"
        )
    overrides = cfg.overrides()
    return {
        name: _plan_part(part, models[name], qdq[name], derive_profile(name, part.inputs, ranges, overrides.get(name, ())), cfg)
        for name, part in manifest.parts.items()
    }


def check_buildable(bundle_dir: Path, manifest: BundleManifest, cfg: TrtBuildConfig) -> dict[str, Any]:
    """Every part's graph (``onnx.ModelProto`` by part), once ``--profile`` names only the bundle's parts and
    TensorRT's ONNX parser can take every graph (``export/trt_check.py``).

    Raises:
        InputError: a ``--profile`` for a part the bundle lacks, naming the bundle's parts.
        ExportError: the first part with parser violations, listing them and the fix.
    """
    import onnx

    from conceptseg_edge.export.trt_check import check_tensorrt_parse

    unknown = sorted(set(cfg.overrides()) - set(manifest.parts))
    if unknown:
        raise InputError(f"--profile {unknown[0]}: the bundle has no part {unknown[0]!r} (parts: {', '.join(manifest.parts)})")
    models = {name: onnx.load(str(bundle_dir / part.file), load_external_data=False) for name, part in manifest.parts.items()}
    for name, model in models.items():
        violations = check_tensorrt_parse(model)
        if violations:
            shown = "; ".join(str(v) for v in violations[:3]) + (f"; and {len(violations) - 3} more" if len(violations) > 3 else "")
            raise ExportError(
                f"{name}: TensorRT's ONNX parser cannot take this graph ({len(violations)} violation(s): {shown}). "
                "An engine bundle builds every part: re-export the bundle with TensorRT-parseable graphs "
                "('export concept --policy-precision fp32', then 'export qdq' for INT8), or export a prompt-only "
                "bundle with 'export sam2'"
            )
    return models


def _plan_part(part: PartManifest, model, has_qdq: bool, profile: PartProfile, cfg: TrtBuildConfig) -> BuildPlan:
    int8 = has_qdq and cfg.precision in ("int8", "best")
    fp16 = cfg.precision in ("fp16", "best")
    strongly_typed = int8 and cfg.precision == "int8"
    return BuildPlan(
        part=part.name,
        onnx=part.file,
        engine=f"{part.name}{ENGINE_SUFFIX}",
        precision=cfg.precision,
        computes="int8" if int8 else "fp16" if fp16 else "fp32",
        profile=profile,
        strongly_typed=strongly_typed,
        fp16=fp16,
        int8=int8 and not strongly_typed,
        fp32_layers=fp32_layers(model, part.name) if fp16 else (),
        workspace_mib=cfg.workspace_mib,
        timing_cache=str(Path(cfg.timing_cache).resolve()) if cfg.timing_cache else None,
        hardware_compatibility=cfg.hardware_compatibility,
    )


def fp32_layers(model, part: str) -> tuple[tuple[str, int], ...]:
    """The ``FP32_OPS`` nodes of ``model`` that compute on float tensors, as (name, output count).

    Nodes whose inputs are all constants are left out (the parser folds them: no layer carries their
    name), and so are nodes whose outputs are not float (shape arithmetic).

    Raises:
        ExportError: such a node is unnamed, or its name holds ``,`` or ``:`` (trtexec's separators).
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    pinned = []
    for node in model.graph.node:
        if node.op_type not in FP32_OPS or all(not name or name in constants for name in node.input):
            continue
        outputs = [out for out in node.output if out]
        if not all(types.get(out) in floats for out in outputs):
            continue
        if not node.name or any(c in node.name for c in ",:"):
            raise ExportError(f"{part}: {node.op_type} node {node.name!r} producing {outputs[0]!r} cannot be pinned to "
                              "fp32 by name (unnamed, or ',' / ':' in its name); build this part with --precision fp32")
        pinned.append((node.name, len(outputs)))
    return tuple(pinned)


def build_engine_bundle(src_bundle: str | Path, out_dir: str | Path, cfg: TrtBuildConfig, progress: bool = True) -> BundleManifest:
    """Build ``out_dir``, the engine bundle of ``src_bundle`` (or, ``recipes_only``, its recipe bundle).

    Returns the manifest as written (re-read and re-hashed). Nothing is left at ``out_dir`` on failure.

    Raises:
        EngineUnavailableError: TensorRT is not importable and ``recipes_only`` is off (before anything is read).
        InputError, ExportError: see ``plan_bundle``; InputError also for --calib on a bundle that went through
            ``export qdq`` already; ExportError also when TensorRT fails to build a part.
    """
    if not cfg.recipes_only:
        from conceptseg_edge.runtime.trt_engine import import_tensorrt

        import_tensorrt()
    src_bundle = Path(src_bundle)
    manifest = load_bundle(src_bundle)
    with tempfile.TemporaryDirectory(prefix="conceptseg-qdq-") as scratch:
        if cfg.calib is not None:
            if _has_qdq_record(manifest):
                raise InputError(f"--calib: {src_bundle} already went through 'export qdq' (its parts record the Q/DQ "
                                 "measurement); build it without --calib")
            from conceptseg_edge.export.qdq import QdqConfig, export_qdq

            check_buildable(src_bundle, manifest, cfg)  # refuse before calibrating, not after
            quantized = Path(scratch) / "qdq"
            manifest = export_qdq(src_bundle, quantized, QdqConfig(calibration=cfg.calib), progress=progress)
            src_bundle = quantized
        plans = plan_bundle(src_bundle, manifest, cfg)
        return _write_bundle(src_bundle, manifest, plans, Path(out_dir), cfg.recipes_only, progress)


def _has_qdq_record(manifest: BundleManifest) -> bool:
    return any(part.qdq is not None for part in manifest.parts.values())


def _write_bundle(src: Path, manifest: BundleManifest, plans: Mapping[str, BuildPlan], out: Path, recipes_only: bool,
                  progress: bool) -> BundleManifest:
    """Copy the graphs and processor files, write the recipes, build every engine, write the manifest."""
    machine = None
    if not recipes_only:
        from conceptseg_edge.runtime.trt_engine import trt_machine

        machine = trt_machine()
    with staged_dir(out, MANIFEST_NAME, "bundle") as staging:
        copied = [part.file for part in manifest.parts.values()] + list(manifest.files)
        for rel in copied:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, staging / rel)
        for plan in plans.values():
            write_text(staging / plan.recipe, plan.recipe_text())
        write_text(staging / BUILD_SCRIPT, build_script(plans.values()))
        scripts = [plan.recipe for plan in plans.values()] + [BUILD_SCRIPT]
        for rel in scripts:
            (staging / rel).chmod(0o755)
        hashed = {rel: sha256_file(staging / rel) for rel in [*copied, *scripts]}
        if recipes_only:
            files = {rel: sha256 for rel, sha256 in hashed.items() if rel not in {p.file for p in manifest.parts.values()}}
            written = dataclasses.replace(manifest, files=files)
        else:
            parts = {}
            with tqdm(total=len(plans), desc="export tensorrt", disable=not progress, unit="engine") as bar:
                for name, plan in plans.items():
                    bar.set_postfix_str(f"{name} ({plan.computes})")
                    build_engine(plan, staging)
                    parts[name] = _engine_part(manifest.parts[name], plan, staging, machine, hashed[plan.onnx])
                    bar.update()
            written = dataclasses.replace(manifest, parts=parts, files=hashed, route_parity={})
        write_manifest(staging, dataclasses.replace(written, versions={**manifest.versions, **tool_versions()}))
    return load_bundle(out)


def _engine_part(part: PartManifest, plan: BuildPlan, staging: Path, machine, onnx_sha256: str) -> PartManifest:
    """The part as an engine: its plan file and hash, what it computes in, and how it was built.

    ``parity`` (the ONNX graph against torch) is dropped: it was not measured on this engine.
    """
    info = EngineInfo(
        tensorrt_version=machine.tensorrt_version,
        gpu_name=machine.gpu_name,
        compute_capability=machine.compute_capability,
        precision=plan.precision,
        profile=plan.profile,
        builder_flags=plan.builder_flags(),
        hardware_compatibility=plan.hardware_compatibility,
        onnx_sha256=onnx_sha256,
        recipe=plan.recipe,
        workspace_gb=None if plan.workspace_mib is None else plan.workspace_mib / 1024,
    )
    return dataclasses.replace(part, file=plan.engine, sha256=sha256_file(staging / plan.engine), format="tensorrt",
                               precision=plan.computes, parity=None, quantized_parity=None, engine=info)


def build_engine(plan: BuildPlan, bundle_dir: Path) -> None:
    """Build ``plan`` with polygraphy's TensorRT backend: ``bundle_dir/plan.onnx`` → ``bundle_dir/plan.engine``.

    polygraphy and TensorRT log to stdout; their warnings go to stderr here, so stdout stays the
    command's JSON.

    Raises:
        ExportError: TensorRT refused the graph or the build (polygraphy's message attached).
    """
    with contextlib.redirect_stdout(sys.stderr):
        from polygraphy.logger import G_LOGGER

        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            engine = _engine_bytes(plan, bundle_dir)
    with atomic_path(bundle_dir / plan.engine) as tmp:
        tmp.write_bytes(engine)


def _engine_bytes(plan: BuildPlan, bundle_dir: Path) -> bytes:
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessNetwork, Profile
    from polygraphy.exception import PolygraphyException

    profile = Profile()
    for p in plan.profile.inputs:
        profile.add(p.name, p.min, p.opt, p.max)
    network = NetworkFromOnnxPath(str(bundle_dir / plan.onnx), strongly_typed=plan.strongly_typed)
    if plan.fp32_layers:
        network = PostprocessNetwork(network, lambda network: _pin_fp32(network, plan, trt), name="pin fp32 layers")
    config = CreateConfig(
        fp16=plan.fp16,
        int8=plan.int8,
        profiles=[profile] if plan.profile.inputs else None,
        precision_constraints="obey" if plan.fp32_layers else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace_mib << 20} if plan.workspace_mib else None,
        load_timing_cache=plan.timing_cache,
        hardware_compatibility_level=(getattr(trt.HardwareCompatibilityLevel, _TRT_HARDWARE[plan.hardware_compatibility])
                                      if plan.hardware_compatibility != "none" else None),
    )
    try:
        return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=plan.timing_cache)())
    except PolygraphyException as exc:
        raise ExportError(f"{plan.part}: TensorRT could not build the engine ({exc}); recipe: {plan.recipe}") from exc


def _pin_fp32(network, plan: BuildPlan, trt) -> None:
    """Set fp32 precision and output types on the plan's ``fp32_layers`` (trtexec: --layerPrecisions)."""
    wanted = dict(plan.fp32_layers)
    found = set()
    for layer in network:
        if layer.name in wanted:
            found.add(layer.name)
            layer.precision = trt.float32
            for index in range(layer.num_outputs):
                layer.set_output_type(index, trt.float32)
    missing = sorted(set(wanted) - found)
    if missing:
        warnings.warn(f"{plan.part}: {len(missing)} of {len(wanted)} fp32-pinned nodes have no layer of that name in the "
                      f"parsed network (folded by the parser?), e.g. {missing[0]!r}", RuntimeWarning, stacklevel=2)
