"""The networks: the student (a timm backbone and its projector, :mod:`.student`), the frozen
representations it learns from (:mod:`.representations`: the hand-crafted ones and the teachers),
timm's Hub folder format (:mod:`.timm_folder`) and teachers written offline for the demo, tests and
benchmarks (:mod:`.tiny_models`, :mod:`.efficientnet_lite`).
"""

from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.representations.teacher import Teacher, load_teacher, loading_errors
from mvmr_hf.models.student import (
    Student,
    StudentOutput,
    build_projector,
    build_student,
    feature_width,
    parse_projector_spec,
)
from mvmr_hf.models.timm_folder import write_timm_config
from mvmr_hf.models.tiny_models import save_tiny_teacher

__all__ = [
    "Student",
    "StudentOutput",
    "Teacher",
    "build_projector",
    "build_student",
    "feature_width",
    "load_teacher",
    "loading_errors",
    "parse_projector_spec",
    "save_efficientnet_lite",
    "save_tiny_teacher",
    "write_timm_config",
]
