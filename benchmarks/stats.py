"""Latency statistics and the environment a number was measured in.

Results are data: ``LatencyStats`` goes to JSON; tables are renderers over it. A series whose first
five and last five samples differ by more than 5 % in median is flagged unstable (the machine was
busy, or the code warmed up late) so a reader treats it as inconclusive rather than as a number.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
from dataclasses import asdict, dataclass
from typing import Any

STABILITY_TOLERANCE = 0.05


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds over ``n`` timed runs (warm-up excluded)."""

    n: int
    mean: float
    std: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    stable: bool

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

        stable = True
        if len(samples_ms) >= 10:
            head = statistics.median(samples_ms[:5])
            tail = statistics.median(samples_ms[-5:])
            stable = abs(head - tail) <= STABILITY_TOLERANCE * max(head, tail)
        return cls(
            n=len(xs),
            mean=statistics.fmean(xs),
            std=statistics.stdev(xs) if len(xs) > 1 else 0.0,
            p50=pct(0.5),
            p90=pct(0.9),
            p99=pct(0.99),
            min=xs[0],
            max=xs[-1],
            stable=stable,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def environment() -> dict[str, Any]:
    """Hardware and library versions, recorded with every benchmark report."""
    from conceptseg_edge.manifest import tool_versions

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "versions": tool_versions(),
    }
