"""Semi-supervised fine-tuning (paper, section 6.1 and Table 1): a released backbone and a linear head.

The paper fine-tunes its pretrained ResNet-50 "with a fraction of the ImageNet-1K dataset: 1 % or
10 % of sampled labels for 100 epochs with the cross-entropy loss", batch 128, Adam at 1e-4
(section 7); :func:`finetune` does that for any timm backbone ``--model`` names (a release folder, a
pushed release, a timm name), on any labelled split:

1. **The labelled subset** (:func:`labelled_subset`): each class keeps the same share of its
   training images, ``round(fraction x its count)`` and at least one, drawn from a permutation seeded
   by ``seed``: deterministic, class-balanced, the same on every process. Its rows of the training
   split are written to ``labelled_subset.json``.
2. **The model**: the backbone with a new linear head of one output per class (timm's own head and
   initialisation, seeded), all of it trained.
3. **The data**: each global batch is a slice of a per-epoch permutation of the subset (the last,
   incomplete one dropped), and process ``p`` of ``P`` takes the ``p``-th of its ``P`` equal parts. Each
   image gets the standard training augmentation of the model's data config
   (``timm.data.create_transform(**data_config, is_training=True)``: random resized crop, flip,
   colour jitter, normalisation) with random draws seeded by (seed, epoch, row), so that a run
   does not depend on the number of processes or loader workers.
4. **The step**: cross-entropy summed over the process's images and divided by its share of the
   batch, so that the gradients Accelerate averages over processes are those of the global
   batch's mean (an undecodable image counts as a zero, and is reported). With batch norm on several
   GPU processes the statistics are synchronised (``SyncBatchNorm``) so that 2 processes compute
   what 1 does; CPU processes cannot, and normalise over their own share.
5. **Resumable like training**, on its run scaffold (:class:`~mvmr_hf.training.scaffold.RunScaffold`,
   :mod:`mvmr_hf.storage.checkpoint`, :mod:`mvmr_hf.training.run_folder`): the run folder holds
   ``training_args.json``, ``checkpoints/step-NNNNNN`` and ``metrics.jsonl``; ``--resume`` continues at
   the same step (the data position follows from the step), a stop signal saves a checkpoint and exits
   with status 75.
6. **The result**: top-1 / top-5 of the classifier on the test split, through the model's own
   evaluation preprocessing (:func:`~mvmr_hf.evaluation.features.extract_features`, sharded over processes),
   written to ``results.json``; the classifier is released in ``classifier/``, loadable with
   ``transformers.AutoModelForImageClassification`` (``TimmWrapperForImageClassification``) and
   ``timm.create_model("local-dir:...")``.

Example::

    result = finetune("runs/kd/student", "./digits", FinetuneArguments(label_fraction=0.1), "runs/kd/ft")
    print(result.top1, result.top5)
"""

from __future__ import annotations

import math
import random
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from string import Template
from typing import Any

import datasets
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import ModelCardData
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from mvmr_hf.config import FinetuneArguments, check_label_fraction
from mvmr_hf.data.decode import decode_image
from mvmr_hf.data.loading import BadImageError, load_image_dataset, read_encoded, resolve_image_column
from mvmr_hf.distributed import sha256_seed
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.features import class_names, extract_features, locate_model, timm_encoder
from mvmr_hf.evaluation.multilabel import multi_hot_encoding
from mvmr_hf.evaluation.probe import topk_accuracy
from mvmr_hf.evaluation.protocols import check_label_kind
from mvmr_hf.evaluation.results import ProtocolResult, to_eval_results
from mvmr_hf.models.representations.teacher import loading_errors
from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS, write_timm_config
from mvmr_hf.release.card import TEMPLATES, hub_id_or_none
from mvmr_hf.release.export import CARD, TRAINING_ARGS, check_release_target
from mvmr_hf.training.run_folder import flat_defaults
from mvmr_hf.training.scaffold import (
    RunScaffold,
    build_optimizer,
    find_resume_point,
    resolve_mixed_precision,
)
from mvmr_hf.utils import atomic_folder, atomic_write_json, writing

__all__ = [
    "CLASSIFIER_DIR",
    "FinetuneResult",
    "Finetuning",
    "default_finetune_dir",
    "finetune",
    "labelled_subset",
]

CLASSIFIER_DIR = "classifier"
LABELLED_SUBSET = "labelled_subset.json"
RESULTS = "results.json"
LOG_EVERY = 10
"""Optimizer steps between two lines of ``metrics.jsonl``."""
TEMPLATE = TEMPLATES / "classifier_card.md"


@dataclass(frozen=True)
class FinetuneResult:
    """Top-1 / top-5 test accuracy (percent) of the fine-tuned classifier and where it was written.

    Attributes:
        top1: top-1 accuracy on the test split, in percent.
        top5: top-5 accuracy in percent; None with 5 classes or fewer.
        label_fraction: the share of the training split's labels fine-tuned on, in (0, 1] (paper
            Table 1's 1 % and 10 %).
        num_labelled: the images of the class-balanced labelled subset (:func:`labelled_subset`).
        steps: the optimizer steps taken, resumed ones included.
        classifier: the folder the fine-tuned classifier was released to (``classifier/`` of the run).
    """

    top1: float
    top5: float | None
    label_fraction: float
    num_labelled: int
    steps: int
    classifier: Path

    def as_protocol_result(self) -> ProtocolResult:
        """The result as the evaluation table and the card's ``model-index`` report it."""
        detail = f"{self.num_labelled} labelled images, {self.steps} Adam steps; {self.classifier}"
        return ProtocolResult("finetune", self.top1, self.top5, detail, label_fraction=self.label_fraction)


def labelled_subset(labels: Sequence[int], fraction: float, *, seed: int = 0) -> list[int]:
    """The rows of a class-balanced share ``fraction`` of a labelled split (paper Table 1's 1 % and 10 %).

    Each class keeps ``round(fraction x its count)`` of its rows, at least one, drawn from one
    permutation of the split seeded by ``seed``; the rows are returned in increasing order. Raises
    ConfigError when the share gives fewer images than the split has classes.
    """
    check_label_fraction(fraction)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    classes = labels.unique()
    wanted = _rounded(fraction * len(labels))
    if wanted < len(classes):
        raise ConfigError(
            f"--label-fraction {fraction:g} labels {wanted} of the {len(labels)} training images, fewer than "
            f"their {len(classes)} classes: raise it to at least {_least_fraction(len(classes), len(labels))}"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen = []
    for label in classes:
        rows = order[labels[order] == label]
        chosen.append(rows[: max(1, _rounded(fraction * len(rows)))])
    return sorted(torch.cat(chosen).tolist())


def _rounded(value: float) -> int:
    """Half rounds up (Python's round() would send 8.5 to 8 and 9.5 to 10)."""
    return math.floor(value + 0.5)


def _least_fraction(classes: int, images: int) -> float:
    """The smallest fraction (rounded up to 4 decimals) that labels at least one image per class."""
    return math.ceil(round((classes - 0.5) / images * 1e4, 6)) / 1e4  # round: 175.00000000000003 is 175


def global_batches(rows: Sequence[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's global batches of ``rows``: a seeded permutation cut into full batches."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(sha256_seed(seed, epoch)))
    full = len(rows) // batch_size * batch_size
    return [[rows[i] for i in order[start : start + batch_size]] for start in range(0, full, batch_size)]


class _LabelledImages(torch.utils.data.Dataset):
    """``(row, augmented image or None, label)`` of a split's row; the draws seeded by (seed, epoch, row)."""

    def __init__(
        self, split: datasets.Dataset, image_column: str, label_column: str, transform: Any, seed: int
    ):
        super().__init__()
        self.split = split.select_columns([image_column, label_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.image_column, self.label_column = image_column, label_column
        self.transform, self.seed, self.epoch = transform, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, row: int) -> tuple[int, Tensor | None, int]:
        record = self.split[row]
        label = int(record[self.label_column])
        try:
            image = TF.to_pil_image(decode_image(read_encoded(record[self.image_column])))
        except BadImageError:
            return row, None, label
        # timm's transforms draw from torch's and Python's global generators: seed both for this image
        # only, and leave them as they were (in the main process they also drive the model).
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = sha256_seed(self.seed, self.epoch, row)
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return row, self.transform(image), label
            finally:
                random.setstate(state)


def _collate(samples: list[tuple[int, Tensor | None, int]]) -> tuple[Tensor, Tensor, int]:
    """A batch keeps every slot: an undecodable image becomes zeros with the label -100 (ignored)."""
    shape = next((image.shape for _, image, _ in samples if image is not None), None)
    if shape is None:
        raise ConfigError("no image of a batch of the labelled subset could be decoded: check the data set")
    images = torch.stack([image if image is not None else torch.zeros(shape) for _, image, _ in samples])
    labels = torch.tensor([label if image is not None else -100 for _, image, label in samples])
    return images, labels, sum(image is None for _, image, _ in samples)


def _loader(
    images: _LabelledImages, batches: list[list[int]], process: int, share: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """This process's part of each global batch: the ``process``-th of its shares of ``share`` images."""
    mine = [batch[process * share : (process + 1) * share] for batch in batches]
    return torch.utils.data.DataLoader(
        images, batch_sampler=mine, num_workers=num_workers, collate_fn=_collate
    )


def default_finetune_dir(model: str, fraction: float) -> Path:
    """``MODEL-finetune-1pct`` next to a model folder, else in the working directory."""
    name = f"-finetune-{100 * fraction:g}pct".replace(".", "p")
    path = Path(model).expanduser()
    if path.is_dir():
        return path.absolute().with_name(path.absolute().name + name)
    return Path(model.rstrip("/").split("/")[-1] + name)


def _timm_source(model: str) -> str:
    """The timm ``create_model`` name of ``--model``; ConfigError for a model timm cannot fine-tune."""
    kind, where = locate_model(model)
    if kind == "transformers":
        raise ConfigError(
            f"--model {model} is a transformers model: --protocol finetune fine-tunes a timm backbone "
            "(a release folder, a pushed release or a timm model name)"
        )
    return f"local-dir:{Path(where).absolute()}" if kind == "release" else where


def _class_labels(
    train: datasets.Dataset, test: datasets.Dataset, label_column: str
) -> tuple[list[int], list[str]]:
    """The training split's class ids, and the class names (a ``ClassLabel``'s, else ``"0" ... "C-1"``).

    ConfigError for a column of another kind, an empty split or unlabelled images (label -1).
    """
    check_label_kind(["finetune"], multi_hot_encoding([train, test], label_column), label_column)
    labels = {"training": train[label_column], "test": test[label_column]}  # each column read once
    for split, ids in labels.items():
        if min(ids, default=-1) < 0:
            raise ConfigError(
                f"the {split} split is empty or has unlabelled images (label -1): use labelled splits"
            )
    names = class_names(train.features, label_column)
    if names is None:
        names = [str(i) for i in range(max(max(ids) for ids in labels.values()) + 1)]
    return labels["training"], names


class Finetuning:
    """A fine-tuning run, checked: building one checks everything and writes nothing; :meth:`run` runs it.

    ``model`` is a release folder, a pushed release or a timm name; ``dataset`` a Hub id or local
    folder whose ``label_column`` holds class ids (``config``, ``train_split``, ``test_split``,
    ``image_column`` as for the other protocols); ``eval_batch_size`` and ``num_workers`` serve the test
    split's forward passes (the workers also the training images); ``command`` is recorded in the
    results and the cards (default ``sys.argv``). The run folder is ``args.finetune_dir``, by default
    :func:`default_finetune_dir`. Raises ConfigError for bad input, before anything is written; then
    :meth:`run` raises TrainingError when the loss stops being finite and PreemptedError after a
    stop signal (its checkpoint saved). ``mvmr-evaluate`` builds it before the frozen-feature
    protocols run, so that bad fine-tuning input is told before any of them writes a feature cache.

    Args:
        model: the backbone to fine-tune: a release folder, a pushed release or a timm model name
            (not a transformers model).
        dataset: a Hub id (``owner/name``) or a local folder.
        args: the fine-tuning options (label fraction, batch size, steps, learning rate, run folder).
        config: the data set's configuration (subset), when it has several.
        train_split: the split the labelled subset is drawn from.
        test_split: the split the accuracy is reported on.
        image_column: the column holding the images; None picks the single image column.
        label_column: the column holding one class id per image.
        eval_batch_size: images per forward pass on the test split.
        num_workers: DataLoader workers for the training images and the test split (0: in this process).
        command: the command line recorded in the results and the cards; None: ``sys.argv``.
    """

    def __init__(
        self,
        model: str,
        dataset: str,
        args: FinetuneArguments,
        *,
        config: str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        image_column: str | None = None,
        label_column: str = "label",
        eval_batch_size: int = 256,
        num_workers: int = 0,
        command: str | None = None,
    ) -> None:
        self.args, self.eval_batch_size, self.num_workers = args, eval_batch_size, num_workers
        self.command = command or shlex.join(sys.argv)
        self.output_dir = Path(args.finetune_dir or default_finetune_dir(model, args.label_fraction))
        precision = resolve_mixed_precision(args.mixed_precision)
        self.accelerator = accelerator = Accelerator(mixed_precision=precision)
        if args.finetune_batch_size % accelerator.num_processes:
            world = accelerator.num_processes
            raise ConfigError(
                f"--finetune-batch-size {args.finetune_batch_size} is the global batch and must divide "
                f"evenly over the {world} processes: use a multiple of {world}"
            )
        self.share = args.finetune_batch_size // accelerator.num_processes
        source = _timm_source(model)
        sources = {"config": config, "streaming": False, "image_column": image_column}
        train = load_image_dataset(dataset, split=train_split, **sources)
        self.test = load_image_dataset(dataset, split=test_split, **sources)
        self.image_column = resolve_image_column(train.features, image_column)
        self.label_column, self.test_split = label_column, test_split
        train_labels, self.names = _class_labels(train, self.test, label_column)
        self.rows = labelled_subset(train_labels, args.label_fraction, seed=args.finetune_seed)
        if len(self.rows) < args.finetune_batch_size:
            raise ConfigError(
                f"the labelled subset holds {len(self.rows)} images, fewer than one batch of "
                f"--finetune-batch-size {args.finetune_batch_size}: lower it or raise --label-fraction"
            )
        self.steps_per_epoch = len(self.rows) // args.finetune_batch_size
        self.total_steps = args.finetune_max_steps or self.steps_per_epoch * args.finetune_epochs
        self.saved_args = {
            "model": model, "dataset": dataset, "dataset_config": config, "train_split": train_split,
            "test_split": test_split, "image_column": image_column, "label_column": label_column,
            "protocol": "finetune", **asdict(args),
        }  # fmt: skip
        self.resume_from = find_resume_point(
            accelerator, self.output_dir, args, self.saved_args, flat_defaults(args)
        )
        check_release_target(
            self.output_dir / CLASSIFIER_DIR,
            "the classifier could not be written there; move it away or choose another --finetune-dir",
        )
        set_seed(args.finetune_seed)  # the same head on every process
        # A timm name's weights come from the Hub: offline, the message says so and how to go on.
        with loading_errors(model, what="--model"):
            self.classifier = timm.create_model(source, pretrained=True, num_classes=len(self.names))
        self.data_config = timm.data.resolve_model_data_config(self.classifier)
        transform = timm.data.create_transform(**self.data_config, is_training=True)
        self.images = _LabelledImages(train, self.image_column, label_column, transform, args.finetune_seed)

    def run(self) -> FinetuneResult:
        """Train (or continue) the run, test the classifier, write the results and the release."""
        accelerator, args, output_dir = self.accelerator, self.args, self.output_dir
        device, steps_per_epoch = accelerator.device, self.steps_per_epoch
        run = RunScaffold(
            accelerator, output_dir, args, self.resume_from, images_per_step=args.finetune_batch_size,
            log_last=False,
        )  # fmt: skip
        with run.holding_folder(self.saved_args, release_dir=CLASSIFIER_DIR):
            # The labelled subset's record, the classifier prepared with Adam.
            self._write_subset()
            classifier = self.classifier
            if accelerator.num_processes > 1 and device.type == "cuda":
                classifier = nn.SyncBatchNorm.convert_sync_batchnorm(classifier)
            optimizer = build_optimizer(
                classifier, args.finetune_learning_rate, args.finetune_weight_decay, device
            )
            classifier, optimizer = accelerator.prepare(classifier, optimizer)
            # The resume point (the data position follows from the step), the metrics, the checkpoints.
            run.resume(loader_state=lambda step: {"step": step})
            step, lr = run.start_step, args.finetune_learning_rate

            # The loop: this process's share of each global batch, from the step on.
            classifier.train()
            with run:
                batches = _batches(
                    self.images, self.rows, args, start=step, total=self.total_steps,
                    steps_per_epoch=steps_per_epoch, process=accelerator.process_index, share=self.share,
                    num_workers=self.num_workers,
                )  # fmt: skip
                for views, labels, skipped in batches:
                    loss = self._step(classifier, optimizer, views, labels)
                    step += 1
                    run.meter.add(loss, {}, skipped=skipped, step=step)
                    log = step % LOG_EVERY == 0 or step == self.total_steps
                    run.end_step(step, step // steps_per_epoch, lr, log=log)
            run.finish(step, step // steps_per_epoch, lr)

            # The result: the test split's accuracy, the results and the classifier's release.
            return self._test(accelerator.unwrap_model(classifier).eval(), step, run.seconds())

    def _write_subset(self) -> None:
        """``labelled_subset.json``: the rows of the training split fine-tuned on, and how they were drawn."""
        args, saved = self.args, self.saved_args
        if self.accelerator.is_main_process:
            subset = {
                "dataset": saved["dataset"], "config": saved["dataset_config"], "split": saved["train_split"],
                "label_column": self.label_column, "label_fraction": args.label_fraction,
                "seed": args.finetune_seed, "rows": self.rows,
            }  # fmt: skip
            with writing(LABELLED_SUBSET, self.output_dir):
                atomic_write_json(self.output_dir / LABELLED_SUBSET, subset)

    def _step(
        self, classifier: nn.Module, optimizer: torch.optim.Optimizer, views: Tensor, labels: Tensor
    ) -> Tensor:
        """One optimizer step on this process's share of a global batch; returns its loss."""
        device = self.accelerator.device
        logits = classifier(views.to(device, non_blocking=True))
        # Summed and divided by the share (bad images count as zeros): averaged over the processes,
        # the gradients are the global batch's mean.
        loss = nn.functional.cross_entropy(logits.float(), labels.to(device), reduction="sum") / self.share
        self.accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def _test(self, classifier: nn.Module, step: int, seconds: float) -> FinetuneResult:
        """Top-1 / top-5 on the test split (sharded over the processes); the main process writes it all."""
        encoder = timm_encoder(
            classifier, self.data_config, {"finetuned": str(self.output_dir.absolute()), "step": step}
        )
        logits = extract_features(
            encoder, self.test, image_column=self.image_column, label_column=self.label_column,
            batch_size=self.eval_batch_size, num_workers=self.num_workers,
        )  # fmt: skip
        accuracy = topk_accuracy(logits.features, logits.labels)
        folder = self.output_dir / CLASSIFIER_DIR
        result = FinetuneResult(
            accuracy.top1, accuracy.top5, self.args.label_fraction, len(self.rows), step, folder
        )
        if self.accelerator.is_main_process:
            facts = {
                "top1": result.top1, "top5": result.top5, "test_split": self.test_split,
                "label_fraction": self.args.label_fraction, "num_labelled": len(self.rows), "steps": step,
                "seconds": seconds, "processes": self.accelerator.num_processes, "command": self.command,
            }  # fmt: skip
            with writing(RESULTS, self.output_dir):
                atomic_write_json(self.output_dir / RESULTS, facts)
            _save_classifier(
                classifier, folder, self.data_config, self.names, self.saved_args, facts, self.rows, result
            )
        self.accelerator.wait_for_everyone()
        return result


def finetune(model: str, dataset: str, args: FinetuneArguments, **options: Any) -> FinetuneResult:
    """Fine-tune ``model``'s backbone and a linear head on ``args.label_fraction`` of the training labels.

    ``Finetuning(model, dataset, args, **options).run()``: see :class:`Finetuning` for the options and
    the module docstring for the protocol. Call it on every process (``accelerate launch``).
    """
    return Finetuning(model, dataset, args, **options).run()


def _batches(
    images: _LabelledImages,
    rows: list[int],
    args: FinetuneArguments,
    *,
    start: int,
    total: int,
    steps_per_epoch: int,
    process: int,
    share: int,
    num_workers: int,
) -> Iterator[tuple[Tensor, Tensor, int]]:
    """This process's batches of optimizer steps ``start`` to ``total``; the step gives the data position."""
    step = start
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        images.epoch = epoch
        batches = global_batches(rows, args.finetune_batch_size, seed=args.finetune_seed, epoch=epoch)
        batches = batches[first : first + total - step]
        for batch in _loader(images, batches, process, share, num_workers):
            yield batch
            step += 1


def _save_classifier(
    classifier: nn.Module,
    folder: Path,
    data_config: dict[str, Any],
    names: list[str],
    args: dict[str, Any],
    facts: dict[str, Any],
    rows: list[int],
    result: FinetuneResult,
) -> None:
    """Write the classifier release atomically: timm weights and config (with the class names), the card."""
    with writing("the classifier release", folder), atomic_folder(folder) as work:
        weights = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
        save_file(weights, work / WEIGHTS, metadata={"format": "pt"})
        write_timm_config(classifier, work / CONFIG, data_config, label_names=names)
        atomic_write_json(work / TRAINING_ARGS, args)
        atomic_write_json(work / LABELLED_SUBSET, {"rows": rows})
        (work / CARD).write_text(_classifier_card(classifier, args, facts, len(names), result))


def _classifier_card(
    classifier: nn.Module,
    args: dict[str, Any],
    facts: dict[str, Any],
    num_classes: int,
    result: FinetuneResult,
) -> str:
    """The classifier's card: metadata with its fine-tuning result in ``model-index``, then the body."""
    protocol = result.as_protocol_result()
    results = to_eval_results(
        [protocol], dataset=args["dataset"], config=args["dataset_config"], split=facts["test_split"],
        command=facts["command"],
    )  # fmt: skip
    fraction = args["label_fraction"]
    dataset_id = results[0].dataset_name
    base = hub_id_or_none(args["model"])
    data = ModelCardData(
        library_name="timm", pipeline_tag="image-classification", license="apache-2.0",
        tags=["mvmr", "timm", "semi-supervised"], base_model=base,
        datasets=[dataset_id] if hub_id_or_none(args["dataset"]) else None,
        model_name=f"{Path(args['model'].rstrip('/')).name}-{protocol.name}", eval_results=results,
    )  # fmt: skip
    top5 = "-" if facts["top5"] is None else f"{facts['top5']:.2f}"
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        metadata=data.to_yaml(),
        model=args["model"],
        architecture=classifier.pretrained_cfg.get("architecture", type(classifier).__name__),
        num_classes=num_classes,
        dataset=args["dataset"],
        split=args["train_split"],
        percent=f"{100 * fraction:g}",
        num_labelled=facts["num_labelled"],
        steps=facts["steps"],
        batch_size=args["finetune_batch_size"],
        learning_rate=args["finetune_learning_rate"],
        test_split=facts["test_split"],
        top1=f"{facts['top1']:.2f}",
        top5=top5,
        command=facts["command"],
    )
