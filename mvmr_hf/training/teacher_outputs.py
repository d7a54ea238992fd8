"""The representations' outputs for a batch, the teachers' read from their exact caches where held.

One :class:`~mvmr_hf.training.teacher_cache.TeacherCache` per teacher (:func:`teacher_caches`), in a
folder keyed by what its outputs depend on; the loop asks :func:`representation_outputs` for every
representation of a batch, and :func:`share_cache` at the end of an epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from mvmr_hf.config import DataArguments, TeacherArguments
from mvmr_hf.data.augment import CENTER_CROP_FRACTION
from mvmr_hf.models.representations.teacher import Teacher
from mvmr_hf.training.teacher_cache import TeacherCache, cache_folder


def teacher_caches(
    accelerator: Accelerator,
    output_dir: Path,
    teacher: TeacherArguments | None,
    data_args: DataArguments,
    representations: dict[str, nn.Module],
) -> dict[str, TeacherCache]:
    """One exact cache per teacher, in a folder keyed by what its outputs depend on (none without caching).

    A teacher's folder does not depend on the other teachers of the run: adding or removing one
    keeps the others' caches and never reads another teacher's.

    Call it on every process: the main process creates the folders, the others wait for it.

    Args:
        accelerator: the run's ``Accelerator``; its mixed precision is part of the key, and each
            process gets its own cache files.
        output_dir: the run folder; the caches go to ``OUTPUT_DIR/teacher_cache/<hash>``.
        teacher: the teacher arguments; None, or ``cache_teacher`` off, gives no cache.
        data_args: the data set, split, image column and image size, part of the key.
        representations: the run's representations by name; only the :class:`Teacher` ones get a cache.

    Returns:
        One :class:`TeacherCache` per teacher, by name; empty without caching.
    """
    if teacher is None or not teacher.cache_teacher:
        return {}
    return {
        name: _teacher_cache(accelerator, output_dir, representation, data_args)
        for name, representation in representations.items()
        if isinstance(representation, Teacher)
    }


def _teacher_cache(
    accelerator: Accelerator, output_dir: Path, teacher: Teacher, data_args: DataArguments
) -> TeacherCache:
    fingerprint = {
        "teacher": teacher.fingerprint(),
        "mixed_precision": accelerator.mixed_precision,  # the teacher runs under autocast
        "image_size": data_args.image_size,
        "center_crop_fraction": CENTER_CROP_FRACTION,  # the teacher's input is the non-augmented view
        "dataset": data_args.dataset,
        "dataset_config": data_args.dataset_config,
        "split": data_args.split,
        "image_column": data_args.image_column,
    }
    folder = cache_folder(output_dir, fingerprint)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return TeacherCache(folder, rank=accelerator.process_index, fingerprint=fingerprint)


def share_cache(accelerator: Accelerator, cache: TeacherCache) -> None:
    """At the end of an epoch every process writes its cached outputs and reads everyone's."""
    cache.flush()
    accelerator.wait_for_everyone()
    cache.refresh()


@torch.no_grad()
def representation_outputs(
    accelerator: Accelerator,
    representations: dict[str, nn.Module],
    images: Tensor,
    keys: list[str],
    caches: Mapping[str, TeacherCache] | TeacherCache | None = None,
    teacher_images: Tensor | None = None,
) -> dict[str, Tensor]:
    """Every representation of ``images`` (the non-augmented view), in order; the teachers see
    ``teacher_images`` instead when given (``--teacher-view augmented``: the augmented view).

    Each teacher runs under autocast, one after another, or is read from its cache in ``caches``
    (by name) when that holds the batch, and stored in it otherwise; then the hand-crafted
    representations. A single :class:`TeacherCache` is the cache of the teacher named ``teacher``.

    Args:
        accelerator: the run's ``Accelerator``, whose autocast the teachers run under.
        representations: the representations r_k of eq. 9 by name (:func:`build_representations`).
        images: the non-augmented view, float ``(B, 3, H, W)`` in [0, 1] (not normalised), on the
            training device.
        keys: the batch's stable content keys (``batch["key"]``), one per image, which index the caches.
        caches: each teacher's cache by name (:func:`teacher_caches`), or one cache for the teacher
            named ``teacher``; None: no cache.
        teacher_images: what the teachers see instead of ``images``, the same shape and range;
            None: ``images``.

    Returns:
        Each representation's ``(B, ...)`` output by name, in the order of ``representations``.
    """
    if isinstance(caches, TeacherCache):
        caches = {"teacher": caches}
    caches = caches or {}
    seen = images if teacher_images is None else teacher_images
    return {
        name: _teacher_output(accelerator, representation, seen, keys, caches.get(name))
        if isinstance(representation, Teacher)
        else representation(images)
        for name, representation in representations.items()
    }


def _teacher_output(
    accelerator: Accelerator, teacher: nn.Module, images: Tensor, keys: list[str], cache: TeacherCache | None
) -> Tensor:
    """The teacher's output for the batch: read from ``cache`` where it holds it, else computed and stored.

    The teacher runs only on the images the cache lacks: after an epoch that dropped its
    incomplete last batch, the next epoch's shuffled batches each hold a few unseen images, and
    running the teacher on whole batches for them would make the cache useless for that epoch.
    The teacher is in eval mode, so each image's output does not depend on the rest of its batch.
    """
    if cache is None or len(missing := cache.missing(keys)) == len(keys):
        with accelerator.autocast():
            output = teacher(images)
        if cache is not None:
            cache.store(keys, output)
        return output
    absent = set(missing)
    hits = [i for i in range(len(keys)) if i not in absent]
    stored = cache.lookup([keys[i] for i in hits], images.device)
    if not missing:
        return stored
    with accelerator.autocast():
        computed = teacher(images[missing])
    cache.store([keys[i] for i in missing], computed)
    output = stored.new_empty((len(keys), *stored.shape[1:]))
    output[hits] = stored
    output[missing] = computed.to(stored.dtype)
    return output
