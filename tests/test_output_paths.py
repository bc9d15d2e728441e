"""Outputs are checked before any work: a path that cannot be written is one ``error:`` line naming
the option, before the bundle is even read, and a command that writes several files writes all of
them or none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.cli import main
from conceptseg_edge.fileio import atomic_paths

ASSETS = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets"
BUNDLE, IMAGE = ASSETS / "conceptseg_tiny", ASSETS / "sample.png"


@pytest.fixture
def place(tmp_path) -> Path:
    """A directory holding a plain file ``file.txt`` and a directory ``dir``."""
    (tmp_path / "file.txt").write_text("not a directory")
    (tmp_path / "dir").mkdir()
    return tmp_path


# (extra arguments given a place, the option the error names, what it says). The segment cases run on
# a bundle path that does not exist: the error is about the output, so it came before the bundle.
SEGMENT = {
    "out_parent_is_file": (lambda p: ["--out", f"{p}/file.txt/mask.png"], "--out", "is a file, expected a directory"),
    "out_under_file_deeper": (lambda p: ["--out", f"{p}/file.txt/a/b/mask.png"], "--out", "is a file, expected a directory"),
    "out_is_directory": (lambda p: ["--out", f"{p}/dir"], "--out", "is a directory, expected a file"),
    "out_empty": (lambda p: ["--out", ""], "--out", "empty path"),
    "out_unwritable": (lambda p: ["--out", "/proc/conceptseg-edge/mask.png"], "--out", "cannot create files in /proc"),
    "overlay_parent_is_file": (lambda p: ["--out", f"{p}/mask.png", "--overlay", f"{p}/file.txt/o.png"], "--overlay",
                               "is a file, expected a directory"),
    "overlay_is_out": (lambda p: ["--out", f"{p}/mask.png", "--overlay", f"{p}/./mask.png"], "--overlay", "the same file as --out"),
    "overlay_empty": (lambda p: ["--out", f"{p}/mask.png", "--overlay", ""], "--overlay", "empty path"),
    "bank_is_file": (lambda p: ["--out", f"{p}/mask.png", "--bank", f"{p}/file.txt"], "--bank", "exists and is not a directory"),
    "bank_under_file": (lambda p: ["--out", f"{p}/mask.png", "--bank", f"{p}/file.txt/bank"], "--bank", "is a file, expected a directory"),
    "bank_empty": (lambda p: ["--out", f"{p}/mask.png", "--bank", ""], "--bank", "empty path"),
}


def _one_error_line(capsys, rc: int, option: str, says: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith(f"error: {option}"), err
    assert says in err[0], err[0]


def _new_files(place: Path) -> set[Path]:
    return {p for p in place.rglob("*") if p.name not in ("file.txt", "dir")}


@pytest.mark.parametrize("case", SEGMENT)
def test_segment_checks_outputs_before_anything_else(place, case, capsys):
    args, option, says = SEGMENT[case]
    rc = main(["segment", str(place / "no-such-bundle"), str(IMAGE), "--point", "10,10", *args(place)])
    _one_error_line(capsys, rc, option, says)
    assert not _new_files(place)


# Every other command that writes: ``data make-world|import --out``, the exports' ``--out`` (before the
# checkpoint is loaded), a bundle writer's ``--out`` (``fileio.staged_dir``: ``triton build``, the
# default-bundle builder), ``bench --json/--png``, ``demo --out``, ``client --out`` (before any request).
OTHERS = {
    "world_on_file": (lambda p: ["data", "make-world", "--n", "1", "--out", f"{p}/file.txt"], "--out", "exists and is not a directory"),
    "world_under_file": (lambda p: ["data", "make-world", "--n", "1", "--out", f"{p}/file.txt/world"], "--out",
                         "is a file, expected a directory"),
    "world_empty": (lambda p: ["data", "make-world", "--n", "1", "--out", ""], "--out", "empty path"),
    # ``data import``: the output is refused before the (here missing) source is read
    "import_mvtec_under_file": (lambda p: ["data", "import", "mvtec", str(p / "no-such-src"), "--out", f"{p}/file.txt/ds"],
                                "--out", "is a file, expected a directory"),
    "import_folder_on_file": (lambda p: ["data", "import", "folder", str(p / "no-such-src"), "--class", "polyp",
                                         "--out", f"{p}/file.txt"], "--out", "exists and is not a directory"),
    "import_coco_empty": (lambda p: ["data", "import", "coco", str(p / "no-such.json"), "--out", ""], "--out", "empty path"),
    "triton_under_file": (lambda p: ["triton", "build", str(BUNDLE), "--out", f"{p}/file.txt/repo"], "--out",
                          "is a file, expected a directory"),
    "triton_unwritable": (lambda p: ["triton", "build", str(BUNDLE), "--out", "/proc/conceptseg-edge/repo"], "--out",
                          "cannot create files in /proc"),
    "export_concept_under_file": (lambda p: ["export", "concept", str(p / "no-such-checkpoint"), "--out", f"{p}/file.txt/b"],
                                  "--out", "is a file, expected a directory"),
    "export_sam2_under_file": (lambda p: ["export", "sam2", "--out", f"{p}/file.txt/b"], "--out", "is a file, expected a directory"),
    "bench_json_under_file": (lambda p: ["bench", str(p / "no-such-bundle"), "--json", f"{p}/file.txt/b.json"], "--json",
                              "is a file, expected a directory"),
    "bench_png_is_dir": (lambda p: ["bench", str(p / "no-such-bundle"), "--route", "all", "--png", f"{p}/dir"], "--png",
                         "is a directory, expected a file"),
    "demo_on_file": (lambda p: ["demo", "--bundle", str(p / "no-such-bundle"), "--out", f"{p}/file.txt"], "--out",
                     "exists and is not a directory"),
    "client_under_file": (lambda p: ["client", "http://127.0.0.1:9", str(IMAGE), "--point", "1,1",
                                     "--out", f"{p}/file.txt/m.png"], "--out", "is a file, expected a directory"),
}


@pytest.mark.parametrize("case", OTHERS)
def test_other_commands_check_outputs_first(place, case, capsys):
    args, option, says = OTHERS[case]
    rc = main(args(place))
    _one_error_line(capsys, rc, option, says)
    assert not _new_files(place)


def test_segment_writes_mask_and_overlay(place, capsys):
    rc = main(["segment", str(BUNDLE), str(IMAGE), "--point", "10,10", "--no-bank",
               "--out", str(place / "m" / "mask.png"), "--overlay", str(place / "o" / "overlay.png")])
    assert rc == 0 and (place / "m" / "mask.png").is_file() and (place / "o" / "overlay.png").is_file()
    assert not [p for p in place.rglob("*.tmp")]


def test_outputs_are_written_all_or_none(tmp_path):
    """The second output fails after the first was written: neither appears, no temp file stays."""
    first, second = tmp_path / "mask.png", tmp_path / "sub" / "overlay.png"
    with pytest.raises(RuntimeError, match="overlay failed"), atomic_paths(first, second) as (a, b):
        a.write_bytes(np.zeros(4, np.uint8).tobytes())
        raise RuntimeError("overlay failed")
    assert not first.exists() and not second.exists()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with atomic_paths(first, second) as (a, b):
        a.write_text("mask")
        b.write_text("overlay")
        assert not first.exists()  # nothing lands before the block has written every file
    assert (first.read_text(), second.read_text()) == ("mask", "overlay")
