"""The exact teacher cache: stored outputs come back bit for bit, across processes and reopening."""

from __future__ import annotations

import pytest
import torch

from mvmr_hf.training.teacher_cache import TeacherCache, cache_folder


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


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("truncate", "skipping damaged teacher-cache shard"), ("flip", "do not match the SHA-256")],
)
def test_a_damaged_shard_is_skipped_and_its_rows_computed_again(tmp_path, capsys, damage, reason):
    folder = cache_folder(tmp_path, {"teacher": "tiny"})
    cache = TeacherCache(folder, rank=0)
    outputs = torch.randn(4, 6)
    cache.store(["a", "b"], outputs[:2])
    cache.flush()
    cache.store(["c", "d"], outputs[2:])
    cache.flush()
    first, second = sorted(folder.glob("shard-r000-*.safetensors"))
    data = bytearray(first.read_bytes())
    if damage == "truncate":
        data = data[:40]
    else:
        data[-1] ^= 0x01  # the last byte of the outputs: the header and its keys stay readable
    first.write_bytes(bytes(data))

    reopened = TeacherCache(folder, rank=0)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert reason in err
    assert str(first) in err
    assert reopened.missing(["a", "b", "c", "d"]) == [0, 1]  # the teacher runs on a and b again
    assert torch.equal(reopened.lookup(["c", "d"], "cpu"), outputs[2:])
    assert reopened.lookup(["a"], "cpu") is None
    reopened.refresh()
    assert capsys.readouterr().err == ""  # told once
    reopened.store(["a", "b"], outputs[:2])
    reopened.flush()
    assert torch.equal(TeacherCache(folder, rank=0).lookup(["a", "b"], "cpu"), outputs[:2])
    assert second.exists()
