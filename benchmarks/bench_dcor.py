"""Time and peak memory of ``mvmr_hf.dcor.distance_correlation`` against its floor and a cdist version.

For each batch size B and width D, ``x`` (B, D) plays the student embedding (it requires
gradients) and ``y`` (B, D) a representation (it does not), as in the loss. Measured:

- the **floor**: the two Gram products X·Xᵀ and Y·Yᵀ in float32, the work any exact
  distance correlation must do (``distance_correlation`` forms its Gram matrices in float32
  by design, also under autocast); under bf16 autocast the bf16 Gram products are shown too;
- ``distance_correlation`` forward, and forward + backward (R², biased, as the loss uses it);
- a textbook ``torch.cdist`` version, forward and forward + backward;
- the peak memory each forward + backward allocates beyond its inputs.

Targets (issue 5): forward within 1.5x of the floor; peak extra memory within 2x of the inputs.
Cells whose estimated memory does not fit the device are skipped and say so.

    python benchmarks/bench_dcor.py --quick          # reduced grid, well under a minute on 2 cores
    python benchmarks/bench_dcor.py                  # B in {64,256,512,1024} x D in {512,...,762048}
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from common import (
    PeakMemory,
    available_memory_bytes,
    parser,
    prepare_memory_measurement,
    report,
    resolve_device,
    time_call,
)
from torch import Tensor

from mvmr_hf.cli import run_cli
from mvmr_hf.dcor import distance_correlation

BATCHES = (64, 256, 512, 1024)
WIDTHS = (512, 8192, 150528, 762048)  # an embedding, the projector, 224 px pixels, 224 px ScatNet
QUICK_BATCHES = (64, 256)
QUICK_WIDTHS = (512, 8192, 150528)
MODES = ("fp32", "bf16-autocast")
FORWARD_TARGET = 1.5
MEMORY_TARGET = 2.0
# Peak of a cell in units of one float32 (B, D) tensor, inputs included, measured with margin:
# cdist forward + backward is the largest (about 6 on CPU).
_FOOTPRINT_FP32_COPIES = 8


def cdist_distance_correlation(x: Tensor, y: Tensor) -> Tensor:
    """The textbook R² (eq. 11-14) on ``torch.cdist`` distances: the baseline to beat."""

    def centred(t: Tensor) -> Tensor:
        flat = t.reshape(t.shape[0], -1).float()
        distances = torch.cdist(flat, flat)
        return (
            distances
            - distances.mean(dim=0, keepdim=True)
            - distances.mean(dim=1, keepdim=True)
            + distances.mean()
        )

    a, b = centred(x), centred(y)
    return (a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()


def _autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _inputs(batch: int, width: int, mode: str, device: torch.device) -> tuple[Tensor, Tensor]:
    # Under autocast the student's embedding and a teacher's output arrive in bf16.
    dtype = torch.bfloat16 if mode == "bf16-autocast" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, width, device=device, dtype=dtype, generator=generator).requires_grad_(True)
    y = torch.randn(batch, width, device=device, dtype=dtype, generator=generator)
    return x, y


def _forward_backward(loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> None:
    loss_fn(x, y).backward()
    x.grad = None


def _grid(quick: bool) -> Iterator[tuple[int, int, str]]:
    for batch in QUICK_BATCHES if quick else BATCHES:
        for width in QUICK_WIDTHS if quick else WIDTHS:
            for mode in MODES:
                yield batch, width, mode


def _time_cell(batch: int, width: int, mode: str, device: torch.device, budget_s: float) -> dict[str, Any]:
    x, y = _inputs(batch, width, mode, device)
    dcor = lambda a, b: distance_correlation(a, b, squared=True)  # noqa: E731
    xf, yf = x.detach().float(), y.detach().float()

    def floor_fp32() -> None:
        xf @ xf.T
        yf @ yf.T

    def floor_autocast() -> None:
        with _autocast(mode, device):
            x @ x.T
            y @ y.T

    def run(fn: Callable[[], object]) -> float:
        with _autocast(mode, device):
            return time_call(fn, device, budget_s=budget_s).best * 1e3

    with torch.no_grad():
        floor_ms = time_call(floor_fp32, device, budget_s=budget_s).best * 1e3
        floor_autocast_ms = (
            time_call(floor_autocast, device, budget_s=budget_s).best * 1e3 if mode != "fp32" else None
        )
    row = {
        "floor_ms": floor_ms,
        "floor_autocast_ms": floor_autocast_ms,
        "dcor_forward_ms": run(lambda: dcor(x, y)),
        "dcor_forward_backward_ms": run(lambda: _forward_backward(dcor, x, y)),
        "cdist_forward_ms": run(lambda: cdist_distance_correlation(x, y)),
        "cdist_forward_backward_ms": run(lambda: _forward_backward(cdist_distance_correlation, x, y)),
    }
    row["forward_vs_floor"] = row["dcor_forward_ms"] / floor_ms
    return row


def _peak_cell(batch: int, width: int, mode: str, device: torch.device) -> dict[str, Any]:
    x, y = _inputs(batch, width, mode, device)
    peaks = {}
    for key, loss_fn in (
        ("dcor", lambda a, b: distance_correlation(a, b, squared=True)),
        ("cdist", cdist_distance_correlation),
    ):
        with _autocast(mode, device):
            _forward_backward(loss_fn, x, y)  # one-time initialisation is not part of the peak
            with PeakMemory(device) as peak:
                _forward_backward(loss_fn, x, y)
        peaks[key] = peak.bytes
    inputs = x.numel() * x.element_size() + y.numel() * y.element_size()
    return {
        "dcor_peak_extra_mb": None if peaks["dcor"] is None else peaks["dcor"] / 2**20,
        "dcor_peak_vs_inputs": None if peaks["dcor"] is None else peaks["dcor"] / inputs,
        "cdist_peak_vs_inputs": None if peaks["cdist"] is None else peaks["cdist"] / inputs,
    }


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)
    budget_s = 2.0 if args.quick else 10.0
    rows: list[dict[str, Any]] = []
    for batch, width, mode in _grid(args.quick):
        row: dict[str, Any] = {"batch": batch, "width": width, "mode": mode}
        row["inputs_mb"] = 2 * batch * width * (2 if mode == "bf16-autocast" else 4) / 2**20
        needed = _FOOTPRINT_FP32_COPIES * batch * width * 4
        if needed > available_memory_bytes(device):
            row["status"] = f"skipped: needs about {needed / 2**30:.0f} GiB"
        else:
            row.update(_time_cell(batch, width, mode, device, budget_s))
            row["status"] = "ok" if row["forward_vs_floor"] <= FORWARD_TARGET else "slow"
        rows.append(row)
        print(f"timed B={batch} D={width} {mode}: {row['status']}", file=sys.stderr, flush=True)
    # Peak memory last: on CPU the measurement changes the allocator's policy for the process.
    memory_method = prepare_memory_measurement(device)
    for row in rows:
        if not row["status"].startswith("skipped"):
            row.update(_peak_cell(row["batch"], row["width"], row["mode"], device))
            if (row.get("dcor_peak_vs_inputs") or 0) > MEMORY_TARGET:
                row["status"] += ", memory"
    columns = [
        ("batch", "B", "d"),
        ("width", "D", "d"),
        ("mode", "mode", ""),
        ("inputs_mb", "inputs MiB", ".1f"),
        ("floor_ms", "fp32 Gram floor ms", ".2f"),
        ("floor_autocast_ms", "bf16 Gram ms", ".2f"),
        ("dcor_forward_ms", "dCor fwd ms", ".2f"),
        ("forward_vs_floor", "fwd / floor", ".2f"),
        ("dcor_forward_backward_ms", "dCor fwd+bwd ms", ".2f"),
        ("cdist_forward_ms", "cdist fwd ms", ".2f"),
        ("cdist_forward_backward_ms", "cdist fwd+bwd ms", ".2f"),
        ("dcor_peak_extra_mb", "dCor peak extra MiB", ".1f"),
        ("dcor_peak_vs_inputs", "dCor peak / inputs", ".2f"),
        ("cdist_peak_vs_inputs", "cdist peak / inputs", ".2f"),
        ("status", "status", ""),
    ]
    notes = [
        f"targets: dCor forward <= {FORWARD_TARGET}x the fp32 Gram floor; peak extra memory "
        f"<= {MEMORY_TARGET}x the inputs (status 'slow' / 'memory' marks a miss)",
        "x requires gradients (the student embedding), y does not (a representation); "
        "times are the best of up to 5 calls after a warm-up",
        f"peak memory: {memory_method or 'not measurable on this system'}",
        "bf16-autocast: inputs are bf16; distance_correlation forms its Gram matrices in float32 by design "
        "(shared/notes/dcor-numerics.md), so its floor is the float32 Gram of the same inputs",
    ]
    config = {
        "batches": list(QUICK_BATCHES if args.quick else BATCHES),
        "widths": list(QUICK_WIDTHS if args.quick else WIDTHS),
        "modes": list(MODES),
        "squared": True,
        "unbiased": False,
        "timing_budget_s": budget_s,
    }
    report("dcor", args, device, rows, columns, config=config, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
