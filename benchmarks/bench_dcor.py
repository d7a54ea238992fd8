"""Time and peak memory of ``mvmr_hf.loss.dcor.distance_correlation`` against its floor and a cdist version.

For each batch size B and width D, ``x`` (B, D) plays the student embedding (it requires
gradients) and ``y`` (B, D) a representation (it does not), as in the loss. Measured:

- the **floor**: the two Gram products X·Xᵀ and Y·Yᵀ in float32, the work any exact
  distance correlation must do (``distance_correlation`` forms its Gram matrices in float32
  by design, also under autocast); under bf16 autocast the bf16 Gram products are shown too;
- ``distance_correlation`` forward, and forward + backward (R², biased, as the loss uses it);
- a textbook ``torch.cdist`` version, forward and forward + backward;
- the peak memory each forward + backward allocates beyond its inputs.

Targets (issue 5): forward within 1.5x of the floor; peak extra memory within 2x of the inputs.
They are checked where they measure the implementation: from a floor of 1 ms (below it, the
fixed cost of a call's ~25 tensor operations dominates) and from 16 MiB of inputs (below it,
the B x B matrices, which any exact dCor needs, outweigh inputs with D < B).
Cells whose estimated memory does not fit the device are skipped and say so; on CPU, so is
B=1024 with D=762048, whose Gram products alone take minutes per call.

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
from mvmr_hf.loss.dcor import distance_correlation

BATCHES = (64, 256, 512, 1024)
WIDTHS = (512, 8192, 150528, 762048)  # an embedding, the projector, 224 px pixels, 224 px ScatNet
QUICK_BATCHES = (64, 256)
QUICK_WIDTHS = (512, 65536)
MODES = ("fp32", "bf16-autocast")
FORWARD_TARGET = 1.5
MEMORY_TARGET = 2.0
MEMORY_CHECKED_MB = 16  # below this, page granularity and the B x B matrices dominate the peak
# Below this floor the fixed cost of a call (about 25 tensor operations, 0.2-0.25 ms on the 2-core
# CI machine) dominates: the ratio is shown, the cell's status says "fixed cost" instead of "slow".
FORWARD_CHECKED_MS = 1.0
# Peak footprint of forward + backward, inputs included, in float32 (B, D) tensors, measured on CPU
# with a margin: distance_correlation about 2.5 (the inputs and x's gradient), the cdist version about 8.
FOOTPRINT_FP32_COPIES = {"dcor": 3, "cdist": 9}
# On CPU a cell above this B²·D (B=1024, D=762048: about 3 minutes per timed call) is left out.
CPU_MAX_WORK = 512 * 512 * 762048
MEMORY_MARGIN = 0.8  # of the memory available when the cell starts: the machine may be shared


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
    x = torch.randn(batch, width, device=device, dtype=dtype, generator=generator).requires_grad_()
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


def _fits(implementation: str, batch: int, width: int, device: torch.device) -> bool:
    """Whether the implementation's forward + backward fits in 80 % of the memory available now."""
    needed = FOOTPRINT_FP32_COPIES[implementation] * batch * width * 4
    return needed < MEMORY_MARGIN * available_memory_bytes(device)


def _dcor(x: Tensor, y: Tensor) -> Tensor:
    return distance_correlation(x, y, squared=True)


IMPLEMENTATIONS = {"dcor": _dcor, "cdist": cdist_distance_correlation}


def _milliseconds(fn: Callable[[], object], mode: str, device: torch.device, budget_s: float) -> float:
    with _autocast(mode, device):
        return time_call(fn, device, budget_s=budget_s).best * 1e3


@torch.no_grad()
def _floors(x: Tensor, y: Tensor, mode: str, device: torch.device, budget_s: float) -> dict[str, float]:
    """The two Gram products in float32 and, under autocast, in the autocast dtype."""
    xf, yf = x.float(), y.float()
    floors = {"floor_ms": _milliseconds(lambda: (xf @ xf.T, yf @ yf.T), "fp32", device, budget_s)}
    if mode != "fp32":
        floors["floor_autocast_ms"] = _milliseconds(lambda: (x @ x.T, y @ y.T), mode, device, budget_s)
    return floors


def _time_cell(
    batch: int, width: int, mode: str, device: torch.device, budget_s: float, implementations: list[str]
) -> dict[str, Any]:
    x, y = _inputs(batch, width, mode, device)
    row = _floors(x, y, mode, device, budget_s)
    for name in implementations:
        loss_fn = IMPLEMENTATIONS[name]
        row[f"{name}_forward_ms"] = _milliseconds(lambda f=loss_fn: f(x, y), mode, device, budget_s)
        row[f"{name}_forward_backward_ms"] = _milliseconds(
            lambda f=loss_fn: _forward_backward(f, x, y), mode, device, budget_s
        )
    row["forward_vs_floor"] = row["dcor_forward_ms"] / row["floor_ms"]
    return row


def _peak_cell(
    batch: int, width: int, mode: str, device: torch.device, implementations: list[str]
) -> dict[str, Any]:
    x, y = _inputs(batch, width, mode, device)
    inputs = x.numel() * x.element_size() + y.numel() * y.element_size()
    small_x, small_y = _inputs(8, 64, mode, device)
    row: dict[str, Any] = {}
    for name in implementations:
        loss_fn = IMPLEMENTATIONS[name]
        with _autocast(mode, device):
            _forward_backward(loss_fn, small_x, small_y)  # one-time initialisation is not part of the peak
            with PeakMemory(device) as peak:
                _forward_backward(loss_fn, x, y)
        if peak.bytes is not None:
            row[f"{name}_peak_extra_mb"] = peak.bytes / 2**20
            row[f"{name}_peak_vs_inputs"] = peak.bytes / inputs
    return row


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)
    budget_s = 0.25 if args.quick else 2.0
    rows: list[dict[str, Any]] = []
    for batch, width, mode in _grid(args.quick):
        row: dict[str, Any] = {"batch": batch, "width": width, "mode": mode}
        row["inputs_mb"] = 2 * batch * width * (2 if mode == "bf16-autocast" else 4) / 2**20
        row["implementations"] = [name for name in IMPLEMENTATIONS if _fits(name, batch, width, device)]
        if device.type == "cpu" and batch * batch * width > CPU_MAX_WORK:
            row["status"] = "skipped on CPU: minutes per call"
        elif "dcor" not in row["implementations"]:
            gib = FOOTPRINT_FP32_COPIES["dcor"] * batch * width * 4 / 2**30
            row["status"] = f"skipped: needs about {gib:.0f} GiB"
        else:
            row.update(_time_cell(batch, width, mode, device, budget_s, row["implementations"]))
            if row["forward_vs_floor"] <= FORWARD_TARGET:
                row["status"] = "ok"
            else:
                row["status"] = "slow" if row["floor_ms"] >= FORWARD_CHECKED_MS else "fixed cost"
            if "cdist" not in row["implementations"]:
                row["status"] += ", cdist skipped (memory)"
        rows.append(row)
        print(f"timed B={batch} D={width} {mode}: {row['status']}", file=sys.stderr, flush=True)
    # Peak memory last: on CPU the measurement changes the allocator's policy for the process.
    memory_method = prepare_memory_measurement(device)
    for row in rows:
        if not row["status"].startswith("skipped"):
            row.update(_peak_cell(row["batch"], row["width"], row["mode"], device, row["implementations"]))
            if row["inputs_mb"] >= MEMORY_CHECKED_MB and row.get("dcor_peak_vs_inputs", 0.0) > MEMORY_TARGET:
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
        f"targets: dCor forward <= {FORWARD_TARGET}x the fp32 Gram floor, checked from a floor of "
        f"{FORWARD_CHECKED_MS:g} ms (below it the call's fixed cost of about 25 tensor operations dominates: "
        f"status 'fixed cost'); peak extra memory "
        f"<= {MEMORY_TARGET}x the inputs, checked from {MEMORY_CHECKED_MB} MiB of inputs (status 'slow' / "
        "'memory' marks a miss)",
        "x requires gradients (the student embedding), y does not (a representation); "
        "times are the best of the calls repeated within a time budget after a warm-up",
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
