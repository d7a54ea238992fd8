"""``examples/distill_loop.py``, the loop written out from the public pieces, trains as ``mvmr-distill``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import read_metrics, reset_accelerate
from safetensors.torch import load_file

from mvmr_hf.cli.train import distill_main
from mvmr_hf.release.export import load_student

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_loop.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("distill_loop", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_loop_gives_the_commands_losses_and_student(digits, teacher, tmp_path, monkeypatch):
    """Same flags and seed: the example's loss at each of 3 steps is the command's (its metrics.jsonl, one
    line a step), and its release holds the command's trained backbone and loads like one.

    On the CPU, even where there is a GPU: CUDA's convolution backward is not bitwise reproducible."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    flags = ["--dataset", str(digits), "--teacher", str(teacher), "--student", "test_resnet",
             "--image-size", "32", "--batch-size", "8", "--max-steps", "3", "--seed", "3",
             "--learning-rate", "1e-3", "--num-workers", "0"]  # fmt: skip
    losses = _example().main([*flags, "--output-dir", str(tmp_path / "example")])
    reset_accelerate()
    assert distill_main([*flags, "--output-dir", str(tmp_path / "command"), "--log-every", "1"]) == 0

    metrics = read_metrics(tmp_path / "command")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"dcor/teacher", "match/teacher"} < metrics[0].keys()  # distillation's default terms
    assert losses == pytest.approx([m["loss"] for m in metrics], rel=1e-5)
    assert len(set(losses)) == 3  # the steps train: each loss differs

    expected = load_file(tmp_path / "command" / "student" / "model.safetensors")
    released = load_file(tmp_path / "example" / "student" / "model.safetensors")
    assert released.keys() == expected.keys()
    for key, value in released.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    student = load_student(tmp_path / "example" / "student")
    assert student.model_name == "test_resnet"
