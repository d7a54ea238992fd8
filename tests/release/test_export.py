"""The release folder: timm and transformers load it and give the trained features; writes are atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
from conftest import snapshot
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from transformers import AutoImageProcessor, AutoModel

from mvmr_hf.cli.release import export_main
from mvmr_hf.data.augment import CENTER_CROP_FRACTION, center_view
from mvmr_hf.errors import ConfigError, TrainingError
from mvmr_hf.evaluation.features import load_encoder
from mvmr_hf.models.student import build_student
from mvmr_hf.release.card import CardInfo
from mvmr_hf.release.export import (
    check_release,
    export_run,
    export_student,
    load_release,
    load_student,
    update_card,
)

IMAGE_SIZE = 32
ARGS = {
    "student": "test_resnet",
    "projector": "16-8",
    "image_size": IMAGE_SIZE,
    "teacher": None,
    "dataset": "x",
}


def _trained_student(name: str = "test_resnet") -> torch.nn.Module:
    """A tiny student whose BatchNorm statistics moved away from their initial values."""
    torch.manual_seed(0)
    student = build_student(name, projector="16-8", image_size=IMAGE_SIZE).train()
    with torch.no_grad():
        for _ in range(3):
            student(torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE) * 0.5 + 0.2)
    return student.eval()


def _normalize(images01: torch.Tensor, data_config: dict) -> torch.Tensor:
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return (images01 - mean) / std


@pytest.fixture(scope="module", params=["test_resnet", "test_vit"])
def release(request, tmp_path_factory):
    student = _trained_student(request.param)
    folder = tmp_path_factory.mktemp("run") / "student"
    args = {**ARGS, "student": request.param}
    export_student(student, folder, training_args=args, card_info=CardInfo(step=7, repo_id="me/tiny"))
    return student, folder


def test_timm_local_dir_gives_the_trained_features(release):
    student, folder = release
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data_config = timm.data.resolve_model_data_config(model)
    assert data_config["input_size"] == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert (data_config["crop_pct"], data_config["interpolation"]) == (CENTER_CROP_FRACTION, "bilinear")
    with torch.no_grad():
        torch.testing.assert_close(
            model(_normalize(images, data_config)), student(images).features, atol=1e-5, rtol=0
        )
    loaded, config = load_release(folder)
    assert config == data_config
    assert type(loaded) is type(student.backbone)


def test_transformers_auto_model_gives_the_trained_features(release):
    student, folder = release
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "TimmWrapperModel"
    with torch.no_grad():
        pooled = model(pixel_values=_normalize(images, student.data_config)).pooler_output
        torch.testing.assert_close(pooled, student(images).features, atol=1e-5, rtol=0)


def test_auto_image_processor_reproduces_the_training_view(release):
    student, folder = release
    processor = AutoImageProcessor.from_pretrained(folder)
    photo = Image.fromarray(skdata.astronaut()).resize((48, 40))
    pixels = processor(photo, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    images01 = torch.from_numpy(np.array(photo)).permute(2, 0, 1)[None].float() / 255
    view = _normalize(
        center_view(images01, IMAGE_SIZE, crop_fraction=CENTER_CROP_FRACTION), student.data_config
    )
    # PIL's bilinear filter against torch's antialiased one: close, not identical
    assert (pixels - view).abs().mean() < 0.02


def test_release_holds_only_safetensors_json_and_the_card(release):
    _, folder = release
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "README.md",
        "config.json",
        "model.safetensors",
        "projector.json",
        "projector.safetensors",
        "run_info.json",
        "training_args.json",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert "num_classes" not in config.get("model_args", {})
    assert not list(folder.parent.glob(".student*"))  # no temporary folder left behind


def test_card_parses_and_projector_round_trips(release):
    student, folder = release
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm"
    assert card.data.eval_results is None
    assert "hf-hub:me/tiny" in card.text
    images = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_student(folder).eval()(images).embedding, student(images).embedding)


def test_update_card_writes_model_index_atomically(tmp_path):
    from huggingface_hub import EvalResult

    folder = export_student(_trained_student(), tmp_path / "student", training_args=ARGS)
    weights = (folder / "model.safetensors").read_bytes()
    result = EvalResult(
        task_type="image-classification",
        dataset_type="digits",
        dataset_name="digits",
        dataset_split="test",
        metric_type="accuracy",
        metric_name="linear top-1",
        metric_config="linear",
        metric_value=88.5,
    )
    update_card(folder, [result])
    update_card(folder, [EvalResult(**{**result.__dict__, "metric_value": 91.0})])
    card = ModelCard.load(folder / "README.md")
    assert [r.metric_value for r in card.data.eval_results] == [91.0]
    assert (folder / "model.safetensors").read_bytes() == weights
    assert not list(tmp_path.glob(".student*"))


def test_failed_export_leaves_the_previous_release_untouched(tmp_path, monkeypatch):
    folder = export_student(_trained_student(), tmp_path / "student", training_args=ARGS)
    before = snapshot(folder)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mvmr_hf.models.timm_folder.save_config_for_hf", broken)
    with pytest.raises(TrainingError, match=f"could not write the release in {folder} \\(disk full; "):
        export_student(_trained_student(), folder, training_args=ARGS)
    assert snapshot(folder) == before
    assert not list(tmp_path.glob(".student*"))


def test_export_refuses_to_replace_a_folder_that_is_not_a_release(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a release folder"):
        export_student(_trained_student(), folder, training_args=ARGS)
    assert (folder / "notes.txt").read_text() == "keep me"


def _fake_run(tmp_path: Path, student: torch.nn.Module, step: int) -> Path:
    """A run folder as the training loop leaves it: training_args.json and a checkpoint."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / f"step-{step:06d}"
    checkpoint.mkdir(parents=True)
    (run / "training_args.json").write_text(json.dumps(ARGS))
    state = {k: v.contiguous() for k, v in student.state_dict().items()}
    save_file(state, checkpoint / "model.safetensors", metadata={"format": "pt"})
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0, "num_processes": 1}))
    return run


def test_export_run_from_the_run_folder_and_from_a_checkpoint(tmp_path, capsys):
    student = _trained_student()
    run = _fake_run(tmp_path, student, step=5)
    assert export_main([str(run)]) == 0
    release = run / "student"
    assert capsys.readouterr().out.strip() == str(release)
    assert json.loads((release / "run_info.json").read_text())["step"] == 5
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(load_student(release).eval()(images).embedding, student(images).embedding)
    other = export_run(run / "checkpoints" / "step-000005", tmp_path / "elsewhere")
    assert check_release(other) == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/no/such/run"], "does not exist"),
        ([], "required: RUN_OR_CHECKPOINT"),
    ],
)
def test_export_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


def test_load_release_of_a_missing_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_release(tmp_path / "missing")


def test_a_pushed_release_loads_by_hub_id(release, tmp_path, monkeypatch):
    """The Hub-id paths of timm, transformers and mvmr-evaluate, served by a local Hub cache."""
    student, folder = release
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--me--tiny"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    expected = student(images).features
    normalized = _normalize(images, student.data_config)
    with torch.no_grad():
        timm_model = timm.create_model("hf-hub:me/tiny", pretrained=True).eval()
        torch.testing.assert_close(timm_model(normalized), expected, atol=1e-5, rtol=0)
        hf_model = AutoModel.from_pretrained("me/tiny").eval()
        torch.testing.assert_close(
            hf_model(pixel_values=normalized).pooler_output, expected, atol=1e-5, rtol=0
        )
        encoder = load_encoder("me/tiny")
        torch.testing.assert_close(encoder(images), expected, atol=1e-5, rtol=0)
