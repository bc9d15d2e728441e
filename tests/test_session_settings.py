"""ONNX Runtime session settings: every engine opens with them, the session really carries them, masks do not change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conceptseg_edge.errors import InputError
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.runtime.engine import OrtEngine, OrtEngineFactory, session_options
from conceptseg_edge.runtime.predictor import SAM2Predictor
from conceptseg_edge.runtime.providers import ProviderConfig, SessionSettings, session_entries

BUNDLE = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"


def test_defaults_are_ort_defaults_except_spinning_and_the_memory_pattern():
    ort_default = ort.SessionOptions()
    ours = session_options(SessionSettings())
    for name in ("intra_op_num_threads", "inter_op_num_threads", "graph_optimization_level", "enable_cpu_mem_arena"):
        assert getattr(ours, name) == getattr(ort_default, name), name
    assert ort_default.enable_mem_pattern and not ours.enable_mem_pattern
    assert session_entries(SessionSettings()) == {"session.intra_op.allow_spinning": "0", "session.disable_prepacking": "0"}
    assert ProviderConfig().session == SessionSettings()


def test_an_engine_session_carries_the_settings_it_was_opened_with():
    settings = SessionSettings(intra_op_threads=1, spinning=True, graph_optimization="basic",
                               cpu_mem_arena=False, mem_pattern=False, prepacking=False)
    part = load_bundle(BUNDLE).part("sam2_decoder")
    engine = OrtEngine(BUNDLE / part.file, ProviderConfig(session=settings), part)
    opened = engine._session.get_session_options()
    assert engine.session_settings == settings
    assert opened.intra_op_num_threads == 1
    assert opened.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert not opened.enable_cpu_mem_arena and not opened.enable_mem_pattern
    assert opened.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opened.get_session_config_entry("session.disable_prepacking") == "1"
    assert settings.to_json()["graph_optimization"] == "basic"


def test_masks_do_not_depend_on_the_settings(sample_image):
    def predict(settings: SessionSettings):
        factory = OrtEngineFactory(ProviderConfig(session=settings))
        predictor = SAM2Predictor.from_bundle(BUNDLE, engine_factory=factory)
        predictor.set_image(sample_image)
        return predictor.predict(points=[[40, 40]])

    plain = predict(SessionSettings(graph_optimization="disable", prepacking=False, mem_pattern=False))
    tuned = predict(SessionSettings())
    assert np.array_equal(plain.mask, tuned.mask)
    np.testing.assert_allclose(plain.low_res_logits, tuned.low_res_logits, atol=1e-3)


@pytest.mark.parametrize("bad", [{"intra_op_threads": -1}, {"inter_op_threads": 1.5}, {"graph_optimization": "max"}])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        SessionSettings(**bad)


def test_the_prompt_bench_records_the_session_settings():
    from conceptseg_edge.benchmarks.prompt import BenchConfig, bench_prompt_route

    report = bench_prompt_route(BUNDLE, BenchConfig(runs=1, warmup=0), progress=False).to_json()
    assert report["ort_session"] == SessionSettings().to_json()


def test_ort_flags_reach_the_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "conceptseg_edge", "bench", str(BUNDLE), "--route", "prompt", "--runs", "1",
                           "--warmup", "0", "--ort-threads", "1", "--ort-spinning", "--json", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["ort_session"] == SessionSettings(intra_op_threads=1, spinning=True).to_json()
    bad = subprocess.run([sys.executable, "-m", "conceptseg_edge", "bench", str(BUNDLE), "--ort-threads", "-2"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--ort-threads -2" in bad.stderr and "Traceback" not in bad.stderr
