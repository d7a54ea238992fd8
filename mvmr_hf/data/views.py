"""The workers' side: :class:`ViewsDataset` turns a process's share of the stream into chunks of
views (or of sources and view parameters, with ``device_views``), resumable at any row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from itertools import islice
from typing import Any

import datasets
import fsspec.asyn
import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.data.augment import (
    AUGMENTATIONS,
    CENTER_CROP_FRACTION,
    DEFAULT_CROP_SCALE,
    ViewAugment,
    ViewParams,
    center_view,
)
from mvmr_hf.data.decode import decode_image, decode_on, jpeg_size
from mvmr_hf.data.loading import BadImageError, Record, image_key, logger, read_encoded
from mvmr_hf.distributed import blake2b_seed


def _to_uint8(images01: torch.Tensor) -> torch.Tensor:
    return images01.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def default_source_size(image_size: int) -> int:
    """The side of the square ``"source"`` image sent for device views: ``image_size / 0.875``.

    The non-augmented view is cut at that resolution too (256 px for 224, see
    :data:`~mvmr_hf.data.augment.CENTER_CROP_FRACTION`); ``benchmarks/bench_dataloading.py`` measures
    how far larger sources bring the views to those cut from the full-resolution image.
    """
    return math.floor(image_size / CENTER_CROP_FRACTION)


CHUNK_ROWS = 8
"""Rows a DataLoader worker sends at once: few enough that a batch mixes every worker's rows,
enough to share the cost of moving tensors between processes (one shared-memory file per view)."""

_VIEWS = ("image", "augmented", "source")
"""The image tensors a sample can have, stacked per chunk."""

_START = {"row": 0, "block": 0, "block_start": None, "consumed": 0}
"""A worker's position before its first row: rows done, and for streams the shuffle block, the
stream position at the block's start and the rows of the block done."""


class ViewsDataset(torch.utils.data.IterableDataset):
    """Decoded, validated MV-MR views of one worker's share of one process's part of a split, in chunks.

    Built by :func:`build_dataloader`; :class:`ViewsLoader` batches the chunks in the training
    process (``docs/data.md`` gives the split between processes and workers, the order and
    resuming). Each worker yields its rows in chunks of up to :data:`CHUNK_ROWS`, aligned on its
    row count so that a resumed worker cuts the same chunks, then an end marker
    ``{"worker": w, "end": True}``. A chunk is ``{"worker": w, "end": False, "decoded": [bool per
    row], "positions": [the worker's position after each row], "keys": [...], "views": {name:
    (k, ...) uint8 tensor}, "view_params": {name: (k, ...) ndarray}}`` for its k decoded rows: an
    undecodable row is kept as ``decoded=False`` so that it is counted exactly once.

    Args:
        dataset: one split, streamed or map-style; only ``image_column`` is read, undecoded.
        image_column: the column holding the images (already resolved).
        image_size: side S of both views.
        batch_size: images per batch in this process; :class:`ViewsLoader` batches the chunks by it.
        rank: this process, in [0, ``world_size``).
        world_size: the number of processes sharing the split.
        shuffle_buffer: streamed rows shuffled together (0: keep the stored order); for a map-style
            split any positive value means a full permutation per epoch.
        seed: seed of the shard order, the shuffles and the augmentations (with the epoch).
        source_size: side of the square image sent for device views; None: the workers make both
            views themselves.
        augmentations: the steps of the augmented view among
            :data:`~mvmr_hf.data.augment.AUGMENTATIONS`, as a list or a comma-separated string
            (default all five, the paper's section 7; a subset is its Table 7 ablation).
        crop_scale: the area range of x̃'s random resized crop, as a fraction of the image.
        decode_on_device: the workers only read each JPEG's header and draw its view's parameters;
            the batch's JPEGs are decoded on the device (:meth:`views_on`). Needs ``source_size``.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset | datasets.Dataset,
        *,
        image_column: str,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        source_size: int | None = None,
        augmentations: str | Sequence[str] = AUGMENTATIONS,
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
        decode_on_device: bool = False,
    ) -> None:
        super().__init__()
        undecoded = dataset.select_columns([image_column])
        undecoded = undecoded.cast_column(image_column, datasets.Image(decode=False))
        self.streaming = isinstance(dataset, datasets.IterableDataset)
        self.source = undecoded
        self.image_column = image_column
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.augment = ViewAugment(image_size, augmentations=augmentations, scale=crop_scale)
        self.source_size = source_size
        self.decode_on_device = decode_on_device
        self.epoch = 0
        self.start: dict | None = None  # the loader's saved state to continue from, read by each worker

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration runs (its shard order, shuffle and augmentations)."""
        self.epoch = epoch

    def _worker_start(self, worker: int) -> dict | None:
        """Where ``worker`` starts: the epoch's start, its saved position, or ``None`` once it was done."""
        if self.start is None:
            return _START
        if worker not in self.start["active"]:
            return None
        return self.start["positions"][worker]

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self._worker_start(worker)
        if start is None:
            return
        rows = self._stream_rows if self.streaming else self._table_rows
        chunk: list[tuple[Record, dict]] = []
        for record, position in rows(start, worker, num_workers):
            chunk.append((record, position))
            if position["row"] % CHUNK_ROWS == 0:
                yield self._chunk(worker, chunk)
                chunk = []
        if chunk:
            yield self._chunk(worker, chunk)
        yield {"worker": worker, "end": True}

    def _chunk(self, worker: int, rows: list[tuple[Record, dict]]) -> dict:
        """Decode ``rows`` and make their views: the chunk :class:`ViewsLoader` batches."""
        decoded, keys, samples = [], [], []
        for record, _ in rows:
            try:
                encoded = read_encoded(record)
                size = jpeg_size(encoded) if self.decode_on_device else None
                image = decode_image(encoded) if size is None else None
            except BadImageError as error:
                decoded.append(False)
                logger.debug("Skipping an image: %s", error)
                continue
            key = image_key(encoded)
            decoded.append(True)
            keys.append(key)
            if image is None:  # a JPEG the device decodes: only its bytes and the view's parameters travel
                samples.append({"raw": encoded, "view_params": self._device_params(*size, key)})
            elif self.decode_on_device:
                samples.append(
                    {"raw": image.numpy(), "view_params": self._device_params(*image.shape[-2:], key)}
                )
            else:
                samples.append(self._views(image, key))
        present = [name for name in _VIEWS if samples and name in samples[0]]
        views = {name: torch.stack([s[name] for s in samples]) for name in present}
        params = {}
        if samples and "view_params" in samples[0]:
            # numpy travels inside the chunk's pickle; each tensor would cost a shared-memory file
            names = samples[0]["view_params"]
            params = {n: torch.cat([s["view_params"][n] for s in samples]).numpy() for n in names}
        positions = [position for _, position in rows]
        raw = [
            sample["raw"] for sample in samples if "raw" in sample
        ]  # pickled inline: no shared-memory file
        return {"worker": worker, "end": False, "decoded": decoded, "positions": positions, "keys": keys,
                "views": views, "view_params": params, "raw": raw}  # fmt: skip

    def _views(self, image: torch.Tensor, key: str) -> dict[str, Any]:
        """The non-augmented view and either the augmented view or what the device needs to make it."""
        images01 = image.unsqueeze(0).float().div_(255.0)
        if self.source_size is not None:
            plain, source = self._plain_and_source(images01)
            return {
                "image": plain[0],
                "source": source[0],
                "view_params": self._device_params(*image.shape[-2:], key),
            }
        plain = center_view(images01, self.image_size, crop_fraction=CENTER_CROP_FRACTION)
        params = self._params(*image.shape[-2:], key)
        # The crop comes from the full-resolution image: a small crop of an image first shrunk to
        # S would be upsampled more, and so blurrier, than torchvision's RandomResizedCrop makes it.
        return {"image": _to_uint8(plain[0]), "augmented": _to_uint8(self.augment.apply(images01, params)[0])}

    def _params(self, height: int, width: int, key: str) -> ViewParams:
        """The augmentation's random parameters for the image ``key`` of ``height`` x ``width`` px this epoch.

        They are drawn on the full-resolution image in every path, from the same generator: the
        device views differ from the worker views only by the resampling.
        """
        generator = torch.Generator().manual_seed(blake2b_seed(self.seed, self.epoch, key))
        return self.augment.sample(1, height, width, generator=generator)

    def _device_params(self, height: int, width: int, key: str) -> dict[str, torch.Tensor]:
        """:meth:`_params` with the crop boxes moved onto the square source the device crops from."""
        params = self._params(height, width, key)
        side = self.source_size
        values = {f.name: getattr(params, f.name) for f in fields(params)}
        values["crop_boxes"] = params.crop_boxes * torch.tensor(
            [side / width, side / height] * 2, dtype=torch.float64
        )
        return values

    def _plain_and_source(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The non-augmented views and the square sources of same-sized ``images01``, rounded to 8 bits."""
        plain = center_view(images01, self.image_size, crop_fraction=CENTER_CROP_FRACTION)
        # Squashed to a square so that images of any shape batch; the crop boxes follow the squash.
        source = TF.resize(images01, [self.source_size, self.source_size], antialias=True)
        return _to_uint8(plain), _to_uint8(source)

    def views_on(
        self, batch: Mapping[str, Any], device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's non-augmented and augmented views x and x̃ on ``device``, as floats in ``[0, 1]``.

        With ``decode_on_device`` the images are decoded on ``device`` first (:func:`decode_on`)
        and cut there as the workers cut them (same functions, batched by image size).
        """
        if "raw" in batch:
            batch = {**batch, **self._decoded_views(batch["raw"], device)}
        images = batch["image"].to(device, non_blocking=True).float().div_(255)
        return images, self.augmented_view(batch, device)

    def _decoded_views(
        self, raw: Sequence[bytes | np.ndarray], device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        images = decode_on(raw, device)
        plain = torch.empty((len(raw), 3, self.image_size, self.image_size), dtype=torch.uint8, device=device)
        source = torch.empty(
            (len(raw), 3, self.source_size, self.source_size), dtype=torch.uint8, device=device
        )
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        for indices in by_size.values():
            same = torch.stack([images[i] for i in indices]).float().div_(255)
            plain[indices], source[indices] = self._plain_and_source(same)
        return {"image": plain, "source": source}

    def augmented_view(self, batch: Mapping[str, Any], device: torch.device | str) -> torch.Tensor:
        """The batch's augmented view x̃ on ``device`` as floats in ``[0, 1]``.

        Made by the workers, it is only moved; with device views it is made here, batched, and
        rounded to 8 bits like the workers' views, so both paths give the same values for the
        same parameters when the source is the image itself.
        """
        if "augmented" in batch:
            return batch["augmented"].to(device, non_blocking=True).float().div_(255)
        source = batch["source"].to(device, non_blocking=True).float().div_(255)
        views = self.augment.apply(source, ViewParams(**batch["view_params"]))
        return views.mul_(255).round_().div_(255)

    def _shard_order(self) -> np.ndarray:
        """The stream's shards in this epoch's order: permuted from ``(seed, epoch)``, or as stored."""
        shards = self.source.num_shards
        if self.shuffle_buffer == 0:
            return np.arange(shards)
        return np.random.default_rng(blake2b_seed(self.seed, self.epoch)).permutation(shards)

    def _stream_tasks(self, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        """``(shard, step, offset)`` for each shard ``worker`` reads, keeping every step-th row from offset.

        Whole shards are dealt to the workers in turn; with more workers than shards, the workers
        beyond share a shard by rows (each reads it all and keeps its own rows).
        """
        order = self._shard_order()
        if num_workers <= len(order):
            return [(int(order[i]), 1, 0) for i in range(worker, len(order), num_workers)]
        first = worker % len(order)
        return [(int(order[first]), len(range(first, num_workers, len(order))), worker // len(order))]

    def _stream_rows(self, start: dict, worker: int, num_workers: int) -> Iterator[tuple[Record, dict]]:
        """This worker's rows in blocks of ``shuffle_buffer``, each block permuted, resumable per block."""
        reader = _StreamReader(self, self._stream_tasks(worker, num_workers), worker, start["block_start"])
        rows = reader.rows()
        block, block_start, consumed = start["block"], start["block_start"], start["consumed"]
        row = start["row"]
        while chunk := list(islice(rows, max(1, self.shuffle_buffer))):
            rng = np.random.default_rng(blake2b_seed(self.seed, self.epoch, self.rank, worker, block))
            order = rng.permutation(len(chunk))
            for position in range(consumed, len(chunk)):
                row += 1
                yield chunk[order[position]], {"row": row, "block": block, "block_start": block_start,
                                               "consumed": position + 1}  # fmt: skip
            block, block_start, consumed = block + 1, reader.cursor(), 0

    def _table_rows(self, start: dict, worker: int, num_workers: int) -> Iterator[tuple[Record, dict]]:
        """This worker's rows of a map-style split: the epoch's permutation dealt to the processes in
        turn, then to the workers in chunks of :data:`CHUNK_ROWS` in turn, so that taking one chunk
        per worker in turn gives the process's rows in order, whatever the number of workers."""
        table = self.source
        usable = len(table) - len(table) % self.world_size
        if self.shuffle_buffer > 0:
            order = np.random.default_rng(blake2b_seed(self.seed, self.epoch)).permutation(len(table))[
                :usable
            ]
        else:
            order = np.arange(usable)
        mine = order[self.rank :: self.world_size]
        row = start["row"]
        while (index := _dealt(row, worker, num_workers)) < len(mine):
            row += 1
            yield table[int(mine[index])][self.image_column], {**_START, "row": row}


def _dealt(row: int, worker: int, num_workers: int) -> int:
    """Where ``worker``'s ``row``-th row is among the process's rows: chunks are dealt to workers in turn."""
    return (row // CHUNK_ROWS * num_workers + worker) * CHUNK_ROWS + row % CHUNK_ROWS


class _StreamReader:
    """One worker's rows of one process's part of a stream, from a cursor that :meth:`cursor` gives.

    Within each shard the worker keeps every step-th row (:meth:`ViewsDataset._stream_tasks`);
    the rows it keeps, counted over its shards, are dealt to the processes in turn, starting at
    process ``worker % world_size`` so that the workers' leftovers fall on different processes.
    Every process reads the same shards and decodes only its own rows.
    """

    def __init__(
        self, views: ViewsDataset, tasks: list[tuple[int, int, int]], worker: int, cursor: dict | None
    ) -> None:
        self.views, self.tasks, self.worker = views, tasks, worker
        cursor = cursor or {"task": 0, "shard_state": None, "shard_row": 0, "kept": 0}
        self.task, self.shard_row, self.kept = cursor["task"], cursor["shard_row"], cursor["kept"]
        self.shard_state = cursor["shard_state"]
        self.stream: datasets.IterableDataset | None = None

    def cursor(self) -> dict:
        """The position after the last row yielded (``datasets`` gives the shard's own, JSON-serialisable)."""
        state = self.stream.state_dict() if self.stream is not None else self.shard_state
        return {"task": self.task, "shard_state": state, "shard_row": self.shard_row, "kept": self.kept}

    def rows(self) -> Iterator[Record]:
        """The undecoded images of this worker's rows for this process, from the cursor on."""
        views = self.views
        if torch.utils.data.get_worker_info() is not None:
            fsspec.asyn.reset_lock()  # as datasets does in a worker: a lock forked from the parent hangs
        while self.task < len(self.tasks):
            shard, step, offset = self.tasks[self.task]
            self.stream = views.source.shard(num_shards=views.source.num_shards, index=shard)
            if self.shard_state is not None:
                self.stream.load_state_dict(self.shard_state)
            # iter(), unlike iterating the stream, does not split it again among the DataLoader workers
            for example in self.stream.iter(batch_size=1):
                self.shard_row += 1
                if (self.shard_row - 1) % step != offset:
                    continue
                self.kept += 1
                if (self.kept - 1 + self.worker) % views.world_size == views.rank:
                    yield example[views.image_column][0]
            self.task, self.shard_row, self.shard_state, self.stream = self.task + 1, 0, None, None


def _as_sent(chunk: dict) -> dict:
    """The DataLoader's collate function: a chunk travels as the worker made it (its arrays stay numpy)."""
    return chunk
