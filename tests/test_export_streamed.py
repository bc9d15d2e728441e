"""Streamed export: graphs traced without weights, weights streamed from the shards into external data.

A tiny policy (3 decoder layers, tied LM head) saved in the release layout with 1 MB shards stands in
for a 3B/7B release: ``open_streamed_policy`` must keep its decoder layers out of memory,
``export_policy_streamed`` must give the graphs ``export_policy`` gives from the loaded model (same
outputs, same quantized measures), and the one-MatMul-at-a-time quantizer must reproduce ONNX
Runtime's whole-graph tools bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conceptseg_edge.errors import ExportError, InputError
from conceptseg_edge.export.external import bind_weights, data_files, data_path, export_unbound
from conceptseg_edge.export.onnx_export import export_and_validate
from conceptseg_edge.export.policy import (
    EmbedGraph,
    decoder_cases,
    embed_cases,
    embed_reference,
    export_policy,
    export_policy_streamed,
    policy_embed_spec,
)
from conceptseg_edge.export.quantize import quantize_graph
from conceptseg_edge.export.trt_check import check_tensorrt_parse
from conceptseg_edge.models.checkpoint import save_checkpoint
from conceptseg_edge.models.ctm import ConceptTranslationModule, CTMConfig
from conceptseg_edge.models.policy import build_policy, build_processor, tiny_policy_config
from conceptseg_edge.models.streamed import open_streamed_policy
from conceptseg_edge.models.tokenizer import train_tiny_tokenizer
from conceptseg_edge.router import RouterConfig

LAYERS = 3


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(model, processor, checkpoint dir): the model saved in the sharded release layout."""
    processor = build_processor(train_tiny_tokenizer(), max_pixels=64 * 64)
    model = build_policy(tiny_policy_config(processor.tokenizer, num_layers=LAYERS, tie_word_embeddings=True), seed=0)
    ctm = ConceptTranslationModule(CTMConfig(hidden_size=128, depth=1, num_heads=4))
    path = save_checkpoint(tmp_path_factory.mktemp("release") / "ckpt", model, ctm, processor, RouterConfig(), None,
                           max_shard_size="1MB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 2
    return model, processor, path


@pytest.fixture(scope="module")
def exported(release, tmp_path_factory):
    """fp32 graphs of the same policy: streamed from the shards, and from the loaded model."""
    model, processor, path = release
    root = tmp_path_factory.mktemp("graphs")
    return export_policy_streamed(path, root / "streamed"), export_policy(model, processor, root / "memory"), root


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_streamed_policy_holds_no_decoder_layer_between_forwards(release):
    model, _, path = release
    source = open_streamed_policy(path)
    assert all(p.device.type == "meta" for p in source.layers.parameters())
    assert all(p.device.type == "cpu" for p in source.model.model.visual.parameters())
    assert source.model.lm_head.weight is source.model.model.language_model.embed_tokens.weight  # re-tied
    embeds = torch.randn(1, 5, 128)
    with torch.no_grad():
        want = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        with source.streaming():
            got = source.model.model.language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all(p.device.type == "meta" for p in source.layers.parameters())


def test_streamed_graphs_match_the_in_memory_export(exported):
    streamed, memory, root = exported
    assert all(part.parity.passed for part in streamed.values())
    stored = data_files(root / "streamed", streamed.values())
    assert sorted(stored) == sorted(f"{p.file}.data" for p in streamed.values())
    for name, part in streamed.items():
        graph = root / "streamed" / part.file
        # Weights live outside the protobuf, stored once (not twice through a folded copy).
        assert graph.stat().st_size < data_path(graph).stat().st_size
        assert check_tensorrt_parse(graph) == [], name
    model_cfg = tiny_policy_config(train_tiny_tokenizer(), num_layers=LAYERS).text_config
    rng = np.random.default_rng(0)
    feeds = decoder_cases(model_cfg, LAYERS, rng.standard_normal((512, 128)).astype(np.float32))[0]
    a = _session(root / "streamed" / "policy_decoder.onnx").run(None, feeds)
    b = _session(root / "memory" / "policy_decoder.onnx").run(None, feeds)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_streamed_int8_decoder_measures_as_the_in_memory_one(release, tmp_path):
    model, processor, path = release
    streamed = export_policy_streamed(path, tmp_path / "s", precision="int8")["policy_decoder"]
    memory = export_policy(model, processor, tmp_path / "m", precision="int8")["policy_decoder"]
    assert streamed.precision == "int8" and streamed.quantized_parity.passed
    assert streamed.quantized_parity.measures() == memory.quantized_parity.measures()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_one_matmul_at_a_time_equals_the_whole_graph_tools(exported, precision, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from conceptseg_edge.export.quantize import INT4_ACCURACY_LEVEL, INT4_BLOCK_SIZE

    _, _, root = exported
    src = root / "streamed" / "policy_decoder.onnx"  # external data
    whole = tmp_path / "whole.onnx"
    if precision == "int8":
        quantize_dynamic(str(src), str(whole), op_types_to_quantize=["MatMul"], per_channel=False,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    else:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=INT4_BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=INT4_ACCURACY_LEVEL)
        quantizer.process()
        quantizer.model.save_model_to_file(str(whole), use_external_data_format=False)
    ours = tmp_path / "ours.onnx"
    quantize_graph(src, ours, precision)
    ours_graph, whole_graph = onnx.load(str(ours), load_external_data=False).graph, onnx.load(str(whole)).graph
    assert sorted(n.op_type for n in ours_graph.node) == sorted(n.op_type for n in whole_graph.node)
    session = _session(whole)
    rng = np.random.default_rng(1)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(3, 7), (3, 1, 4)).copy()
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, 7), np.int64)
        elif i.name == "inputs_embeds":
            feeds[i.name] = rng.standard_normal((1, 4, 128)).astype(np.float32)
        else:
            feeds[i.name] = rng.standard_normal((1, i.shape[1], 3, i.shape[3])).astype(np.float32)
    for x, y in zip(_session(ours).run(None, feeds), session.run(None, feeds)):
        np.testing.assert_array_equal(x, y)


def test_bind_weights_names_the_weight_it_cannot_bind(release, tmp_path):
    model, _, _ = release
    spec = policy_embed_spec(128)
    example = embed_cases(512)[0]
    path = tmp_path / spec.file
    export_unbound(EmbedGraph(model.get_input_embeddings()).eval(), spec, example, path, 17)

    def missing(name):
        raise KeyError(name)

    with pytest.raises(ExportError, match=r"no weight for graph input 'embed_tokens\.weight'"):
        bind_weights(path, spec, missing)
    with pytest.raises(ExportError, match=r"embed_tokens\.weight.*shape \(3, 128\)"):
        bind_weights(path, spec, lambda name: np.zeros((3, 128), np.float32))
    assert not data_path(path).exists()  # both files or neither


def test_streamed_export_stores_fp32_only(release, tmp_path):
    from conceptseg_edge.export.external import StreamedWeights

    model, _, _ = release
    embed = model.get_input_embeddings()
    streamed = StreamedWeights(lambda name: embed.weight.detach().numpy())
    with pytest.raises(InputError, match="streamed weights are stored as fp32"):
        export_and_validate(EmbedGraph(embed).eval(), policy_embed_spec(128), embed_cases(512), embed_reference(model),
                            "torch", tmp_path, 17, "fp16", streamed)


@pytest.mark.slow
def test_export_concept_streams_the_policy_into_a_bundle_that_serves(concept_checkpoint, tmp_path):
    """``export concept --stream-policy``: the policy graphs carry external data, the manifest lists
    it (so the bundle verifies, the runtime loads it, and a Triton repository copies it), and the
    routes still match the torch pipeline."""
    from PIL import Image

    from conceptseg_edge.cli import main
    from conceptseg_edge.export.concept import ROUTE_IOU_FLOOR
    from conceptseg_edge.manifest import load_bundle
    from conceptseg_edge.serve.repository import build_repository

    bundle = tmp_path / "bundle"
    assert main(["export", "concept", str(concept_checkpoint), "--out", str(bundle), "--stream-policy"]) == 0
    manifest = load_bundle(bundle)  # every hash, the .data files included
    assert {f"{p}.onnx.data" for p in ("policy_vision", "policy_embed", "policy_decoder")} <= set(manifest.files)
    assert all(v["min_mask_iou"] >= ROUTE_IOU_FLOOR for v in manifest.route_parity.values())
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(image)
    assert main(["segment", str(bundle), str(image), "--concept", "salient object", "--route", "reason",
                 "--out", str(tmp_path / "mask.png")]) == 0
    repo = build_repository(bundle, tmp_path / "repo")
    assert repo is not None
    assert list((tmp_path / "repo").rglob("policy_decoder.onnx.data"))
    (bundle / "policy_decoder.onnx.data").write_bytes(b"\0")
    assert main(["segment", str(bundle), str(image), "--concept", "salient object", "--out", str(tmp_path / "m2.png")]) == 2


def test_stream_policy_needs_fp32_storage():
    from conceptseg_edge.export.concept import ConceptExportConfig

    with pytest.raises(InputError, match="--stream-policy"):
        ConceptExportConfig("ckpt", weight_storage="fp16", stream_policy=True)
