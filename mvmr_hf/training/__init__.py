"""A training run: :func:`train`'s loop (:mod:`.loop`), the run scaffold it shares with fine-tuning
(:mod:`.scaffold`), its output folder (:mod:`.run_folder`), metrics (:mod:`.metrics`) and the teachers'
outputs with their exact cache (:mod:`.teacher_outputs`, :mod:`.teacher_cache`).
"""

from mvmr_hf.training.loop import build_feature_matching, build_representations, train
from mvmr_hf.training.metrics import MetricsLogger, truncate_metrics
from mvmr_hf.training.run_folder import (
    check_output_dir_free,
    check_outputs,
    flat_arguments,
    flat_defaults,
    mark_preempted,
    own_output_dir,
    prepare_output_dir,
    resume_point,
)
from mvmr_hf.training.scaffold import (
    RunScaffold,
    StopRequest,
    build_optimizer,
    find_resume_point,
    resolve_mixed_precision,
)
from mvmr_hf.training.teacher_cache import TeacherCache, cache_folder
from mvmr_hf.training.teacher_outputs import representation_outputs, share_cache, teacher_caches

__all__ = [
    "MetricsLogger",
    "RunScaffold",
    "StopRequest",
    "TeacherCache",
    "build_feature_matching",
    "build_optimizer",
    "build_representations",
    "cache_folder",
    "check_output_dir_free",
    "check_outputs",
    "find_resume_point",
    "flat_arguments",
    "flat_defaults",
    "mark_preempted",
    "own_output_dir",
    "prepare_output_dir",
    "representation_outputs",
    "resolve_mixed_precision",
    "resume_point",
    "share_cache",
    "teacher_caches",
    "train",
    "truncate_metrics",
]
