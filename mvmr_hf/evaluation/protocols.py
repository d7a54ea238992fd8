"""The protocols together: :func:`evaluate` runs those asked for on one dataset, from features
extracted once per split (:mod:`~mvmr_hf.evaluation.features`), with the checks that each protocol
has the label kind it needs (:func:`check_label_kind`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from mvmr_hf.data.loading import (
    load_image_dataset,
)
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.features import (
    Encoder,
    _process_device,
    class_names,
    extract_features,
    load_encoder,
)
from mvmr_hf.evaluation.knn import KNN_K, KNN_TEMPERATURE, knn_classify
from mvmr_hf.evaluation.multilabel import (
    MultiHot,
    multi_hot_encoding,
)
from mvmr_hf.evaluation.probe import (
    linear_probe,
    multilabel_probe,
)
from mvmr_hf.evaluation.results import ProtocolResult
from mvmr_hf.evaluation.zeroshot import PROMPT, _aligned_zero_shot, text_embeddings, zero_shot

PROTOCOLS = ("linear", "knn", "zero-shot", "multilabel", "finetune")
"""Protocols of ``mvmr-evaluate``; all but ``finetune`` (:mod:`mvmr_hf.evaluation.finetuning`) read
frozen features."""


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

    Args:
        encoder: the frozen model (:func:`load_encoder`); it maps the center view to its features.
        dataset: a Hub id (``owner/name``) or a local folder (:func:`~mvmr_hf.data.load_image_dataset`).
        config: the data set's configuration (subset), when it has several.
        train_split: the split the probes and kNN are fitted on (not read for ``zero-shot`` alone).
        test_split: the split the results are reported on.
        image_column: the column holding the images; None picks the single image column.
        label_column: the column holding the labels: one class id per image, or, for
            ``multilabel``, a list of classes or a multi-hot vector per image.
        protocols: a subset of ``linear``, ``knn``, ``zero-shot`` and ``multilabel`` (not ``finetune``:
            see :func:`~mvmr_hf.evaluation.finetune`), each named once.
        batch_size: images per forward pass of the feature extraction.
        device: where the encoder, the probes and kNN run; None: this process's launch device
            (the GPU when there is one, else the CPU).
        num_workers: DataLoader workers decoding the images (0: in this process).
        cache_dir: a folder for the features (safetensors, reused across calls); None: no cache.

    Returns:
        One :class:`ProtocolResult` per protocol run, in the order linear, knn, multilabel, zero-shot
        (top-1 and top-5 in percent, or ``mean_ap`` for ``multilabel``).

    Raises:
        ConfigError: an unknown or repeated protocol, ``finetune``, ``zero-shot`` without a text
            model, or a label column of the wrong kind for a protocol.
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
    sources = {"config": config, "streaming": False, "image_column": image_column}
    test_data = load_image_dataset(dataset, split=test_split, **sources)
    fitted = any(protocol in protocols for protocol in ("linear", "knn", "multilabel"))
    splits = [test_data]
    if fitted:
        train_data = load_image_dataset(dataset, split=train_split, **sources)
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
