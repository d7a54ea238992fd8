"""Multi-label targets and mean average precision: the data side of the ``multilabel`` protocol.

The paper measures transfer to PASCAL VOC 2007 with "a linear classifier on top of the frozen
representations", trained on VOC07 trainval and reported as mAP on VOC07 test (section 6,
Table 3). :func:`mvmr_hf.evaluation.probe.multilabel_probe` is that classifier; this module decides
what a label column holds, turns its rows into multi-hot targets and scores the classifier.

Label kinds, told apart from the ``datasets`` schema alone (:func:`column_kind`), so that a
wrong column is refused before any image is read:

* ``ClassLabel`` or an integer ``Value``: one class per image (``"class"``), for ``linear``,
  ``knn`` and ``zero-shot``;
* a list (``List``, ``Sequence`` or ``LargeList``) of ``ClassLabel``: the classes an image
  shows (``"class-lists"``);
* a list of ``bool`` or floats, or a list of integers of declared fixed length
  (``List(Value("int8"), length=C)``): a multi-hot vector of 0/1 (``"multi-hot"``);
* a list of integers of variable length: class ids (``"class-lists"``). A multi-hot column of
  integers must therefore declare its length (or hold bools): without it, ``[0, 1, 1]`` reads
  as the classes {0, 1}.

The number of classes C (:func:`multi_hot_encoding`) is the ``ClassLabel``'s, the declared
length, the common length of the multi-hot rows, else the largest class id of the splits given
(train and test together) + 1. A class id listed twice in a row (VOC lists one per object)
counts once.

VOC07 conventions. The average precision (:func:`average_precisions`) is the non-interpolated
one (scikit-learn's, that of the VOC devkit from 2010 on), not the 11-point interpolated AP of
the VOC2007 devkit, so figures are not comparable to the latter to the decimal. "Difficult"
objects count as whatever the label column says: there is no ignore mask, so a column that
lists them scores them as positives, one that leaves them out as negatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch import Tensor

from mvmr_hf.errors import ConfigError

LabelKind = Literal["class", "class-lists", "multi-hot"]


def column_kind(features: Mapping[str, Any] | None, label_column: str) -> LabelKind:
    """What ``label_column`` of a split with ``features`` (its schema) holds; the rule is the module's.

    Raises ConfigError, listing the columns, when the column is missing or holds none of the kinds.
    """
    columns = list(features or {})
    if features is None or label_column not in features:
        raise ConfigError(
            f"label column {label_column!r} is not in the dataset: "
            f"choose one of {columns} with --label-column."
        )
    feature = features[label_column]
    if isinstance(feature, datasets.ClassLabel) or _is_integer(feature):
        return "class"
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        inner = feature.feature
        if isinstance(inner, datasets.ClassLabel):
            return "class-lists"
        if isinstance(inner, datasets.Value) and (inner.dtype == "bool" or inner.dtype.startswith("float")):
            return "multi-hot"
        if _is_integer(inner):
            return "multi-hot" if getattr(feature, "length", -1) >= 0 else "class-lists"
    raise ConfigError(
        f"label column {label_column!r} holds {feature}, neither class ids (ClassLabel, integers) nor "
        f"a list of classes or a multi-hot vector per image: choose among {columns} with --label-column."
    )


def _is_integer(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))


@dataclass(frozen=True)
class MultiHot:
    """How the rows of a multi-label column become ``(C,)`` 0/1 targets: call it on a row's value."""

    kind: LabelKind
    num_classes: int
    dtype: ClassVar[torch.dtype] = torch.uint8
    """0/1 in a byte: the (N, C) targets take an eighth of int64's memory in the cache and gathers."""

    def __call__(self, value: Sequence[Any]) -> Tensor:
        if self.kind == "multi-hot":
            return torch.tensor(value).to(self.dtype)
        ids = torch.tensor(value, dtype=torch.long)
        return torch.zeros(self.num_classes, dtype=self.dtype).index_fill_(0, ids, 1)


def multi_hot_encoding(splits: Sequence[datasets.Dataset], label_column: str) -> MultiHot | None:
    """The encoding shared by ``splits`` (train and test) of a multi-label column; ``None`` for class ids.

    Reads the label column only (no image) to find the number of classes and check the values:
    no row without labels, class ids in ``0..C-1``, multi-hot rows of length C holding 0 and 1
    only. Raises ConfigError when the splits' columns are of different kinds or values are off.
    """
    kinds = sorted({column_kind(split.features, label_column) for split in splits})
    if len(kinds) > 1:
        raise ConfigError(
            f"label column {label_column!r} holds {kinds[0]} labels in one split and {kinds[1]} in "
            "another: use splits with the same label column."
        )
    (kind,) = kinds
    if kind == "class":
        return None
    columns = [split.with_format("arrow")[label_column] for split in splits]
    flat = [pc.list_flatten(column) for column in columns]
    if any(array.null_count for array in [*columns, *flat]):
        raise ConfigError(f"label column {label_column!r} has missing labels (null): fill them first.")
    values = np.concatenate([array.to_numpy() for array in flat])
    feature = splits[0].features[label_column]
    if kind == "multi-hot":
        lengths = np.unique(np.concatenate([pc.list_value_length(c).to_numpy() for c in columns]))
        if len(lengths) != 1:
            raise ConfigError(
                f"label column {label_column!r} holds multi-hot vectors of lengths "
                f"{', '.join(map(str, lengths[:5]))}: every row needs one value per class."
            )
        if not np.isin(values, (0, 1)).all():
            raise ConfigError(
                f"label column {label_column!r} holds values other than 0 and 1: a multi-hot vector "
                "needs 0/1 (map VOC's -1/0/1 with 0 for difficult to 0 or 1 first)."
            )
        return MultiHot(kind, int(lengths[0]))
    named = feature.feature.num_classes if isinstance(feature.feature, datasets.ClassLabel) else None
    if not len(values) and named is None:
        raise ConfigError(f"label column {label_column!r} lists no class at all: check the column.")
    num_classes = named if named is not None else int(values.max()) + 1
    if len(values) and (values.min() < 0 or values.max() >= num_classes):
        raise ConfigError(
            f"label column {label_column!r} holds class ids from {values.min()} to {values.max()}, "
            f"outside 0..{num_classes - 1}: fix the column."
        )
    return MultiHot(kind, num_classes)


def average_precisions(scores: Tensor, targets: Tensor) -> Tensor:
    """Each class's non-interpolated average precision in percent, ``(C,)`` float64, NaN without a positive.

    ``scores`` (N, C) rank the samples per class (logits, probabilities: only the order counts);
    ``targets`` (N, C) are 0/1. AP is ``sum_t (R_t - R_{t-1}) P_t`` over the distinct scores t
    from the highest, with precision ``P_t`` and recall ``R_t`` of the samples scored at least
    t: scikit-learn's ``average_precision_score`` (tied samples are one threshold, not ranked
    among themselves). Computed on the CPU in float64, as scikit-learn does.

    A class with no positive sample has no AP (the recall is 0/0): it is NaN here, whereas
    scikit-learn (1.9) scores it 0 with a warning.
    """
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ConfigError(
            f"scores and targets must both be (N, C), got {tuple(scores.shape)} and {tuple(targets.shape)}."
        )
    scores, targets = scores.detach().to("cpu", torch.float64), targets.to("cpu", torch.float64)
    count = len(scores)
    values, order = scores.sort(dim=0, descending=True)
    hits = targets.gather(0, order)
    ranks = torch.arange(1, count + 1, dtype=torch.float64)[:, None]
    precision = hits.cumsum(0) / ranks
    # Every sample of a tie group gets the precision at the group's last rank: the threshold's.
    ends = torch.cat([values[1:] != values[:-1], torch.ones(1, scores.shape[1], dtype=torch.bool)])
    positions = torch.arange(count)[:, None].expand_as(ends)
    last = torch.where(ends, positions, count).flip(0).cummin(0).values.flip(0)
    positives = hits.sum(0)
    precisions = (hits * precision.gather(0, last)).sum(0)
    return torch.where(positives > 0, 100.0 * precisions / positives.clamp_min(1), torch.nan)


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """mAP in percent: the mean of :func:`average_precisions` over the classes with a positive sample.

    That is scikit-learn's ``average_precision_score(targets, scores, average="macro")`` (times
    100) when every class has a positive, as in VOC07's test split (paper, section 6, Table 3).
    Classes without one are left out of the mean, where scikit-learn (1.9) would average in a 0.
    Raises ConfigError when no class has a positive.
    """
    precisions = average_precisions(scores, targets)
    defined = precisions[~precisions.isnan()]
    if not len(defined):
        raise ConfigError(f"no class has a positive among the {len(scores)} samples: mAP is undefined.")
    return defined.mean().item()
