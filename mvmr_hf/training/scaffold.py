"""The run scaffold that training and fine-tuning share, so that each loop shows only its stages and its step.

A run checks its folder and finds its resume point before anything is written
(:func:`find_resume_point`); its :class:`RunScaffold` then holds the folder's lock for the rest of the
run, having prepared the folder, restores the checkpoint to resume from once the model and the optimizer
are prepared, and is called once per optimizer step, as
dinov2's ``do_train`` calls fvcore's ``PeriodicCheckpointer``: it writes the step's ``metrics.jsonl``
line when asked (:mod:`mvmr_hf.training.metrics`), saves a checkpoint every ``--checkpoint-every`` steps
keeping the newest ``--keep-checkpoints`` (:mod:`mvmr_hf.storage.checkpoint`), and, once every process
agrees that a stop signal arrived (:class:`StopRequest`), saves the step, leaves the ``PREEMPTED``
marker and raises PreemptedError (exit status 75). :meth:`RunScaffold.finish` saves the last step.

The pieces both loops build alike are here too: the Accelerate precision (:func:`resolve_mixed_precision`)
and Adam (:func:`build_optimizer`).

Example (a loop's skeleton)::

    resume_from = find_resume_point(accelerator, output_dir, options, args, defaults)  # nothing written
    run = RunScaffold(accelerator, output_dir, options, resume_from, images_per_step=128)
    with run.holding_folder(args):
        model, optimizer = accelerator.prepare(model, build_optimizer(model, 1e-4, 0.0, accelerator.device))
        run.resume(loader_state=lambda step: {"step": step})
        step = run.start_step
        with run:  # the stop signals are recorded, not deadly
            for batch in batches:
                loss = ...  # the step
                step += 1
                run.meter.add(loss, {}, skipped=0, step=step)
                run.end_step(step, epoch, lr, log=step % 10 == 0)
        run.finish(step, epoch, lr)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from mvmr_hf.config import FinetuneArguments, TrainingArguments, parse_signals
from mvmr_hf.distributed import reduce_int
from mvmr_hf.errors import PreemptedError
from mvmr_hf.release.export import RELEASE_DIR, stored_run_info
from mvmr_hf.storage.checkpoint import CHECKPOINTS_DIR, CheckpointState, load_checkpoint, save_checkpoint
from mvmr_hf.training.metrics import MetricsLogger, truncate_metrics
from mvmr_hf.training.run_folder import (
    check_output_dir_free,
    mark_preempted,
    own_output_dir,
    prepare_output_dir,
    resume_point,
)
from mvmr_hf.utils import writing

__all__ = [
    "RunScaffold",
    "StopRequest",
    "build_optimizer",
    "find_resume_point",
    "resolve_mixed_precision",
]


def resolve_mixed_precision(requested: str | None) -> str | None:
    """``--mixed-precision``, else what ``accelerate launch`` / ``accelerate config`` set, else bf16 on a
    CUDA GPU that supports it, else None (Accelerate's "no").

    The paper's released code trained in 16-bit precision; bf16 needs no loss scaling, and on an
    H200 it is the faster setting (``benchmarks/results/loop-cuda.json``).
    """
    if requested is not None or os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None


def build_optimizer(
    modules: nn.Module | Sequence[nn.Module], learning_rate: float, weight_decay: float, device: torch.device
) -> torch.optim.Adam:
    """Adam (the paper's optimizer) over the parameters of ``modules``; fused on CPU and CUDA.

    The fused kernel updates all parameters in one pass instead of one kernel per tensor, which
    matters for the paper's 8192-wide projector (``benchmarks/bench_step.py`` times the optimizer).
    """
    modules = [modules] if isinstance(modules, nn.Module) else modules
    return torch.optim.Adam(
        [parameter for module in modules for parameter in module.parameters()],
        lr=learning_rate,
        weight_decay=weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def find_resume_point(
    accelerator: Accelerator,
    output_dir: Path,
    options: TrainingArguments | FinetuneArguments,
    args: dict[str, Any],
    defaults: Mapping[str, Any],
) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); writes nothing.

    A folder that another run holds is refused first, on every process, naming the holder; then
    :func:`~mvmr_hf.training.run_folder.resume_point` checks the folder and the saved settings.

    Args:
        accelerator: the run's ``Accelerator``.
        output_dir: the run folder.
        options: the arguments holding ``--resume`` and ``--overwrite``.
        args: the run's flat arguments, compared with the saved ``training_args.json`` on resume.
        defaults: what a saved ``training_args.json`` that lacks an argument ran with
            (:func:`~mvmr_hf.training.run_folder.flat_defaults`).
    """
    check_output_dir_free(accelerator, output_dir)
    return resume_point(output_dir, options, args, defaults)


class StopRequest:
    """Records the stop signals (``--stop-signals``) received while the block runs, instead of dying.

    :meth:`agreed` is True on every process once any process received one, so that all of them
    stop after the same optimizer step; :meth:`preempted` then leaves the run folder's
    :data:`~mvmr_hf.training.run_folder.PREEMPTED` marker. Outside the main thread, where Python cannot handle
    signals, nothing is installed and the run keeps the signals' default actions.
    """

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: signal.Signals | None = None  # the last stop signal this process received
        self.signal: str | None = None  # the name of one that a process received, once agreed says so
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        self.received = signal.Signals(number)

    def agreed(self, accelerator: Accelerator) -> bool:
        """Whether any process received a stop signal (a tiny all-reduce on the CPU with several).

        Every process then knows one of the signals received (the highest-numbered), for the marker.
        """
        number = self.received.value if self.received is not None else 0
        if accelerator.num_processes > 1:
            number = reduce_int(number, dist.ReduceOp.MAX)
        self.signal = signal.Signals(number).name if number else None
        return number != 0

    def preempted(self, accelerator: Accelerator, step: int, output_dir: Path) -> PreemptedError:
        """Leave the PREEMPTED marker once the checkpoint of ``step`` is saved in ``output_dir`` (call it on
        every process) and return the error to raise."""
        mark_preempted(accelerator, output_dir, step=step, signal=self.signal)
        return PreemptedError(
            f"{self.signal} after step {step}: its checkpoint is in {output_dir}; continue with --resume"
        )


class RunScaffold:
    """What a loop does around its steps: the folder's lock, resume, metrics, checkpoints, stop signals.

    Built before the folder is written (on every process), it is used in this order:
    :meth:`holding_folder` holds the folder's lock for the rest of the run, the folder prepared;
    :meth:`resume`, once the model and the optimizer are prepared, restores ``resume_from``
    (:attr:`start_step` is then the step to continue from), drops the metrics logged after it and
    starts the :attr:`meter`; the loop adds each micro-step's loss to the meter and calls
    :meth:`end_step` after each optimizer step, inside ``with scaffold:`` (the stop signals are
    recorded there, :class:`StopRequest`); then :meth:`finish`.

    Args:
        accelerator: the run's ``Accelerator``.
        output_dir: the run folder.
        options: ``--checkpoint-every``, ``--keep-checkpoints``, ``--stop-signals``, ``--overwrite``.
        resume_from: the checkpoint to resume from (:func:`find_resume_point`); None: a fresh start.
        images_per_step: the global images of an optimizer step, for the metrics' ``images_per_s``.
        log_last: whether :meth:`finish` and a stop write the metrics of the steps since the last line
            (training); False: the loop's own ``log`` lines are all of them (fine-tuning logs its last step).
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: Path,
        options: TrainingArguments | FinetuneArguments,
        resume_from: Path | None,
        *,
        images_per_step: int,
        log_last: bool = True,
    ) -> None:
        self.accelerator, self.output_dir, self.options = accelerator, output_dir, options
        self.resume_from, self.images_per_step, self.log_last = resume_from, images_per_step, log_last
        self.stop = StopRequest(parse_signals(options.stop_signals))
        self.start_step = self.saved_step = 0  # the step the loop starts from, once resumed
        self.started = time.perf_counter()
        self.meter: MetricsLogger
        self.loader_state: Callable[[int], dict[str, Any]]
        self.run_info: Callable[[int, float], dict[str, Any]] | None = None

    @contextmanager
    def holding_folder(self, args: dict[str, Any], *, release_dir: str = RELEASE_DIR) -> Iterator[None]:
        """Hold the run folder's lock for the block (:mod:`mvmr_hf.storage.lock`), the folder prepared
        (:func:`~mvmr_hf.training.run_folder.prepare_output_dir`: --overwrite, unfinished checkpoints, a
        previous stop's marker, ``args`` as ``training_args.json``); ``release_dir`` is the run's release."""
        accelerator, output_dir = self.accelerator, self.output_dir
        with own_output_dir(accelerator, output_dir):
            prepare_output_dir(
                accelerator, output_dir, args, self.options, self.resume_from, release_dir=release_dir
            )
            yield

    def resume(
        self,
        *,
        loader_state: Callable[[int], dict[str, Any]],
        run_info: Callable[[int, float], dict[str, Any]] | None = None,
    ) -> CheckpointState | None:
        """Restore the checkpoint to resume from (None on a fresh start) and start the metrics; call it on
        every process once the model and the optimizer are prepared.

        ``loader_state`` gives this process's data position after a step, saved in that step's checkpoint;
        ``run_info`` the run's facts after a step and its seconds so far, saved as ``run_info.json``.
        """
        self.loader_state, self.run_info = loader_state, run_info
        restored = None
        if self.resume_from is not None:
            restored = load_checkpoint(self.accelerator, self.resume_from)
            self.start_step = restored.step
            truncate_metrics(self.accelerator, self.output_dir, self.start_step)
        self.meter = MetricsLogger(
            self.accelerator, self.output_dir, images_per_step=self.images_per_step, step=self.start_step
        )
        # the seconds of the steps before the checkpoint count too: the card reports the whole run's time
        before = None if self.resume_from is None else stored_run_info(self.resume_from)
        self.saved_step = self.start_step
        self.started = time.perf_counter() - (before.training_seconds if before is not None else 0.0)
        return restored

    def __enter__(self) -> RunScaffold:
        self.stop.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.__exit__(*exc)

    def seconds(self) -> float:
        """The run's training seconds: those its checkpoint recorded, then those since it resumed."""
        return time.perf_counter() - self.started

    def save(self, step: int, epoch: int) -> None:
        """Save the checkpoint of ``step`` (never after a non-finite loss); call it on every process."""
        self.meter.raise_if_not_finite()
        state = self.loader_state(step)  # this process's position in its data stream
        run_info = None if self.run_info is None else self.run_info(step, self.seconds())
        with writing(f"the checkpoint of step {step}", self.output_dir / CHECKPOINTS_DIR):
            save_checkpoint(self.accelerator, self.output_dir, step=step, epoch=epoch, loader_state=state,
                            keep=self.options.keep_checkpoints, run_info=run_info)  # fmt: skip
        self.saved_step = step

    def end_step(self, step: int, epoch: int, lr: float, *, log: bool) -> dict[str, str] | None:
        """After optimizer step ``step``: its metrics line when ``log`` (returns the meter's summary), the
        periodic checkpoint, then, if a stop signal reached any process, the last save and PreemptedError."""
        summary = self.meter.log(step, epoch, lr) if log else None
        if step % self.options.checkpoint_every == 0:
            self.save(step, epoch)
        if self.stop.agreed(self.accelerator):  # a stop signal on any process: save and exit, resumable
            self.finish(step, epoch, lr)
            raise self.stop.preempted(self.accelerator, step, self.output_dir)
        return summary

    def finish(self, step: int, epoch: int, lr: float) -> None:
        """The metrics of the steps since the last line (with ``log_last``) and the checkpoint of ``step``,
        unless they are written already."""
        if self.log_last and step > self.meter.steps:
            self.meter.log(step, epoch, lr)
        if step > self.saved_step:
            self.save(step, epoch)
