"""The training process's side: :class:`ViewsLoader` makes whole batches from the workers' chunks (so
an epoch drops only its last incomplete batch) and saves its position; :func:`build_dataloader`
builds it from a data set.
"""

from __future__ import annotations

import functools
import math
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch

from mvmr_hf.data.augment import (
    AUGMENTATIONS,
    DEFAULT_CROP_SCALE,
)
from mvmr_hf.data.loading import (
    MIN_IMAGE_SIDE,
    DataStats,
    _num_examples,
    resolve_image_column,
)
from mvmr_hf.data.views import _START, CHUNK_ROWS, ViewsDataset, _as_sent, default_source_size
from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import check_int, usable_cpus


class ViewsLoader:
    """Full batches of MV-MR views for one process, made in the training process from the workers' chunks.

    The chunks are taken one per worker in turn (a worker leaves the turn at its end marker),
    whatever order they arrive in; a batch is released once the next one is full or the epoch's
    data ran out, so that the last batch also counts the images skipped after it. Only the rows
    after the last full batch are dropped: fewer than ``batch_size`` images per epoch.

    ``dataset`` is the :class:`ViewsDataset` (``set_epoch``, ``augmented_view``);
    :meth:`state_dict` holds the epoch, each worker's position after its last row in a released
    batch and whose turn is next: :meth:`load_state_dict` continues there.
    """

    def __init__(
        self,
        dataset: ViewsDataset,
        *,
        num_workers: int,
        pin_memory: bool,
        worker_init_fn: Callable[[int], None] | None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Room for about two batches of chunks ahead, as when each worker made whole batches.
        ahead = max(2, math.ceil(2 * dataset.batch_size / CHUNK_ROWS / num_workers)) if num_workers else None
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_as_sent,
            worker_init_fn=worker_init_fn,
            prefetch_factor=ahead,
        )
        self._state: dict | None = None  # after the last batch released; None: the epoch's start
        self._resume: dict | None = None

    def state_dict(self) -> dict:
        """The epoch and the position after the last batch yielded (JSON-serialisable)."""
        return self._state if self._state is not None else self._start_state()

    def load_state_dict(self, state: dict) -> None:
        """Continue ``state``'s epoch after its last batch on the next iteration, whatever the epoch set.

        A map-style split can continue with another number of workers (its order does not depend
        on them); a stream cannot (the workers share its shards).
        """
        _check_state(state)
        workers = max(self.num_workers, 1)
        if state["num_workers"] != workers:
            if self.dataset.streaming:
                raise ConfigError(
                    f"The checkpoint's position in the stream is for {state['num_workers']} DataLoader "
                    f"worker(s) per process, which share its shards: resume with --num-workers "
                    f"{state['num_workers']} (0 and 1 are the same here)."
                )
            state = _redealt(state, workers)
        self._state = self._resume = state

    def _start_state(self) -> dict:
        workers = max(self.num_workers, 1)
        return {"epoch": self.dataset.epoch, "num_workers": workers, "active": list(range(workers)),
                "turn": 0, "positions": [_START] * workers}  # fmt: skip

    def __iter__(self) -> Iterator[dict]:
        resume, self._resume = self._resume, None
        if resume is not None:
            self.dataset.set_epoch(resume["epoch"])
        state = self._state = resume or self._start_state()
        self.dataset.start = state  # read by every worker, which the iterator below starts
        arrivals = iter(self.loader)
        active, positions = list(state["active"]), list(state["positions"])
        turn = active.index(state["turn"]) if active else 0
        waiting: dict[int, deque] = {worker: deque() for worker in range(state["num_workers"])}
        parts: list[tuple[dict, int, int]] = []  # (chunk, first, end) decoded rows of the batch being filled
        filled = skipped = 0
        held: tuple[dict, dict] | None = None  # the last full batch and its state, not yet yielded
        while active:
            worker = active[turn]
            chunk = _next_chunk(arrivals, waiting, worker)
            if chunk["end"]:
                del active[turn]
                turn = turn % len(active) if active else 0
                continue
            first = decoded = 0
            for row, is_decoded in enumerate(chunk["decoded"]):
                positions[worker] = chunk["positions"][row]
                if not is_decoded:
                    skipped += 1
                    continue
                decoded += 1
                filled += 1
                if filled < self.dataset.batch_size:
                    continue
                parts.append((chunk, first, decoded))
                rest = row + 1 < len(chunk["decoded"])  # the next batch goes on with this chunk
                after = {"epoch": state["epoch"], "num_workers": state["num_workers"], "active": list(active),
                         "turn": worker if rest else active[(turn + 1) % len(active)],
                         "positions": list(positions)}  # fmt: skip
                if held is not None:
                    self._state = held[1]
                    yield held[0]
                held = (self._collate(parts, skipped), after)
                parts, first, filled, skipped = [], decoded, 0, 0
            if decoded > first:
                parts.append((chunk, first, decoded))
            turn = (turn + 1) % len(active)
        if held is not None:
            held[0]["skipped"] += skipped  # the images skipped after the last full batch
            self._state = held[1]
            yield held[0]

    def _collate(self, parts: list[tuple[dict, int, int]], skipped: int) -> dict:
        """A batch of the decoded rows ``first:end`` of each chunk, copied once (to pinned memory if set)."""
        batch: dict[str, Any] = {}
        for name, view in parts[0][0]["views"].items():
            shape = (self.dataset.batch_size, *view.shape[1:])
            out = torch.empty(shape, dtype=view.dtype, pin_memory=self.pin_memory)
            batch[name] = torch.cat([chunk["views"][name][first:end] for chunk, first, end in parts], out=out)
        if params := parts[0][0]["view_params"]:
            batch["view_params"] = {
                name: torch.from_numpy(np.concatenate([c["view_params"][name][a:b] for c, a, b in parts]))
                for name in params
            }
        if parts[0][0]["raw"]:
            batch["raw"] = [item for chunk, first, end in parts for item in chunk["raw"][first:end]]
        batch["key"] = [key for chunk, first, end in parts for key in chunk["keys"][first:end]]
        batch["skipped"] = skipped
        return batch


def _next_chunk(arrivals: Iterator[dict], waiting: dict[int, deque], worker: int) -> dict:
    """``worker``'s next chunk; the chunks of other workers that arrive first wait for their turn."""
    while not waiting[worker]:
        chunk = next(arrivals)
        waiting[chunk["worker"]].append(chunk)
    return waiting[worker].popleft()


_STATE_KEYS = frozenset({"epoch", "num_workers", "active", "turn", "positions"})


def _check_state(state: Mapping[str, Any]) -> None:
    """Refuse, in one line, a saved loader state of another format."""
    if not isinstance(state, Mapping) or not set(state) >= _STATE_KEYS:
        raise ConfigError(
            "The checkpoint's data position was saved by an older mvmr_hf (per-worker batches): "
            "start a new run, or resume with the version that wrote it."
        )


def _redealt(state: Mapping[str, Any], num_workers: int) -> dict:
    """A map-style split's saved position for ``num_workers`` workers.

    The rows taken so far are the first ``done`` of the process's rows, whatever the workers
    (:meth:`ViewsDataset._table_rows`): each new worker has done those it is dealt among them,
    and the turn is that of the worker dealt the next row.
    """
    done = sum(position["row"] for position in state["positions"])
    chunks, rest = divmod(done, CHUNK_ROWS)
    rows = [CHUNK_ROWS * len(range(worker, chunks, num_workers)) for worker in range(num_workers)]
    rows[chunks % num_workers] += rest  # the worker in the middle of its chunk
    positions = [{**_START, "row": row} for row in rows]
    return {"epoch": state["epoch"], "num_workers": num_workers, "active": list(range(num_workers)),
            "turn": chunks % num_workers, "positions": positions}  # fmt: skip


def _ignore_signals(signals: tuple[int, ...], worker: int) -> None:
    for number in signals:
        signal.signal(number, signal.SIG_IGN)


def default_num_workers() -> int:
    """DataLoader workers for one training process: the CPU cores this process may use, shared
    evenly among the processes of this machine (``LOCAL_WORLD_SIZE``, which ``accelerate launch``
    and ``torchrun`` set), at least 1.

    Every core a worker: on the 16-core H200 node 16 workers fed the loop 1.8 times as fast as
    12 (``benchmarks/results/loop-cuda*.json``), and more workers than cores only oversubscribe
    them (PyTorch warns).
    """
    return max(1, usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def check_enough_images(num_examples: int, batch_size: int, world_size: int) -> None:
    """Refuse a split that cannot give every process one full batch of ``batch_size`` images an epoch.

    :func:`build_dataloader` calls it; callers that know the count earlier (``load_image_dataset``'s
    ``check_rows``, before a non-streamed split is converted) call it then.
    """
    if num_examples // world_size < batch_size:
        raise ConfigError(
            f"The split has {num_examples} images, fewer than {batch_size} per process for "
            f"{world_size} process(es): lower the batch size or use more data."
        )


def build_dataloader(
    dataset: datasets.IterableDataset | datasets.Dataset,
    *,
    image_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    num_workers: int = 0,
    image_column: str | None = None,
    pin_memory: bool = False,
    device_views: bool = False,
    source_size: int | None = None,
    augmentations: str | Sequence[str] = AUGMENTATIONS,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    decode_on_device: bool = False,
    ignore_signals: Sequence[int] = (),
) -> tuple[ViewsLoader, DataStats]:
    """A resumable loader of MV-MR batches for process ``rank`` of ``world_size``.

    Batches are ``{"image": (B,3,S,S) uint8, "augmented": (B,3,S,S) uint8, "key": list[str],
    "skipped": int}`` with ``B = batch_size`` always: the workers decode, the training process
    batches (:class:`ViewsLoader`), so an epoch drops only the incomplete batch at its end
    (distance correlation needs full, equal batches on every process). The processes get as
    many rows as can be dealt evenly (``docs/data.md``); bad images, and for streams the
    workers' leftovers, can still leave one process a batch short, so the training loop must
    stop an epoch when any process runs out.

    Args:
        dataset: one split, from :func:`load_image_dataset` (streamed or map-style).
        image_size: side S of both views.
        batch_size: images per batch in this process.
        rank: this process, in [0, ``world_size``).
        world_size: the number of processes.
        shuffle_buffer: streamed rows shuffled together (0: keep the stored order); for a
            map-style split any positive value means a full permutation per epoch.
        seed: seed of the shard order, the shuffles and the augmentations.
        num_workers: DataLoader worker processes, each single-threaded (0 decodes and augments in
            the training process, one image at a time). A stream gives each worker whole shards,
            or with more workers than shards every n-th row of one shard.
        image_column: the image column, or ``None`` to detect it (:func:`resolve_image_column`).
        pin_memory: pin batches in page-locked memory for faster copies to the GPU.
        device_views: workers only decode and resize; the augmented view is made on the device by
            ``loader.dataset.augmented_view(batch, device)`` (which also moves worker-made views).
        source_size: side of the square image sent for device views (default
            :func:`default_source_size`).
        augmentations: the steps of the augmented view among
            :data:`~mvmr_hf.data.augment.AUGMENTATIONS` (default all five, the paper's section 7; a
            subset is its Table 7 ablation, none gives x's framing), as a list or a comma-separated
            string (:func:`~mvmr_hf.data.augment.parse_augmentations`). The random parameters are those
            of the full augmentation, switched-off steps neutralised, in both the workers' and the
            device views.
        crop_scale: the area range of x̃'s random resized crop, as a fraction of the image
            (default the paper's 0.08-1).
        decode_on_device: the workers only read each JPEG's header and draw its view's parameters;
            ``loader.dataset.views_on(batch, device)`` decodes the batch's JPEGs on the device
            (nvJPEG on CUDA) and makes both views there (:func:`jpeg_size` says which images PIL
            still decodes in the workers). Needs ``device_views``.
        ignore_signals: signals the worker processes ignore: the training process handles them
            (a cluster's stop signal reaches every process of the job, workers included, which
            would otherwise die before the run can save its checkpoint).

    Call ``loader.dataset.set_epoch(epoch)`` before each epoch; save ``loader.state_dict()`` with
    checkpoints and restore it with ``loader.load_state_dict(state)`` (``docs/data.md``).
    """
    if not isinstance(dataset, datasets.Dataset | datasets.IterableDataset):
        raise ConfigError(
            f"Expected one split of a dataset (datasets.Dataset or IterableDataset), got "
            f"{type(dataset).__name__}: select a split, e.g. dataset['train']."
        )
    check_int("image_size", image_size, MIN_IMAGE_SIDE)
    check_int("batch_size", batch_size, 1)
    check_int("world_size", world_size, 1)
    check_int("num_workers", num_workers, 0)
    check_int("shuffle_buffer", shuffle_buffer, 0)
    if source_size is not None:
        check_int("source_size", source_size, MIN_IMAGE_SIDE)
    if decode_on_device and not device_views:
        raise ConfigError("decode_on_device makes the views on the device: pass device_views=True too.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
    column = resolve_image_column(dataset.features, image_column)
    stats = DataStats(
        image_column=column,
        streaming=isinstance(dataset, datasets.IterableDataset),
        num_examples=_num_examples(dataset),
    )
    if stats.num_examples is not None:
        check_enough_images(stats.num_examples, batch_size, world_size)
    views = ViewsDataset(
        dataset,
        image_column=column,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        source_size=(source_size or default_source_size(image_size)) if device_views else None,
        augmentations=augmentations,
        crop_scale=crop_scale,
        decode_on_device=decode_on_device,
    )
    loader = ViewsLoader(
        views,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(_ignore_signals, tuple(ignore_signals)) if ignore_signals else None,
    )
    return loader, stats
