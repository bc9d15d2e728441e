"""The layering contracts in ``pyproject.toml`` ([tool.importlinter]) hold, and the check can see them break.

``lint-imports`` (grimp) walks the package it finds on ``sys.path``. Under the default editable install it
sees only the ``conceptseg_edge/`` folder, not the folders ``package-dir`` maps into the namespace
(``runtime/``, ``export/``, ``serve/``…), so a contract over them would pass vacuously. The test therefore
lays the namespace out as an installed wheel would (every mapped folder copied into place, as
``package-dir`` says) and points ``lint-imports`` at that copy; planted violations in mapped folders prove
the copy is what was checked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def lay_out_namespace(dest: Path) -> Path:
    """Copy every ``package-dir`` folder's Python files to where the installed package has them."""
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):
        shutil.copytree(ROOT / folder, dest.joinpath(*package.split(".")), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "assets", "configs", "*.onnx"))
    return dest


def lint_imports(path: Path, config: Path = PYPROJECT) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` from inside the copy: it puts its working directory first on ``sys.path``."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), str(config), "--no-cache"], cwd=path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lay_out_namespace(tmp_path_factory.mktemp("layers"))


def test_contracts_kept_on_the_whole_tree(layout: Path) -> None:
    result = lint_imports(layout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 6 kept, 0 broken." in result.stdout, result.stdout
    # grimp saw the mapped folders, not only conceptseg_edge/: hundreds of files, well past the core's ~40.
    analysed = int(result.stdout.split("Analyzed ")[1].split(" files")[0])
    assert analysed > 100, result.stdout


@pytest.mark.parametrize(
    ("where", "line", "offence"),
    [
        ("runtime/planted.py", "import torch\n", "conceptseg_edge.runtime.planted -> torch"),
        ("serve/planted.py", "from conceptseg_edge.export import onnx_export\n",
         "conceptseg_edge.serve.planted -> conceptseg_edge.export.onnx_export"),
        ("conceptseg_edge/planted.py", "from conceptseg_edge.runtime import engine\n",
         "conceptseg_edge.planted -> conceptseg_edge.runtime.engine"),
        ("train/planted.py", "from conceptseg_edge.cli import main\n", "conceptseg_edge.train.planted -> conceptseg_edge.cli"),
    ],
)
def test_planted_violation_is_named(layout: Path, tmp_path: Path, where: str, line: str, offence: str) -> None:
    tree = shutil.copytree(layout, tmp_path / "tree")
    folder, name = where.split("/")
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    package = next(p for p, f in package_dir.items() if f == folder)
    planted = tree.joinpath(*package.split("."), name)
    planted.write_text(line)
    if folder == "conceptseg_edge":  # a core module: the core contract lists its modules by name
        text = PYPROJECT.read_text().replace('source_modules = ["conceptseg_edge._compat",',
                                             'source_modules = ["conceptseg_edge.planted", "conceptseg_edge._compat",')
        config = tmp_path / "pyproject.toml"
        config.write_text(text)
        result = lint_imports(tree, config)
    else:
        result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    assert offence in result.stdout, result.stdout


def test_core_contract_lists_every_core_module() -> None:
    """A module added to ``conceptseg_edge/`` is core (covered by the contract) unless it is the CLI."""
    contract = next(c for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
                    if c["name"] == "core imports no stage")
    core = ROOT / "conceptseg_edge"
    present = {f"conceptseg_edge.{p.stem}" for p in core.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {f"conceptseg_edge.{p.name}" for p in core.iterdir() if (p / "__init__.py").exists() and p.name != "cli"}
    assert set(contract["source_modules"]) == present
