"""The paper's remaining protocols on real images: semi-supervised fine-tuning and multi-label transfer.

Semi-supervised (the protocol of the paper's Table 1) on scikit-learn's digits (a local parquet data
set, 1,437 training / 360 test images): 10 % of the training labels (145 images, the same share of
each class: ``mvmr_hf.labelled_subset``) and

- **linear probe**: ``mvmr_hf.linear_probe`` (L-BFGS, weight decay searched) on the frozen features of
  exactly those 145 images, the reference a fine-tuned model has to beat;
- **fine-tuning**: ``mvmr_hf.finetune`` (the code of ``mvmr-evaluate --protocol finetune``) of the whole
  backbone and a linear head on them, batch 32, 100 epochs, Adam at the paper's 1e-4 and at 1e-3.

Multi-label transfer (the protocol of the paper's Table 3) on digit pairs (``write_digit_pairs``: two
real digits side by side per image, labelled with the digits shown; 1,000 training / 300 test
pairs): the mAP of the ``multilabel`` protocol's probe (``mvmr_hf.evaluation.probe.multilabel_probe``),
with scikit-learn's ``OneVsRestClassifier(LogisticRegression)`` at the weight decay it chose, on
the same features, as the reference.

Models: timm's ``test_resnet`` randomly initialised (32 px), and Google's EfficientNet-Lite0
ImageNet-1k weights (the ``demo`` extra; a real pretrained backbone) as a release at 64 px.
``--quick`` runs the random ResNet alone, 2 epochs, on fewer pairs: it shows the script runs.

    python benchmarks/bench_protocols.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from common import parser, report, resolve_device

from mvmr_hf.cli import run_cli

IMAGE_SIZE = 32
FRACTION = 0.1
BATCH = 32
EPOCHS, QUICK_EPOCHS = 100, 2
LEARNING_RATES = (1e-4, 1e-3)  # the paper's, and ten times it
PAIRS, QUICK_PAIRS = (1000, 300), (200, 100)


def _efficientnet_release(folder: Path, size: int) -> Path:
    """EfficientNet-Lite0 (ImageNet-1k) without its classifier, as a release recording ``size`` px inputs."""
    from safetensors.torch import save_file

    from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
    from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS, write_timm_config

    source = save_efficientnet_lite(folder.with_name(folder.name + "-source"))
    model = timm.create_model(f"local-dir:{source}", pretrained=True, num_classes=0).eval()
    config = timm.data.resolve_model_data_config(model)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS)
    write_timm_config(model, folder / CONFIG, {**config, "input_size": (3, size, size)})
    return folder


def _random_release(folder: Path) -> Path:
    from mvmr_hf.models.student import build_student
    from mvmr_hf.release.export import export_student

    torch.manual_seed(0)
    student = build_student("test_resnet", projector="16", image_size=IMAGE_SIZE).eval()
    return export_student(student, folder, training_args={"student": "test_resnet", "projector": "16"})


def _probe_on_subset(model: Path, digits: Path, rows: list[int], device: torch.device) -> float:
    """Linear-probe top-1 of ``model``'s frozen features fitted on the training ``rows`` only."""
    from mvmr_hf.data.loading import load_image_dataset
    from mvmr_hf.evaluation.features import extract_features, load_encoder
    from mvmr_hf.evaluation.probe import linear_probe

    encoder = load_encoder(str(model))
    train, test = (
        extract_features(
            encoder, load_image_dataset(str(digits), split=split, streaming=False), device=device
        )
        for split in ("train", "test")
    )
    subset = torch.tensor(rows, device=train.labels.device)
    probe = linear_probe(train.features[subset], train.labels[subset], test.features, test.labels)
    return probe.top1


def _finetune(model: Path, digits: Path, folder: Path, learning_rate: float, epochs: int) -> dict[str, Any]:
    from mvmr_hf.config import FinetuneArguments
    from mvmr_hf.evaluation.finetuning import finetune

    arguments = FinetuneArguments(
        label_fraction=FRACTION, finetune_epochs=epochs, finetune_batch_size=BATCH,
        finetune_learning_rate=learning_rate, finetune_dir=str(folder), checkpoint_every=10**6,
    )  # fmt: skip
    began = time.perf_counter()
    result = finetune(str(model), str(digits), arguments, command="bench_protocols.py")
    return {
        "top1": result.top1,
        "top5": result.top5,
        "steps": result.steps,
        "seconds": time.perf_counter() - began,
    }


def _multilabel(model: Path, pairs: Path, cache: Path, device: torch.device) -> dict[str, float]:
    """mAP of the multilabel protocol, and scikit-learn's one-vs-rest at the chosen weight decay."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    from mvmr_hf.data.loading import load_image_dataset
    from mvmr_hf.evaluation.features import extract_features, load_encoder
    from mvmr_hf.evaluation.multilabel import multi_hot_encoding
    from mvmr_hf.evaluation.probe import multilabel_probe

    encoder = load_encoder(str(model))
    splits = [load_image_dataset(str(pairs), split=split, streaming=False) for split in ("train", "test")]
    targets = multi_hot_encoding(splits, "labels")
    train, test = (extract_features(encoder, split, label_column="labels", targets=targets, cache_dir=cache,
                                    device=device) for split in splits)  # fmt: skip
    # The protocol's probe: what evaluate(..., protocols=["multilabel"]) runs on these features.
    probe = multilabel_probe(train.features, train.labels, test.features, test.labels, device=device)
    weight_decay = probe.weight_decay
    x_train, x_test = train.features.cpu().numpy(), test.features.cpu().numpy()
    scaler = StandardScaler().fit(x_train)
    classifier = OneVsRestClassifier(LogisticRegression(C=1 / (len(x_train) * weight_decay), max_iter=5000))
    classifier.fit(scaler.transform(x_train), train.labels.cpu().numpy())
    scores = classifier.decision_function(scaler.transform(x_test))
    reference = 100 * average_precision_score(test.labels.cpu().numpy(), scores, average="macro")
    return {"map": probe.mean_ap, "sklearn_map": reference, "weight_decay": weight_decay}


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)
    epochs = QUICK_EPOCHS if args.quick else EPOCHS
    train_pairs, test_pairs = QUICK_PAIRS if args.quick else PAIRS
    from mvmr_hf.data.sample_data import write_digit_pairs, write_digits

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-protocols-") as tmp:
        work = Path(tmp)
        digits = write_digits(work / "digits", image_size=IMAGE_SIZE)
        pairs = write_digit_pairs(work / "pairs", train_pairs=train_pairs, test_pairs=test_pairs)
        models = {"test_resnet, random init (32 px)": _random_release(work / "random")}
        if not args.quick:
            models["EfficientNet-Lite0, ImageNet-1k (64 px)"] = _efficientnet_release(work / "lite0", 64)
        for name, model in models.items():
            runs = {rate: work / f"ft-{len(rows)}-{rate:g}" for rate in LEARNING_RATES}
            tuned = {rate: _finetune(model, digits, folder, rate, epochs) for rate, folder in runs.items()}
            # Every run labels the same images (one seed): the probe fits the first run's.
            subset = json.loads((runs[LEARNING_RATES[0]] / "labelled_subset.json").read_text())
            row = {"model": name, "labelled": len(subset["rows"]),
                   "probe_top1": _probe_on_subset(model, digits, subset["rows"], device),
                   **{f"finetune_top1_{rate:g}": tuned[rate]["top1"] for rate in LEARNING_RATES},
                   "finetune_s": np.mean([t["seconds"] for t in tuned.values()]),
                   **_multilabel(model, pairs, work / "cache", device)}  # fmt: skip
            rows.append(row)
            print(f"measured {name}", file=sys.stderr, flush=True)
    columns = [
        ("model", "model", ""),
        ("labelled", "labelled images", "d"),
        ("probe_top1", "linear probe top-1 %", ".2f"),
        *((f"finetune_top1_{rate:g}", f"fine-tuned top-1 %, lr {rate:g}", ".2f") for rate in LEARNING_RATES),
        ("finetune_s", "s per fine-tuning", ".0f"),
        ("map", "multilabel mAP %", ".2f"),
        ("sklearn_map", "scikit-learn mAP %", ".2f"),
    ]
    config = {"fraction": FRACTION, "batch": BATCH, "epochs": epochs, "learning_rates": list(LEARNING_RATES),
              "pairs": [train_pairs, test_pairs], "image_size": IMAGE_SIZE}  # fmt: skip
    notes = [
        f"semi-supervised: {FRACTION:.0%} of the digits' training labels, the probe and the fine-tuning on "
        f"the same images; fine-tuning batch {BATCH}, {epochs} epochs, Adam, constant learning rate",
        f"multilabel: digit pairs ({train_pairs} / {test_pairs}); scikit-learn's one-vs-rest logistic "
        "regression on the same standardised features at the weight decay the protocol chose",
    ]
    report("protocols", args, device, rows, columns, config=config, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
