"""Training metrics: one CSV row per logged step, and PNG curves people can look at.

The CSV is rewritten atomically on every ``log`` (runs are small; a crash never leaves a torn file),
and ``plot`` draws each metric against the step in its own panel.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from conceptseg_edge.fileio import write_text
from conceptseg_edge.visualize import save_figure


class MetricsLogger:
    """Collects ``{step, metric: value}`` rows and mirrors them to ``out_dir/metrics.csv``."""

    def __init__(self, out_dir: str | Path, filename: str = "metrics.csv") -> None:
        self.path = Path(out_dir) / filename
        self.rows: list[dict[str, float]] = []
        if self.path.is_file():  # resuming: keep the history
            with open(self.path, newline="") as fh:
                self.rows = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]

    def log(self, step: int, **metrics: float) -> None:
        self.rows = [r for r in self.rows if r["step"] < step]  # a resumed run overwrites what it redoes
        self.rows.append({"step": float(step), **{k: float(v) for k, v in metrics.items()}})
        keys = ["step", *sorted({k for r in self.rows for k in r} - {"step"})]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (int(v) if k == "step" else v) for k, v in row.items()})
        write_text(self.path, buf.getvalue())

    def series(self, key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in self.rows if key in r and not math.isnan(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, png: str | Path, keys: list[str] | None = None, title: str = "") -> Path:
        """One panel per metric (default: all); written atomically as PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = keys or sorted({k for r in self.rows for k in r} - {"step"})
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * max(1, len(keys))), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            xs, ys = self.series(key)
            ax.plot(xs, ys, lw=1.2)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        if title:
            fig.suptitle(title)
        return save_figure(fig, png)
