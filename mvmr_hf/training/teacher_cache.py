"""Exact cache of a teacher's outputs, keyed by image content.

The teacher only sees the non-augmented view of each image, so its output depends only on
the image (given the teacher, its output kind, the view size and the data set): the first
epoch stores it, later epochs read it back instead of running the teacher. The stored
tensors are the teacher's outputs bit for bit (same dtype), so a cached run computes the
same losses as an uncached one (to float rounding where the teacher ran on the few images of a
batch that the cache lacked: kernels may round differently for another number of rows).

Layout: ``OUTPUT_DIR/teacher_cache/<fingerprint>/`` holds ``fingerprint.json`` (what the
outputs depend on) and safetensors shards ``shard-r{rank}-{n}.safetensors``, each with one
tensor ``outputs`` (N, ...) and the N sample keys in its metadata. Each process writes its
own shards (atomically: a killed run leaves no partial shard) and reads everyone's after
:meth:`TeacherCache.refresh`. Each shard is read whole once, when it is indexed (its digest
needs all of it anyway), and a batch's rows are one gather from the concatenation of the shards
read, instead of one safetensors read per row in the training process. Each shard's
metadata also holds the SHA-256 of its outputs, checked when the shard is first indexed: a
shard that cannot be opened or does not match is skipped with one line on stderr, so its rows
count as missing and the teacher computes them again; a wrong output is never read.

Example::

    >>> cache = TeacherCache(cache_folder("run", teacher.fingerprint() | {"image_size": 224}), rank=0)
    >>> outputs = cache.lookup(keys, device)      # None on a miss
    >>> if outputs is None:
    ...     outputs = teacher(images)
    ...     cache.store(keys, outputs)
    >>> cache.flush(); cache.refresh()              # at the end of an epoch, on every process
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from mvmr_hf.utils import atomic_write, writing

__all__ = ["CACHE_DIR", "TeacherCache", "cache_folder"]

CACHE_DIR = "teacher_cache"
_TENSOR = "outputs"
_SHARD = re.compile(r"shard-r(\d+)-(\d+)\.safetensors")


def _digest(outputs: Tensor) -> str:
    """SHA-256 of a tensor's bytes (its dtype and shape are checked by safetensors itself)."""
    return hashlib.sha256(outputs.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def cache_folder(output_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> Path:
    """``OUTPUT_DIR/teacher_cache/<hash of fingerprint>``: one folder per distinct teacher setting."""
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Path(output_dir) / CACHE_DIR / digest


class TeacherCache:
    """Teacher outputs by sample key: stored during the first pass, read in later ones.

    Args:
        folder: the cache folder, usually from :func:`cache_folder`; created when missing.
        rank: this process's index, used to name its shards.
        fingerprint: what the outputs depend on, written to ``fingerprint.json`` for humans.
        rows_per_shard: outputs buffered in host memory before a shard is written.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        rank: int = 0,
        fingerprint: Mapping[str, Any] | None = None,
        rows_per_shard: int = 4096,
    ) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.rows_per_shard = rows_per_shard
        self.folder.mkdir(parents=True, exist_ok=True)
        if fingerprint is not None and rank == 0:
            (self.folder / "fingerprint.json").write_text(json.dumps(fingerprint, indent=2, default=str))
        self._index: dict[str, int] = {}  # key -> row of the concatenated outputs
        self._outputs: list[Tensor] = []  # each indexed shard's outputs, concatenated on the next lookup
        self._shards: set[Path] = set()
        self._pending: dict[str, Tensor] = {}
        self._damaged: set[Path] = set()
        self._next_shard = 1 + max(
            (
                int(m.group(2))
                for m in map(_SHARD.fullmatch, os.listdir(self.folder))
                if m and int(m.group(1)) == rank
            ),
            default=-1,
        )
        self.refresh()

    def __len__(self) -> int:
        return len(self._index.keys() | self._pending.keys())

    def missing(self, keys: Sequence[str]) -> list[int]:
        """Positions in ``keys`` whose outputs are not in a shard yet (the rows the teacher must run on)."""
        return [position for position, key in enumerate(keys) if key not in self._index]

    def lookup(self, keys: Sequence[str], device: torch.device | str) -> Tensor | None:
        """The stored outputs for ``keys``, stacked on ``device``; None unless every key is in a shard."""
        if any(key not in self._index for key in keys):
            return None
        if len(self._outputs) > 1:
            self._outputs = [torch.cat(self._outputs)]
        rows = self._outputs[0][torch.tensor([self._index[key] for key in keys])]
        if torch.device(device).type == "cuda":
            rows = rows.pin_memory()
        return rows.to(device, non_blocking=True)

    def store(self, keys: Sequence[str], outputs: Tensor) -> None:
        """Remember ``outputs`` (B, ...) for ``keys``; writes a shard once enough rows are buffered."""
        if len(keys) != outputs.shape[0]:
            raise ValueError(f"got {len(keys)} keys for {outputs.shape[0]} outputs: pass one key per sample")
        host = outputs.detach().to("cpu", non_blocking=True)
        for row, key in enumerate(keys):
            if key not in self._index:
                self._pending.setdefault(key, host[row])
        if len(self._pending) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the buffered outputs as one shard of this process."""
        if not self._pending:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies in store() must have landed
        keys = list(self._pending)
        path = self.folder / f"shard-r{self.rank:03d}-{self._next_shard:06d}.safetensors"
        outputs = torch.stack([self._pending[key] for key in keys]).contiguous()
        metadata = {"keys": json.dumps(keys), "sha256": _digest(outputs)}
        with writing("the teacher cache", self.folder):
            atomic_write(path, lambda partial: save_file({_TENSOR: outputs}, partial, metadata=metadata))
        self._next_shard += 1
        self._pending.clear()
        self._add_shard(path)

    def refresh(self) -> None:
        """Index the shards every process has written so far (call after all have flushed)."""
        for path in sorted(self.folder.glob("shard-r*.safetensors")):
            if path not in self._shards and path not in self._damaged and _SHARD.fullmatch(path.name):
                self._add_shard(path)

    def _add_shard(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                keys = json.loads(metadata["keys"])
                outputs = handle.get_tensor(_TENSOR)
            recorded = metadata.get("sha256")  # shards written before the digest existed have none
            if recorded is not None and _digest(outputs) != recorded:
                raise ValueError("its outputs do not match the SHA-256 recorded when it was written")
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            self._damaged.add(path)
            print(f"skipping damaged teacher-cache shard {path}: {error}; its rows are computed again",
                  file=sys.stderr)  # fmt: skip
            return
        self._shards.add(path)
        offset = sum(len(part) for part in self._outputs)
        for row, key in enumerate(keys):
            self._index.setdefault(key, offset + row)
        self._outputs.append(outputs)
