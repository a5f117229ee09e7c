"""`make test` runs both suites whatever the first one does, and fails if either failed.

The suites are replaced by a fake interpreter that fails in a chosen tree, so this checks the Makefile's
control flow, not the suites themselves.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_make_test(tmp_path, failing: str) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "suite in $(basename "$PWD")"\n[ "$(basename "$PWD")" = "{failing}" ] && exit 1\nexit 0\n')
    fake.chmod(0o755)
    (venv / ".installed").touch()  # newer than requirements.txt: make does not try to install
    return subprocess.run(["make", "-s", "-C", str(ROOT), "test", f"VENV={venv}", f"PY={fake}"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("failing, expect_rc_zero", [("DDPM", False), ("SD", False), ("none", True)])
def test_make_test_runs_both_suites_and_reports_any_failure(tmp_path, failing, expect_rc_zero):
    proc = run_make_test(tmp_path, failing)
    assert "suite in DDPM" in proc.stdout and "suite in SD" in proc.stdout, proc.stdout + proc.stderr
    assert (proc.returncode == 0) == expect_rc_zero, (proc.returncode, proc.stdout, proc.stderr)
