"""CTM: output shapes, official state-dict names, loading official-named weights."""

from __future__ import annotations

import pytest
import torch

from conceptseg_edge.errors import InputError
from conceptseg_edge.models.ctm import (
    CTM_PREFIXES,
    ConceptTranslationModule,
    CTMConfig,
    split_ctm_state_dict,
)

TINY = CTMConfig(hidden_size=32, num_heads=4)


def official_keys(depth: int) -> set[str]:
    """The key set of the official checkpoint's CTM, written out by hand from the method notes."""
    keys = {"learnable_query.weight", "connector.pos_embed"}
    for i in range(depth):
        for part in ("norm0", "norm1", "norm2", "attn.q", "attn.kv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            keys |= {f"connector.blocks.{i}.{part}.weight", f"connector.blocks.{i}.{part}.bias"}
    for idx in (0, 2):
        keys |= {f"proj_to_sam.{idx}.weight", f"proj_to_sam.{idx}.bias"}
    return keys


@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, 7), (3, 40)])
def test_output_shape_for_any_length(batch: int, tokens: int) -> None:
    ctm = ConceptTranslationModule(TINY).eval()
    out = ctm(torch.randn(batch, tokens, 32))
    assert out.shape == (batch, 8, 256)
    assert torch.isfinite(out).all()


def test_state_dict_names_and_shapes_are_official() -> None:
    ctm = ConceptTranslationModule(TINY)
    sd = ctm.state_dict()
    assert set(sd) == official_keys(depth=4)
    d = 32
    assert sd["learnable_query.weight"].shape == (8, d)
    assert sd["connector.pos_embed"].shape == (1, 8, d)
    assert sd["connector.blocks.0.attn.kv.weight"].shape == (2 * d, d)
    assert sd["connector.blocks.3.mlp.fc1.weight"].shape == (4 * d, d)
    assert sd["proj_to_sam.2.weight"].shape == (256, d)
    assert all(k.startswith(CTM_PREFIXES) for k in sd)


def test_loads_official_named_state_dict_strictly() -> None:
    torch.manual_seed(0)
    source = ConceptTranslationModule(TINY).eval()
    # An "official" dict: plain names -> tensors, mixed into policy weights as in the released file.
    combined = {k: v.clone() for k, v in source.state_dict().items()}
    combined["model.language_model.norm.weight"] = torch.ones(32)
    ctm_sd, policy_sd = split_ctm_state_dict(combined)
    assert list(policy_sd) == ["model.language_model.norm.weight"]
    target = ConceptTranslationModule(TINY).eval()
    target.load_state_dict(ctm_sd, strict=True)
    h = torch.randn(2, 5, 32)
    torch.testing.assert_close(target(h), source(h), rtol=0, atol=0)


def test_queries_attend_to_hidden_states_only() -> None:
    """No padding mask and no self-attention: the output depends on H as a set (order-free)."""
    ctm = ConceptTranslationModule(TINY).eval()
    h = torch.randn(1, 9, 32)
    perm = torch.randperm(9)
    torch.testing.assert_close(ctm(h), ctm(h[:, perm]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ctm(h), ctm(h[:, :5]))


def test_query_init_and_full_size_parameter_count() -> None:
    torch.manual_seed(0)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=256))
    assert abs(ctm.learnable_query.weight.std().item() - 0.02) < 0.003
    d = 2048  # Qwen2.5-VL-3B: 12 d^2 per block, 4 blocks, plus proj_to_sam; method notes say ~206M.
    per_block = 12 * d * d + 15 * d  # weights + biases (3 LayerNorms: 6d; q, kv, proj, fc1, fc2: 9d)
    expected = 2 * 8 * d + 4 * per_block + (d * d + d) + (256 * d + 256)
    with torch.device("meta"):
        meta = ConceptTranslationModule(CTMConfig(hidden_size=d))
    assert sum(p.numel() for p in meta.parameters()) == expected
    assert 205e6 < expected < 207e6


def test_bad_inputs_and_configs_raise_typed_errors() -> None:
    ctm = ConceptTranslationModule(TINY)
    with pytest.raises(InputError, match="hidden"):
        ctm(torch.randn(4, 32))
    with pytest.raises(InputError, match="hidden"):
        ctm(torch.randn(1, 4, 31))
    with pytest.raises(InputError, match="num_heads"):
        CTMConfig(hidden_size=30, num_heads=4)
    with pytest.raises(InputError, match="unknown keys"):
        CTMConfig.from_dict({"hidden_size": 32, "heads": 4})
    assert CTMConfig.from_dict(TINY.to_dict()) == TINY


def test_fp16_module_accepts_fp32_hidden_states() -> None:
    ctm = ConceptTranslationModule(TINY).to(torch.bfloat16).eval()
    out = ctm(torch.randn(1, 3, 32))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 8, 256)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch flags the TorchScript exporter; it works
def test_exports_to_onnx_with_dynamic_batch_and_length(tmp_path) -> None:
    """The TorchScript exporter (opset 17) keeps B and T dynamic; ORT matches torch to float rounding."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    ctm = ConceptTranslationModule(TINY).eval()
    path = tmp_path / "ctm.onnx"
    torch.onnx.export(
        ctm,
        (torch.randn(2, 7, 32),),
        path,
        input_names=["hidden"],
        output_names=["prompt_tokens"],
        dynamic_axes={"hidden": {0: "batch", 1: "tokens"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, tokens in ((1, 1), (3, 33)):
        h = torch.randn(batch, tokens, 32)
        (got,) = session.run(None, {"hidden": h.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), ctm(h), rtol=0, atol=1e-5)
