"""``VideoSegmenter``: SAM2's video tracking over a bundle's video parts, torch-free, per stream.

One ``VideoSegmenter`` holds the engines and the router (shared, stateless across streams); each
``VideoStream`` holds one stream's memory bank. Per frame and object the arithmetic is SAM2's
``track_step`` (``sam2_base.py``), with the graphs doing the tensor work:

- a frame where an object starts (points / box, or a mask the router found for a concept) is a
  *conditioning frame*: decoded without memory (SAM2's ``_use_mask_as_output`` for a mask), then
  its memory encoded with the mask binarised;
- every other frame attends to that object's memory (``sam2_memory_attention``): the conditioning
  frames, the ``num_maskmem - 1`` previous frames and up to ``max_obj_ptrs`` object pointers, with
  SAM2's temporal positions; the decoder runs on the result with no prompt (best of three masks),
  and the memory encoder stores the frame.

Memory is bounded: per object, at most ``max_cond_frames`` conditioning frames (the most recent, the
ones SAM2's ``select_closest_cond_frames`` picks when tracking forward) and the frames inside the
attention window; memory features are held as bfloat16, as SAM2's video predictor stores them.

Concept objects start through the router (shortcut or reason). When such an object's presence score
stays below τ, or its mask empty, for ``lost_frames`` frames, the router re-fires on the current
frame; a mask it finds becomes a new conditioning frame. When it finds nothing the object is
*searching*: no tracking from stale memory, the router once every ``lost_frames`` frames until it
finds the object again. The policy therefore runs only on a start, a loss, or a search.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from conceptseg_edge.errors import InputError, ManifestError
from conceptseg_edge.generation import GenerationConfig
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.preprocess import as_rgb_array, encode_prompts, make_prompts, resize_plane, select_mask, upsample_mask
from conceptseg_edge.router import RouterConfig, count_words
from conceptseg_edge.runtime.engine import Engine, EngineFactory, open_engine, open_part
from conceptseg_edge.runtime.segmenter import ConceptSegmenter
from conceptseg_edge.timings import Timings, elapsed_ms

VIDEO_PARTS = ("sam2_video_decoder", "sam2_memory_encoder", "sam2_memory_attention")

# SAM2's score for "no object here" (sam2_base.NO_OBJ_SCORE): absent objects' mask logits are set to it.
NO_OBJ_SCORE = -1024.0
# ``_use_mask_as_output``: a binary mask becomes logits of ±10 (sigmoid(-10) ≈ 4.5e-5).
MASK_OUT_SCALE, MASK_OUT_BIAS = 20.0, -10.0


@dataclass(frozen=True, eq=False)
class ObjectPrompt:
    """How an object starts: points (+labels) and/or a box in original-frame pixels, a mask of the
    frame (SAM2's ``add_new_mask``), or a concept query for the router."""

    points: tuple[tuple[float, float], ...] | None = None
    labels: tuple[int, ...] | None = None
    box: tuple[float, float, float, float] | None = None
    concept: str | None = None
    mask: np.ndarray | None = None  # (H, W) bool, the size of the frames

    def __post_init__(self) -> None:
        geometry = bool(self.points) or self.box is not None
        concept = self.concept is not None and bool(self.concept.strip())
        if self.concept is not None and not concept:
            raise InputError("concept: empty text")
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 2 or mask.dtype != bool or not mask.any():
                raise InputError(f"mask: expected a non-empty (H, W) bool mask, got {mask.dtype} {mask.shape}")
        if geometry + concept + (self.mask is not None) != 1:
            raise InputError("object prompt: give points and/or a box, a mask, or a concept (exactly one kind)")
        if self.labels is not None and not self.points:
            raise InputError("object prompt: labels given without points")

    @property
    def kind(self) -> str:
        return "concept" if self.concept is not None else "mask" if self.mask is not None else "geometry"


@dataclass(frozen=True)
class TrackerConfig:
    """SAM2's memory sizes (SAM 2.1 values) and the re-fire rule."""

    num_maskmem: int = 7  # the conditioning frames + the 6 previous frames (SAM2: num_maskmem)
    max_obj_ptrs: int = 16  # object pointers attended to (SAM2: max_obj_ptrs_in_encoder)
    max_cond_frames: int = 4  # conditioning frames kept per object (SAM2 keeps all: unbounded)
    lost_frames: int = 5  # K: consecutive frames below the threshold before the router re-fires
    lost_threshold: float | None = None  # on sigmoid(object score); None: max(the router's tau(words), 0.5)
    max_objects: int = 16

    def __post_init__(self) -> None:
        for name, low in (("num_maskmem", 2), ("max_obj_ptrs", 2), ("max_cond_frames", 1), ("lost_frames", 1), ("max_objects", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise InputError(f"tracker {name}: expected an integer >= {low}, got {value!r}")
        if self.lost_threshold is not None and not 0.0 < self.lost_threshold < 1.0:
            raise InputError(f"tracker lost_threshold: expected a probability in (0, 1), got {self.lost_threshold!r}")

    @property
    def window(self) -> int:
        """How many previous frames any rule looks back: older non-conditioning memory is dropped."""
        return max(self.num_maskmem - 1, self.max_obj_ptrs - 1)


@dataclass
class ObjectMask:
    """One object on one frame, in the original frame size."""

    obj_id: int
    mask: np.ndarray  # (H, W) bool
    score: float  # the decoder's predicted IoU of the chosen mask (1.0 for a mask prompt)
    object_score: float  # sigmoid of the object-score logit
    present: bool  # SAM2's rule: object-score logit > 0
    source: str  # "track", or the start's route: "prompt" | "shortcut" | "reason"


@dataclass(frozen=True)
class TrackEvent:
    """Something the tracker did beyond tracking: a start, a loss, a re-fire and its outcome."""

    frame: int
    obj_id: int
    kind: str  # "start" | "lost" | "refire" | "refound" | "refire_failed"
    route: str | None
    reason: str


@dataclass
class FrameResult:
    index: int
    objects: dict[int, ObjectMask]
    events: list[TrackEvent]
    timings: Timings  # summed over the frame's objects


@dataclass
class _Memory:
    """What one frame leaves in an object's memory bank."""

    features: np.ndarray  # (m, g, g) bfloat16 bits as uint16
    obj_ptr: np.ndarray  # (C,) float32


@dataclass
class _Track:
    prompt: ObjectPrompt
    state: str = "new"  # "new" (starts on the next frame) | "tracking" | "searching" (concept not found yet)
    cond: dict[int, _Memory] = field(default_factory=dict)  # conditioning frames, oldest first
    recent: dict[int, _Memory] = field(default_factory=dict)  # tracked frames inside the window
    below: int = 0  # consecutive frames below the lost threshold


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), round to nearest even, as torch's ``.to(torch.bfloat16)``."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class VideoSegmenter:
    """Engines and router for tracking; ``stream()`` makes one stream's state. Not thread-safe:
    one call at a time (the router's image cache is shared)."""

    def __init__(
        self,
        segmenter: ConceptSegmenter,
        decoder: Engine,
        memory_encoder: Engine,
        memory_attention: Engine,
        config: TrackerConfig = TrackerConfig(),
    ) -> None:
        self.segmenter = segmenter
        self.decoder = decoder
        self.memory_encoder = memory_encoder
        self.memory_attention = memory_attention
        self.config = config
        self.pre = segmenter.predictor.pre

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Path,
        provider: str = "cpu",
        bank_dir: str | Path | None = None,
        config: TrackerConfig = TrackerConfig(),
        router: RouterConfig | None = None,
        engine_factory: EngineFactory = open_engine,
        generation: GenerationConfig = GenerationConfig(),
    ) -> VideoSegmenter:
        """Load a verified bundle exported with ``--video``; concept starts need its concept routes."""
        bundle = Path(bundle)
        manifest = load_bundle(bundle)
        missing = [p for p in VIDEO_PARTS if p not in manifest.parts]
        if missing:
            raise ManifestError(f"{bundle}: no video parts ({', '.join(missing)}): re-export it with --video")
        segmenter = ConceptSegmenter.from_bundle(bundle, provider, bank_dir, generation, router, engine_factory, manifest)
        engines = (open_part(bundle, manifest, name, provider, engine_factory) for name in VIDEO_PARTS)
        return cls(segmenter, *engines, config=config)

    def providers(self) -> dict[str, str]:
        engines = zip(VIDEO_PARTS, (self.decoder, self.memory_encoder, self.memory_attention))
        return self.segmenter.providers() | {name: engine.provider for name, engine in engines}

    def stream(self, num_frames: int | None = None) -> VideoStream:
        """A new stream; ``num_frames`` (when the length is known) caps the pointers as SAM2 does."""
        return VideoStream(self, num_frames)

    def track(self, frames: Iterable[np.ndarray], prompts: Mapping[int, ObjectPrompt]) -> Iterator[FrameResult]:
        """A whole video: every object in ``prompts`` starts on the first frame."""
        if not prompts:
            raise InputError("track: give at least one object prompt")
        stream = self.stream(len(frames) if hasattr(frames, "__len__") else None)
        for obj_id, prompt in prompts.items():
            stream.add_object(prompt, obj_id)
        for frame in frames:
            yield stream.add_frame(frame)


class VideoStream:
    """One stream's objects and memory; frames go in through ``add_frame``."""

    def __init__(self, video: VideoSegmenter, num_frames: int | None = None) -> None:
        if num_frames is not None and num_frames < 1:
            raise InputError(f"num_frames: expected >= 1, got {num_frames}")
        self.video = video
        self.num_frames = num_frames
        self._tracks: dict[int, _Track] = {}
        self._frame_hw: tuple[int, int] | None = None
        self._index = -1

    @property
    def frame_index(self) -> int:
        """Index of the last frame processed (-1 before the first)."""
        return self._index

    @property
    def objects(self) -> tuple[int, ...]:
        return tuple(self._tracks)

    def add_object(self, prompt: ObjectPrompt, obj_id: int | None = None) -> int:
        """Register an object; it starts on the next frame given to ``add_frame``."""
        if not isinstance(prompt, ObjectPrompt):
            raise InputError(f"add_object: expected an ObjectPrompt, got {type(prompt).__name__}")
        if obj_id is None:
            obj_id = max(self._tracks, default=0) + 1
        if not isinstance(obj_id, int) or isinstance(obj_id, bool) or obj_id < 0:
            raise InputError(f"obj_id: expected a non-negative integer, got {obj_id!r}")
        if obj_id in self._tracks:
            raise InputError(f"obj_id {obj_id}: already tracked in this stream")
        if len(self._tracks) >= self.video.config.max_objects:
            raise InputError(f"add_object: the stream already tracks {len(self._tracks)} objects (max_objects)")
        if prompt.concept is not None and not {"shortcut", "reason"} & self.video.segmenter.routes:
            raise InputError(f"concept {prompt.concept!r}: this bundle has no concept routes (prompt only)")
        self._tracks[obj_id] = _Track(prompt)
        return obj_id

    def remove_object(self, obj_id: int) -> None:
        if obj_id not in self._tracks:
            raise InputError(f"obj_id {obj_id}: not tracked in this stream (tracking {sorted(self._tracks)})")
        del self._tracks[obj_id]

    # ------------------------------------------------------------------ frames

    def add_frame(self, image: np.ndarray) -> FrameResult:
        """Track every object into ``image`` ((H, W, 3) uint8; the first frame fixes the size)."""
        image = as_rgb_array(image, "frame")
        hw = image.shape[:2]
        if self._frame_hw is not None and hw != self._frame_hw:
            raise InputError(f"frame {self._index + 1}: size {hw[1]}x{hw[0]} differs from the stream's {self._frame_hw[1]}x{self._frame_hw[0]}")
        if not self._tracks:
            raise InputError("add_frame: no object in this stream: add_object() first")
        self._check_new_prompts(hw)
        self._frame_hw = hw  # a refused frame fixes nothing
        self._index += 1
        t = self._index
        seg = self.video.segmenter
        seg.set_image(image)
        timings = seg.predictor.image_timings
        features = seg.predictor.features
        objects: dict[int, ObjectMask] = {}
        events: list[TrackEvent] = []
        for obj_id, track in self._tracks.items():
            if track.state == "new":
                out, stages = self._start(obj_id, track, image, features, events)
            elif track.state == "searching":
                out, stages = self._search(obj_id, track, image, features, events)
            else:
                out, stages = self._track(obj_id, track, image, features, events)
            objects[obj_id] = out
            timings = _add(timings, stages)
            self._forget(track, t)
        return FrameResult(t, objects, events, timings)

    def _check_new_prompts(self, hw: tuple[int, int]) -> None:
        """Points and boxes of objects starting on this frame, against its size, before any graph runs.
        An object whose prompt does not fit is removed (the stream stays usable) and named."""
        for obj_id, track in list(self._tracks.items()):
            prompt = track.prompt
            if track.state == "new" and prompt.kind != "concept":
                try:
                    if prompt.kind == "mask" and prompt.mask.shape != hw:
                        raise InputError(f"mask: {prompt.mask.shape[1]}x{prompt.mask.shape[0]}, the frame is {hw[1]}x{hw[0]}")
                    if prompt.kind == "mask" and self._model_mask(prompt.mask) is None:
                        raise InputError(f"mask: nothing of it is left at the model's {self.video.pre.image_size} px input")
                    if prompt.kind == "geometry":
                        make_prompts(prompt.points, prompt.labels, prompt.box, hw)
                except InputError as exc:
                    del self._tracks[obj_id]
                    raise InputError(f"obj_id {obj_id} (removed from the stream): {exc}") from exc

    # ------------------------------------------------------------------ starts

    def _start(self, obj_id: int, track: _Track, image, features, events) -> tuple[ObjectMask, Timings]:
        prompt = track.prompt
        if prompt.kind == "geometry":
            out, stages = self._start_from_geometry(track, image.shape[:2], features)
        elif prompt.kind == "mask":
            out, stages = self._start_from_mask(track, self._model_mask(prompt.mask), image.shape[:2], features, "prompt")
        if prompt.kind != "concept":
            events.append(TrackEvent(self._index, obj_id, "start", "prompt", f"{prompt.kind} on this frame"))
            track.state = "tracking"
            return _named(out, obj_id), stages
        found, out, stages = self._route(track, image, features)
        # A concept not found yet is looked for again every lost_frames frames, not on every frame.
        track.state = "tracking" if found else "searching"
        events.append(TrackEvent(self._index, obj_id, "start", out.source, "found" if found else "not found on this frame"))
        return _named(out, obj_id), stages

    def _search(self, obj_id: int, track: _Track, image, features, events) -> tuple[ObjectMask, Timings]:
        """A concept not found yet, or lost and not found by its re-fire: nothing is tracked from
        (stale) memory; the router re-fires every lost_frames frames until it finds the object."""
        track.below += 1
        absent = ObjectMask(obj_id, np.zeros(image.shape[:2], bool), 0.0, 0.0, False, "track")
        if track.below < self.video.config.lost_frames:
            return absent, Timings()
        track.below = 0
        found, out, stages = self._refire(obj_id, track, image, features, events)
        if found:
            track.state = "tracking"
            return _named(out, obj_id), stages
        return absent, stages

    def _start_from_geometry(self, track: _Track, hw, features) -> tuple[ObjectMask, Timings]:
        """SAM2's first frame of a prompted object: decode without memory, encode memory binarised."""
        prompt = track.prompt
        prompts = make_prompts(prompt.points, prompt.labels, prompt.box, hw)
        coords, labels = encode_prompts(prompts, hw, self.video.pre.image_size)
        decoded, stages = self._decode(features["image_embed"], features, coords, labels, prompts.multimask)
        memory, mem_ms = self._encode_memory(features, decoded.logits, decoded.object_logit, from_prompt=True)
        track.cond[self._index] = _Memory(memory, decoded.obj_ptr)
        self._cap_cond(track)
        return self._output(decoded, hw, "prompt", stages | Timings(memory_encoder=mem_ms))

    def _route(self, track: _Track, image, features) -> tuple[bool, ObjectMask, Timings]:
        """Run the router for a concept on this frame; a mask it finds becomes a conditioning frame."""
        hw = image.shape[:2]
        t0 = time.perf_counter_ns()
        found = self.video.segmenter.segment(image, query=track.prompt.concept)
        stages = Timings(route=elapsed_ms(t0))
        full = self._model_mask(found.mask)
        if full is None:
            empty = ObjectMask(-1, np.zeros(hw, bool), found.score, found.object_score, False, found.route)
            return False, empty, stages
        out, started = self._start_from_mask(track, full, hw, features, found.route)
        return True, out, stages | started

    def _model_mask(self, mask: np.ndarray) -> np.ndarray | None:
        """A frame's mask at the model's input, as SAM2's ``add_new_mask`` resizes it (bilinear with
        antialiasing, kept at >= 0.5); None when nothing of it is left."""
        size = self.video.pre.image_size
        full = resize_plane(mask.astype(np.float32), (size, size), antialias=True) >= 0.5
        return full if full.any() else None

    def _start_from_mask(self, track: _Track, full: np.ndarray, hw, features, source: str) -> tuple[ObjectMask, Timings]:
        """A conditioning frame from a mask at the model's input (``_use_mask_as_output``)."""
        decoded, stages = self._decode_mask(features, full)
        memory, mem_ms = self._encode_memory(features, decoded.logits, decoded.object_logit, from_prompt=True)
        track.cond[self._index] = _Memory(memory, decoded.obj_ptr)
        self._cap_cond(track)
        track.below = 0
        return self._output(decoded, hw, source, stages | Timings(memory_encoder=mem_ms))

    def _refire(self, obj_id: int, track: _Track, image, features, events) -> tuple[bool, ObjectMask, Timings]:
        found, out, stages = self._route(track, image, features)
        events.append(TrackEvent(self._index, obj_id, "refire", out.source, f"router re-fired for {track.prompt.concept!r}"))
        events.append(TrackEvent(self._index, obj_id, "refound" if found else "refire_failed", out.source,
                                 "mask found, new conditioning frame" if found else "nothing found"))
        return found, out, stages

    def _decode_mask(self, features, full: np.ndarray) -> tuple[_Decoded, Timings]:
        """SAM2's ``_use_mask_as_output``: the mask is the output (as ±10 logits, downscaled with
        antialiasing); the decoder runs with it as a mask prompt only for the object pointer."""
        size = self.video.pre.image_size
        low = self.video.pre.low_res_size
        high = full.astype(np.float32) * MASK_OUT_SCALE + MASK_OUT_BIAS
        logits = resize_plane(high, (low, low), antialias=True)
        coords, labels = _no_points()
        t0 = time.perf_counter_ns()
        out = self.video.decoder.run({
            **features,
            "point_coords": coords,
            "point_labels": labels,
            "concept_tokens": np.zeros((1, 0, 256), np.float32),
            "mask_input": full.reshape(1, 1, size, size).astype(np.float32),
            "has_mask_input": np.ones((1,), np.float32),
        })
        stages = Timings(decoder=elapsed_ms(t0), providers={"decoder": self.video.decoder.provider})
        object_logit = MASK_OUT_SCALE + MASK_OUT_BIAS  # the mask is non-empty (``_model_mask``): "appearing"
        return _Decoded(logits, 1.0, object_logit, out["obj_ptrs"][0, 0]), stages

    # ------------------------------------------------------------------ tracking

    def _track(self, obj_id: int, track: _Track, image, features, events) -> tuple[ObjectMask, Timings]:
        t = self._index
        memory, tpos, ptrs, ptr_tpos = self._gather(track, t)
        t0 = time.perf_counter_ns()
        conditioned = self.video.memory_attention.run({
            "image_embed": features["image_embed"],
            "memory": memory[None],
            "memory_tpos": tpos,
            "obj_ptrs": ptrs[None],
            "obj_ptr_tpos": ptr_tpos,
        })["image_embed_mem"]
        stages = Timings(memory_attention=elapsed_ms(t0), providers={"memory_attention": self.video.memory_attention.provider})
        decoded, dec = self._decode(conditioned, features, *_no_points(), multimask=True)
        mem, mem_ms = self._encode_memory(features, decoded.logits, decoded.object_logit, from_prompt=False)
        track.recent[t] = _Memory(mem, decoded.obj_ptr)
        out, stages = self._output(decoded, image.shape[:2], "track", stages | dec | Timings(memory_encoder=mem_ms))
        out = _named(out, obj_id)
        if self._lost(track, decoded.object_logit, out.mask.any()):
            events.append(TrackEvent(t, obj_id, "lost", None, f"presence below threshold or no mask for {track.below} frames"))
            if track.prompt.concept is not None:
                found, refound, route_stages = self._refire(obj_id, track, image, features, events)
                stages = _add(stages, route_stages)
                if found:
                    track.recent.pop(t, None)  # this frame is now a conditioning frame
                    out = _named(refound, obj_id)
                else:
                    track.state = "searching"  # the router, every lost_frames frames, until it finds it
            track.below = 0
        return out, stages

    def _lost(self, track: _Track, object_logit: float, shown: bool) -> bool:
        """Count frames below the threshold or with an empty mask (``shown`` False); True on the K-th.

        The default threshold is the router's τ(words) for a concept, but never below 0.5: under 0.5
        SAM2 itself calls the object absent and blanks its mask, so an object the user no longer sees
        counts as lost even where a calibrated τ is lower (the tiny default's is 0 for some lengths).
        """
        config = self.video.config
        threshold = config.lost_threshold
        if threshold is None:
            router = self.video.segmenter.router
            concept = track.prompt.concept
            tau = router.tau(min(count_words(concept), router.max_shortcut_words)) if concept else 0.0
            threshold = max(tau, 0.5)
        presence = 1.0 / (1.0 + np.exp(-object_logit))
        track.below = track.below + 1 if presence < threshold or not shown else 0
        return track.below >= config.lost_frames

    def _gather(self, track: _Track, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """SAM2's ``_prepare_memory_conditioned_features`` selection, forward in time."""
        config = self.video.config
        n = config.num_maskmem
        entries = [(m, n - 1) for m in track.cond.values()]  # conditioning frames: t_pos 0
        for t_pos in range(1, n):
            previous = track.recent.get(t - (n - t_pos))
            if previous is not None:
                entries.append((previous, n - t_pos - 1))
        memory = np.stack([from_bfloat16_bits(m.features) for m, _ in entries])
        tpos = np.array([p for _, p in entries], np.int64)
        max_ptrs = min(self.num_frames, config.max_obj_ptrs) if self.num_frames else config.max_obj_ptrs
        pointers = [(t - f, m.obj_ptr) for f, m in track.cond.items() if f <= t]
        for t_diff in range(1, max_ptrs):
            if t - t_diff < 0:
                break
            previous = track.recent.get(t - t_diff)
            if previous is not None:
                pointers.append((t_diff, previous.obj_ptr))
        positions = np.array([p for p, _ in pointers], np.float32) / np.float32(max(max_ptrs - 1, 1))
        return memory, tpos, np.stack([p for _, p in pointers]), positions

    def _forget(self, track: _Track, t: int) -> None:
        """Drop tracked frames the next frame's window no longer reaches."""
        oldest = t + 1 - self.video.config.window
        for f in [f for f in track.recent if f < oldest]:
            del track.recent[f]

    def _cap_cond(self, track: _Track) -> None:
        while len(track.cond) > self.video.config.max_cond_frames:
            del track.cond[next(iter(track.cond))]

    # ------------------------------------------------------------------ graphs

    def _output(self, decoded: _Decoded, hw, source: str, stages: Timings) -> tuple[ObjectMask, Timings]:
        """The object's mask at the frame's size; the upsampling counts as postprocess, as on the image routes."""
        t0 = time.perf_counter_ns()
        out = decoded.result(hw, source)
        return out, _add(stages, Timings(postprocess=elapsed_ms(t0)))

    def _decode(self, image_embed, features, coords, labels, multimask: bool) -> tuple[_Decoded, Timings]:
        size = self.video.pre.image_size
        t0 = time.perf_counter_ns()
        out = self.video.decoder.run({
            "image_embed": image_embed,
            "high_res_feats_0": features["high_res_feats_0"],
            "high_res_feats_1": features["high_res_feats_1"],
            "point_coords": coords,
            "point_labels": labels,
            "concept_tokens": np.zeros((1, 0, 256), np.float32),
            "mask_input": np.zeros((1, 1, size, size), np.float32),
            "has_mask_input": np.zeros((1,), np.float32),
        })
        t1 = time.perf_counter_ns()
        object_logit = float(out["object_score_logits"][0, 0])
        masks = out["low_res_masks"][0]
        if object_logit <= 0:  # SAM2: an absent object's masks are all NO_OBJ_SCORE
            masks = np.full_like(masks, NO_OBJ_SCORE)
        index, logits, score = select_mask(masks, out["iou_predictions"][0], multimask, self.video.pre.stability_delta,
                                           self.video.pre.stability_thresh)
        # The pointer comes from the chosen multimask token, or token 0 in single-mask mode
        # (MaskDecoder.forward with use_multimask_token_for_obj_ptr), even when the stability
        # fallback picked a multimask mask.
        pointer = out["obj_ptrs"][0, index if multimask else 0]
        stages = Timings(decoder=(t1 - t0) / 1e6, postprocess=elapsed_ms(t1), providers={"decoder": self.video.decoder.provider})
        return _Decoded(logits, score, object_logit, pointer), stages

    def _encode_memory(self, features, logits: np.ndarray, object_logit: float, from_prompt: bool) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter_ns()
        out = self.video.memory_encoder.run({
            "image_embed": features["image_embed"],
            "mask_logits": logits[None, None].astype(np.float32),
            "object_score_logits": np.array([[object_logit]], np.float32),
            "mask_from_prompt": np.array([float(from_prompt)], np.float32),
        })
        return to_bfloat16_bits(out["maskmem_features"][0]), elapsed_ms(t0)


@dataclass(frozen=True)
class _Decoded:
    """The chosen mask of one decoder run: low-res logits, predicted IoU, object logit, pointer."""

    logits: np.ndarray
    score: float
    object_logit: float
    obj_ptr: np.ndarray

    def result(self, hw: tuple[int, int], source: str) -> ObjectMask:
        presence = float(1.0 / (1.0 + np.exp(-self.object_logit)))
        return ObjectMask(-1, upsample_mask(self.logits, hw), self.score, presence, self.object_logit > 0, source)


def _no_points() -> tuple[np.ndarray, np.ndarray]:
    """SAM2's prompt for a frame without clicks: one (0, 0) point labelled -1, plus the encoder's pad."""
    return np.zeros((1, 2, 2), np.float32), np.full((1, 2), -1, np.int32)


def _named(out: ObjectMask, obj_id: int) -> ObjectMask:
    out.obj_id = obj_id
    return out


def _add(a: Timings, b: Timings) -> Timings:
    """Stage times summed (several objects per frame run the same stages)."""
    stages = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in (*a, *b)}
    return Timings(**stages, providers=a.provider_map() | b.provider_map())
