"""The TensorRT ONNX parse check: planted patterns caught with the node named, our real graphs pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conceptseg_edge.errors import ExportError
from conceptseg_edge.export.trt_check import (
    SUPPORTED_OPS,
    TOPK_K_LIMIT,
    UNSUPPORTED_OPS,
    check_bundle,
    check_tensorrt_parse,
    require_tensorrt_parse,
)

EMBEDDED = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"
F = TensorProto.FLOAT


def graph_model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    """A real, checker-valid model (the check sees what an export would write)."""
    model = helper.make_model(helper.make_graph(nodes, "planted", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def value(name, dtype=F, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def rules(model) -> dict[str, set[str]]:
    """Node name -> the rules it breaks."""
    found: dict[str, set[str]] = {}
    for v in check_tensorrt_parse(model):
        found.setdefault(v.node, set()).add(v.rule)
    return found


def test_op_lists_are_the_document_rows():
    # 150 "Y" and 46 "N" rows in docs/operators.md at 10.1-GA; no op is in both.
    assert (len(SUPPORTED_OPS), len(UNSUPPORTED_OPS)) == (150, 46)
    assert not SUPPORTED_OPS & UNSUPPORTED_OPS


def test_onehot_depth_must_be_constant():
    inputs = [value("idx", TensorProto.INT64, [4]), value("depth", TensorProto.INT64, [])]
    onehot = lambda name, depth: helper.make_node("OneHot", ["idx", depth, "vals"], [f"{name}_out"], name=name)  # noqa: E731
    model = graph_model([onehot("fed", "depth"), onehot("fixed", "depth_c")], inputs,
                        [value("fed_out", F, [4, None]), value("fixed_out", F, [4, 5])],
                        [const("vals", np.array([0.0, 1.0], np.float32)), const("depth_c", np.array(5, np.int64))])
    assert rules(model) == {"fed": {"onehot-depth"}}
    (violation,) = check_tensorrt_parse(model)
    assert (violation.op_type, violation.node) == ("OneHot", "fed") and "'depth'" in violation.detail


def test_topk_k_limit_and_source():
    x = value("x", F, [1, 5000])
    nodes = [
        helper.make_node("TopK", ["x", "k_big"], ["big_v", "big_i"], name="topk_big"),
        helper.make_node("TopK", ["x", "k_fed"], ["fed_v", "fed_i"], name="topk_fed"),
        helper.make_node("TopK", ["x", "k_ok"], ["ok_v", "ok_i"], name="topk_unsorted", sorted=0),
        helper.make_node("Constant", [], ["k_attr"], name="k_attr", value_ints=[3840]),
        helper.make_node("TopK", ["x", "k_attr"], ["attr_v", "attr_i"], name="topk_attr"),
        # K computed from shapes only (argsort over a dynamic axis): bounded by the engine profile.
        helper.make_node("Shape", ["x"], ["shape"], name="shape", start=1),
        helper.make_node("TopK", ["x", "shape"], ["arg_v", "arg_i"], name="topk_argsort"),
    ]
    outs = [value(f"{p}_{s}", F if s == "v" else TensorProto.INT64, [1, None])
            for p in ("big", "fed", "ok", "attr", "arg") for s in ("v", "i")]
    model = graph_model(nodes, [x, value("k_fed", TensorProto.INT64, [1])], outs,
                        [const("k_big", np.array([4000], np.int64)), const("k_ok", np.array([8], np.int64))])
    assert rules(model) == {"topk_big": {"topk-k"}, "topk_fed": {"topk-k"}, "topk_unsorted": {"topk-sorted"},
                            "topk_attr": {"topk-k"}}
    details = {v.node: v.detail for v in check_tensorrt_parse(model)}
    assert "4000" in details["topk_big"] and str(TOPK_K_LIMIT) in details["topk_big"]
    assert "'k_fed'" in details["topk_fed"]


def test_resize_antialias_and_modes():
    x = value("x", F, [1, 1, 4, 4])
    resize = lambda name, **kw: helper.make_node("Resize", ["x", "", "scales"], [name + "_y"], name=name, **kw)  # noqa: E731
    nodes = [resize("aa", mode="linear", antialias=1), resize("crop", coordinate_transformation_mode="tf_crop_and_resize"),
             resize("cubic", mode="cubic"), resize("plain", mode="linear")]
    model = graph_model(nodes, [x], [value(n.output[0], F, [1, 1, None, None]) for n in nodes],
                        [const("scales", np.array([1, 1, 2, 2], np.float32))], opset=18)
    assert rules(model) == {"aa": {"resize-antialias"}, "crop": {"resize-coordinate-mode"}}


def test_scatternd_reduction_refused():
    data, idx, upd = value("data", F, [4]), value("idx", TensorProto.INT64, [1, 1]), value("upd", F, [1])
    nodes = [helper.make_node("ScatterND", ["data", "idx", "upd"], ["added"], name="scatter_add", reduction="add"),
             helper.make_node("ScatterND", ["data", "idx", "upd"], ["plain"], name="scatter_plain")]
    model = graph_model(nodes, [data, idx, upd], [value("added", F, [4]), value("plain", F, [4])], opset=16)
    assert rules(model) == {"scatter_add": {"scatternd-reduction"}}


def test_qdq_zero_point_must_be_zero():
    x = value("x", F, [4])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp3"], ["q3"], name="q_zp3"),
             helper.make_node("DequantizeLinear", ["q3", "scale", "zp3"], ["y3"], name="dq_zp3"),
             helper.make_node("QuantizeLinear", ["x", "scale", "zp0"], ["q0"], name="q_zp0"),
             helper.make_node("DequantizeLinear", ["q0", "scale", "zp0"], ["y0"], name="dq_zp0")]
    model = graph_model(nodes, [x], [value("y3", F, [4]), value("y0", F, [4])],
                        [const("scale", np.array(0.1, np.float32)), const("zp3", np.array(3, np.int8)),
                         const("zp0", np.array(0, np.int8))])
    assert rules(model) == {"q_zp3": {"qdq-zero-point"}, "dq_zp3": {"qdq-zero-point"}}


def test_dequantize_of_an_int32_bias_refused():
    """ONNX Runtime's QuantizeBias writes int32 biases behind a DequantizeLinear; the DQ row lists INT8/FP8/INT4."""
    bias = helper.make_node("DequantizeLinear", ["bias_q", "bias_scale"], ["bias"], name="bias_dq")
    add = helper.make_node("Add", ["x", "bias"], ["y"], name="add")
    model = graph_model([bias, add], [value("x", F, [4])], [value("y", F, [4])],
                        [const("bias_q", np.array([1, 2, 3, 4], np.int32)), const("bias_scale", np.array(0.5, np.float32))])
    assert rules(model) == {"bias_dq": {"qdq-type"}}


def test_unsupported_ops_and_domains():
    x = value("x", F, [2, 2])
    nodes = [helper.make_node("FusedGelu", ["x"], ["g"], name="ms_gelu", domain="com.microsoft"),
             helper.make_node("Det", ["g"], ["d"], name="det")]
    model = helper.make_model(helper.make_graph(nodes, "planted", [x], [value("d", F, [])]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    found = check_tensorrt_parse(model)
    assert [(v.node, v.op_type, v.rule) for v in found] == [("ms_gelu", "FusedGelu", "unsupported-op"),
                                                           ("det", "Det", "unsupported-op")]
    assert "com.microsoft" in found[0].detail


def test_subgraphs_are_walked_and_named():
    inner = helper.make_graph([helper.make_node("TopK", ["x", "k_big"], ["v", "i"], name="inner_topk")], "then",
                              [], [value("v", F, [1, None])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["w"], name="inner_id")], "else", [],
                              [value("w", F, [1, None])])
    nodes = [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=inner, else_branch=other)]
    model = graph_model(nodes, [value("x", F, [1, 5000]), value("cond", TensorProto.BOOL, [])],
                        [value("out", F, [1, None])], [const("k_big", np.array([4000], np.int64))])
    (violation,) = check_tensorrt_parse(model)
    assert (violation.node, violation.rule) == ("branch/then_branch/inner_topk", "topk-k")


def test_axes_initializer_opset_and_dtypes():
    x = value("x", F, [2, 3])
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1),
             helper.make_node("Sub", ["s", "one"], ["axis"], name="sub"),
             helper.make_node("Unsqueeze", ["x", "axis"], ["u"], name="unsqueeze_computed"),
             helper.make_node("Cast", ["x"], ["c"], name="cast_u16", to=TensorProto.UINT16),
             helper.make_node("Cast", ["x"], ["b"], name="cast_u8", to=TensorProto.UINT8),
             helper.make_node("Cast", ["b"], ["y"], name="back", to=F)]
    outs = [value("u", F, [None, None, None]), value("c", TensorProto.UINT16, [2, 3]), value("y", F, [2, 3])]
    model = graph_model(nodes, [x], outs, [const("one", np.array([1], np.int64))])
    assert rules(model) == {"unsqueeze_computed": {"initializer-input"}, "cast_u16": {"dtype"},
                            "cast_u8": {"dtype-uint8"}}
    newer = graph_model([helper.make_node("Relu", ["x"], ["r"], name="relu")], [x], [value("r", F, [2, 3])], opset=21)
    assert [(v.node, v.rule) for v in check_tensorrt_parse(newer)] == [("<graph>", "opset")]


def test_ort_static_qdq_symmetric_int8_passes_asymmetric_uint8_caught(tmp_path):
    """ONNX Runtime's quantize_static in QDQ format: symmetric int8 without bias quantization is what
    TensorRT takes; its uint8 (asymmetric) activations and int32 biases are caught."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    rng = np.random.default_rng(0)
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(graph_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")],
        [value("x", F, [1, 3, 16, 16])], [value("y", F, [1, 8, 16, 16])],
        [const("w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)), const("b", rng.standard_normal(8).astype(np.float32)),
         const("m", rng.standard_normal((16, 16)).astype(np.float32))]), str(fp32))

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    symmetric = {"ActivationSymmetric": True, "WeightSymmetric": True}
    quantize_static(str(fp32), str(tmp_path / "int8.onnx"), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={**symmetric, "QuantizeBias": False})
    assert check_tensorrt_parse(tmp_path / "int8.onnx") == []
    quantize_static(str(fp32), str(tmp_path / "uint8.onnx"), Feeds(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    found = {(v.node, v.rule) for v in check_tensorrt_parse(tmp_path / "uint8.onnx")}
    assert {("x_QuantizeLinear", "qdq-zero-point"), ("x_DequantizeLinear", "qdq-type"),
            ("b_DequantizeLinear", "qdq-type")} <= found


def test_ort_only_quantized_formats_are_refused(tmp_path):
    """int8 (quantize_dynamic) and int4 (MatMulNBits) copies of a valid fp32 graph: ONNX-Runtime-only."""
    from conceptseg_edge.export.quantize import quantize_graph

    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [value("x", F, [1, 64])],
                          [value("y", F, [1, 64])], [const("w", weight)]), str(fp32))
    assert check_tensorrt_parse(fp32) == []
    for precision, refused in (("int8", {"DynamicQuantizeLinear", "MatMulInteger"}), ("int4", {"MatMulNBits"})):
        quantized = tmp_path / f"{precision}.onnx"
        quantize_graph(fp32, quantized, precision)
        found = check_tensorrt_parse(quantized)
        assert {v.op_type for v in found if v.rule == "unsupported-op"} == refused, precision
        with pytest.raises(ExportError, match=r"TensorRT ONNX parser violation"):
            require_tensorrt_parse(quantized, f"decoder ({precision})")


def test_embedded_bundle_only_the_int8_decoder_fails():
    results = check_bundle(EMBEDDED)
    assert set(results) == {"sam2_encoder", "sam2_decoder", "ctm", "policy_vision", "policy_embed", "policy_decoder",
                            "sam2_video_decoder", "sam2_memory_encoder", "sam2_memory_attention"}
    assert {name for name, found in results.items() if found} == {"policy_decoder"}  # the video parts pass too
    decoder = results["policy_decoder"]
    assert {v.op_type for v in decoder} == {"DynamicQuantizeLinear", "MatMulInteger"}
    assert all(v.node for v in decoder)


def test_export_and_validate_refuses_a_planted_violation(tmp_path):
    """A module whose trace holds TopK with K=4000: export fails before parity, and the staged bundle vanishes."""
    import torch

    from conceptseg_edge.export.onnx_export import export_and_validate
    from conceptseg_edge.export.parts import PartSpec
    from conceptseg_edge.fileio import staged_dir
    from conceptseg_edge.manifest import MANIFEST_NAME, TensorSpec

    class TopScores(torch.nn.Module):
        def forward(self, scores):
            return torch.topk(scores, 4000, dim=-1).values

    spec = PartSpec("top_scores", "top_scores.onnx", (TensorSpec("scores", "float32", (1, 5000)),),
                    (TensorSpec("top", "float32", (1, 4000)),), {"top": 1e-6})
    cases = [{"scores": np.random.default_rng(0).standard_normal((1, 5000)).astype(np.float32)}]
    reached_parity = []

    def reference(feeds):
        reached_parity.append(True)
        return {"top": -np.sort(-feeds["scores"], axis=-1)[:, :4000]}

    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"(?s)^top_scores \(top_scores.onnx\): 1 .*\n  /TopK \(TopK\) \[topk-k\]: `K`=4000"):
        with staged_dir(out, MANIFEST_NAME, "bundle") as staging:
            export_and_validate(TopScores(), spec, cases, reference, "numpy", staging, opset=17)
    assert not reached_parity
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_export_check(tiny_bundle, capsys):
    from conceptseg_edge.cli import main

    assert main(["export", "check", str(tiny_bundle)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parts"] == {"sam2_encoder": "ok", "sam2_decoder": "ok"}
    assert "10.1-GA" in report["source"]

    assert main(["export", "check", str(EMBEDDED)]) == 1
    parts = json.loads(capsys.readouterr().out)["parts"]
    assert parts["sam2_encoder"] == "ok" and parts["policy_vision"] == "ok"
    assert {v["op_type"] for v in parts["policy_decoder"]} == {"DynamicQuantizeLinear", "MatMulInteger"}

    assert main(["export", "check", str(tiny_bundle / "missing")]) == 2
    assert "no manifest" in capsys.readouterr().err
