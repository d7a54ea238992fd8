"""``mvmr-distill`` and ``mvmr-pretrain``: parse the arguments of :mod:`mvmr_hf.config` and train.

Both commands run the same loop; they differ only in the representations the student is
matched against (paper, eq. 9): distillation has a teacher (and optionally hand-crafted
descriptors), pretraining the five hand-crafted descriptors of the paper (section 7). ``--help``
documents every flag and a run can come from a JSON or YAML file::

    mvmr-distill --dataset ./digits --output-dir runs/kd --student resnet18 --batch-size 64
    mvmr-pretrain run.yaml --max-steps 100       # the file's values, then the flags, win
    mvmr-distill --config runs/kd/training_args.json --resume
"""

from __future__ import annotations

from collections.abc import Sequence

from mvmr_hf import config
from mvmr_hf.cli import parse_arguments, run_cli
from mvmr_hf.config import (
    DataArguments,
    DistillDataArguments,
    DistillLossArguments,
    DistillModelArguments,
    DistillTrainingArguments,
    LossArguments,
    PretrainModelArguments,
    TeacherArguments,
    TrainingArguments,
)
from mvmr_hf.training.loop import train
from mvmr_hf.utils import deprecated_alias

__all__ = ["distill_main", "pretrain_main"]


DISTILL_GROUPS = [DistillModelArguments, TeacherArguments, DistillDataArguments, DistillLossArguments,
                  DistillTrainingArguments]  # fmt: skip


def _distill(argv: Sequence[str]) -> None:
    model, teacher, data, loss, training = parse_arguments(
        DISTILL_GROUPS,
        argv,
        prog="mvmr-distill",
        description=distill_main.__doc__,
    )
    train(model, data, loss, training, teacher=teacher)


def _pretrain(argv: Sequence[str]) -> None:
    model, data, loss, training = parse_arguments(
        [PretrainModelArguments, DataArguments, LossArguments, TrainingArguments],
        argv,
        prog="mvmr-pretrain",
        description=pretrain_main.__doc__,
    )
    train(model, data, loss, training)


def distill_main(argv: Sequence[str] | None = None) -> int:
    """mvmr-distill: label-free distillation of a transformers teacher into a timm student (MV-MR)."""
    return run_cli(_distill, argv)


def pretrain_main(argv: Sequence[str] | None = None) -> int:
    """mvmr-pretrain: MV-MR self-supervised pretraining of a timm student with hand-crafted descriptors."""
    return run_cli(_pretrain, argv)


# The arguments lived here before they moved into the library (mvmr_hf.config).
__getattr__ = deprecated_alias(__name__, {name: (config, name) for name in config.__all__})
