"""Images per second of the data pipeline per DataLoader worker, views made by the workers or on the device.

A local parquet data set of ImageNet-like JPEG photographs (about 500 x 375 px, written once
to a temporary folder by ``common.write_photo_parquet``) is streamed through the package's
own pipeline, ``mvmr_hf.data.load_image_dataset`` + ``build_dataloader``: undecoded rows,
PIL decoding, the non-augmented view, uint8 batches, and either

- ``workers``: the paper's augmented view made in the workers, one image at a time, or
- ``device`` (``--device-views``): the workers only decode and resize (the plain view and the
  square source); the augmented view is made batched on ``--device`` by
  ``loader.dataset.augmented_view``, timed apart (``device views images/s``).

For each mode, image size and worker count the loader runs one epoch; the rate counts the
images after the first batch (worker start-up is reported apart). ``0`` workers means in the
main process with one torch thread, as each DataLoader worker runs. The per-image worker cost
is split into decoding (``decode_image``) and the rest, in-process on one thread. The notes
give how far the device views are from the workers' (mean gray levels over the same images
and parameters) for sources of several sizes.

    python benchmarks/bench_dataloading.py --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import parser, report, resolve_device, time_call, write_photo_parquet

from mvmr_hf.cli import run_cli
from mvmr_hf.data.decode import decode_image
from mvmr_hf.data.loader import build_dataloader
from mvmr_hf.data.loading import load_image_dataset, read_encoded
from mvmr_hf.data.views import default_source_size

SIZES = (64, 224)
QUICK_SIZES = (224,)
IMAGES = 1024
QUICK_IMAGES = 128
BATCH = 32
PROJECTED_WORKERS = 16  # the GPU configuration of bench_step has 16 CPU cores
SPLIT_IMAGES = 16
MODES = ("workers", "device")
DEVICE_BATCH = 256  # one batch of device views, as a GPU step makes them


def _loader(folder: Path, size: int, *, mode: str, workers: int = 0, batch: int = BATCH, **options: Any):
    loader, _ = build_dataloader(
        load_image_dataset(str(folder)),
        image_size=size,
        batch_size=batch,
        num_workers=workers,
        device_views=mode == "device",
        **options,
    )
    return loader


def _epoch(folder: Path, size: int, mode: str, workers: int) -> dict[str, Any]:
    loader = _loader(folder, size, mode=mode, workers=workers)
    loader.dataset.set_epoch(0)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    images = sum(len(batch["key"]) for batch in batches)
    elapsed = time.perf_counter() - first
    rate = images / elapsed
    return {
        "size": size,
        "views": mode,
        "workers": workers,
        "startup_s": first - start,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(workers, 1),
    }


def _split(folder: Path, size: int, mode: str, budget_s: float) -> dict[str, float]:
    """Milliseconds per image of decoding and of the rest of a worker's work, in-process on one thread."""
    views = _loader(folder, size, mode=mode).dataset
    records = [row[views.image_column] for row, _ in zip(views.source, range(SPLIT_IMAGES), strict=False)]
    encoded = [read_encoded(record) for record in records]
    decoded = [decode_image(data) for data in encoded]
    cpu = torch.device("cpu")
    decode = time_call(lambda: [decode_image(data) for data in encoded], cpu, budget_s=budget_s).best
    # The dataset's own per-sample view code (private: there is no public one-sample entry point).
    make_views = time_call(
        lambda: [views._views(image, str(index)) for index, image in enumerate(decoded)],
        cpu,
        budget_s=budget_s,
    ).best
    return {"decode_ms": decode / len(encoded) * 1e3, "views_ms": make_views / len(encoded) * 1e3}


def _device_rate(folder: Path, size: int, device: torch.device, batch: int, budget_s: float) -> float:
    """Images per second of ``augmented_view`` on one batch of device views already on ``device``."""
    loader = _loader(folder, size, mode="device", batch=batch)
    sources = next(iter(loader))
    on_device = {**sources, "source": sources["source"].to(device)}
    timing = time_call(lambda: loader.dataset.augmented_view(on_device, device), device, budget_s=budget_s)
    return batch / timing.best


def _fidelity(folder: Path, size: int, images: int) -> list[str]:
    """Mean gray levels between device and worker views of the same images, for several source sizes."""
    reference = _loader(folder, size, mode="workers", batch=images)
    expected = next(iter(reference))
    worker_views = reference.dataset.augmented_view(expected, "cpu")
    notes = []
    for source in (size, default_source_size(size), round(1.5 * size), 2 * size):
        loader = _loader(folder, size, mode="device", batch=images, source_size=source)
        made = loader.dataset.augmented_view(next(iter(loader)), "cpu")
        gray_levels = float((made - worker_views).abs().mean() * 255)
        default = " (default)" if source == default_source_size(size) else ""
        notes.append(f"{source} px{default}: {gray_levels:.2f}")
    return notes


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)  # decoding runs on the CPU; --device makes the device views
    count = QUICK_IMAGES if args.quick else IMAGES
    cpus = torch.get_num_threads()
    worker_counts = sorted({0, 1, cpus}) if not args.quick else sorted({0, cpus})
    sizes = QUICK_SIZES if args.quick else SIZES
    budget = 2.0 if args.quick else 5.0
    rows: list[dict[str, Any]] = []
    notes = []
    fidelity = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_photo_parquet(Path(tmp), count)
        for size in sizes:
            # All threads, as in the training process.
            device_rate = _device_rate(folder, size, device, min(DEVICE_BATCH, count), budget)
            previous_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for mode in MODES:
                    split = _split(folder, size, mode, budget)
                    for workers in worker_counts:
                        row = {**_epoch(folder, size, mode, workers), **split}
                        row["device_views_per_s"] = device_rate if mode == "device" else None
                        rows.append(row)
                        print(
                            f"measured {size} px, {mode} views, {workers} workers",
                            file=sys.stderr,
                            flush=True,
                        )
                fidelity[size] = _fidelity(folder, size, 32 if args.quick else 128)
            finally:
                torch.set_num_threads(previous_threads)
    for size in sizes:
        for mode in MODES:
            best = max(
                row["images_per_s_per_worker"]
                for row in rows
                if row["size"] == size and row["views"] == mode and row["workers"]
            )
            notes.append(
                f"{size} px, {mode} views: {best:.0f} images/s per worker; {PROJECTED_WORKERS} workers would "
                f"give about {best * PROJECTED_WORKERS:.0f} images/s if the rate scales linearly (bench_step "
                "on the GPU measures the actual data wait)"
            )
        notes.append(
            f"{size} px, device views against worker views of the same images and parameters, mean gray "
            f"levels (of 255) by source side: {'; '.join(fidelity[size])}"
        )
    notes += [
        f"{count} JPEG images of about 500 x 375 px in 8 parquet shards, batch {BATCH}, streaming, shuffle "
        "buffer 1000; rates exclude the first batch",
        "decode / rest: ms per image on one thread, in-process, best of repeated passes over "
        f"{SPLIT_IMAGES} images; rest = the two views (workers) or the plain view and the source (device)",
        f"device views images/s: augmented_view on one batch of {min(DEVICE_BATCH, count)} sources already "
        f"on {device.type}, {torch.get_num_threads()} threads on CPU",
    ]
    columns = [
        ("size", "px", "d"),
        ("views", "views", ""),
        ("workers", "workers", "d"),
        ("images_per_s", "images/s", ".1f"),
        ("images_per_s_per_worker", "images/s per worker", ".1f"),
        ("startup_s", "start-up s", ".2f"),
        ("decode_ms", "decode ms / image", ".2f"),
        ("views_ms", "rest ms / image", ".2f"),
        ("device_views_per_s", "device views images/s", ".0f"),
    ]
    config = {"images": count, "batch": BATCH, "sizes": list(sizes), "workers": worker_counts,
              "device_batch": min(DEVICE_BATCH, count)}  # fmt: skip
    report("dataloading", args, device, rows, columns, config=config, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
