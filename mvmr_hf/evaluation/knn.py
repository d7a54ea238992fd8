"""The kNN protocol (DINO's): cosine similarity, k = 20 nearest training samples, votes weighted by
``exp(similarity / 0.07)``; a running top-k over blocks of training rows, on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mvmr_hf.evaluation.probe import (
    CHUNK_ELEMENTS,
    Accuracy,
    _check_features,
    _compute_device,
    _num_classes,
    _row_chunks,
    topk_accuracy,
)
from mvmr_hf.utils import check_int

KNN_K = 20

KNN_TEMPERATURE = 0.07


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
    train_chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Class votes (N_test, C) of the weighted kNN classifier of DINO, on ``device``.

    Each test sample's ``k`` nearest training samples by cosine similarity ``s`` vote for their
    class with weight ``exp(s / temperature)``. The similarities are computed in float32 for
    ``chunk_size`` test rows against ``train_chunk_size`` training rows at a time (default:
    about :data:`CHUNK_ELEMENTS` numbers per block), keeping a running top-k, so memory does
    not grow with the training split. ``device`` defaults to where ``train_features`` are.

    Args:
        train_features: (N, D) frozen features of the training split (any float dtype).
        train_labels: (N,) int64 class ids in [0, ``num_classes``).
        test_features: (N_test, D) frozen features of the test split.
        num_classes: C, the number of vote columns.
        k: the nearest training samples that vote (all of them when the split has fewer).
        temperature: the temperature of the vote weight ``exp(s / temperature)`` (DINO's 0.07).
        chunk_size: test rows per block of similarities.
        train_chunk_size: training rows per block; None: about :data:`CHUNK_ELEMENTS` numbers per block.
        device: where the similarities are computed; None: where ``train_features`` are.

    Returns:
        (N_test, C) float32 votes on ``device``: each class's summed weights among the k nearest.
    """
    check_int("chunk_size", chunk_size)
    device = _compute_device(device, train_features)
    if train_chunk_size is None:
        train_chunk_size = max(1, CHUNK_ELEMENTS // max(chunk_size, train_features.shape[1]))
    check_int("train_chunk_size", train_chunk_size)
    labels = train_labels.to(device)
    k = min(k, len(train_features))
    votes = []
    for _, queries in _row_chunks(test_features, chunk_size, device, torch.float32):
        queries = nn.functional.normalize(queries, dim=1)
        nearest = torch.empty(len(queries), 0, device=device)
        index = torch.empty(len(queries), 0, dtype=torch.long, device=device)
        for positions, train in _row_chunks(train_features, train_chunk_size, device, torch.float32):
            similarity = queries @ nn.functional.normalize(train, dim=1).T
            candidates = similarity.topk(min(k, similarity.shape[1]), dim=1)
            nearest, picked = torch.cat([nearest, candidates.values], 1).topk(
                min(k, nearest.shape[1] + candidates.values.shape[1]), dim=1
            )
            index = torch.cat([index, candidates.indices + positions.start], 1).gather(1, picked)
        weights = (nearest / temperature).exp()
        votes.append(
            torch.zeros(len(queries), num_classes, device=device).scatter_add_(1, labels[index], weights)
        )
    return torch.cat(votes)


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    chunk_size: int = 1024,
    train_chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> Accuracy:
    """kNN evaluation (cosine, ``k`` = 20, temperature 0.07): top-1 / top-5 accuracy in percent.

    ``chunk_size``, ``train_chunk_size`` and ``device`` as in :func:`knn_scores`.

    Args:
        train_features: (N, D) frozen features of the training split (any float dtype).
        train_labels: (N,) int64 class ids.
        test_features: (M, D) frozen features of the test split.
        test_labels: (M,) int64 class ids; C is the largest id of either split plus one.
        k: the nearest training samples that vote (all of them when the split has fewer).
        temperature: the temperature of the vote weight ``exp(s / temperature)`` (DINO's 0.07).
        chunk_size: test rows per block of similarities.
        train_chunk_size: training rows per block; None: about :data:`CHUNK_ELEMENTS` numbers per block.
        device: where the similarities are computed; None: where ``train_features`` are.

    Returns:
        Top-1 and top-5 test accuracy in percent (top-5 None with 5 classes or fewer).
    """
    _check_features(train_features, train_labels, "training")
    _check_features(test_features, test_labels, "test")
    votes = knn_scores(
        train_features,
        train_labels,
        test_features,
        num_classes=_num_classes(train_labels, test_labels),
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
        train_chunk_size=train_chunk_size,
        device=device,
    )
    return topk_accuracy(votes, test_labels)
