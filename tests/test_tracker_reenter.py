"""ConceptSeg-Tiny (the embedded bundle) on a clip built for a re-fire: the salient object leaves the
frame for 8 frames and comes back.

Measured on this clip (VideoWorld seed 1, "salient reenter", 128 px, 30 frames; the object is away on
frames 8-15): the tracker follows it (J 0.83-0.90), shows nothing once it has left, counts the object
lost after ``lost_frames`` frames without it, re-fires the router while it is away (nothing found:
the object is *searching*), and the first re-fire after its return finds it again (J 0.84-0.90).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conceptseg_edge.data.video_world import VideoWorld
from conceptseg_edge.metrics import iou
from conceptseg_edge.runtime.tracker import ObjectPrompt, TrackerConfig, VideoSegmenter

ASSET = Path(__file__).resolve().parents[1] / "conceptseg_edge" / "assets" / "conceptseg_tiny"


def test_an_object_that_leaves_and_returns_is_found_again_by_a_re_fire():
    world = VideoWorld(seed=1, image_size=128, length=30)
    clip = world.clip(world.index_of("salient reenter"))
    truth = clip.target_masks()
    away = [t for t in range(len(clip)) if not truth[t].any()]
    assert away == list(range(8, 16))  # the clip's promise, before anything is judged on it
    k = TrackerConfig().lost_frames
    results = list(VideoSegmenter.from_bundle(ASSET).track(clip.frames, {1: ObjectPrompt(concept=clip.query)}))
    events = [(e.frame, e.kind) for r in results for e in r.events]
    j = [iou(r.objects[1].mask, truth[r.index]) for r in results]
    assert np.mean(j[: away[0]]) > 0.7  # tracked before it leaves
    assert all(not results[t].objects[1].mask.any() for t in away)  # nothing shown while it is away
    lost = [t for t, kind in events if kind == "lost"]
    failed = [t for t, kind in events if kind == "refire_failed"]
    refound = [t for t, kind in events if kind == "refound"]
    assert any(t in away for t in lost) and all(t in away for t in failed) and failed  # lost, searched for, absent
    back = min(t for t in refound if t > away[-1])
    assert back <= away[-1] + 1 + k  # found again by the first re-fire after it returns
    assert np.mean(j[back:]) > 0.7  # and tracked from there
    routed = [r.index for r in results if "route" in r.timings]
    assert len(routed) <= 1 + len(results) // k  # the policy ran on the start and on loss only
