"""Qwen2.5-VL-3B / -7B widths: the policy's graphs and the CTM at the released sizes, reduced in depth.

Full widths (hidden, heads, KV heads, MLP, 128-wide heads with M-RoPE sections [16, 24, 24]; the
vision tower at 1280 wide, 16 heads, SwiGLU 3420, 112-pixel windows) with 2 decoder layers and 4
vision blocks, two of them full attention (blocks 1 and 3), two windowed: the shapes that a bug in
head splitting, GQA grouping, the rotary sections or the window masks would break, at a depth CPU
tests afford. The vocabulary is the locally trained tokenizer's. Parity is export_policy's own
(``export/policy.py`` tolerances, against the transformers modules on its fixed cases); the
processor's cap of 224x224 pixels gives the vision cases up to 2x2 windows.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conceptseg_edge.benchmarks.scale_policy import QWEN25_VL_3B, QWEN25_VL_7B, PolicyWidths, policy_config, scaled
from conceptseg_edge.export.ctm import export_ctm
from conceptseg_edge.export.policy import export_policy, export_policy_streamed
from conceptseg_edge.models.checkpoint import save_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
from conceptseg_edge.models.policy import build_policy, build_processor
from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
from conceptseg_edge.router import RouterConfig

MAX_PIXELS = 224 * 224
#: method-notes: "≈206M params at d=2048, ≈631M at d=3584" (4 blocks, 16 heads, mlp ratio 4).
CTM_PARAMS = {2048: 206e6, 3584: 631e6}


@pytest.fixture(scope="module")
def processor():
    return build_processor(train_tiny_tokenizer(), max_pixels=MAX_PIXELS)


def _reduced(widths: PolicyWidths) -> PolicyWidths:
    return scaled(widths, num_layers=2, vision_depth=4, fullatt_block_indexes=(1, 3))


def test_presets_hold_the_released_shapes(processor):
    cfg3, cfg7 = (policy_config(processor.tokenizer, w) for w in (QWEN25_VL_3B, QWEN25_VL_7B))
    for cfg, (d, layers, heads, kv, mlp, tied) in ((cfg3, (2048, 36, 16, 2, 11008, True)),
                                                    (cfg7, (3584, 28, 28, 4, 18944, False))):
        t, v = cfg.text_config, cfg.vision_config
        assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
                t.intermediate_size, cfg.tie_word_embeddings) == (d, layers, heads, kv, mlp, tied)
        assert t.hidden_size // t.num_attention_heads == 128
        assert t.rope_parameters["mrope_section"] == [16, 24, 24]
        assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.window_size, v.out_hidden_size) == \
            (32, 1280, 16, 3420, 112, d)
        assert v.fullatt_block_indexes == [7, 15, 23, 31]
    # A cut tower keeps the release's pattern where it reaches and ends on a full block.
    assert scaled(QWEN25_VL_3B, vision_depth=12).fullatt_block_indexes == (7, 11)


@pytest.mark.slow
@pytest.mark.parametrize(("widths", "streamed"), [(QWEN25_VL_3B, False), (QWEN25_VL_7B, True)], ids=["3b", "7b-streamed"])
def test_policy_graphs_at_real_width_match_transformers(widths, streamed, processor, tmp_path):
    """3B width through the in-memory exporter; 7B width as a user's release arrives (bf16, sharded)
    through the streamed one, whose graphs have no 2 GB limit (the 7B-width decoder is 1.9 GB at
    2 layers) and which holds one decoder layer at a time."""
    cfg = policy_config(processor.tokenizer, _reduced(widths))
    if streamed:
        model = build_policy(cfg, seed=0, dtype=torch.bfloat16)
        ctm = ConceptTranslationModule(CTMConfig(hidden_size=widths.hidden_size, depth=1, mlp_ratio=1)).half()
        ckpt = save_checkpoint(tmp_path / "release", model, ctm, processor, RouterConfig(), None, max_shard_size="1GB")
        del model, ctm
        parts = export_policy_streamed(ckpt, tmp_path / "graphs")
    else:
        parts = export_policy(build_policy(cfg, seed=0), processor, tmp_path)
    for name, part in parts.items():
        assert part.parity.passed, (name, part.parity.max_abs_diff)
    decoder = parts["policy_decoder"]
    past = {t.name: t.shape for t in decoder.inputs if t.name.startswith("past_key_values")}
    assert len(past) == 2 * 2
    assert set(past.values()) == {(1, widths.num_kv_heads, "past_sequence", 128)}
    assert parts["policy_vision"].outputs[0].shape == ("num_image_tokens", widths.hidden_size)


def test_ctm_parameter_counts_match_method_notes():
    for d, expected in CTM_PARAMS.items():
        with torch.device("meta"):
            ctm = ConceptTranslationModule(CTMConfig(hidden_size=d))
        count = sum(p.numel() for p in ctm.parameters())
        assert abs(count - expected) / expected < 0.005, (d, count)


@pytest.mark.slow
def test_ctm_3b_width_fp16_stored_export_parity(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ctm = ConceptTranslationModule(CTMConfig(hidden_size=2048)).eval()
    part = export_ctm(ctm, tmp_path, opset=17, weight_storage="fp16")
    assert part.parity.passed, part.parity.max_abs_diff
    assert part.weight_storage == "fp16"
    size = (tmp_path / part.file).stat().st_size
    assert 2 * 206e6 <= size < 2 * 206e6 * 1.01  # every large weight stored at 2 bytes
    assert np.isfinite(part.parity.max_abs_diff["concept_tokens"])


@pytest.mark.slow
def test_scale_policy_script_measures_each_step_in_its_own_process(tmp_path):
    """The script behind docs/scale.md, at one decoder layer and one vision block."""
    from conceptseg_edge.benchmarks.scale_policy import main

    code = main(["--preset", "0.5b", "--layers", "1", "--vision-depth", "1", "--precisions", "fp32", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "scale_policy.json").read_text())
    assert code == 0, report
    build, export = report["steps"]["build"], report["steps"]["export-fp32"]
    assert build["peak_rss_gib"] > 0 and export["peak_rss_gib"] > 0
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").is_file()  # the release layout
    assert "policy_decoder.onnx.data" in export["files"]
    assert export["policy_decoder_max_abs_diff"] < 1e-3
    assert not (tmp_path / "policy-fp32").exists()  # sizes kept, graphs deleted without --keep
    assert report["machine"]["commit"]
