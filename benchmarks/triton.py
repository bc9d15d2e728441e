"""Triton vs in-process: the prompt route at concurrency 1, 2, 4, 8, measured in the same run.

Timing scope, both sides: one request = one distinct 480×640 image (so the encoder runs every time;
the runtime's per-image cache never hits) plus one click, end to end as a caller sees it:

- **Triton**: ``TritonSegClient.segment`` wall time — request serialisation, loopback transfer of the
  raw uint8 pixels (HTTP binary tensors or gRPC), the server's queue, the python-backend model
  (decode, preprocess, encoder, decoder, postprocess), and the mask coming back.
- **in-process**: ``ConceptSegmenter.segment`` wall time, including the wait for a free segmenter.
  The in-process side holds as many segmenters as the served model has instances (read from the
  server's model config), handed to the client threads first come, first served — the scheduling
  Triton does — so the two series differ by the serving layer only. At concurrency c > instances
  both sides queue, so latency grows ~c-fold on both and throughput is the figure to compare.

At concurrency 1 the two sides alternate request by request (ABBA), so both see the same machine
load; at higher concurrency each level runs the two sides as series back to back, alternating which
goes first, with separate untimed warm-up requests. Throughput is completed requests / wall time of
the timed phase (at concurrency 1: / summed latency).
A series whose first and last five samples differ by > 5 % in median is flagged unstable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.benchmarks.stats import LatencyStats, environment, peak_rss_mb
from conceptseg_edge.errors import BenchmarkError, InputError
from conceptseg_edge.manifest import load_bundle

DEFAULT_CONCURRENCY = (1, 2, 4, 8)


@dataclass(frozen=True)
class TritonBenchConfig:
    concurrency: tuple[int, ...] = field(default=DEFAULT_CONCURRENCY, metadata={"help": "client threads per level"})
    runs: int = field(default=24, metadata={"help": "timed requests per level and side"})
    warmup: int = field(default=2, metadata={"help": "untimed requests per level and side (at least one per client)"})
    image_hw: tuple[int, int] = field(default=(480, 640), metadata={"help": "request image size"})
    provider: str = field(default="cpu", metadata={"help": "in-process ONNX Runtime provider"})
    instances: int | None = field(default=None, metadata={"help": "in-process segmenters (default: the served model's instance count)"})
    timeout: float = field(default=300.0, metadata={"help": "per-request client timeout, seconds"})

    def __post_init__(self) -> None:
        if not self.concurrency or any(not isinstance(c, int) or c < 1 for c in self.concurrency):
            raise InputError(f"concurrency {list(self.concurrency)}: expected ints >= 1")
        if self.runs < 1 or self.warmup < 0:
            raise InputError(f"runs {self.runs} / warmup {self.warmup}: need runs >= 1 and warmup >= 0")
        if self.instances is not None and self.instances < 1:
            raise InputError(f"instances {self.instances}: expected >= 1")


class FairPool:
    """Segmenters handed out first come, first served (a plain ``Queue`` lets a returning thread barge in
    and starve the others, which would flatter the in-process p50 and hide its tail)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self._free = list(items)
        self._waiters: deque[list[Any]] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> Any:
        with self._lock:
            if self._free and not self._waiters:
                return self._free.pop()
            slot: list[Any] = [threading.Event(), None]
            self._waiters.append(slot)
        slot[0].wait()
        return slot[1]

    def release(self, item: Any) -> None:
        with self._lock:
            if self._waiters:
                slot = self._waiters.popleft()
                slot[1] = item
                slot[0].set()
            else:
                self._free.append(item)


def request_images(n: int, hw: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``n`` distinct images: one textured base with the request index stamped into its first pixels."""
    rng = np.random.default_rng(seed)
    base = (rng.random((*hw, 3)) * 255).astype(np.uint8)
    out = []
    for i in range(n):
        img = base.copy()
        img.reshape(-1)[:8] = np.frombuffer(int(seed * 1_000_003 + i).to_bytes(8, "little"), np.uint8)
        out.append(img)
    return out


def _run_level(
    call: Callable[[Any, np.ndarray], dict[str, float] | None],
    images: Sequence[np.ndarray],
    concurrency: int,
    setup: Callable[[], Any] = lambda: None,
    teardown: Callable[[Any], None] = lambda ctx: None,
) -> dict[str, Any]:
    """Run ``call(ctx, image)`` over ``images`` from ``concurrency`` threads; latencies and wall time.

    Each thread makes its own ``ctx = setup()`` (tritonclient's HTTP client must live on the thread that
    uses it) before the clock starts, and ``teardown(ctx)`` after.
    """
    work: queue.Queue[int] = queue.Queue()
    for i in range(len(images)):
        work.put(i)
    latencies: list[tuple[int, float]] = []
    server_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    ready = threading.Barrier(concurrency + 1)

    def worker() -> None:
        try:
            ctx = setup()
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(f"setup: {type(exc).__name__}: {exc}")
            ready.wait()
            return
        ready.wait()
        try:
            _drain(ctx)
        finally:
            teardown(ctx)

    def _drain(ctx: Any) -> None:
        while True:
            try:
                i = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter_ns()
            try:
                extra = call(ctx, images[i])
            except Exception as exc:  # noqa: BLE001 - a failed request is a counted error, not a crash
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            ms = (time.perf_counter_ns() - t0) / 1e6
            with lock:
                latencies.append((i, ms))
                if extra and "server_total" in extra:
                    server_ms.append(extra["server_total"])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter_ns()
    for t in threads:
        t.join()
    wall_s = (time.perf_counter_ns() - t0) / 1e9
    return _summary([ms for _, ms in sorted(latencies)], server_ms, errors, wall_s)  # request order: stability check


def _summary(samples: list[float], server_ms: list[float], errors: list[str], wall_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "completed": len(samples),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall_s, 3),
        "throughput_rps": round(len(samples) / wall_s, 3) if wall_s > 0 else 0.0,
    }
    if samples:
        out["latency_ms"] = LatencyStats.from_samples(samples).to_dict()
    if server_ms:
        out["server_total_ms"] = LatencyStats.from_samples(server_ms).to_dict()
    return out


def _interleaved(sides: dict[str, Callable], hooks: dict[str, tuple[Callable, Callable]], cfg: TritonBenchConfig,
                 seed: int) -> dict[str, dict[str, Any]]:
    """Concurrency 1: the two sides request by request, alternating which goes first (ABBA), so both
    see the same machine load; throughput = requests / summed latency (one request at a time)."""
    ctx = {side: hooks[side][0]() for side in sides}
    record: dict[str, tuple[list[float], list[float], list[str]]] = {side: ([], [], []) for side in sides}
    try:
        warm = request_images(cfg.warmup, cfg.image_hw, seed + 500)
        for image in warm:
            for side in sides:
                sides[side](ctx[side], image)
        images = {side: request_images(cfg.runs, cfg.image_hw, seed + k) for k, side in enumerate(sides)}
        names = list(sides)
        for i in range(cfg.runs):
            for side in names if i % 2 == 0 else names[::-1]:
                lat, server, errs = record[side]
                t0 = time.perf_counter_ns()
                try:
                    extra = sides[side](ctx[side], images[side][i])
                except Exception as exc:  # noqa: BLE001 - a failed request is a counted error
                    errs.append(f"{type(exc).__name__}: {exc}")
                    continue
                lat.append((time.perf_counter_ns() - t0) / 1e6)
                if extra and "server_total" in extra:
                    server.append(extra["server_total"])
    finally:
        for side in sides:
            hooks[side][1](ctx[side])
    return {side: _summary(lat, server, errs, sum(lat) / 1e3) for side, (lat, server, errs) in record.items()}


def bench_triton(
    url: str,
    bundle: str | Path,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    runs: int = 24,
    warmup: int = 2,
    cfg: TritonBenchConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prompt route through Triton at ``url`` and in-process on ``bundle``, per concurrency level.

    ``bundle`` must be the bundle the server's repository was built from (same manifest), so both
    sides run the same graphs. Returns a JSON-ready report (see ``render_triton_table``).
    """
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter
    from conceptseg_edge.serve.client import TritonSegClient

    cfg = cfg or TritonBenchConfig(concurrency=tuple(concurrency), runs=runs, warmup=warmup)
    manifest = load_bundle(bundle)
    probe = TritonSegClient(url, timeout=cfg.timeout)
    if not probe.is_ready():
        raise BenchmarkError("triton", f"{url}: server or model 'conceptseg' not ready")
    served = probe.model_config()
    protocol = probe.protocol
    probe.close()
    groups = served.get("instance_group") or [{}]
    served_instances = int(groups[0].get("count", 1))
    instances = cfg.instances or served_instances
    segmenters = FairPool([ConceptSegmenter.from_bundle(bundle, provider=cfg.provider) for _ in range(instances)])
    h, w = cfg.image_hw
    point = [[w * 0.45, h * 0.55]]

    def via_triton(client: TritonSegClient, image: np.ndarray) -> dict[str, float]:
        result = client.segment(image, points=point)
        if result.route != "prompt":
            raise BenchmarkError("triton", f"route {result.route}, expected prompt")
        return result.timings

    def in_process(_ctx: None, image: np.ndarray) -> None:
        segmenter = segmenters.acquire()
        try:
            segmenter.segment(image, points=point)
        finally:
            segmenters.release(segmenter)

    sides = {"triton": via_triton, "inprocess": in_process}
    hooks = {"triton": (lambda: TritonSegClient(url, timeout=cfg.timeout), lambda c: c.close()),
             "inprocess": (lambda: None, lambda ctx: None)}
    levels = []
    bar = tqdm(total=len(cfg.concurrency) * 2, desc="bench triton", disable=not progress, unit="series")
    try:
        for li, c in enumerate(cfg.concurrency):
            if c == 1:
                level: dict[str, Any] = {"concurrency": 1, "order": "interleaved request by request (ABBA)"}
                level.update(_interleaved(sides, hooks, cfg, 1000 * (li + 1)))
                bar.update(2)
                order: tuple[str, ...] = ()
            else:
                order = ("triton", "inprocess") if li % 2 == 0 else ("inprocess", "triton")
                level = {"concurrency": c, "order": "series back to back: " + " then ".join(order)}
            for si, side in enumerate(order):
                seed = 1000 * (li + 1) + si
                if cfg.warmup:  # at least one per client thread, so every connection is warm
                    _run_level(sides[side], request_images(max(cfg.warmup, c), cfg.image_hw, seed + 500), c, *hooks[side])
                level[side] = _run_level(sides[side], request_images(cfg.runs, cfg.image_hw, seed), c, *hooks[side])
                bar.update()
            t, p = level["triton"], level["inprocess"]
            if "latency_ms" in t and "latency_ms" in p:
                level["ratio_p50_triton_over_inprocess"] = round(t["latency_ms"]["p50"] / p["latency_ms"]["p50"], 3)
                level["ratio_throughput_triton_over_inprocess"] = round(t["throughput_rps"] / p["throughput_rps"], 3)
            levels.append(level)
    finally:
        bar.close()

    errors = sum(lv[s]["errors"] for lv in levels for s in sides)
    stable = all(lv[s].get("latency_ms", {}).get("stable", False) for lv in levels for s in sides)
    return {
        "route": "prompt",
        "url": url,
        "protocol": protocol,
        "bundle": str(bundle),
        "model": manifest.source.model,
        "image_size": manifest.preprocessing.image_size,
        "input_image_hw": list(cfg.image_hw),
        "precision": {name: p.precision for name, p in manifest.parts.items()},
        "manifest_sha256": {name: p.sha256 for name, p in manifest.parts.items()},
        "payload": "raw uint8 pixels (H×W×3) in, bool mask (H×W) out",
        "timing_scope": ("end to end per request, distinct image each time (encoder always runs): Triton = client call "
                         "wall time incl. loopback transfer and server queue; in-process = ConceptSegmenter.segment "
                         "incl. the wait for a free segmenter"),
        "served_instances": served_instances,
        "inprocess_instances": instances,
        "provider": cfg.provider,
        "runs": cfg.runs,
        "warmup": cfg.warmup,
        "levels": levels,
        "errors": errors,
        "stable": stable,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "environment": environment(),
    }


def render_triton_table(report: dict[str, Any]) -> str:
    """Markdown: per concurrency, Triton and in-process p50/p90/p99 and throughput, and the p50 ratio."""
    head = (f"route `{report['route']}` · {report['model']} @ {report['image_size']}px · {report['protocol']} "
            f"{report['url']} · {report['served_instances']} instance(s) · {report['runs']} requests per series · "
            f"image {report['input_image_hw'][0]}×{report['input_image_hw'][1]}"
            + ("" if report["stable"] else " · UNSTABLE (inconclusive)")
            + (f" · {report['errors']} FAILED REQUESTS" if report["errors"] else ""))
    rows = [head, "",
            "| clients | Triton p50 ms | p90 | p99 | req/s | server p50 ms | in-process p50 ms | p90 | p99 | req/s | p50 Triton/in-process |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cells(side: dict[str, Any]) -> list[str]:
        lat = side.get("latency_ms")
        if lat is None:
            return ["—", "—", "—", f"{side['throughput_rps']:.2f}"]
        return [f"{lat['p50']:.1f}", f"{lat['p90']:.1f}", f"{lat['p99']:.1f}", f"{side['throughput_rps']:.2f}"]

    for level in report["levels"]:
        t, p = level["triton"], level["inprocess"]
        server = t.get("server_total_ms", {}).get("p50")
        ratio = level.get("ratio_p50_triton_over_inprocess")
        rows.append("| " + " | ".join([str(level["concurrency"]), *cells(t), "—" if server is None else f"{server:.1f}",
                                        *cells(p), "—" if ratio is None else f"{ratio:.2f}"]) + " |")
    return "\n".join(rows)
