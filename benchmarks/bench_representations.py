"""Images per second of each hand-crafted representation, against scikit-image's HOG and kymatio's call.

Each built-in representation (``mvmr_hf.models.representations.build(name)`` with the paper's
defaults) runs on a batch of 64 real photographs (scikit-image's samples, random crops) at
96 and 224 px: on CPU with one torch thread and with all of them, or on the GPU. The
references are timed on the same images:

- ``skimage.feature.hog`` called per image on the RGB image, with the same orientations
  and cells and the smallest block (1x1 cells, L1): it computes the gradients of all three
  channels but keeps one histogram per cell (the strongest channel's); our HOG keeps all
  three. Also per colour channel (three calls per image), which is the same output as ours.
  scikit-image is single-threaded NumPy/Cython on the CPU, whatever ``--device``;
- kymatio's own ``Scattering2D`` torch call (J=2, L=8) on the same batch and device.

Targets (issue 5): HOG at least as fast per image as scikit-image's on one CPU thread; at
least 50x on a GPU.

    python benchmarks/bench_representations.py --quick      # 96 px only
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from common import parser, photo_batch, report, resolve_device, time_call
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from skimage.feature import hog as skimage_hog

from mvmr_hf.cli import run_cli
from mvmr_hf.models import representations

BATCH = 64
SIZES = (96, 224)
QUICK_SIZES = (96,)
HOG_CPU_TARGET = 1.0  # x scikit-image per image, one thread
HOG_GPU_TARGET = 50.0
SKIMAGE_IMAGES = 16  # scikit-image is timed on this many images per call, reported per image


@contextmanager
def _threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _row(name: str, size: int, threads: int | str, seconds: float, images: int) -> dict[str, Any]:
    return {
        "representation": name,
        "size": size,
        "threads": threads,
        "ms_per_image": seconds / images * 1e3,
        "images_per_s": images / seconds,
    }


def _skimage_rows(images: torch.Tensor, budget_s: float) -> list[dict[str, Any]]:
    hog_options = {
        "orientations": 24,
        "pixels_per_cell": (8, 8),
        "cells_per_block": (1, 1),
        "block_norm": "L1",
    }
    arrays = [np.ascontiguousarray(image.permute(1, 2, 0).numpy()) for image in images[:SKIMAGE_IMAGES]]

    def rgb() -> None:
        for array in arrays:
            skimage_hog(array, channel_axis=-1, **hog_options)

    def per_channel() -> None:
        for array in arrays:
            for channel in range(3):
                skimage_hog(array[..., channel], **hog_options)

    size = images.shape[-1]
    cpu = torch.device("cpu")
    return [
        _row("skimage hog (RGB)", size, 1, time_call(rgb, cpu, budget_s=budget_s).best, len(arrays)),
        _row(
            "skimage hog x3 channels",
            size,
            1,
            time_call(per_channel, cpu, budget_s=budget_s).best,
            len(arrays),
        ),
    ]


def _measure(rows: list[dict[str, Any]], images: torch.Tensor, threads: int | str, budget_s: float) -> None:
    size = images.shape[-1]
    modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        name: representations.build(name).to(images.device) for name in representations.available()
    }
    modules["kymatio Scattering2D"] = ScatteringTorch2D(J=2, shape=(size, size), L=8).to(images.device)
    for name, module in modules.items():
        with torch.no_grad():
            # One untimed call first: ScatNet builds its filters for the input's size and device on its
            # first call (seconds), which would otherwise be the single sample when it exceeds budget_s.
            module(images)
            timing = time_call(lambda module=module: module(images), images.device, budget_s=budget_s)
        rows.append(_row(name, size, threads, timing.best, len(images)))


def _hog_speedups(rows: list[dict[str, Any]], device: torch.device) -> list[str]:
    notes = []
    reference = {row["size"]: row for row in rows if row["representation"] == "skimage hog (RGB)"}
    for row in rows:
        if row["representation"] != "hog" or row["size"] not in reference:
            continue
        speedup = reference[row["size"]]["ms_per_image"] / row["ms_per_image"]
        row["vs_skimage_hog"] = speedup
        if device.type == "cuda":
            target, label = HOG_GPU_TARGET, "GPU"
        elif row["threads"] == 1:
            target, label = HOG_CPU_TARGET, "one CPU thread"
        else:
            continue
        verdict = "met" if speedup >= target else "MISSED"
        notes.append(
            f"HOG at {row['size']} px on {label}: {speedup:.2f}x scikit-image per image "
            f"(target >= {target:g}x): {verdict}"
        )
    return notes


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)
    budget_s = 0.5 if args.quick else 3.0
    all_threads = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    for size in QUICK_SIZES if args.quick else SIZES:
        cpu_images = photo_batch(BATCH, size)
        with _threads(1):
            rows += _skimage_rows(cpu_images, budget_s)
        images = cpu_images.to(device)
        if device.type == "cuda":
            _measure(rows, images, "gpu", budget_s)
        else:
            for threads in [1] if args.quick else sorted({1, all_threads}):
                with _threads(threads):
                    _measure(rows, images, threads, budget_s)
        print(f"measured {size} px", file=sys.stderr, flush=True)
    notes = _hog_speedups(rows, device)
    notes += [
        f"batch {BATCH}; times are the best of the calls repeated within a time budget after a warm-up; "
        f"scikit-image runs on {SKIMAGE_IMAGES} of the images, one at a time, on one CPU thread",
        "representations built with mvmr_hf.models.representations.build(name) defaults: "
        "HOG 24 bins, 8 px cells, 3 colour channels; ScatNet J=2, L=8, orders 0-2; LSD 3x3",
    ]
    columns = [
        ("representation", "representation", ""),
        ("size", "px", "d"),
        ("threads", "threads", ""),
        ("images_per_s", "images/s", ".1f"),
        ("ms_per_image", "ms / image", ".3f"),
        ("vs_skimage_hog", "x skimage HOG", ".2f"),
    ]
    config = {
        "batch": BATCH,
        "sizes": list(QUICK_SIZES if args.quick else SIZES),
        "skimage_images": SKIMAGE_IMAGES,
    }
    report("representations", args, device, rows, columns, config=config, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
