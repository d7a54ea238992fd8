"""mvmr_hf: label-free, shape-agnostic distillation and MV-MR self-supervised pretraining.

The public API. Light modules (distance correlation, the objective) import eagerly; those
that pull in transformers, datasets or timm import on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from mvmr_hf.errors import ConfigError
from mvmr_hf.loss.dcor import (
    CenteredDistances,
    centered_distances,
    dcor_from_centered,
    distance_correlation,
    gather_no_grad,
    gather_with_grad,
)
from mvmr_hf.loss.objective import FeatureMatching, LossOutput, MVMRLoss

__version__ = "0.1.0"

_LAZY = {
    # views and representations
    "ViewAugment": "mvmr_hf.data",
    "center_view": "mvmr_hf.data",
    "build_representation": ("mvmr_hf.models.representations", "build"),
    "available_representations": ("mvmr_hf.models.representations", "available"),
    "register_representation": ("mvmr_hf.models.representations", "register"),
    "Representation": "mvmr_hf.models.representations",
    "load_teacher": "mvmr_hf.models",
    "Teacher": "mvmr_hf.models",
    # student
    "Student": "mvmr_hf.models",
    "StudentOutput": "mvmr_hf.models",
    "build_student": "mvmr_hf.models",
    "parse_projector_spec": "mvmr_hf.models",
    # data
    "load_image_dataset": "mvmr_hf.data",
    "build_dataloader": "mvmr_hf.data",
    "default_num_workers": "mvmr_hf.data",
    "write_digits": "mvmr_hf.data",
    "write_digit_pairs": "mvmr_hf.data",
    "save_tiny_teacher": "mvmr_hf.models",
    # training
    "train": "mvmr_hf.training",
    "TrainingError": "mvmr_hf.errors",
    "ModelArguments": "mvmr_hf.config",
    "PretrainModelArguments": "mvmr_hf.config",
    "TeacherArguments": "mvmr_hf.config",
    "TeacherSpec": "mvmr_hf.config",
    "DataArguments": "mvmr_hf.config",
    "DistillDataArguments": "mvmr_hf.config",
    "DistillLossArguments": "mvmr_hf.config",
    "DistillModelArguments": "mvmr_hf.config",
    "DistillTrainingArguments": "mvmr_hf.config",
    "LossArguments": "mvmr_hf.config",
    "TrainingArguments": "mvmr_hf.config",
    # release and evaluation
    "export_student": "mvmr_hf.release",
    "export_run": "mvmr_hf.release",
    "load_release": "mvmr_hf.release",
    "load_student": "mvmr_hf.release",
    "update_card": "mvmr_hf.release",
    "render_card": "mvmr_hf.release",
    "push_to_hub": "mvmr_hf.release",
    "fit_alignment": "mvmr_hf.release",
    "load_encoder": "mvmr_hf.evaluation",
    "extract_features": "mvmr_hf.evaluation",
    "evaluate": "mvmr_hf.evaluation",
    "linear_probe": "mvmr_hf.evaluation",
    "knn_classify": "mvmr_hf.evaluation",
    "multilabel_probe": "mvmr_hf.evaluation",
    "mean_average_precision": "mvmr_hf.evaluation",
    "zero_shot": "mvmr_hf.evaluation",
    "finetune": "mvmr_hf.evaluation",
    "labelled_subset": "mvmr_hf.evaluation",
    "FinetuneArguments": "mvmr_hf.config",
    "save_efficientnet_lite": "mvmr_hf.models",
}

__all__ = [
    "CenteredDistances",
    "ConfigError",
    "FeatureMatching",
    "LossOutput",
    "MVMRLoss",
    "centered_distances",
    "dcor_from_centered",
    "distance_correlation",
    "gather_no_grad",
    "gather_with_grad",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'mvmr_hf' has no attribute {name!r}")
    module_name, attribute = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module_name), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
