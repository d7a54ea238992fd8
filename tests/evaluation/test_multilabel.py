"""The multilabel protocol (paper, section 6, Table 3): mAP and the one-vs-rest probe against
scikit-learn, the label kinds, and ``mvmr-evaluate --protocol multilabel`` on real images: pairs of
scikit-learn's digits side by side, labelled with the set of digits shown."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import on_two_processes, snapshot
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from mvmr_hf.cli.release import evaluate_main
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.data.sample_data import digit_pairs, write_digit_pairs
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation import protocols
from mvmr_hf.evaluation.features import extract_features, load_encoder
from mvmr_hf.evaluation.multilabel import (
    MultiHot,
    average_precisions,
    column_kind,
    mean_average_precision,
    multi_hot_encoding,
)
from mvmr_hf.evaluation.probe import WEIGHT_DECAYS, multilabel_probe
from mvmr_hf.evaluation.protocols import evaluate
from mvmr_hf.models.student import build_student
from mvmr_hf.release.export import export_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = [str(digit) for digit in range(10)]
TRAIN_PAIRS, TEST_PAIRS = 1000, 300


def _sklearn_mean_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    return 100.0 * average_precision_score(targets, scores, average="macro")


# ----------------------------------------------------------------------------- mAP


@pytest.mark.parametrize("levels", [None, 3])
def test_mean_average_precision_is_sklearns_macro_average_precision(levels):
    """Random scores, continuous or on ``levels`` values (ties across positives and negatives)."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(500, 12))
    if levels is not None:
        scores = np.floor(scores * levels / 2)
    targets = (rng.random((500, 12)) < rng.uniform(0.02, 0.5, 12)).astype(np.int64)
    assert targets.sum(0).min() > 0
    ours = mean_average_precision(torch.from_numpy(scores).float(), torch.from_numpy(targets))
    assert ours == pytest.approx(_sklearn_mean_ap(targets, scores), abs=1e-9)
    per_class = average_precisions(torch.from_numpy(scores), torch.from_numpy(targets))
    np.testing.assert_allclose(per_class, 100 * average_precision_score(targets, scores, average=None))


def test_classes_without_a_positive_are_left_out_of_the_mean():
    rng = np.random.default_rng(1)
    scores, targets = rng.normal(size=(80, 4)), (rng.random((80, 4)) < 0.3).astype(np.int64)
    targets[:, 2] = 0
    per_class = average_precisions(torch.from_numpy(scores), torch.from_numpy(targets))
    assert per_class.isnan().tolist() == [False, False, True, False]
    with_positives = [0, 1, 3]
    assert mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets)) == pytest.approx(
        _sklearn_mean_ap(targets[:, with_positives], scores[:, with_positives]), abs=1e-9
    )
    with warnings.catch_warnings():  # scikit-learn warns, then averages in a 0 for the class
        warnings.simplefilter("ignore")
        assert 100 * average_precision_score(targets, scores, average=None)[2] == 0.0
    with pytest.raises(ConfigError, match="no class has a positive"):
        mean_average_precision(torch.from_numpy(scores), torch.zeros(80, 4))


# ----------------------------------------------------------------------------- label kinds


@pytest.mark.parametrize(
    ("feature", "kind"),
    [
        (datasets.ClassLabel(names=NAMES), "class"),
        (datasets.Value("int32"), "class"),
        (datasets.List(datasets.ClassLabel(names=NAMES)), "class-lists"),
        (datasets.Sequence(datasets.ClassLabel(names=NAMES)), "class-lists"),
        (datasets.LargeList(datasets.Value("int64")), "class-lists"),
        (datasets.List(datasets.Value("int64")), "class-lists"),
        (datasets.List(datasets.Value("int8"), length=10), "multi-hot"),
        (datasets.List(datasets.Value("bool")), "multi-hot"),
        (datasets.List(datasets.Value("float32")), "multi-hot"),
    ],
)
def test_the_schema_tells_the_label_kind(feature, kind):
    assert column_kind(datasets.Features({"labels": feature}), "labels") == kind


@pytest.mark.parametrize("feature", [datasets.Value("string"), datasets.List(datasets.Value("string"))])
def test_other_label_columns_are_refused_naming_the_columns(feature):
    with pytest.raises(ConfigError, match=r"choose among \['labels'\]"):
        column_kind(datasets.Features({"labels": feature}), "labels")


def _labels(values: list, feature: datasets.FeatureType) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"labels": values}, features=datasets.Features({"labels": feature}))


def test_number_of_classes_and_encoding_of_each_kind():
    named = _labels([[0, 2], []], datasets.List(datasets.ClassLabel(names=NAMES)))
    assert multi_hot_encoding([named], "labels") == MultiHot("class-lists", 10)
    # plain ids: the largest of both splits + 1; an id listed twice (one per object) counts once
    train, test = (_labels(v, datasets.List(datasets.Value("int64"))) for v in ([[1, 1], [3]], [[6], []]))
    encoding = multi_hot_encoding([train, test], "labels")
    assert encoding == MultiHot("class-lists", 7)
    assert encoding([1, 1]).tolist() == [0, 1, 0, 0, 0, 0, 0]
    assert encoding([]).dtype == torch.uint8
    hot = _labels([[True, False, True], [False, False, False]], datasets.List(datasets.Value("bool")))
    assert multi_hot_encoding([hot], "labels") == MultiHot("multi-hot", 3)
    floats = _labels([[1.0, 0.0]], datasets.List(datasets.Value("float32")))
    assert multi_hot_encoding([floats], "labels")([1.0, 0.0]).tolist() == [1, 0]
    assert multi_hot_encoding([_labels([3], datasets.Value("int64"))], "labels") is None


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ([[[1, 0], [0, 1, 0]]], "lengths 2, 3"),
        ([[[1.0, 0.5]]], "values other than 0 and 1"),
        ([[[-1.0, 1.0]]], "VOC's -1/0/1"),
    ],
)
def test_bad_multi_hot_rows_are_refused(splits, message):
    feature = datasets.List(datasets.Value("float32"))
    with pytest.raises(ConfigError, match=message):
        multi_hot_encoding([_labels(values, feature) for values in splits], "labels")


def test_bad_class_lists_and_mixed_splits_are_refused():
    ids = datasets.List(datasets.Value("int64"))
    with pytest.raises(ConfigError, match="from -1 to 2"):
        multi_hot_encoding([_labels([[0, 2], [-1]], ids)], "labels")
    with pytest.raises(ConfigError, match="lists no class"):
        multi_hot_encoding([_labels([[], []], ids)], "labels")
    for missing in ([[0], None], [[0, None]]):
        with pytest.raises(ConfigError, match="missing labels"):
            multi_hot_encoding([_labels(missing, ids)], "labels")
    single = _labels([1], datasets.ClassLabel(names=NAMES))
    with pytest.raises(ConfigError, match="class labels in one split and class-lists in another"):
        multi_hot_encoding([_labels([[1]], ids), single], "labels")


# ----------------------------------------------------------------------------- the probe on pixels


@pytest.fixture(scope="module")
def pixel_pairs():
    """Each pair as the two digits' 64 pixels side by side (128 features), with its targets."""
    pixels = load_digits().data.astype(np.float32)
    (train, train_y), (test, test_y) = digit_pairs(TRAIN_PAIRS, TEST_PAIRS).values()
    return [pixels[train].reshape(-1, 128), train_y, pixels[test].reshape(-1, 128), test_y]


def _sklearn_one_vs_rest(train_x, train_y, test_x, weight_decay) -> np.ndarray:
    scaler = StandardScaler().fit(train_x)
    classifier = OneVsRestClassifier(
        LogisticRegression(C=1.0 / (len(train_x) * weight_decay), max_iter=10_000)
    )
    return classifier.fit(scaler.transform(train_x), train_y).decision_function(scaler.transform(test_x))


@pytest.mark.parametrize("chunk_size", [None, 37])
def test_multilabel_probe_is_sklearns_one_vs_rest_logistic_regression(pixel_pairs, chunk_size):
    train_x, train_y, test_x, test_y = pixel_pairs
    reference = _sklearn_one_vs_rest(train_x, train_y, test_x, 1e-3)
    result = multilabel_probe(
        *map(torch.from_numpy, pixel_pairs), weight_decays=(1e-3,), chunk_size=chunk_size
    )
    np.testing.assert_allclose(
        result.average_precisions, 100 * average_precision_score(test_y, reference, average=None), atol=0.3
    )
    assert result.mean_ap == pytest.approx(_sklearn_mean_ap(test_y, reference), abs=0.1)
    assert result.mean_ap > 80  # chance: the share of positives, about 19 %


def test_multilabel_probe_searches_the_weight_decay_on_training_rows_only(pixel_pairs):
    train_x, train_y, _, test_y = pixel_pairs
    tensors = list(map(torch.from_numpy, pixel_pairs))
    result = multilabel_probe(*tensors)
    # the choice is scikit-learn's best mAP on the documented held-out rows (up to a point of mAP) ...
    subsample = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0)).numpy()
    val, fit = subsample[: len(subsample) // 10], subsample[len(subsample) // 10 :]
    scaler = StandardScaler().fit(train_x)
    scores = {}
    for weight_decay in WEIGHT_DECAYS:
        classifier = OneVsRestClassifier(
            LogisticRegression(C=1.0 / (len(fit) * weight_decay), max_iter=10_000)
        )
        classifier.fit(scaler.transform(train_x[fit]), train_y[fit])
        scores[weight_decay] = _sklearn_mean_ap(
            train_y[val], classifier.decision_function(scaler.transform(train_x[val]))
        )
    assert scores[result.weight_decay] >= max(scores.values()) - 1.0
    # ... and the test split's targets do not change it
    shuffled = tensors[3][torch.randperm(len(test_y), generator=torch.Generator().manual_seed(1))]
    assert multilabel_probe(*tensors[:3], shuffled).weight_decay == result.weight_decay


@pytest.mark.gpu
def test_multilabel_probe_on_cuda_matches_the_cpu(pixel_pairs):
    tensors = list(map(torch.from_numpy, pixel_pairs))
    cpu, gpu = multilabel_probe(*tensors), multilabel_probe(*(t.cuda() for t in tensors))
    assert gpu.weight_decay == cpu.weight_decay
    assert gpu.mean_ap == pytest.approx(cpu.mean_ap, abs=0.3)
    # CPU features and targets, computed on the GPU a chunk at a time
    chunked = multilabel_probe(*tensors, device="cuda", chunk_size=100)
    assert chunked.mean_ap == pytest.approx(cpu.mean_ap, abs=0.3)


# ----------------------------------------------------------------------------- end to end on images


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """The pairs as 32 px images, written as local parquet twice: labels as the classes shown
    (``List(ClassLabel)``) and as multi-hot vectors (``List(Value("int8"), length=10)``)."""
    root = tmp_path_factory.mktemp("pairs")
    return {
        name: write_digit_pairs(root / name, labels=labels, train_pairs=TRAIN_PAIRS, test_pairs=TEST_PAIRS)
        for name, labels in (("classes", "classes"), ("multihot", "multi-hot"))
    }


@pytest.fixture(scope="module")
def release(pairs, tmp_path_factory) -> Path:
    """A release of timm's tiny test_vit at random initialisation: its features still tell digits apart."""
    torch.manual_seed(0)
    student = build_student("test_vit", projector="none", image_size=32).eval()
    args = {"student": "test_vit", "projector": "none", "dataset": str(pairs["classes"])}
    return export_student(student, tmp_path_factory.mktemp("release") / "student", training_args=args)


def _argv(folder: Path, dataset: Path, cache: Path, *extra: str) -> list[str]:
    return ["--model", str(folder), "--dataset", str(dataset), "--cache-dir", str(cache), "--update-card",
            *extra]  # fmt: skip


def test_mvmr_evaluate_multilabel_on_digit_pairs_writes_map_in_the_card(pairs, release, tmp_path, capsys):
    cache, measured = tmp_path / "cache", {}
    for name, dataset in pairs.items():
        folder = shutil.copytree(release, tmp_path / name)
        argv = _argv(folder, dataset, cache, "--protocol", "multilabel", "--label-column", "labels")
        assert evaluate_main(argv) == 0
        (result,) = ModelCard.load(folder / "README.md").data.eval_results
        assert (result.metric_type, result.metric_name, result.metric_config) == (
            "mAP",
            "multilabel mAP",
            "multilabel",
        )
        measured[name] = result.metric_value
    # the two spellings of the labels are the same targets, hence the same weight decay and mAP
    (chosen,) = set(
        re.findall(r"one-vs-rest L-BFGS, 10 classes, weight decay (\S+)", capsys.readouterr().out)
    )
    assert measured["classes"] == measured["multihot"]
    assert measured["classes"] > 70  # chance: about 19

    # the cached features and targets through scikit-learn, with the weight decay the probe chose
    encoder, splits = load_encoder(str(release)), {}
    for split in ("train", "test"):
        rows = load_image_dataset(str(pairs["classes"]), split=split, streaming=False)
        features = extract_features(encoder, rows, label_column="labels", cache_dir=cache)
        assert torch.equal(
            features.labels, torch.from_numpy(digit_pairs(TRAIN_PAIRS, TEST_PAIRS)[split][1]).to(torch.uint8)
        )
        splits[split] = features.features.numpy(), features.labels.numpy()
    (train_x, train_y), (test_x, test_y) = splits.values()
    reference = _sklearn_one_vs_rest(train_x, train_y, test_x, float(chosen))
    assert measured["classes"] == pytest.approx(_sklearn_mean_ap(test_y, reference), abs=0.5)


@pytest.mark.parametrize(
    ("dataset", "protocol", "message"),
    [
        ("classes", "linear", "protocol linear needs one class per image, but label column 'labels' holds a "
                              "list of classes per image: use --protocol multilabel."),
        ("multihot", "knn,multilabel", "protocol knn needs one class per image, but label column 'labels' "
                                       "holds a multi-hot vector per image: use --protocol multilabel."),
        ("digits", "multilabel", "protocol multilabel needs several classes per image, but label "
                                 "column 'label' holds one class per image: use --protocol linear, knn"),
    ],
)  # fmt: skip
def test_a_protocol_on_the_wrong_label_kind_is_one_line_and_writes_nothing(
    digits, pairs, release, dataset, protocol, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(protocols, "extract_features", lambda *a, **k: pytest.fail("features were extracted"))
    folder, cache = shutil.copytree(release, tmp_path / "release"), tmp_path / "cache"
    before = snapshot(folder)
    path, label_column = (digits, "label") if dataset == "digits" else (pairs[dataset], "labels")
    for split in ("train", "test"):  # prepared once before: datasets' progress bars are not the message
        load_image_dataset(str(path), split=split, streaming=False)
    capsys.readouterr()
    argv = _argv(folder, path, cache, "--protocol", protocol, "--label-column", label_column)
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert message in err
    assert snapshot(folder) == before
    assert not cache.exists()


def test_two_processes_give_the_targets_and_map_of_one_process(pairs, release, tmp_path):
    """``mvmr-evaluate --protocol multilabel`` on 2 CPU processes: the gathered (N, 10) targets and the
    features are the single process's, in row order, and so is the mAP in the card."""
    folder, cache, dataset = (
        shutil.copytree(release, tmp_path / "release"),
        tmp_path / "cache",
        pairs["classes"],
    )
    argv = _argv(
        folder, dataset, cache, "--protocol", "multilabel", "--label-column", "labels", "--batch-size", "64"
    )
    assert on_two_processes(tmp_path, "evaluate_main", argv).stdout.count("protocol") == 1

    encoder = load_encoder(str(folder))
    splits = {
        name: load_image_dataset(str(dataset), split=name, streaming=False) for name in ("train", "test")
    }
    targets = multi_hot_encoding(list(splits.values()), "labels")
    for split in splits.values():
        one = extract_features(
            encoder, split, label_column="labels", batch_size=64, device="cpu", targets=targets
        )
        (path,) = [p for p in cache.glob("*.safetensors") if len(load_file(p)["labels"]) == len(split)]
        two = load_file(path)
        torch.testing.assert_close(two["features"], one.features)
        assert torch.equal(two["labels"], one.labels)
        assert one.labels.shape == (len(split), 10)
    (single,) = evaluate(encoder, str(dataset), label_column="labels", protocols=["multilabel"], device="cpu")
    (card,) = ModelCard.load(folder / "README.md").data.eval_results
    assert card.metric_value == pytest.approx(single.mean_ap, abs=0.01)
