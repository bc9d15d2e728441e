"""The release layout: HF config.json + sharded safetensors + index, read tensor by tensor in the stored dtype.

The release here is written by the test itself with safetensors and json, the way Qwen2.5-VL and
ConceptSeg-R1 ship (flat text config with ``torch_dtype``, ``model.layers.*`` / ``visual.*`` names,
CTM tensors spread over the same shards), not by ``save_checkpoint``, so the reader is checked
against the format rather than against its own writer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from conceptseg_edge.errors import CheckpointError, InputError
from conceptseg_edge.models.checkpoint import BackboneSpec, load_checkpoint, save_checkpoint
from conceptseg_edge.models.ctm import CTM_PREFIXES, ConceptTranslationModule, CTMConfig
from conceptseg_edge.models.policy import PolicyWrapper, build_policy, build_processor, tiny_policy_config
from conceptseg_edge.models.shards import INDEX_NAME, parse_size
from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
from conceptseg_edge.router import RouterConfig

SHARDS = 3
CTM_CFG = CTMConfig(hidden_size=128, num_heads=4, depth=3)
BACKBONE = BackboneSpec("sam2.1_hiera_t", checkpoint="weights/sam2.1_hiera_tiny.pt")


def _release_name(key: str) -> str:
    """transformers 5 names → the names Qwen2.5-VL's release (transformers 4.49) stores."""
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    return key.replace("model.language_model.", "model.", 1)


@pytest.fixture(scope="module")
def parts():
    tokenizer = train_tiny_tokenizer()
    processor = build_processor(tokenizer, max_pixels=112 * 112)
    config = tiny_policy_config(tokenizer, tie_word_embeddings=True)
    config.dtype = torch.bfloat16  # built in bf16 as transformers loads a release (fp32 rotary buffers kept)
    policy = build_policy(config, seed=0)
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTM_CFG).to(torch.bfloat16).eval()
    return policy, ctm, processor


@pytest.fixture(scope="module")
def release(parts, tmp_path_factory) -> Path:
    """A directory laid out as a ConceptSeg-R1 release: flat HF config, 3 shards + index, processor."""
    policy, ctm, processor = parts
    root = tmp_path_factory.mktemp("release") / "ConceptSeg-R1-tiny"
    processor.save_pretrained(root)
    cfg = policy.config.to_dict()
    flat = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k not in ("text_config", "dtype")}}
    flat.update(model_type="qwen2_5_vl", torch_dtype="bfloat16", num_of_query=CTM_CFG.num_queries)
    (root / "config.json").write_text(json.dumps(flat, indent=2))
    state = {_release_name(k): v for k, v in policy.state_dict().items() if k != "lm_head.weight"}  # tied
    state.update(ctm.state_dict())
    names = sorted(state)
    weight_map = {}
    for i in range(SHARDS):
        shard = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        part = names[i::SHARDS]  # CTM and policy tensors land in every shard
        save_file({n: state[n].contiguous() for n in part}, root / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return root


@pytest.fixture
def copy(release: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "release"))


def _assert_same_weights(ref: torch.nn.Module, got: torch.nn.Module) -> None:
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].dtype == a[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def test_release_layout_loads_exactly_in_bf16(parts, release: Path) -> None:
    policy, ctm, processor = parts
    ck = load_checkpoint(release, ctm_num_heads=CTM_CFG.num_heads)
    assert ck.ctm.config == CTM_CFG  # N, d, depth, MLP ratio, out width and biases from the shapes
    assert ck.router == RouterConfig() and ck.backbone is None
    assert {p.dtype for p in ck.policy.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ck.ctm.parameters()} == {torch.bfloat16}
    _assert_same_weights(policy, ck.policy)
    _assert_same_weights(ctm, ck.ctm)
    assert ck.policy.lm_head.weight is ck.policy.model.language_model.embed_tokens.weight

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    before = PolicyWrapper(policy, processor).generate([image], "red circle", max_new_tokens=6)
    after = PolicyWrapper(ck.policy, ck.processor).generate([image], "red circle", max_new_tokens=6)
    assert torch.equal(after.token_ids, before.token_ids)
    torch.testing.assert_close(after.hidden_states, before.hidden_states, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(ck.ctm(before.hidden_states[None]), ctm(before.hidden_states[None]), rtol=0, atol=0)

    named = load_checkpoint(release, backbone=BACKBONE, ctm_num_heads=CTM_CFG.num_heads, dtype=torch.float16)
    assert named.backbone == BACKBONE
    assert {p.dtype for p in (*named.policy.parameters(), *named.ctm.parameters())} == {torch.float16}


def test_no_float32_allocation_while_loading(release: Path) -> None:
    """The torch CPU allocator never hands out a float32-sized copy of the largest bf16 tensor."""
    largest = max(
        (t for shard in release.glob("model-*.safetensors") for t in load_file(shard).values()),
        key=torch.Tensor.numel,
    )
    assert largest.dtype == torch.bfloat16
    fp32_bytes = largest.numel() * 4

    def allocations(dtype: torch.dtype | None) -> list[int]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            load_checkpoint(release, ctm_num_heads=CTM_CFG.num_heads, dtype=dtype)
        return [e.cpu_memory_usage for e in prof.events()]

    assert fp32_bytes in allocations(torch.float32)  # the probe sees an fp32 tensor of that size
    assert fp32_bytes not in allocations(None)


def _rewrite_shard(path: Path, edit) -> None:
    with safe_open(path, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_index(root: Path, edit) -> None:
    index = json.loads((root / INDEX_NAME).read_text())
    edit(index["weight_map"])
    (root / INDEX_NAME).write_text(json.dumps(index))


def _shard_of(root: Path, name: str) -> Path:
    return root / json.loads((root / INDEX_NAME).read_text())["weight_map"][name]


def test_missing_shard_is_named(copy: Path) -> None:
    (copy / "model-00002-of-00003.safetensors").unlink()
    match = r"model-00002-of-00003\.safetensors: listed in .*index\.json but missing"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(copy)


def test_tensor_missing_from_its_shard_is_named(copy: Path) -> None:
    shard = _shard_of(copy, "connector.pos_embed")
    _rewrite_shard(shard, lambda t: t.pop("connector.pos_embed"))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: lacks tensor 'connector.pos_embed'"):
        load_checkpoint(copy)


def test_tensor_the_index_does_not_map_is_named(copy: Path) -> None:
    shard = copy / "model-00001-of-00003.safetensors"
    _rewrite_shard(shard, lambda t: t.update({"proj_to_sam.9.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: holds tensor 'proj_to_sam.9.weight'"):
        load_checkpoint(copy)


def test_shard_not_in_the_index_is_named(copy: Path) -> None:
    shutil.copy(copy / "model-00001-of-00003.safetensors", copy / "model-00004-of-00004.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00004-of-00004\.safetensors: shard file not listed"):
        load_checkpoint(copy)


@pytest.mark.parametrize(
    "name,replacement,match",
    [
        ("connector.blocks.2.attn.kv.weight", None, r"missing tensors \[connector\.blocks\.2\.attn\.kv\.weight\]"),
        ("model.norm.weight", None, r"missing tensors \[model\.language_model\.norm\.weight\]"),
        ("connector.extra", torch.zeros(1), r"unexpected tensors \[connector\.extra\]"),
        ("visual.extra", torch.zeros(1), r"unexpected tensors \[visual\.extra\]"),
        ("proj_to_sam.0.bias", torch.zeros(3), r"proj_to_sam\.0\.bias: shape \[3\], model expects \[128\]"),
    ],
)
def test_missing_unexpected_and_misshapen_tensors(copy: Path, name: str, replacement, match: str) -> None:
    """Changed consistently in shard and index, so only the check against the model can catch it."""
    index = json.loads((copy / INDEX_NAME).read_text())["weight_map"]
    shard = copy / index.get(name, "model-00003-of-00003.safetensors")
    if replacement is None:
        _rewrite_shard(shard, lambda t: t.pop(name))
        _edit_index(copy, lambda m: m.pop(name))
    else:
        _rewrite_shard(shard, lambda t: t.update({name: replacement.to(torch.bfloat16)}))
        _edit_index(copy, lambda m: m.update({name: shard.name}))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(copy, ctm_num_heads=CTM_CFG.num_heads)


def _rename_everywhere(root: Path, rename) -> None:
    """Rename tensors in every shard and in the index alike."""
    for shard in root.glob("model-*.safetensors"):
        _rewrite_shard(shard, lambda t: t.update({rename(k): t.pop(k) for k in list(t)}))
    _edit_index(root, lambda m: m.update({rename(k): m.pop(k) for k in list(m)}))


def test_current_transformers_names_load_too_and_a_double_is_refused(parts, copy: Path) -> None:
    policy, ctm, _ = parts
    current = {_release_name(k): k for k in policy.state_dict()}
    _rename_everywhere(copy, lambda k: current.get(k, k))
    ck = load_checkpoint(copy, ctm_num_heads=CTM_CFG.num_heads)
    _assert_same_weights(policy, ck.policy)
    _assert_same_weights(ctm, ck.ctm)

    shard = _shard_of(copy, "model.language_model.norm.weight")
    _rewrite_shard(shard, lambda t: t.update({"model.norm.weight": t["model.language_model.norm.weight"].clone()}))
    _edit_index(copy, lambda m: m.update({"model.norm.weight": shard.name}))
    with pytest.raises(CheckpointError, match=r"model\.language_model\.norm\.weight is stored twice"):
        load_checkpoint(copy)


def test_a_plain_qwen_without_ctm_is_named(copy: Path) -> None:
    ctm_names = [k for k in json.loads((copy / INDEX_NAME).read_text())["weight_map"] if k.startswith(CTM_PREFIXES)]
    for shard in copy.glob("model-*.safetensors"):
        _rewrite_shard(shard, lambda t: [t.pop(k) for k in ctm_names if k in t])
    _edit_index(copy, lambda m: [m.pop(k) for k in ctm_names])
    with pytest.raises(CheckpointError, match=r"missing or misshapen 'learnable_query.weight'.*plain Qwen2.5-VL"):
        load_checkpoint(copy)


def test_bad_index_and_config_are_named(copy: Path) -> None:
    good_index = (copy / INDEX_NAME).read_text()
    _edit_index(copy, lambda m: m.update({"lm_head.weight": "../elsewhere.safetensors"}))
    with pytest.raises(CheckpointError, match=r"weight_map\['lm_head.weight'\].*not a \.safetensors file name"):
        load_checkpoint(copy)
    (copy / INDEX_NAME).write_text(good_index)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_checkpoint(copy)
    (copy / "config.json").write_text(json.dumps({**config, "num_of_query": 4}))
    with pytest.raises(CheckpointError, match="num_of_query 4"):
        load_checkpoint(copy, ctm_num_heads=CTM_CFG.num_heads)


def test_save_checkpoint_writes_the_release_layout(parts, tmp_path: Path) -> None:
    policy, ctm, processor = parts
    router = RouterConfig(base_tau=0.2)
    path = save_checkpoint(tmp_path / "out", policy, ctm, processor, router, None, max_shard_size="200KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    index = json.loads((path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    release_names = {"visual.patch_embed.proj.weight", "model.norm.weight", "learnable_query.weight"}
    assert release_names <= index["weight_map"].keys()
    assert not list(tmp_path.glob(".*")), "temporary directories left behind"

    loaded = load_checkpoint(path)
    assert loaded.router == router and loaded.backbone is None and loaded.ctm.config == CTM_CFG
    _assert_same_weights(policy, loaded.policy)
    _assert_same_weights(ctm, loaded.ctm)

    # transformers itself reads the layout (its own renaming of the release names, CTM tensors ignored).
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, local_files_only=True)
    assert hf.dtype == torch.bfloat16
    _assert_same_weights(policy, hf)

    data = bytearray((path / shards[0]).read_bytes())
    data[-1] ^= 0xFF
    (path / shards[0]).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shards[0]}: sha256"):
        load_checkpoint(path)


def test_one_file_layout_still_needs_a_backbone_and_sizes_parse(parts, tmp_path: Path) -> None:
    policy, ctm, processor = parts
    with pytest.raises(InputError, match="backbone"):
        save_checkpoint(tmp_path / "x", policy, ctm, processor, RouterConfig(), None)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500 MB") == 5 * 10**8 and parse_size(1024) == 1024
    for bad in ("5 parsecs", 0, -1, True):
        with pytest.raises(InputError, match="max_shard_size"):
            parse_size(bad)
    with pytest.raises(InputError, match="block indices"):
        CTMConfig.from_shapes({"learnable_query.weight": (8, 16), "proj_to_sam.2.weight": (256, 16),
                               "connector.blocks.0.mlp.fc1.weight": (64, 16), "connector.blocks.2.norm0.weight": (16,)})
