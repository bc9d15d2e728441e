"""``conceptseg-edge track`` end to end on a real (seeded SAM2) bundle with video parts: folder and
video-file sources, the output folder and overlay, equality with the in-process tracker, and every bad
input refused with one error line and nothing left behind."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conceptseg_edge.cli import main
from conceptseg_edge.data.video_world import VideoWorld, write_clip
from conceptseg_edge.preprocess import load_image
from conceptseg_edge.video import FrameSource, VideoWriter, open_frames

pytestmark = pytest.mark.slow

FRAMES = 4
BOX = "30,30,70,70"
POINT = "50,50"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = VideoWorld(0, 128, 12)
    return write_clip(world.clip(world.index_of("occlusion")), tmp_path_factory.mktemp("clip") / "clip")


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_track_a_folder_matches_the_in_process_tracker(video_bundle: Path, clip_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from conceptseg_edge.runtime.tracker import ObjectPrompt, VideoSegmenter

    out = tmp_path / "out"
    code, stdout, _ = _run(["track", str(video_bundle), str(clip_dir / "frames"), "--box", BOX, "--point", POINT,
                            "--out", str(out), "--video", str(out / "overlay.mp4"), "--max-frames", str(FRAMES),
                            "--no-bank", "--json"], capsys)  # fmt: skip
    assert code == 0
    summary = json.loads(stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["frames"] == FRAMES and summary["size"] == [128, 128] and not summary["interrupted"]
    assert summary["objects"]["1"]["prompt"] == {"points": [[50.0, 50.0]], "labels": [1], "box": [30.0, 30.0, 70.0, 70.0]}
    assert [e["kind"] for e in summary["events"]] == ["start"] and summary["events"][0]["route"] == "prompt"
    assert summary["provider"] == "CPUExecutionProvider" and "sam2_memory_attention" in summary["providers"]
    assert {"encoder", "memory_attention", "decoder", "memory_encoder", "total"} <= set(summary["mean_ms"])
    assert summary["video_codec"] in ("libx264", "mpeg4")

    lines = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(FRAMES))
    assert lines[0]["objects"]["1"]["source"] == "prompt" and lines[1]["objects"]["1"]["source"] == "track"
    assert "memory_attention" not in lines[0]["timings_ms"] and "memory_attention" in lines[1]["timings_ms"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{t:05d}_1.png" for t in range(FRAMES)]
    with open_frames(out / "overlay.mp4") as overlay:
        shown = [frame for _, frame in overlay]
    assert len(shown) == FRAMES and shown[0].shape == (128, 128, 3)
    assert sorted(p.name for p in out.iterdir()) == ["frames.jsonl", "masks", "overlay.mp4", "summary.json"]

    # The CLI's masks are the tracker's: the same frames through the API in this process.
    frames = [frame for _, frame in open_frames(clip_dir / "frames")][:FRAMES]
    prompt = ObjectPrompt(points=((50.0, 50.0),), labels=(1,), box=(30.0, 30.0, 70.0, 70.0))
    results = list(VideoSegmenter.from_bundle(video_bundle).track(frames, {1: prompt}))
    for t, result in enumerate(results):
        saved = load_image(out / "masks" / f"{t:05d}_1.png")[..., 0] > 127
        assert np.array_equal(saved, result.objects[1].mask), t
        assert lines[t]["objects"]["1"]["score"] == pytest.approx(result.objects[1].score, abs=1e-4)
    assert results[0].objects[1].mask.any()  # the biased head keeps the object present: equality is not vacuous


def test_track_a_video_file_overlay_outside_the_folder(video_bundle: Path, clip_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    movie = tmp_path / "clip.mp4"
    with VideoWriter(movie, fps=12) as writer:
        for _, frame in open_frames(clip_dir / "frames"):
            writer.write(frame)
    overlay = tmp_path / "shown" / "overlay.mkv"
    code, stdout, stderr = _run(["track", str(video_bundle), str(movie), "--point", POINT, "--out", str(tmp_path / "out"),
                                 "--video", str(overlay), "--max-frames", "2", "--no-bank"], capsys)  # fmt: skip
    assert code == 0 and stdout == ""
    assert "2 frames, object 1 in" in stderr and "ms a frame on CPUExecutionProvider" in stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["fps"] == pytest.approx(12.0) and summary["video"] == str(overlay)
    assert len(list(open_frames(overlay))) == 2
    assert sorted(p.name for p in overlay.parent.iterdir()) == ["overlay.mkv"]  # no temporary left beside it


class _StopsAfter(FrameSource):
    """A real clip's frames, then Ctrl-C: the user stopping a live stream."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        super().__init__("live", 25.0, None)
        self.frames = frames

    def _frames(self) -> Iterator[np.ndarray]:
        yield from self.frames
        raise KeyboardInterrupt


def test_ctrl_c_keeps_what_was_tracked(video_bundle: Path, clip_dir: Path, tmp_path: Path) -> None:
    from conceptseg_edge.cli.track import object_prompts, track_to_folder
    from conceptseg_edge.runtime.tracker import VideoSegmenter

    frames = [frame for _, frame in open_frames(clip_dir / "frames")][:2]
    summary = track_to_folder(VideoSegmenter.from_bundle(video_bundle), _StopsAfter(frames),
                              object_prompts([[50.0, 50.0]], None, []), tmp_path / "out", progress=False)  # fmt: skip
    assert summary["interrupted"] and summary["frames"] == 2 and summary["fps"] == 25.0
    assert len((tmp_path / "out" / "frames.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- bad input


def test_bad_requests_fail_before_any_engine(video_bundle: Path, clip_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "out"
    frames = str(clip_dir / "frames")
    cases = [
        ([frames], "no prompt: give --point"),
        ([str(tmp_path / "missing.mp4"), "--point", POINT], "missing.mp4: no such file or folder"),
        ([frames, "--point", POINT, "--video", str(tmp_path / "o.gif")], "--video .*o.gif: expected one of .mp4"),
        ([frames, "--point", POINT, "--max-frames", "0"], "--max-frames 0: expected at least 1"),
        ([frames, "--concept", " "], "concept: empty text"),
        ([frames, "--point", POINT, "--label", "1", "--label", "0"], "--label: 2 labels for 1 points"),
        ([frames, "--concept", "red circle"], "this bundle has no concept routes"),
    ]
    (tmp_path / "notes.mp4").write_text("not a video")
    cases.append(([str(tmp_path / "notes.mp4"), "--point", POINT], "notes.mp4: cannot open as a video"))
    for args, message in cases:
        code, _, stderr = _run(["track", str(video_bundle), *args, "--out", str(out), "--no-bank"], capsys)
        assert code == 2, (args, stderr)
        assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1
        assert re.search(message, stderr), (message, stderr)
        assert not out.exists()


def test_labels_pair_with_points() -> None:
    from conceptseg_edge.cli.track import object_prompts

    both = object_prompts([[1.0, 2.0], [3.0, 4.0]], [0.0, 0.0, 9.0, 9.0], ["cat"], labels=[1, 0])
    assert both[1].points == ((1.0, 2.0), (3.0, 4.0)) and both[1].labels == (1, 0) and both[1].box == (0.0, 0.0, 9.0, 9.0)
    assert both[2].concept == "cat" and object_prompts([[1.0, 2.0, 0.0]], None, [])[1].labels == (0,)


def test_bundle_without_video_parts(tiny_bundle: Path, tmp_path: Path, clip_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, stderr = _run(["track", str(tiny_bundle), str(clip_dir / "frames"), "--point", POINT,
                            "--out", str(tmp_path / "out"), "--no-bank"], capsys)  # fmt: skip
    assert code == 2 and "no video parts" in stderr and "--video" in stderr
    assert not (tmp_path / "out").exists()


def test_frame_size_change_mid_stream_leaves_nothing(video_bundle: Path, clip_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    frames = [frame for _, frame in open_frames(clip_dir / "frames")]
    Image.fromarray(frames[0]).save(folder / "0.png")
    Image.fromarray(frames[1][:, :96]).save(folder / "1.png")
    code, _, stderr = _run(["track", str(video_bundle), str(folder), "--point", POINT, "--out", str(tmp_path / "out"),
                            "--video", str(tmp_path / "overlay.mp4"), "--no-bank"], capsys)  # fmt: skip
    assert code == 2 and "frame 1 is 96x128, the frames before it 128x128" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]  # no folder, no overlay, no temporaries
