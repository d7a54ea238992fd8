"""Evaluation protocols against scikit-learn, the alignment head against sklearn's Ridge, and on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from mvmr_hf.align import fit_alignment, load_alignment, save_alignment
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluate import knn_classify, linear_probe, topk_accuracy, zero_shot


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
