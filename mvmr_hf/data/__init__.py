"""Streaming ``datasets`` -> decoded, validated images -> the two views of MV-MR.

A batch holds, for each image, the non-augmented view x in ``"image"``, the augmented view x̃
(the paper's augmentation of section 7, or the subset of its steps that ``augmentations`` keeps,
its Table 7 ablation) in ``"augmented"``, both ``uint8 (B, 3, S, S)``, a stable
content key in ``"key"`` (so teacher outputs can be cached exactly) and the count of images
skipped since the previous batch in ``"skipped"``: a bad image is counted, never a crash. With
``device_views`` the workers only decode and resize: instead of ``"augmented"`` a batch carries
each image resized to a square ``"source"`` and the augmentation's random parameters, drawn as
without it, and :meth:`ViewsDataset.augmented_view` makes x̃ batched on the accelerator. How
every image mode is decoded, how the stream is split between processes and workers, and how a
resumed epoch continues where it stopped are specified in ``docs/data.md``.

Example::

    dataset = load_image_dataset("uoft-cs/cifar10", split="train")          # streaming
    loader, stats = build_dataloader(dataset, image_size=224, batch_size=256,
                                     rank=rank, world_size=world_size, num_workers=8)
    for epoch in range(epochs):
        loader.dataset.set_epoch(epoch)
        for batch in loader:   # {"image": (B,3,S,S) uint8, "augmented": ..., "key": [...], "skipped": int}
            augmented = loader.dataset.augmented_view(batch, device)   # x̃, float in [0, 1]

Modules: :mod:`.augment` (the paper's view augmentation, batched), :mod:`.loading` (data sets and
their images), :mod:`.decode`, :mod:`.views` (the workers' side), :mod:`.loader` (the training
process's side), :mod:`.sample_data` (offline real images for the demo, tests and benchmarks).
"""

from mvmr_hf.data.augment import (
    ViewAugment,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    center_view,
    check_image_batch,
    gaussian_blur,
    parse_augmentations,
    parse_crop_scale,
)
from mvmr_hf.data.decode import decode_image, decode_on, jpeg_size
from mvmr_hf.data.loader import ViewsLoader, build_dataloader, default_num_workers
from mvmr_hf.data.loading import (
    BadImageError,
    DataStats,
    image_key,
    load_image_dataset,
    read_encoded,
    resolve_image_column,
)
from mvmr_hf.data.sample_data import digit_pairs, write_digit_pairs, write_digits, write_sample_images
from mvmr_hf.data.views import ViewsDataset, default_source_size

__all__ = [
    "BadImageError",
    "DataStats",
    "ViewAugment",
    "ViewParams",
    "ViewsDataset",
    "ViewsLoader",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "build_dataloader",
    "center_view",
    "check_image_batch",
    "decode_image",
    "decode_on",
    "default_num_workers",
    "default_source_size",
    "digit_pairs",
    "gaussian_blur",
    "image_key",
    "jpeg_size",
    "load_image_dataset",
    "parse_augmentations",
    "parse_crop_scale",
    "read_encoded",
    "resolve_image_column",
    "write_digit_pairs",
    "write_digits",
    "write_sample_images",
]
