"""Preemption: a stop signal sent to a real run (every process of it, as a cluster does) saves a complete
checkpoint after the current optimizer step and exits 75; --resume ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_args
from safetensors.torch import load_file

from mvmr_hf.checkpoint import checkpoint_problem, latest_checkpoint, read_trainer_state
from mvmr_hf.config import TrainingArguments
from mvmr_hf.errors import PREEMPTED_EXIT, ConfigError

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "examples" / "pretrain.py")
STEPS = 30


def _start(argv: list[str], *, rank: int = 0, world: int = 1, port: int = 0):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world > 1:
        env |= {"ACCELERATE_USE_CPU": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port)}  # fmt: skip
    # Each in its own process group, signalled whole, as a cluster signals every task of a job with all
    # of its processes (DataLoader workers too).
    return subprocess.Popen([sys.executable, PRETRAIN, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(argv: list[str], world: int, *, stop_after: int | None = None, sig=signal.SIGTERM) -> list[tuple]:
    """Run on ``world`` processes; with ``stop_after``, send ``sig`` to the whole job once that many steps
    are logged. Returns each process's (exit status, stderr)."""
    port = _free_port()
    processes = [_start(argv, rank=rank, world=world, port=port) for rank in range(world)]
    if stop_after is not None:
        metrics = Path(argv[argv.index("--output-dir") + 1]) / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and all(p.poll() is None for p in processes):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= stop_after:
                for process in processes:
                    os.killpg(process.pid, sig)
                break
            time.sleep(0.02)
    return [(p.wait(timeout=600), p.stderr.read()) for p in processes]


def _assert_same_weights(expected: Path, run: Path) -> None:
    weights = load_file(latest_checkpoint(expected) / "model.safetensors")
    for key, value in load_file(latest_checkpoint(run) / "model.safetensors").items():
        torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=1e-6, msg=key)


def _one_process(digits, run):
    return tiny_args(digits, run, "--handcrafted", "lsd", "--seed", "3", "--max-steps", str(STEPS),
                     "--checkpoint-every", "1000", "--log-every", "1", "--num-workers", "2",
                     "--shuffle-buffer", "64")  # fmt: skip


def _two_processes(digits, run):
    return [
        "--dataset", str(digits), "--output-dir", str(run), "--student", "test_convnext", "--projector", "16",
        "--image-size", "32", "--handcrafted", "lsd", "--batch-size", "8", "--num-workers", "0",
        "--log-every", "1", "--checkpoint-every", "1000", "--no-streaming", "--split", "train[:128]",
        "--shuffle-buffer", "0", "--max-steps", str(STEPS), "--seed", "3",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("world", "sig"), [(1, signal.SIGTERM), (1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_a_stop_signal_saves_a_checkpoint_exits_75_and_resume_ends_like_an_uninterrupted_run(
    digits, tmp_path, world, sig
):
    arguments = _one_process if world == 1 else _two_processes
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert [status for status, _ in _run(arguments(digits, whole), world)] == [0] * world

    results = _run(arguments(digits, stopped), world, stop_after=5, sig=sig)
    assert [status for status, _ in results] == [PREEMPTED_EXIT] * world, results[0][1][-2000:]
    line = next(line for line in results[0][1].splitlines() if line.startswith("preempted:"))
    step = read_trainer_state(latest_checkpoint(stopped))["step"]
    assert f"after step {step}: its checkpoint is in {stopped}; continue with --resume" in line
    assert 5 <= step < STEPS
    assert checkpoint_problem(latest_checkpoint(stopped)) is None
    assert read_trainer_state(latest_checkpoint(stopped))["num_processes"] == world
    assert [m["step"] for m in read_metrics(stopped)] == list(range(1, step + 1))

    assert [status for status, _ in _run([*arguments(digits, stopped), "--resume"], world)] == [0] * world
    assert [m["step"] for m in read_metrics(stopped)] == list(range(1, STEPS + 1))
    _assert_same_weights(whole, stopped)


def test_stop_signals_are_checked_and_can_be_turned_off():
    assert TrainingArguments(output_dir="o").signals() == [signal.SIGTERM, signal.SIGUSR1]
    assert TrainingArguments(output_dir="o", stop_signals="").signals() == []
    with pytest.raises(ConfigError, match="SIGFOO, which is not a signal"):
        TrainingArguments(output_dir="o", stop_signals="SIGTERM,SIGFOO")
