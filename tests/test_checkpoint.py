"""Checkpoint directory: exact round trip, atomic writes, no pickle, and typed errors on damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.fileio import sha256_file
from conceptseg_edge.models.checkpoint import (
    BackboneSpec,
    ConceptCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
from conceptseg_edge.models.policy import PolicyWrapper, build_policy, build_processor, tiny_policy_config
from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
from conceptseg_edge.router import RouterConfig

ROUTER = RouterConfig(base_tau=0.15, taus={2: 0.3})
BACKBONE = BackboneSpec("sam2.1_hiera_t", checkpoint="weights/sam2.1_hiera_tiny.pt", sha256="ab" * 32)


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_tiny_tokenizer()
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    policy = build_policy(tiny_policy_config(tokenizer), seed=0)
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=128, num_heads=4)).eval()
    return policy, ctm, processor


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory) -> Path:
    policy, ctm, processor = parts
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "ckpt", policy, ctm, processor, ROUTER, BACKBONE)


@pytest.fixture
def copy(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved checkpoint that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def test_round_trip_is_exact(parts, saved: Path) -> None:
    policy, ctm, processor = parts
    loaded = load_checkpoint(saved)
    assert isinstance(loaded, ConceptCheckpoint)
    assert loaded.router == ROUTER and loaded.backbone == BACKBONE
    assert loaded.ctm.config == ctm.config
    for ref, got in ((policy, loaded.policy), (ctm, loaded.ctm)):
        a, b = ref.state_dict(), got.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    before = PolicyWrapper(policy, processor).generate([image], "red circle", max_new_tokens=8)
    after = PolicyWrapper(loaded.policy, loaded.processor).generate([image], "red circle", max_new_tokens=8)
    assert after.text == before.text
    assert torch.equal(after.token_ids, before.token_ids)
    torch.testing.assert_close(after.hidden_states, before.hidden_states, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.ctm(after.hidden_states[None]), ctm(before.hidden_states[None]), rtol=0, atol=0
        )


def test_file_layout_and_no_pickle(saved: Path) -> None:
    names = sorted(p.name for p in saved.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for file in saved.iterdir():
        head = file.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{file.name} looks like a pickle or a torch zip"
    assert not list(saved.parent.glob(".*")), "temporary directories left behind"

    config = json.loads((saved / "config.json").read_text())
    assert config["num_of_query"] == 8
    assert config["policy"]["model_type"] == "qwen2_5_vl"
    assert config["router"] == ROUTER.to_dict() and config["backbone"] == BACKBONE.to_dict()
    keys = load_file(saved / "model.safetensors").keys()
    assert {"learnable_query.weight", "connector.pos_embed", "proj_to_sam.2.weight"} <= keys
    assert {"lm_head.weight", "model.language_model.norm.weight"} <= keys


def test_tied_embeddings_are_stored_once_and_retied(parts, tmp_path: Path) -> None:
    _, ctm, processor = parts
    policy = build_policy(tiny_policy_config(processor.tokenizer, tie_word_embeddings=True), seed=2)
    path = save_checkpoint(tmp_path / "tied", policy, ctm, processor, ROUTER, BACKBONE)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded = load_checkpoint(path).policy
    assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, policy.lm_head.weight, rtol=0, atol=0)


def test_overwrite_and_failed_save_leave_no_debris(parts, saved: Path, tmp_path: Path) -> None:
    policy, ctm, processor = parts
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(saved, policy, ctm, processor, ROUTER, BACKBONE)
    target = tmp_path / "ckpt"
    save_checkpoint(target, policy, ctm, processor, ROUTER, BACKBONE)
    save_checkpoint(target, policy, ctm, processor, RouterConfig(), BACKBONE, overwrite=True)
    assert load_checkpoint(target).router == RouterConfig()

    class BrokenProcessor:
        def save_pretrained(self, _path: Path) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "never", policy, ctm, BrokenProcessor(), ROUTER, BACKBONE)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    other = ConceptTranslationModule(CTMConfig(hidden_size=64, num_heads=4))
    with pytest.raises(InputError, match="hidden"):
        save_checkpoint(tmp_path / "bad", policy, other, processor, ROUTER, BACKBONE)


def _rewrite_weights(path: Path, edit) -> None:
    """Edit model.safetensors and re-hash it, so only the key check can catch the damage."""
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["files"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config))


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_directory_and_files(copy: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: listed in config.json but missing"):
        load_checkpoint(copy)
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(copy)


def test_tampered_files_fail_their_hash(copy: Path) -> None:
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: sha256"):
        load_checkpoint(copy)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda w: w.pop("connector.blocks.2.attn.kv.weight"), r"\(CTM\): missing keys \[connector.blocks.2.attn.kv"),
        (lambda w: w.pop("model.language_model.norm.weight"), r"\(policy\): missing keys \[model.language_model.norm"),
        (lambda w: w.update({"connector.extra": torch.zeros(1)}), r"\(CTM\).*unexpected keys \[connector.extra"),
        (lambda w: w.update({"model.extra": torch.zeros(1)}), r"\(policy\).*unexpected keys \[model.extra"),
        (lambda w: w.update({"proj_to_sam.2.bias": torch.zeros(3)}), "size mismatch"),
    ],
)
def test_missing_extra_and_misshapen_keys(copy: Path, edit, match: str) -> None:
    _rewrite_weights(copy, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(copy)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update({"extra": 1}), r"unknown keys \['extra'\]"),
        (lambda c: c.pop("router"), r"missing keys \['router'\]"),
        (lambda c: c.update({"format_version": 99}), "format"),
        (lambda c: c.update({"num_of_query": 4}), "num_of_query"),
        (lambda c: c["ctm"].update({"num_heads": 5}), "num_heads"),
        (lambda c: c["ctm"].update({"hidden_size": 64}), "hidden size"),
        (lambda c: c["backbone"].update({"sha256": "xyz"}), "sha256"),
        (lambda c: c["router"].update({"bogus": 1}), "router"),
        (lambda c: c["policy"].update({"model_type": "llama"}), "policy"),
    ],
)
def test_bad_config_is_a_checkpoint_error(copy: Path, edit, match: str) -> None:
    _edit_config(copy, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(copy)


def test_config_that_is_not_json(copy: Path) -> None:
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(copy)
