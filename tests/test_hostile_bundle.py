"""A bundle is untrusted input: no manifest entry may make a reader load, hash or copy a file from
outside the bundle, nor a copier write outside its output.

Each class of hostile path (``..``, absolute, a symlink leaving the bundle) is tried on a part file,
an extra ``files`` entry and the processor directory of the embedded bundle, against every reader
and copier: ``segment`` (the runtime load), ``load_bundle`` (verify) and ``triton build``. Every
one refuses, naming the entry, with one ``error:`` line and nothing written outside ``--out``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptseg_edge.cli import main
from conceptseg_edge.errors import ManifestError
from conceptseg_edge.fileio import sha256_file
from conceptseg_edge.manifest import load_bundle

EMBEDDED = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"


@pytest.fixture
def bundle(tmp_path) -> Path:
    return Path(shutil.copytree(EMBEDDED, tmp_path / "bundle"))


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _edit(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _outside(bundle: Path, name: str, src: str = "sam2_decoder.onnx") -> Path:
    """A copy of a bundle file beside the bundle: same bytes, so its hash passes."""
    target = bundle.parent / "outside" / name
    target.parent.mkdir(exist_ok=True)
    shutil.copy(bundle / src, target)
    return target


def _link_out(bundle: Path, rel: str, outside: str) -> None:
    """Move ``rel`` out of the bundle and leave a symlink to it in its place (same bytes, same hash)."""
    shutil.move(bundle / rel, bundle.parent / outside)
    (bundle / rel).symlink_to(bundle.parent / outside)


def part_dotdot(bundle: Path) -> str:
    _outside(bundle, "evil.onnx")
    _edit(bundle, lambda raw: raw["parts"]["sam2_decoder"].update(file="../outside/evil.onnx"))
    return r"parts\.sam2_decoder\.file: '\.\./outside/evil\.onnx'"


def part_absolute(bundle: Path) -> str:
    evil = _outside(bundle, "evil.onnx")
    _edit(bundle, lambda raw: raw["parts"]["sam2_decoder"].update(file=str(evil)))
    return r"parts\.sam2_decoder\.file: '/.*/outside/evil\.onnx'"


def part_symlink(bundle: Path) -> str:
    _link_out(bundle, "sam2_decoder.onnx", "evil.onnx")
    return r"'sam2_decoder\.onnx' leads to .*/evil\.onnx, outside"


def files_absolute(bundle: Path) -> str:
    secret = _outside(bundle, "hostname", "processor/tokenizer_config.json")
    _edit(bundle, lambda raw: raw["files"].update({str(secret): sha256_file(secret)}))
    return r"files\['/.*/outside/hostname'\]"


def files_dotdot(bundle: Path) -> str:
    secret = _outside(bundle, "secret.txt", "processor/tokenizer_config.json")
    _edit(bundle, lambda raw: raw["files"].update({"processor/../../outside/secret.txt": sha256_file(secret)}))
    return r"files\['processor/\.\./\.\./outside/secret\.txt'\]"


def processor_symlink(bundle: Path) -> str:
    _link_out(bundle, "processor", "outside_processor")
    return r"'processor/.*' leads to .*/outside_processor/.*, outside"


def unlisted_symlink(bundle: Path) -> str:
    """A file no manifest entry names, read by the tokenizer loader all the same."""
    _edit(bundle, lambda raw: raw["files"].pop("processor/tokenizer_config.json"))
    _link_out(bundle, "processor/tokenizer_config.json", "tokenizer_config.json")
    return r"processor/tokenizer_config\.json.* leads to .*/tokenizer_config\.json, outside"


def manifest_symlink(bundle: Path) -> str:
    """The manifest itself a link to one outside, whose entries would then be trusted."""
    _link_out(bundle, "manifest.json", "other.json")
    return r"'manifest\.json' leads to .*/other\.json, outside"


def manifest_huge(bundle: Path) -> str:
    with open(bundle / "manifest.json", "ab") as fh:
        fh.truncate(17 << 20)  # sparse: 17 MiB of NULs after the JSON, no disk used
    return r"manifest\.json: 17\d+ bytes, more than a manifest's"


HOSTILE = [part_dotdot, part_absolute, part_symlink, files_absolute, files_dotdot, processor_symlink, unlisted_symlink,
           manifest_symlink, manifest_huge]


def _one_error_line(capsys, rc: int, pattern: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), (pattern, err[0])
    return err[0]


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
def test_verify_refuses_naming_the_entry(bundle, hostile):
    pattern = hostile(bundle)
    with pytest.raises(ManifestError, match=pattern):
        load_bundle(bundle)


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
def test_segment_refuses_with_one_error_line(bundle, image, tmp_path, hostile, capsys):
    pattern = hostile(bundle)
    out = tmp_path / "mask.png"
    rc = main(["segment", str(bundle), str(image), "--point", "10,10", "--out", str(out), "--no-bank"])
    _one_error_line(capsys, rc, pattern)
    assert not out.exists()


@pytest.mark.parametrize("flavor", ["python", "native"])
@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda f: f.__name__)
def test_triton_build_refuses_and_writes_nothing_outside(bundle, tmp_path, hostile, flavor, capsys):
    pattern = hostile(bundle)
    before = {p for p in tmp_path.rglob("*")}
    rc = main(["triton", "build", str(bundle), "--out", str(tmp_path / "repo" / "models"), "--flavor", flavor])
    _one_error_line(capsys, rc, pattern)
    assert {p for p in tmp_path.rglob("*")} == before  # no repository, no staging, nothing beside them


def test_a_build_failing_inside_leaves_no_directory_behind(bundle, tmp_path, capsys):
    """A part named so that Triton cannot serve it fails mid-build: no repository, no staging, and
    none of the parent directories the build created for ``--out``."""
    def rename(raw):
        part = raw["parts"].pop("ctm")
        raw["parts"]["../ctm"] = part | {"name": "../ctm"}

    _edit(bundle, rename)
    before = set(tmp_path.rglob("*"))
    rc = main(["triton", "build", str(bundle), "--out", str(tmp_path / "a" / "b" / "repo"), "--flavor", "native"])
    _one_error_line(capsys, rc, r"'\.\./ctm': not a valid Triton model name")
    assert set(tmp_path.rglob("*")) == before
