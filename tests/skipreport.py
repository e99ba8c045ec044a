"""A pytest plugin for CI (`.ci/run`): with JAXGPT_TEST_REPORT=PATH set, write how many tests
passed, failed and skipped, and why each skipped (and whether for the `gpu` marker), as JSON.
tests/conftest.py loads it; `.ci/skips.py` reads the file and fails a non-GPU skip."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPORT_ENV = "JAXGPT_TEST_REPORT"


def _skip(report: pytest.TestReport | pytest.CollectReport) -> dict[str, Any]:
    """{"test", "reason", "gpu"} of a skipped test or module (a module skip is never gpu)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    gpu = "gpu" in getattr(report, "keywords", {})
    return {"test": report.nodeid, "reason": reason.removeprefix("Skipped: "), "gpu": gpu}


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    stats = terminalreporter.stats
    kinds = ("passed", "failed", "error", "xfailed", "xpassed", "deselected")
    report = {"exitstatus": int(exitstatus), **{k: len(stats.get(k, [])) for k in kinds}}
    report["skipped"] = [_skip(r) for r in stats.get("skipped", [])]
    Path(path).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
