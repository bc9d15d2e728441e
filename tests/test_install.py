"""The base install (``pip install conceptseg-edge``, no extras) is the whole torch-free runtime.

A fresh venv gets the package from this tree (its dependencies from the registry, no constraints, so a
current numpy 2) and runs ``segment`` on the embedded bundle through every route: nothing may need torch,
transformers or the ``serve`` extra's numpy<2 pin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "conceptseg_edge" / "assets"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("base") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PYTHONPATH")}
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def test_base_install_has_no_torch(base_venv: Path) -> None:
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers', 'onnx', 'tritonclient') if u.find_spec(m)])"
    out = subprocess.run([str(base_venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("prompt", [["--point", "60,60"], ["--box", "20,20,100,100"], ["--concept", "red circle"],
                                    ["--concept", "the object that differs from the others here", "--route", "reason"]])
def test_base_install_segments_the_embedded_bundle(base_venv: Path, tmp_path: Path, prompt: list[str]) -> None:
    out = tmp_path / "mask.png"
    cmd = [str(base_venv / "bin" / "conceptseg-edge"), "segment", str(ASSETS / "conceptseg_tiny"), str(ASSETS / "sample.png"),
           *prompt, "--out", str(out), "--no-bank", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["route"] in ("prompt", "shortcut", "reason")
    assert out.stat().st_size > 0
