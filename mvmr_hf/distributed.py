"""The processes of a launch: which there are, what they agree on, and seeds each derives alike.

Two ways to agree on a flag: :func:`reduce_flag` all-reduces a CPU tensor over gloo, so the
training loop never waits for its accelerator's queue; :func:`holds_on_every_process` gathers on the
launch's device, which feature extraction has in hand. Two seeds: :func:`blake2b_seed` (the
training data's shuffles and views) and :func:`sha256_seed` (fine-tuning's batches and per-image
augmentation) hash differently; each is kept, since another hash would change the draws, and so
the data order of a resumed run.
"""

from __future__ import annotations

import functools
import hashlib

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import gather, parse_flag_from_env


def reduce_flag(flag: bool, op: dist.ReduceOp) -> bool:
    """``flag`` combined over all processes (MIN: all of them, MAX: any of them)."""
    return bool(reduce_int(int(flag), op))


def reduce_int(number: int, op: dist.ReduceOp) -> int:
    """``number`` combined over all processes with ``op``.

    A tiny all-reduce of a CPU tensor (over gloo), so it never waits for the accelerator.
    """
    value = torch.tensor([number], dtype=torch.int32)
    dist.all_reduce(value, op=op, group=None if dist.get_backend() == "gloo" else _cpu_group())
    return int(value.item())


@functools.cache
def _cpu_group() -> dist.ProcessGroup:
    # created once, on first use: new_group is a collective call that every process makes
    return dist.new_group(backend="gloo")


def launch_state() -> PartialState:
    """The processes of the current launch (Accelerate's ``PartialState``); one process without a launcher.

    ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``) is honoured as ``Accelerator`` honours
    it: CPU processes talking over gloo.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def holds_on_every_process(flag: bool, state: PartialState) -> bool:
    """Whether ``flag`` holds on every process of the launch (they then take the same branch)."""
    if not state.use_distributed:
        return flag
    return bool(gather(torch.tensor([flag], device=state.device)).all())


def blake2b_seed(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sha256_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (seed, epoch, row): independent streams per image and epoch."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
