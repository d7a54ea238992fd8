"""Semi-supervised fine-tuning (paper Table 1) on real digits: the subset, the gain over a linear probe,
the release as transformers and timm load it, resuming, 2 processes against 1, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from conftest import on_two_processes, snapshot
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import AutoImageProcessor, AutoModelForImageClassification

from mvmr_hf.cli.release import evaluate_main
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.errors import PREEMPTED_EXIT, ConfigError
from mvmr_hf.evaluation.features import extract_features, load_encoder
from mvmr_hf.evaluation.finetuning import global_batches, labelled_subset
from mvmr_hf.models.student import build_student
from mvmr_hf.release.export import export_student
from mvmr_hf.training.run_folder import PREEMPTED
from mvmr_hf.training.scaffold import StopRequest

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def random_releases(tmp_path_factory, digits) -> dict[str, Path]:
    """Randomly initialised students as releases: a batch-norm ResNet and a layer-norm ViT."""
    root = tmp_path_factory.mktemp("random")
    releases = {}
    for arch in ("test_resnet", "test_vit"):
        torch.manual_seed(0)
        student = build_student(arch, projector="16", image_size=32).eval()
        args = {"student": arch, "projector": "16", "dataset": str(digits)}
        releases[arch] = export_student(student, root / arch, training_args=args)
    return releases


def _finetune_argv(release: Path, digits: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(release), "--dataset", str(digits), "--protocol", "finetune",
        "--label-fraction", "0.1", "--finetune-batch-size", "32", "--finetune-learning-rate", "1e-3",
        "--finetune-dir", str(out), "--cache-dir", "", "--batch-size", "128", *extra,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- the labelled subset


def test_labelled_subset_is_class_balanced_deterministic_and_half_rounds_up():
    labels = np.repeat(np.arange(4), [10, 25, 35, 130])  # 200 images, unbalanced classes
    rows = labelled_subset(labels.tolist(), 0.1, seed=3)
    # Every class keeps 10 % of its images, rounded half up (2.5 -> 3, 3.5 -> 4), at least one.
    assert np.bincount(labels[rows]).tolist() == [1, 3, 4, 13]
    assert rows == sorted(set(rows))
    assert rows == labelled_subset(labels.tolist(), 0.1, seed=3)
    assert rows != labelled_subset(labels.tolist(), 0.1, seed=4)
    assert labelled_subset(labels.tolist(), 1.0) == list(range(200))


def test_labelled_subset_refuses_fewer_images_than_classes():
    message = "labels 2 of the 200 training images, fewer than their 4 classes: raise it to at least 0.0175$"
    with pytest.raises(ConfigError, match=message):
        labelled_subset(np.repeat(np.arange(4), 50).tolist(), 0.01)
    assert len(labelled_subset(np.repeat(np.arange(4), 50).tolist(), 0.0175)) == 4


def test_global_batches_are_a_seeded_permutation_of_full_batches():
    rows = list(range(100, 170))
    batches = global_batches(rows, 32, seed=0, epoch=1)
    assert [len(b) for b in batches] == [32, 32]  # the incomplete last batch is dropped
    chosen = [row for batch in batches for row in batch]
    assert len(set(chosen)) == 64
    assert set(chosen) <= set(rows)
    assert batches == global_batches(rows, 32, seed=0, epoch=1)
    assert batches != global_batches(rows, 32, seed=0, epoch=2)


# ----------------------------------------------------------------------------- end to end on digits


@pytest.mark.slow
def test_finetuning_beats_the_linear_probe_on_the_same_labels_and_releases_a_classifier(
    digits, random_releases, tmp_path, capsys
):
    """10 % of the digits' labels (145 images): fine-tuning a random-init ResNet beats a linear probe
    (scikit-learn) of its frozen features on the same images; the classifier loads with transformers
    and timm, which agree with the reported accuracy; the backbone's card lists the protocol."""
    release = Path(shutil.copytree(random_releases["test_resnet"], tmp_path / "student"))
    out = tmp_path / "ft"
    assert (
        evaluate_main(_finetune_argv(release, digits, out, "--finetune-epochs", "100", "--update-card")) == 0
    )
    assert "finetune-10%" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = json.loads((out / "labelled_subset.json").read_text())["rows"]
    assert results["num_labelled"] == len(rows) == 145

    # The reference: scikit-learn's logistic regression on the frozen features of the same 145 images, with
    # the regularisation that scores best on the test split itself (an oracle: the strongest linear probe).
    encoder = load_encoder(str(release))
    train = extract_features(encoder, load_image_dataset(str(digits), split="train", streaming=False))
    test = extract_features(encoder, load_image_dataset(str(digits), split="test", streaming=False))
    scaler = StandardScaler().fit(train.features[rows].numpy())
    probe_top1 = max(
        100
        * LogisticRegression(C=c, max_iter=3000)
        .fit(scaler.transform(train.features[rows].numpy()), train.labels[rows])
        .score(scaler.transform(test.features.numpy()), test.labels.numpy())
        for c in (0.01, 0.1, 1.0, 10.0)
    )
    assert results["top1"] > probe_top1 + 4, (results["top1"], probe_top1)

    # The release, as transformers and timm load it, with the model's own processor.
    classifier = out / "classifier"
    model = AutoModelForImageClassification.from_pretrained(classifier).eval()
    processor = AutoImageProcessor.from_pretrained(classifier)
    timm_model = timm.create_model(f"local-dir:{classifier}", pretrained=True).eval()
    split = load_image_dataset(str(digits), split="test", streaming=False)
    inputs = processor([image.convert("RGB") for image in split["image"]], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(timm_model(inputs["pixel_values"]), logits, rtol=1e-4, atol=1e-4)
    transformers_top1 = 100 * (logits.argmax(1) == torch.tensor(split["label"])).float().mean().item()
    assert transformers_top1 == pytest.approx(results["top1"], abs=3)  # PIL resizing vs ours
    assert model.config.id2label == {i: str(i) for i in range(10)}

    # Both cards carry the result in model-index with the label fraction and the command.
    for card in (ModelCard.load(classifier / "README.md"), ModelCard.load(release / "README.md")):
        (top1,) = [r for r in card.data.eval_results if r.metric_name == "finetune-10% top-1"]
        expected = ("test", "finetune-10%", round(results["top1"], 2))
        assert (top1.dataset_split, top1.metric_config, top1.metric_value) == expected
        assert top1.metric_args["label_fraction"] == 0.1
        assert "--protocol finetune --label-fraction 0.1" in top1.metric_args["command"]
    assert (
        "finetune-10% on digits, test split, 10 % labels: `mvmr-evaluate"
        in (release / "README.md").read_text()
    )


def test_resumed_finetuning_ends_with_the_weights_of_an_uninterrupted_one(digits, random_releases, tmp_path):
    release = random_releases["test_resnet"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert evaluate_main(_finetune_argv(release, digits, straight, "--finetune-max-steps", "6")) == 0
    # Stopped after 4 steps (an epoch of 145 images is 4 steps: it continues in the second epoch).
    assert evaluate_main(_finetune_argv(release, digits, resumed, "--finetune-max-steps", "5",
                                        "--checkpoint-every", "2")) == 0  # fmt: skip
    # Continued from its own record, as the README's `mvmr-distill runs/kd/training_args.json --resume` is.
    saved = resumed / "training_args.json"
    assert json.loads(saved.read_text())["test_split"] == "test"
    assert evaluate_main([str(saved), "--finetune-max-steps", "6", "--resume"]) == 0
    one, two = (load_file(folder / "classifier" / "model.safetensors") for folder in (straight, resumed))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 6]


def test_a_stop_signal_saves_a_checkpoint_and_exits_75_and_resume_finishes_the_run(
    digits, random_releases, tmp_path, monkeypatch, capsys
):
    """SIGTERM (as SLURM sends before a kill) during step 3: the step finishes, is saved, exit 75; --resume
    then ends with the weights of an uninterrupted run."""
    release = random_releases["test_resnet"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert evaluate_main(_finetune_argv(release, digits, straight, "--finetune-max-steps", "6")) == 0
    calls = []
    agreed = StopRequest.agreed

    def signal_at_step_3(self, accelerator):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return agreed(self, accelerator)

    monkeypatch.setattr(StopRequest, "agreed", signal_at_step_3)
    argv = _finetune_argv(release, digits, stopped, "--finetune-max-steps", "6")
    assert evaluate_main(argv) == PREEMPTED_EXIT
    assert "preempted: SIGTERM after step 3" in capsys.readouterr().err
    assert [path.name for path in (stopped / "checkpoints").iterdir()] == ["step-000003"]
    marker = {"step": 3, "checkpoint": "checkpoints/step-000003", "signal": "SIGTERM"}
    assert json.loads((stopped / PREEMPTED).read_text()) == marker
    assert not (stopped / "classifier").exists()
    monkeypatch.setattr(StopRequest, "agreed", agreed)
    assert evaluate_main([*argv, "--resume"]) == 0
    assert not (stopped / PREEMPTED).exists()
    one, two = (load_file(folder / "classifier" / "model.safetensors") for folder in (straight, stopped))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


def test_two_processes_finetune_the_weights_of_one_process(digits, random_releases, tmp_path):
    """A layer-norm ViT (CPU processes cannot synchronise batch norm): 2 processes of 16 images each
    give the weights and the accuracy of 1 process with the same global batch of 32."""
    release = random_releases["test_vit"]
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--finetune-max-steps", "5", "--batch-size", "64")
    assert evaluate_main(_finetune_argv(release, digits, one, *extra)) == 0
    result = on_two_processes(tmp_path, "evaluate_main", _finetune_argv(release, digits, two, *extra))
    assert result.stdout.count("finetune-10%") == 1
    single, double = (load_file(folder / "classifier" / "model.safetensors") for folder in (one, two))
    for name in single:  # Adam divides by the gradients' RMS: a rounding difference moves a weight ~1e-5
        torch.testing.assert_close(double[name], single[name], rtol=1e-4, atol=1e-4)
    results = [json.loads((folder / "results.json").read_text()) for folder in (one, two)]
    assert results[1]["processes"] == 2
    assert results[1]["top1"] == pytest.approx(results[0]["top1"], abs=100 / 360)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tagged_digits(digits, tmp_path_factory) -> Path:
    """The digits with a label column of the wrong kind for fine-tuning: a list of classes per image."""
    folder = tmp_path_factory.mktemp("tagged")
    for split in ("train", "test"):
        rows = load_image_dataset(str(digits), split=split, streaming=False)
        rows = rows.map(lambda row: {"tags": [row["label"]]}, features=datasets.Features(
            {**rows.features, "tags": datasets.List(rows.features["label"])}))  # fmt: skip
        rows.to_parquet(str(folder / f"{split}.parquet"))
    load_image_dataset(str(folder), split="train", streaming=False)  # built once, silently: no progress bars
    return folder


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-fraction", "0"], "--label-fraction 0.0 is not a share of the labels in (0, 1]"),
        (["--label-fraction", "1.5"], "--label-fraction 1.5 is not a share of the labels in (0, 1]"),
        (["--label-fraction", "0.005"], "labels 7 of the 1437 training images, fewer than their 10 classes"),
        (["--finetune-batch-size", "256"], "the labelled subset holds 145 images, fewer than one batch"),
        (
            ["--label-column", "tags"],
            "label column 'tags' holds a list of classes per image: use --protocol multilabel",
        ),
        (["--label-column", "digit"], "label column 'digit' is not in the dataset"),
    ],
)
def test_bad_finetuning_input_is_one_line_exit_2_and_writes_nothing(
    digits, tagged_digits, random_releases, tmp_path, extra, message, capsys
):
    release = Path(shutil.copytree(random_releases["test_resnet"], tmp_path / "student"))
    before = snapshot(release)
    dataset = tagged_digits if "tags" in extra else digits
    argv = [*_finetune_argv(release, dataset, tmp_path / "ft"), "--update-card", *extra]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: ")
    assert message in err
    assert not (tmp_path / "ft").exists()
    assert snapshot(release) == before


def test_finetuning_refuses_another_runs_folder_and_a_transformers_model(digits, random_releases, teacher,
                                                                          tmp_path, capsys):  # fmt: skip
    out = tmp_path / "ft"
    assert (
        evaluate_main(
            _finetune_argv(random_releases["test_resnet"], digits, out, "--finetune-max-steps", "2")
        )
        == 0
    )
    before = snapshot(out)
    capsys.readouterr()
    assert (
        evaluate_main(
            _finetune_argv(random_releases["test_resnet"], digits, out, "--finetune-max-steps", "3")
        )
        == 2
    )
    assert "holds the checkpoints of another run: pass --resume" in capsys.readouterr().err
    assert snapshot(out) == before
    assert evaluate_main(_finetune_argv(teacher, digits, tmp_path / "t")) == 2
    assert (
        "is a transformers model: --protocol finetune fine-tunes a timm backbone" in capsys.readouterr().err
    )
