"""Smoke test of the benchmark scripts: each runs with --quick and writes a valid JSON report.

Not a timing test: it checks that the scripts run end to end on the CPU, that the report names
the machine and the library versions, and that every row has the benchmark's measurements.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# Script -> keys every result row must hold as finite numbers.
EXPECTED = {
    "bench_dcor.py": ("floor_ms", "dcor_forward_ms", "dcor_forward_backward_ms", "cdist_forward_ms"),
    "bench_representations.py": ("images_per_s", "ms_per_image"),
    "bench_step.py": ("step_ms", "images_per_s", "student_forward_ms", "optimizer_ms", "overhead_share"),
    "bench_dataloading.py": ("images_per_s", "images_per_s_per_worker", "decode_ms", "views_ms"),
    "bench_quality.py": ("linear", "knn"),
}
# A real teacher on real images: one seed and one epoch are enough to show the script runs end to end.
EXTRA = {"bench_quality.py": ("--seeds", "1", "--epochs", "1")}


def _run(script: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    # One thread: a smoke test must not depend on (or fight for) the cores of a shared CI machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--output", str(output), *extra],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=pytest.mark.slow) if s in EXTRA else s for s in sorted(EXPECTED)],
)
def test_quick_run_writes_a_report(script, tmp_path):
    output = tmp_path / "result.json"
    result = _run(script, output, *EXTRA.get(script, ()))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["quick"] is True
    assert report["device"] == "cpu"
    assert report["machine"]["cpu"]
    assert report["machine"]["versions"]["torch"]
    assert report["table"].startswith("| ")
    assert report["table"] in result.stdout  # the printed table is the one saved
    rows = [row for row in report["results"] if not str(row.get("status", "")).startswith("skipped")]
    assert rows
    for row in rows:
        for key in EXPECTED[script]:
            assert isinstance(row[key], (int, float)), (key, row)
            assert math.isfinite(row[key]), (key, row)
            assert row[key] >= 0, (key, row)


def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    result = _run("bench_dcor.py", tmp_path / "result.json", "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--device cpu" in result.stderr
    assert not (tmp_path / "result.json").exists()
