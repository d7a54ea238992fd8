"""The student: timm backbones, the projector's structure, normalization and weight loading."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mvmr_hf.errors import ConfigError
from mvmr_hf.models.student import build_student, parse_projector_spec

# name, image_size argument, expected pooled feature width F (timm's documented widths)
BACKBONES = [
    ("resnet18", 64, 512),
    ("vit_tiny_patch16_224", 64, 192),
    ("convnext_atto", 64, 320),
    ("mobilenetv3_small_050", 64, 1024),  # 288 channels, then a 1024-wide pre-logits conv head
]


@pytest.mark.parametrize(("name", "image_size", "width"), BACKBONES)
def test_students_give_features_and_embeddings(name: str, image_size: int, width: int) -> None:
    torch.manual_seed(0)
    student = build_student(name, projector="32-16", image_size=image_size).eval()
    assert (student.model_name, student.image_size, student.projector_spec) == (name, image_size, "32-16")
    assert student.data_config["input_size"] == (3, image_size, image_size)
    assert (student.feature_dim, student.embed_dim) == (width, 16)
    with torch.no_grad():
        out = student(torch.rand(3, 3, image_size, image_size))
    assert out.features.shape == (3, width)
    assert out.embedding.shape == (3, 16)


def test_projector_structure() -> None:
    projector = build_student("resnet18", projector="64-48-16").projector
    assert [type(m) for m in projector] == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
    ]
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 48), (48, 16)]
    assert all(m.bias is None for m in linears)
    assert [m.num_features for m in projector if isinstance(m, nn.BatchNorm1d)] == [64, 48]


def test_no_projector_means_embedding_is_features() -> None:
    student = build_student("resnet18", projector="none", image_size=32).eval()
    assert len(student.projector) == 0
    assert student.embed_dim == student.feature_dim == 512
    with torch.no_grad():
        out = student(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(out.embedding, out.features)


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [("8192-8192-8192", [8192] * 3), ("32", [32]), (" 64-8 ", [64, 8]), ("none", []), ("", []), ("NONE", [])],
)
def test_parse_projector_spec(spec: str, sizes: list[int]) -> None:
    assert parse_projector_spec(spec) == sizes


@pytest.mark.parametrize("spec", ["8192x8192", "-1", "abc", "0", "8192-", "64-0-8", "1.5"])
def test_bad_projector_spec_shows_the_expected_form(spec: str) -> None:
    expected = f"{spec!r} is not a projector spec: use sizes joined by '-', e.g. 8192-8192-8192, or 'none'"
    with pytest.raises(ConfigError) as error:
        parse_projector_spec(spec)
    assert str(error.value) == expected
    with pytest.raises(ConfigError, match="is not a projector spec"):
        build_student("resnet18", projector=spec)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_normalization_uses_timm_data_config(name: str) -> None:
    reference = timm.data.resolve_model_data_config(timm.create_model(name, num_classes=0))
    mean = torch.tensor(reference["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(reference["std"]).view(1, 3, 1, 1)
    student = build_student(name, projector="none", image_size=32 if name == "resnet18" else 64).eval()
    seen = []
    student.backbone.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    images = torch.rand(2, 3, student.image_size, student.image_size)
    with torch.no_grad():
        student(images)
    torch.testing.assert_close(seen[0], (images - mean) / std)
    for key in ("mean", "std", "interpolation", "crop_pct"):
        assert student.data_config[key] == reference[key]


def test_channels_last_gives_the_same_output() -> None:
    torch.manual_seed(0)
    student = build_student("resnet18", projector="16", image_size=32).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = student(images)
        student.to_channels_last()
        got = student(images)
    assert student.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.embedding, expected.embedding, atol=1e-4, rtol=1e-4)


def test_drop_path_rate_reaches_the_model() -> None:
    student = build_student("vit_tiny_patch16_224", projector="none", image_size=32, drop_path_rate=0.1)
    rates = [m.drop_prob for m in student.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates
    assert max(rates) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"use a value in \[0, 1\)"):
        build_student("resnet18", drop_path_rate=1.5)
    with pytest.raises(ConfigError, match=r"cannot build 'vgg11' with drop_path_rate=0\.1: .*leave"):
        build_student("vgg11", drop_path_rate=0.1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet5", "unknown timm model 'resnet5': did you mean resnet50, "),
        ("convnext_tiyn", "did you mean convnext_tiny"),
        ("zzzzzzzzzz", "see timm.list_models()"),
    ],
)
def test_unknown_model_suggests_close_names(name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_student(name)
    assert expected in str(error.value)


def test_pretrained_offline_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(ConfigError) as error:
        build_student("mobilenetv3_small_050", pretrained=True)
    message = str(error.value)
    assert "'mobilenetv3_small_050'" in message
    assert "checkpoint_path" in message
    assert "pretrained=False" in message
    assert "\n" not in message


@pytest.mark.parametrize("location", ["hf-hub:mvmr-hf-tests/no-such-student", "local-dir:{tmp}/missing"])
def test_a_location_that_cannot_be_read_is_one_line_without_a_weights_hint(
    location: str, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """`--student hf-hub:...` offline or a missing local-dir: builds no weights (issue 20): the line says the
    location could not be read, not to pass checkpoint_path or pretrained=False, which the command has not."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    name = location.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as error:
        build_student(name, projector="none")
    message = str(error.value)
    assert f"could not read the timm model that {name!r} names" in message
    assert "checkpoint_path" not in message
    assert "pretrained=False" not in message
    assert "\n" not in message


def _weights(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}  # with classifier


def test_checkpoint_path_loads_backbone_weights(tmp_path) -> None:
    weights = _weights("mobilenetv3_small_050", seed=1)
    assert "classifier.weight" in weights
    save_file(weights, tmp_path / "timm.safetensors")
    student = build_student("mobilenetv3_small_050", checkpoint_path=str(tmp_path / "timm.safetensors"))
    for key, value in student.backbone.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    # A training checkpoint of a whole student (backbone.* and projector.* keys) works too.
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, tmp_path / "run.safetensors")
    again = build_student(
        "mobilenetv3_small_050", projector="8", checkpoint_path=str(tmp_path / "run.safetensors")
    )
    torch.testing.assert_close(again.backbone.conv_stem.weight, weights["conv_stem.weight"], rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path) -> None:
    weights = _weights("mobilenetv3_small_050", seed=0)
    save_file(weights, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="does not fit timm model 'convnext_atto'"):
        build_student("convnext_atto", checkpoint_path=str(tmp_path / "other.safetensors"))
    vit = {
        k: v.contiguous()
        for k, v in timm.create_model("vit_tiny_patch16_224", img_size=64).state_dict().items()
    }
    save_file(vit, tmp_path / "vit64.safetensors")
    with pytest.raises(ConfigError, match=r"size mismatch for pos_embed.*saved at the same image_size"):
        build_student(
            "vit_tiny_patch16_224", image_size=32, checkpoint_path=str(tmp_path / "vit64.safetensors")
        )
    del weights["conv_stem.weight"]
    save_file(weights, tmp_path / "partial.safetensors")
    with pytest.raises(ConfigError, match=r"1 missing weights \['conv_stem.weight'\]"):
        build_student("mobilenetv3_small_050", checkpoint_path=str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match=r"not an existing \.safetensors file"):
        build_student("mobilenetv3_small_050", checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="not both"):
        build_student(
            "mobilenetv3_small_050", pretrained=True, checkpoint_path=str(tmp_path / "other.safetensors")
        )


def test_bad_image_size_and_input() -> None:
    with pytest.raises(ConfigError, match="positive number of pixels"):
        build_student("resnet18", image_size=0)
    student = build_student("resnet18", projector="none", image_size=32)
    with pytest.raises(ConfigError, match=r"float images of shape \(B, 3, H, W\)"):
        student(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
