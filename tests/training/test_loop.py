"""End-to-end single-process runs of both entry points (checkpoints and the teacher cache: own modules)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from conftest import fake_checkpoint, read_metrics, reset_accelerate, tiny_args
from safetensors.torch import load_file

from mvmr_hf.cli.train import distill_main, pretrain_main
from mvmr_hf.loss.objective import MVMRLoss
from mvmr_hf.models.representations.teacher import Teacher, load_teacher
from mvmr_hf.models.student import Student, build_student
from mvmr_hf.release.export import load_student
from mvmr_hf.storage.checkpoint import (
    TRAINER_STATE,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
)
from mvmr_hf.training import loop as training
from mvmr_hf.training.teacher_cache import TeacherCache

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- end-to-end runs


def _tiny(digits, output_dir, *extra):
    """A tiny run (:func:`conftest.tiny_args`) that logs every step."""
    return tiny_args(digits, output_dir, "--log-every", "1", *extra)


TERMS = ("loss", "invariance", "variance", "dcor/views", "dcor/lsd")


def _assert_trains_alike(expected, run, *, rel):
    """``run`` logged the losses of ``expected`` within ``rel``, and saved and released the same format."""
    for a, b in zip(read_metrics(expected), read_metrics(run), strict=True):
        assert a["step"] == b["step"]
        for name in TERMS:
            assert b[name] == pytest.approx(a[name], rel=rel), (a["step"], name)
    weights = load_file(latest_checkpoint(run) / "model.safetensors")
    assert weights.keys() == load_file(latest_checkpoint(expected) / "model.safetensors").keys()
    model = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[f"backbone.{key}"]), key
    for key, value in load_student(run / "student").state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_pretrain_end_to_end(digits, tmp_path, capsys):
    run = tmp_path / "run"
    argv = _tiny(digits, run, "--handcrafted", "hog,lsd", "--max-steps", "3", "--grad-accum", "2",
                 "--checkpoint-every", "2", "--keep-checkpoints", "1", "--warmup", "0",
                 "--log-with", "tensorboard")  # fmt: skip
    assert pretrain_main(argv) == 0
    assert "skipped 0 images" in capsys.readouterr().err

    args = json.loads((run / "training_args.json").read_text())
    assert (args["student"], args["handcrafted"], args["grad_accum"], args["batch_size"]) == (
        "test_resnet",
        "hog,lsd",
        2,
        8,
    )
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    terms = ["invariance", "variance", "dcor/views", "dcor/hog", "dcor/lsd"]
    for m in metrics:
        assert set(m) == {"step", "epoch", "loss", *terms, "lr", "images_per_s", "skipped"}
        assert m["loss"] == pytest.approx(sum(m[t] for t in terms), rel=1e-5)
        assert m["images_per_s"] > 0
        assert m["skipped"] == 0
        # No warm-up, then a cosine from 1e-4 to 0 over 3 steps, stepped once per optimizer step.
        assert m["lr"] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * m["step"] / 3)), abs=1e-12)

    assert list((run / "logs").rglob("events.out.tfevents.*")), "the tensorboard tracker wrote nothing"

    # Checkpoints every 2 steps and at the end, the newest one kept, holding the Student's keys.
    assert [p.name for p in list_checkpoints(run)] == ["step-000003"]
    state = read_trainer_state(latest_checkpoint(run))
    assert (state["step"], state["num_processes"]) == (3, 1)
    weights = load_file(latest_checkpoint(run) / "model.safetensors")
    assert {key.split(".")[0] for key in weights} == {"backbone", "projector"}

    # The release folder loads with timm and holds the trained backbone.
    model = timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[f"backbone.{key}"]), key


@pytest.fixture
def teacher_calls(monkeypatch) -> list[int]:
    """The batch size of every teacher forward during training, in order (not the feature-matching
    heads' width probe before it)."""
    calls: list[int] = []
    probing = []
    forward, build_heads = Teacher.forward, training.build_feature_matching

    def recording(self, images):
        if not probing:
            calls.append(len(images))
        return forward(self, images)

    def building(*args, **kwargs):
        probing.append(True)
        try:
            return build_heads(*args, **kwargs)
        finally:
            probing.clear()

    monkeypatch.setattr(Teacher, "forward", recording)
    monkeypatch.setattr(training, "build_feature_matching", building)
    return calls


def test_distill_teacher_cache_gives_the_same_losses(digits, teacher, tmp_path, teacher_calls):
    calls = teacher_calls
    # 32 images, 2 batches per epoch, 2 epochs: the second epoch must read the teacher from the cache.
    # The teacher on x, which the cache holds (on x̃, distillation's default, it runs every step:
    # test_the_teacher_on_the_augmented_view_sees_what_the_student_saw).
    common = ["--teacher", str(teacher), "--no-streaming", "--split", "train[:32]", "--batch-size", "16",
              "--epochs", "2", "--seed", "3", "--teacher-view", "non-augmented"]  # fmt: skip
    assert distill_main(_tiny(digits, tmp_path / "plain", *common)) == 0
    assert calls == [16] * 4
    calls.clear()
    reset_accelerate()
    assert distill_main(_tiny(digits, tmp_path / "cached", *common, "--cache-teacher")) == 0
    assert calls == [16] * 2, "the second epoch ran the teacher instead of reading the cache"

    plain, cached = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "cached")
    assert [m["step"] for m in plain] == [1, 2, 3, 4]
    assert [m["epoch"] for m in plain] == [0, 0, 1, 1]
    for a, b in zip(plain, cached, strict=True):
        for name in ("loss", "invariance", "variance", "dcor/views", "dcor/teacher", "match/teacher"):
            assert a[name] == b[name], name  # bit for bit: the cache stores the teacher's exact outputs
    (folder,) = (tmp_path / "cached" / "teacher_cache").iterdir()
    assert len(TeacherCache(folder)) == 32
    assert json.loads((folder / "fingerprint.json").read_text())["image_size"] == 32


def test_teacher_cache_runs_the_teacher_only_on_images_it_lacks(digits, teacher, tmp_path, teacher_calls):
    """An epoch that drops its incomplete last batch leaves a few images uncached: only they run later."""
    calls = teacher_calls
    # 40 images in batches of 16: each epoch uses 32 and drops 8, so epoch 2 meets a few unseen images.
    common = ["--teacher", str(teacher), "--no-streaming", "--split", "train[:40]", "--batch-size", "16",
              "--epochs", "2", "--seed", "3", "--teacher-view", "non-augmented"]  # fmt: skip
    assert distill_main(_tiny(digits, tmp_path / "plain", *common)) == 0
    calls.clear()
    reset_accelerate()
    assert distill_main(_tiny(digits, tmp_path / "cached", *common, "--cache-teacher")) == 0
    assert calls[:2] == [16, 16], calls
    # Epoch 2 ran the teacher only on the images epoch 1 dropped (at most 8 of them), never on whole batches.
    assert calls[2:], "epoch 2 met no unseen image: pick another seed for this test"
    assert all(0 < size < 16 for size in calls[2:]), calls
    assert sum(calls[2:]) <= 8
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "cached"), strict=True):
        for name in ("loss", "dcor/teacher"):
            # Cached and fresh rows assembled in batch order; a matmul over 3 rows may round differently
            # from one over 16 (measured: 2e-7 relative), so equal to rounding rather than bit for bit.
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-7), name


def test_channels_last_trains_like_the_default_and_releases_the_same_format(digits, tmp_path, monkeypatch):
    to_channels_last, calls = Student.to_channels_last, []
    monkeypatch.setattr(Student, "to_channels_last", lambda self: calls.append(1) or to_channels_last(self))
    common = ["--handcrafted", "lsd", "--max-steps", "3", "--seed", "3"]
    assert pretrain_main(_tiny(digits, tmp_path / "default", *common)) == 0
    assert calls == [], "channels-last is on by default only on CUDA"
    reset_accelerate()
    assert pretrain_main(_tiny(digits, tmp_path / "channels-last", *common, "--channels-last")) == 0
    assert calls == [1]
    # Other convolution kernels: measured within 2.2e-6 relative (2 CPU cores, torch 2.14).
    _assert_trains_alike(tmp_path / "default", tmp_path / "channels-last", rel=1e-5)


def test_a_compiled_student_trains_like_an_eager_one_and_resumes_without_compiling(digits, tmp_path):
    """--compile: the same losses, checkpoint keys and release as eager; its checkpoint resumes eagerly.

    About 45 s on 2 CPU cores, nearly all of it inductor compiling the student (a cold cache).
    """
    common = ["--handcrafted", "lsd", "--seed", "3"]
    assert pretrain_main(_tiny(digits, tmp_path / "eager", *common, "--max-steps", "2")) == 0
    reset_accelerate()
    compiled = tmp_path / "compiled"
    assert pretrain_main(_tiny(digits, compiled, *common, "--max-steps", "2", "--compile")) == 0
    # Inductor's fused kernels: measured within 2.3e-6 relative (2 CPU cores, torch 2.14).
    _assert_trains_alike(tmp_path / "eager", compiled, rel=1e-5)

    reset_accelerate()
    assert pretrain_main(_tiny(digits, tmp_path / "eager", *common, "--max-steps", "3", "--resume")) == 0
    reset_accelerate()
    # Without --compile: a setting that may change on resume, since it does not change what is trained.
    assert pretrain_main(_tiny(digits, compiled, *common, "--max-steps", "3", "--resume")) == 0
    _assert_trains_alike(tmp_path / "eager", compiled, rel=1e-5)


def test_device_views_train_like_worker_views_and_resume_exactly(digits, tmp_path):
    """--device-views: the workers send the image resized to a square source and the view's random
    parameters; the view is made in the training process. The digits are 32 px squares, so a 32 px
    source is the image itself and the views, losses and weights are the workers' exactly. A run
    stopped after its first checkpoint resumes to the same weights as the uninterrupted one."""
    common = ["--handcrafted", "lsd", "--seed", "2", "--max-steps", "4", "--checkpoint-every", "2",
              "--keep-checkpoints", "5", "--shuffle-buffer", "64"]  # fmt: skip
    workers, device = tmp_path / "workers", tmp_path / "device"
    assert pretrain_main(_tiny(digits, workers, *common, "--device-views", "false")) == 0
    reset_accelerate()
    device_args = [*common, "--device-views", "--view-source-size", "32"]
    assert pretrain_main(_tiny(digits, device, *device_args)) == 0
    _assert_trains_alike(workers, device, rel=1e-6)

    # As if killed before the step-4 checkpoint: the step-2 checkpoint and everything logged after it.
    resumed = tmp_path / "resumed"
    shutil.copytree(device, resumed)
    shutil.rmtree(checkpoint_path(resumed, 4))
    shutil.rmtree(resumed / "student")
    reset_accelerate()
    assert pretrain_main([*_tiny(digits, resumed, *device_args), "--resume"]) == 0
    expected = load_file(latest_checkpoint(device) / "model.safetensors")
    for key, value in load_file(latest_checkpoint(resumed) / "model.safetensors").items():
        assert torch.equal(value, expected[key]), key


def test_feature_matching_trains_its_heads_and_resumes_them_exactly(digits, teacher, tmp_path):
    """--feature-matching-weight (not in the paper): a match/<teacher> term in the loss and the metrics,
    which falls as the head and the student learn; the heads live in the checkpoints, not the release;
    a run stopped after its first checkpoint resumes heads and student to the uninterrupted run's."""
    common = ["--teacher", str(teacher), "--feature-matching-weight", "1", "--seed", "2", "--max-steps",
              "30", "--learning-rate", "1e-3", "--warmup", "0", "--checkpoint-every", "15",
              "--keep-checkpoints", "5", "--shuffle-buffer", "64"]  # fmt: skip
    whole = tmp_path / "whole"
    assert distill_main(_tiny(digits, whole, *common)) == 0

    metrics = read_metrics(whole)
    terms = ["dcor/teacher", "match/teacher"]  # distillation's defaults: λ = μ = α = 0, so no term on Z
    for m in metrics:
        assert m["loss"] == pytest.approx(sum(m[t] for t in terms), rel=1e-5)
    match = [m["match/teacher"] for m in metrics]
    assert 0.5 < sum(match[:5]) / 5 <= 2  # 1 - cosine of a random head: about 1
    assert sum(match[-5:]) / 5 < 0.5 * sum(match[:5]) / 5, match

    heads = load_file(latest_checkpoint(whole) / "model_1.safetensors")
    student = load_file(latest_checkpoint(whole) / "model.safetensors")
    teacher_width = load_teacher(str(teacher))(torch.zeros(1, 3, 32, 32)).shape[1]
    feature_dim = build_student("test_resnet", projector="16-16", image_size=32).feature_dim
    assert {key: tuple(value.shape) for key, value in heads.items()} == {
        "heads.teacher.weight": (teacher_width, feature_dim),
        "heads.teacher.bias": (teacher_width,),
    }
    released = [load_file(path) for path in (whole / "student").glob("*.safetensors")]
    assert not [key for weights in released for key in weights if "heads" in key]

    # As if killed before the last checkpoint: the first checkpoint and everything logged after it.
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(checkpoint_path(resumed, 30))
    shutil.rmtree(resumed / "student")
    reset_accelerate()
    assert distill_main([*_tiny(digits, resumed, *common), "--resume"]) == 0
    for name, expected in (("model_1.safetensors", heads), ("model.safetensors", student)):
        for key, value in load_file(latest_checkpoint(resumed) / name).items():
            assert torch.equal(value, expected[key]), (name, key)
    again = read_metrics(resumed)
    assert [m["step"] for m in again] == list(range(1, 31)), "each step logged once"
    for a, b in zip(metrics, again, strict=True):
        for name in ("loss", *terms):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-7), (a["step"], name)

    # Weight 0: no term and no heads.
    reset_accelerate()
    paper = tmp_path / "paper"
    assert (
        distill_main(_tiny(digits, paper, *common[:2], "--max-steps", "2", "--feature-matching-weight", "0"))
        == 0
    )
    assert "match/teacher" not in read_metrics(paper)[0]
    assert not (latest_checkpoint(paper) / "model_1.safetensors").exists()


def test_the_teacher_on_the_augmented_view_sees_what_the_student_saw(digits, teacher, tmp_path, monkeypatch):
    """--teacher-view augmented (distillation's default): each step the teacher sees exactly the x̃ of
    the student's pass; with λ = μ = α = 0 (the default) the student runs once a step, on x̃ alone, and
    the loss is the teacher's dCor term plus feature matching; a term on Z brings back the pass on x."""
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    for name, cls in (("student", Student), ("teacher", Teacher)):
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, images, _f=forward, _n=name: seen[_n].append(
            images.detach().clone()) or _f(self, images))  # fmt: skip
    common = ["--teacher", str(teacher), "--no-streaming", "--split", "train[:32]", "--batch-size", "16",
              "--epochs", "2", "--seed", "5"]  # fmt: skip
    run = tmp_path / "run"
    assert distill_main(_tiny(digits, run, *common)) == 0
    assert len(seen["student"]) == 4  # 4 steps, x̃ alone
    teacher_inputs = [images for images in seen["teacher"] if len(images) > 1]  # not the heads' width probe
    assert len(teacher_inputs) == 4
    for x_aug, seen_by_teacher in zip(seen["student"], teacher_inputs, strict=True):
        assert torch.equal(seen_by_teacher, x_aug)
    metrics = read_metrics(run)
    assert all("invariance" not in m and "dcor/views" not in m for m in metrics)
    assert all(m["loss"] == pytest.approx(m["dcor/teacher"] + m["match/teacher"], rel=1e-5) for m in metrics)

    for images in seen.values():
        images.clear()
    reset_accelerate()
    assert distill_main(_tiny(digits, tmp_path / "with-z", *common, "--invariance-weight", "1")) == 0
    student = seen["student"]
    teacher_inputs = [images for images in seen["teacher"] if len(images) > 1]
    assert len(student) == 8  # x then x̃ each step
    for step, seen_by_teacher in enumerate(teacher_inputs):
        assert torch.equal(seen_by_teacher, student[2 * step + 1])
        assert not torch.equal(seen_by_teacher, student[2 * step])


@pytest.mark.gpu
def test_a_cuda_run_with_the_gpu_defaults_trains_and_releases(digits, teacher, tmp_path, teacher_calls):
    """On CUDA: bf16, channels-last and device views (all on by default there), the teacher cache."""
    run = tmp_path / "run"
    argv = _tiny(digits, run, "--teacher", str(teacher), "--handcrafted", "lsd", "--epochs", "2",
                 "--cache-teacher", "--teacher-view", "non-augmented", "--seed", "4")  # fmt: skip
    assert distill_main(argv) == 0
    (fingerprint,) = (run / "teacher_cache").glob("*/fingerprint.json")
    assert json.loads(fingerprint.read_text())["mixed_precision"] == "bf16"  # what the teacher ran under
    metrics = read_metrics(run)
    assert all(math.isfinite(m[name]) for m in metrics for name in ("loss", "dcor/teacher", "dcor/lsd"))
    steps_per_epoch = len(metrics) // 2
    # The teacher sees x, stored in the cache in epoch 1: epoch 2 runs it only on the few images it lacks.
    assert teacher_calls[:steps_per_epoch] == [8] * steps_per_epoch
    assert sum(teacher_calls[steps_per_epoch:]) < 8 * steps_per_epoch / 4
    _assert_trains_alike(run, run, rel=0)  # the release holds the checkpoint's weights, loads with timm


def test_overwrite_replaces_a_previous_run_but_keeps_the_teacher_cache(digits, tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 5)
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    (run / "teacher_cache" / "0123").mkdir(parents=True)
    assert pretrain_main(_tiny(digits, run, "--handcrafted", "lsd", "--max-steps", "1", "--overwrite")) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step-000001"]
    assert [m["step"] for m in read_metrics(run)] == [1]
    assert (run / "teacher_cache" / "0123").is_dir()


def test_a_failed_push_keeps_the_release_and_says_how_to_retry(digits, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = tmp_path / "run"
    argv = _tiny(digits, run, "--handcrafted", "lsd", "--max-steps", "1", "--push-to-hub", "someone/student")
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot push")
    assert "mvmr-push" in err
    timm.create_model(f"local-dir:{run / 'student'}", pretrained=True)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    digits, tmp_path, capsys, monkeypatch
):
    forward, calls = MVMRLoss.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:  # from optimizer step 3 on
            out.terms["dcor/lsd"] = out.terms["dcor/lsd"] * math.nan
            out.total = torch.stack(list(out.terms.values())).sum()
        return out

    monkeypatch.setattr(MVMRLoss, "forward", poisoned)
    run = tmp_path / "run"
    argv = _tiny(digits, run, "--handcrafted", "lsd", "--max-steps", "6", "--checkpoint-every", "2",
                 "--log-every", "10")  # fmt: skip
    assert pretrain_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the loss became non-finite at step 3 (term dcor/lsd)")
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert not (run / "student").exists()


def _run_in_subprocess(argv):
    script = REPO / "examples" / "pretrain.py"
    command = [sys.executable, str(script), *argv]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_result(digits, tmp_path):
    """kill -9 after the first checkpoint, then --resume: the final step, losses and weights of an
    uninterrupted run (deterministic settings: CPU, no data workers, deterministic representations)."""
    common = ["--handcrafted", "lsd", "--max-steps", "8", "--checkpoint-every", "2",
              "--keep-checkpoints", "10", "--shuffle-buffer", "64", "--seed", "1"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run_in_subprocess(_tiny(digits, whole, *common)).wait(timeout=600) == 0

    process = _run_in_subprocess(_tiny(digits, killed, *common))
    first, metrics = checkpoint_path(killed, 2) / TRAINER_STATE, killed / "metrics.jsonl"
    deadline = time.monotonic() + 600

    def past_first_checkpoint() -> bool:  # and a step logged after it, which the resumed run redoes
        return first.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 3

    while not past_first_checkpoint() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not checkpoint_path(killed, 8).exists()
    assert _run_in_subprocess([*_tiny(digits, killed, *common), "--resume"]).wait(timeout=600) == 0

    assert (
        read_trainer_state(latest_checkpoint(killed))["step"]
        == read_trainer_state(latest_checkpoint(whole))["step"]
        == 8
    )
    expected, resumed = read_metrics(whole), read_metrics(killed)
    assert [m["step"] for m in resumed] == list(range(1, 9)), "each step logged once, none lost"
    for a, b in zip(expected, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6)
    weights_whole = load_file(latest_checkpoint(whole) / "model.safetensors")
    weights_killed = load_file(latest_checkpoint(killed) / "model.safetensors")
    for key, value in weights_whole.items():
        torch.testing.assert_close(weights_killed[key], value, rtol=1e-6, atol=1e-6, msg=key)
