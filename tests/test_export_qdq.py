"""``export qdq``: Q/DQ graphs shaped for TensorRT, measured on held-out images, the floor obeyed.

Everything runs on the embedded ConceptSeg-Tiny bundle (128 px) with a few ConceptWorld episodes, on
ONNX Runtime CPU: the calibration feeds are the runtime's own, the measurements real ORT runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptseg_edge.errors import InputError
from conceptseg_edge.export.qdq import QDQ_OP_TYPES, QdqConfig, calibration_sets, export_qdq
from conceptseg_edge.manifest import load_bundle

EMBEDDED = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"
QDQ = ("QuantizeLinear", "DequantizeLinear")
PARTS = ("sam2_encoder", "sam2_decoder", "ctm", "policy_vision")
FAST = {"calibration": "world:4", "held_out": 2}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conceptseg_edge", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def all_passed(tmp_path_factory) -> Path:
    """Every Q/DQ part shipped (floors 0): the graphs the structure tests read and the CLI runs."""
    out = tmp_path_factory.mktemp("qdq") / "all"
    export_qdq(EMBEDDED, out, QdqConfig(**FAST, floors=dict.fromkeys(PARTS, 0.0)), progress=False)
    return out


def _graph(bundle: Path, part: str):
    import onnx

    return onnx.load(str(bundle / load_bundle(bundle).parts[part].file))


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@pytest.mark.slow
def test_passed_parts_are_qdq_graphs_with_their_record(all_passed):
    manifest, source = load_bundle(all_passed), load_bundle(EMBEDDED)
    for name in PARTS:
        part = manifest.parts[name]
        assert part.precision == "int8" and part.parity is None and part.qdq is not None and part.qdq.passed
        assert part.sha256 != source.parts[name].sha256
        assert {n.op_type for n in _graph(all_passed, name).graph.node} >= set(QDQ)
        assert part.qdq.mask_iou is not None and 0.0 <= part.qdq.mask_iou <= 1.0
        assert set(part.qdq.max_abs_diff) == {t.name for t in part.outputs}
        assert part.qdq.calibration_samples > 0 and part.qdq.held_out_samples > 0
    # Untouched parts are copies; route parity (fp32 bundle vs torch) no longer describes this bundle.
    for name in ("policy_embed", "policy_decoder"):
        assert manifest.parts[name] == source.parts[name]
    assert manifest.route_parity == {}
    assert manifest.files == source.files


@pytest.mark.slow
@pytest.mark.parametrize("part", PARTS)
def test_qdq_graph_structure_is_what_tensorrt_needs(all_passed, part):
    model = _graph(all_passed, part)
    consts = _constants(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    weights = 0
    for node in model.graph.node:
        if node.op_type not in QDQ:
            continue
        # Zero points: present, constant, all zero (symmetric quantization).
        assert len(node.input) == 3 and not consts[node.input[2]].astype(np.float64).any(), node.name
        users = consumers.get(node.output[0], [])
        if node.op_type == "QuantizeLinear":
            assert users and all(u.op_type == "DequantizeLinear" for u in users), node.name
            continue
        # A DQ feeds only the ops TensorRT quantizes: never Softmax, LayerNormalization, Resize, Add...
        assert users and all(u.op_type in QDQ_OP_TYPES for u in users), (node.name, [u.op_type for u in users])
        if node.input[0] in consts:  # a weight: per-channel along the output channel
            weights += 1
            weight = consts[node.input[0]]
            axis = next(a.i for a in node.attribute if a.name == "axis")
            for user in users:
                trans_b = next((a.i for a in user.attribute if a.name == "transB"), 0)
                expected = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 0 if trans_b else 1}[user.op_type]
                assert axis % weight.ndim == expected, (node.name, user.op_type, axis)
            assert consts[node.input[1]].shape == (weight.shape[axis],), node.name
            assert weight.dtype == np.int8
    assert weights > 0
    for node in model.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "Resize"):
            producers = {n.output[0]: n.op_type for n in model.graph.node if n.output}
            assert all(producers.get(i) != "DequantizeLinear" for i in node.input), node.name


@pytest.mark.slow
def test_part_below_its_floor_keeps_fp32_with_the_measurement(tmp_path):
    out = tmp_path / "q"
    manifest = export_qdq(EMBEDDED, out, QdqConfig(**FAST, parts=("ctm", "policy_vision"),
                                                   floors={"ctm": 1.01, "policy_vision": 0.0}), progress=False)
    source = load_bundle(EMBEDDED)
    kept, shipped = manifest.parts["ctm"], manifest.parts["policy_vision"]
    assert kept.precision == "fp32" and kept.sha256 == source.parts["ctm"].sha256 and kept.parity == source.parts["ctm"].parity
    assert kept.qdq is not None and not kept.qdq.passed and kept.qdq.floors == {"mask_iou": 1.01}
    assert kept.qdq.mask_iou is not None and kept.qdq.mask_iou < 1.01
    assert shipped.precision == "int8" and shipped.qdq.passed
    # Not asked for: untouched, no record.
    assert manifest.parts["sam2_encoder"] == source.parts["sam2_encoder"]
    assert load_bundle(out).parts == manifest.parts  # every file re-hashed


def test_calibration_and_held_out_world_sets_are_disjoint():
    calibration, held_out = calibration_sets("world:6", 3, 128)
    assert len(calibration.samples) == 6 and len(held_out.samples) == 3
    seen = {s.image.tobytes() for s in calibration.samples}
    assert not seen & {s.image.tobytes() for s in held_out.samples}
    assert calibration.description != held_out.description
    assert all(s.box is not None and s.query for s in (*calibration.samples, *held_out.samples))


def _write_pngs(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(n)]
    for name in names:
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(folder / name)
    return names


@pytest.mark.slow
def test_calibration_from_a_folder_of_images(tmp_path):
    names = _write_pngs(tmp_path / "imgs", 5)
    calibration, held_out = calibration_sets(str(tmp_path / "imgs"), 2, 128)
    assert len(calibration.samples) == 3 and len(held_out.samples) == 2
    assert names[0] in calibration.description and names[-1] in held_out.description
    manifest = export_qdq(EMBEDDED, tmp_path / "q", QdqConfig(calibration=str(tmp_path / "imgs"), held_out=2,
                                                            parts=("sam2_decoder",), floors={"sam2_decoder": 0.0}),
                          progress=False)
    record = manifest.parts["sam2_decoder"].qdq
    assert record.passed and str(tmp_path / "imgs") in record.calibration and record.held_out_samples > 0


@pytest.mark.slow
def test_fp8_qdq_graph_runs_on_onnx_runtime_cpu(tmp_path):
    import onnx

    out = tmp_path / "fp8"
    manifest = export_qdq(EMBEDDED, out, QdqConfig(**FAST, precision="fp8", parts=("ctm",), floors={"ctm": 0.0}),
                          progress=False)
    part = manifest.parts["ctm"]
    assert part.precision == "fp8" and part.opset >= 19 and part.qdq.passed and "8.9" in part.qdq.tool
    model = _graph(out, "ctm")
    weights = [v for v in _constants(model).values() if v.dtype.name.startswith("float8") and v.ndim == 2]
    assert weights  # FP8 E4M3 weights, per output channel
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter

    result = ConceptSegmenter.from_bundle(out).segment(load_world_image(), query="circle", route="shortcut")
    assert result.route == "shortcut" and result.mask.shape == (128, 128)
    assert np.isfinite([result.score, result.object_score]).all()
    assert onnx.TensorProto.FLOAT8E4M3FN in {init.data_type for init in model.graph.initializer}


@pytest.mark.parametrize("make, match", [
    (lambda tmp: QdqConfig(calibration="world:0"), "world:N with N >= 1"),
    (lambda tmp: QdqConfig(precision="int4"), "--precision int4"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "q", QdqConfig(calibration=str(tmp / "empty"))), "no .png"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "q", QdqConfig(parts=("sam2_trunk",))), "sam2_trunk"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "q", QdqConfig(parts=("policy_embed",))), "Gather"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "q", QdqConfig(parts=("policy_decoder",))), "policy-precision"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "taken", QdqConfig()), "not a bundle"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "file", QdqConfig()), "not a directory"),
    (lambda tmp: export_qdq(EMBEDDED, EMBEDDED, QdqConfig()), "source bundle"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "q", QdqConfig(calibration=str(tmp / "bad"), held_out=1)), "cannot decode"),
    (lambda tmp: export_qdq(EMBEDDED, tmp / "q", QdqConfig(calibration=str(tmp / "linked"), held_out=1)), "outside"),
])
def test_bad_inputs_are_typed_errors_before_any_work(tmp_path, make, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    _write_pngs(tmp_path / "bad", 2)
    (tmp_path / "bad" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    _write_pngs(tmp_path / "linked", 1)
    (tmp_path / "linked" / "out.png").symlink_to(tmp_path / "bad" / "img0.png")  # an image outside the folder
    with pytest.raises(InputError, match=match):
        make(tmp_path)
    assert not (tmp_path / "q").exists()
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_unknown_part_names_the_bundle_parts():
    with pytest.raises(InputError) as info:
        export_qdq(EMBEDDED, Path("/nonexistent-qdq-out"), QdqConfig(parts=("sam2_trunk",)))
    assert "sam2_trunk" in str(info.value) and all(p in str(info.value) for p in load_bundle(EMBEDDED).parts)


@pytest.mark.slow
def test_cli_export_qdq_then_segment_and_bench(tmp_path, all_passed):
    out = tmp_path / "q"
    proc = cli("export", "qdq", EMBEDDED, "--out", out, "--calib", "world:3", "--held-out", "2", "--parts", "ctm")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["parts"]) == {"ctm"} and report["parts"]["ctm"]["qdq"]["held_out_samples"] > 0
    assert load_bundle(out).parts["ctm"].qdq is not None

    bad = cli("export", "qdq", EMBEDDED, "--out", tmp_path / "r", "--calib", "world:0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "world:N" in bad.stderr
    assert not (tmp_path / "r").exists()

    # The Q/DQ graphs run as they are on ONNX Runtime CPU through the user's commands.
    image = tmp_path / "img.png"
    Image.fromarray(load_world_image()).save(image)
    seg = cli("segment", all_passed, image, "--concept", "circle", "--route", "shortcut", "--out", tmp_path / "m.png",
              "--no-bank", "--json")
    assert seg.returncode == 0, seg.stderr
    assert json.loads(seg.stdout)["route"] == "shortcut"
    bench = cli("bench", all_passed, "--route", "prompt", "--runs", "2", "--warmup", "1")
    assert bench.returncode == 0, bench.stderr


def load_world_image() -> np.ndarray:
    from conceptseg_edge.data.world import ConceptWorld

    return ConceptWorld(0, 128).episode(7_000_000, with_supports=False).image
