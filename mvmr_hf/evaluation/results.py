"""A protocol's result (:class:`ProtocolResult`), its model-card ``model-index`` entries
(:func:`to_eval_results`) and the table ``mvmr-evaluate`` prints (:func:`format_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult

from mvmr_hf.release.card import TASK_NAME, TASK_TYPE, hub_id_or_none


@dataclass(frozen=True)
class ProtocolResult:
    """One protocol's scores (percent) and how they were obtained (``detail``).

    Classification protocols report ``top1`` and ``top5`` (``None`` with 5 classes or fewer),
    multi-label ones ``mean_ap``; ``label_fraction`` is the share of the training split's labels a
    protocol used (semi-supervised fine-tuning), ``None`` for all of them.

    Attributes:
        protocol: the protocol (``linear``, ``knn``, ``zero-shot``, ``multilabel``, ``finetune``).
        top1: top-1 accuracy in percent; None for a multi-label protocol.
        top5: top-5 accuracy in percent; None with 5 classes or fewer, or for a multi-label protocol.
        detail: how the scores were obtained, for the table (``"L-BFGS, weight decay 0.001"``).
        mean_ap: mean average precision in percent (``multilabel``); None for the others.
        label_fraction: the share of the training split's labels used, in (0, 1] (fine-tuning on a
            labelled subset, paper Table 1); None for all of them.
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

    Args:
        results: the protocols' results (:func:`~mvmr_hf.evaluation.evaluate`); one entry per score
            each measured, its value rounded to 2 decimals.
        dataset: the data set evaluated on: a Hub id, kept as is, or a local folder, named by its
            last path component.
        config: the data set's configuration (subset), or None.
        split: the split the scores were measured on.
        command: the command line that measured them; None: not recorded.
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
