"""Strict skips (pytest plugin, loaded by conftest.py): under ``CONCEPTSEG_STRICT_SKIPS=1`` only tests marked
``trt`` or ``gpu`` may skip.

``make test`` installs every extra, so any other skip is a broken install or a missing fixture hiding behind a
green run: the session fails and names it. The decision reads the test's markers, never the skip message, so a
broken import whose message happens to mention CUDA cannot pass as "GPU missing".
"""

from __future__ import annotations

import os

import pytest

ALLOWED_SKIP_MARKERS = frozenset({"trt", "gpu"})


def _allowed(report: pytest.TestReport) -> bool:
    return bool(ALLOWED_SKIP_MARKERS & set(getattr(report, "keywords", {})))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CONCEPTSEG_STRICT_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    unexpected = [r for r in skipped if not _allowed(r)]
    if unexpected:
        reporter.write_line(f"\nCONCEPTSEG_STRICT_SKIPS: {len(unexpected)} skip(s) outside the trt/gpu markers:", red=True)
        for r in unexpected:
            reporter.write_line(f"  {r.nodeid}: {r.longrepr}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
