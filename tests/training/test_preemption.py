"""Preemption: a stop signal sent to a real run (every process of it, as a cluster does) saves a complete
checkpoint after the current optimizer step, leaves the PREEMPTED marker and exits 75; --resume ends where an
uninterrupted run ends. The same through ``accelerate launch`` (the signal sent to the launcher alone), and
the SLURM recipe of examples/slurm, which requeues on the marker, run with stand-ins for srun and scontrol."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from conftest import read_metrics, tiny_args
from safetensors.torch import load_file

from mvmr_hf.config import TrainingArguments
from mvmr_hf.errors import PREEMPTED_EXIT, ConfigError
from mvmr_hf.storage.checkpoint import checkpoint_problem, latest_checkpoint, read_trainer_state
from mvmr_hf.training.run_folder import PREEMPTED

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = str(REPO / "examples" / "pretrain.py")
SBATCH = REPO / "examples" / "slurm" / "distill.sbatch"
CONFIGS = REPO / "examples" / "accelerate"
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]  # the CLI's
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

    _assert_marker(stopped, step, sig)

    assert [status for status, _ in _run([*arguments(digits, stopped), "--resume"], world)] == [0] * world
    assert [m["step"] for m in read_metrics(stopped)] == list(range(1, STEPS + 1))
    assert not (stopped / PREEMPTED).exists()
    _assert_same_weights(whole, stopped)


def _assert_marker(run: Path, step: int, sig: signal.Signals) -> None:
    """``run``'s PREEMPTED marker names ``step``, its complete checkpoint and ``sig``."""
    marker = json.loads((run / PREEMPTED).read_text())
    assert marker == {"step": step, "checkpoint": f"checkpoints/step-{step:06d}", "signal": sig.name}
    assert checkpoint_problem(run / marker["checkpoint"]) is None
    assert read_trainer_state(run / marker["checkpoint"])["step"] == step


def test_stop_signals_are_checked_and_can_be_turned_off():
    assert TrainingArguments(output_dir="o").signals() == [signal.SIGTERM, signal.SIGUSR1]
    assert TrainingArguments(output_dir="o", stop_signals="").signals() == []
    with pytest.raises(ConfigError, match="SIGFOO, which is not a signal"):
        TrainingArguments(output_dir="o", stop_signals="SIGTERM,SIGFOO")


# ----------------------------------------------------------------------------- launchers and the SLURM recipe
RECIPE_VARIABLES = ("PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
"""What the SLURM recipe sets for torchrun: SIGUSR1 passed on, and how long it waits for the save."""
FAKE_SRUN = """#!/bin/bash
# srun on one node: its options dropped, the task run as node 0
while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
    "show hostnames") echo 127.0.0.1 ;;
    requeue*) echo "$*" >> "$SCONTROL_LOG" ;;
    *) exit 1 ;;
esac
"""


def _recipe_variable(name: str) -> str:
    """What the SLURM recipe exports as ``name``."""
    return re.search(rf"^export {name}=(\S+)$", SBATCH.read_text(), re.MULTILINE).group(1)


def _launch_env(**extra: str) -> dict[str, str]:
    """CPU processes (gloo) with one thread, and the launcher settings of the SLURM recipe."""
    recipe = {name: _recipe_variable(name) for name in RECIPE_VARIABLES}
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **recipe,
            **extra}  # fmt: skip


DATA_WORKER = "pt_data_worker"
"""The name PyTorch gives its DataLoader workers' processes."""


def _alive(processes: dict[int, psutil.Process], *, data_workers: bool = True) -> list[str]:
    alive = []
    for process in processes.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            running = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            if running and (data_workers or process.name() != DATA_WORKER):
                alive.append(f"{process.pid} {process.name()}")
    return alive


def _launch(
    command: list[str],
    output_dir: Path,
    *,
    env: dict[str, str] | None = None,
    stop_after: int | None = None,
    sig: signal.Signals = signal.SIGTERM,
    whole_step: bool = False,
) -> tuple[int, str]:
    """Run ``command`` (a launcher) in a session of its own; returns its exit status and stderr.

    With ``stop_after``, once ``output_dir`` has logged that many steps, ``sig`` goes to the launcher
    process alone, or with ``whole_step`` to every process it started, as SLURM's ``--signal`` signals
    every process of a job step (not the batch shell). Every process the launcher started (whatever
    session it put it in) must be gone once it has exited: none is orphaned.
    """
    stderr = output_dir.with_name(output_dir.name + ".stderr")
    started: dict[int, psutil.Process] = {}
    with stderr.open("w") as err:
        launcher = subprocess.Popen(command, cwd=REPO, env=env or _launch_env(), stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)  # fmt: skip
    try:
        metrics, deadline = output_dir / "metrics.jsonl", time.monotonic() + 600
        while stop_after is not None and launcher.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.NoSuchProcess):
                started |= {p.pid: p for p in psutil.Process(launcher.pid).children(recursive=True)}
            if metrics.exists() and len(metrics.read_text().splitlines()) >= stop_after:
                for process in [*started.values()] if whole_step else [psutil.Process(launcher.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        process.send_signal(sig)
                break
            time.sleep(0.02)
        status = launcher.wait(timeout=600)
        # The launcher waits for the training processes; their DataLoader workers see them go within seconds.
        assert not _alive(started, data_workers=False), f"left running by the launcher: {_alive(started)}"
        gone = time.monotonic() + 15
        while _alive(started) and time.monotonic() < gone:
            time.sleep(0.1)
        assert not _alive(started), f"left running by the launcher: {_alive(started)}"
    finally:
        for process in [psutil.Process(launcher.pid) if launcher.poll() is None else None, *started.values()]:
            with contextlib.suppress(psutil.NoSuchProcess, AttributeError):
                process.kill()
    return status, stderr.read_text()


def _launcher_args(digits: Path, run: Path) -> list[str]:
    return [*_two_processes(digits, run), "--num-workers", "1"]  # with a DataLoader worker per process


def _launch_command(world: int, launcher: str, argv: list[str]) -> list[str]:
    """``accelerate launch`` of pretrain.py on ``world`` CPU processes in fp32.

    ``plain``: no config, Accelerate's simple launcher (its own child process; with ACCELERATE_USE_CPU
    it starts one process whatever --num_processes says); ``config``: the shipped one-node config, whose
    MULTI_GPU runs torchrun inside the launcher, also for one process.
    """
    if launcher == "plain":
        assert world == 1
        options = ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no"]
    else:
        options = ["--config_file", str(CONFIGS / "one_node_multi_gpu.yaml"), "--num_processes", str(world),
                   "--main_process_port", str(_free_port())]  # fmt: skip
    return [*ACCELERATE_LAUNCH, *options, "--mixed_precision", "no", PRETRAIN, *argv]


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    """``uninterrupted(world)``: the run of ``world`` processes through ``accelerate launch``, made once."""
    runs: dict[int, Path] = {}

    def run(world: int) -> Path:
        if world not in runs:
            folder = tmp_path_factory.mktemp(f"uninterrupted{world}") / "run"
            launcher = "plain" if world == 1 else "config"
            status, stderr = _launch(_launch_command(world, launcher, _launcher_args(digits, folder)), folder)
            assert status == 0, stderr[-3000:]
            assert not (folder / PREEMPTED).exists()  # a run that finishes leaves no marker
            runs[world] = folder
        return runs[world]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "launcher", "sig"),
    [
        pytest.param(1, "plain", signal.SIGTERM, id="1-process-simple-launcher-SIGTERM"),
        pytest.param(2, "config", signal.SIGTERM, id="2-processes-torchrun-SIGTERM"),
        pytest.param(1, "config", signal.SIGUSR1, id="1-process-torchrun-SIGUSR1"),
        pytest.param(2, "config", signal.SIGUSR1, id="2-processes-torchrun-SIGUSR1"),
    ],
)
def test_a_stop_signal_to_accelerate_launch_reaches_every_process_and_leaves_the_marker(
    digits, tmp_path, uninterrupted, world, launcher, sig
):
    """SIGTERM, and the recipe's SIGUSR1 (with its PET_SIGNALS_TO_HANDLE), sent to the launcher alone."""
    stopped = tmp_path / "stopped"
    argv = _launcher_args(digits, stopped)
    status, stderr = _launch(_launch_command(world, launcher, argv), stopped, stop_after=5, sig=sig)
    # The launcher keeps no 75 (measured with Accelerate 1.16: 128 + the signal), hence the marker.
    assert status not in (0, PREEMPTED_EXIT), stderr[-3000:]
    assert stderr.count(f"preempted: {sig.name} after step") == world, stderr[-3000:]  # every process stopped
    step = read_trainer_state(latest_checkpoint(stopped))["step"]
    assert 5 <= step < STEPS
    _assert_marker(stopped, step, sig)
    assert [m["step"] for m in read_metrics(stopped)] == list(range(1, step + 1))

    status, stderr = _launch(_launch_command(world, launcher, [*argv, "--resume"]), stopped)
    assert status == 0, stderr[-3000:]
    assert not (stopped / PREEMPTED).exists()
    assert [m["step"] for m in read_metrics(stopped)] == list(range(1, STEPS + 1))
    _assert_same_weights(uninterrupted(world), stopped)


@pytest.mark.slow
def test_the_slurm_recipe_requeues_a_preempted_run_which_then_resumes(digits, teacher, tmp_path):
    """examples/slurm/distill.sbatch on one node of 2 CPU processes, with the shipped multi-node config;
    srun and scontrol are stand-ins (scontrol records the requeue)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run, requeues = tmp_path / "run", tmp_path / "scontrol.log"
    env = _launch_env(
        PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2", SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="4242",
        MAIN_PORT=str(_free_port()), OUTPUT_DIR=str(run), SCONTROL_LOG=str(requeues),
    )  # fmt: skip
    for name in RECIPE_VARIABLES:
        del env[name]  # the recipe sets them
    options = _two_processes(digits, run)[4:]  # its --dataset and --output-dir dropped: OUTPUT_DIR says it
    command = ["bash", str(SBATCH), "--dataset", str(digits), "--teacher", str(teacher), *options,
               "--num-workers", "1"]  # fmt: skip

    status, stderr = _launch(command, run, env=env, stop_after=5, sig=signal.SIGUSR1, whole_step=True)
    assert status != 0, stderr[-3000:]
    assert requeues.read_text().split() == ["requeue", "4242"], stderr[-3000:]
    assert "requeueing" in stderr
    marker = json.loads((run / PREEMPTED).read_text())
    _assert_marker(run, marker["step"], signal.SIGUSR1)

    requeues.unlink()
    status, stderr = _launch(command, run, env=env)  # the requeued job
    assert status == 0, stderr[-3000:]
    assert not requeues.exists()
    assert not (run / PREEMPTED).exists()
    assert [m["step"] for m in read_metrics(run)] == list(range(1, STEPS + 1))
    assert (run / "student" / "model.safetensors").is_file()


def test_the_slurm_recipe_parses_and_the_accelerate_configs_load():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    one_node = load_config_from_file(str(CONFIGS / "one_node_multi_gpu.yaml"))
    multi_node = load_config_from_file(str(CONFIGS / "multi_node.yaml"))
    for config in (one_node, multi_node):
        assert config.distributed_type == "MULTI_GPU"
        assert config.mixed_precision == "bf16"
        assert not config.use_cpu
    assert one_node.num_machines == 1
    assert multi_node.num_machines > 1
    assert multi_node.num_processes % multi_node.num_machines == 0
    assert multi_node.main_process_ip
    assert multi_node.main_process_port
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --requeue$", text, re.MULTILINE)
    warning = int(re.search(r"^#SBATCH --signal=USR1@(\d+)$", text, re.MULTILINE).group(1))
    # torchrun passes SIGUSR1 on, then waits for the checkpoint, within the warning
    assert "SIGUSR1" in _recipe_variable("PET_SIGNALS_TO_HANDLE").split(",")
    assert int(_recipe_variable("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")) < warning
    assert signal.SIGUSR1 in TrainingArguments(output_dir="o").signals()  # the run stops on it by default
