"""Checkpoint folders: ordering, partial ones ignored and removed, rotation (resuming: test_train.py)."""

from __future__ import annotations

import pytest
from conftest import fake_checkpoint

from mvmr_hf.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_partial,
    rotate_checkpoints,
)
from mvmr_hf.errors import ConfigError


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
