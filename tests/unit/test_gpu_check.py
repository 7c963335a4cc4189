"""The one-command GPU check's plumbing, run dry on the CPU: every step runs nothing but is
logged, pytest collects tests/gpu, each benchmark parses its exact arguments, and the
summary is written, in one folder of at most 7 files (the device tool brings back 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import LOG, SUMMARY, steps

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_logs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", str(out), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (out / LOG).read_text()
    summary = (out / SUMMARY).read_text()
    for step in steps(out):
        assert f"== {step.name}: ok" in log
        assert f"| {step.name} | ok |" in summary
    assert "tests collected" in log  # pytest really collected tests/gpu
    assert summary in done.stdout  # printed, for the device tool's output tail


def test_every_output_fits_the_device_tools_limits(tmp_path):
    outputs = [s.output for s in steps(tmp_path) if s.output]
    assert len({LOG, SUMMARY, *outputs}) <= 7  # the device tool returns at most 8 files
    assert sum(s.limit_s for s in steps(tmp_path)) <= 8 * 60 + 30  # the budget cuts the last
