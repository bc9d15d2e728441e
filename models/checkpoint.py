"""The training-side checkpoint: one directory with policy + CTM weights, processor, and all settings.

Layout (safetensors and JSON only, never pickle)::

    config.json           format, num_of_query, ctm (CTMConfig), policy (the Qwen2.5-VL config dict),
                          router (RouterConfig), backbone (BackboneSpec), files (sha256 of every other file)
    model.safetensors     policy weights under transformers' names (``model.language_model.*``,
                          ``model.visual.*``, ``lm_head.*``) and CTM weights under the official prefixes
                          (``learnable_query.*``, ``connector.*``, ``proj_to_sam.*``), in one file
    tokenizer.json, tokenizer_config.json, processor_config.json, chat_template.jinja
                          the processor, as ``ConceptSegProcessor.save_pretrained`` writes it

``save_checkpoint`` builds the directory beside its destination and renames it into place, so a
reader never sees a half-written checkpoint. ``load_checkpoint`` checks every hash and the exact key
sets before building anything, and every failure is a ``CheckpointError`` naming the file or field.

Tied weights (Qwen2.5-VL-3B ties ``lm_head`` to the input embeddings) are stored once, as
transformers does; loading re-ties them.

``load_checkpoint`` also reads a ConceptSeg-R1 / Qwen2.5-VL directory as released::

    config.json                        the Hugging Face Qwen2.5-VL config (model_type qwen2_5_vl)
    model.safetensors.index.json       weight_map: tensor → shard (absent for a one-file release)
    model-0000i-of-0000n.safetensors   policy weights under the release names (``model.layers.*``,
                                       ``model.embed_tokens.*``, ``visual.*``, ``lm_head.*``; today's
                                       transformers names are accepted too) and the CTM's official names
    processor / tokenizer files

Its CTM config is inferred from the weight shapes (``CTMConfig.from_shapes``; the head count is an
argument), the router is ``RouterConfig()``, and the backbone is whatever the caller passes (the
release's is SAM 3, which this toolkit cannot run), else None. Shards are memory-mapped and read
tensor by tensor straight into a model built in the stored dtype, so a bf16 release never has an
fp32 copy. ``save_checkpoint(..., max_shard_size=...)`` writes this layout, adding a
``conceptseg_edge`` section to config.json (CTM config, router, backbone, file hashes) that
transformers ignores and ``load_checkpoint`` reads back, so the round trip is exact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights

from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.fileio import sha256_file, verify_hashes, write_json
from conceptseg_edge.models.ctm import CTM_PREFIXES, ConceptTranslationModule, CTMConfig, split_ctm_state_dict
from conceptseg_edge.models.policy import ConceptSegProcessor, load_processor
from conceptseg_edge.models.shards import ShardSet, TensorInfo, read_shards, write_shards
from conceptseg_edge.router import RouterConfig

CHECKPOINT_FORMAT = "conceptseg-edge-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CONFIG_KEYS = frozenset(
    {"format", "format_version", "num_of_query", "ctm", "policy", "router", "backbone", "files"}
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHANGED = "the file changed after saving; re-save the checkpoint"
#: config.json key holding our settings in the sharded (release) layout.
SECTION = "conceptseg_edge"
_SECTION_KEYS = frozenset({"format", "format_version", "ctm", "router", "backbone", "files"})
#: Release (transformers < 4.52) text-model names: ``model.*`` without today's ``language_model``.
_RELEASE_TEXT = re.compile(r"^model\.(?!language_model\.|visual\.)")


@dataclass(frozen=True)
class BackboneSpec:
    """Which SAM2 the CTM's prompt tokens were trained against; the weights live outside the checkpoint."""

    config: str = field(metadata={"help": "SAM2 config name, e.g. sam2.1_hiera_t, or a custom config path"})
    checkpoint: str | None = field(default=None, metadata={"help": "path of the SAM2 weights"})
    sha256: str | None = field(default=None, metadata={"help": "sha256 of the SAM2 weights file"})
    image_size: int = field(default=1024, metadata={"help": "SAM2 input resolution the CTM was trained at"})

    def __post_init__(self) -> None:
        if not isinstance(self.config, str) or not self.config:
            raise InputError(f"BackboneSpec.config: expected a non-empty string, got {self.config!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise InputError(f"BackboneSpec.checkpoint: expected a string or null, got {self.checkpoint!r}")
        if self.sha256 is not None and not (isinstance(self.sha256, str) and _SHA256.fullmatch(self.sha256)):
            raise InputError(f"BackboneSpec.sha256: expected 64 lowercase hex digits, got {self.sha256!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"BackboneSpec: unknown keys {unknown}; expected a subset of {sorted(known)}")
        if "config" not in data:
            raise InputError("BackboneSpec.config: missing")
        return cls(**data)


@dataclass
class ConceptCheckpoint:
    """Everything a loaded checkpoint holds; models are in eval mode on the requested device."""

    policy: Qwen2_5_VLForConditionalGeneration
    ctm: ConceptTranslationModule
    processor: ConceptSegProcessor
    router: RouterConfig
    backbone: BackboneSpec | None  # None: a release loaded without naming the SAM2 to pair it with
    path: Path

    def sam2_backbone(self) -> BackboneSpec:
        """The SAM2 the CTM was trained against; a release (trained for SAM 3) has none: its CTM's
        tokens live in SAM 3's prompt space, so pairing it with a SAM2 would give meaningless masks."""
        if self.backbone is None:
            raise CheckpointError(
                f"{self.path}: was not trained for a SAM2 backbone (a release's CTM prompts SAM 3); retarget it "
                f"with `conceptseg-edge train stage1 --config CONFIG --init-from {self.path} --backbone "
                "sam2.1_hiera_t` (or _s, _b+, _l) and use that checkpoint, or export it as released with SAM 3: "
                f"`conceptseg-edge export concept {self.path} --backbone sam3 --backbone-checkpoint sam3.pt --out BUNDLE`"
            )
        return self.backbone


def save_checkpoint(
    path: str | os.PathLike[str],
    policy: Qwen2_5_VLForConditionalGeneration,
    ctm: ConceptTranslationModule,
    processor: ConceptSegProcessor,
    router: RouterConfig,
    backbone: BackboneSpec | None,
    *,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns the path.

    An existing ``path`` is an error unless ``overwrite``; then the old directory is swapped out only
    after the new one is complete. ``max_shard_size`` (bytes, or e.g. ``"5GB"``) writes the release
    layout (HF config.json, numbered shards + index, release tensor names) instead of our one-file
    layout; only that layout may leave ``backbone`` None.
    """
    path = Path(path)
    hidden = policy.config.text_config.hidden_size
    if ctm.config.hidden_size != hidden:
        raise InputError(f"ctm.config.hidden_size: {ctm.config.hidden_size} != policy hidden size {hidden}")
    if backbone is None and max_shard_size is None:
        raise InputError("backbone: required for the one-file layout (None is allowed with max_shard_size)")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_dir(path, "tmp")
    try:
        processor.save_pretrained(tmp)
        weights = _dedup_tied(policy.state_dict())
        weights.update(ctm.state_dict())
        if max_shard_size is not None:
            _write_release(tmp, weights, policy, ctm, router, backbone, max_shard_size)
            _swap_into_place(tmp, path)
            return path
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            tmp / WEIGHTS_NAME,
            metadata={"format": "pt"},
        )
        config = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "num_of_query": ctm.config.num_queries,
            "ctm": ctm.config.to_dict(),
            "policy": policy.config.to_dict(),
            "router": router.to_dict(),
            "backbone": backbone.to_dict(),  # type: ignore[union-attr]  # checked above
            "files": {name: sha256_file(tmp / name) for name in sorted(_relative_files(tmp))},
        }
        write_json(tmp / CONFIG_NAME, config)
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    backbone: BackboneSpec | None = None,
    ctm_num_heads: int = 16,
) -> ConceptCheckpoint:
    """Load and verify a checkpoint directory: ours, or a ConceptSeg-R1 / Qwen2.5-VL release.

    ``dtype`` casts policy and CTM (default: our one-file layout loads the policy as saved and the
    CTM in float32; the release layout builds the policy in config.json's dtype and the CTM in the
    dtype its tensors are stored in, casting tensor by tensor). ``backbone``, when given, replaces
    the recorded one (a release records none). ``ctm_num_heads`` applies only where the CTM config
    is inferred from the shapes, a release without our ``conceptseg_edge`` section.
    """
    path = Path(path)
    raw = _read_checkpoint_config(path)
    if "format" not in raw:
        return _load_release(path, raw, device, dtype, backbone, ctm_num_heads)
    config = _check_config(path, raw)
    verify_hashes(path, config["files"], CONFIG_NAME, CheckpointError, _CHANGED)
    ctm_cfg, policy_cfg, router, saved_backbone = _parse_config(path, config)

    try:
        weights = load_file(path / WEIGHTS_NAME)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path / WEIGHTS_NAME}: unreadable safetensors: {exc}") from exc
    ctm_weights, policy_weights = split_ctm_state_dict(weights)

    ctm = ConceptTranslationModule(ctm_cfg)
    _load_strict(ctm, ctm_weights, f"{path / WEIGHTS_NAME} (CTM)")
    with no_init_weights():  # every parameter is overwritten below; skip the random init
        policy = AutoModelForImageTextToText.from_config(policy_cfg, **({"dtype": dtype} if dtype else {}))
    policy.tie_weights()  # no_init_weights skips the tying that init would do
    _load_strict(policy, policy_weights, f"{path / WEIGHTS_NAME} (policy)")

    processor = load_processor(path)
    if dtype is not None:
        ctm = ctm.to(dtype)
    return ConceptCheckpoint(
        policy=policy.to(device).eval(),
        ctm=ctm.to(device).eval(),
        processor=processor,
        router=router,
        backbone=backbone or saved_backbone,
        path=path,
    )


def _read_checkpoint_config(path: Path) -> dict[str, Any]:
    """config.json of our layout (has 'format') or of a Qwen2.5-VL release; anything else is refused."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    raw = _read_json(path / CONFIG_NAME)
    if "format" not in raw and raw.get("model_type") != Qwen2_5_VLConfig.model_type:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: neither a {CHECKPOINT_FORMAT!r} config (no 'format') nor a "
            f"{Qwen2_5_VLConfig.model_type!r} release config (model_type {raw.get('model_type')!r})"
        )
    return raw


def _read_json(config_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{config_path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return config


def _check_config(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    missing, unknown = sorted(_CONFIG_KEYS - set(config)), sorted(set(config) - _CONFIG_KEYS)
    if missing or unknown:
        raise CheckpointError(f"{config_path}: missing keys {missing}, unknown keys {unknown}")
    if config["format"] != CHECKPOINT_FORMAT or config["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format {config['format']!r} v{config['format_version']!r}, "
            f"expected {CHECKPOINT_FORMAT!r} v{CHECKPOINT_FORMAT_VERSION}"
        )
    files = config["files"]
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise CheckpointError(f"{config_path}: files must map names to sha256 and list {WEIGHTS_NAME}")
    return config


def _parse_config(
    path: Path, config: dict[str, Any]
) -> tuple[CTMConfig, Qwen2_5_VLConfig, RouterConfig, BackboneSpec]:
    where = path / CONFIG_NAME
    ctm_cfg, router, backbone = _parse_settings(where, config)
    if backbone is None:
        raise CheckpointError(f"{where}: backbone: missing")
    policy_dict = config["policy"]
    if not isinstance(policy_dict, dict) or policy_dict.get("model_type") != Qwen2_5_VLConfig.model_type:
        raise CheckpointError(f"{where}: policy: expected a {Qwen2_5_VLConfig.model_type!r} config")
    try:
        policy_cfg = Qwen2_5_VLConfig.from_dict(policy_dict)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: policy: {exc}") from exc
    if config["num_of_query"] != ctm_cfg.num_queries:
        raise CheckpointError(
            f"{where}: num_of_query {config['num_of_query']!r} != ctm.num_queries {ctm_cfg.num_queries}"
        )
    hidden = policy_cfg.text_config.hidden_size
    if ctm_cfg.hidden_size != hidden:
        raise CheckpointError(f"{where}: ctm.hidden_size {ctm_cfg.hidden_size} != policy hidden size {hidden}")
    return ctm_cfg, policy_cfg, router, backbone


def _parse_settings(where: Path, config: dict[str, Any]) -> tuple[CTMConfig, RouterConfig, BackboneSpec | None]:
    """The CTM config, router and backbone both layouts record (the release layout in its section)."""
    try:
        ctm_cfg = CTMConfig.from_dict(config["ctm"])
        backbone = None if config["backbone"] is None else BackboneSpec.from_dict(config["backbone"])
    except (InputError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    try:
        router = RouterConfig.from_dict(config["router"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: router: {exc}") from exc
    return ctm_cfg, router, backbone


def _write_release(
    root: Path,
    weights: dict[str, torch.Tensor],
    policy: Qwen2_5_VLForConditionalGeneration,
    ctm: ConceptTranslationModule,
    router: RouterConfig,
    backbone: BackboneSpec | None,
    max_shard_size: int | str,
) -> None:
    """Shards under the release names, the HF config with our section, and hashes of every file."""
    write_shards(root, {_to_release_name(k): v for k, v in weights.items()}, max_shard_size)
    config = policy.config.to_dict()
    config["dtype"] = str(next(policy.parameters()).dtype).removeprefix("torch.")
    config["num_of_query"] = ctm.config.num_queries
    config[SECTION] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "ctm": ctm.config.to_dict(),
        "router": router.to_dict(),
        "backbone": None if backbone is None else backbone.to_dict(),
        "files": {name: sha256_file(root / name) for name in sorted(_relative_files(root))},
    }
    write_json(root / CONFIG_NAME, config)


def _load_release(
    path: Path,
    raw: dict[str, Any],
    device: str | torch.device,
    dtype: torch.dtype | None,
    backbone: BackboneSpec | None,
    ctm_num_heads: int,
) -> ConceptCheckpoint:
    """Check shards, names and shapes from the headers, build in the stored dtype, then stream tensors in."""
    where = path / CONFIG_NAME
    policy_cfg, settings, processor, shards, info = _open_release(path, raw)
    ctm_cfg, router, saved_backbone = settings or (None, RouterConfig(), None)
    ctm_info = {k: v for k, v in info.items() if k.startswith(CTM_PREFIXES)}
    if ctm_cfg is None:
        try:
            ctm_cfg = CTMConfig.from_shapes({k: v.shape for k, v in ctm_info.items()}, num_heads=ctm_num_heads)
        except InputError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    if raw.get("num_of_query", ctm_cfg.num_queries) != ctm_cfg.num_queries:
        raise CheckpointError(f"{where}: num_of_query {raw['num_of_query']!r} != {ctm_cfg.num_queries} CTM queries")
    hidden = policy_cfg.text_config.hidden_size
    if ctm_cfg.hidden_size != hidden:
        raise CheckpointError(f"{path}: CTM hidden size {ctm_cfg.hidden_size} != policy hidden size {hidden}")

    policy_dtype = dtype or _stored_dtype(where, policy_cfg.dtype, info, "model.language_model.norm.weight")
    ctm_dtype = dtype or (info["learnable_query.weight"].dtype if "learnable_query.weight" in info else policy_dtype)
    with no_init_weights():  # every parameter is overwritten below; skip the random init
        policy = AutoModelForImageTextToText.from_config(policy_cfg, dtype=policy_dtype)
    policy.tie_weights()  # no_init_weights skips the tying that init would do
    with torch.device("meta"):  # no fp32 CTM first: allocate once, in the stored dtype
        ctm = ConceptTranslationModule(ctm_cfg)
    ctm = ctm.to(ctm_dtype).to_empty(device="cpu")

    targets = {**policy.state_dict(), **ctm.state_dict()}
    aliases = _tied_aliases(policy.state_dict())
    missing = sorted(k for k in targets.keys() - info.keys() if aliases.get(k) not in info)
    unexpected = sorted(info[k].name for k in info.keys() - targets.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: missing tensors {_abbrev(missing)} (transformers' names), "
            f"unexpected tensors {_abbrev(unexpected)} (as stored)"
        )
    for name, meta in info.items():
        if tuple(targets[name].shape) != meta.shape:
            raise CheckpointError(
                f"{path / meta.shard}: {meta.name}: shape {list(meta.shape)}, model expects {list(targets[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in shards.tensors():
            targets[_from_release_name(name)].copy_(tensor)

    return ConceptCheckpoint(
        policy=policy.to(device).eval(),
        ctm=ctm.to(device).eval(),
        processor=processor,
        router=router,
        backbone=backbone or saved_backbone,
        path=path,
    )


def _open_release(
    path: Path, raw: dict[str, Any]
) -> tuple[Qwen2_5_VLConfig, tuple[CTMConfig, RouterConfig, BackboneSpec | None] | None, ConceptSegProcessor, ShardSet,
           dict[str, TensorInfo]]:
    """A release directory's policy config, our section's settings (None without it), processor and
    checked shard table (transformers names); no weight is read."""
    where = path / CONFIG_NAME
    section = raw.pop(SECTION, None)
    settings = None
    if section is not None:
        if not isinstance(section, dict) or set(section) != _SECTION_KEYS:
            raise CheckpointError(f"{where}: {SECTION}: expected an object with keys {sorted(_SECTION_KEYS)}")
        verify_hashes(path, section["files"], CONFIG_NAME, CheckpointError, _CHANGED)
        settings = _parse_settings(where, section)
    try:
        policy_cfg = Qwen2_5_VLConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    processor = load_processor(path)  # before any weight is read: a broken processor fails fast
    shards = read_shards(path)
    return policy_cfg, settings, processor, shards, _model_names(shards)


def policy_source(
    path: Path,
) -> tuple[Qwen2_5_VLConfig, ConceptSegProcessor, ShardSet, dict[str, TensorInfo]]:
    """What a loader needs to read the policy tensor by tensor, from either layout: its config, its
    processor, the checked shards and their tensors under transformers' names (CTM ones included).
    Hashes (our layout, or a release with our section) are verified first; no weight is read."""
    path = Path(path)
    raw = _read_checkpoint_config(path)
    if "format" not in raw:
        policy_cfg, _, processor, shards, info = _open_release(path, raw)
        return policy_cfg, processor, shards, info
    config = _check_config(path, raw)
    verify_hashes(path, config["files"], CONFIG_NAME, CheckpointError, _CHANGED)
    _, policy_cfg, _, _ = _parse_config(path, config)
    shards = read_shards(path)
    return policy_cfg, load_processor(path), shards, _model_names(shards)


def _model_names(shards: ShardSet) -> dict[str, TensorInfo]:
    """The shard table under today's transformers names; two stored names for one tensor are refused."""
    info: dict[str, TensorInfo] = {}
    for name, meta in shards.tensors_info.items():
        target = _from_release_name(name)
        if target in info:
            raise CheckpointError(f"{shards.root}: {target} is stored twice (release and current names)")
        info[target] = meta
    return info


def _stored_dtype(
    where: Path, declared: torch.dtype | str | None, info: dict[str, TensorInfo], probe: str
) -> torch.dtype:
    """The config's dtype (``torch_dtype`` in a release), else the dtype a policy tensor is stored in."""
    if isinstance(declared, torch.dtype):
        return declared
    if isinstance(declared, str) and isinstance(getattr(torch, declared, None), torch.dtype):
        return getattr(torch, declared)
    if probe not in info:
        raise CheckpointError(f"{where}: no dtype (torch_dtype) and no {probe} tensor to read it from")
    return info[probe].dtype


def _from_release_name(key: str) -> str:
    """Release names (``visual.*``, ``model.layers.*``) → this transformers' (``model.visual.*``, ...)."""
    if key.startswith("visual."):
        return f"model.{key}"
    return _RELEASE_TEXT.sub("model.language_model.", key, count=1)


def _to_release_name(key: str) -> str:
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    return key


def _load_strict(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` that names missing/unexpected keys; a tied alias may be absent."""
    aliases = _tied_aliases(module.state_dict())
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise CheckpointError(f"{where}: {exc}") from exc
    missing = sorted(k for k in result.missing_keys if aliases.get(k) not in weights)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where}: missing keys {_abbrev(missing)}, unexpected keys {_abbrev(sorted(result.unexpected_keys))}"
        )


def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each key whose tensor is the same memory as an earlier key's to that key."""
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied aliases: safetensors refuses shared storage, and loading re-ties them."""
    aliases = _tied_aliases(state)
    return {k: v for k, v in state.items() if k not in aliases}


def _abbrev(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def _relative_files(root: Path) -> Iterator[str]:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            yield (Path(dirpath) / name).relative_to(root).as_posix()


def _sibling_dir(path: Path, tag: str) -> Path:
    """A fresh hidden directory beside ``path`` (same filesystem, so renames are atomic).

    Made with ``mkdir`` rather than ``mkdtemp`` so the checkpoint gets the usual umask permissions,
    not mkdtemp's 0700.
    """
    sibling = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.{tag}"
    sibling.mkdir()
    return sibling


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = _sibling_dir(path, "old")
    os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old / path.name, path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
