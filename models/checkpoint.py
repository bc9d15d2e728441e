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
from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig, split_ctm_state_dict
from conceptseg_edge.models.policy import ConceptSegProcessor, load_processor
from conceptseg_edge.router import RouterConfig

CHECKPOINT_FORMAT = "conceptseg-edge-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CONFIG_KEYS = frozenset(
    {"format", "format_version", "num_of_query", "ctm", "policy", "router", "backbone", "files"}
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    backbone: BackboneSpec
    path: Path


def save_checkpoint(
    path: str | os.PathLike[str],
    policy: Qwen2_5_VLForConditionalGeneration,
    ctm: ConceptTranslationModule,
    processor: ConceptSegProcessor,
    router: RouterConfig,
    backbone: BackboneSpec,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns the path.

    An existing ``path`` is an error unless ``overwrite``; then the old directory is swapped out only
    after the new one is complete.
    """
    path = Path(path)
    hidden = policy.config.text_config.hidden_size
    if ctm.config.hidden_size != hidden:
        raise InputError(f"ctm.config.hidden_size: {ctm.config.hidden_size} != policy hidden size {hidden}")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling_dir(path, "tmp")
    try:
        processor.save_pretrained(tmp)
        weights = _dedup_tied(policy.state_dict())
        weights.update(ctm.state_dict())
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
            "backbone": backbone.to_dict(),
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
) -> ConceptCheckpoint:
    """Load and verify a checkpoint directory written by ``save_checkpoint``.

    ``dtype`` casts policy and CTM (default: the policy as saved, the CTM in float32).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    config = _read_config(path)
    verify_hashes(path, config["files"], CONFIG_NAME, CheckpointError, "the file changed after saving; re-save the checkpoint")
    ctm_cfg, policy_cfg, router, backbone = _parse_config(path, config)

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
        backbone=backbone,
        path=path,
    )


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{config_path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
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
    try:
        ctm_cfg = CTMConfig.from_dict(config["ctm"])
        backbone = BackboneSpec.from_dict(config["backbone"])
    except (InputError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    try:
        router = RouterConfig.from_dict(config["router"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: router: {exc}") from exc
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
