"""Evaluation of frozen features: linear probe, kNN, zero-shot and multi-label classification.

The paper evaluates with a linear classifier on frozen backbone features (section 6, "linear
evaluation protocol"), and measures transfer to VOC07 with a linear classifier on frozen
features scored by mAP (section 6, Table 3); we add the kNN protocol of DINO and zero-shot
classification through a CLIP-style teacher's text tower. Features are extracted once per
(model, dataset, split) with the model's own preprocessing of the non-augmented view and cached
as safetensors.

* :func:`linear_probe`: multinomial logistic regression on standardised features, full-batch
  L-BFGS, weight decay chosen on a validation split carved from a random subsample of at most
  :data:`SEARCH_ROWS` (100,000) training rows (never the test split), then refitted on the whole
  training split; top-1 and top-5.
* :func:`knn_classify`: cosine similarity, k = 20 nearest training samples, votes weighted by
  ``exp(similarity / 0.07)`` (DINO's protocol).
* :func:`zero_shot`: cosine similarity between image embeddings and the text embeddings of
  ``"a photo of a {label}"`` (:func:`text_embeddings`).
* :func:`multilabel_probe` (protocol ``multilabel``, paper Table 3): one logistic regression per
  class (one-vs-rest) on standardised features, fitted and searched as :func:`linear_probe`'s,
  scored by mAP (:func:`~mvmr_hf.evaluation.multilabel.mean_average_precision`), for label columns that
  list several classes per image (:mod:`mvmr_hf.evaluation.multilabel` tells the kinds apart). VOC07 as in
  the paper: train on trainval, report mAP on test. Where we differ: the AP is the
  non-interpolated one (scikit-learn's, the VOC2010+ devkit's), not the VOC2007 devkit's 11-point
  interpolated AP; "difficult" objects count as the label column says (no ignore mask); and the
  classifier is fitted to convergence with L-BFGS (the problem is convex) where the paper trains
  it for 100 epochs.

Scale. Under ``accelerate launch`` / ``torchrun`` with P processes, process ``p`` extracts rows
``p, p + P, ...`` of the split and the shares are gathered, so every process holds the split's
features in row order, those of a single process. The features stay on the evaluation device
when they take at most half its free memory (:func:`feature_device`), else on the CPU: ImageNet's
training split, 1.28 M x 2048, takes 10.5 GB in float32 (5.2 GB in float16, which the probe and
kNN also take), so it stays on a GPU with 21 GB free. The probe and kNN run on the device in
chunks of about :data:`CHUNK_ELEMENTS` numbers (128 MiB in float32): the probe adds up its loss
and gradient over chunks of rows (ImageNet's 1.28 M x 1000 logits, 5 GB, never exist at once),
kNN keeps a running top-k over blocks of training rows; features left on the CPU cross to the
device a chunk at a time. The feature cache on disk stays safetensors, written by the main process.

:func:`load_encoder` turns ``--model`` (a release folder, a Hub id, a timm name, a transformers
model) into an :class:`Encoder`; :func:`extract_features` runs it over a split; :func:`evaluate`
runs the protocols and :func:`to_eval_results` makes the card's ``model-index`` entries.

Example::

    encoder = load_encoder("runs/kd/student")
    results = evaluate(encoder, "./digits", protocols=["linear", "knn"], cache_dir="features-cache")
    print(format_table(results))

    split = load_image_dataset("./digits", split="train", streaming=False)
    train = extract_features(encoder, split)                    # FeatureSet(features, labels, skipped)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import timm
import torch
from accelerate import PartialState
from accelerate.utils import gather, pad_across_processes
from huggingface_hub import EvalResult, hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError, HTTPError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from transformers import AutoModel, AutoTokenizer

from mvmr_hf.data.augment import center_view
from mvmr_hf.data.loading import (
    BadImageError,
    decode_image,
    load_image_dataset,
    read_encoded,
    resolve_image_column,
)
from mvmr_hf.distributed import holds_on_every_process, launch_state
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.multilabel import (
    MultiHot,
    average_precisions,
    mean_average_precision,
    multi_hot_encoding,
)
from mvmr_hf.models.representations.teacher import load_teacher, loading_errors
from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS
from mvmr_hf.release.align import load_alignment
from mvmr_hf.release.card import TASK_NAME, TASK_TYPE, hub_id_or_none
from mvmr_hf.release.export import is_release, load_release
from mvmr_hf.utils import atomic_write, check_int, is_local_path, sha256_of_files

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SEARCH_ROWS = 100_000
"""Training rows the weight-decay search of :func:`linear_probe` fits and validates on, at most."""
KNN_K = 20
KNN_TEMPERATURE = 0.07
PROMPT = "a photo of a {}"
PROTOCOLS = ("linear", "knn", "zero-shot", "multilabel", "finetune")
"""Protocols of ``mvmr-evaluate``; all but ``finetune`` (:mod:`mvmr_hf.evaluation.finetuning`) read
frozen features."""
CHUNK_ELEMENTS = 1 << 25
"""Numbers in one chunk of the probe (features and logits) or of kNN (similarities): 128 MiB in float32."""
DEVICE_MEMORY_FRACTION = 0.5
"""Share of the device's free memory a feature matrix may take and still stay on the device."""


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy in percent (``top5`` is ``None`` with 5 classes or fewer)."""

    top1: float
    top5: float | None


@dataclass(frozen=True)
class ProbeResult(Accuracy):
    """Linear-probe accuracy and the weight decay chosen on the validation split."""

    weight_decay: float = 0.0


def _ranked(scores: Tensor) -> Tensor:
    """The (up to) 5 best classes of each row of ``scores`` (N, C), best first."""
    return scores.topk(min(5, scores.shape[1]), dim=1).indices


def _ranked_accuracy(ranked: Tensor, labels: Tensor, num_classes: int) -> Accuracy:
    hits = ranked == labels.to(ranked.device)[:, None]
    top1 = 100.0 * hits[:, 0].float().mean().item()
    top5 = 100.0 * hits.any(1).float().mean().item() if num_classes > 5 else None
    return Accuracy(top1=top1, top5=top5)


def topk_accuracy(scores: Tensor, labels: Tensor) -> Accuracy:
    """Top-1 / top-5 accuracy (percent) of class ``scores`` (N, C) against integer ``labels`` (N,)."""
    return _ranked_accuracy(_ranked(scores), labels, scores.shape[1])


def _check_features(features: Tensor, labels: Tensor, name: str, *, label_ndim: int = 1) -> None:
    """``features`` (N, D) with N class ids (N,), or with ``label_ndim=2`` an (N, C) target matrix."""
    if features.ndim != 2 or labels.ndim != label_ndim or features.shape[0] != labels.shape[0]:
        raise ConfigError(
            f"{name} features must be (N, D) with {'N labels' if label_ndim == 1 else 'N rows of targets'}, "
            f"got {tuple(features.shape)} and {tuple(labels.shape)}."
        )


def _num_classes(train_labels: Tensor, test_labels: Tensor) -> int:
    return max(int(train_labels.max()), int(test_labels.max())) + 1


def _compute_device(device: str | torch.device | None, features: Tensor) -> torch.device:
    """Where the chunks are computed: ``device``, by default where the (training) features are."""
    return features.device if device is None else torch.device(device)


def _row_chunks(
    features: Tensor, chunk_size: int, device: torch.device, dtype: torch.dtype, rows: Tensor | None = None
) -> Iterator[tuple[slice, Tensor]]:
    """``(positions, features[rows][positions])`` chunk by chunk, each cast to ``dtype`` on ``device``.

    ``rows`` (on ``features``' device) selects and orders the rows, all of them when ``None``.
    Features kept on the CPU because they do not fit on the device cross to it a chunk at a time.
    """
    count = len(features) if rows is None else len(rows)
    for start in range(0, count, chunk_size):
        positions = slice(start, min(start + chunk_size, count))
        chunk = features[positions] if rows is None else features[rows[positions]]
        yield positions, chunk.to(device=device, dtype=dtype)


def _moments(
    features: Tensor, chunk_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Each column's mean and standard deviation (clamped at 1e-6), in two passes over the chunks.

    The second pass sums squared deviations from the mean: ``E[x²] - E[x]²`` would cancel in
    float32 for features far from zero.
    """
    count = len(features)
    mean = sum(chunk.sum(0) for _, chunk in _row_chunks(features, chunk_size, device, dtype)) / count
    squares = sum(
        (chunk - mean).square().sum(0) for _, chunk in _row_chunks(features, chunk_size, device, dtype)
    )
    return mean, (squares / count).sqrt().clamp_min(1e-6)


def _standardised(
    features: Tensor, moments: tuple[Tensor, Tensor], chunk_size: int, rows: Tensor | None = None
) -> Tensor:
    """``(features[rows] - mean) / std`` as one matrix where the moments are, filled a chunk at a time."""
    mean, std = moments
    result = torch.empty(
        len(features) if rows is None else len(rows), features.shape[1], device=mean.device, dtype=mean.dtype
    )
    for positions, chunk in _row_chunks(features, chunk_size, mean.device, mean.dtype, rows):
        torch.sub(chunk, mean, out=result[positions]).div_(std)
    return result


class _ProbeData:
    """Rows as a linear probe reads them: chunks of features, as ``dtype`` on ``device``, with their labels
    (class ids, or multi-hot targets for :func:`multilabel_probe`).

    ``features`` are standardised already, or, with ``moments``, a chunk at a time when read.
    """

    def __init__(
        self,
        features: Tensor,
        labels: Tensor,
        chunk_size: int,
        device: torch.device,
        dtype: torch.dtype,
        moments: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.features, self.chunk_size, self.device, self.dtype = features, chunk_size, device, dtype
        self.labels, self.moments = labels.to(device), moments

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for positions, chunk in _row_chunks(self.features, self.chunk_size, self.device, self.dtype):
            if self.moments is not None:
                chunk = (chunk - self.moments[0]) / self.moments[1]
            yield chunk, self.labels[positions]


Loss = Callable[[Tensor, Tensor], Tensor]
"""``(logits, labels) -> loss`` of a chunk of rows, summed: the data term of :func:`_fit_logistic`."""


def _softmax_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multinomial logistic regression (:func:`linear_probe`): the rows' cross-entropies, summed."""
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def _one_vs_rest_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """One logistic regression per class (:func:`multilabel_probe`): the binary CEs, summed."""
    return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="sum")


def _fit_logistic(
    data: _ProbeData, classifier: nn.Linear, weight_decay: float, max_iter: int, loss: Loss
) -> nn.Linear:
    """Minimise ``loss``/N + weight_decay/2·||W||² (bias unpenalised), full-batch L-BFGS from ``classifier``.

    ``loss`` is :func:`_softmax_loss` (mean CE) or :func:`_one_vs_rest_loss` (mean over rows of
    the binary CEs summed over classes). Every evaluation of the objective adds up the loss and
    its gradient chunk by chunk, so the (N, C) logits never exist at once (ImageNet's are 5 GB
    in float32) while each L-BFGS step sees the exact full-batch loss. Returns a trained copy;
    ``classifier`` (the starting point) is left unchanged.
    """
    classifier = copy.deepcopy(classifier).requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=classifier.weight.device, dtype=classifier.weight.dtype)
        for x, y in data:
            chunk_loss = loss(classifier(x), y) / len(data)
            chunk_loss.backward()  # the chunks' gradients add up in .grad
            total += chunk_loss.detach()
        penalty = 0.5 * weight_decay * classifier.weight.square().sum()
        penalty.backward()
        return total + penalty.detach()

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier.requires_grad_(False)


def _probe_accuracy(classifier: nn.Linear, data: _ProbeData) -> Accuracy:
    ranked = torch.cat([_ranked(classifier(x)) for x, _ in data])
    return _ranked_accuracy(ranked, data.labels, classifier.out_features)


def _probe_top1(classifier: nn.Linear, data: _ProbeData) -> float:
    return _probe_accuracy(classifier, data).top1


def _probe_scores(classifier: nn.Linear, data: _ProbeData) -> Tensor:
    return torch.cat([classifier(x) for x, _ in data])


def _probe_mean_ap(classifier: nn.Linear, data: _ProbeData) -> float:
    return mean_average_precision(_probe_scores(classifier, data), data.labels)


def _search_rows(num_rows: int, val_fraction: float, search_rows: int, seed: int) -> tuple[Tensor, Tensor]:
    """The training rows ``(fit, validation)`` the weight-decay search of :func:`linear_probe` uses."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))[:search_rows]
    num_val = max(1, int(len(order) * val_fraction))
    return order[num_val:], order[:num_val]


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    max_iter: int = 300,
    seed: int = 0,
    search_rows: int = SEARCH_ROWS,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> ProbeResult:
    """Linear evaluation: logistic regression on frozen features (paper, section 6.1).

    Features are standardised with the training split's mean and standard deviation. The weight
    decay is searched on a random subsample of the training split: a permutation seeded by
    ``seed``, cut to its first ``search_rows`` rows (the whole split when it has fewer), whose
    first ``val_fraction`` is held out and the rest fitted. Each weight decay in
    ``weight_decays`` is fitted and scored (top-1 on the held-out rows) from the largest to the
    smallest, each fit starting from the previous solution (a warm-started regularisation path);
    the best one (the largest on ties) is refitted on the whole training split and evaluated on
    the test split, which the search never sees. Pass a single weight decay to skip the search.

    The search's cap (100,000 rows: 90,000 fit, 10,000 validation) bounds its cost on large
    splits (ImageNet: 1.28 M rows) while 10,000 validation rows still tell apart the grid's
    decades (standard error at most 0.5 points of top-1). The choice is made with fewer fitted
    rows than the refit uses, so on such splits it may lean towards a stronger weight decay than
    the full split would pick.

    The objective is ``mean CE + weight_decay/2·||W||²``, i.e. scikit-learn's
    ``LogisticRegression(C=1 / (N·weight_decay))``, minimised with full-batch L-BFGS whose
    loss and gradient are accumulated over chunks of ``chunk_size`` rows (default: about
    :data:`CHUNK_ELEMENTS` numbers of features and logits per chunk) on ``device`` (default:
    where ``train_features`` are). Features in half precision are computed in float32. The
    search's rows are standardised once into a copy (at most ``search_rows`` of them), and so is
    the whole training split for the refit where the copy fits on the device
    (:func:`feature_device`); otherwise each L-BFGS step standardises it a chunk at a time.
    """
    _check_features(train_features, train_labels, "training")
    _check_features(test_features, test_labels, "test")
    classifier, weight_decay, test = _fit_probe(
        train_features,
        train_labels,
        test_features,
        test_labels,
        num_classes=_num_classes(train_labels, test_labels),
        loss=_softmax_loss,
        score=_probe_top1,
        weight_decays=weight_decays,
        val_fraction=val_fraction,
        max_iter=max_iter,
        seed=seed,
        search_rows=search_rows,
        chunk_size=chunk_size,
        device=device,
    )
    accuracy = _probe_accuracy(classifier, test)
    return ProbeResult(top1=accuracy.top1, top5=accuracy.top5, weight_decay=weight_decay)


@dataclass(frozen=True)
class MultiLabelResult:
    """Multi-label probe: mAP and each class's AP on the test split in percent, and the weight decay chosen.

    A class without a positive test sample has no AP (NaN) and is left out of ``mean_ap``
    (:func:`~mvmr_hf.evaluation.multilabel.mean_average_precision`).
    """

    mean_ap: float
    average_precisions: tuple[float, ...]
    weight_decay: float


def multilabel_probe(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    *,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    val_fraction: float = 0.1,
    max_iter: int = 300,
    seed: int = 0,
    search_rows: int = SEARCH_ROWS,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> MultiLabelResult:
    """Multi-label linear evaluation: a linear classifier on frozen features, mAP (paper, section 6, Table 3).

    ``train_targets`` and ``test_targets`` are (N, C) 0/1 matrices (any dtype; see
    :class:`~mvmr_hf.evaluation.multilabel.MultiHot`). One ``nn.Linear(D, C)`` on standardised features
    minimises the mean over samples of the per-class binary cross-entropies summed over classes
    + weight_decay/2·||W||² (bias unpenalised). The objective separates over classes, so it is
    one logistic regression per class: scikit-learn's
    ``OneVsRestClassifier(LogisticRegression(C=1 / (N·weight_decay)))``. All else is
    :func:`linear_probe`'s, arguments included: the weight-decay grid and search subsample
    (scored by mAP on the held-out rows, classes without a positive there left out), the refit on
    the whole training split, full-batch L-BFGS over chunks on ``device``. The paper trains its
    VOC07 classifier for 100 epochs; the problem being convex, L-BFGS fits it to convergence
    instead, as for ``linear``. Reports each class's AP and the mAP on the test split
    (:func:`~mvmr_hf.evaluation.multilabel.average_precisions`: non-interpolated, scikit-learn's).
    """
    _check_features(train_features, train_targets, "training", label_ndim=2)
    _check_features(test_features, test_targets, "test", label_ndim=2)
    if train_targets.shape[1] != test_targets.shape[1]:
        raise ConfigError(
            f"the training targets have {train_targets.shape[1]} classes and the test targets "
            f"{test_targets.shape[1]}: encode both splits alike (multi_hot_encoding of both)."
        )
    classifier, weight_decay, test = _fit_probe(
        train_features,
        train_targets,
        test_features,
        test_targets,
        num_classes=train_targets.shape[1],
        loss=_one_vs_rest_loss,
        score=_probe_mean_ap,
        weight_decays=weight_decays,
        val_fraction=val_fraction,
        max_iter=max_iter,
        seed=seed,
        search_rows=search_rows,
        chunk_size=chunk_size,
        device=device,
    )
    scores = _probe_scores(classifier, test)
    return MultiLabelResult(
        mean_ap=mean_average_precision(scores, test.labels),
        average_precisions=tuple(average_precisions(scores, test.labels).tolist()),
        weight_decay=weight_decay,
    )


def _fit_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    loss: Loss,
    score: Callable[[nn.Linear, _ProbeData], float],
    weight_decays: tuple[float, ...],
    val_fraction: float,
    max_iter: int,
    seed: int,
    search_rows: int,
    chunk_size: int | None,
    device: str | torch.device | None,
) -> tuple[nn.Linear, float, _ProbeData]:
    """The probe of :func:`linear_probe` and :func:`multilabel_probe` (the former documents it).

    Fits ``loss`` (:func:`_fit_logistic`), searches the weight decay by ``score`` on the held-out
    rows (higher is better) and refits on the whole training split. Returns the classifier, its
    weight decay and the test split as the classifier reads it (standardised with the training
    split's moments).
    """
    check_int("search_rows", search_rows, 2)
    device = _compute_device(device, train_features)
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // (train_features.shape[1] + num_classes))
    check_int("chunk_size", chunk_size)
    moments = _moments(train_features, chunk_size, device, dtype)

    def standardised(rows: Tensor | None = None) -> _ProbeData:
        if rows is None:
            return _ProbeData(
                _standardised(train_features, moments, chunk_size), train_labels, chunk_size, device, dtype
            )
        features = _standardised(train_features, moments, chunk_size, rows.to(train_features.device))
        return _ProbeData(features, train_labels[rows.to(train_labels.device)], chunk_size, device, dtype)

    classifier = nn.Linear(train_features.shape[1], num_classes, device=device, dtype=dtype)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    best = weight_decays[0]
    if len(weight_decays) > 1:
        # Standardised once: the search's rows are read at every step of six fits, and there are
        # at most search_rows of them.
        fit, val = (
            standardised(rows) for rows in _search_rows(len(train_features), val_fraction, search_rows, seed)
        )
        scores, path = {}, {}
        for weight_decay in sorted(weight_decays, reverse=True):
            classifier = _fit_logistic(fit, classifier, weight_decay, max_iter, loss)
            scores[weight_decay] = score(classifier, val)
            path[weight_decay] = classifier
        best = max(sorted(weight_decays, reverse=True), key=scores.__getitem__)
        classifier = path[best]
    # The whole split standardised once where such a copy fits, else a chunk at a time at every step.
    if feature_device(train_features.shape[0] * train_features.shape[1] * dtype.itemsize, device) == device:
        train = standardised()
    else:
        train = _ProbeData(train_features, train_labels, chunk_size, device, dtype, moments)
    classifier = _fit_logistic(train, classifier, best, max_iter, loss)
    return classifier, best, _ProbeData(test_features, test_labels, chunk_size, device, dtype, moments)


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


def zero_shot_scores(image_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """Cosine similarities (N, C) between image embeddings (N, E) and class text embeddings (C, E)."""
    if class_embeddings.ndim != 2 or class_embeddings.shape[1] != image_embeddings.shape[1]:
        raise ConfigError(
            f"class embeddings {tuple(class_embeddings.shape)} do not match image embeddings "
            f"{tuple(image_embeddings.shape)}: use the text tower of the same teacher."
        )
    images = nn.functional.normalize(image_embeddings.float(), dim=1)
    return images @ nn.functional.normalize(class_embeddings.float(), dim=1).to(images.device).T


def zero_shot(image_embeddings: Tensor, labels: Tensor, class_embeddings: Tensor) -> Accuracy:
    """Zero-shot accuracy: each image gets the class whose text embedding has the highest cosine similarity.

    ``image_embeddings`` (N, E) are in the text tower's space (a CLIP-style teacher's image
    embedding, or a student's features through its alignment head); ``class_embeddings`` (C, E).
    """
    _check_features(image_embeddings, labels, "image")
    return topk_accuracy(zero_shot_scores(image_embeddings, class_embeddings), labels)


# ----------------------------------------------------------------------------- encoders


class Encoder(nn.Module):
    """A frozen model as evaluation sees it: ``[0, 1]`` views of side :attr:`view_size` -> ``(B, D)``.

    Images are first brought to a common square :attr:`view_size` with
    :func:`~mvmr_hf.data.augment.center_view` (so that they can be batched); ``forward`` then applies
    the rest of the model's own preprocessing. :attr:`fingerprint` identifies the features (for
    the cache); :attr:`text_model` names the CLIP-style model whose text tower classifies the
    features zero-shot, after :attr:`alignment` when a student's head maps them into its space.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        view_size: int,
        fingerprint: dict[str, Any],
        crop: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        text_model: str | None = None,
        alignment: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.view_size = view_size
        self.crop = crop
        self.mean, self.std = mean, std
        self.fingerprint = fingerprint
        self.text_model = text_model
        self.alignment = alignment.eval() if alignment is not None else None

    @torch.no_grad()
    def forward(self, views01: Tensor) -> Tensor:
        """``(B, D)`` float32 features of ``(B, 3, view_size, view_size)`` views in ``[0, 1]``."""
        x = TF.center_crop(views01, [self.crop, self.crop]) if self.crop else views01
        if self.mean is not None and self.std is not None:
            x = TF.normalize(x, list(self.mean), list(self.std))
        return self.model(x).flatten(1).float()


def timm_encoder(
    model: nn.Module, data_config: Mapping[str, Any], fingerprint: dict[str, Any], **heads: Any
) -> Encoder:
    """An :class:`Encoder` for a timm model without classifier, with timm's eval preprocessing.

    timm resizes the shorter side to ``floor(size / crop_pct)``, center crops ``size`` and
    normalizes; the antialiased resize of :func:`~mvmr_hf.data.augment.center_view` stands in for
    timm's PIL resize. ``heads`` (``text_model``, ``alignment``) are passed to the encoder.
    """
    size = data_config["input_size"][-1]
    return Encoder(
        model,
        view_size=math.floor(size / data_config.get("crop_pct", 1.0)),
        crop=size,
        mean=data_config["mean"],
        std=data_config["std"],
        fingerprint=fingerprint,
        **heads,
    )


def _release_encoder(folder: Path) -> Encoder:
    model, data_config = load_release(folder)
    alignment = load_alignment(folder)
    heads = {"alignment": alignment[0], "text_model": alignment[1].teacher} if alignment else {}
    fingerprint = {"release": sha256_of_files([folder / CONFIG, folder / WEIGHTS])}
    return timm_encoder(model, data_config, fingerprint, **heads)


def _teacher_encoder(name_or_path: str, output: str) -> Encoder:
    """A transformers model through :func:`load_teacher`; image-text models keep their text tower's name."""
    teacher = load_teacher(name_or_path, output=output)
    settings = teacher.settings
    sizes = [settings.shortest_edge, *(settings.resize_to or ()), *(settings.crop or ())]
    return Encoder(
        teacher,
        view_size=max(s for s in sizes if s),
        fingerprint=teacher.fingerprint(),
        text_model=name_or_path if teacher.output == "embedding" else None,
    )


def locate_model(
    name_or_path: str, *, option: str = "--model"
) -> tuple[Literal["release", "timm", "transformers"], str]:
    """What ``--model`` names and where to load it from: ``(kind, folder or name)``.

    * a release folder (``config.json`` in timm format): ``("release", folder)``;
    * a ``transformers`` model folder or a Hub id whose config is not timm's: ``("transformers", id)``;
    * a timm model name (``resnet50.a1_in1k``): ``("timm", name)``, timm's pretrained weights;
    * a Hub id with a timm-format ``config.json`` (a pushed release): downloaded, ``("release", folder)``.

    Raises ConfigError for a local path that is no folder and for a name that is none of these; its
    message names ``option``, the command-line option that gave ``name_or_path``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ("release", str(path)) if is_release(path) else ("transformers", name_or_path)
    if is_local_path(name_or_path):
        raise ConfigError(f"{option} {name_or_path} is not an existing folder: check the path.")
    if timm.is_model(name_or_path.split(".")[0]) and "/" not in name_or_path:
        return "timm", name_or_path
    try:
        config = json.loads(Path(hf_hub_download(name_or_path, CONFIG)).read_text())
        if "pretrained_cfg" not in config:
            return "transformers", name_or_path
        folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"])
    except (OSError, HTTPError, HFValidationError) as error:
        raise ConfigError(
            f"{option} {name_or_path} is neither a folder, a timm model name nor a reachable Hub model "
            f"({type(error).__name__}): check the name, or pass a local folder."
        ) from None
    return "release", folder


def load_encoder(name_or_path: str, *, teacher_output: str = "auto", option: str = "--model") -> Encoder:
    """The :class:`Encoder` for ``--model`` (see :func:`locate_model`; errors name ``option``).

    A release: its backbone, and its alignment head when fitted; a timm name: timm's pretrained
    weights without classifier; a ``transformers`` model:
    :func:`~mvmr_hf.models.representations.teacher.load_teacher` with ``teacher_output``.
    """
    kind, where = locate_model(name_or_path, option=option)
    if kind == "release":
        return _release_encoder(Path(where))
    if kind == "transformers":
        return _teacher_encoder(where, teacher_output)
    # timm downloads the name's weights from the Hub: offline, that fails like a Hub id does.
    with loading_errors(where, what=option):
        model = timm.create_model(where, pretrained=True, num_classes=0)
    data_config = timm.data.resolve_model_data_config(model)
    return timm_encoder(model, data_config, {"timm": where, "version": timm.__version__})


# ----------------------------------------------------------------------------- features


@dataclass
class FeatureSet:
    """Frozen features of a split in row order: ``features`` (N, D) float32, ``labels`` (N,) int64.

    Both are on the evaluation device when the features fit there (:func:`feature_device`), else
    on the CPU. ``labels`` is all -1 when the split was read without a label column, and the
    (N, C) uint8 multi-hot targets for a multi-label column (:mod:`mvmr_hf.evaluation.multilabel`).
    ``skipped`` counts the images that could not be decoded (see :mod:`mvmr_hf.data.loading`); they are
    left out together with their labels.
    """

    features: Tensor
    labels: Tensor
    skipped: int = 0


def class_names(features: Mapping[str, Any], label_column: str) -> list[str] | None:
    """The class names of ``label_column``, a column of class ids: ``None`` for plain integers."""
    feature = features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


class _Views(torch.utils.data.IterableDataset):
    """``(row, center view, label)`` for the rows of a split (``view`` None when it cannot be decoded).

    The label is the class id (-1 without a label column), or the row's ``targets`` encoding for
    a multi-label column.

    Process ``p`` of ``P`` reads rows ``p, p + P, ...``, and its DataLoader worker ``w`` of ``n``
    every ``n``-th of those from the ``w``-th; the row index lets the caller restore the split's
    order whatever the numbers of processes and workers.
    """

    def __init__(
        self,
        split: datasets.Dataset,
        image_column: str,
        label_column: str | None,
        view_size: int,
        *,
        targets: MultiHot | None = None,
        process: int = 0,
        num_processes: int = 1,
    ):
        super().__init__()
        columns = [image_column] + ([label_column] if label_column else [])
        self.split = split.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column, self.view_size = image_column, label_column, view_size
        self.targets, self.process, self.num_processes = targets, process, num_processes

    def _label(self, row: Mapping[str, Any]) -> Tensor:
        if self.label_column is None:
            return torch.tensor(-1)
        if self.targets is not None:
            return self.targets(row[self.label_column])
        return torch.tensor(int(row[self.label_column]))

    def __iter__(self) -> Iterator[tuple[int, Tensor | None, Tensor]]:
        """This worker's rows: decoded (bad images yield ``None``), center view of side ``view_size``."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, step = self.process + self.num_processes * worker, self.num_processes * num_workers
        for index in range(first, len(self.split), step):
            row = self.split[index]
            label = self._label(row)
            try:
                image = decode_image(read_encoded(row[self.image_column]))
            except BadImageError:
                yield index, None, label
                continue
            yield index, center_view(image.unsqueeze(0).float().div_(255.0), self.view_size)[0], label


def _collate(
    samples: list[tuple[int, Tensor | None, Tensor]],
) -> tuple[Tensor, Tensor | None, Tensor | None, int]:
    good = [s for s in samples if s[1] is not None]
    return (
        torch.tensor([index for index, _, _ in good], dtype=torch.long),
        torch.stack([view for _, view, _ in good]) if good else None,
        torch.stack([label for _, _, label in good]) if good else None,
        len(samples) - len(good),
    )


def _cache_path(cache_dir: Path, fingerprint: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir / f"{digest[:24]}.safetensors"


def _read_cache(path: Path) -> FeatureSet:
    stored = load_file(path)
    with safe_open(str(path), framework="pt") as file:
        skipped = int(file.metadata()["skipped"])
    return FeatureSet(stored["features"], stored["labels"], skipped)


def _write_cache(path: Path, result: FeatureSet) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": result.features.cpu().contiguous(), "labels": result.labels.cpu().contiguous()}
    atomic_write(path, lambda partial: save_file(tensors, partial, metadata={"skipped": str(result.skipped)}))


def _process_device(device: str | torch.device | None) -> torch.device:
    """This process's device: ``device``, by default the launch's (Accelerate's ``PartialState``).

    Without a launcher that is the GPU when there is one, else the CPU; under ``accelerate
    launch`` or ``torchrun`` each process's own GPU, which ``"cuda"`` then also means.
    """
    state = launch_state()
    if device is None:
        return state.device
    device = torch.device(device)
    return state.device if state.use_distributed and device.type == state.device.type else device


def feature_device(nbytes: int, device: torch.device) -> torch.device:
    """Where ``nbytes`` of features live: ``device`` if they take at most half its free memory, else the CPU.

    The other half leaves room for the model, the test split's features and the chunks of the
    probe and kNN (:data:`CHUNK_ELEMENTS`). ImageNet's training split (1.28 M x 2048 float32,
    10.5 GB) thus stays on a GPU with 21 GB free. Features on the CPU still reach the device a
    chunk at a time.
    """
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= DEVICE_MEMORY_FRACTION * free else torch.device("cpu")


def _padded(tensor: Tensor, length: int, fill: int) -> Tensor:
    return torch.cat([tensor, tensor.new_full((length - len(tensor), *tensor.shape[1:]), fill)])


def _gather_split(
    state: PartialState,
    rows: Tensor,
    features: Tensor,
    labels: Tensor,
    skipped: int,
    *,
    home: torch.device,
    rows_per_gather: int,
) -> FeatureSet:
    """Every process's rows, features and labels, in the split's row order, on every process, on ``home``.

    ``labels`` are class ids (n,) or multi-hot targets (n, C). Shares differ in length (by a row,
    or by undecodable images), so the gather of the row indices pads them to the longest with row
    -1. Features and labels are gathered ``rows_per_gather`` rows per process at a time straight
    into the preallocated result: padded copies never take more than one such chunk.
    """
    on = state.device if state.use_distributed else home  # NCCL gathers GPU tensors, gloo CPU ones
    every_row = gather(pad_across_processes(rows.to(on), pad_index=-1))
    skipped = int(gather(torch.tensor([skipped], device=on)).sum())
    ordered_rows = every_row[every_row >= 0].sort().values
    result = FeatureSet(
        torch.empty(len(ordered_rows), features.shape[1], dtype=features.dtype, device=home),
        torch.empty(len(ordered_rows), *labels.shape[1:], dtype=labels.dtype, device=home),
        skipped,
    )
    share = len(every_row) // state.num_processes  # the longest share: every process's, padded
    shares = every_row.view(state.num_processes, share)
    for start in range(0, share, rows_per_gather):
        length = min(rows_per_gather, share - start)
        chunk_rows = shares[:, start : start + length].reshape(-1)  # process-major, as gather concatenates
        keep = chunk_rows >= 0
        where = torch.searchsorted(ordered_rows, chunk_rows[keep]).to(home)
        for local, gathered in ((features, result.features), (labels, result.labels)):
            chunk = gather(_padded(local[start : start + length].to(on), length, 0))
            gathered[where] = chunk[keep].to(home)
    return result


def extract_features(
    encoder: Encoder,
    split: datasets.Dataset,
    *,
    image_column: str | None = None,
    label_column: str | None = "label",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
    targets: MultiHot | None = None,
) -> FeatureSet:
    """Frozen features of every image of ``split`` (no augmentation: the center view), in row order.

    ``split`` is a map-style ``datasets.Dataset`` (``load_image_dataset(..., streaming=False)``).
    Under ``accelerate launch`` / ``torchrun`` with P processes, call it on every process: process
    ``p`` extracts rows ``p, p + P, ...`` on its own device, and every process gets the whole
    split back (gathered, in row order: the features of a single process). ``device`` defaults
    to the launch's device for this process (the GPU when there is one, else the CPU); the
    features stay there when they fit (:func:`feature_device`), else on the CPU.

    With ``cache_dir``, the result is stored as ``<hash>.safetensors`` (by the main process)
    keyed by the encoder's fingerprint, its view size, the columns and the split's ``datasets``
    fingerprint (which changes with the data), and read back on the next call. ``label_column=None``
    reads unlabelled images (labels -1); a labelled split must not contain -1 labels.

    A multi-label column (several classes or a multi-hot vector per image, see
    :mod:`mvmr_hf.evaluation.multilabel`) gives (N, C) uint8 targets, encoded by ``targets``: by default
    :func:`~mvmr_hf.evaluation.multilabel.multi_hot_encoding` of this split alone; pass that of the
    training and test splits together so that they agree on C (as :func:`evaluate` does).
    """
    if not isinstance(split, datasets.Dataset):
        raise ConfigError("extract_features needs a map-style split: load it with streaming=False.")
    column = resolve_image_column(split.features, image_column)
    if label_column is not None and targets is None:
        targets = multi_hot_encoding([split], label_column)  # also checks the column; None for class ids
    state, device = launch_state(), _process_device(device)
    identity = {
        "encoder": encoder.fingerprint,
        "view_size": encoder.view_size,
        "columns": [column, label_column],
        "split": split._fingerprint,  # datasets' content hash of the split (no public accessor)
    }
    if targets is not None:  # C may come from the other split: the same column can be encoded two ways
        identity["targets"] = [targets.kind, targets.num_classes]
    cached = _cache_path(Path(cache_dir).expanduser(), identity) if cache_dir is not None else None
    if cached is not None and holds_on_every_process(cached.is_file(), state):
        stored = _read_cache(cached)
        home = feature_device(stored.features.nbytes, device)
        return FeatureSet(stored.features.to(home), stored.labels.to(home), stored.skipped)
    encoder.to(device)
    # The feature width, to choose where the N x D features will live before any is computed.
    width = encoder(torch.zeros(1, 3, encoder.view_size, encoder.view_size, device=device)).shape[1]
    home = feature_device(len(split) * width * 4, device)
    views = _Views(
        split,
        column,
        label_column,
        encoder.view_size,
        targets=targets,
        process=state.process_index,
        num_processes=state.num_processes,
    )
    loader = torch.utils.data.DataLoader(
        views, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    rows, features, labels, skipped = [], [torch.empty(0, width, device=home)], [], 0
    for batch_rows, views01, batch_labels, bad in loader:
        skipped += bad
        if views01 is not None:
            rows.append(batch_rows)
            features.append(encoder(views01.to(device)).to(home))
            labels.append(batch_labels)
    local_rows = torch.cat(rows) if rows else torch.empty(0, dtype=torch.long)
    no_labels = (
        torch.empty(0, dtype=torch.long)
        if targets is None
        else torch.empty(0, targets.num_classes, dtype=MultiHot.dtype)
    )
    local_labels = torch.cat([no_labels, *labels])
    result = _gather_split(
        state, local_rows, torch.cat(features), local_labels, skipped, home=home, rows_per_gather=batch_size
    )
    if not len(result.labels):
        raise ConfigError("no image of the split could be decoded: check the dataset and --image-column.")
    if label_column is not None and (result.labels < 0).any():
        raise ConfigError("the split has unlabelled images (label -1): evaluate on a labelled split.")
    if cached is not None and state.is_main_process:
        _write_cache(cached, result)
    return result


# ----------------------------------------------------------------------------- zero-shot text


def text_embeddings(
    model_name_or_path: str, names: Sequence[str], *, device: str | torch.device = "cpu"
) -> Tensor:
    """``(C, E)`` text embeddings of ``"a photo of a {name}"`` from a CLIP-style model's text tower."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModel.from_pretrained(model_name_or_path).eval().to(device)
    except (OSError, ValueError) as error:  # ValueError: a folder with no tokenizer transformers can build
        raise ConfigError(
            f"cannot load the text tower and tokenizer of {model_name_or_path} ({type(error).__name__}): "
            "zero-shot needs a CLIP-style model with its tokenizer."
        ) from None
    if not hasattr(model, "get_text_features"):
        raise ConfigError(f"{model_name_or_path} has no text tower: zero-shot needs a CLIP-style model.")
    tokens = tokenizer(
        [PROMPT.format(name) for name in names],
        padding="max_length",
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    ).to(device)
    with torch.no_grad():
        output = model.get_text_features(**tokens)
    return getattr(output, "pooler_output", output).float().cpu()


# ----------------------------------------------------------------------------- the protocols together


@dataclass(frozen=True)
class ProtocolResult:
    """One protocol's scores (percent) and how they were obtained (``detail``).

    Classification protocols report ``top1`` and ``top5`` (``None`` with 5 classes or fewer),
    multi-label ones ``mean_ap``; ``label_fraction`` is the share of the training split's labels a
    protocol used (semi-supervised fine-tuning), ``None`` for all of them.
    """

    protocol: str
    top1: float | None
    top5: float | None
    detail: str = ""
    mean_ap: float | None = None
    label_fraction: float | None = None

    @property
    def name(self) -> str:
        """The protocol as the card and the table name it: ``finetune-1%`` for 1 % of the labels."""
        if self.label_fraction is None:
            return self.protocol
        return f"{self.protocol}-{100 * self.label_fraction:g}%"

    def metrics(self) -> list[tuple[str, str, float]]:
        """``(metric type, metric name, value)`` of every score measured."""
        scores = [
            ("accuracy", "top-1", self.top1),
            ("accuracy", "top-5", self.top5),
            ("mAP", "mAP", self.mean_ap),
        ]
        return [(kind, f"{self.name} {label}", value) for kind, label, value in scores if value is not None]


def parse_protocols(text: str) -> tuple[str, ...]:
    """``"linear,knn"`` -> ``("linear", "knn")``; ConfigError naming the valid protocols otherwise.

    A protocol listed twice (``--protocol linear --protocol knn,linear``) is refused, as every comma
    list's repeated entry is: it would run and report once, the list silently shortened.
    """
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise ConfigError(
            f"unknown protocol {', '.join(unknown) or repr(text)}: use a comma-separated subset of "
            f"{','.join(PROTOCOLS)}."
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--protocol lists {', '.join(repeated)} twice: name each protocol once")
    return names


def evaluate(
    encoder: Encoder,
    dataset: str,
    *,
    config: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_column: str | None = None,
    label_column: str = "label",
    protocols: Sequence[str] = ("linear", "knn"),
    batch_size: int = 256,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> list[ProtocolResult]:
    """Run ``protocols`` on ``dataset`` (a Hub id or a local folder) with ``encoder``'s frozen features.

    ``linear``, ``knn`` and ``multilabel`` fit on ``train_split`` and report on ``test_split``;
    ``zero-shot`` only reads ``test_split`` and needs an encoder with a text model (a CLIP-style
    teacher, or a release with an alignment head). ``multilabel`` needs a label column with
    several classes per image, the others one class per image (:mod:`mvmr_hf.evaluation.multilabel`);
    both are checked before any image is read. Features are extracted once per split (and cached
    in ``cache_dir``); the probes and kNN run on ``device`` (see :func:`extract_features`), in
    chunks. Under a launch of several processes, call it on every process: each extracts its
    share of the rows, and each gets the same results; let the main process print and write them.
    """
    parse_protocols(",".join(protocols))
    if "finetune" in protocols:
        raise ConfigError("evaluate() reads frozen features: fine-tune with mvmr_hf.finetune().")
    device = _process_device(device)
    if "zero-shot" in protocols and encoder.text_model is None:
        raise ConfigError(
            "zero-shot needs a CLIP-style teacher or a student release with an alignment head: "
            "fit one with `mvmr-align`."
        )
    test_data = load_image_dataset(dataset, config=config, split=test_split, streaming=False)
    fitted = any(protocol in protocols for protocol in ("linear", "knn", "multilabel"))
    splits = [test_data]
    if fitted:
        train_data = load_image_dataset(dataset, config=config, split=train_split, streaming=False)
        splits.append(train_data)
    targets = multi_hot_encoding(splits, label_column)  # reads the label column only, no image
    check_label_kind(protocols, targets, label_column)
    options = {
        "image_column": image_column,
        "label_column": label_column,
        "batch_size": batch_size,
        "device": device,
        "num_workers": num_workers,
        "cache_dir": cache_dir,
        "targets": targets,
    }
    test = extract_features(encoder, test_data, **options)
    results = []
    if fitted:
        train = extract_features(encoder, train_data, **options)
        if "linear" in protocols:
            probe = linear_probe(train.features, train.labels, test.features, test.labels, device=device)
            results.append(
                ProtocolResult(
                    "linear", probe.top1, probe.top5, f"L-BFGS, weight decay {probe.weight_decay:g}"
                )
            )
        if "knn" in protocols:
            knn = knn_classify(train.features, train.labels, test.features, test.labels, device=device)
            results.append(
                ProtocolResult("knn", knn.top1, knn.top5, f"cosine, k={KNN_K}, T={KNN_TEMPERATURE}")
            )
        if "multilabel" in protocols:
            probe = multilabel_probe(train.features, train.labels, test.features, test.labels, device=device)
            classes = train.labels.shape[1]
            detail = f"one-vs-rest L-BFGS, {classes} classes, weight decay {probe.weight_decay:g}"
            results.append(ProtocolResult("multilabel", None, None, detail, mean_ap=probe.mean_ap))
    if "zero-shot" in protocols:
        names = class_names(test_data.features, label_column)
        names = names or [str(i) for i in range(int(test.labels.max()) + 1)]
        classes = text_embeddings(encoder.text_model, names, device=device)
        if encoder.alignment is None:
            accuracy = zero_shot(test.features, test.labels, classes)
            results.append(ProtocolResult("zero-shot", accuracy.top1, accuracy.top5, f"prompt '{PROMPT}'"))
        else:
            teacher_encoder = load_encoder(encoder.text_model, teacher_output="embedding")
            teacher = extract_features(teacher_encoder, test_data, **options)
            results.append(_aligned_zero_shot(encoder.alignment, test, teacher.features, classes))
    return results


def check_label_kind(protocols: Sequence[str], targets: MultiHot | None, label_column: str) -> None:
    """Refuse protocols that need another kind of label column than ``label_column``'s; name the right one."""
    if targets is None and "multilabel" in protocols:
        raise ConfigError(
            f"protocol multilabel needs several classes per image, but label column {label_column!r} "
            "holds one class per image: use --protocol linear, knn or zero-shot, or choose a column "
            "listing the classes (or a multi-hot vector) with --label-column."
        )
    single = [protocol for protocol in protocols if protocol != "multilabel"]
    if targets is not None and single:
        holds = "a list of classes" if targets.kind == "class-lists" else "a multi-hot vector"
        raise ConfigError(
            f"protocol {', '.join(single)} needs one class per image, but label column {label_column!r} "
            f"holds {holds} per image: use --protocol multilabel."
        )


def _aligned_zero_shot(
    alignment: nn.Module, test: FeatureSet, teacher: Tensor, classes: Tensor
) -> ProtocolResult:
    """Zero-shot through a student's alignment head, with how close it comes to its teacher.

    The detail gives the teacher's own zero-shot top-1 on the same images and the share of images
    on which student and teacher predict the same class.
    """
    with torch.no_grad():
        student = zero_shot_scores(alignment.to(test.features.device)(test.features), classes)
    reference = zero_shot_scores(teacher.to(test.features.device), classes)
    accuracy, teacher_accuracy = topk_accuracy(student, test.labels), topk_accuracy(reference, test.labels)
    agreement = 100.0 * (student.argmax(1) == reference.argmax(1)).float().mean().item()
    detail = f"via alignment head; teacher top-1 {teacher_accuracy.top1:.2f}, agreement {agreement:.2f}%"
    return ProtocolResult("zero-shot", accuracy.top1, accuracy.top5, detail)


def to_eval_results(
    results: Sequence[ProtocolResult],
    *,
    dataset: str,
    config: str | None,
    split: str,
    command: str | None = None,
) -> list[EvalResult]:
    """The results as ``huggingface_hub.EvalResult`` entries of the card's ``model-index``.

    Each entry carries the task, the dataset (id, config, split), the metric and, as its config,
    the protocol (:attr:`ProtocolResult.name`); its ``args`` hold the label fraction, where one
    applies, and ``command``, the command line that measured it.
    """
    dataset_id = hub_id_or_none(dataset) or Path(dataset).name
    entries = []
    for result in results:
        args = {"label_fraction": result.label_fraction, "command": command}
        for metric_type, metric_name, value in result.metrics():
            entries.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=dataset_id,
                    dataset_name=dataset_id,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_config=result.name,
                    metric_args={k: v for k, v in args.items() if v is not None} or None,
                    metric_value=round(value, 2),
                )
            )
    return entries


def format_table(results: Sequence[ProtocolResult]) -> str:
    """A plain-text table of the results for the terminal."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [("protocol", "top-1", "top-5", "mAP", "detail")]
    for r in results:
        rows.append((r.name, cell(r.top1), cell(r.top5), cell(r.mean_ap), r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
