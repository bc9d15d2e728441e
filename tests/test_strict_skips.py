"""Strict skips allow a skip by marker only (trt, gpu), never by what its message says."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
TESTS = Path(__file__).resolve().parent

CASES = '''
import pytest

@pytest.mark.trt
def test_engine():
    pytest.skip("tensorrt not importable")

@pytest.mark.gpu
def test_cuda():
    pytest.skip("no CUDA device")

def test_broken_import():
    pytest.skip("could not import onnxruntime-gpu: libcudart missing")  # mentions CUDA, carries no marker
'''


@pytest.mark.parametrize("strict", ["1", "0"])
def test_only_marked_skips_pass(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, strict: str) -> None:
    monkeypatch.setenv("CONCEPTSEG_STRICT_SKIPS", strict)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makeini("[pytest]\nmarkers =\n    trt: t\n    gpu: g\n")
    pytester.makepyfile(CASES)
    result = pytester.runpytest_subprocess("-p", "strict_skips", "-rs")
    result.assert_outcomes(skipped=3)
    if strict == "1":
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["*1 skip(s) outside the trt/gpu markers*", "*test_broken_import*"])
        assert "test_engine:" not in result.stdout.str() and "test_cuda:" not in result.stdout.str()
    else:
        assert result.ret == pytest.ExitCode.OK
