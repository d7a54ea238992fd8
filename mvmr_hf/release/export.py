"""The release folder: a trained student as timm / transformers load it, plus its heads and card.

``export_student`` writes, atomically (built in a temporary folder next to the target, then
renamed over it, so a failure never leaves a half-written or destroyed release):

=========================== ====================================================================
``config.json``             timm's Hub config (``architecture``, ``num_features``, ``model_args``,
                            ``pretrained_cfg`` with the trained input size, interpolation, crop
                            and mean/std); ``transformers`` reads it as a ``TimmWrapperConfig``
``model.safetensors``       the backbone's state dict (timm keys, no classifier)
``projector.safetensors``   the projector's state dict, described by ``projector.json``, so that
                            training can continue (:func:`load_student`)
``alignment.safetensors``   optional alignment head (:mod:`mvmr_hf.release.align`), ``alignment.json``
``training_args.json``      every argument of the run
``run_info.json``           the run facts the card reports (:class:`~mvmr_hf.release.card.CardInfo`)
``README.md``               the model card (:mod:`mvmr_hf.release.card`)
=========================== ====================================================================

Only safetensors and JSON: nothing is pickled and nothing needs ``trust_remote_code``.
The folder loads with ``timm.create_model("local-dir:FOLDER", pretrained=True)``, with
``transformers.AutoModel.from_pretrained(FOLDER)`` and ``AutoImageProcessor.from_pretrained(FOLDER)``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, is_dataclass, replace
from math import prod
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import EvalResult
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mvmr_hf.data.augment import CENTER_CROP_FRACTION
from mvmr_hf.errors import ConfigError
from mvmr_hf.models.student import Student, build_student
from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS, write_timm_config
from mvmr_hf.release.align import AlignmentFit, load_alignment, save_alignment
from mvmr_hf.release.card import BackboneInfo, CardInfo, merge_results, read_results, render_card
from mvmr_hf.storage.checkpoint import (
    RUN_INFO,
    intact_checkpoint,
    newest_intact_checkpoint,
    read_trainer_state,
)
from mvmr_hf.storage.lock import hold_folder
from mvmr_hf.utils import atomic_folder, writing

PROJECTOR_WEIGHTS = "projector.safetensors"
PROJECTOR_CONFIG = "projector.json"
TRAINING_ARGS = "training_args.json"
CARD = "README.md"
RELEASE_DIR = "student"
# Source-checkpoint metadata that no longer describes trained weights.
_STALE_PRETRAINED_KEYS = ("tag", "license", "origin_url", "paper_ids", "paper_name", "notes")


def is_release(folder: Path) -> bool:
    """Whether ``folder`` holds a timm-format release (``config.json`` with ``pretrained_cfg``)."""
    config = folder / CONFIG
    return config.is_file() and "pretrained_cfg" in json.loads(config.read_text())


def check_release_target(folder: Path, fix: str) -> None:
    """ConfigError when ``folder`` holds files but no release: writing a release there would delete them."""
    if folder.exists() and any(folder.iterdir()) and not is_release(folder):
        raise ConfigError(f"{folder} exists and is not a release folder: {fix}")


def check_release(folder: str | os.PathLike) -> Path:
    """``folder`` as a Path when it is a release folder; ConfigError saying what is missing otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"release folder {folder} does not exist: pass the student/ folder of a training run."
        )
    if not is_release(folder) or not (folder / WEIGHTS).is_file():
        raise ConfigError(
            f"{folder} is not a release folder (it needs {CONFIG} in timm format and {WEIGHTS}): "
            "write one with `mvmr-export RUN_OR_CHECKPOINT`."
        )
    return folder


@contextmanager
def rewrite_release(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a copy of the release ``folder`` to modify; it replaces ``folder`` atomically on success.

    Files are hard-linked where the file system allows (a release's files are only ever replaced,
    never modified in place), so large weights are not copied. A release inside a run folder is
    rewritten under the run's lock (:mod:`mvmr_hf.storage.lock`): never while that run writes it.
    """
    folder = check_release(folder)
    run = folder.parent if (folder.parent / TRAINING_ARGS).is_file() else None
    with (
        hold_folder(run) if run is not None else nullcontext(),
        writing("the release", folder),
        atomic_folder(folder) as work,
    ):
        for path in folder.iterdir():
            try:
                os.link(path, work / path.name)
            except OSError:
                shutil.copy2(path, work / path.name)
        yield work


def _timm_config(backbone: nn.Module, path: Path, image_size: int, data_config: Mapping[str, Any]) -> None:
    """Write timm's ``config.json`` for ``backbone`` trained at ``image_size``.

    The preprocessing recorded is the one the student was trained with: the non-augmented view
    of :func:`~mvmr_hf.data.augment.center_view` (shorter side resized to ``image_size / crop_pct``
    with an antialiased bilinear filter, centre crop, ``crop_pct`` =
    :data:`~mvmr_hf.data.augment.CENTER_CROP_FRACTION`) and the student's mean/std
    from ``data_config``. Metadata of the source checkpoint (tag, licence, paper) no longer
    describes trained weights and is dropped.
    """
    preprocessing = {
        "input_size": (3, image_size, image_size),
        "interpolation": "bilinear",
        "crop_pct": CENTER_CROP_FRACTION,
        "crop_mode": "center",
        "mean": tuple(data_config["mean"]),
        "std": tuple(data_config["std"]),
    }
    config = write_timm_config(backbone, path, preprocessing)
    for key in _STALE_PRETRAINED_KEYS:
        config["pretrained_cfg"].pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _state_dict_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``module``'s state dict that safetensors can save (no shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _json_text(content: Any) -> str:
    return json.dumps(content, indent=2, default=str) + "\n"


def _write_json(path: Path, content: Any) -> None:
    path.write_text(_json_text(content))


def _as_dict(training_args: Any) -> dict[str, Any]:
    if training_args is None:
        return {}
    if is_dataclass(training_args) and not isinstance(training_args, type):
        return asdict(training_args)
    return dict(training_args)


def export_student(
    student: Student,
    folder: str | os.PathLike,
    *,
    training_args: Mapping[str, Any] | Any = None,
    alignment: AlignmentFit | None = None,
    card_info: CardInfo | None = None,
) -> Path:
    """Write the release folder of ``student`` (see the module docstring) atomically; return it.

    Args:
        student: a :class:`~mvmr_hf.models.student.Student` (timm backbone + projector).
        folder: the release folder; an existing release there is replaced, any other existing
            non-empty folder is refused (ConfigError) rather than deleted.
        training_args: the run's arguments (a dataclass or a mapping), written to ``training_args.json``.
        alignment: a fitted alignment head; it needs ``training_args`` naming the ``teacher``.
        card_info: run facts for the card (step, hardware, time, command, Hub id).
    """
    folder = Path(folder)
    check_release_target(folder, "choose an empty or new folder for the release.")
    args = _as_dict(training_args)
    if alignment is not None and not args.get("teacher"):
        raise ConfigError("an alignment head needs training_args naming the teacher it maps to.")
    info = card_info or CardInfo()
    backbone = student.backbone
    with writing("the release", folder), atomic_folder(folder) as work:
        save_file(_state_dict_tensors(backbone), work / WEIGHTS, metadata={"format": "pt"})
        _timm_config(backbone, work / CONFIG, student.image_size, student.data_config)
        save_file(_state_dict_tensors(student.projector), work / PROJECTOR_WEIGHTS, metadata={"format": "pt"})
        _write_json(
            work / PROJECTOR_CONFIG,
            {
                "student": student.model_name,
                "spec": student.projector_spec,
                "image_size": student.image_size,
                "in_features": student.feature_dim,
                "description": "state dict of Student.projector (nn.Sequential); input: backbone features",
            },
        )
        if alignment is not None:
            save_alignment(
                alignment, work, teacher=args["teacher"], teacher_output=args.get("teacher_output", "auto")
            )
        _write_json(work / TRAINING_ARGS, args)
        _write_json(work / RUN_INFO, asdict(info))
        write_card(work)
    return folder


def _count_parameters(weights: Path) -> int:
    """Number of values in the weights file, without the BatchNorm running statistics."""
    skip = ("running_mean", "running_var", "num_batches_tracked")
    with safe_open(str(weights), framework="pt") as f:
        return sum(prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(skip))  # noqa: SIM118


def stored_run_info(folder: str | os.PathLike) -> CardInfo | None:
    """The run facts (step, hardware, time, command, Hub id) a release or a checkpoint keeps in
    ``run_info.json``; None where it keeps none."""
    path = Path(folder) / RUN_INFO
    return CardInfo(**json.loads(path.read_text())) if path.is_file() else None


def read_run_info(folder: str | os.PathLike) -> CardInfo:
    """The run facts a student release keeps in ``run_info.json`` (:func:`stored_run_info`).

    Raises:
        ConfigError: the folder has none, so it is not a student release (a fine-tuned classifier
            folder, for one, has no run facts or student card to publish).
    """
    info = stored_run_info(folder)
    if info is None:
        raise ConfigError(
            f"{folder} has no {RUN_INFO}: it is not a student release written by mvmr-distill, mvmr-pretrain "
            f"or mvmr-export (a fine-tuned classifier folder is published as it is with `hf upload ORG/NAME "
            f"{folder}`)"
        )
    return info


def release_card(folder: Path, results: Sequence[EvalResult] = (), *, info: CardInfo | None = None) -> str:
    """The card of the release ``folder``, rendered from its files, ``results`` and ``info``.

    ``info`` defaults to the folder's ``run_info.json``.
    """
    config = json.loads((folder / CONFIG).read_text())
    projector = json.loads((folder / PROJECTOR_CONFIG).read_text())
    backbone = BackboneInfo(
        architecture=config["architecture"],
        num_params=_count_parameters(folder / WEIGHTS),
        num_features=projector["in_features"],
        image_size=config["pretrained_cfg"]["input_size"][-1],
    )
    alignment = load_alignment(folder)
    return render_card(
        backbone=backbone,
        training_args=json.loads((folder / TRAINING_ARGS).read_text()),
        info=info or read_run_info(folder),
        projector=projector["spec"],
        alignment=asdict(alignment[1]) if alignment else None,
        results=results,
    )


def write_card(folder: str | os.PathLike, results: Sequence[EvalResult] = ()) -> None:
    """Render ``README.md`` of the release ``folder`` from its files and ``results``."""
    (Path(folder) / CARD).write_text(release_card(Path(folder), results))


def published_files(folder: Path, repo_id: str) -> dict[str, Path | bytes]:
    """The files of the release ``folder`` as they are published to the Hub repository ``repo_id``.

    ``run_info.json`` and the card name ``repo_id`` (the card's loading snippets, whatever Hub id,
    if any, the run was exported for); the card keeps its results. The others are the folder's own.
    The folder itself is left as it is.
    """
    info = replace(read_run_info(folder), repo_id=repo_id)
    files: dict[str, Path | bytes] = {path.name: path for path in sorted(folder.iterdir()) if path.is_file()}
    files[RUN_INFO] = _json_text(asdict(info)).encode()
    files[CARD] = release_card(folder, read_results(folder / CARD), info=info).encode()
    return files


def update_card(folder: str | os.PathLike, results: Sequence[EvalResult]) -> None:
    """Merge ``results`` into the card's ``model-index`` and re-render the card, atomically."""
    merged = merge_results(read_results(Path(folder) / CARD), results)
    with rewrite_release(folder) as work:
        write_card(work, merged)


def add_alignment(folder: str | os.PathLike, fit: AlignmentFit, *, teacher: str, teacher_output: str) -> None:
    """Store the alignment head ``fit`` in the release ``folder`` and re-render its card, atomically."""
    results = read_results(Path(folder) / CARD)
    with rewrite_release(folder) as work:
        save_alignment(fit, work, teacher=teacher, teacher_output=teacher_output)
        write_card(work, results)


def _find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder (its latest checkpoint) or a checkpoint folder."""
    if (path / TRAINING_ARGS).is_file():
        checkpoint = newest_intact_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(
                f"run folder {path} has no complete checkpoint: train longer or pass another run."
            )
        return path, checkpoint
    run = path.parent.parent
    if not (run / TRAINING_ARGS).is_file():
        raise ConfigError(
            f"{path} is neither a run folder (with {TRAINING_ARGS}) "
            "nor one of its checkpoints/step-NNNNNN folders."
        )
    return run, intact_checkpoint(path)


def export_run(
    checkpoint_or_run: str | os.PathLike, folder: str | os.PathLike | None = None, *, overwrite: bool = False
) -> Path:
    """Export a training checkpoint as a release folder; return the folder.

    ``checkpoint_or_run`` is a run's output directory (its latest complete checkpoint is used)
    or one of its ``checkpoints/step-NNNNNN`` folders. The student is rebuilt from the run's
    ``training_args.json`` and loaded from the checkpoint's ``model.safetensors``; the card reports
    the run's facts the checkpoint kept (hardware, time, command, teachers). ``folder`` defaults to
    ``RUN/student``; a release already there is replaced only with ``overwrite``, since what was
    added to it after training (the card's evaluation results, an alignment head) goes with it.
    """
    path = Path(checkpoint_or_run)
    if not path.is_dir():
        raise ConfigError(f"{path} does not exist: pass a run's output directory or one of its checkpoints.")
    run, checkpoint = _find_checkpoint(path)
    target = Path(folder) if folder is not None else run / RELEASE_DIR
    if is_release(target) and not overwrite:
        raise ConfigError(
            f"{target} already holds a release: pass --overwrite to replace it (its card's evaluation "
            "results and any alignment head go with it), or --output-dir for another folder."
        )
    with hold_folder(run):  # never while the run trains: it writes its own release and rotates checkpoints
        step = read_trainer_state(checkpoint)["step"]
        args = json.loads((run / TRAINING_ARGS).read_text())
        student = build_student(args["student"], projector=args["projector"], image_size=args["image_size"])
        missing, unexpected = student.load_state_dict(load_file(checkpoint / WEIGHTS), strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint {checkpoint} does not match the student of {run / TRAINING_ARGS} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}): pass the checkpoint of this run."
            )
        # Checkpoints written before they kept the run's facts give the step alone.
        info = stored_run_info(checkpoint) or CardInfo(step=step, repo_id=args.get("push_to_hub"))
        return export_student(student.eval(), target, training_args=args, card_info=info)


def load_release(folder: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The release's backbone as a timm model (eval mode) and its timm data config."""
    folder = check_release(folder)
    model = timm.create_model(f"local-dir:{folder.absolute()}", pretrained=True).eval()
    return model, timm.data.resolve_model_data_config(model)


def load_student(folder: str | os.PathLike) -> Student:
    """Rebuild the :class:`~mvmr_hf.models.student.Student` (backbone + projector) of a release.

    What a distillation trains on when it starts from a release.
    """
    folder = check_release(folder)
    projector = json.loads((folder / PROJECTOR_CONFIG).read_text())
    student = build_student(
        projector["student"],
        projector=projector["spec"],
        image_size=projector["image_size"],
        checkpoint_path=str(folder / WEIGHTS),
    )
    student.projector.load_state_dict(load_file(folder / PROJECTOR_WEIGHTS))
    return student
