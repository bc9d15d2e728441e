"""``OrtBinding``: outputs fed back as inputs without numpy round trips, checked like ``run``.

The graph is a real ONNX Runtime session on a toy "cache" model (``present = concat(past, x)``,
``doubled = 2 x``), so the loop below is the decode loop's shape without the model around it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, save_model

from conceptseg_edge.errors import EngineIOError
from conceptseg_edge.runtime.engine import BindableEngine, OrtBinding, OrtEngine


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> OrtEngine:
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("Concat", ["past", "x"], ["present"], axis=1),
            helper.make_node("Add", ["x", "x"], ["doubled"]),
            helper.make_node("Cast", ["ids"], ["ids_f"], to=f),
            helper.make_node("ReduceSum", ["ids_f"], ["id_sum"], keepdims=0),
        ],
        "toy_cache",
        [
            helper.make_tensor_value_info("past", f, [1, "past_len", 2]),
            helper.make_tensor_value_info("x", f, [1, 1, 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"]),
        ],
        [
            helper.make_tensor_value_info("present", f, [1, "total", 2]),
            helper.make_tensor_value_info("doubled", f, [1, 1, 2]),
            helper.make_tensor_value_info("id_sum", f, []),
        ],
    )
    path = tmp_path_factory.mktemp("binding") / "toy_cache.onnx"
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return OrtEngine(path)


def test_ort_engine_is_bindable_on_its_device(engine):
    assert isinstance(engine, BindableEngine)
    assert engine.device == "cpu"
    assert isinstance(engine.binding(), OrtBinding)


def test_outputs_loop_back_and_match_run(engine):
    binding = engine.binding()
    binding.bind("past", np.zeros((1, 0, 2), np.float32))
    binding.bind("ids", np.array([[1, 2]], np.int32))  # cast to the graph's int64, as run() does
    past = np.zeros((1, 0, 2), np.float32)
    earlier = []
    for step in range(4):
        x = np.full((1, 1, 2), step + 1, np.float32)
        binding.bind("x", x)
        out = binding.run()
        expected = engine.run({"past": past, "x": x, "ids": np.array([[1, 2]])})
        for name, value in expected.items():
            np.testing.assert_array_equal(out[name].numpy(), value)
        binding.bind("past", out["present"])  # the OrtValue itself, no numpy in between
        past = expected["present"]
        earlier.append(out["present"])
    # each call's outputs are fresh allocations: earlier caches are untouched by later calls
    assert [v.numpy().shape[1] for v in earlier] == [1, 2, 3, 4]
    np.testing.assert_array_equal(earlier[1].numpy()[0, :, 0], [1, 2])
    np.testing.assert_array_equal(earlier[3].numpy()[0, :, 0], [1, 2, 3, 4])


def test_binding_checks_like_run(engine):
    binding = engine.binding()
    with pytest.raises(EngineIOError, match="no input 'y'"):
        binding.bind("y", np.zeros((1, 1, 2), np.float32))
    with pytest.raises(EngineIOError, match=r"toy_cache\.x: rank 2"):
        binding.bind("x", np.zeros((1, 2), np.float32))
    with pytest.raises(EngineIOError, match=r"toy_cache\.x: shape \(1, 1, 3\)"):
        binding.bind("x", np.zeros((1, 1, 3), np.float32))
    binding.bind("x", np.zeros((1, 1, 2), np.float32))
    with pytest.raises(EngineIOError, match=r"inputs not bound: \['ids', 'past'\]"):
        binding.run()
