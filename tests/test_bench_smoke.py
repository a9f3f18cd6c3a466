"""Smoke test of the benchmark harness: every scenario in --quick mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCENARIO_TITLES = (
    "Scenario: overhead",
    "Scenario: throughput",
    "Scenario: multiturn",
    "Scenario: nosharing",
    "Scenario: scale",
    "Scenario: real",
)


@pytest.mark.slow
@pytest.mark.skipif(
    not shutil.which("haproxy") and not Path("/usr/sbin/haproxy").exists(),
    reason="haproxy is not installed",
)
def test_bench_quick_all() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "run", "all", "--quick"],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = completed.stdout

    assert completed.returncode == 0, completed.stderr[-3000:]
    for title in SCENARIO_TITLES:
        assert title in output, f"{title!r} missing from:\n{output[-3000:]}"
    # A reStructuredText simple table starts and ends with rules of '='.
    assert "\n==================  " in output
    assert "lcha-least_busy" in output
    assert "Failed scenarios" not in output
