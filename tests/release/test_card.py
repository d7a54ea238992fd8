"""The model card: Hub metadata, model-index results, and the body, parsed back with huggingface_hub."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import EvalResult, ModelCard

from mvmr_hf.release.card import (
    BackboneInfo,
    CardInfo,
    hub_id_or_none,
    merge_results,
    read_results,
    render_card,
)

BACKBONE = BackboneInfo(architecture="resnet50", num_params=23_508_032, num_features=2048, image_size=224)
DISTILL_ARGS = {
    "student": "resnet50",
    "teacher": "openai/clip-vit-base-patch16",
    "teacher_output": "auto",
    "dataset": "tanganke/stl10",
    "handcrafted": "",
    "batch_size": 512,
    "learning_rate": 1e-4,
    "max_steps": 2000,
    "invariance_weight": 1.0,
    "variance_weight": 1.0,
    "view_weight": 1.0,
    "representation_weights": "teacher=2",
}


def _result(protocol: str, value: float, split: str = "test") -> EvalResult:
    return EvalResult(
        task_type="image-classification",
        task_name="Image Classification",
        dataset_type="tanganke/stl10",
        dataset_name="tanganke/stl10",
        dataset_split=split,
        metric_type="accuracy",
        metric_name=f"{protocol} top-1",
        metric_config=protocol,
        metric_value=value,
    )


def _write(tmp_path: Path, text: str) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def test_distilled_card_metadata_and_model_index(tmp_path):
    info = CardInfo(step=2000, hardware="1x NVIDIA H100", training_seconds=5400, repo_id="me/resnet50-kd")
    results = [_result("linear", 95.6), _result("knn", 93.1)]
    card = _write(
        tmp_path,
        render_card(
            backbone=BACKBONE,
            training_args=DISTILL_ARGS,
            info=info,
            projector="8192-8192-8192",
            results=results,
        ),
    )
    data = card.data
    assert data.library_name == "timm"
    assert data.pipeline_tag == "image-feature-extraction"
    assert {"mvmr", "distillation", "knowledge-distillation", "timm"} <= set(data.tags)
    assert data.base_model == "openai/clip-vit-base-patch16"
    assert data.datasets == ["tanganke/stl10"]
    assert data.license == "apache-2.0"
    assert data.model_name == "resnet50-kd"
    assert [(r.metric_config, r.metric_value, r.dataset_split) for r in data.eval_results] == [
        ("linear", 95.6, "test"),
        ("knn", 93.1, "test"),
    ]
    body = card.text
    assert 'timm.create_model("hf-hub:me/resnet50-kd", pretrained=True)' in body
    assert 'AutoModel.from_pretrained("me/resnet50-kd")' in body
    assert "mvmr-distill --config training_args.json" in body
    assert "2000 optimizer steps, batch size 512" in body
    assert "1x NVIDIA H100, 1 h 30 min" in body
    assert "β_k = teacher=2" in body
    # Saved arguments without the objective's form are the defaults: the released code's mean and R.
    assert "invariance mean over all elements; dCor R, biased estimator" in body
    printed = {**DISTILL_ARGS, "invariance_reduction": "sum", "dcor_squared": True}
    text = render_card(backbone=BACKBONE, training_args=printed, info=info, projector="8192-8192-8192")
    assert "sum over dimensions (eq. 4 as printed); dCor R², biased estimator" in text
    unbiased = {**DISTILL_ARGS, "dcor_estimator": "unbiased", "dcor_squared": None}
    text = render_card(backbone=BACKBONE, training_args=unbiased, info=info, projector="8192-8192-8192")
    assert "dCor R², bias-corrected estimator" in text
    assert "feature matching" not in body  # the paper's objective only (a run saved before the option too)
    matching = {**DISTILL_ARGS, "feature_matching_weight": 0.5}
    text = render_card(backbone=BACKBONE, training_args=matching, info=info, projector="8192-8192-8192")
    assert "dCor R, biased estimator; plus feature matching (not in the paper) with weight 0.5" in text
    assert "r_k(x))]` over the teachers, where `h` are the backbone features of `x` and" in text
    assert "the teachers saw the augmented view" not in text  # a run saved before --teacher-view
    on_augmented = {**matching, "teacher_view": "augmented"}
    text = render_card(backbone=BACKBONE, training_args=on_augmented, info=info, projector="8192-8192-8192")
    assert "each teacher's dCor term is `1 − dCor(z̃, r_k(x̃))`" in text
    assert "r_k(x̃))]` over the teachers, where `h` are the backbone features of `x̃` and" in text
    assert "feature matching" not in render_card(
        backbone=BACKBONE,
        training_args={**DISTILL_ARGS, "feature_matching_weight": 0.0},
        info=info,
        projector="8192-8192-8192",
    )
    assert "| linear | tanganke/stl10 | test | all | linear top-1 | 95.6 |" in body
    assert "23.5 M parameters" in body
    assert "- **Projector**: `8192-8192-8192`, kept in `projector.safetensors`" in text
    # distillation's default: the dCor terms compare the released features, with no projector to keep
    without = render_card(backbone=BACKBONE, training_args=on_augmented, info=info, projector="none")
    assert "- **Projector**: none: `z` and `z̃` are the backbone features themselves" in without
    assert "projector.safetensors" not in without


def test_pretraining_card_has_no_teacher_and_local_paths_are_not_linked(tmp_path):
    local_dataset = tmp_path / "digits"
    local_dataset.mkdir()
    args = {"student": "resnet18", "teacher": None, "dataset": str(local_dataset), "handcrafted": "hog,lsd"}
    card = _write(
        tmp_path, render_card(backbone=BACKBONE, training_args=args, info=CardInfo(), projector="64-64")
    )
    assert card.data.base_model is None
    assert card.data.datasets is None  # a local folder is no Hub dataset id
    assert "self-supervised" in card.data.tags
    assert "distillation" not in card.data.tags
    assert card.data.eval_results is None
    assert "mvmr-pretrain --config training_args.json" in card.text
    assert "`hog`, `lsd`" in card.text
    assert "Not evaluated yet" in card.text


def test_merge_results_replaces_remeasured_metrics_and_keeps_the_rest():
    old = [_result("linear", 90.0), _result("knn", 80.0), _result("linear", 91.0, split="validation")]
    merged = merge_results(old, [_result("linear", 95.0)])
    assert [(r.metric_config, r.dataset_split, r.metric_value) for r in merged] == [
        ("knn", "test", 80.0),
        ("linear", "validation", 91.0),
        ("linear", "test", 95.0),
    ]


def test_results_list_every_protocol_with_its_labels_and_command_and_parse_back(tmp_path):
    from mvmr_hf.evaluation.results import ProtocolResult, to_eval_results

    measured = [
        ProtocolResult("linear", 95.0, 99.5, "L-BFGS"),
        ProtocolResult("finetune", 80.0, 96.0, label_fraction=0.01),
        ProtocolResult("multilabel", None, None, mean_ap=71.234),
    ]
    command = "mvmr-evaluate --model runs/kd/student --dataset tanganke/stl10 --protocol linear"
    results = to_eval_results(measured, dataset="tanganke/stl10", config=None, split="test", command=command)
    text = render_card(
        backbone=BACKBONE, training_args=DISTILL_ARGS, info=CardInfo(), projector="8192", results=results
    )
    card = _write(tmp_path, text)
    parsed = card.data.eval_results
    assert [(r.task_type, r.dataset_name, r.dataset_split, r.metric_type, r.metric_config, r.metric_value)
            for r in parsed] == [
        ("image-classification", "tanganke/stl10", "test", "accuracy", "linear", 95.0),
        ("image-classification", "tanganke/stl10", "test", "accuracy", "linear", 99.5),
        ("image-classification", "tanganke/stl10", "test", "accuracy", "finetune-1%", 80.0),
        ("image-classification", "tanganke/stl10", "test", "accuracy", "finetune-1%", 96.0),
        ("image-classification", "tanganke/stl10", "test", "mAP", "multilabel", 71.23),
    ]  # fmt: skip
    assert parsed[2].metric_args == {"label_fraction": 0.01, "command": command}
    assert parsed[0].metric_args == {"command": command}
    assert "| finetune-1% | tanganke/stl10 | test | 1 % | finetune-1% top-1 | 80.0 |" in card.text
    assert f"- finetune-1% on tanganke/stl10, test split, 1 % labels: `{command}`" in card.text
    assert f"- linear on tanganke/stl10, test split, all labels: `{command}`" in card.text
    # Measured again by another command: replaced, not listed twice.
    again = to_eval_results(
        measured[:1], dataset="tanganke/stl10", config=None, split="test", command="other"
    )
    assert [r.metric_args["command"] for r in merge_results(results, again)] == [command] * 3 + ["other"] * 2


def test_read_results_round_trips_through_the_card(tmp_path):
    results = [_result("zero-shot", 61.25)]
    text = render_card(
        backbone=BACKBONE, training_args=DISTILL_ARGS, info=CardInfo(), projector="8192", results=results
    )
    (tmp_path / "README.md").write_text(text)
    assert read_results(tmp_path / "README.md") == results
    assert read_results(tmp_path / "missing.md") == []


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("openai/clip-vit-base-patch16", "openai/clip-vit-base-patch16"),
        ("/no/such/folder", None),
        (None, None),
    ],
)
def test_hub_id_or_none(name, expected):
    assert hub_id_or_none(name) == expected


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({}, ": `crop`, `flip`, `color`, `grayscale`, `blur` (the paper's augmentation, section 7)"),
        (
            {"augmentations": "crop,flip,color,grayscale,blur"},
            ": `crop`, `flip`, `color`, `grayscale`, `blur` (the paper's augmentation, section 7)",
        ),
        (
            {"augmentations": "crop,flip,color,grayscale"},
            ": `crop`, `flip`, `color`, `grayscale` only (the paper's Table 7 ablation)",
        ),
        (
            {"augmentations": ""},
            "none: x̃ had the framing of the non-augmented view x, without any random step",
        ),
        (
            {"augmentations": "crop,flip", "crop_scale": "0.5,1"},
            ": `crop`, `flip` only (the paper's Table 7 ablation), crops of 0.5-1 of the image's area (the "
            "paper's: 0.08-1)",
        ),
        ({"augmentations": "flip", "crop_scale": "0.5,1"}, ": `flip` only (the paper's Table 7 ablation)"),
    ],
    ids=["saved-before-the-option", "all-five", "without-blur", "none", "milder-crops", "no-crop"],
)
def test_card_says_which_steps_made_the_augmented_view(tmp_path, saved, expected):
    text = render_card(
        backbone=BACKBONE, training_args={**DISTILL_ARGS, **saved}, info=CardInfo(), projector="8192"
    )
    line = next(line for line in _write(tmp_path, text).text.splitlines() if "Augmented view" in line)
    assert line.endswith(expected), line
