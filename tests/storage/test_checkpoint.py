"""Checkpoint folders: ordering, partial ones ignored and removed, rotation, damage found and skipped."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fake_checkpoint, read_metrics, reset_accelerate, snapshot, tiny_args
from safetensors.torch import load_file

from mvmr_hf.cli.release import export_main
from mvmr_hf.cli.train import distill_main, pretrain_main
from mvmr_hf.errors import ConfigError
from mvmr_hf.release import export
from mvmr_hf.storage.checkpoint import (
    TRAINER_STATE,
    checkpoint_path,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_partial,
    rotate_checkpoints,
)
from mvmr_hf.training import teacher_cache
from mvmr_hf.training.teacher_cache import CACHE_DIR

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_checkpoints_are_ordered_by_step_and_partial_ones_ignored(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (1000, 20, 300):
        fake_checkpoint(tmp_path, step)
    partial = fake_checkpoint(tmp_path, 4000, complete=False)
    no_state = checkpoint_path(tmp_path, 5000)
    no_state.mkdir()  # a folder without trainer_state.json is not complete either
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000020", "step-000300", "step-001000"]
    assert latest_checkpoint(tmp_path).name == "step-001000"
    assert read_trainer_state(latest_checkpoint(tmp_path))["step"] == 1000
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        read_trainer_state(partial)
    remove_partial(tmp_path)
    assert not partial.exists()


def test_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000001", "step-000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


# ----------------------------------------------------------------------------- damaged checkpoints


def _tiny(digits, run, *extra):
    return tiny_args(digits, run, "--handcrafted", "lsd", "--seed", "7", "--max-steps", "6",
                     "--checkpoint-every", "2", "--keep-checkpoints", "5", "--log-every", "1",
                     *extra)  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory) -> Path:
    """A 6-step pretraining run with checkpoints at steps 2, 4 and 6, never interrupted."""
    run = tmp_path_factory.mktemp("whole") / "run"
    assert pretrain_main(_tiny(digits, run)) == 0
    reset_accelerate()
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_checkpoint_records_the_size_and_sha256_of_every_file(finished_run):
    checkpoint = checkpoint_path(finished_run, 6)
    files = read_trainer_state(checkpoint)["files"]
    on_disk = sorted(p.name for p in checkpoint.iterdir() if p.name != TRAINER_STATE)
    assert sorted(files) == on_disk
    assert {"model.safetensors", "optimizer.bin", "dataloader_rank0.json"} <= set(files)
    for name, record in files.items():
        data = (checkpoint / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert checkpoint_problem(checkpoint) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "model.safetensors holds 1000 bytes where"),
        ("flip", "optimizer.bin does not match the SHA-256"),
        ("delete", "scheduler.bin is missing"),
        ("state", "trainer_state.json cannot be read"),
    ],
)
def test_damage_is_named(finished_run, tmp_path, damage, reason):
    checkpoint = checkpoint_path(_copy(finished_run, tmp_path), 6)
    _damage(checkpoint, damage)
    assert reason in checkpoint_problem(checkpoint)


def _damage(checkpoint: Path, damage: str) -> None:
    if damage == "truncate":
        with (checkpoint / "model.safetensors").open("r+b") as file:
            file.truncate(1000)
    elif damage == "flip":
        data = bytearray((checkpoint / "optimizer.bin").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (checkpoint / "optimizer.bin").write_bytes(bytes(data))
    elif damage == "delete":
        (checkpoint / "scheduler.bin").unlink()
    else:
        (checkpoint / TRAINER_STATE).write_text('{"step": 6, "epo')


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_skips_a_damaged_latest_checkpoint_and_ends_as_an_uninterrupted_run(
    digits, finished_run, tmp_path, capsys, damage
):
    run = _copy(finished_run, tmp_path)
    _damage(checkpoint_path(run, 6), damage)
    capsys.readouterr()
    assert pretrain_main([*_tiny(digits, run), "--resume"]) == 0
    skipped = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("skipping checkpoint")
    ]
    assert len(skipped) == 1
    assert "step-000006" in skipped[0]
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 7))  # steps 5 and 6 redone once
    expected = load_file(checkpoint_path(finished_run, 6) / "model.safetensors")
    for key, value in load_file(checkpoint_path(run, 6) / "model.safetensors").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=key)
    assert checkpoint_problem(checkpoint_path(run, 6)) is None


def test_a_damaged_checkpoint_named_explicitly_is_one_line_exit_2_and_nothing_changes(
    digits, finished_run, tmp_path, capsys
):
    run = _copy(finished_run, tmp_path)
    _damage(checkpoint_path(run, 6), "truncate")
    before = snapshot(run)
    assert pretrain_main([*_tiny(digits, run), "--resume", str(checkpoint_path(run, 6))]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is damaged: model.safetensors holds 1000 bytes" in err
    assert snapshot(run) == before


def test_when_every_checkpoint_is_damaged_resume_says_so(digits, finished_run, tmp_path, capsys):
    run = _copy(finished_run, tmp_path)
    for step in (2, 4, 6):
        _damage(checkpoint_path(run, step), "delete")
    before = snapshot(run)
    assert pretrain_main([*_tiny(digits, run), "--resume"]) == 2
    assert "every checkpoint" in capsys.readouterr().err.strip().splitlines()[-1]
    assert snapshot(run) == before


def test_checkpoints_written_before_the_manifest_still_resume(digits, finished_run, tmp_path):
    run = _copy(finished_run, tmp_path)
    state_file = checkpoint_path(run, 4) / TRAINER_STATE
    state = json.loads(state_file.read_text())
    del state["files"]
    state_file.write_text(json.dumps(state))
    shutil.rmtree(checkpoint_path(run, 6))
    assert pretrain_main([*_tiny(digits, run), "--resume"]) == 0
    assert read_trainer_state(latest_checkpoint(run))["step"] == 6


# ----------------------------------------------------------------------------- a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line_and_loses_nothing(
    digits, finished_run, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: _no_space() if "step-000004" in str(f)
                        else save(obj, f, *a, **k))  # fmt: skip
    assert pretrain_main(_tiny(digits, run)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: could not write the checkpoint of step 4 in {run / 'checkpoints'} ")
    assert "No space left on device" in err
    assert "GiB free there" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no partial folder
    assert checkpoint_problem(checkpoint_path(run, 2)) is None
    assert not (run / "student").exists()

    monkeypatch.setattr(torch, "save", save)
    reset_accelerate()
    assert pretrain_main([*_tiny(digits, run), "--resume"]) == 0
    expected = load_file(checkpoint_path(finished_run, 6) / "model.safetensors")
    for key, value in load_file(checkpoint_path(run, 6) / "model.safetensors").items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-6, msg=key)


def test_a_re_export_reports_the_run_as_its_training_did_and_replaces_a_release_only_when_told(
    finished_run, tmp_path, capsys
):
    """mvmr-export on a finished run: the release in RUN/student (which evaluation results or an
    alignment head may have joined) stays unless --overwrite; the re-exported card keeps the run's
    hardware, command and teachers from the checkpoint, and the time up to that checkpoint."""
    run = _copy(finished_run, tmp_path)
    before = snapshot(run / "student")
    assert export_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{run / 'student'} already holds a release: pass --overwrite" in err
    assert snapshot(run / "student") == before

    trained = json.loads((run / "student" / "run_info.json").read_text())
    assert export_main([str(run), "--overwrite"]) == 0
    exported = json.loads((run / "student" / "run_info.json").read_text())
    for fact in ("step", "hardware", "command", "teachers", "repo_id"):
        assert exported[fact] == trained[fact], fact
    assert 0 < exported["training_seconds"] <= trained["training_seconds"]


def test_a_release_that_cannot_be_written_keeps_the_previous_one(finished_run, tmp_path, capsys, monkeypatch):
    run = _copy(finished_run, tmp_path)
    before, files = snapshot(run / "student"), sorted(p.name for p in run.iterdir())
    monkeypatch.setattr(export, "save_file", _no_space)
    assert export_main([str(run), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"could not write the release in {run / 'student'}" in err
    assert snapshot(run / "student") == before
    assert sorted(p.name for p in run.iterdir()) == files  # no temporary folder left


def test_a_teacher_cache_that_cannot_be_written_stops_the_run_and_leaves_no_partial_shard(
    digits, teacher, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    monkeypatch.setattr(teacher_cache, "save_file", _no_space)
    argv = tiny_args(digits, run, "--teacher", str(teacher), "--cache-teacher", "--teacher-view",
                     "non-augmented", "--split", "train[:64]", "--no-streaming", "--epochs", "2")  # fmt: skip
    assert distill_main(argv) == 1
    assert "could not write the teacher cache in" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not [p for p in (run / CACHE_DIR).rglob("*") if p.name.startswith("shard-")]
