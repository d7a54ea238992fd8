"""The teacher: loading, freezing, output kinds and preprocessing against `transformers`' own code.

References are computed independently with the `transformers` model classes and image processors
(for timm models: ``TimmWrapperModel`` and ``TimmWrapperImageProcessor``, as ``AutoModel`` and
``AutoImageProcessor`` load them) on tiny random models saved like real checkpoints
(``mvmr_hf.models.tiny_models``) and real photos from scikit-image. The preprocessing reference is the
processor on 8-bit images (PIL images, as decoded files give), the images users have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from timm.models._hub import save_for_hf
from transformers import (
    AutoImageProcessor,
    AutoModel,
    BertConfig,
    CLIPModel,
    ConvNextModel,
    Dinov2Model,
    LevitImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mvmr_hf.errors import ConfigError
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.representations.teacher import load_teacher
from mvmr_hf.models.tiny_models import TINY_TEACHER_KINDS, save_tiny_teacher

# Preprocessing tolerance, in 8-bit gray levels of the image before normalization. The teacher resizes
# the float batch as the processors resize 8-bit images (clamped and rounded after each pass), but in
# float arithmetic, where PIL and torch's uint8 kernel use fixed point: a rounding can go the other
# way (measured: at most 2 gray levels, 0.009 on average; one clamp after a float
# resize was up to 10.6 gray levels away on upsampled photos, timm's float transform up to 17).
MAX_GRAY_LEVELS = 2.0 + 1e-3  # + float rounding of the normalised values
MEAN_GRAY_LEVELS = 0.02
# Cosine of the teacher's output to the model's output on the processor's pixel values, per image.
MIN_COSINE = 0.999
TIMM_KINDS = ("timm", "timm_vit")
TRANSFORMERS_KINDS = tuple(kind for kind in TINY_TEACHER_KINDS if kind not in TIMM_KINDS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("teachers")
    return {kind: save_tiny_teacher(kind, root / kind) for kind in TINY_TEACHER_KINDS}


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Two real, non-square 8-bit RGB photos of the same size (so the aspect-ratio logic is exercised)."""
    return [data.chelsea()[:300, :450], data.coffee()[:300, :450]]


def _to01(photos: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).float() / 255


def _gray_levels(ours: torch.Tensor, reference: torch.Tensor, processor: object) -> torch.Tensor:
    """``|ours - reference|`` of normalised pixel values, in 8-bit gray levels before normalization."""
    std = processor.data_config["std"] if hasattr(processor, "data_config") else processor.image_std
    return ((ours - reference) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()


def _references(kind: str, folder, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each output kind computed by hand from the `transformers` model's own forward."""
    with torch.no_grad():
        if kind == "clip":
            model = CLIPModel.from_pretrained(folder)
            vision = model.vision_model(pixel_values=pixel_values)
            hidden = vision.last_hidden_state
            return {
                "embedding": model.get_image_features(pixel_values=pixel_values).pooler_output,
                "pooler": vision.pooler_output,
                "cls": hidden[:, 0],
                "mean": hidden[:, 1:].mean(1),
                "tokens": hidden.flatten(1),
            }
        if kind == "siglip":
            model = SiglipModel.from_pretrained(folder)
            vision = model.vision_model(pixel_values=pixel_values)
            return {
                "embedding": model.get_image_features(pixel_values=pixel_values).pooler_output,
                "pooler": vision.pooler_output,
                "mean": vision.last_hidden_state.mean(1),
                "tokens": vision.last_hidden_state.flatten(1),
            }
        if kind == "vit":
            hidden = ViTModel.from_pretrained(folder, add_pooling_layer=False)(pixel_values).last_hidden_state
            return {"cls": hidden[:, 0], "mean": hidden[:, 1:].mean(1), "tokens": hidden.flatten(1)}
        if kind == "dinov2":
            out = Dinov2Model.from_pretrained(folder)(pixel_values)
            hidden = out.last_hidden_state
            return {
                "pooler": out.pooler_output,
                "cls": hidden[:, 0],
                "mean": hidden[:, 1:].mean(1),
                "tokens": hidden.flatten(1),
            }
        if kind == "timm_vit":
            out = AutoModel.from_pretrained(folder)(pixel_values)
            hidden = out.last_hidden_state
            return {
                "pooler": out.pooler_output,
                "cls": hidden[:, 0],
                "mean": hidden[:, 3:].mean(1),  # after CLS and the 2 register tokens
                "tokens": hidden.flatten(1),
            }
        model = ConvNextModel if kind == "convnext" else AutoModel
        out = model.from_pretrained(folder)(pixel_values)
        return {
            "pooler": out.pooler_output,
            "mean": out.last_hidden_state.mean(dim=(2, 3)),
            "tokens": out.last_hidden_state.flatten(1),
        }


AUTO = {
    "clip": "embedding",
    "siglip": "embedding",
    "vit": "cls",
    "dinov2": "pooler",
    "convnext": "pooler",
    "timm": "pooler",
    "timm_vit": "pooler",
}
IMPOSSIBLE = {
    "clip": (),
    "siglip": ("cls",),
    "vit": ("embedding", "pooler"),
    "dinov2": ("embedding",),
    "convnext": ("embedding", "cls"),
    "timm": ("embedding", "cls"),
    "timm_vit": ("embedding",),
}


@pytest.mark.parametrize("kind", TINY_TEACHER_KINDS)
def test_outputs_match_transformers(kind: str, folders: dict, photos: list[np.ndarray]) -> None:
    folder = folders[kind]
    processor = AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(images=photos, return_tensors="pt")["pixel_values"]
    references = _references(kind, folder, pixel_values)
    assert load_teacher(str(folder)).output == AUTO[kind]
    for output, reference in references.items():
        teacher = load_teacher(str(folder), output=output)
        assert teacher.output == output
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not teacher.training
        # The model itself, on the processor's own pixel values: equal up to float rounding.
        torch.testing.assert_close(teacher.encode(pixel_values), reference.flatten(1), atol=1e-5, rtol=1e-5)
        # End to end from the [0, 1] batch: inputs differ by about one gray level (see below), outputs
        # by at most 1.2 % of their largest value (measured), 2 % allowed.
        features = teacher(_to01(photos))
        assert features.dtype == torch.float32
        assert features.grad_fn is None
        assert features.shape == reference.flatten(1).shape
        scale = reference.abs().max().item()
        torch.testing.assert_close(features, reference.flatten(1), atol=0.02 * scale, rtol=0)
    for output in IMPOSSIBLE[kind]:
        with pytest.raises(ConfigError, match="use output="):
            load_teacher(str(folder), output=output)


@pytest.mark.parametrize("kind", TRANSFORMERS_KINDS)
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_preprocessing_matches_image_processor(kind: str, backend: str, folders: dict, photos: list) -> None:
    folder = folders[kind]
    processor = AutoImageProcessor.from_pretrained(folder, backend=backend)
    reference = processor(images=photos, return_tensors="pt")["pixel_values"]
    teacher = load_teacher(str(folder))
    ours = teacher.preprocess(_to01(photos))
    assert ours.shape == reference.shape
    gray_levels = _gray_levels(ours, reference, processor)
    assert gray_levels.max() <= MAX_GRAY_LEVELS
    assert gray_levels.mean() <= MEAN_GRAY_LEVELS


@pytest.fixture(scope="module")
def folders96(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny teachers at 96 px, where small images are upsampled."""
    root = tmp_path_factory.mktemp("teachers96")
    return {kind: save_tiny_teacher(kind, root / kind, image_size=96) for kind in TINY_TEACHER_KINDS}


def _photos_for(factor: int | None, side: int = 96) -> list[np.ndarray]:
    """Three photos, whole (the teacher downsamples them) or first shrunk with PIL so that the teacher
    upsamples them ``factor`` times (shorter side ``side / factor``; chelsea and coffee non-square)."""
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    if factor is None:
        return photos
    small = []
    for photo in photos:
        scale = side / factor / min(photo.shape[:2])
        size = (round(photo.shape[1] * scale), round(photo.shape[0] * scale))
        small.append(np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.LANCZOS)))
    return small


# The processor as AutoImageProcessor gives it (torchvision backend in transformers 5; timm's own), and
# the transformers processors' PIL backend.
PROCESSORS = [(kind, None) for kind in TINY_TEACHER_KINDS] + [(kind, "pil") for kind in TRANSFORMERS_KINDS]


@pytest.mark.parametrize("factor", [2, 4, 8, None], ids=["up2", "up4", "up8", "down"])
@pytest.mark.parametrize(("kind", "backend"), PROCESSORS)
def test_teacher_sees_what_its_processor_gives_on_pil_images(
    kind: str, backend: str | None, factor: int | None, folders96: dict
) -> None:
    """Upsampled small photos too, where bicubic overshoot is large: the processor clamps after resizing."""
    folder = folders96[kind]
    processor = AutoImageProcessor.from_pretrained(folder, **({"backend": backend} if backend else {}))
    teacher = load_teacher(str(folder))
    photos = _photos_for(factor)
    reference = torch.cat(
        [processor(images=[Image.fromarray(photo)], return_tensors="pt")["pixel_values"] for photo in photos]
    )
    ours = torch.cat([teacher.preprocess(_to01([photo])) for photo in photos])
    assert ours.shape == reference.shape
    gray_levels = _gray_levels(ours, reference, processor)
    assert gray_levels.max() <= MAX_GRAY_LEVELS
    assert gray_levels.mean() <= MEAN_GRAY_LEVELS
    expected = _references(kind, folder, reference)[teacher.output].flatten(1)
    features = torch.cat([teacher(_to01([photo])) for photo in photos])
    assert torch.nn.functional.cosine_similarity(features, expected).min() >= MIN_COSINE


def test_a_trained_teacher_sees_what_its_processor_gives_on_pil_images(tmp_path) -> None:
    """EfficientNet-Lite0 with its ImageNet weights (a timm folder, 224 px), where random tiny models
    hardly tell inputs apart: timm's transform of the float batch gave a cosine of 0.9926 to the
    processor's PIL path on astronaut upsampled 8 times (measured); the teacher 0.999998 or more."""
    folder = save_efficientnet_lite(tmp_path / "lite0")
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    teacher = load_teacher(str(folder))
    for factor in (2, 4, 8, None):
        photos = _photos_for(factor, side=224)
        reference = torch.cat(
            [processor(images=[Image.fromarray(photo)])["pixel_values"] for photo in photos]
        )
        with torch.no_grad():
            expected = model(pixel_values=reference).pooler_output
        features = torch.cat([teacher(_to01([photo])) for photo in photos])
        assert torch.nn.functional.cosine_similarity(features, expected).min() >= MIN_COSINE


def test_nearest_takes_the_nearest_pixel_centre(folders96: dict, tmp_path) -> None:
    """PIL's nearest (resample 0; timm's "nearest") takes the pixel whose centre is nearest.

    The torchvision backend picks the same pixels, exactly. PIL breaks ties (a pixel centre half way
    between two, e.g. a whole row when upsampling 32 to 109 px) by its own arithmetic, the other way
    at times: at most 2.1 % of the values differ, measured (torch's floor "nearest": 26 to 91 %).
    """
    vit = tmp_path / "vit"
    shutil.copytree(folders96["vit"], vit)
    processor = AutoImageProcessor.from_pretrained(vit)
    processor.resample = 0
    processor.save_pretrained(vit)
    timm_folder = _with_pretrained_cfg(folders96["timm"], tmp_path / "timm", interpolation="nearest")
    for folder, max_differing in ((vit, 0.0), (timm_folder, 0.03)):
        processor = AutoImageProcessor.from_pretrained(folder)
        teacher = load_teacher(str(folder))
        for photo in _photos_for(3) + _photos_for(None):
            reference = processor(images=[Image.fromarray(photo)], return_tensors="pt")["pixel_values"]
            gray_levels = _gray_levels(teacher.preprocess(_to01([photo])), reference, processor)
            assert (gray_levels > 0.5).float().mean() <= max_differing


def test_preprocessing_runs_on_the_input_device_and_dtype(folders: dict, photos: list) -> None:
    teacher = load_teacher(str(folders["dinov2"]), dtype=torch.bfloat16)
    assert teacher.dtype == torch.bfloat16
    images = _to01(photos).half()
    assert teacher.preprocess(images).dtype == torch.bfloat16
    assert teacher(images).dtype == torch.float32


def _with_pretrained_cfg(folder: Path, target: Path, **changes: object) -> Path:
    """A copy of timm folder ``folder`` whose ``pretrained_cfg`` (its processor settings) has ``changes``."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["pretrained_cfg"].update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


# Other crops and input sizes for the tiny timm CNN (bicubic, crop_pct 0.875, mean = std = 0.5 otherwise).
TIMM_CROPS = {
    "center": {},
    "squash": {"crop_mode": "squash"},
    "border": {"crop_mode": "border"},
    "non-square center": {"input_size": [3, 24, 40]},
    "non-square squash, bilinear": {
        "input_size": [3, 40, 24],
        "crop_mode": "squash",
        "interpolation": "bilinear",
    },
    "non-square border": {"input_size": [3, 24, 40], "crop_mode": "border"},
}


@pytest.mark.parametrize("crop", TIMM_CROPS)
def test_timm_preprocessing_is_the_processors_transform(
    crop: str, folders: dict, photos: list, tmp_path
) -> None:
    folder = _with_pretrained_cfg(folders["timm"], tmp_path / "timm", **TIMM_CROPS[crop])
    processor = AutoImageProcessor.from_pretrained(folder)
    teacher = load_teacher(str(folder))
    model = AutoModel.from_pretrained(folder)
    ours = teacher.preprocess(_to01(photos))
    assert ours.shape == (2, 3, *processor.data_config["input_size"][1:])
    # The processor on the 8-bit photos (its PIL path, border padding with its 8-bit colour included).
    pixel_values = processor(images=photos)["pixel_values"]
    gray_levels = _gray_levels(ours, pixel_values, processor)
    assert gray_levels.max() <= MAX_GRAY_LEVELS
    assert gray_levels.mean() <= MEAN_GRAY_LEVELS
    with torch.no_grad():
        reference = model(pixel_values).pooler_output
    assert torch.nn.functional.cosine_similarity(teacher(_to01(photos)), reference).min() >= MIN_COSINE
    if crop == "border":
        # 300 x 450 photos become 24 x 36, padded by 4 rows above and below with the mean colour.
        padding = (round(255 * 0.5) / 255 - 0.5) / 0.5
        torch.testing.assert_close(
            ours[..., :4, :], torch.full_like(ours[..., :4, :], padding), atol=1e-6, rtol=0
        )


def test_timm_fingerprint_records_the_data_config(folders: dict, tmp_path) -> None:
    first = load_teacher(str(folders["timm"])).fingerprint()["preprocess"]
    assert first["timm_data_config"]["crop_pct"] == 0.875
    squash = _with_pretrained_cfg(folders["timm"], tmp_path / "squash", crop_mode="squash")
    second = load_teacher(str(squash)).fingerprint()["preprocess"]
    assert second["timm_data_config"]["crop_mode"] == "squash"
    assert second != first


def _save_as_timm_does(model: torch.nn.Module, folder: Path) -> Path:
    """``model`` saved by timm's ``save_for_hf`` as it is (``num_classes`` in ``model_args``)."""
    save_for_hf(model, str(folder), safe_serialization=True, data_config={"input_size": (3, 64, 64)})
    assert "num_classes" in json.loads((folder / "config.json").read_text())["model_args"]
    return folder


def test_timm_folder_with_a_classifier_loads_without_it(tmp_path, photos: list) -> None:
    """The classifier weights are unused (not missing), and TimmWrapperModel gets no second num_classes."""
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=5, img_size=64, depth=1, embed_dim=32, num_heads=2
    )
    folder = _save_as_timm_does(model.eval(), tmp_path / "vit")
    teacher = load_teacher(str(folder))
    assert teacher.output == "pooler"
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=photos)["pixel_values"]
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(pixel_values), pre_logits=True)
    torch.testing.assert_close(teacher.encode(pixel_values), reference, atol=1e-5, rtol=1e-5)


def test_timm_channels_last_feature_maps_are_averaged_over_space(tmp_path, photos: list) -> None:
    model = timm.create_model("test_mambaout", num_classes=0).eval()
    assert model.output_fmt == "NHWC"
    folder = _save_as_timm_does(model, tmp_path / "mambaout")
    pixel_values = AutoImageProcessor.from_pretrained(folder)(images=photos)["pixel_values"]
    with torch.no_grad():
        features = model.forward_features(pixel_values)  # (B, H, W, C)
    mean = load_teacher(str(folder), output="mean").encode(pixel_values)
    torch.testing.assert_close(mean, features.mean(dim=(1, 2)), atol=1e-5, rtol=1e-5)
    tokens = load_teacher(str(folder), output="tokens").encode(pixel_values)
    torch.testing.assert_close(tokens, features.permute(0, 3, 1, 2).flatten(1), atol=1e-5, rtol=1e-5)


def test_timm_transform_steps_without_a_tensor_implementation_are_refused(folders: dict, tmp_path) -> None:
    folder = _with_pretrained_cfg(folders["timm"], tmp_path / "lanczos", interpolation="lanczos")
    with pytest.raises(ConfigError, match="only works on PIL images") as error:
        load_teacher(str(folder))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("processor_class", "settings", "expected"),
    [
        (
            LevitImageProcessor,
            {"size": {"shortest_edge": 32}},
            "is a LevitImageProcessor, whose own preprocessing",
        ),
        (ViTImageProcessor, {"size": {"height": 32, "width": 32}, "do_pad": True}, "pads its images"),
        (ViTImageProcessor, {"size": {"shortest_edge": 32, "longest_edge": 48}}, "sets size="),
    ],
)
def test_processors_the_teacher_would_only_approximate_are_refused(
    processor_class: type, settings: dict, expected: str, tmp_path
) -> None:
    """Refused before training, in one line, rather than run on inputs that differ from the processor's."""
    folder = save_tiny_teacher("vit", tmp_path / "vit")
    processor_class(**settings).save_pretrained(folder)
    with pytest.raises(ConfigError, match=expected) as error:
        load_teacher(str(folder))
    assert "\n" not in str(error.value)
    assert "'" + str(folder) + "'" in str(error.value)


@pytest.mark.parametrize("resample", [1, 4, 5])  # PIL's lanczos, box and hamming filters
def test_a_processor_filter_torch_cannot_apply_is_refused(folders: dict, tmp_path, resample: int) -> None:
    folder = tmp_path / "vit"
    shutil.copytree(folders["vit"], folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    processor.resample = resample
    processor.save_pretrained(folder)
    with pytest.raises(ConfigError, match="torch cannot apply to tensors") as error:
        load_teacher(str(folder))
    assert "\n" not in str(error.value)


def test_vit_with_a_saved_pooler_uses_it(tmp_path, photos: list) -> None:
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    model = ViTModel(config)
    model.save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    assert teacher.output == "pooler"
    processor = ViTImageProcessor.from_pretrained(tmp_path)
    pixel_values = processor(images=photos, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = torch.tanh(model.pooler.dense(model(pixel_values).last_hidden_state[:, 0]))
    torch.testing.assert_close(teacher.encode(pixel_values), reference, atol=1e-5, rtol=1e-5)


def test_teacher_stays_in_eval_mode(folders: dict) -> None:
    teacher = load_teacher(str(folders["vit"]))
    teacher.train()
    assert not any(module.training for module in teacher.modules())


def test_fingerprint_names_the_model_kind_and_weights(folders: dict, tmp_path) -> None:
    folder = save_tiny_teacher("vit", tmp_path / "vit")
    first = load_teacher(str(folder), output="mean").fingerprint()
    assert first["model"] == str(folder)
    assert first["output"] == "mean"
    assert first["preprocess"]["resize_to"] == (32, 32)
    assert load_teacher(str(folder), output="mean").fingerprint() == first
    assert load_teacher(str(folder), output="cls").fingerprint() != first
    save_tiny_teacher("vit", folder, seed=1)  # new weights in the same folder
    assert load_teacher(str(folder), output="mean").fingerprint()["files_sha256"] != first["files_sha256"]


def test_missing_processor_config_falls_back_with_a_warning(tmp_path) -> None:
    folder = save_tiny_teacher("clip", tmp_path / "clip")
    (folder / "processor_config.json").unlink()
    with pytest.warns(UserWarning, match="no image-processor config"):
        teacher = load_teacher(str(folder))
    settings = teacher.settings
    assert (settings.shortest_edge, settings.crop) == (32, (32, 32))
    assert settings.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_hub_id_offline_gives_one_line_naming_the_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as error:
        load_teacher("mvmr-hf-tests/no-such-teacher")
    message = str(error.value)
    assert "'mvmr-hf-tests/no-such-teacher'" in message
    assert "offline" in message
    assert "local folder" in message
    assert "\n" not in message


def test_hub_id_loads_from_the_hub_cache_and_names_the_commit(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The Hub-id path is the real one (from_pretrained with the id), served here by a local cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--mvmr-hf-tests--tiny-vit"
    save_tiny_teacher("vit", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    teacher = load_teacher("mvmr-hf-tests/tiny-vit")
    assert teacher.output == "cls"
    assert teacher.fingerprint()["commit"] == commit
    with pytest.raises(ConfigError, match="offline or no network"):
        load_teacher("mvmr-hf-tests/tiny-vit", revision="v2")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("./no/such/folder", "does not exist"),
        ("/no/such/folder", "does not exist"),
        ("bad id with spaces", "valid Hub model id"),
    ],
)
def test_bad_locations_are_named(name: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        load_teacher(name)
    assert repr(name) in str(error.value)


def test_folder_without_config_and_non_vision_model(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        load_teacher(str(tmp_path))
    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    bert.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="is a 'bert' model, not a vision model"):
        load_teacher(str(tmp_path))


def test_unknown_output_kind(folders: dict) -> None:
    with pytest.raises(ConfigError, match="use one of auto, embedding, pooler, cls, mean, tokens"):
        load_teacher(str(folders["vit"]), output="logits")


def test_a_partly_random_checkpoint_is_refused(tmp_path) -> None:
    folder = save_tiny_teacher("dinov2", tmp_path / "dinov2")
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights["layernorm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="not in its checkpoint"):
        load_teacher(str(folder))


def test_tiny_teacher_rejects_bad_arguments(tmp_path) -> None:
    with pytest.raises(ConfigError, match="use one of clip, vit, dinov2, siglip, convnext, timm, timm_vit"):
        save_tiny_teacher("resnet", tmp_path)
    with pytest.raises(ConfigError, match="multiple of 8"):
        save_tiny_teacher("vit", tmp_path, image_size=30)


def test_tiny_clip_has_a_working_tokenizer(folders: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders["clip"])
    model = CLIPModel.from_pretrained(folders["clip"])
    tokens = tokenizer(["a photo of a cat", "a dog"], padding=True, return_tensors="pt")
    assert tokens["input_ids"].max() < model.config.text_config.vocab_size
    with torch.no_grad():
        assert model.get_text_features(**tokens).pooler_output.shape == (2, 16)
