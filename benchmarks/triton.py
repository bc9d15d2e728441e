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
A series is flagged unstable as ``benchmarks.stats.stability`` says (head vs tail median); a series too short to
tell reads "not measured", never stable.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from conceptseg_edge.benchmarks.stats import (
    LatencyStats,
    all_stable,
    environment,
    peak_rss_mb,
    stability_note,
)
from conceptseg_edge.errors import BenchmarkError, InputError
from conceptseg_edge.manifest import load_bundle
from conceptseg_edge.runtime.providers import ProviderChoice, provider_note, provider_record

DEFAULT_CONCURRENCY = (1, 2, 4, 8)


@dataclass(frozen=True)
class TritonBenchConfig(ProviderChoice):
    concurrency: tuple[int, ...] = field(default=DEFAULT_CONCURRENCY, metadata={"help": "client threads per level"})
    runs: int = field(default=24, metadata={"help": "timed requests per level and side"})
    warmup: int = field(default=2, metadata={"help": "untimed requests per level and side (at least one per client)"})
    image_hw: tuple[int, int] = field(default=(480, 640), metadata={"help": "request image size"})
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
) -> SeriesResult:
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
    return SeriesResult.from_samples([ms for _, ms in sorted(latencies)], server_ms, errors, wall_s)  # in request order


@dataclass(frozen=True)
class SeriesResult:
    """One side (Triton or in-process) at one concurrency level: what completed, how fast, what failed."""

    completed: int
    errors: int
    error_examples: tuple[str, ...]
    wall_s: float
    throughput_rps: float
    latency_ms: LatencyStats | None  # None when no request completed
    server_total_ms: LatencyStats | None  # Triton only: the server's own ``server_total``

    @classmethod
    def from_samples(cls, samples: list[float], server_ms: list[float], errors: list[str], wall_s: float) -> SeriesResult:
        """``samples`` in request order (the stability check compares the head and tail of the series)."""
        return cls(
            completed=len(samples),
            errors=len(errors),
            error_examples=tuple(errors[:3]),
            wall_s=round(wall_s, 3),
            throughput_rps=round(len(samples) / wall_s, 3) if wall_s > 0 else 0.0,
            latency_ms=LatencyStats.from_samples(samples) if samples else None,
            server_total_ms=LatencyStats.from_samples(server_ms) if server_ms else None,
        )

    @property
    def stable(self) -> bool | None:
        return self.latency_ms.stable if self.latency_ms is not None else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"completed": self.completed, "errors": self.errors, "error_examples": list(self.error_examples),
                               "wall_s": self.wall_s, "throughput_rps": self.throughput_rps}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms.to_dict()
        if self.server_total_ms is not None:
            out["server_total_ms"] = self.server_total_ms.to_dict()
        return out


@dataclass(frozen=True)
class LevelResult:
    """Both sides at one concurrency level, and how they were ordered."""

    concurrency: int
    order: str
    triton: SeriesResult
    inprocess: SeriesResult

    def sides(self) -> tuple[SeriesResult, SeriesResult]:
        return self.triton, self.inprocess

    @property
    def ratio_p50(self) -> float | None:
        """Triton p50 / in-process p50; None unless both sides completed requests."""
        if self.triton.latency_ms is None or self.inprocess.latency_ms is None:
            return None
        return round(self.triton.latency_ms.p50 / self.inprocess.latency_ms.p50, 3)

    @property
    def ratio_throughput(self) -> float | None:
        if self.ratio_p50 is None:
            return None
        return round(self.triton.throughput_rps / self.inprocess.throughput_rps, 3)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"concurrency": self.concurrency, "order": self.order,
                               "triton": self.triton.to_json(), "inprocess": self.inprocess.to_json()}
        if self.ratio_p50 is not None:
            out["ratio_p50_triton_over_inprocess"] = self.ratio_p50
            out["ratio_throughput_triton_over_inprocess"] = self.ratio_throughput
        return out


PAYLOAD = "raw uint8 pixels (H×W×3) in, bool mask (H×W) out"
TIMING_SCOPE = ("end to end per request, distinct image each time (encoder always runs): Triton = client call "
                "wall time incl. loopback transfer and server queue; in-process = ConceptSegmenter.segment "
                "incl. the wait for a free segmenter")


@dataclass(frozen=True)
class TritonBenchReport:
    """The whole run; ``to_json()`` is the report's JSON, ``render_triton_table`` its markdown."""

    url: str
    protocol: str
    bundle: str
    model: str
    image_size: int
    input_image_hw: tuple[int, int]
    precision: dict[str, str]  # part → precision
    manifest_sha256: dict[str, str]  # part → graph sha256
    served_instances: int
    inprocess_instances: int
    served_provider: str  # the served model's configured provider (its engines refuse to load on any other)
    provider_requested: str  # in-process
    providers: dict[str, str]  # in-process: part → the provider that ran it
    runs: int
    warmup: int
    levels: tuple[LevelResult, ...]
    peak_rss_mb: float
    environment: dict[str, Any]
    route: str = "prompt"
    payload: str = PAYLOAD
    timing_scope: str = TIMING_SCOPE

    @property
    def errors(self) -> int:
        """Failed requests over every timed series (the CLI exits non-zero on any)."""
        return sum(side.errors for level in self.levels for side in level.sides())

    @property
    def stable(self) -> bool | None:
        return all_stable(side.stable for level in self.levels for side in level.sides())

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "url": self.url,
            "protocol": self.protocol,
            "bundle": self.bundle,
            "model": self.model,
            "image_size": self.image_size,
            "input_image_hw": list(self.input_image_hw),
            "precision": dict(self.precision),
            "manifest_sha256": dict(self.manifest_sha256),
            "payload": self.payload,
            "timing_scope": self.timing_scope,
            "served_instances": self.served_instances,
            "inprocess_instances": self.inprocess_instances,
            "served_provider": self.served_provider,
            **provider_record(self.provider_requested, self.providers),
            "runs": self.runs,
            "warmup": self.warmup,
            "levels": [level.to_json() for level in self.levels],
            "errors": self.errors,
            "stable": self.stable,
            "peak_rss_mb": self.peak_rss_mb,
            "environment": self.environment,
        }


def _interleaved(sides: dict[str, Callable], hooks: dict[str, tuple[Callable, Callable]], cfg: TritonBenchConfig,
                 seed: int) -> dict[str, SeriesResult]:
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
    return {side: SeriesResult.from_samples(lat, server, errs, sum(lat) / 1e3) for side, (lat, server, errs) in record.items()}


def bench_triton(
    url: str,
    bundle: str | Path,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    runs: int = 24,
    warmup: int = 2,
    cfg: TritonBenchConfig | None = None,
    progress: bool = True,
) -> TritonBenchReport:
    """Prompt route through Triton at ``url`` and in-process on ``bundle``, per concurrency level.

    ``bundle`` must be the bundle the server's repository was built from (same manifest), so both
    sides run the same graphs. Returns the typed report (``to_json()``; ``render_triton_table``).
    """
    from conceptseg_edge.runtime.segmenter import ConceptSegmenter
    from conceptseg_edge.runtime.engine import engine_factory_for
    from conceptseg_edge.serve.client import TritonSegClient

    cfg = cfg or TritonBenchConfig(concurrency=tuple(concurrency), runs=runs, warmup=warmup)
    manifest = load_bundle(bundle)
    factory = engine_factory_for(cfg.provider_config, manifest)  # a missing provider is refused before anything loads
    probe = TritonSegClient(url, timeout=cfg.timeout)
    if not probe.is_ready():
        raise BenchmarkError("triton", f"{url}: server or model 'conceptseg' not ready")
    served = probe.model_config()
    protocol = probe.protocol
    probe.close()
    groups = served.get("instance_group") or [{}]
    served_instances = int(groups[0].get("count", 1))
    instances = cfg.instances or served_instances
    loaded = [ConceptSegmenter.from_bundle(bundle, provider=cfg.provider, engine_factory=factory) for _ in range(instances)]
    providers = loaded[0].providers()
    segmenters = FairPool(loaded)
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
                series = _interleaved(sides, hooks, cfg, 1000 * (li + 1))
                bar.update(2)
                levels.append(LevelResult(1, "interleaved request by request (ABBA)", **series))
                continue
            order = ("triton", "inprocess") if li % 2 == 0 else ("inprocess", "triton")
            series = {}
            for si, side in enumerate(order):
                seed = 1000 * (li + 1) + si
                if cfg.warmup:  # at least one per client thread, so every connection is warm
                    _run_level(sides[side], request_images(max(cfg.warmup, c), cfg.image_hw, seed + 500), c, *hooks[side])
                series[side] = _run_level(sides[side], request_images(cfg.runs, cfg.image_hw, seed), c, *hooks[side])
                bar.update()
            levels.append(LevelResult(c, "series back to back: " + " then ".join(order), **series))
    finally:
        bar.close()

    return TritonBenchReport(
        url=url,
        protocol=protocol,
        bundle=str(bundle),
        model=manifest.source.model,
        image_size=manifest.preprocessing.image_size,
        input_image_hw=tuple(cfg.image_hw),
        precision={name: p.precision for name, p in manifest.parts.items()},
        manifest_sha256={name: p.sha256 for name, p in manifest.parts.items()},
        served_instances=served_instances,
        inprocess_instances=instances,
        served_provider=served_provider(served),
        provider_requested=cfg.provider,
        providers=providers,
        runs=cfg.runs,
        warmup=cfg.warmup,
        levels=tuple(levels),
        peak_rss_mb=round(peak_rss_mb(), 1),
        environment=environment(),
    )


def served_provider(config: Mapping[str, Any]) -> str:
    """The provider the served ``conceptseg`` model's engines run on, from its config's parameters.

    A served engine never falls back (``OrtEngine`` refuses a missing provider, so the model does not
    load): the configured provider is the one that runs. A native (BLS) router runs no graph itself.
    """
    params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
    if params.get("engines") == "bls":
        return "graph models (BLS): each graph model's own"
    return params.get("provider", "unknown")


def render_triton_table(report: TritonBenchReport) -> str:
    """Markdown: per concurrency, Triton and in-process p50/p90/p99 and throughput, and the p50 ratio."""
    head = (f"route `{report.route}` · {report.model} @ {report.image_size}px · {report.protocol} "
            f"{report.url} · {report.served_instances} instance(s) on {report.served_provider} · in-process on "
            f"{provider_note(report.provider_requested, report.providers)} · {report.runs} requests per series · "
            f"image {report.input_image_hw[0]}×{report.input_image_hw[1]}"
            + stability_note(report.stable)
            + (f" · {report.errors} FAILED REQUESTS" if report.errors else ""))
    rows = [head, "",
            "| clients | Triton p50 ms | p90 | p99 | req/s | server p50 ms | in-process p50 ms | p90 | p99 | req/s | p50 Triton/in-process |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cells(side: SeriesResult) -> list[str]:
        lat = side.latency_ms
        if lat is None:
            return ["—", "—", "—", f"{side.throughput_rps:.2f}"]
        return [f"{lat.p50:.1f}", f"{lat.p90:.1f}", f"{lat.p99:.1f}", f"{side.throughput_rps:.2f}"]

    for level in report.levels:
        server = level.triton.server_total_ms
        ratio = level.ratio_p50
        rows.append("| " + " | ".join([str(level.concurrency), *cells(level.triton), "—" if server is None else f"{server.p50:.1f}",
                                        *cells(level.inprocess), "—" if ratio is None else f"{ratio:.2f}"]) + " |")
    return "\n".join(rows)
