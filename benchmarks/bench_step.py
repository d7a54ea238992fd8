"""One MV-MR training step split into its phases, with and without the exact teacher cache.

The step timed is the training loop's own: each mode is a real :func:`mvmr_hf.train` run (the
run ``mvmr-distill`` / ``mvmr-pretrain`` make) over a local parquet stream of JPEG photographs,
and the loop is timed from outside, by hooks on what ``train`` builds (:func:`instrument`): the
wait for the next batch is the data wait; the student's first forward starts when the copy to
the device and the division by 255 (transfer) end, which on CUDA includes making the augmented
view on the device (``--device-views``, the default there); its second ends the student phase; the first
hand-crafted representation starts when the teacher (run, or read from the cache) ends; the
loss's forward marks its start and end; a gradient hook on identity views of z and z̃ ends the
loss's backward inside the one ``accelerator.backward``, and Adam's step pre-hook ends the
student's; the loop's call to the metrics meter ends Adam and the schedule. The device is
synchronized at every mark, so phases do not overlap (a slight upper bound on a step).

Configurations (random-init weights; timing does not depend on them):

- ``cpu``: resnet18 student, a ViT-S/16-sized CLIP image tower as the teacher, 64 px, batch 64, fp32;
- ``cuda``: resnet50 student, the CLIP ViT-B/16 image tower (its real sizes), 224 px, batch 256, bf16.

Both use the paper's 8192-8192-8192 projector. Modes: ``distill`` (the teacher runs every
step), ``cache epoch 1`` (the teacher runs and its outputs are stored), ``cache epoch 2``
(outputs read from the cache), and ``pretrain`` (the paper's five hand-crafted
representations, no teacher). Unavoidable work is the student's forward and backward plus
the teacher's forward when it runs; everything else is overhead.

Targets (issues 5 and 11): overhead at most 10 % of a GPU step and 20 % of a CPU step; with the
cache, the second epoch at least 2x faster than the first on the GPU; a data wait of at most
2 % of the step at the GPU configuration (224 px, device views, 16 workers).

    python benchmarks/bench_step.py --quick
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from common import (
    VIT_B16,
    VIT_S16,
    parser,
    report,
    resolve_device,
    save_clip_tower,
    synchronize,
    teacher_arguments,
    train_run,
    write_photo_parquet,
)

from mvmr_hf.cli import run_cli
from mvmr_hf.config import (
    DataArguments,
    ModelArguments,
    PretrainModelArguments,
    TrainingArguments,
)
from mvmr_hf.loss.objective import MVMRLoss
from mvmr_hf.models.representations.teacher import Teacher
from mvmr_hf.training import loop as training
from mvmr_hf.training import scaffold
from mvmr_hf.training.metrics import MetricsLogger

PHASES = (
    "data_wait", "transfer", "student_forward", "teacher", "representations", "loss_forward", "loss_backward",
    "student_backward", "optimizer",
)  # fmt: skip
BUILDERS = ("build_student", "build_representations", "build_optimizer", "build_dataloader")
CPU_TARGET, GPU_TARGET, CACHE_TARGET, DATA_WAIT_TARGET = 0.20, 0.10, 2.0, 0.02


@dataclass(frozen=True)
class Setup:
    """One benchmark configuration."""

    student: str
    teacher: dict[str, int]  # CLIPVisionConfig sizes
    teacher_label: str
    image_size: int
    batch: int
    mixed_precision: str
    projector: str
    workers: int
    warmup: int
    steps: int


def _setup(device: torch.device, quick: bool, workers: int | None) -> Setup:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cuda":
        workers = min(16, cpus) if workers is None else workers
        # Each worker makes whole batches: the first round of batches arrives together after the
        # workers' start-up, so the warm-up is one round and the timed steps are the next rounds.
        return Setup(
            student="resnet50",
            teacher=VIT_B16,
            teacher_label="CLIP ViT-B/16 image tower",
            image_size=224,
            batch=64 if quick else 256,
            mixed_precision="bf16",
            projector="8192-8192-8192",
            workers=workers,
            warmup=max(workers, 2),
            steps=max(workers, 2) * (1 if quick else 2),
        )
    return Setup(
        student="resnet18",
        teacher=VIT_S16,
        teacher_label="ViT-S/16-sized CLIP image tower",
        image_size=64,
        batch=16 if quick else 64,
        mixed_precision="no",
        projector="2048-2048" if quick else "8192-8192-8192",
        workers=1 if workers is None else workers,
        warmup=1 if quick else 2,
        steps=2 if quick else 6,
    )


class _Clock:
    """Per epoch and step, the synchronized wall time of each phase: from the previous mark to its own."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.epochs: list[list[dict[str, float]]] = []
        self.last = 0.0

    def new_epoch(self) -> None:
        """Start collecting the steps of the next epoch."""
        self.epochs.append([])

    def new_step(self) -> None:
        """Start a step: its phases at zero, its clock at now."""
        self.epochs[-1].append(dict.fromkeys(PHASES, 0.0))
        synchronize(self.device)
        self.last = time.perf_counter()

    def drop_step(self) -> None:
        """Forget the step just started: the epoch's data ran out."""
        self.epochs[-1].pop()

    def mark(self, phase: str) -> None:
        """End ``phase``: add the time since the previous mark (or the step's start) to it."""
        synchronize(self.device)
        now = time.perf_counter()
        self.epochs[-1][-1][phase] += now - self.last
        self.last = now


class _TimedLoader:
    """The loop's loader, unchanged, that starts a step when the loop asks for a batch and ends its wait."""

    def __init__(self, loader: Any, clock: _Clock) -> None:
        self.loader, self.clock = loader, clock

    def __getattr__(self, name: str) -> Any:  # dataset, state_dict, load_state_dict: the loader's own
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.clock.new_epoch()
        batches = iter(self.loader)
        while True:
            self.clock.new_step()
            batch = next(batches, None)
            if batch is None:
                self.clock.drop_step()
                return
            self.clock.mark("data_wait")
            yield batch


@contextmanager
def instrument(clock: _Clock) -> Iterator[None]:
    """Within, :func:`mvmr_hf.train` marks its step's phases on ``clock``; what it computes is unchanged.

    The builders ``train`` calls are wrapped so that what they build carries hooks: the loader
    (:class:`_TimedLoader`), the student and the representations (forward pre-hooks: the student's
    first pass of a step ends the transfer, the first representation ends the student's passes), the
    loss (forward hooks and identity views of z and z̃ with a gradient hook), Adam (a step pre-hook)
    and the metrics meter (its ``add``). Autograd runs the nodes of a graph newest first; the views
    are newer than every node of the student and older than every node of the loss, so their hook
    fires exactly between the loss's backward and the student's.
    """
    state = {"student_ran": False, "student_done": False, "teacher_done": False}
    built = {name: getattr(training, name) for name in BUILDERS}  # train's own builders

    def student_pre(module: torch.nn.Module, inputs: tuple) -> None:
        if not state["student_ran"]:  # the step's first pass: its batch is on the device
            state.update(student_ran=True, student_done=False, teacher_done=False)
            clock.mark("transfer")

    def end_student() -> None:
        # x̃ alone, or x then x̃ when a term reads Z: the phase ends where the teachers' begins
        if state["student_ran"] and not state["student_done"]:
            state["student_done"] = True
            clock.mark("student_forward")

    def end_teacher() -> None:
        end_student()
        if not state["teacher_done"]:
            state["teacher_done"] = True
            clock.mark("teacher")

    def loss_pre(module: torch.nn.Module, inputs: tuple) -> tuple:
        end_teacher()
        clock.mark("representations")
        state["student_ran"] = False
        z, z_aug, *rest = inputs
        # z is None when no term reads it (λ = μ = α = 0): the student ran once, on x̃
        embeddings = [e.view_as(e) for e in (z, z_aug) if e is not None]
        torch.autograd.graph.register_multi_grad_hook(embeddings, lambda grads: clock.mark("loss_backward"))
        return (None, *embeddings, *rest) if z is None else (*embeddings, *rest)

    def build_student(*args: Any, **kwargs: Any) -> torch.nn.Module:
        student = built["build_student"](*args, **kwargs)
        student.register_forward_pre_hook(student_pre)
        return student

    def build_representations(*args: Any, **kwargs: Any) -> dict[str, torch.nn.Module]:
        representations = built["build_representations"](*args, **kwargs)
        for representation in representations.values():
            end = end_student if isinstance(representation, Teacher) else end_teacher
            representation.register_forward_pre_hook(lambda module, inputs, end=end: end())
        return representations

    def loss(*args: Any, **kwargs: Any) -> MVMRLoss:
        criterion = MVMRLoss(*args, **kwargs)
        criterion.register_forward_pre_hook(loss_pre)
        criterion.register_forward_hook(lambda module, inputs, output: clock.mark("loss_forward"))
        return criterion

    def build_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = built["build_optimizer"](*args, **kwargs)
        optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: clock.mark("student_backward"))
        return optimizer

    def build_dataloader(*args: Any, **kwargs: Any) -> tuple[_TimedLoader, Any]:
        loader, stats = built["build_dataloader"](*args, **kwargs)
        return _TimedLoader(loader, clock), stats

    class Meter(MetricsLogger):
        def add(self, *args: Any, **kwargs: Any) -> None:
            clock.mark("optimizer")  # the scheduler's step and zero_grad are done: the loop's own work ends
            super().add(*args, **kwargs)

    wrappers = {
        "build_student": build_student,
        "build_representations": build_representations,
        "build_optimizer": build_optimizer,
        "build_dataloader": build_dataloader,
        "MVMRLoss": loss,
    }
    with contextlib.ExitStack() as stack:
        for name, wrapper in wrappers.items():
            stack.enter_context(mock.patch.object(training, name, wrapper))
        stack.enter_context(mock.patch.object(scaffold, "MetricsLogger", Meter))  # the run scaffold's meter
        yield


def _summary(mode: str, steps: list[dict[str, float]], batch: int, teacher_runs: bool) -> dict[str, Any]:
    """Median of each phase over the timed steps (robust to a step disturbed by another process)."""
    row: dict[str, Any] = {"mode": mode, "steps": len(steps)}
    for phase in PHASES:
        row[f"{phase}_ms"] = statistics.median(step[phase] for step in steps) * 1e3
    total = sum(row[f"{phase}_ms"] for phase in PHASES)
    unavoidable = row["student_forward_ms"] + row["student_backward_ms"]
    if teacher_runs:
        unavoidable += row["teacher_ms"]
    row.update(
        step_ms=total,
        images_per_s=batch / total * 1e3,
        overhead_ms=total - unavoidable,
        overhead_share=(total - unavoidable) / total,
        data_wait_share=row["data_wait_ms"] / total,
    )
    return row


def _images_for(setup: Setup) -> tuple[int, int]:
    """Images and shards so that every worker yields whole batches (all cached in epoch 1)."""
    workers = max(setup.workers, 1)
    batches_per_worker = -(-(setup.warmup + setup.steps) // workers)
    return batches_per_worker * workers * setup.batch, workers


def _run(setup: Setup, device: torch.device, folder: Path, *, teacher: Path | None, cache: bool) -> _Clock:
    """One :func:`mvmr_hf.train` run, instrumented: distillation from ``teacher``, else pretraining.

    Without the cache, one epoch of ``warmup + steps`` steps; with it, two whole epochs (the
    first stores the teacher's outputs, the second reads them).
    """
    clock = _Clock(device)
    model = ModelArguments if teacher is not None else PretrainModelArguments
    training_args = TrainingArguments(
        output_dir=str(folder / "run"),
        batch_size=setup.batch,
        epochs=2,
        max_steps=None if cache else setup.warmup + setup.steps,
        warmup=10,
        mixed_precision=setup.mixed_precision,
        checkpoint_every=10**9,  # the last step's checkpoint and the release come after the timed steps
        log_every=10**9,
        seed=0,
    )
    data_args = DataArguments(
        dataset=str(folder / "data"),
        image_size=setup.image_size,
        shuffle_buffer=1000,
        num_workers=setup.workers,
    )
    teacher_args = teacher_arguments(teacher, cache)
    with instrument(clock):
        train_run(device, model(student=setup.student, projector=setup.projector), data_args, training_args,
                  teacher_args)  # fmt: skip
    shutil.rmtree(folder / "run")
    return clock


def _measure(setup: Setup, device: torch.device, root: Path) -> list[dict[str, Any]]:
    """Each mode's phase medians over its timed steps (the warm-up steps of each epoch left out)."""
    images, shards = _images_for(setup)
    write_photo_parquet(root / "data", images, shards=shards)
    teacher = save_clip_tower(root / "teacher", setup.teacher, setup.image_size)
    runs = [  # name, teacher, cache: the epochs of each run, in order
        (["distill"], teacher, False),
        (["distill, cache epoch 1", "distill, cache epoch 2"], teacher, True),
        (["pretrain (5 hand-crafted)"], None, False),
    ]
    rows: list[dict[str, Any]] = []
    for modes, run_teacher, cache in runs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clock = _run(setup, device, root, teacher=run_teacher, cache=cache)
        for mode, steps in zip(modes, clock.epochs, strict=True):
            teacher_runs = run_teacher is not None and mode != "distill, cache epoch 2"
            row = _summary(mode, steps[setup.warmup :], setup.batch, teacher_runs)
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(row)
            print(f"measured {mode}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str]) -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument(
        "--num-workers", type=int, default=None, help="DataLoader workers (default: 16 on GPU, 1 on CPU)"
    )
    args = cli.parse_args(argv)
    device = resolve_device(args.device)
    setup = _setup(device, args.quick, args.num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        rows = _measure(setup, device, Path(tmp))
    notes = _verdicts(rows, device, quick=args.quick)
    notes += [
        f"student {setup.student}, projector {setup.projector}, teacher {setup.teacher_label} (random init), "
        f"{setup.image_size} px, batch {setup.batch}, mixed precision {setup.mixed_precision}, "
        f"{setup.workers} DataLoader workers; medians over the steps after {setup.warmup} warm-up steps",
        "step = the sum of the phases' medians over the timed steps; overhead = step - student forward - "
        "student backward - teacher (when the teacher runs: in cache epoch 1 this includes storing its "
        "outputs); the loop's metrics meter and checkpoints are not included",
    ]
    columns = [("mode", "mode", ""), ("images_per_s", "images/s", ".1f"), ("step_ms", "step ms", ".1f")]
    columns += [(f"{phase}_ms", phase.replace("_", " "), ".1f") for phase in PHASES]
    columns += [("overhead_share", "overhead", ".1%"), ("data_wait_share", "data wait", ".1%")]
    if device.type == "cuda":
        columns.append(("peak_memory_gib", "peak GiB", ".1f"))
    report("step", args, device, rows, columns, config=vars(setup), notes=notes)


def _verdict(share: float, target: float, quick: bool) -> str:
    """ "met" or "MISSED"; with --quick only reported."""
    if quick:
        return "not checked: --quick shrinks the batch and projector, so the student's share is smaller"
    return "met" if share <= target else "MISSED"


def _verdicts(rows: list[dict[str, Any]], device: torch.device, *, quick: bool) -> list[str]:
    """Each mode's overhead against the target; with --quick (a smaller step) the share is only reported."""
    target = GPU_TARGET if device.type == "cuda" else CPU_TARGET

    notes = [
        f"{row['mode']}: overhead {row['overhead_share']:.1%} of the step (target <= {target:.0%}): "
        f"{_verdict(row['overhead_share'], target, quick)}"
        for row in rows
    ]
    by_mode = {row["mode"]: row for row in rows}
    speedup = by_mode["distill, cache epoch 1"]["step_ms"] / by_mode["distill, cache epoch 2"]["step_ms"]
    notes.append(
        f"cache: epoch 2 is {speedup:.2f}x faster than epoch 1"
        + (f" (target >= {CACHE_TARGET:g}x on the GPU): {'met' if speedup >= CACHE_TARGET else 'MISSED'}"
           if device.type == "cuda" else " (the 2x target applies to the GPU configuration)")
    )  # fmt: skip
    if device.type == "cuda":
        notes += [
            f"{row['mode']}: data wait {row['data_wait_share']:.1%} of the step (target <= "
            f"{DATA_WAIT_TARGET:.0%}): {_verdict(row['data_wait_share'], DATA_WAIT_TARGET, quick)}"
            for row in rows
        ]
    return notes


if __name__ == "__main__":
    sys.exit(run_cli(main))
