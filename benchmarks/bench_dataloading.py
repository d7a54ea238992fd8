"""Images per second of decoding + the two views, per DataLoader worker, from a local parquet stream.

A local parquet data set of ImageNet-like JPEG photographs (about 500 x 375 px, written once
to a temporary folder by ``common.write_photo_parquet``) is streamed through the package's
own pipeline, ``mvmr_hf.data.load_image_dataset`` + ``build_dataloader``: undecoded rows,
PIL decoding, the non-augmented view and the paper's augmented view, uint8 batches. For
each image size and worker count the loader runs one epoch; the rate counts the images after
the first batch (worker start-up is reported apart). ``0`` workers means in the main
process with one torch thread, as each DataLoader worker runs. The per-image split between
decoding (``decode_image``) and making the two views is measured in-process on one thread.

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
from mvmr_hf.data import build_dataloader, decode_image, load_image_dataset, read_encoded

SIZES = (64, 224)
QUICK_SIZES = (224,)
IMAGES = 1024
QUICK_IMAGES = 128
BATCH = 32
PROJECTED_WORKERS = 16  # the GPU configuration of bench_step has 16 CPU cores
SPLIT_IMAGES = 16


def _epoch(folder: Path, size: int, workers: int) -> dict[str, Any]:
    loader, _ = build_dataloader(
        load_image_dataset(str(folder)), image_size=size, batch_size=BATCH, num_workers=workers
    )
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
        "workers": workers,
        "startup_s": first - start,
        "images_per_s": rate,
        "images_per_s_per_worker": rate / max(workers, 1),
    }


def _split(folder: Path, size: int, budget_s: float) -> dict[str, float]:
    """Milliseconds per image of decoding and of the two views, in-process on one thread."""
    loader, _ = build_dataloader(load_image_dataset(str(folder)), image_size=size, batch_size=BATCH)
    views = loader.dataset
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


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)  # data loading runs on the CPU; --device names the table only
    count = QUICK_IMAGES if args.quick else IMAGES
    cpus = torch.get_num_threads()
    worker_counts = sorted({0, 1, cpus}) if not args.quick else sorted({0, cpus})
    rows: list[dict[str, Any]] = []
    notes = []
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_photo_parquet(Path(tmp), count)
            for size in QUICK_SIZES if args.quick else SIZES:
                split = _split(folder, size, 2.0 if args.quick else 5.0)
                for workers in worker_counts:
                    rows.append({**_epoch(folder, size, workers), **split})
                    print(f"measured {size} px, {workers} workers", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(previous_threads)
    for size in QUICK_SIZES if args.quick else SIZES:
        best = max(row["images_per_s_per_worker"] for row in rows if row["size"] == size and row["workers"])
        notes.append(
            f"{size} px: {best:.0f} images/s per worker; {PROJECTED_WORKERS} workers would give about "
            f"{best * PROJECTED_WORKERS:.0f} images/s if the rate scales linearly (bench_step on the GPU "
            "measures the actual data wait)"
        )
    notes += [
        f"{count} JPEG images of about 500 x 375 px in 8 parquet shards, batch {BATCH}, streaming, shuffle "
        "buffer 1000; rates exclude the first batch",
        "decode / views: ms per image on one thread, in-process, best of repeated passes over "
        f"{SPLIT_IMAGES} images",
    ]
    columns = [
        ("size", "px", "d"),
        ("workers", "workers", "d"),
        ("images_per_s", "images/s", ".1f"),
        ("images_per_s_per_worker", "images/s per worker", ".1f"),
        ("startup_s", "start-up s", ".2f"),
        ("decode_ms", "decode ms / image", ".2f"),
        ("views_ms", "two views ms / image", ".2f"),
    ]
    config = {"images": count, "batch": BATCH, "sizes": list(QUICK_SIZES if args.quick else SIZES),
              "workers": worker_counts}  # fmt: skip
    report("dataloading", args, device, rows, columns, config=config, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
