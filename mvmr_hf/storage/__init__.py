"""What a run keeps on disk and who owns it: atomic, verified checkpoints (:mod:`.checkpoint`) and the
output folder's lock (:mod:`.lock`). Below the release, which exports checkpoints and takes the lock,
and the training, which writes both.
"""

from mvmr_hf.storage.checkpoint import (
    CheckpointState,
    checkpoint_path,
    checkpoint_problem,
    intact_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    read_trainer_state,
    remove_partial,
    rotate_checkpoints,
    save_checkpoint,
)
from mvmr_hf.storage.lock import FolderLock, check_folder_free, hold_folder

__all__ = [
    "CheckpointState",
    "FolderLock",
    "check_folder_free",
    "checkpoint_path",
    "checkpoint_problem",
    "hold_folder",
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
