"""The teacher: loading, freezing, output kinds and preprocessing against `transformers`' own code.

References are computed independently with the `transformers` model classes and image processors
on tiny random models saved like real checkpoints (``mvmr_hf.tiny_models``) and real photos from
scikit-image.
"""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from skimage import data
from transformers import (
    AutoImageProcessor,
    BertConfig,
    CLIPModel,
    ConvNextModel,
    Dinov2Model,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from mvmr_hf.errors import ConfigError
from mvmr_hf.representations.teacher import load_teacher
from mvmr_hf.tiny_models import TINY_TEACHER_KINDS, save_tiny_teacher

# Preprocessing tolerance, in 8-bit gray levels of the image before normalization: the processors
# resize 8-bit images (rounding, clamping) while the teacher resizes the float batch it is given.
MAX_GRAY_LEVELS = 1.5
MEAN_GRAY_LEVELS = 0.3


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
        out = ConvNextModel.from_pretrained(folder)(pixel_values)
        return {
            "pooler": out.pooler_output,
            "mean": out.last_hidden_state.mean(dim=(2, 3)),
            "tokens": out.last_hidden_state.flatten(1),
        }


AUTO = {"clip": "embedding", "siglip": "embedding", "vit": "cls", "dinov2": "pooler", "convnext": "pooler"}
IMPOSSIBLE = {
    "clip": (),
    "siglip": ("cls",),
    "vit": ("embedding", "pooler"),
    "dinov2": ("embedding",),
    "convnext": ("embedding", "cls"),
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


@pytest.mark.parametrize("kind", TINY_TEACHER_KINDS)
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_preprocessing_matches_image_processor(kind: str, backend: str, folders: dict, photos: list) -> None:
    folder = folders[kind]
    processor = AutoImageProcessor.from_pretrained(folder, backend=backend)
    reference = processor(images=photos, return_tensors="pt")["pixel_values"]
    teacher = load_teacher(str(folder))
    ours = teacher.preprocess(_to01(photos))
    assert ours.shape == reference.shape
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    gray_levels = ((ours - reference) * std * 255).abs()
    assert gray_levels.max() <= MAX_GRAY_LEVELS
    assert gray_levels.mean() <= MEAN_GRAY_LEVELS


def test_preprocessing_runs_on_the_input_device_and_dtype(folders: dict, photos: list) -> None:
    teacher = load_teacher(str(folders["dinov2"]), dtype=torch.bfloat16)
    assert teacher.dtype == torch.bfloat16
    images = _to01(photos).half()
    assert teacher.preprocess(images).dtype == torch.bfloat16
    assert teacher(images).dtype == torch.float32


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
    with pytest.raises(ConfigError, match="use one of clip, vit, dinov2, siglip, convnext"):
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
