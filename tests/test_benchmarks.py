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
from unittest import mock

import pytest
import torch
from conftest import read_metrics, reset_accelerate, tiny_args

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# Script -> keys every result row must hold as finite numbers.
EXPECTED = {
    "bench_dcor.py": ("floor_ms", "dcor_forward_ms", "dcor_forward_backward_ms", "cdist_forward_ms"),
    "bench_representations.py": ("images_per_s", "ms_per_image"),
    "bench_step.py": ("step_ms", "images_per_s", "student_forward_ms", "optimizer_ms", "overhead_share"),
    "bench_loop.py": ("loop_images_per_s", "parts_images_per_s", "loop_share", "data_wait_share"),
    "bench_dataloading.py": ("images_per_s", "images_per_s_per_worker", "decode_ms", "views_ms"),
    "bench_quality.py": ("linear", "knn"),
    "bench_distill.py": ("linear", "knn"),
    "bench_evaluation.py": ("probe_s", "knn_s", "total_s", "probe_top1", "knn_top1"),
    "bench_teachers.py": ("weights_mib", "ms_per_image"),
    "bench_protocols.py": ("probe_top1", "finetune_top1_0.0001", "finetune_top1_0.001", "map", "sklearn_map"),
}
# A real teacher on real images: one seed and one epoch are enough to show the script runs end to end.
EXTRA = {"bench_quality.py": ("--seeds", "1", "--epochs", "1")}
SLOW = {"bench_quality.py", "bench_distill.py"}  # real teachers: a minute or two each


def _run(script: str, output: Path, *extra: str) -> subprocess.CompletedProcess:
    # One thread: a smoke test must not depend on (or fight for) the cores of a shared CI machine.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--output", str(output), *extra],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in sorted(EXPECTED)],
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


def test_the_gpu_check_without_a_gpu_is_one_line_and_exit_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py")],
                            capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "needs a CUDA device" in result.stderr


def test_the_gpu_check_gives_each_step_at_most_what_is_left_of_its_budget_and_skips_the_rest(
    monkeypatch, tmp_path
):
    """The orchestration alone (no GPU here): steps that take their whole limit use up the budget."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    clock, calls = [0.0], []

    def run(name, command, limit):  # a step that takes all the time it is given
        calls.append((name, limit))
        clock[0] += limit
        return {"step": name, "command": "", "status": "passed", "seconds": float(limit)}

    monkeypatch.setattr(gpu_check, "_run", run)
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_check, "machine", lambda device: {})
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    assert gpu_check.main(["--budget", "420"]) == 1  # a skipped step is not a pass
    # The limits are the table's; the budget runs out in bench_distill, which gets only what is left.
    limits = [("gpu tests", 110)] + [(f"bench_{name}", limit) for name, limit, _ in gpu_check.BENCHMARKS]
    assert [limit for _, limit in limits[:5]] == [110, 150, 25, 45, 40]  # 370 s before bench_distill
    assert calls == [*limits[:5], ("bench_distill", 50)]
    summary = json.loads((tmp_path / "gpu-check-cuda.json").read_text())
    assert [s["status"] for s in summary["steps"][6:]] == ["skipped (budget spent)"] * 3
    assert sum(limit for _, limit in calls) == 420


# ----------------------------------------------------------------------------- bench_step's instruments

PHASES = [
    "data_wait", "transfer", "student_forward", "teacher", "representations", "loss_forward", "loss_backward",
    "student_backward", "optimizer",
]  # fmt: skip


@pytest.fixture
def bench_step(monkeypatch):
    """``benchmarks/bench_step.py`` as a module (it imports its sibling ``common``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_step

    return bench_step


class _Events:
    """A clock for ``bench_step.instrument`` that records the marks in order instead of timing them."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def new_epoch(self) -> None:
        pass

    def new_step(self) -> None:
        pass

    def drop_step(self) -> None:
        pass

    def mark(self, phase: str) -> None:
        self.events.append(phase)


def _tiny_distill(digits, teacher, output_dir, *extra):
    """One tiny distillation run with the teacher and lsd as representations, logging every step."""
    return tiny_args(
        digits, output_dir, "--log-every", "1", "--teacher", str(teacher), "--handcrafted", "lsd", *extra
    )


def _autograd_nodes(tensor, stop=frozenset()):
    """The nodes of ``tensor``'s backward graph, not going past those in ``stop``."""
    nodes, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in nodes and node not in stop:
            nodes.add(node)
            todo += [child for child, _ in node.next_functions]
    return nodes


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bench_step_marks_the_loops_phases_in_order_and_splits_the_backward_between_loss_and_student(
    bench_step, digits, teacher, tmp_path
):
    from mvmr_hf.cli.train import distill_main
    from mvmr_hf.training import loop as training

    clock, student_nodes = _Events(), set()
    events = clock.events

    def watch_student(module, inputs, output):
        nodes = _autograd_nodes(output.embedding)
        student_nodes.update(nodes)
        for node in nodes:
            node.register_prehook(lambda grads: events.append("student node"))

    def watch_loss(module, inputs, output):
        # identity views of Z (when a term reads it) and Z̃ that carry the mark
        z_views = {z.grad_fn for z in inputs[:2] if z is not None}
        for node in _autograd_nodes(output.total, stop=student_nodes) - z_views:
            node.register_prehook(lambda grads: events.append("loss node"))

    with bench_step.instrument(clock):
        build_student, loss = training.build_student, training.MVMRLoss  # the instrumented builders

        def watched_student(*args, **kwargs):
            student = build_student(*args, **kwargs)
            student.register_forward_hook(watch_student)
            return student

        def watched_loss(*args, **kwargs):
            criterion = loss(*args, **kwargs)
            criterion.register_forward_hook(watch_loss)
            return criterion

        with (
            mock.patch.object(training, "build_student", watched_student),
            mock.patch.object(training, "MVMRLoss", watched_loss),
        ):
            # a term on Z: the student's two passes, x then x̃, make one student_forward phase
            argv = _tiny_distill(digits, teacher, tmp_path / "run", "--max-steps", "1", "--view-weight", "1")
            assert distill_main(argv) == 0

    assert [event for event in events if not event.endswith(" node")] == PHASES
    loss_backward, student_backward = events.index("loss_backward"), events.index("student_backward")
    assert "loss node" in events[:loss_backward]
    assert "loss node" not in events[loss_backward:], "a node of the loss ran after the loss_backward mark"
    assert set(events[loss_backward + 1 : student_backward]) == {"student node"}
    assert "student node" not in events[:loss_backward], "the student's backward began before the mark"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_bench_step_instruments_change_neither_the_loss_nor_the_update(bench_step, digits, teacher, tmp_path):
    from safetensors.torch import load_file

    from mvmr_hf.cli.train import distill_main
    from mvmr_hf.storage.checkpoint import latest_checkpoint
    from mvmr_hf.training import loop as training

    initial = {}
    build_student = training.build_student

    def remembered_student(*args, **kwargs):
        student = build_student(*args, **kwargs)
        initial.update({key: value.clone() for key, value in student.state_dict().items()})
        return student

    with mock.patch.object(training, "build_student", remembered_student):
        assert distill_main(_tiny_distill(digits, teacher, tmp_path / "plain", "--max-steps", "2")) == 0
    reset_accelerate()
    with bench_step.instrument(_Events()):
        assert distill_main(_tiny_distill(digits, teacher, tmp_path / "marked", "--max-steps", "2")) == 0

    plain, marked = (read_metrics(tmp_path / run) for run in ("plain", "marked"))
    assert len(plain) == len(marked) == 2
    for a, b in zip(plain, marked, strict=True):
        for name in ("loss", "dcor/teacher", "dcor/lsd", "match/teacher"):  # the defaults: no term on Z
            assert a[name] == b[name], (a["step"], name)
    plain_weights = load_file(latest_checkpoint(tmp_path / "plain") / "model.safetensors")
    marked_weights = load_file(latest_checkpoint(tmp_path / "marked") / "model.safetensors")
    assert plain_weights.keys() == marked_weights.keys()
    for key, value in plain_weights.items():
        assert torch.equal(marked_weights[key], value), key
    assert not all(torch.equal(initial[key], plain_weights[key]) for key in initial), "no update"


def test_quality_on_fashion_mnist_without_its_files_is_one_line_and_exit_2(tmp_path):
    """The Fashion-MNIST benchmark's data set is a system package, not in CI: its absence is one line."""
    output = tmp_path / "result.json"
    result = _run("bench_quality_fashion.py", output, "--fashion-mnist", str(tmp_path / "none"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0
    assert "apt-get install dataset-fashion-mnist" in result.stderr
    assert not output.exists()


def test_quality_on_fashion_mnist_table_only_needs_its_runs_folder(tmp_path):
    """--finished-only reads the runs of --work-dir: without it, one line and exit 2, nothing written."""
    output = tmp_path / "result.json"
    result = _run("bench_quality_fashion.py", output, "--finished-only")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == "error: --finished-only reads the runs of --work-dir: pass it"
    assert not output.exists()
