"""The run folder (``OUTPUT_DIR``): what a run may find there, and what it writes before training.

:func:`train <mvmr_hf.train>` calls these before and right after building everything: a folder
holding another run's checkpoints is refused unless ``--resume`` or ``--overwrite`` says what to
do with it; ``--resume`` continues only a run trained with the same settings (those in
:data:`CHANGEABLE_ON_RESUME` aside); a ``student/`` folder that is not a release is never
replaced. Only then is the folder written: ``training_args.json`` first.

A run stopped by one of its ``--stop-signals`` saves a checkpoint and then leaves the marker
:data:`PREEMPTED` (``OUTPUT_DIR/PREEMPTED``, written atomically by the main process): JSON naming the
``step``, the ``checkpoint`` folder (relative to ``OUTPUT_DIR``) and the ``signal``. It is the record
a scheduler script reads, since launchers do not keep the run's exit status 75 (``accelerate
launch`` and torchrun exit 1, or 128 + the signal they were sent): ``examples/slurm/distill.sbatch``
requeues the job when it is there. A run that starts or resumes removes it once it holds the
folder's lock, and a run that finishes leaves none.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from mvmr_hf.config import TrainingArguments
from mvmr_hf.config.options import RunArguments
from mvmr_hf.errors import ConfigError
from mvmr_hf.release.export import RELEASE_DIR, TRAINING_ARGS, check_release_target
from mvmr_hf.storage.checkpoint import (
    CHECKPOINTS_DIR,
    checkpoint_path,
    intact_checkpoint,
    list_checkpoints,
    newest_intact_checkpoint,
    remove_partial,
)
from mvmr_hf.storage.lock import FolderLock, check_folder_free
from mvmr_hf.training.metrics import METRICS_FILE
from mvmr_hf.utils import atomic_write_json, is_hub_id, writing

__all__ = [
    "CHANGEABLE_ON_RESUME",
    "LOGS_DIR",
    "PREEMPTED",
    "check_output_dir_free",
    "check_outputs",
    "flat_arguments",
    "flat_defaults",
    "mark_preempted",
    "own_output_dir",
    "prepare_output_dir",
    "resume_point",
]

LOGS_DIR = "logs"
PREEMPTED = "PREEMPTED"
"""The marker a run stopped by a stop signal leaves in its folder once its checkpoint is saved."""
# Arguments that may change when a run is resumed: they do not change what is being trained.
CHANGEABLE_ON_RESUME = frozenset(
    {"resume", "overwrite", "output_dir", "epochs", "max_steps", "num_workers", "checkpoint_every",
     "keep_checkpoints", "log_with", "log_every", "push_to_hub", "cache_teacher", "mixed_precision",
     "channels_last", "compile", "device_views", "decode_on_device", "view_source_size", "finetune_epochs",
     "finetune_max_steps", "finetune_dir"}
)  # fmt: skip


def flat_arguments(*groups: Any) -> dict[str, Any]:
    """All argument dataclasses as one flat mapping: ``training_args.json``, a valid config file."""
    flat: dict[str, Any] = {}
    for group in groups:
        if group is not None:
            flat.update(asdict(group))
    return flat


# What a run did before each of these options existed, which its training_args.json therefore lacks;
# not their defaults, which have changed since (distillation's, README "Quality").
BEFORE_THE_OPTION = {
    "feature_matching_weight": 0.0,
    "teacher_view": "non-augmented",
    "crop_scale": "0.08,1",
}


def flat_defaults(*groups: Any) -> dict[str, Any]:
    """What a saved ``training_args.json`` that lacks an argument ran with, under its name in
    :func:`flat_arguments`: the value from before the option existed (:data:`BEFORE_THE_OPTION`),
    else its default, where it has one."""
    defaults = {
        item.name: item.default
        for group in groups
        if group is not None
        for item in fields(group)
        if item.default is not MISSING
    }
    return {**defaults, **{key: value for key, value in BEFORE_THE_OPTION.items() if key in defaults}}


def resume_point(
    output_dir: Path,
    training_args: RunArguments,
    args: dict[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), after checking the output folder.

    ``defaults`` (:func:`flat_defaults`) stand for the arguments that the run's saved
    ``training_args.json`` lacks: it was written before they existed, so it ran without them.
    """
    if training_args.resume is None:
        if list_checkpoints(output_dir) and not training_args.overwrite:
            raise ConfigError(
                f"{output_dir} holds the checkpoints of another run: pass --resume to continue it, "
                "--overwrite to replace it, or another --output-dir"
            )
        return None
    if training_args.resume == "latest":
        path = newest_intact_checkpoint(output_dir)
    else:
        path = intact_checkpoint(training_args.resume)
    if path is not None:
        _check_same_run(path.parent.parent / TRAINING_ARGS, args, defaults or {})
    return path


def check_outputs(release: Path, training_args: TrainingArguments) -> None:
    """Fail now, not after training, when the release cannot be written or pushed."""
    check_release_target(  # even with --overwrite
        release, "the trained student could not be written there; move it away or choose another --output-dir"
    )
    if training_args.push_to_hub and not is_hub_id(training_args.push_to_hub):
        raise ConfigError(
            f"--push-to-hub {training_args.push_to_hub!r} is not a Hub repository id: write user/name"
        )


def _check_same_run(saved_args: Path, args: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    if not saved_args.is_file():
        return
    saved = {**defaults, **json.loads(saved_args.read_text())}  # a key the file lacks: its default
    changed = [
        f"{key}: {saved[key]!r} -> {args[key]!r}"
        for key in sorted(args.keys() & saved.keys() - CHANGEABLE_ON_RESUME)
        if saved[key] != args[key]
    ]
    if changed:
        raise ConfigError(
            f"--resume continues a run trained with other settings ({'; '.join(changed)}): resume with the "
            "run's own settings (pass its training_args.json) or start a new run"
        )


def _agree(accelerator: Accelerator, action: Callable[[], None] | None) -> None:
    """Run ``action`` on the main process; a ConfigError it raises is raised on every process."""
    message = None
    if action is not None:
        try:
            action()
        except ConfigError as error:
            message = str(error)
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message:
        raise ConfigError(message)


def check_output_dir_free(accelerator: Accelerator, output_dir: Path) -> None:
    """Refuse, on every process, an output folder that another run holds (creates nothing)."""
    _agree(accelerator, (lambda: check_folder_free(output_dir)) if accelerator.is_main_process else None)


@contextmanager
def own_output_dir(accelerator: Accelerator, output_dir: Path) -> Iterator[None]:
    """Hold the output folder's lock (:mod:`mvmr_hf.storage.lock`) for the block.

    From the main process only.
    """
    lock = FolderLock(output_dir) if accelerator.is_main_process else None
    _agree(accelerator, lock.acquire if lock is not None else None)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def prepare_output_dir(
    accelerator: Accelerator,
    output_dir: Path,
    args: dict[str, Any],
    training_args: RunArguments,
    resume_from: Path | None,
    *,
    release_dir: str = RELEASE_DIR,
) -> None:
    """Clear a previous run on --overwrite, drop unfinished checkpoints and a previous stop's PREEMPTED
    marker, write training_args.json.

    ``release_dir`` names the folder a run releases its model in, which --overwrite deletes.

    Call it on every process: the main process does the work, the others wait for it.

    Args:
        accelerator: the run's ``Accelerator``.
        output_dir: the run folder; created if missing.
        args: the run's flat arguments (:func:`flat_arguments`), written as ``training_args.json``.
        training_args: the arguments whose ``overwrite`` deletes the previous run's checkpoints,
            release folder, logs and metrics.
        resume_from: the checkpoint the run resumes from (:func:`resume_point`); None: a fresh start,
            which also deletes the previous metrics file.
        release_dir: the folder, in ``output_dir``, that the run releases its model in.
    """
    if accelerator.is_main_process:
        if training_args.overwrite:
            for name in (CHECKPOINTS_DIR, release_dir, LOGS_DIR):
                shutil.rmtree(output_dir / name, ignore_errors=True)
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / PREEMPTED).unlink(missing_ok=True)  # a previous stop's: this run goes on
        remove_partial(output_dir)
        if resume_from is None:
            (output_dir / METRICS_FILE).unlink(missing_ok=True)
        with writing(TRAINING_ARGS, output_dir):
            atomic_write_json(output_dir / TRAINING_ARGS, args)
    accelerator.wait_for_everyone()


def mark_preempted(accelerator: Accelerator, output_dir: Path, *, step: int, signal: str | None) -> None:
    """Write ``OUTPUT_DIR/PREEMPTED`` for the saved checkpoint of ``step``; call it on every process.

    The main process writes it atomically; no process returns before it is there, so a launcher or a
    scheduler that ends the job as soon as one process exits still finds it.
    """
    if accelerator.is_main_process:
        marker = {
            "step": step,
            "checkpoint": checkpoint_path(output_dir, step).relative_to(output_dir).as_posix(),
            "signal": signal,
        }
        with writing(PREEMPTED, output_dir):
            atomic_write_json(output_dir / PREEMPTED, marker)
    accelerator.wait_for_everyone()
