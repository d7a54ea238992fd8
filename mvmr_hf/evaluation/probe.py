"""The linear probes on frozen features, and the accuracy they and the other protocols report.

* :func:`linear_probe`: multinomial logistic regression on standardised features, full-batch
  L-BFGS, weight decay chosen on a validation split carved from a random subsample of at most
  :data:`SEARCH_ROWS` (100,000) training rows (never the test split), then refitted on the whole
  training split; top-1 and top-5 (:class:`Accuracy`, :func:`topk_accuracy`).
* :func:`multilabel_probe` (protocol ``multilabel``, paper Table 3): one logistic regression per
  class (one-vs-rest) on standardised features, fitted and searched as :func:`linear_probe`'s,
  scored by mAP (:func:`~mvmr_hf.evaluation.multilabel.mean_average_precision`). Both probes share
  one fit (:func:`_fit_probe`), so the multi-label one lives here beside it, and
  :mod:`~mvmr_hf.evaluation.multilabel` (the label kinds, multi-hot targets and AP, which feature
  extraction also needs) stays below both.

The probe runs on the device in chunks of about :data:`CHUNK_ELEMENTS` numbers (128 MiB in
float32): it adds up its loss and gradient over chunks of rows (ImageNet's 1.28 M x 1000 logits,
5 GB, never exist at once); features left on the CPU cross to the device a chunk at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.features import (
    feature_device,
)
from mvmr_hf.evaluation.multilabel import (
    average_precisions,
    mean_average_precision,
)
from mvmr_hf.utils import check_int

WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

SEARCH_ROWS = 100_000
"""Training rows the weight-decay search of :func:`linear_probe` fits and validates on, at most."""

CHUNK_ELEMENTS = 1 << 25
"""Numbers in one chunk of the probe (features and logits) or of kNN (similarities): 128 MiB in float32."""


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

    Args:
        train_features: (N, D) frozen features of the training split, float32 or half precision.
        train_labels: (N,) int64 class ids in [0, C).
        test_features: (M, D) frozen features of the test split.
        test_labels: (M,) int64 class ids; C is the largest id of either split plus one.
        weight_decays: the grid searched, largest first whatever the order given; a single value
            skips the search.
        val_fraction: the share, in (0, 1), of the search's rows held out to score each weight decay.
        max_iter: the L-BFGS iteration cap of each fit (``torch.optim.LBFGS(max_iter=...)``).
        seed: seeds the permutation that picks the search's rows and its held-out share.
        search_rows: the most training rows the search uses (fit and held out together).
        chunk_size: rows per chunk of the loss and gradient; None: about :data:`CHUNK_ELEMENTS`
            numbers of features and logits per chunk.
        device: where the chunks are computed; None: where ``train_features`` are.

    Returns:
        A :class:`ProbeResult`: top-1 and top-5 test accuracy in percent (top-5 None with 5 classes
        or fewer) and the weight decay chosen.

    Raises:
        ConfigError: features that are not (N, D) with N labels.
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

    Args:
        train_features: (N, D) frozen features of the training split, float32 or half precision.
        train_targets: (N, C) 0/1 targets of the training split.
        test_features: (M, D) frozen features of the test split.
        test_targets: (M, C) 0/1 targets of the test split, the same C classes.
        weight_decays: the grid searched, largest first whatever the order given; a single value
            skips the search.
        val_fraction: the share, in (0, 1), of the search's rows held out to score each weight decay.
        max_iter: the L-BFGS iteration cap of each fit (``torch.optim.LBFGS(max_iter=...)``).
        seed: seeds the permutation that picks the search's rows and its held-out share.
        search_rows: the most training rows the search uses (fit and held out together).
        chunk_size: rows per chunk of the loss and gradient; None: about :data:`CHUNK_ELEMENTS`
            numbers of features and logits per chunk.
        device: where the chunks are computed; None: where ``train_features`` are.

    Returns:
        A :class:`MultiLabelResult`: the test mAP and each class's AP in percent, and the weight
        decay chosen.

    Raises:
        ConfigError: features that are not (N, D) with N rows of targets, or targets of the two
            splits with different numbers of classes.
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
