"""A run owns its output folder: a second run, an export or a card update is refused while it holds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_metrics, snapshot, tiny_args

from mvmr_hf.cli.release import export_main
from mvmr_hf.cli.train import pretrain_main
from mvmr_hf.errors import ConfigError
from mvmr_hf.storage.lock import LOCK_FILE, FolderLock, check_folder_free, hold_folder

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]


def test_a_held_folder_is_refused_with_its_holder_and_free_again_once_released(tmp_path):
    folder = tmp_path / "run"
    check_folder_free(folder)
    assert not folder.exists()  # checking creates nothing
    lock = FolderLock(folder)
    lock.acquire()
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()} on ") as error:
        check_folder_free(folder)
    assert "\n" not in str(error.value)
    lock.release()
    check_folder_free(folder)
    with hold_folder(folder), pytest.raises(ConfigError, match="in use"):
        FolderLock(folder).acquire()


def _start(argv: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "examples" / "pretrain.py"), *argv]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(condition, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), "the first run did not get going"


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_holds_the_folder_and_kill_9_frees_it(
    digits, tmp_path, capsys
):
    run = tmp_path / "run"
    argv = tiny_args(digits, run, "--handcrafted", "lsd", "--max-steps", "100000", "--checkpoint-every", "2",
                     "--log-every", "1")  # fmt: skip
    first = _start(argv)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3, first)
        for second in ([*argv, "--resume"], argv):  # the same command, resuming or not
            before = len(read_metrics(run))
            assert pretrain_main(second) == 2
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0
            assert f"{run} is in use by another run (pid {first.pid} on " in err
            assert [m["step"] for m in read_metrics(run)][:before] == list(range(1, before + 1))
        assert export_main([str(run)]) == 2  # nor may an export write into it
        assert "in use by another run" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run / LOCK_FILE).exists()
    assert snapshot(run / "checkpoints"), "the first run wrote no checkpoint"
    resumed = [*argv[: argv.index("--max-steps")], "--max-steps", "4", *argv[argv.index("--max-steps") + 2 :]]
    assert pretrain_main([*resumed, "--resume"]) == 0  # the kernel released the killed run's lock
    assert (run / "student").is_dir()
