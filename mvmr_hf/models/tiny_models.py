"""Tiny, randomly initialised vision models saved like real Hub checkpoints.

Nothing can be downloaded in tests, the offline demo or the quick benchmarks, so they use
these instead of real teachers. Each model has 2 layers of width 32 (the timm ResNet: one
block per stage, widths 8 to 32) and is saved in safetensors together with the
image-processor settings of its real counterpart, scaled to ``image_size``, so that loading
it exercises the same code path as a real checkpoint. The `transformers` models are written
with ``save_pretrained``; the timm models as the Hub's ``timm/...`` folders are (timm's
``config.json``, whose ``pretrained_cfg`` holds the preprocessing, read by
``TimmWrapperConfig`` and ``TimmWrapperImageProcessor``):

========== =================================== ===============================================
kind       saved model                          image processor (real counterpart)
========== =================================== ===============================================
clip       ``CLIPModel`` (vision + text towers, ``CLIPImageProcessor`` + a byte-level
           projections)                         ``CLIPTokenizer`` (openai/clip-vit-base-patch16)
vit        ``ViTModel`` without pooler          ``ViTImageProcessor`` (google/vit-base-patch16-224)
dinov2     ``Dinov2Model``                      ``BitImageProcessor`` (facebook/dinov2-small)
siglip     ``SiglipModel`` (vision + text)      ``SiglipImageProcessor`` (google/siglip-base-patch16-224)
convnext   ``ConvNextModel``                    ``ConvNextImageProcessor`` (facebook/convnext-tiny-224)
timm       timm ``resnet10t`` (widths 8 to 32, ``TimmWrapperImageProcessor`` from ``pretrained_cfg``:
           output stride 8), loaded as          bicubic, ``crop_pct`` 0.875, center crop, mean = std
           ``TimmWrapperModel``                 = 0.5 (timm's default crop, augreg ViTs' stats)
timm_vit   timm ``vit_tiny_patch16_224`` (CLS,  as for ``timm``
           2 register tokens, average pooling
           + ``fc_norm``), ``TimmWrapperModel``
========== =================================== ===============================================

The CLIP folder also holds a tokenizer whose vocabulary is the 256 byte-level symbols (no
merges), so zero-shot classification runs end to end on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.models._hub import save_for_hf
from tokenizers import pre_tokenizers
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    ConvNextConfig,
    ConvNextImageProcessor,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mvmr_hf.errors import ConfigError

WIDTH = 32
LAYERS = 2
HEADS = 2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3
BILINEAR = 2


def _transformer_sizes(image_size: int) -> dict:
    """Shared sizes of the tiny ViT-style towers: 4 x 4 patches whatever the image size."""
    return {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "image_size": image_size,
        "patch_size": image_size // 4,
    }


def _byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte-level symbols (with and without ``</w>``), no merges."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": i + len(symbols) for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _save_clip(folder: Path, size: int) -> None:
    tokenizer = _byte_level_clip_tokenizer()
    text = {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 32,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**_transformer_sizes(size), "projection_dim": 16}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=BICUBIC
    )
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)


def _save_vit(folder: Path, size: int) -> None:
    ViTModel(ViTConfig(**_transformer_sizes(size)), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}, resample=BILINEAR).save_pretrained(folder)


def _save_dinov2(folder: Path, size: int) -> None:
    sizes = _transformer_sizes(size)
    del sizes["intermediate_size"]  # DINOv2 sets its MLP width with mlp_ratio (4 by default)
    Dinov2Model(Dinov2Config(**sizes)).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": round(size * 256 / 224)},
        crop_size={"height": size, "width": size},
        resample=BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(folder)


def _save_siglip(folder: Path, size: int) -> None:
    text = {
        "hidden_size": WIDTH,
        "intermediate_size": 2 * WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "vocab_size": 256,
        "max_position_embeddings": 16,
        "bos_token_id": None,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    SiglipModel(SiglipConfig(text_config=text, vision_config=_transformer_sizes(size))).save_pretrained(
        folder
    )
    SiglipImageProcessor(size={"height": size, "width": size}, resample=BICUBIC).save_pretrained(folder)


def _save_convnext(folder: Path, size: int) -> None:
    config = ConvNextConfig(num_stages=2, hidden_sizes=[WIDTH // 2, WIDTH], depths=[1, 1], image_size=size)
    ConvNextModel(config).save_pretrained(folder)
    ConvNextImageProcessor(
        size={"shortest_edge": size},
        crop_pct=224 / 256,
        resample=BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(folder)


def _save_timm_folder(model: torch.nn.Module, folder: Path, size: int) -> None:
    """Save a timm model as a Hub ``timm/...`` folder that ``TimmWrapperModel`` loads.

    The preprocessing is written into ``pretrained_cfg``. timm's ``save_for_hf`` also records
    ``num_classes`` in ``model_args``, which ``TimmWrapperModel`` (that passes ``num_classes=0``
    itself) rejects, so it is removed, as ``mvmr_hf.release.export`` does for releases.
    """
    data_config = {
        "input_size": (3, size, size),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    save_for_hf(model, str(folder), safe_serialization=True, data_config=data_config)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.get("model_args", {}).pop("num_classes", None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def _save_timm(folder: Path, size: int) -> None:
    # Output stride 8 keeps a 4 x 4 feature map at 32 px, so spatial means and maps differ.
    model = timm.create_model(
        "resnet10t", num_classes=0, channels=(8, 16, WIDTH, WIDTH), stem_width=8, output_stride=8
    )
    _save_timm_folder(model, folder, size)


def _save_timm_vit(folder: Path, size: int) -> None:
    # Registers and average pooling make the prefix tokens, CLS, mean and pooler all differ.
    model = timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=0,
        img_size=size,
        patch_size=size // 4,
        depth=LAYERS,
        embed_dim=WIDTH,
        num_heads=HEADS,
        reg_tokens=2,
        global_pool="avg",
    )
    _save_timm_folder(model, folder, size)


_SAVERS: dict[str, Callable[[Path, int], None]] = {
    "clip": _save_clip,
    "vit": _save_vit,
    "dinov2": _save_dinov2,
    "siglip": _save_siglip,
    "convnext": _save_convnext,
    "timm": _save_timm,
    "timm_vit": _save_timm_vit,
}
TINY_TEACHER_KINDS = tuple(_SAVERS)


def save_tiny_teacher(kind: str, folder: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Build a tiny random ``kind`` model (see the module docstring) and save it into ``folder``.

    The weights are drawn with ``torch.manual_seed(seed)``, so a given (kind, image_size, seed)
    always gives the same model. ``image_size`` must be a multiple of 8 (the ViT towers use
    4 x 4 patches, ConvNeXt and the timm ResNet downsample by 8). Returns ``folder`` as a
    :class:`~pathlib.Path`, ready for ``load_teacher``.
    """
    if kind not in _SAVERS:
        raise ConfigError(f"unknown tiny teacher kind {kind!r}: use one of {', '.join(TINY_TEACHER_KINDS)}")
    if image_size < 8 or image_size % 8:
        raise ConfigError(f"tiny teacher image_size {image_size} is not usable: use a multiple of 8, e.g. 32")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _SAVERS[kind](folder, image_size)
    return folder
