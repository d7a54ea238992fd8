"""The exact teacher cache: stored outputs come back bit for bit, across processes and reopening."""

from __future__ import annotations

import pytest
import torch

from mvmr_hf.teacher_cache import TeacherCache, cache_folder


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
