"""The arguments of every command, as dataclasses: their defaults, ``--help`` texts and checks.

They are the library's configuration, not the command line's: :func:`mvmr_hf.train` takes the
training groups, and :mod:`mvmr_hf.cli` only parses ``argv`` into them (transformers'
``HfArgumentParser`` turns each field into a flag, its ``help`` metadata into the ``--help``
text). Each ``__post_init__`` checks what can be checked without data or models, so a bad value
is reported, as a :class:`~mvmr_hf.errors.ConfigError` naming the flag, before anything runs.
Every comma-list option takes :class:`CommaListAction`: given several times, it means all of its lists.
The lists that training reads are parsed once, in ``__post_init__``, into typed attributes
(``handcrafted_names``, ``weights``, ``trackers``, ``teachers()``, ``signals()``); the fields keep the
text that ``training_args.json`` records. A command's own defaults are a preset (``options.preset``) of
the same fields, not new ones, and training and fine-tuning share their run options (checkpoints,
restarts, precision, stop signals) through ``options.RunArguments``.

Training (``mvmr-distill`` / ``mvmr-pretrain``): :class:`ModelArguments` (or :class:`DistillModelArguments`,
:class:`PretrainModelArguments`), :class:`TeacherArguments` (distillation only),
:class:`DataArguments` (or :class:`DistillDataArguments`), :class:`LossArguments` and
:class:`TrainingArguments` (or :class:`DistillTrainingArguments`). Release: :class:`ExportArguments`,
:class:`EvaluateArguments`, :class:`AlignArguments`, :class:`PushArguments`, and
:class:`EvalDataArguments` for the images of ``mvmr-evaluate`` and ``mvmr-align``.
"""

from __future__ import annotations

from mvmr_hf.config.options import (
    DEFAULT_FEATURE_MATCHING_WEIGHT,
    PAPER_REPRESENTATIONS,
    CommaListAction,
    TeacherSpec,
    check_label_fraction,
    parse_names,
    parse_signals,
    parse_weights,
)
from mvmr_hf.config.release_args import (
    DEFAULT_CACHE,
    AlignArguments,
    EvalDataArguments,
    EvaluateArguments,
    ExportArguments,
    FinetuneArguments,
    PushArguments,
)
from mvmr_hf.config.train_args import (
    DEFAULT_DISTILL_DATASET,
    DataArguments,
    DistillDataArguments,
    DistillModelArguments,
    DistillTrainingArguments,
    LossArguments,
    ModelArguments,
    PretrainModelArguments,
    TeacherArguments,
    TrainingArguments,
    teacher_specs,
)
from mvmr_hf.config.train_args import (
    DistillLossArguments as DistillLossArguments,  # public, but not among cli.train's deprecated aliases
)

__all__ = [
    "DEFAULT_CACHE",
    "DEFAULT_DISTILL_DATASET",
    "DEFAULT_FEATURE_MATCHING_WEIGHT",
    "PAPER_REPRESENTATIONS",
    "AlignArguments",
    "CommaListAction",
    "DataArguments",
    "DistillDataArguments",
    "DistillModelArguments",
    "DistillTrainingArguments",
    "EvalDataArguments",
    "EvaluateArguments",
    "ExportArguments",
    "FinetuneArguments",
    "LossArguments",
    "ModelArguments",
    "PretrainModelArguments",
    "PushArguments",
    "TeacherArguments",
    "TeacherSpec",
    "TrainingArguments",
    "check_label_fraction",
    "parse_names",
    "parse_signals",
    "parse_weights",
    "teacher_specs",
]
