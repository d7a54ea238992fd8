"""Evaluation protocols against scikit-learn, the alignment head against sklearn's Ridge, and on digits."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import on_two_processes, snapshot
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from transformers import CLIPModel, CLIPProcessor

from mvmr_hf.cli.release import align_main, evaluate_main
from mvmr_hf.data.augment import CENTER_CROP_FRACTION, center_view
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation import probe
from mvmr_hf.evaluation.features import extract_features, feature_device, load_encoder
from mvmr_hf.evaluation.knn import knn_classify, knn_scores
from mvmr_hf.evaluation.probe import WEIGHT_DECAYS, linear_probe, topk_accuracy
from mvmr_hf.evaluation.protocols import evaluate
from mvmr_hf.evaluation.zeroshot import zero_shot
from mvmr_hf.models.student import build_student
from mvmr_hf.models.tiny_models import save_tiny_teacher
from mvmr_hf.release.align import fit_alignment, load_alignment, save_alignment
from mvmr_hf.release.export import export_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digit_pixels():
    """scikit-learn's digits as 64-d pixel features, a fixed 1400 / 397 split."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _sklearn_probe_accuracy(train_x, train_y, test_x, test_y, weight_decay):
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(C=1.0 / (len(train_x) * weight_decay), max_iter=10_000)
    classifier.fit(scaler.transform(train_x), train_y)
    return 100.0 * classifier.score(scaler.transform(test_x), test_y)


def _sklearn_search_scores(train_x, train_y, fit, val):
    """Validation top-1 of each weight decay, fitted by scikit-learn on the ``fit`` rows (scaled on all)."""
    scaler = StandardScaler().fit(train_x)
    scores = {}
    for weight_decay in WEIGHT_DECAYS:
        classifier = LogisticRegression(C=1.0 / (len(fit) * weight_decay), max_iter=10_000)
        classifier.fit(scaler.transform(train_x[fit]), train_y[fit])
        scores[weight_decay] = 100.0 * classifier.score(scaler.transform(train_x[val]), train_y[val])
    return scores


def _sklearn_knn_accuracy(train_x, train_y, test_x, test_y):
    knn = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1.0 - d) / 0.07)
    )
    return 100.0 * knn.fit(train_x, train_y).score(test_x, test_y)


def test_linear_probe_matches_sklearn_logistic_regression(digit_pixels):
    train_x, train_y, test_x, test_y = digit_pixels
    result = linear_probe(*map(torch.from_numpy, digit_pixels))
    assert result.top1 == pytest.approx(
        _sklearn_probe_accuracy(train_x, train_y, test_x, test_y, result.weight_decay), abs=1.0
    )
    assert result.top1 > 90.0
    assert result.top5 >= result.top1


def test_linear_probe_picks_weight_decay_without_looking_at_the_test_split(digit_pixels):
    train_x, train_y, test_x, test_y = map(torch.from_numpy, digit_pixels)
    shuffled = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(1))]
    chosen = linear_probe(train_x, train_y, test_x, test_y).weight_decay
    assert linear_probe(train_x, train_y, test_x, shuffled).weight_decay == chosen


def test_knn_matches_sklearn_weighted_cosine_neighbours(digit_pixels):
    train_x, train_y, test_x, test_y = digit_pixels
    result = knn_classify(*map(torch.from_numpy, digit_pixels))
    assert result.top1 == pytest.approx(_sklearn_knn_accuracy(train_x, train_y, test_x, test_y), abs=1e-6)


@pytest.mark.parametrize("standardised_copy_fits", [True, False])
def test_linear_probe_in_small_chunks_matches_sklearn_and_one_chunk(
    digit_pixels, standardised_copy_fits, monkeypatch
):
    train_x, train_y, test_x, test_y = digit_pixels
    tensors = list(map(torch.from_numpy, digit_pixels))
    whole = linear_probe(*tensors, chunk_size=len(train_x))
    if not standardised_copy_fits:  # the refit then standardises a chunk at a time at every step
        monkeypatch.setattr(probe, "feature_device", lambda nbytes, device: torch.device("meta"))
    chunked = linear_probe(*tensors, chunk_size=37)  # 38 chunks, the last one of 31 rows
    assert chunked.weight_decay == whole.weight_decay
    assert chunked.top1 == pytest.approx(whole.top1, abs=100 / len(test_y))  # one test image at most
    assert chunked.top1 == pytest.approx(
        _sklearn_probe_accuracy(train_x, train_y, test_x, test_y, chunked.weight_decay), abs=1.0
    )
    # half-precision features are computed in float32: the same as their float32 values
    half = linear_probe(tensors[0].half(), tensors[1], tensors[2].half(), tensors[3], chunk_size=37)
    rounded = linear_probe(tensors[0].half().float(), tensors[1], tensors[2].half().float(), tensors[3])
    assert (half.weight_decay, half.top1) == pytest.approx((rounded.weight_decay, rounded.top1), abs=0.3)


@pytest.mark.parametrize("search_rows", [600, 100_000])
def test_weight_decay_search_fits_a_subsample_of_the_training_split_only(digit_pixels, search_rows):
    """The documented rule: rows ``randperm(N, seed 0)[:search_rows]``, the first 10 % of them validate."""
    train_x, train_y, _, test_y = digit_pixels
    tensors = list(map(torch.from_numpy, digit_pixels))
    result = linear_probe(*tensors, search_rows=search_rows)
    subsample = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:search_rows].numpy()
    num_val = len(subsample) // 10
    val, fit = subsample[:num_val], subsample[num_val:]
    # the choice is (up to one validation image) scikit-learn's best on these rows
    scores = _sklearn_search_scores(train_x, train_y, fit, val)
    assert scores[result.weight_decay] >= max(scores.values()) - 100 / num_val - 1e-9

    # labels outside the subsample (the test split's included) do not change the choice ...
    outside = np.setdiff1d(np.arange(len(train_x)), subsample)
    noisy_y = train_y.copy()
    noisy_y[outside] = np.random.default_rng(1).integers(0, 10, len(outside))
    shuffled_test_y = np.random.default_rng(2).permutation(test_y)
    noisy = linear_probe(tensors[0], torch.from_numpy(noisy_y), tensors[2], torch.from_numpy(shuffled_test_y),
                         search_rows=search_rows)  # fmt: skip
    assert noisy.weight_decay == result.weight_decay
    # ... but the refit sees the whole training split
    if len(outside):
        refit = linear_probe(tensors[0], torch.from_numpy(noisy_y), *tensors[2:], search_rows=search_rows)
        assert refit.top1 < result.top1 - 5


def test_knn_in_small_chunks_matches_sklearn_and_the_votes_by_hand(digit_pixels):
    train_x, train_y, test_x, test_y = digit_pixels
    tensors = list(map(torch.from_numpy, digit_pixels))
    chunked = knn_classify(*tensors, chunk_size=7, train_chunk_size=13)
    assert chunked.top1 == pytest.approx(_sklearn_knn_accuracy(train_x, train_y, test_x, test_y), abs=1e-6)

    train, test = (torch.nn.functional.normalize(t, dim=1) for t in (tensors[0], tensors[2]))
    similarity, index = (test @ train.T).topk(20, dim=1)
    by_hand = torch.zeros(len(test), 10).scatter_add_(1, tensors[1][index], (similarity / 0.07).exp())
    votes = knn_scores(tensors[0], tensors[1], tensors[2], num_classes=10, chunk_size=7, train_chunk_size=13)
    torch.testing.assert_close(votes, by_hand, rtol=1e-4, atol=0.0)
    # fewer training rows than k: every training row votes
    few = knn_scores(tensors[0][:5], tensors[1][:5], tensors[2], num_classes=10, train_chunk_size=2)
    torch.testing.assert_close(few.sum(1), (test @ train[:5].T / 0.07).exp().sum(1), rtol=1e-4, atol=0.0)


@pytest.mark.gpu
def test_probe_and_knn_on_cuda_match_the_cpu(digit_pixels):
    tensors = list(map(torch.from_numpy, digit_pixels))
    on_gpu = [t.cuda() for t in tensors]
    probe_cpu, probe_gpu = linear_probe(*tensors), linear_probe(*on_gpu)
    assert probe_gpu.weight_decay == probe_cpu.weight_decay
    assert probe_gpu.top1 == pytest.approx(probe_cpu.top1, abs=0.3)  # one test image at most
    # CPU features, computed on the GPU a chunk at a time
    assert linear_probe(*tensors, device="cuda", chunk_size=100).top1 == pytest.approx(
        probe_cpu.top1, abs=0.3
    )
    votes_cpu = knn_scores(tensors[0], tensors[1], tensors[2], num_classes=10)
    votes_gpu = knn_scores(on_gpu[0], on_gpu[1], on_gpu[2], num_classes=10, train_chunk_size=100)
    assert votes_gpu.is_cuda
    torch.testing.assert_close(votes_gpu.cpu(), votes_cpu, rtol=1e-3, atol=1e-3)
    # the same votes give the same hits; the percentages are computed in float32 on each device
    knn_gpu, knn_cpu = knn_classify(*on_gpu), knn_classify(*tensors)
    assert knn_gpu.top1 == pytest.approx(knn_cpu.top1, abs=1e-4)
    assert knn_gpu.top5 == pytest.approx(knn_cpu.top5, abs=1e-4)


def test_features_stay_on_the_gpu_when_they_take_at_most_half_its_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda", 0)
    assert feature_device(2 * 2**30, gpu) == gpu
    assert feature_device(2 * 2**30 + 1, gpu) == torch.device("cpu")
    assert feature_device(10**12, torch.device("cpu")) == torch.device("cpu")


def test_topk_accuracy_by_hand():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4: 5th -> top-5 hit only
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: 6th -> miss
            [0.0, 0.3, 1.0, 0.0, 0.0, 0.0],  # label 1: 2nd -> top-5 hit only
        ]
    )
    accuracy = topk_accuracy(scores, torch.tensor([0, 4, 5, 1]))
    assert accuracy.top1 == 25.0
    assert accuracy.top5 == 75.0
    assert topk_accuracy(scores[:, :3], torch.tensor([0, 1, 2, 1])).top5 is None


def test_zero_shot_is_nearest_class_embedding_by_cosine():
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    images = torch.tensor([[10.0, 1.0], [0.1, 0.2], [-3.0, -2.0], [5.0, 4.0]])
    # by hand: cosines pick class 0, 1, 2, 0
    assert zero_shot(images, torch.tensor([0, 1, 2, 1]), classes).top1 == 75.0
    with pytest.raises(ConfigError, match="do not match"):
        zero_shot(images, torch.tensor([0, 1, 2, 1]), torch.ones(3, 5))


def test_alignment_head_is_sklearn_ridge_on_normalised_targets(tmp_path):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 24, generator=generator, dtype=torch.float64) * 3 + 1
    teacher = features @ torch.randn(24, 8, generator=generator, dtype=torch.float64)
    teacher += 0.5 * torch.randn(300, 8, generator=generator, dtype=torch.float64)
    fit = fit_alignment(features, teacher)
    target = torch.nn.functional.normalize(teacher, dim=1).numpy()
    reference = Ridge(alpha=fit.ridge).fit(features.numpy(), target)
    np.testing.assert_allclose(fit.head.weight.detach().numpy(), reference.coef_, atol=1e-5)
    np.testing.assert_allclose(fit.head.bias.detach().numpy(), reference.intercept_, atol=1e-5)
    assert fit.val_cosine > 0.9

    save_alignment(fit, tmp_path, teacher="openai/clip-vit-base-patch16", teacher_output="auto")
    head, info = load_alignment(tmp_path)
    assert torch.equal(head.weight, fit.head.weight)
    assert (info.teacher, info.in_features, info.out_features, info.num_images) == (
        "openai/clip-vit-base-patch16",
        24,
        8,
        300,
    )
    assert load_alignment(tmp_path / "none") is None


def test_alignment_rejects_mismatched_rows():
    with pytest.raises(ConfigError, match="same images"):
        fit_alignment(torch.randn(50, 4), torch.randn(40, 3))


# ----------------------------------------------------------------------------- end to end on digits


def _digit_tensors(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = load_image_dataset(str(folder), split=split, streaming=False)
    images = np.stack([np.array(image.convert("RGB")) for image in rows["image"]])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.tensor(rows["label"])


@pytest.fixture(scope="module")
def clip_teacher(digits, tmp_path_factory) -> Path:
    """A tiny CLIP whose projections are solved in closed form so that zero-shot works on digits.

    Both towers stay random; the visual projection is the least-squares map from the pooled image
    features of the training digits to one-hot class vectors, the text projection maps the pooled
    features of "a photo of a {digit}" exactly onto the same one-hot vectors.
    """
    folder = save_tiny_teacher("clip", tmp_path_factory.mktemp("clip"), image_size=32)
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    rows = load_image_dataset(str(digits), split="train", streaming=False)
    pixels = processor(images=[image.convert("RGB") for image in rows["image"]], return_tensors="pt")
    prompts = processor(text=[f"a photo of a {d}" for d in range(10)], return_tensors="pt", padding=True)
    width = model.config.projection_dim
    with torch.no_grad():
        image_pooled = model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        text_pooled = model.text_model(**prompts).pooler_output
        one_hot = torch.eye(10, width)
        model.visual_projection.weight.copy_(
            torch.linalg.lstsq(image_pooled, one_hot[rows["label"]]).solution.T
        )
        model.text_projection.weight.copy_(torch.linalg.pinv(text_pooled).matmul(one_hot).T)
    model.save_pretrained(folder)
    return folder


def _supervised_vit(digits: Path, epochs: int) -> torch.nn.Module:
    """timm's tiny test_vit trained on the digits training split with labels (a few seconds).

    It sees the non-augmented training view (centre 87.5 %), the preprocessing its release records.
    """
    torch.manual_seed(0)
    student = build_student("test_vit", projector="none", image_size=32)
    if epochs:
        images, labels = _digit_tensors(digits, "train")
        images = center_view(images, 32, crop_fraction=CENTER_CROP_FRACTION)
        head = torch.nn.Linear(student.feature_dim, 10)
        optimizer = torch.optim.AdamW([*student.parameters(), *head.parameters()], lr=3e-3)
        student.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(images)).split(64):
                loss = torch.nn.functional.cross_entropy(head(student(images[batch]).features), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return student.eval()


@pytest.fixture(scope="module")
def releases(digits, clip_teacher, tmp_path_factory) -> dict[str, Path]:
    """Release folders of the supervised student (as if distilled from the CLIP) and of a random init."""
    root = tmp_path_factory.mktemp("releases")
    args = {"student": "test_vit", "projector": "none", "teacher": str(clip_teacher), "dataset": str(digits)}
    return {
        name: export_student(_supervised_vit(digits, epochs), root / name, training_args=args)
        for name, epochs in (("supervised", 16), ("random", 0))
    }


def _card_results(folder: Path) -> dict[str, float]:
    return {r.metric_name: r.metric_value for r in ModelCard.load(folder / "README.md").data.eval_results}


def test_probe_on_a_supervised_student_beats_random_init_and_matches_sklearn(
    digits, releases, tmp_path, capsys
):
    cache = tmp_path / "cache"
    common = [
        "--dataset",
        str(digits),
        "--protocol",
        "linear,knn",
        "--cache-dir",
        str(cache),
        "--update-card",
    ]
    for folder in releases.values():
        assert evaluate_main(["--model", str(folder), *common]) == 0
    table = capsys.readouterr().out
    assert "linear" in table
    assert "knn" in table
    trained, untrained = _card_results(releases["supervised"]), _card_results(releases["random"])
    assert trained["linear top-1"] > untrained["linear top-1"] + 3
    assert trained["knn top-1"] > untrained["knn top-1"] + 8
    assert trained["linear top-1"] > 90

    # the same cached features through scikit-learn
    encoder = load_encoder(str(releases["supervised"]))
    train, test = (
        extract_features(encoder, load_image_dataset(str(digits), split=s, streaming=False), cache_dir=cache)
        for s in ("train", "test")
    )
    splits = [t.numpy() for t in (train.features, train.labels, test.features, test.labels)]
    chosen = linear_probe(train.features, train.labels, test.features, test.labels).weight_decay
    assert trained["linear top-1"] == pytest.approx(_sklearn_probe_accuracy(*splits, chosen), abs=1.0)
    assert trained["knn top-1"] == pytest.approx(_sklearn_knn_accuracy(*splits), abs=1.0)


def test_teacher_zero_shot_matches_transformers_clip(digits, clip_teacher):
    (result,) = evaluate(load_encoder(str(clip_teacher)), str(digits), protocols=["zero-shot"])
    model, processor = (
        CLIPModel.from_pretrained(clip_teacher).eval(),
        CLIPProcessor.from_pretrained(clip_teacher),
    )
    rows = load_image_dataset(str(digits), split="test", streaming=False)
    inputs = processor(
        text=[f"a photo of a {d}" for d in range(10)],
        images=[image.convert("RGB") for image in rows["image"]],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        predictions = model(**inputs).logits_per_image.argmax(1)
    reference = 100.0 * (predictions == torch.tensor(rows["label"])).float().mean().item()
    assert result.top1 == pytest.approx(reference, abs=1.0)
    assert result.top1 > 30  # the closed-form projections make it a real classifier


def test_align_then_student_zero_shot_approaches_the_teacher(
    digits, clip_teacher, releases, tmp_path, capsys
):
    folder = releases["supervised"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert align_main(["--model", str(folder), "--dataset", str(digits), *cache]) == 0
    assert "held-out cosine" in capsys.readouterr().out
    _, info = load_alignment(folder)
    assert (info.teacher, info.num_images) == (str(clip_teacher), 1437)
    assert "Alignment head" in (folder / "README.md").read_text()

    argv = [
        "--model",
        str(folder),
        "--dataset",
        str(digits),
        "--protocol",
        "zero-shot",
        "--update-card",
        *cache,
    ]
    assert evaluate_main(argv) == 0
    assert "via alignment head; teacher top-1" in capsys.readouterr().out
    student = _card_results(folder)["zero-shot top-1"]
    (teacher,) = evaluate(load_encoder(str(clip_teacher)), str(digits), protocols=["zero-shot"])
    assert student > 30  # chance is 10
    assert student > teacher.top1 - 25


def test_two_processes_extract_the_features_of_one_process(digits, releases, tmp_path):
    """``mvmr-evaluate`` on 2 CPU processes: each extracts half of the rows (719 + 718 train images,
    in batches of 64), the gathered features are the single process's, in row order; the main
    process alone prints the table and writes the card and the feature cache."""
    folder = shutil.copytree(releases["random"], tmp_path / "release")
    cache = tmp_path / "cache"
    argv = ["--model", str(folder), "--dataset", str(digits), "--cache-dir", str(cache), "--batch-size", "64",
            "--update-card"]  # fmt: skip
    assert on_two_processes(tmp_path, "evaluate_main", argv).stdout.count("protocol") == 1

    encoder = load_encoder(str(folder))
    for split_name in ("train", "test"):
        split = load_image_dataset(str(digits), split=split_name, streaming=False)
        one = extract_features(encoder, split, batch_size=64, device="cpu")
        (path,) = [p for p in cache.glob("*.safetensors") if len(load_file(p)["labels"]) == len(split)]
        two = load_file(path)
        torch.testing.assert_close(two["features"], one.features)
        assert torch.equal(two["labels"], one.labels)
        assert torch.equal(one.labels, torch.tensor(split["label"]))
    card = _card_results(folder)
    single = evaluate(encoder, str(digits), device="cpu")
    assert card == pytest.approx({f"{r.protocol} top-{k}": round(v, 2) for r in single
                                  for k, v in ((1, r.top1), (5, r.top5))}, abs=0.3)  # fmt: skip


def test_two_processes_fit_the_alignment_head_of_one_process(digits, releases, tmp_path):
    """``mvmr-align`` on 2 CPU processes: the student's and the teacher's features are gathered, and
    the main process alone fits and writes the head, the one a single process fits."""
    one, two = (shutil.copytree(releases["random"], tmp_path / name) for name in ("one", "two"))
    argv = ["--dataset", str(digits), "--cache-dir", "", "--batch-size", "64"]
    assert align_main(["--model", str(one), *argv]) == 0
    result = on_two_processes(tmp_path, "align_main", ["--model", str(two), *argv])
    assert result.stdout.count("alignment head fitted") == 1
    (head_one, info_one), (head_two, info_two) = load_alignment(one), load_alignment(two)
    assert (info_two.num_images, info_two.ridge) == (info_one.num_images, pytest.approx(info_one.ridge))
    torch.testing.assert_close(head_two.weight, head_one.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_two.bias, head_one.bias, rtol=1e-4, atol=1e-5)


def test_features_are_read_back_from_the_cache(digits, releases, tmp_path, monkeypatch):
    encoder = load_encoder(str(releases["random"]))
    split = load_image_dataset(str(digits), split="test", streaming=False)
    first = extract_features(encoder, split, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    monkeypatch.setattr(encoder, "forward", lambda views: pytest.fail("features were recomputed"))
    second = extract_features(encoder, split, cache_dir=tmp_path)
    assert torch.equal(first.features, second.features)
    assert torch.equal(second.labels, torch.tensor(split["label"]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--protocol", "linear,svm"], "unknown protocol svm"),
        (
            ["--label-column", "digit"],
            "label column 'digit' is not in the dataset: choose one of ['image', 'label']",
        ),
        (["--image-column", "photo"], "'photo' is not in the dataset"),
    ],
)
def test_evaluate_bad_input_is_one_line_and_exit_2(digits, releases, extra, message, capsys):
    argv = ["--model", str(releases["random"]), "--dataset", str(digits), "--cache-dir", "", *extra]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err


def test_evaluate_missing_model_folder_is_one_line(digits, tmp_path, capsys):
    assert evaluate_main(["--model", str(tmp_path / "nope"), "--dataset", str(digits)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is not an existing folder" in err


@pytest.mark.parametrize(
    "protocol_args",
    [
        ["--protocol", "linear,knn"],
        ["--protocol", "finetune", "--label-fraction", "1", "--finetune-batch-size", "8"],
    ],
)
def test_timm_name_offline_is_one_line_exit_2_and_writes_nothing(
    digits, tmp_path, monkeypatch, capsys, protocol_args
):
    """`mvmr-evaluate --model resnet18` without the Hub (issue 20): timm's weights cannot be downloaded,
    which is one line naming the model and the way out, not timm's traceback; no cache, no run folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.chdir(tmp_path)
    for split in ("train", "test"):  # prepared beforehand: datasets shows a progress bar the first time
        load_image_dataset(str(digits), split=split, streaming=False)
    capsys.readouterr()
    argv = ["--model", "resnet18", "--dataset", str(digits), "--cache-dir", str(tmp_path / "features")]
    argv += ["--finetune-dir", str(tmp_path / "finetune"), *protocol_args]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: ")
    assert "'resnet18'" in err
    assert "offline" in err
    assert "local folder" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ("./no/such/teacher", "--teacher ./no/such/teacher is not an existing folder"),
        ("mvmr-hf-tests/no-such-teacher", "--teacher mvmr-hf-tests/no-such-teacher is neither a folder"),
    ],
)
def test_align_with_a_teacher_that_cannot_load_is_one_line_before_any_feature(
    digits, releases, tmp_path, monkeypatch, capsys, teacher, message
):
    """mvmr-align --teacher missing or offline (issue 20): one line naming --teacher, not --model; the
    release is untouched and no feature is extracted or cached (the student's were, before the teacher)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    release = Path(shutil.copytree(releases["random"], tmp_path / "student"))
    before = snapshot(release)
    load_image_dataset(str(digits), split="train", streaming=False)  # prepared: no progress bar below
    capsys.readouterr()
    argv = ["--model", str(release), "--dataset", str(digits), "--teacher", teacher]
    assert align_main([*argv, "--cache-dir", str(tmp_path / "features"), "--max-images", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: {message}")
    assert snapshot(release) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["student"]


@pytest.mark.parametrize("kind", ["timm", "vit"])
def test_align_to_an_image_only_teacher_is_one_line(digits, releases, tmp_path, capsys, kind):
    """An image-only teacher (a timm folder such as EfficientNet-Lite, a ViT) has no text tower for
    zero-shot to classify with: mvmr-align refuses it in one line instead of fitting a head that
    zero-shot then fails on; the release is untouched."""
    teacher = save_tiny_teacher(kind, tmp_path / "teacher")
    release = Path(shutil.copytree(releases["random"], tmp_path / "student"))
    before = snapshot(release)
    capsys.readouterr()
    argv = ["--model", str(release), "--dataset", str(digits), "--teacher", str(teacher), "--cache-dir", ""]
    assert align_main([*argv, "--max-images", "64"]) == 2
    err = capsys.readouterr().err  # before it, only transformers' progress bar of the teacher's weights
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: --teacher {teacher} gives no image-text embedding")
    assert snapshot(release) == before


def test_zero_shot_without_text_tower_or_alignment_says_how_to_fix(digits, releases, capsys):
    argv = ["--model", str(releases["random"]), "--dataset", str(digits), "--protocol", "zero-shot"]
    assert evaluate_main(argv) == 2
    assert "mvmr-align" in capsys.readouterr().err


def test_evaluate_on_class_folders_without_splits_says_how_to_lay_them_out(releases, tmp_path, capsys):
    """A folder of class subfolders is one split, train: evaluating on its test split is one line that
    says where the splits go, and nothing is cached."""
    for label in ("cat", "dog"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * index, dtype=np.uint8)).save(
                tmp_path / "pets" / label / f"{index}.png"
            )
    cache = tmp_path / "cache"
    argv = ["--model", str(releases["random"]), "--dataset", str(tmp_path / "pets")]
    argv += ["--cache-dir", str(cache)]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Unknown split 'test'" in err
    assert "['train']" in err
    assert "train/, test/ and validation/ subfolders" in err
    assert not cache.exists()
