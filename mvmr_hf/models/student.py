"""The student: any `timm` backbone followed by the MV-MR projector (paper section 7).

The encoder gives the pooled features used downstream (linear probe, kNN, export); the projector
maps them to the embedding ``z`` that the objective sees (eq. 4-10)::

    student = build_student("resnet50", projector="8192-8192-8192")
    out = student(images01)          # images in [0, 1], (B, 3, H, W)
    out.features                     # (B, 2048) pooled backbone features
    out.embedding                    # (B, 8192) projector output, z in the paper

**Projector spec** ``"8192-8192-8192"``: one block ``Linear(bias=False) - BatchNorm1d - ReLU`` per
size but the last, then a plain ``Linear``, as in the paper's section 7 and its reference code. No
Linear has a bias: the ones before a BatchNorm would have it cancelled by the normalization, and
the last one would get no gradient, since every term of the objective is unchanged when z and z̃
are shifted by the same vector (the MSE of eq. 4 sees their difference, the variance of eq. 5-6
and distance correlation of eq. 8-9 are translation invariant). ``"none"`` (or ``""``) means no
projector: the embedding is the features.

**Normalization** is the student's own: ``(x - mean) / std`` with the backbone's timm data config
(``timm.data.resolve_model_data_config``), applied on the input's device inside ``forward``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import timm
import torch
from safetensors.torch import load_file
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from mvmr_hf.errors import ConfigError

_SPEC = re.compile(r"\d+(-\d+)*")


class StudentOutput(NamedTuple):
    """What the student returns: pooled backbone ``features`` (B, F) and projector ``embedding`` (B, D)."""

    features: Tensor
    embedding: Tensor


def parse_projector_spec(spec: str) -> list[int]:
    """Layer widths of a projector spec: ``"8192-8192-8192"`` -> ``[8192] * 3``, ``"none"`` -> ``[]``."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return []
    if not _SPEC.fullmatch(text) or any(int(size) == 0 for size in text.split("-")):
        raise ConfigError(
            f"{spec!r} is not a projector spec: use sizes joined by '-', e.g. 8192-8192-8192, or 'none'"
        )
    return [int(size) for size in text.split("-")]


def build_projector(in_features: int, sizes: Sequence[int]) -> nn.Sequential:
    """``Linear(bias=False)-BatchNorm1d-ReLU`` for every size but the last, then ``Linear(bias=False)``."""
    layers: list[nn.Module] = []
    for i, size in enumerate(sizes):
        layers.append(nn.Linear(in_features, size, bias=False))
        if i < len(sizes) - 1:
            layers += [nn.BatchNorm1d(size), nn.ReLU(inplace=True)]
        in_features = size
    return nn.Sequential(*layers)


class Student(nn.Module):
    """A timm backbone (``num_classes=0``: it returns pooled features) and a projector.

    Attributes:
        model_name: the timm model name it was built from.
        backbone: the timm model; its forward returns ``(B, feature_dim)`` pooled features.
        projector: the ``nn.Sequential`` of :func:`build_projector` (empty for ``"none"``).
        projector_spec: the spec the projector was built from.
        image_size: the side of the square training input.
        data_config: timm's data config (mean, std, interpolation, crop_pct, input_size), with
            ``input_size`` set to ``(3, image_size, image_size)``.
        mean, std: ``(1, 3, 1, 1)`` buffers used to normalize the ``[0, 1]`` input.

    Args:
        backbone: the timm model built with ``num_classes=0``.
        projector: the projector on the pooled features (:func:`build_projector`).
        model_name: the timm model name the backbone was built from.
        projector_spec: the spec the projector was built from (``"8192-8192-8192"``, ``"none"``).
        data_config: timm's data config; ``input_size`` gives ``image_size``, ``mean`` and ``std``
            the normalisation buffers. Build all of it with :func:`build_student`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        projector: nn.Sequential,
        *,
        model_name: str,
        projector_spec: str,
        data_config: dict,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.model_name = model_name
        self.projector_spec = projector_spec
        self.data_config = data_config
        self.image_size = int(data_config["input_size"][-1])
        self.channels_last = False
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        """F, the width of the pooled backbone features."""
        return feature_width(self.backbone)

    @property
    def embed_dim(self) -> int:
        """D, the width of the embedding (F when there is no projector)."""
        linears = [m for m in self.projector if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else self.feature_dim

    def to_channels_last(self) -> Student:
        """Keep weights and inputs in channels-last memory format (faster convolutions under AMP on GPU)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def forward(self, images01: Tensor) -> StudentOutput:
        """Normalize ``(B, 3, H, W)`` images in ``[0, 1]``, run the backbone, then the projector."""
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ConfigError(
                f"the student takes float images of shape (B, 3, H, W) in [0, 1], got a {images01.dtype} "
                f"tensor of shape {tuple(images01.shape)}: convert the batch first"
            )
        x = (images01 - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        return StudentOutput(features=features, embedding=self.projector(features))


def feature_width(backbone: nn.Module) -> int:
    """Width of a timm model's pooled output with ``num_classes=0``.

    That is ``head_hidden_size``, which differs from ``num_features`` for models with a pre-logits
    head (``mobilenetv3_small_050``: 1024 vs 288); ``num_features`` for models without the attribute.
    """
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


def build_student(
    name: str,
    *,
    pretrained: bool = False,
    projector: str = "8192-8192-8192",
    image_size: int | None = None,
    drop_path_rate: float = 0.0,
    checkpoint_path: str | None = None,
) -> Student:
    """Build a :class:`Student` from a timm model name.

    Args:
        name: a timm model name (``timm.list_models()``), with an optional pretrained tag
            (``resnet50.a1_in1k``), or a ``hf-hub:`` / ``local-dir:`` location timm understands.
        pretrained: load timm's pretrained weights (downloaded from the Hub).
        projector: the projector spec, see the module docstring.
        image_size: side of the square training input; fixed-size models (ViT, Swin, ...) are built
            for it. Default: the model's pretrained input size.
        drop_path_rate: stochastic depth rate, in ``[0, 1)``.
        checkpoint_path: a local ``.safetensors`` file with the backbone's weights (timm keys; a
            classifier is ignored; a training checkpoint's ``backbone.*`` keys are used too). Loaded
            strictly: a missing or unexpected weight is an error.

    Raises:
        ConfigError: unknown model, bad spec or size, unreachable weights, or a checkpoint that does
            not fit the model.
    """
    sizes = parse_projector_spec(projector)
    _check_name(name)
    if image_size is not None and image_size < 1:
        raise ConfigError(
            f"image_size {image_size} is not a size: pass a positive number of pixels, e.g. 224"
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ConfigError(f"drop_path_rate {drop_path_rate} is out of range: use a value in [0, 1), e.g. 0.1")
    if pretrained and checkpoint_path is not None:
        raise ConfigError(
            "pass either pretrained=True or checkpoint_path, not both: the checkpoint replaces timm's weights"
        )
    backbone = _create(name, pretrained=pretrained, image_size=image_size, drop_path_rate=drop_path_rate)
    if checkpoint_path is not None:
        _load_checkpoint(backbone, name, checkpoint_path)
    data_config = dict(resolve_model_data_config(backbone))
    if image_size is not None:
        data_config["input_size"] = (3, image_size, image_size)
    return Student(
        backbone,
        build_projector(feature_width(backbone), sizes),
        model_name=name,
        projector_spec=projector,
        data_config=data_config,
    )


def _check_name(name: str) -> None:
    if ":" in name or timm.is_model(name):  # hf-hub: / local-dir: locations are resolved by timm
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
    raise ConfigError(f"unknown timm model {name!r}: {hint}")


def _create(name: str, *, pretrained: bool, image_size: int | None, drop_path_rate: float) -> nn.Module:
    kwargs: dict = {"num_classes": 0}
    config = None if ":" in name else timm.models.get_pretrained_cfg(name)
    if image_size is not None and config is not None and config.fixed_input_size:
        kwargs["img_size"] = image_size
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as error:
        if not pretrained:  # no weights asked for: what failed is the config a hf-hub: / local-dir: names
            raise ConfigError(
                f"could not read the timm model that {name!r} names (a local-dir: folder without "
                "config.json, or a hf-hub: repository that is unknown, private or unreachable offline): "
                "check the location, or pass a timm model name"
            ) from error
        raise ConfigError(
            f"could not get the weights of timm model {name!r} (offline, no network or no access): pass "
            "checkpoint_path (--checkpoint-path) with a local .safetensors file, or pretrained=False"
        ) from error
    except RuntimeError as error:
        if "No pretrained weights" in str(error):
            raise ConfigError(
                f"timm model {name!r} has no pretrained weights: use pretrained=False or checkpoint_path"
            ) from error
        raise
    except TypeError as error:  # e.g. VGG, DenseNet and DLA take no drop_path_rate
        setting = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "num_classes")
        raise ConfigError(
            f"timm cannot build {name!r} with {setting}: {error}; leave that setting out for this model"
        ) from error


def _load_checkpoint(backbone: nn.Module, name: str, checkpoint_path: str) -> None:
    path = Path(checkpoint_path).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        raise ConfigError(
            f"checkpoint_path {checkpoint_path!r} is not an existing .safetensors file: pass one"
        )
    weights = load_file(path)
    if any(key.startswith("backbone.") for key in weights):  # a training checkpoint of a whole Student
        weights = {
            key.removeprefix("backbone."): v for key, v in weights.items() if key.startswith("backbone.")
        }
    classifiers = backbone.pretrained_cfg.get("classifier") or ()
    for classifier in (classifiers,) if isinstance(classifiers, str) else classifiers:
        weights.pop(f"{classifier}.weight", None)
        weights.pop(f"{classifier}.bias", None)
    try:
        missing, unexpected = backbone.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shapes differ
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise ConfigError(
            f"checkpoint {checkpoint_path!r} does not fit timm model {name!r} ({detail}): pass weights of "
            "this architecture, saved at the same image_size"
        ) from error
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {checkpoint_path!r} does not fit timm model {name!r}: {len(missing)} missing "
            f"weights {missing[:2]} and {len(unexpected)} unexpected {unexpected[:2]}; pass weights of this "
            "architecture"
        )
