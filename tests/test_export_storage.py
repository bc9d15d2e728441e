"""fp16 weight storage: half-size files, fp32 arithmetic, folded by ONNX Runtime, parity within tolerance.

Everything runs through the real libraries: the conceptseg_tiny SAM2 (seeded random init, 128 px)
exported twice from one checkpoint, ONNX Runtime sessions on both graphs, and ORT's own optimized
graph to show the casts are folded at load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conceptseg_edge.errors import InputError
from conceptseg_edge.export.onnx_export import store_weights
from conceptseg_edge.export.parts import WEIGHT_STORAGES
from conceptseg_edge.export.sam2 import SAM2ExportConfig, export_sam2, sam2_decoder_spec, sam2_encoder_spec
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.runtime.predictor import SAM2Predictor

SIZE = 128  # the embedded default's input size


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    from conftest import save_seeded_checkpoint

    root = tmp_path_factory.mktemp("storage")
    ckpt = save_seeded_checkpoint(root / "conceptseg_tiny.pt", "conceptseg_tiny", SIZE)
    return {
        storage: export_sam2(SAM2ExportConfig("conceptseg_tiny", str(ckpt), image_size=SIZE, weight_storage=storage),
                             root / storage, progress=False) and root / storage
        for storage in ("fp32", "fp16")
    }


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _initializer_bytes(path: Path) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def _decoder_feeds(rng: np.random.Generator) -> dict[str, np.ndarray]:
    low = SIZE // 4
    return {
        "image_embed": rng.standard_normal((1, 256, SIZE // 16, SIZE // 16)).astype(np.float32),
        "high_res_feats_0": rng.standard_normal((1, 32, low, low)).astype(np.float32),
        "high_res_feats_1": rng.standard_normal((1, 64, SIZE // 8, SIZE // 8)).astype(np.float32),
        "point_coords": rng.uniform(0, SIZE, (2, 3, 2)).astype(np.float32),
        "point_labels": np.array([[2, 3, 1], [1, 0, -1]], np.int32),
        "concept_tokens": rng.standard_normal((2, 8, 256)).astype(np.float32),
        "mask_input": np.zeros((2, 1, low, low), np.float32),
        "has_mask_input": np.zeros((2,), np.float32),
    }


def test_fp16_storage_halves_the_weights_and_is_recorded(tiny_exports):
    fp32, fp16 = load_bundle(tiny_exports["fp32"]), load_bundle(tiny_exports["fp16"])
    for name in ("sam2_encoder", "sam2_decoder"):
        a, b = tiny_exports["fp32"] / fp32.part(name).file, tiny_exports["fp16"] / fp16.part(name).file
        assert _initializer_bytes(b) <= 0.52 * _initializer_bytes(a)  # small tensors stay fp32
        assert b.stat().st_size <= 0.6 * a.stat().st_size  # the rest is graph structure
        assert fp32.part(name).weight_storage == "fp32" and fp16.part(name).weight_storage == "fp16"
        assert fp16.part(name).precision == "fp32"  # computation is unchanged
    assert any(t.data_type == TensorProto.FLOAT16 for t in onnx.load(str(b)).graph.initializer)


def test_fp16_parity_uses_the_storage_tolerances(tiny_exports):
    m = load_bundle(tiny_exports["fp16"])
    for name, spec in (("sam2_encoder", sam2_encoder_spec(SIZE)), ("sam2_decoder", sam2_decoder_spec(SIZE))):
        parity = m.part(name).parity
        assert parity.passed
        scale = WEIGHT_STORAGES["fp16"].atol_scale
        assert parity.atol == {k: v * scale for k, v in spec.atol.items()}
        assert all(parity.max_abs_diff[k] <= parity.atol[k] for k in parity.atol)
        # fp16 rounding really reached the graph: it no longer matches torch to fp32 precision.
        assert max(parity.max_abs_diff.values()) > 1e-6
    assert m.part("sam2_decoder").parity.mask_iou >= WEIGHT_STORAGES["fp16"].mask_iou_floor


def test_ort_folds_the_casts_and_matches_the_fp32_graph(tiny_exports, tmp_path):
    """ORT's optimized graph has no fp16 initializer and no Cast left on a weight; outputs agree."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    for name, feeds, atol in (
        ("sam2_encoder", {"image": image}, sam2_encoder_spec(SIZE).with_storage("fp16").atol),
        ("sam2_decoder", _decoder_feeds(rng), sam2_decoder_spec(SIZE).with_storage("fp16").atol),
    ):
        outputs = {}
        for storage, bundle in tiny_exports.items():
            optimized = tmp_path / f"{name}_{storage}.onnx"
            session = _session(bundle / f"{name}.onnx", optimized)
            outputs[storage] = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            graph = onnx.load(str(optimized)).graph
            weights = {t.name for t in graph.initializer}
            assert not any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer)
            assert not [n.name for n in graph.node if n.op_type == "Cast" and n.input[0] in weights]
        for output, want in outputs["fp32"].items():
            assert np.abs(outputs["fp16"][output] - want).max() <= atol[output], output


def test_runtime_segments_with_an_fp16_bundle(tiny_exports):
    rng = np.random.default_rng(0)
    image = (rng.random((96, 120, 3)) * 255).astype(np.uint8)
    tokens = rng.standard_normal((8, 256)).astype(np.float32)
    masks = {}
    for storage, bundle in tiny_exports.items():
        predictor = SAM2Predictor.from_bundle(bundle)
        predictor.set_image(image)
        masks[storage] = predictor.predict(box=[20, 10, 90, 70], concept_tokens=tokens)
    a, b = masks["fp32"].mask, masks["fp16"].mask
    union = np.logical_or(a, b).sum()
    assert union == 0 or np.logical_and(a, b).sum() / union >= 0.98


def _toy_model(path: Path, weights: dict[str, np.ndarray]) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    nodes = [
        helper.make_node("MatMul", ["x", "w_big"], ["h"]),
        helper.make_node("Add", ["h", "b_small"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w_huge"], ["h3"]),
        helper.make_node("Add", ["h3", "c_const"], ["y"]),
        helper.make_node("Constant", [], ["c_const"], value=numpy_helper.from_array(weights["c_const"])),
    ]
    nodes = [nodes[-1], *nodes[:-1]]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items() if k != "c_const"]
    graph = helper.make_graph(nodes, "toy", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_store_weights_rules(tmp_path):
    """Large fp32 initializers and Constant nodes go fp16; small ones and ones fp16 cannot hold stay fp32."""
    rng = np.random.default_rng(0)
    weights = {
        "w_big": rng.standard_normal((64, 32)).astype(np.float32),  # 2048 elements
        "b_small": rng.standard_normal((32,)).astype(np.float32),
        "w_huge": (rng.standard_normal((32, 32)) * 1e5).astype(np.float32),  # beyond fp16's 65504
        "c_const": rng.standard_normal((1, 32)).astype(np.float32),  # a small Constant node: stays
    }
    path = tmp_path / "toy.onnx"
    _toy_model(path, weights)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    want = _session(path).run(None, {"x": x})[0]
    assert store_weights(path, "fp32") == 0
    assert store_weights(path, "fp16") == 1
    graph = onnx.load(str(path)).graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    assert dtypes == {"w_big__fp16": TensorProto.FLOAT16, "b_small": TensorProto.FLOAT, "w_huge": TensorProto.FLOAT}
    got = _session(path).run(None, {"x": x})[0]
    rounded = weights["w_big"].astype(np.float16).astype(np.float32)
    exact = (x @ rounded + weights["b_small"]) @ weights["w_huge"] + weights["c_const"]
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-1)  # |y| ~ 1e6: fp32 summation noise
    assert np.abs(got - want).max() > 0  # the rounding is real


def test_large_constant_nodes_are_stored_too(tmp_path):
    rng = np.random.default_rng(1)
    table = rng.standard_normal((1, 64, 32)).astype(np.float32)  # 2048 elements in a Constant node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 32])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["pe"], value=numpy_helper.from_array(table)), helper.make_node("Add", ["x", "pe"], ["y"])],
        "pe", [x], [y],
    )
    path = tmp_path / "pe.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert store_weights(path, "fp16") == 1
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node] == ["Cast", "Add"]
    feeds = {"x": np.zeros((1, 64, 32), np.float32)}
    np.testing.assert_array_equal(_session(path).run(None, feeds)[0], table.astype(np.float16).astype(np.float32))


def test_unknown_storage_is_refused():
    with pytest.raises(InputError, match="--weight-storage bf16"):
        SAM2ExportConfig(weight_storage="bf16")
    with pytest.raises(InputError, match="weight storage 'int8'"):
        sam2_decoder_spec(SIZE).with_storage("int8")


def test_fp32_storage_keeps_the_part_tolerances():
    spec = sam2_decoder_spec(SIZE)
    assert spec.with_storage("fp32") == spec


def test_cli_exports_fp16_storage(tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "conceptseg_edge", "export", "sam2", "--config", "conceptseg_tiny", "--image-size", "64",
         "--weight-storage", "fp16", "--out", str(out)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["parity"]["sam2_decoder"]["passed"]
    assert {p.weight_storage for p in load_bundle(out).parts.values()} == {"fp16"}
