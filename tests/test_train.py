"""The training loop's helpers and end-to-end single-process runs of both entry points."""

from __future__ import annotations

import json

import pytest
import torch

from mvmr_hf.checkpoint import (
    TRAINER_STATE,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    remove_partial,
    rotate_checkpoints,
)
from mvmr_hf.errors import ConfigError
from mvmr_hf.teacher_cache import TeacherCache, cache_folder


def _fake_checkpoint(output_dir, step, *, complete=True):
    path = checkpoint_path(output_dir, step)
    if not complete:
        path = path.with_name(path.name + ".tmp")
    path.mkdir(parents=True)
    if complete:
        (path / TRAINER_STATE).write_text(json.dumps({"step": step, "epoch": 0, "num_processes": 1}))
    return path


def test_checkpoints_are_ordered_by_step_and_partial_ones_ignored(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (1000, 20, 300):
        _fake_checkpoint(tmp_path, step)
    partial = _fake_checkpoint(tmp_path, 4000, complete=False)
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
        _fake_checkpoint(tmp_path, step)
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000001", "step-000002"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_teacher_cache_returns_the_stored_outputs_bit_for_bit(tmp_path):
    folder = cache_folder(tmp_path, {"teacher": "tiny", "image_size": 32})
    assert folder != cache_folder(tmp_path, {"teacher": "tiny", "image_size": 64})
    outputs = {f"k{i}": torch.randn(3, 5, dtype=torch.float64) for i in range(10)}
    rank0 = TeacherCache(folder, rank=0, rows_per_shard=4)
    rank1 = TeacherCache(folder, rank=1, rows_per_shard=4)
    keys0, keys1 = ["k0", "k1", "k2", "k3", "k4"], ["k5", "k6", "k7", "k8", "k9"]
    rank0.store(keys0[:2], torch.stack([outputs[k] for k in keys0[:2]]))
    assert rank0.lookup(["k0"], "cpu") is None  # buffered, not yet in a shard
    rank0.store(keys0[2:], torch.stack([outputs[k] for k in keys0[2:]]))  # 5 rows buffered: a shard
    rank1.store(keys1, torch.stack([outputs[k] for k in keys1]))
    assert rank0.lookup(["k0"], "cpu") is not None
    assert rank0.lookup(["k5"], "cpu") is None  # another process's shard: only after refresh()
    rank0.refresh()
    assert rank0.lookup(["k9", "new"], "cpu") is None
    got = rank0.lookup(["k9", "k0", "k4", "k9"], "cpu")
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.stack([outputs[k] for k in ("k9", "k0", "k4", "k9")]))

    reopened = TeacherCache(folder, rank=0)  # a resumed run sees every shard and appends new ones
    assert len(reopened) == 10
    reopened.store(["new"], torch.zeros(1, 3, 5, dtype=torch.float64))
    reopened.flush()
    assert sorted(p.name for p in folder.glob("shard-r000-*")) == [
        "shard-r000-000000.safetensors",
        "shard-r000-000001.safetensors",
    ]
    with pytest.raises(ValueError, match="one key per sample"):
        reopened.store(["a", "b"], torch.zeros(1, 2))
