"""Concept tracks: the router starts them and re-fires only on loss; the video benchmark's report.

The concept fixture's SAM2 is seeded random, so its object-score head says "absent" on every tracked
frame: each concept object is lost every ``lost_frames`` frames, which makes the re-fire schedule exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conceptseg_edge.cli import main
from conceptseg_edge.data.video_world import VideoWorld
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.runtime.tracker import ObjectPrompt, TrackerConfig, VideoSegmenter

FRAMES = 12


@pytest.fixture(scope="module")
def clip():
    world = VideoWorld(seed=0, image_size=128, length=FRAMES)
    return world.clip(world.index_of("move"))


def test_export_concept_video_carries_routes_and_video_parts(concept_video_bundle):
    manifest = load_bundle(concept_video_bundle)
    assert {"prompt", "shortcut", "reason"} <= set(manifest.routes)
    assert {"sam2_video_decoder", "sam2_memory_encoder", "sam2_memory_attention", "policy_decoder", "ctm"} <= set(manifest.parts)


def test_router_runs_on_start_and_on_loss_only(concept_video_bundle, clip):
    k = 4
    video = VideoSegmenter.from_bundle(concept_video_bundle, config=TrackerConfig(lost_frames=k))
    results = list(video.track(clip.frames, {5: ObjectPrompt(concept="segment the thing that moves across")}))
    routed = [r.index for r in results if "route" in r.timings]
    events = [(e.frame, e.kind, e.route) for r in results for e in r.events]
    assert events[0] == (0, "start", "reason")  # 6 words: the router sends it to reason
    # every later router run follows k frames whose presence was below the threshold, and says so
    assert routed == list(range(0, FRAMES, k))
    for t in routed[1:]:
        kinds = [kind for frame, kind, _ in events if frame == t]
        assert kinds[:2] == ["lost", "refire"] and kinds[2] in ("refound", "refire_failed")
    assert all(r.objects[5].mask.shape == clip.frames[0].shape[:2] for r in results)
    assert all(len(r.timings) and r.timings.total() > 0 for r in results)


def test_video_benchmark_reports_targets_shares_and_accuracy(concept_video_bundle, tmp_path, capsys):
    out, png = tmp_path / "video.json", tmp_path / "video.png"
    code = main(["bench", str(concept_video_bundle), "--video", "--frames", str(FRAMES), "--runs", "1",
                 "--accuracy-seeds", "1", "--max-new-tokens", "8", "--json", str(out), "--png", str(png)])
    assert code == 0 and png.stat().st_size > 0
    data = json.loads(out.read_text())
    assert set(data["series"]) == {"track_prompt", "prompt_every_frame", "track_concept", "reason_every_frame", "refire"}
    assert data["series"]["track_prompt"]["memory_attention"]["p50"] > 0
    assert 0 < data["memory_attention_share"] < 1
    assert data["track_over_prompt_p50"] == pytest.approx(
        data["series"]["track_prompt"]["total"]["p50"] / data["series"]["prompt_every_frame"]["total"]["p50"], abs=1e-3)
    assert data["track_target_met"] == (data["track_over_prompt_p50"] <= data["track_target"])
    assert sum(data["refire_routes"].values()) == FRAMES - 1  # forced: every tracked frame re-fires
    assert data["provider"] == "CPUExecutionProvider" and "sam2_memory_attention" in data["providers"]
    assert set(data["accuracy_jf"]) == {"CI", "CD", "CR"}
    assert all(0.0 <= v["track"] <= 1.0 and 0.0 <= v["router_every_frame"] <= 1.0 for v in data["accuracy_jf"].values())
    printed = capsys.readouterr().out
    assert "tracked frame / prompt route p50" in printed and "J&F tracked" in printed


def test_video_benchmark_on_a_prompt_only_bundle_times_the_prompt_pair(video_bundle):
    from conceptseg_edge.benchmarks.video import VideoBenchConfig, bench_video, render_video_table

    report = bench_video(video_bundle, VideoBenchConfig(frames=FRAMES, runs=1), progress=False)
    data = report.to_json()
    assert set(data["series"]) == {"track_prompt", "prompt_every_frame"}
    assert data["concept_clip_over_reason_mean"] is None and data["concept_target_met"] is None
    assert data["accuracy_jf"] == {} and data["series"]["track_prompt"]["total"]["n"] == FRAMES - 1
    assert "concept series not run" in render_video_table(report)
