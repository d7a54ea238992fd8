"""``mvmr-distill`` / ``mvmr-pretrain`` command lines: options, config files, and bad input.

Every bad input must give exit status 2, one line on stderr and no traceback, and must write
nothing: the run is checked completely before its output folder is created.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import read_metrics, reset_accelerate, snapshot, tiny_args

from mvmr_hf.cli import parse_arguments
from mvmr_hf.cli.train import DISTILL_GROUPS, distill_main, pretrain_main
from mvmr_hf.config import (
    DEFAULT_DISTILL_DATASET,
    DataArguments,
    FinetuneArguments,
    LossArguments,
    ModelArguments,
    PretrainModelArguments,
    TrainingArguments,
)
from mvmr_hf.config.options import RunArguments
from mvmr_hf.models.representations.teacher import OUTPUT_KINDS
from mvmr_hf.release.export import load_student
from mvmr_hf.storage.checkpoint import TRAINER_STATE, checkpoint_path
from mvmr_hf.training import loop as training

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
PRETRAIN_GROUPS = [PretrainModelArguments, DataArguments, LossArguments, TrainingArguments]


def _tiny(digits: Path, output_dir: Path) -> list[str]:
    return tiny_args(digits, output_dir, "--max-steps", "1", "--handcrafted", "lsd")


def _fails_cleanly(main, argv: list[str], capsys, folder: Path, match: str) -> str:
    before = snapshot(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    assert "\n" not in err
    assert "Traceback" not in err
    assert match in err, err
    assert snapshot(folder) == before, "a rejected run must not write anything"
    return err


BAD_PRETRAIN_INPUT = [
    pytest.param(["--dataset", "/no/such/folder"], "does not exist", id="missing-dataset-path"),
    pytest.param(["--split", "validation"], "Unknown split 'validation'", id="unknown-split"),
    pytest.param(["--image-column", "photo"], "'image', 'label'", id="missing-image-column-lists-columns"),
    pytest.param(["--student", "resnet_does_not_exist"], "resnet_does_not_exist", id="unknown-student"),
    pytest.param(["--handcrafted", "hog,sift"], "sift", id="unknown-representation"),
    pytest.param(["--projector", "64-x"], "64-x", id="malformed-projector"),
    pytest.param(["--batch-size", "1"], "--batch-size 1", id="global-batch-below-2"),
    pytest.param(
        ["--batch-size", "3", "--dcor-estimator", "unbiased"],
        "at least 4",
        id="global-batch-below-4-unbiased",
    ),
    pytest.param(
        ["--dcor-estimator", "unbiased", "--dcor-squared", "false"], "only squared", id="unbiased-not-squared"
    ),
    pytest.param(["--representation-weights", "teacher=2"], "teacher", id="weight-for-unused-representation"),
    pytest.param(["--representation-weights", "lsd:2"], "name=number", id="malformed-weights"),
    pytest.param(["--learning-rate", "0"], "--learning-rate", id="zero-learning-rate"),
    pytest.param(
        ["--view-source-size", "16"], "--view-source-size must be an integer >= 32", id="small-source"
    ),
    pytest.param(["--mixed-precision", "fp8"], "invalid choice", id="bad-choice"),
    pytest.param(["--resume", "/no/such/checkpoint"], "not a complete checkpoint", id="resume-path-missing"),
    pytest.param(["--resume", "--overwrite"], "contradict", id="resume-and-overwrite"),
    pytest.param(["--no-such-option", "1"], "--no-such-option", id="unknown-option"),
    pytest.param(["--log-with", "tensorbored"], "not an Accelerate tracker", id="unknown-tracker"),
    pytest.param(["--push-to-hub", "not a repo id"], "not a Hub repository id", id="bad-hub-id"),
    pytest.param(
        ["--augmentations", "crop,zoom"], "crop, flip, color, grayscale, blur", id="unknown-augmentation"
    ),
    pytest.param(["--augmentations", "flip,crop,flip"], "flip twice", id="repeated-augmentation"),
    pytest.param(["--crop-scale", "0.5"], "--crop-scale takes MIN,MAX", id="crop-scale-one-number"),
    pytest.param(["--crop-scale", "0,1"], "0 < MIN <= MAX <= 1", id="crop-scale-zero"),
    pytest.param(
        ["--decode-on-device"], "a CUDA GPU, but this run's device is cpu", id="decode-without-cuda"
    ),
    # A term through each teacher's output: there is no teacher to match in pretraining.
    pytest.param(
        ["--feature-matching-weight", "1"], "--feature-matching-weight", id="feature-matching-no-teacher"
    ),
]


@pytest.mark.parametrize(("extra", "match"), BAD_PRETRAIN_INPUT)
def test_bad_pretrain_input_is_one_line_exit_2_and_writes_nothing(digits, tmp_path, capsys, extra, match):
    _fails_cleanly(pretrain_main, _tiny(digits, tmp_path / "run") + extra, capsys, tmp_path, match)
    assert not (tmp_path / "run").exists()


def test_missing_teacher_is_rejected(digits, tmp_path, capsys):
    argv = [*_tiny(digits, tmp_path / "run"), "--teacher", str(tmp_path / "no-teacher")]
    _fails_cleanly(distill_main, argv, capsys, tmp_path, "no-teacher")


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        pytest.param(["--image-column", "photo"], "'image', 'label'", id="image-column"),
        pytest.param(["--batch-size", "4096"], "fewer than 4096 per process", id="too-few-images"),
    ],
)
def test_the_data_is_checked_before_any_teacher_loads(digits, tmp_path, capsys, extra, match):
    """A teacher that cannot load (a missing folder) is never reached: the data's own error is the line."""
    argv = [*_tiny(digits, tmp_path / "run"), "--teacher", str(tmp_path / "no-teacher"), *extra]
    err = _fails_cleanly(distill_main, argv, capsys, tmp_path, match)
    assert "no-teacher" not in err


def test_too_few_images_is_told_before_no_streaming_converts_the_split(
    digits, tmp_path, tmp_path_factory, capsys, monkeypatch
):
    """--no-streaming with a fresh cache: the image count comes from the parquet footers, so the split is
    refused before datasets converts it (no Arrow file, no conversion bars before the line)."""
    cache = tmp_path_factory.mktemp("fresh-datasets-cache")  # datasets' lock files: outside the run's folder
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    argv = [*_tiny(digits, tmp_path / "run"), "--no-streaming", "--batch-size", "4096"]
    err = _fails_cleanly(distill_main, argv, capsys, tmp_path, "fewer than 4096 per process")
    assert "Generating" not in err
    assert not list(cache.rglob("*.arrow"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        pytest.param(["--feature-matching-weight", "-1"], "--feature-matching-weight is -1.0", id="negative"),
        pytest.param(
            ["--feature-matching-weight", "0.5", "--teacher-output", "tokens"],
            "needs a pooled teacher output but teacher gives tokens",
            id="tokens",
        ),
        pytest.param(
            ["--cache-teacher"],
            "add --teacher-view non-augmented, or drop --cache-teacher",
            id="cache-of-a-view-the-teacher-never-sees",
        ),
    ],
)
def test_bad_teacher_terms_are_one_line_exit_2_and_writes_nothing(
    digits, teacher, tmp_path, capsys, extra, match
):
    argv = [*_tiny(digits, tmp_path / "run"), "--teacher", str(teacher), *extra]
    _fails_cleanly(distill_main, argv, capsys, tmp_path, match)
    assert not (tmp_path / "run").exists()


def test_a_folder_with_another_runs_checkpoints_is_left_alone(digits, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = checkpoint_path(run, 5)
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": 5, "epoch": 0, "num_processes": 1}))
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    _fails_cleanly(pretrain_main, _tiny(digits, run), capsys, tmp_path, "--resume")


def test_a_release_folder_that_is_not_a_release_is_left_alone(digits, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "notes.txt").write_text("mine")
    _fails_cleanly(pretrain_main, _tiny(digits, run), capsys, tmp_path, "is not a release folder")


def test_resuming_with_other_settings_is_rejected(digits, tmp_path, capsys):
    run = tmp_path / "run"
    checkpoint = checkpoint_path(run, 5)
    checkpoint.mkdir(parents=True)
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": 5, "epoch": 0, "num_processes": 1}))
    saved = {"student": "resnet18", "max_steps": 3, "channels_last": True, "compile": True}
    (run / "training_args.json").write_text(json.dumps(saved))
    err = _fails_cleanly(pretrain_main, [*_tiny(digits, run), "--resume"], capsys, tmp_path, "other settings")
    assert "student: 'resnet18' -> 'test_resnet'" in err
    for setting in ("max_steps", "channels_last", "compile"):  # they do not change what is trained
        assert setting not in err


def test_a_run_saved_before_an_option_existed_resumes_as_it_ran(digits, teacher, tmp_path, capsys):
    """A training_args.json from before --feature-matching-weight, --teacher-view and --crop-scale
    lacks them: that run had no feature matching and the paper's crops, whatever the defaults are now."""
    run = tmp_path / "run"
    before = ["--feature-matching-weight", "0", "--teacher-view", "non-augmented", "--crop-scale",
              "0.08,1"]  # fmt: skip
    argv = [*tiny_args(digits, run, "--max-steps", "1", "--teacher", str(teacher)), "--checkpoint-every", "1"]
    assert distill_main([*argv, *before]) == 0
    saved = json.loads((run / "training_args.json").read_text())
    for key in ("feature_matching_weight", "teacher_view", "crop_scale"):
        del saved[key]
    (run / "training_args.json").write_text(json.dumps(saved))
    capsys.readouterr()

    longer = [*argv, "--max-steps", "2", "--resume"]
    for changed, line in (
        (["--feature-matching-weight", "1"], "feature_matching_weight: 0.0 -> 1.0"),
        (["--crop-scale", "0.5,1"], "crop_scale: '0.08,1' -> '0.5,1'"),
    ):
        err = _fails_cleanly(distill_main, [*longer, *before, *changed], capsys, tmp_path, "other settings")
        assert line in err
        reset_accelerate()
    assert distill_main([*longer, *before]) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2]


def test_resuming_a_finished_run_keeps_its_release_and_a_longer_run_counts_the_whole_time(
    digits, tmp_path, capsys
):
    """`mvmr-distill runs/kd/training_args.json --resume` on a run that has finished leaves its release
    as it is (its card may hold evaluation results since); a resume that trains on re-exports it, with
    the training seconds of the steps before the checkpoint included."""
    run, release = tmp_path / "run", tmp_path / "run" / "student"
    assert pretrain_main(tiny_args(digits, run, "--max-steps", "2")) == 0
    with (release / "README.md").open("a") as card:
        card.write("\nresults of an evaluation written after training\n")
    before = snapshot(release)
    capsys.readouterr()
    reset_accelerate()
    assert pretrain_main([str(run / "training_args.json"), "--resume"]) == 0
    assert "already reached its last step, 2" in capsys.readouterr().err
    assert snapshot(release) == before

    reset_accelerate()
    first = json.loads((checkpoint_path(run, 2) / "run_info.json").read_text())["training_seconds"]
    assert pretrain_main([str(run / "training_args.json"), "--resume", "--max-steps", "3"]) == 0
    facts = json.loads((release / "run_info.json").read_text())
    assert facts["step"] == 3
    assert facts["training_seconds"] > first


def test_config_file_then_flags_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": "d",
                "output_dir": "o",
                "batch_size": 32,
                "learning_rate": "3e-4",
                "streaming": False,
                "handcrafted": ["hog", "lsd"],
                "representation_weights": {"hog": 0.5},
            }
        )
    )
    model, data, loss, training = parse_arguments(
        PRETRAIN_GROUPS, [str(config), "--batch-size", "64"], prog="t"
    )
    assert (training.batch_size, training.learning_rate, data.streaming) == (64, 3e-4, False)
    assert (model.handcrafted, loss.representation_weights) == ("hog,lsd", "hog=0.5")
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"dataset": "d", "output_dir": "o", "resume": "latest"}))
    *_, training = parse_arguments(PRETRAIN_GROUPS, ["--config", str(json_config)], prog="t")
    assert training.resume == "latest"


def test_bad_config_files_are_rejected(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: d\noutput_dir: o\nbatchsize: 3\n")
    with pytest.raises(ValueError, match="unknown keys batchsize"):
        parse_arguments(PRETRAIN_GROUPS, [str(config)], prog="t")
    with pytest.raises(ValueError, match="does not exist"):
        parse_arguments(PRETRAIN_GROUPS, ["--config", str(tmp_path / "none.yaml")], prog="t")


def test_defaults_follow_the_paper():
    model, data, loss, training = parse_arguments(
        PRETRAIN_GROUPS, ["--dataset", "d", "--output-dir", "o"], prog="t"
    )
    assert model.handcrafted == "pixels,augmented-pixels,scatnet,hog,lsd"
    assert (model.student, model.projector, data.streaming) == ("resnet50", "8192-8192-8192", True)
    assert (training.learning_rate, training.weight_decay) == (1e-4, 1e-6)
    assert (loss.invariance_weight, loss.variance_weight, loss.view_weight) == (1.0, 1.0, 1.0)
    assert (loss.dcor_scope, loss.dcor_estimator) == ("global", "biased")
    assert (training.channels_last, training.compile) == (None, False)  # None: channels-last on CUDA only
    assert data.augmentations == "crop,flip,color,grayscale,blur"  # section 7: all five


def test_augmentations_are_saved_in_the_order_they_run(tmp_path):
    """So that --resume sees "flip,crop" and "crop,flip" as one setting; a YAML list works too."""
    values = []
    for given in (["--augmentations", " Flip, crop"], ["--augmentations", ""]):
        _, data, *_ = parse_arguments(
            PRETRAIN_GROUPS, ["--dataset", "d", "--output-dir", "o", *given], prog="t"
        )
        values.append(data.augmentations)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"dataset": "d", "output_dir": "o", "augmentations": ["blur", "color"]}))
    _, data, *_ = parse_arguments(PRETRAIN_GROUPS, [str(config)], prog="t")
    assert [*values, data.augmentations] == ["crop,flip", "", "color,blur"]


def test_the_chosen_augmentations_reach_the_loader_and_the_card(digits, tmp_path, monkeypatch):
    """The paper's Table 7 ablation from the command line: the training loop's views are made with
    the chosen steps only, and training_args.json and the release's card say which."""
    loaders = []
    build_dataloader = training.build_dataloader

    def recording(*args, **kwargs):
        loader, stats = build_dataloader(*args, **kwargs)
        loaders.append(loader)
        return loader, stats

    monkeypatch.setattr(training, "build_dataloader", recording)
    run = tmp_path / "run"
    assert pretrain_main([*_tiny(digits, run), "--augmentations", "flip,crop"]) == 0
    (loader,) = loaders
    assert loader.dataset.augment.augmentations == ("crop", "flip")
    assert json.loads((run / "training_args.json").read_text())["augmentations"] == "crop,flip"
    card = (run / "student" / "README.md").read_text()
    assert "**Augmented view `x̃`**: `crop`, `flip` only (the paper's Table 7 ablation)" in card


def test_without_num_workers_each_process_gets_its_share_of_the_cores(digits, tmp_path, monkeypatch):
    """No --num-workers: the loader gets the cores this process may use shared among the machine's
    processes (2 of 6 with 3 processes), and training_args.json keeps the choice automatic, so a resume on
    another machine takes that machine's share."""
    workers = []
    build_dataloader = training.build_dataloader

    def recording(*args, **kwargs):
        workers.append(kwargs["num_workers"])
        return build_dataloader(*args, **kwargs)

    monkeypatch.setattr(training, "build_dataloader", recording)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    argv = _tiny(digits, tmp_path / "run")
    del argv[argv.index("--num-workers") : argv.index("--num-workers") + 2]
    assert pretrain_main(argv) == 0
    assert workers == [2]
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["num_workers"] is None


def test_distillation_by_default_has_no_projector_and_its_release_trains_on(digits, teacher, tmp_path):
    """Distillation's default, no projector: the teacher terms see the backbone's pooled features (the
    student's embedding is its features), and the release, backbone alone, loads back to train on."""
    run = tmp_path / "run"
    argv = tiny_args(digits, run, "--max-steps", "1", "--teacher", str(teacher))
    del argv[argv.index("--projector") : argv.index("--projector") + 2]
    assert distill_main(argv) == 0
    assert json.loads((run / "training_args.json").read_text())["projector"] == "none"
    student = load_student(run / "student").eval()
    with torch.no_grad():
        output = student(torch.rand(2, 3, 32, 32))
    assert torch.equal(output.embedding, output.features)
    assert "- **Projector**: none" in (run / "student" / "README.md").read_text()


def test_distill_without_flags_is_the_papers_schedule_with_the_measured_objective():
    model, teacher, data, loss, training = parse_arguments(DISTILL_GROUPS, [], prog="t")
    assert (model.student, model.projector, model.handcrafted) == ("resnet50", "none", "")
    assert (teacher.teacher, teacher.teacher_output) == ("openai/clip-vit-base-patch16", "auto")
    assert (data.dataset, data.split, data.image_size) == (DEFAULT_DISTILL_DATASET, "train", 224)
    assert (training.output_dir, training.batch_size, training.epochs) == ("runs/distill", 512, 200)
    assert (training.learning_rate, training.weight_decay, training.warmup) == (1e-4, 1e-6, 0.05)
    # The released code's estimator, which bench_quality.py measured best: F.mse_loss invariance and R.
    assert (loss.invariance_reduction, loss.dcor_estimator, loss.dcor_squared) == ("mean", "biased", None)
    # What bench_quality_fashion.py measured best (README, "Quality"): the teacher's dCor term with feature
    # matching on one mildly augmented view, both on the backbone's features (no projector); pretraining keeps
    # the paper's L1 and L2, its projector and its augmentation.
    assert (loss.invariance_weight, loss.variance_weight, loss.view_weight) == (0.0, 0.0, 0.0)
    assert (teacher.feature_matching_weight, teacher.teacher_view) == (4.0, "augmented")
    assert (data.augmentations, data.crop_scale) == ("crop,flip", "0.8,1")
    model, data, loss, _ = parse_arguments(PRETRAIN_GROUPS, ["--dataset", "d", "--output-dir", "o"], prog="t")
    assert model.projector == "8192-8192-8192"  # L1 and L2 compare the projector's embeddings, as the paper's
    assert (loss.invariance_weight, loss.variance_weight, loss.view_weight) == (1.0, 1.0, 1.0)
    assert (data.augmentations, data.crop_scale) == ("crop,flip,color,grayscale,blur", "0.08,1")


@pytest.mark.parametrize("preset", [*DISTILL_GROUPS[:1], *DISTILL_GROUPS[2:], PretrainModelArguments])
def test_a_commands_defaults_are_a_preset_of_the_same_fields(preset):
    """A preset changes defaults and extends help texts only: the fields, types and order are its base's."""
    pairs = list(zip(fields(preset), fields(preset.__mro__[1]), strict=True))
    assert all(
        (ours.name, ours.type, ours.kw_only) == (its.name, its.type, its.kw_only) for ours, its in pairs
    )
    assert any(ours.default != its.default for ours, its in pairs)
    assert all(ours.metadata["help"].startswith(its.metadata["help"]) for ours, its in pairs)


def test_training_and_fine_tuning_share_their_run_options():
    shared = {item.name for item in fields(RunArguments)}
    assert shared <= {item.name for item in fields(TrainingArguments)} & {
        item.name for item in fields(FinetuneArguments)
    }
    assert (TrainingArguments(output_dir="o").checkpoint_every, FinetuneArguments().checkpoint_every) == (
        1000,
        500,
    )


def test_comma_lists_are_parsed_once_and_saved_as_given():
    """The typed attributes are no fields: training_args.json (asdict) keeps the comma lists as text."""
    model = ModelArguments(handcrafted="hog, lsd")
    loss = LossArguments(representation_weights="teacher=2,hog=0.5")
    training = TrainingArguments(output_dir="o", log_with="tensorboard", stop_signals="SIGTERM")
    assert (model.handcrafted_names, loss.weights) == (("hog", "lsd"), {"teacher": 2.0, "hog": 0.5})
    assert (training.trackers, training.signals()) == (["tensorboard"], [signal.SIGTERM])
    assert asdict(model)["handcrafted"] == "hog, lsd"
    assert "handcrafted_names" not in asdict(model)
    assert {*asdict(loss), *asdict(training)}.isdisjoint({"weights", "trackers", "_signals"})


def test_the_command_users_type_offline_names_what_it_could_not_reach(tmp_path):
    """`accelerate launch examples/distill.py --student resnet50` on a machine without the Hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "distill.py"), "--student", "resnet50"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert DEFAULT_DISTILL_DATASET in result.stderr or "openai/clip-vit-base-patch16" in result.stderr
    assert "local folder" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_channels_last_is_a_flag_with_an_optional_value():
    values = {}
    for flags in (["--channels-last"], ["--channels-last", "false"], ["--channels-last", "true"]):
        *_, training = parse_arguments(
            PRETRAIN_GROUPS, ["--dataset", "d", "--output-dir", "o", *flags], prog="t"
        )
        values[" ".join(flags)] = training.channels_last
    assert values == {"--channels-last": True, "--channels-last false": False, "--channels-last true": True}


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        distill_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--student", "--teacher", "--teacher-output", "--dataset", "--dataset-config", "--split",
        "--image-column", "--streaming", "--image-size", "--batch-size", "--grad-accum", "--epochs",
        "--max-steps", "--learning-rate", "--warmup", "--handcrafted", "--projector", "--invariance-weight",
        "--variance-weight", "--view-weight", "--representation-weights", "--dcor-estimator",
        "--dcor-squared", "--dcor-scope", "--mixed-precision", "--output-dir", "--checkpoint-every",
        "--keep-checkpoints", "--resume", "--overwrite", "--seed", "--log-with", "--log-every",
        "--num-workers", "--cache-teacher", "--push-to-hub", "--trust-remote-code", "--debug", "--config",
        "--channels-last", "--compile", "--augmentations", "--feature-matching-weight",
        "--teacher-view", "--crop-scale",
    ):  # fmt: skip
        assert option in text, option
    help_of_teacher_output = " ".join(
        text.split("--teacher-output TEACHER_OUTPUT, --teacher_output")[1].split("--cache")[0].split()
    )
    for kind in OUTPUT_KINDS:
        assert kind in help_of_teacher_output, kind


def test_the_real_command_line_prints_one_line(digits, tmp_path):
    """Outside pytest's capture too: no warning, log line or traceback around the error."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "pretrain.py"),
            *_tiny(digits, tmp_path / "run"),
            "--split",
            "nope",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ")
    assert not (tmp_path / "run").exists()


def _parquet(folder: Path, tables: list) -> Path:
    """``tables`` as the parquet shards of a local data set's train split; returns the data set's folder."""
    (folder / "data").mkdir(parents=True)
    for index, table in enumerate(tables):
        table.to_parquet(str(folder / "data" / f"train-{index:05d}-of-{len(tables):05d}.parquet"))
    return folder


def test_every_planned_step_runs_whatever_the_workers(digits, tmp_path):
    """48 images in 2 shards, batches of 16, 4 workers, 2 epochs: 6 steps planned and run (per-worker
    batching ran 4 of them and exited 0)."""
    table = datasets.load_dataset(str(digits), split="train").select(range(48))
    data = _parquet(tmp_path / "data", [table.select(range(24)), table.select(range(24, 48))])
    run = tmp_path / "run"
    argv = tiny_args(data, run, "--handcrafted", "lsd", "--batch-size", "16", "--num-workers", "4",
                     "--epochs", "2", "--log-every", "1")  # fmt: skip
    assert pretrain_main(argv) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_an_epoch_without_a_full_batch_names_the_undecodable_images(digits, tmp_path, capsys):
    """16 rows, 4 of them not images, batches of 14: the split is large enough, its decodable part is not."""
    good = datasets.load_dataset(str(digits), split="train").select(range(12))
    html = {"bytes": b"<html>404</html>", "path": None}
    bad = datasets.Dataset.from_dict({"image": [html] * 4, "label": [0] * 4}, features=good.features)
    data = _parquet(tmp_path / "data", [datasets.concatenate_datasets([good, bad])])
    argv = tiny_args(data, tmp_path / "run", "--handcrafted", "lsd", "--batch-size", "14", "--epochs", "1")
    assert pretrain_main(argv) == 1
    err = capsys.readouterr().err
    assert "epoch 0 gave no full batch of 14 images" in err
    assert "fewer decodable images" in err
