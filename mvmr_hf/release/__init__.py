"""A trained student as a release: the folder (:mod:`.export`), its model card (:mod:`.card`, template
in ``templates/``), the alignment head to a teacher's embedding space (:mod:`.align`) and the push to
the Hub (:mod:`.hub`).
"""

from mvmr_hf.release.align import (
    AlignmentFit,
    AlignmentHead,
    AlignmentInfo,
    alignment_teacher,
    fit_alignment,
    load_alignment,
    ridge_solve,
    save_alignment,
)
from mvmr_hf.release.card import (
    BackboneInfo,
    CardInfo,
    hub_id_or_none,
    merge_results,
    read_results,
    render_card,
    results_table,
)
from mvmr_hf.release.export import (
    add_alignment,
    check_release,
    check_release_target,
    export_run,
    export_student,
    is_release,
    load_release,
    load_student,
    published_files,
    read_run_info,
    release_card,
    rewrite_release,
    update_card,
    write_card,
)
from mvmr_hf.release.hub import default_commit_message, push_to_hub

__all__ = [
    "AlignmentFit",
    "AlignmentHead",
    "AlignmentInfo",
    "BackboneInfo",
    "CardInfo",
    "add_alignment",
    "alignment_teacher",
    "check_release",
    "check_release_target",
    "default_commit_message",
    "export_run",
    "export_student",
    "fit_alignment",
    "hub_id_or_none",
    "is_release",
    "load_alignment",
    "load_release",
    "load_student",
    "merge_results",
    "published_files",
    "push_to_hub",
    "read_results",
    "read_run_info",
    "release_card",
    "render_card",
    "results_table",
    "rewrite_release",
    "ridge_solve",
    "save_alignment",
    "update_card",
    "write_card",
]
