"""The multilabel protocol (paper, section 6, Table 3): mAP against scikit-learn, and the label kinds."""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from mvmr_hf.errors import ConfigError
from mvmr_hf.multilabel import (
    MultiHot,
    average_precisions,
    column_kind,
    mean_average_precision,
    multi_hot_encoding,
)

NAMES = [str(digit) for digit in range(10)]


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
