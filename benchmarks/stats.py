"""Latency statistics and the environment a number was measured in.

Results are data: ``LatencyStats`` (one series of milliseconds) and ``StageSeries`` (a series per
stage of a request, and their total) go to JSON; tables and charts are renderers over them. A series
whose first and last samples (five each, or half the series when it is shorter than ten) differ by
more than 5 % in median is flagged unstable (the machine was busy, or the code warmed up late) so a
reader treats it as inconclusive rather than as a number. Fewer than ``STABILITY_MIN_RUNS`` samples
cannot show drift at all: their stability is ``None`` ("not measured"), never "stable".
Statistics are kept as the JSON prints them (3 decimals), so a ratio (``p50_ratio``) read back from a
report is the one the report states.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from conceptseg_edge.manifest import BundleManifest, produced_by, tool_versions

STABILITY_TOLERANCE = 0.05
#: Shortest series whose stability is measured: two samples at each end.
STABILITY_MIN_RUNS = 4
#: Samples compared at each end of a long series.
STABILITY_WINDOW = 5


def stability(samples_ms: Sequence[float]) -> bool | None:
    """Whether the series' head and tail medians agree within ``STABILITY_TOLERANCE``, in run order;
    None for a series too short to tell (``STABILITY_MIN_RUNS``)."""
    if len(samples_ms) < STABILITY_MIN_RUNS:
        return None
    k = min(STABILITY_WINDOW, len(samples_ms) // 2)
    head, tail = statistics.median(samples_ms[:k]), statistics.median(samples_ms[-k:])
    return abs(head - tail) <= STABILITY_TOLERANCE * max(head, tail)


def all_stable(flags: Iterable[bool | None]) -> bool | None:
    """Several series together: False if any drifted, None if none drifted but some were not measured."""
    flags = list(flags)
    if False in flags:
        return False
    return None if None in flags else True


def stability_note(stable: bool | None) -> str:
    """A table header's suffix: nothing when stable, else why the numbers are to be read with care."""
    if stable is None:
        return f" · stability not measured (fewer than {STABILITY_MIN_RUNS} runs)"
    return "" if stable else " · UNSTABLE (inconclusive)"


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds over ``n`` timed runs (warm-up excluded), kept to 3 decimals as the JSON prints
    them, so a ratio or a table computed from the record equals one computed from the report."""

    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    stable: bool | None  # None: too few runs to tell (``stability``)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> LatencyStats:
        if not samples_ms:
            raise ValueError("no samples")
        xs = sorted(samples_ms)

        def pct(q: float) -> float:
            # linear interpolation between closest ranks (numpy's default)
            pos = (len(xs) - 1) * q
            lo = int(pos)
            hi = min(lo + 1, len(xs) - 1)
            return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

        return cls(
            n=len(xs),
            mean=round(statistics.fmean(xs), 3),
            std=round(statistics.stdev(xs), 3) if len(xs) > 1 else 0.0,
            p50=round(pct(0.5), 3),
            p90=round(pct(0.9), 3),
            p99=round(pct(0.99), 3),
            min=round(xs[0], 3),
            max=round(xs[-1], 3),
            stable=stability(samples_ms),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def p50_ratio(numerator: LatencyStats, denominator: LatencyStats) -> float:
    """``numerator`` p50 over ``denominator`` p50, to 3 decimals."""
    return round(numerator.p50 / denominator.p50, 3)


@dataclass(frozen=True)
class StageSeries:
    """One timed series of requests: latency per stage (in report order) and of the request's total."""

    stages: Mapping[str, LatencyStats]
    total: LatencyStats

    @classmethod
    def from_samples(cls, samples: Sequence[Mapping[str, float]], stages: Sequence[str] | None = None) -> StageSeries:
        """Per-stage samples (one mapping per request) → statistics. ``stages`` fixes the stages and
        their order; None takes every stage any request ran, sorted by name. A request that skipped a
        stage counts 0 ms for it."""
        names = tuple(stages) if stages is not None else tuple(sorted({k for s in samples for k in s}))
        per_stage = {k: LatencyStats.from_samples([s.get(k, 0.0) for s in samples]) for k in names}
        total = LatencyStats.from_samples([sum(s.get(k, 0.0) for k in names) for s in samples])
        return cls(per_stage, total)

    def p50(self, stage: str) -> float:
        """A stage's median; 0.0 for a stage this series never ran (a table's empty cell)."""
        return self.stages[stage].p50 if stage in self.stages else 0.0

    @property
    def stable(self) -> bool | None:
        return all_stable(s.stable for s in (*self.stages.values(), self.total))

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {**{name: s.to_dict() for name, s in self.stages.items()}, "total": self.total.to_dict()}


@dataclass(frozen=True)
class BenchedBundle:
    """What a report measured: the bundle, its model and input size, the image timed, each part's precision."""

    bundle: str
    model: str
    image_size: int
    input_image_hw: tuple[int, int]
    precision: Mapping[str, str]  # per part

    @classmethod
    def of(cls, bundle: str | os.PathLike[str], manifest: BundleManifest, image_hw: tuple[int, int]) -> BenchedBundle:
        return cls(str(bundle), manifest.source.model, manifest.preprocessing.image_size, (int(image_hw[0]), int(image_hw[1])),
                   {name: part.precision for name, part in manifest.parts.items()})

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "model": self.model, "image_size": self.image_size,
                "input_image_hw": list(self.input_image_hw), "precision": dict(self.precision)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment() -> dict[str, Any]:
    """Hardware and library versions, recorded with every benchmark report."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "versions": tool_versions(),
        "commit": produced_by(),
    }


def own_peak_rss_mib() -> float:
    """This process's own peak RSS: ``VmHWM``, the high-water mark of its address space.

    Not ``ru_maxrss``: on Linux that survives ``execve``, so a child's ``ru_maxrss`` (from ``os.wait4``
    or its own ``getrusage``) is at least its parent's RSS when it forked (in the real profile, a
    parent holding three SAM2 models). ``VmHWM`` belongs to the address space ``execve`` gave the
    child, and to nothing before it.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    raise RuntimeError("/proc/self/status has no VmHWM")


def peak_file(out: Path, step: str) -> Path:
    """Where a child step writes its ``own_peak_rss_mib`` (read and removed by ``run_step``)."""
    return out / f".{step}.peak_rss_mib"


def run_step(module: str, argv: list[str], step: str, log: Path, out: Path) -> dict[str, Any]:
    """Run ``python -m module *argv`` (one benchmark step) in a child process, stderr to ``log``.

    Returns the step's result (the last stdout line, JSON), its seconds and its own peak RSS (the
    child writes ``own_peak_rss_mib`` to ``peak_file(out, step)`` when it ends, failed or not:
    ``ru_maxrss`` from ``wait4`` would include this parent). A failure is recorded as ``error``
    with the log's last line, never raised: the steps after it still report.
    """
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, stderr=err, text=True)
        stdout = proc.stdout.read()
        _, status, _ = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    peak = peak_file(out, step)
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 1),
                              "peak_rss_gib": round(float(peak.read_text()) / 2**10, 2) if peak.is_file() else None}
    peak.unlink(missing_ok=True)
    lines = stdout.strip().splitlines()
    if code == 0 and lines:
        result |= json.loads(lines[-1])
    else:
        last = log.read_text().strip().splitlines()[-1:]
        result["error"] = f"exit {code}" + (f": {last[0]}" if last else "") + f" (full log: {log})"
    return result


def plot_stages(series: Mapping[str, StageSeries], title: str, ylabel: str, png: str | Path) -> Path:
    """Stacked bars of each series' p50 per stage (PNG, written atomically): where a request's time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from conceptseg_edge.visualize import save_figure

    names = list(series)
    stages = sorted({k for s in series.values() for k in s.stages})
    fig, ax = plt.subplots(figsize=(10, 4))
    bottom = np.zeros(len(names))
    for stage in stages:
        vals = np.array([series[n].p50(stage) for n in names])
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, png)
