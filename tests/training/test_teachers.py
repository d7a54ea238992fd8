"""Several teachers in one run: names, per-teacher options, outputs, loss terms, caches, card, resume.

References: each teacher's own image processor and `transformers` forward, the `dcor` package, a
run that was never interrupted.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import dcor as dcor_reference
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import read_metrics, reset_accelerate, snapshot, tiny_args
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, CLIPImageProcessor, CLIPModel

from mvmr_hf.cli.train import distill_main
from mvmr_hf.config import ModelArguments, TeacherArguments
from mvmr_hf.data.loader import build_dataloader
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.errors import ConfigError
from mvmr_hf.loss.objective import MVMRLoss
from mvmr_hf.models.tiny_models import save_tiny_teacher
from mvmr_hf.release.align import alignment_teacher
from mvmr_hf.storage.checkpoint import TRAINER_STATE, checkpoint_path, latest_checkpoint
from mvmr_hf.training.loop import build_representations
from mvmr_hf.training.teacher_cache import CACHE_DIR
from mvmr_hf.training.teacher_outputs import representation_outputs

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory) -> Path:
    """A tiny timm CNN that sees 48 px images, beside the 32 px CLIP of ``conftest.teacher``."""
    return save_tiny_teacher("timm", tmp_path_factory.mktemp("timm") / "timm-cnn", image_size=48)


# ----------------------------------------------------------------------------- the options


def test_one_teacher_keeps_the_name_teacher():
    (spec,) = TeacherArguments(teacher="openai/clip-vit-base-patch16").teachers()
    assert (spec.name, spec.model, spec.output) == ("teacher", "openai/clip-vit-base-patch16", "auto")


def test_several_teachers_are_named_by_their_ids_last_part_deduplicated():
    args = TeacherArguments(
        teacher="openai/clip-vit-base-patch16, ./runs/dino/ , other/clip-vit-base-patch16"
    )
    assert [spec.name for spec in args.teachers()] == [
        "clip-vit-base-patch16",
        "dino",
        "clip-vit-base-patch16-2",
    ]
    assert {spec.output for spec in args.teachers()} == {"auto"}


def test_per_teacher_outputs_and_names():
    args = TeacherArguments(teacher="a/x,b/y", teacher_output="cls,embedding", teacher_names="first,second")
    assert [(s.name, s.model, s.output) for s in args.teachers()] == [
        ("first", "a/x", "cls"),
        ("second", "b/y", "embedding"),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"teacher": "a/x,b/y", "teacher_names": "same,same"}, "two teachers the name same"),
        ({"teacher": "a/x,b/y", "teacher_output": "cls,cls,cls"}, "3 values for 2 teachers"),
        ({"teacher": "a/x,b/y", "teacher_names": "one"}, "1 names for 2 teachers"),
        ({"teacher": "a/x,b/hog"}, "'hog' cannot name a term"),
        ({"teacher": "a/x,b/y", "teacher_names": "views,y"}, "'views' cannot name a term"),
        ({"teacher": " , "}, "--teacher is empty"),
        ({"teacher": "a/x,b/y,a/x", "teacher_output": "cls,cls,cls"}, "lists a/x twice with the output cls"),
    ],
)
def test_bad_teacher_options_are_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        TeacherArguments(**options)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- outputs and the loss


def test_each_teacher_is_its_own_processor_and_forward_and_the_loss_sums_their_terms(
    digits, teacher, timm_teacher
):
    """Two teachers at 32 and 48 px on real digits: each output is its processor + model forward, and each
    teacher's term is β (1 - dCor) against the `dcor` package, added to the total once."""
    loader, _ = build_dataloader(load_image_dataset(str(digits)), image_size=32, batch_size=16)
    batch = next(iter(loader))
    images01 = batch["image"].float() / 255
    teachers = TeacherArguments(teacher=f"{teacher},{timm_teacher}", teacher_output="embedding,auto")
    representations = build_representations(ModelArguments(handcrafted="lsd"), teachers)
    assert list(representations) == ["clip", "timm-cnn", "lsd"]  # the folders' names
    outputs = representation_outputs(Accelerator(cpu=True), representations, images01, batch["key"])

    photos = list(batch["image"].permute(0, 2, 3, 1).numpy())
    clip_pixels = CLIPImageProcessor.from_pretrained(teacher)(images=photos, return_tensors="pt")[
        "pixel_values"
    ]
    timm_pixels = AutoImageProcessor.from_pretrained(timm_teacher)([Image.fromarray(p) for p in photos])[
        "pixel_values"
    ]
    assert timm_pixels.shape[-1] == 48
    with torch.no_grad():
        expected = {
            "clip": CLIPModel.from_pretrained(teacher)
            .get_image_features(pixel_values=clip_pixels)
            .pooler_output,
            "timm-cnn": AutoModel.from_pretrained(timm_teacher)(timm_pixels).pooler_output,
        }
    # The processors resize PIL images; the teachers, tensors the same way, to within one gray level on a
    # few pixels (tests/models/test_teacher.py bounds it): outputs equal up to that.
    for name, reference in expected.items():
        torch.testing.assert_close(outputs[name], reference, atol=1e-4, rtol=1e-3)

    generator = torch.Generator().manual_seed(0)
    z, z_aug = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
    z_aug = z_aug + outputs["timm-cnn"][:, :8]  # some dependence on one teacher
    loss = MVMRLoss(representation_weights={"timm-cnn": 2.0})(z, z_aug, outputs)
    for name, weight in (("clip", 1.0), ("timm-cnn", 2.0), ("lsd", 1.0)):
        reference = dcor_reference.distance_correlation(
            z_aug.double().numpy(), outputs[name].flatten(1).double().numpy()
        )
        assert loss.terms[f"dcor/{name}"].item() == pytest.approx(weight * (1 - reference), abs=1e-5)
    assert loss.total.item() == pytest.approx(sum(t.item() for t in loss.terms.values()), rel=1e-6)
    assert set(loss.terms) == {
        "invariance",
        "variance",
        "dcor/views",
        "dcor/clip",
        "dcor/timm-cnn",
        "dcor/lsd",
    }


# ----------------------------------------------------------------------------- runs


def _two(digits, teacher, timm_teacher, run, *extra, names="clip,cnn"):
    return tiny_args(digits, run, "--teacher", f"{teacher},{timm_teacher}", "--teacher-names", names,
                     "--log-every", "1", *extra)  # fmt: skip


@pytest.mark.parametrize(
    ("names", "extra", "message"),
    [
        ("same,same", [], "two teachers the name same"),
        ("clip,cnn", ["--representation-weights", "dino=2"], "dino, which this run does not use"),
        ("clip,cnn", ["--teacher-output", "auto,auto,auto"], "3 values for 2 teachers"),
    ],
)
def test_bad_several_teacher_input_is_one_line_exit_2_and_writes_nothing(
    digits, teacher, timm_teacher, tmp_path, capsys, names, extra, message
):
    run = tmp_path / "run"
    assert distill_main([*_two(digits, teacher, timm_teacher, run, names=names), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert message in err
    assert not run.exists()


def test_a_two_teacher_run_names_its_terms_caches_each_teacher_and_lists_them_on_the_card(
    digits, teacher, timm_teacher, tmp_path
):
    run = tmp_path / "run"
    argv = _two(digits, teacher, timm_teacher, run, "--split", "train[:64]", "--no-streaming",
                "--epochs", "2", "--cache-teacher", "--teacher-view", "non-augmented",
                "--representation-weights", "cnn=0.5")  # fmt: skip
    assert distill_main(argv) == 0
    metrics = read_metrics(run)
    assert {"dcor/clip", "dcor/cnn"} <= set(metrics[0])
    assert "dcor/teacher" not in metrics[0]
    caches = sorted((run / CACHE_DIR).iterdir())
    assert len(caches) == 2
    assert sorted(
        json.loads((c / "fingerprint.json").read_text())["teacher"]["model"] for c in caches
    ) == sorted([str(teacher), str(timm_teacher)])
    card = ModelCard.load(run / "student" / "README.md").text
    assert f"teacher `{teacher}` as `clip`: output `embedding`, 32×32 px input, β = 1" in card
    assert f"teacher `{timm_teacher}` as `cnn`: output `pooler`, 48×48 px input, β = 0.5" in card

    training_args = json.loads((run / "training_args.json").read_text())
    with pytest.raises(ConfigError, match="2 teachers \\(clip, cnn\\)"):
        alignment_teacher(training_args, None)
    assert alignment_teacher(training_args, "clip") == str(teacher)

    # Adding a teacher reads the kept teacher's cache and computes only the new one's.
    reset_accelerate()
    more = tmp_path / "three"
    third = save_tiny_teacher("vit", tmp_path / "vit", image_size=32)
    (more / CACHE_DIR).mkdir(parents=True)
    for cache in caches:
        (more / CACHE_DIR / cache.name).symlink_to(cache)
    before = _shards(run / CACHE_DIR)
    argv = tiny_args(digits, more, "--teacher", f"{teacher},{timm_teacher},{third}", "--teacher-names",
                     "clip,cnn,vit", "--split", "train[:64]", "--no-streaming", "--epochs", "1",
                     "--cache-teacher", "--teacher-view", "non-augmented")  # fmt: skip
    assert distill_main(argv) == 0
    assert _shards(run / CACHE_DIR) == before  # the two kept caches are read, not rewritten
    assert len(list((more / CACHE_DIR).iterdir())) == 3


def _shards(folder: Path) -> dict:
    return {name: entry for name, entry in snapshot(folder).items() if "shard-" in name}


def _subprocess(argv: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "examples" / "distill.py"), *argv]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_two_teachers_with_the_cache_resume_exactly_after_a_kill(digits, teacher, timm_teacher, tmp_path):
    """kill -9 in the second epoch (the caches written and being read), then --resume: the losses and
    weights of an uninterrupted run."""
    common = ["--split", "train[:64]", "--no-streaming", "--epochs", "3", "--checkpoint-every", "4",
              "--keep-checkpoints", "10", "--cache-teacher", "--teacher-view", "non-augmented",
              "--seed", "5"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _subprocess(_two(digits, teacher, timm_teacher, whole, *common)).wait(timeout=600) == 0
    process = _subprocess(_two(digits, teacher, timm_teacher, killed, *common))
    mark = checkpoint_path(killed, 12) / TRAINER_STATE
    deadline = time.monotonic() + 600
    while not mark.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (
        _subprocess([*_two(digits, teacher, timm_teacher, killed, *common), "--resume"]).wait(timeout=600)
        == 0
    )

    expected, resumed = read_metrics(whole), read_metrics(killed)
    assert [m["step"] for m in resumed] == [m["step"] for m in expected]
    for a, b in zip(expected, resumed, strict=True):
        for name in ("loss", "dcor/clip", "dcor/cnn"):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), (a["step"], name)
    weights = load_file(latest_checkpoint(whole) / "model.safetensors")
    for key, value in load_file(latest_checkpoint(killed) / "model.safetensors").items():
        torch.testing.assert_close(value, weights[key], rtol=1e-6, atol=1e-6, msg=key)


def test_a_one_teacher_run_from_before_several_teachers_resumes(digits, teacher, tmp_path):
    """training_args.json of a run written before --teacher-names and --teacher-dtype existed."""
    run = tmp_path / "run"
    argv = tiny_args(digits, run, "--teacher", str(teacher), "--max-steps", "2", "--checkpoint-every", "1")
    assert distill_main(argv) == 0
    saved = json.loads((run / "training_args.json").read_text())
    for new in ("teacher_names", "teacher_dtype"):
        del saved[new]
    (run / "training_args.json").write_text(json.dumps(saved))
    reset_accelerate()
    assert distill_main([*argv[:-4], "--max-steps", "3", "--resume"]) == 0
    assert [m["step"] for m in read_metrics(run)][-1] == 3
    assert "dcor/teacher" in read_metrics(run)[-1]
    assert np.isfinite(read_metrics(run)[-1]["loss"])


def test_bfloat16_teachers_stay_close_to_float32_and_cache_apart(digits, teacher, timm_teacher, tmp_path):
    loader, _ = build_dataloader(load_image_dataset(str(digits)), image_size=32, batch_size=16)
    batch = next(iter(loader))
    images01 = batch["image"].float() / 255
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        arguments = TeacherArguments(teacher=f"{teacher},{timm_teacher}", teacher_dtype=dtype)
        representations = build_representations(ModelArguments(), arguments)
        outputs[dtype] = representation_outputs(
            Accelerator(cpu=True), representations, images01, batch["key"]
        )
    for name, full in outputs["float32"].items():
        low = outputs["bfloat16"][name]
        assert low.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(low, full).min() > 0.99, name

    run = tmp_path / "run"
    argv = _two(digits, teacher, timm_teacher, run, "--teacher-dtype", "bfloat16", "--max-steps", "2",
                "--cache-teacher", "--teacher-view", "non-augmented")  # fmt: skip
    assert distill_main(argv) == 0
    fingerprints = [json.loads((c / "fingerprint.json").read_text()) for c in (run / CACHE_DIR).iterdir()]
    assert [f["teacher"]["dtype"] for f in fingerprints] == ["bfloat16", "bfloat16"]
    assert all(np.isfinite(m["loss"]) for m in read_metrics(run))
