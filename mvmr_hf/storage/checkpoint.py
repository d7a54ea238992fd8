"""Resumable training checkpoints: atomic folders, rotation, the latest complete one.

A checkpoint is ``OUTPUT_DIR/checkpoints/step-NNNNNN/`` holding what
``accelerator.save_state`` writes (``model.safetensors`` with the Student's ``backbone.*``
and ``projector.*`` keys, ``model_1.safetensors`` with the feature-matching heads when the run
has them, optimizer, scheduler, gradient scaler, one RNG file per process),
one ``dataloader_rank{r}.json`` per process (the position of that process's data stream)
and ``trainer_state.json`` (step, epoch, number of processes, and under ``files`` every other
file's size and SHA-256, so that a truncated, missing or altered file is found before it is
loaded: :func:`checkpoint_problem`, :func:`newest_intact_checkpoint`). Every process writes into
``step-NNNNNN.tmp``; when all have finished, the main process renames it. A folder without
the ``.tmp`` suffix is therefore complete: a run killed while saving leaves only a ``.tmp``
folder, which the next save of that step or :func:`remove_partial` deletes. The output
folder must be on a file system that every process sees (as for ``accelerate``).

Example::

    >>> save_checkpoint(accelerator, "run", step=1000, epoch=0, loader_state=loader.state_dict(), keep=2)
    >>> state = load_checkpoint(accelerator, latest_checkpoint("run"))
    >>> loader.load_state_dict(state.loader_state)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator, PartialState

from mvmr_hf.errors import ConfigError
from mvmr_hf.utils import PARTIAL_SUFFIX, atomic_write_json, partial_path, replace_folder, sha256_of_files

__all__ = [
    "CHECKPOINTS_DIR",
    "TRAINER_STATE",
    "CheckpointState",
    "checkpoint_path",
    "checkpoint_problem",
    "intact_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_intact_checkpoint",
    "read_trainer_state",
    "remove_partial",
    "rotate_checkpoints",
    "save_checkpoint",
]

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
RUN_INFO = "run_info.json"  # the run's facts, in each checkpoint and in the release
_NAME = re.compile(r"step-(\d{6,})")


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint holds besides the Accelerate state: where the run stood."""

    path: Path
    step: int
    epoch: int
    loader_state: dict[str, Any]


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint after optimizer step ``step``: ``checkpoints/step-NNNNNN``."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and _NAME.fullmatch(path.name) is not None and (path / TRAINER_STATE).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    complete = [path for path in folder.iterdir() if _is_complete(path)]
    return sorted(complete, key=lambda path: int(_NAME.fullmatch(path.name).group(1)))


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file of a checkpoint folder but its trainer state, by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != TRAINER_STATE)
    return {
        file.relative_to(folder).as_posix(): {"bytes": file.stat().st_size, "sha256": sha256_of_files([file])}
        for file in files
    }


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the complete checkpoint ``path`` cannot be used (a file missing, truncated or altered), else None.

    Checkpoints written before the manifest existed have nothing to check against and pass.
    """
    path = Path(path)
    try:
        files = json.loads((path / TRAINER_STATE).read_text()).get("files", {})
    except (OSError, ValueError):
        return f"{TRAINER_STATE} cannot be read"
    for name, record in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != record["bytes"]:
            return f"{name} holds {file.stat().st_size} bytes where {record['bytes']} were written"
        if sha256_of_files([file]) != record["sha256"]:
            return f"{name} does not match the SHA-256 recorded when it was written"
    return None


def newest_intact_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose files are all as written (None when there is no checkpoint).

    Each newer, damaged one is skipped with one line on stderr (from the main process) naming it
    and what is wrong. Raises ConfigError when there are checkpoints but every one is damaged.
    """
    checkpoints = list_checkpoints(output_dir)
    for path in reversed(checkpoints):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if PartialState().is_main_process:
            print(f"skipping checkpoint {path}: {problem}", file=sys.stderr)
    if checkpoints:
        raise ConfigError(
            f"every checkpoint in {Path(output_dir) / CHECKPOINTS_DIR} is damaged (see above): restore one "
            "from a copy, or start again with --overwrite"
        )
    return None


def intact_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` when it is a complete checkpoint whose files are all as written; ConfigError otherwise."""
    path = Path(path)
    read_trainer_state(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(
            f"checkpoint {path} is damaged: {problem}; name another one, or --resume alone for the newest "
            "intact one"
        )
    return path


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None when there is none."""
    complete = list_checkpoints(output_dir)
    return complete[-1] if complete else None


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain; return the deleted."""
    complete = list_checkpoints(output_dir)
    doomed = complete[: max(len(complete) - keep, 0)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def remove_partial(output_dir: str | os.PathLike) -> None:
    """Delete the ``.tmp`` folders that a run killed while saving left behind."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if folder.is_dir():
        for path in folder.glob(f"step-*{PARTIAL_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    *,
    step: int,
    epoch: int,
    loader_state: dict[str, Any],
    keep: int,
    run_info: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state after optimizer step ``step``; call it on every process.

    ``loader_state`` is this process's ``ViewsLoader.state_dict()`` (JSON-serialisable).
    ``run_info`` (the main process's) is the run's facts up to this step (``card.CardInfo`` as a
    dict), kept as ``run_info.json`` so that a release exported from the checkpoint reports them.
    Keeps the newest ``keep`` complete checkpoints. Returns the checkpoint folder.

    Args:
        accelerator: the run's ``Accelerator``; its ``save_state`` writes the state of what it
            prepared (model, optimizer) and the random states.
        output_dir: the run folder; the checkpoint goes to ``checkpoints/step-NNNNNN`` in it, written
            to a ``.tmp`` folder first and renamed once complete.
        step: the optimizer steps taken, which names the folder.
        epoch: the epoch the run is in, recorded in ``trainer_state.json``.
        loader_state: this process's ``ViewsLoader.state_dict()``, saved as
            ``dataloader_rank{process}.json``.
        keep: the newest complete checkpoints kept; older ones are deleted.
        run_info: the run's facts up to this step, written by the main process; None: no
            ``run_info.json``.
    """
    final = checkpoint_path(output_dir, step)
    partial = partial_path(final)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial), safe_serialization=True)
        atomic_write_json(partial / f"dataloader_rank{accelerator.process_index}.json", loader_state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if run_info is not None:
                atomic_write_json(partial / RUN_INFO, run_info)
            state = {"step": step, "epoch": epoch, "num_processes": accelerator.num_processes}
            atomic_write_json(partial / TRAINER_STATE, {**state, "files": _manifest(partial)})
            replace_folder(partial, final)
            rotate_checkpoints(output_dir, keep)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a failed save (a full disk) leaves no partial folder
        raise
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of checkpoint ``path``; ConfigError when it is not a complete checkpoint."""
    path = Path(path)
    if not _is_complete(path):
        raise ConfigError(
            f"{path} is not a complete checkpoint folder (checkpoints/step-NNNNNN with {TRAINER_STATE}): "
            "pass a folder from OUTPUT_DIR/checkpoints, or --resume alone for the latest one"
        )
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except ValueError:
        raise ConfigError(
            f"{path / TRAINER_STATE} is damaged (not JSON): resume from another checkpoint"
        ) from None


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> CheckpointState:
    """Restore model, optimizer, scheduler, scaler and RNG states from ``path`` on every process.

    Returns the step, epoch and this process's data-loader state to continue from. Raises
    ConfigError when ``path`` is not a complete checkpoint or was written by a different
    number of processes (each process's data position only makes sense for that split).
    """
    path = Path(path)
    state = read_trainer_state(path)
    if state["num_processes"] != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {path} was written by {state['num_processes']} processes but this run has "
            f"{accelerator.num_processes}: resume with {state['num_processes']} processes"
        )
    accelerator.load_state(str(path))
    loader_state = json.loads((path / f"dataloader_rank{accelerator.process_index}.json").read_text())
    return CheckpointState(path=path, step=state["step"], epoch=state["epoch"], loader_state=loader_state)
