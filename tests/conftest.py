"""Fixtures and helpers shared by several test modules: real tiny data and a tiny teacher, built once.

Test modules import the helpers (``from conftest import tiny_args``): pytest puts this folder on
``sys.path``. The test modules sit in one folder per sub-package of ``mvmr_hf`` (the whole package's
at the top); their names are unique across folders, so they need no ``__init__.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from mvmr_hf.data.sample_data import write_digits
from mvmr_hf.models.tiny_models import save_tiny_teacher
from mvmr_hf.storage.checkpoint import TRAINER_STATE, checkpoint_path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped where CUDA is not available (CI); ``make gpu-check`` runs them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a GPU (make gpu-check runs it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits at 32 px as a local parquet data set (train/test splits)."""
    return write_digits(tmp_path_factory.mktemp("data") / "digits", image_size=32)


@pytest.fixture(scope="session")
def teacher(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer CLIP (vision + text towers) saved with its processor."""
    return save_tiny_teacher("clip", tmp_path_factory.mktemp("teacher") / "clip", image_size=32)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons: reset them between two in-process training runs."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Reset Accelerate's singletons after each in-process training run."""
    yield
    reset_accelerate()


def tiny_args(digits: Path, output_dir: Path, *extra: str) -> list[str]:
    """A run that takes seconds: 32 px digits, a 0.4M-parameter timm ResNet, a 16-16 projector."""
    return [
        "--dataset", str(digits), "--output-dir", str(output_dir), "--student", "test_resnet",
        "--projector", "16-16", "--image-size", "32", "--batch-size", "8", "--num-workers", "0", *extra,
    ]  # fmt: skip


def read_metrics(output_dir: Path) -> list[dict]:
    """The lines of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder`` with its size, modification time and content: equal means untouched."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Per-image work and tiny models run faster on one thread (DataLoader workers use one too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_checkpoint(output_dir: Path, step: int, *, complete: bool = True) -> Path:
    """A checkpoint folder holding only its trainer state (``complete``) or nothing (a partial ``.tmp``)."""
    path = checkpoint_path(output_dir, step)
    if not complete:
        path = path.with_name(path.name + ".tmp")
    path.mkdir(parents=True)
    if complete:
        (path / TRAINER_STATE).write_text(json.dumps({"step": step, "epoch": 0, "num_processes": 1}))
    return path


def on_two_processes(tmp_path: Path, command: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``command`` of :mod:`mvmr_hf.cli.release` (``evaluate_main``, ``align_main``) on 2 CPU processes.

    torchrun with gloo, one thread each; asserts exit status 0 and returns the finished process.
    """
    script = tmp_path / f"{command}.py"
    script.write_text(f"import sys\nfrom mvmr_hf.cli.release import {command}\nsys.exit({command}())\n")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    result = subprocess.run(
        [*launch, *argv], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
