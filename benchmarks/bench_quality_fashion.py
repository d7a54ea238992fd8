"""Distillation quality beyond digits: Fashion-MNIST, two ImageNet teachers, three probes, against classic KD.

The question this benchmark answers: does the project's student, trained with its defaults, reach
what the simplest feature distillation a user would try first reaches on the same budget? Every
student cell is a complete run of the command users type (``mvmr_hf.cli.train.distill_main``, in
this process), released, and probed through its release's own eval view by ``mvmr_hf.evaluation``:

- linear: the L-BFGS logistic-regression probe on all training images' frozen features;
- 20 labels: the same probe fitted on 20 labelled training images per class (a seeded draw);
- kNN: cosine kNN (k = 20, T = 0.07) on all training images.

Material, all offline and free to use: Fashion-MNIST (Zalando, MIT licence; 70,000 grayscale
28 px images of 10 clothing classes; Debian ships it: ``apt-get install dataset-fashion-mnist``
puts it in ``/usr/share/datasets/fashion-mnist``), of which a class-stratified, seeded 10,000 of
the training images and 2,000 of the test images are written as a local parquet data set; Google's
EfficientNet-Lite0 and Lite2 ImageNet weights (``mvmr_hf.models.efficientnet_lite``) as the teachers,
each seen through its own processor at 96 px (``pretrained_cfg.input_size`` set to 96 in its
``config.json``: at their native 224 / 260 px the teachers' passes alone would take most of an
hour on 2 cores); a resnet18 student from scratch at 32 px.

Rows, for each teacher: the teacher itself (the ceiling), raw pixels, the student randomly
initialised (the floor), the project's objective under the candidate settings, and **classic
feature distillation**, written here as the reference a user would try first: the same student
(no projector) with a trained linear head into the teacher's space, loss 1 - cosine, the teacher
fed the same mildly augmented view (random resized crop of scale 0.5-1 and horizontal flip), same
data, epochs, batch, optimizer and schedule. Numbers are means over seeds with the spread (half the
range), and the wall time of one training run on this machine.

    python benchmarks/bench_quality_fashion.py --cells 0,1,17  # reference, paper, defaults: ~1 h 30 min
    python benchmarks/bench_quality_fashion.py --teachers lite0 --work-dir /tmp/fq   # keep and reuse runs
    python benchmarks/bench_quality_fashion.py --work-dir /tmp/fq --finished-only     # the table of those

Runs are kept in ``--work-dir`` when given: a second call reuses every finished cell, so the table
can be built in parts. Not part of CI (too long, and its data set is a system package).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from common import (
    Column,
    paper_objective,
    parser,
    report,
    reset_accelerate,
    resolve_device,
    seed_row,
    share_teacher_caches,
)
from PIL import Image
from torch import nn
from torchvision.transforms import v2
from transformers import get_cosine_schedule_with_warmup

from mvmr_hf.cli.train import distill_main
from mvmr_hf.data.augment import CENTER_CROP_FRACTION, center_view
from mvmr_hf.data.loading import load_image_dataset
from mvmr_hf.errors import ConfigError
from mvmr_hf.evaluation.features import extract_features, load_encoder
from mvmr_hf.evaluation.knn import knn_classify
from mvmr_hf.evaluation.probe import linear_probe
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.representations.teacher import load_teacher
from mvmr_hf.models.student import build_student
from mvmr_hf.models.timm_folder import CONFIG
from mvmr_hf.release.export import export_student
from mvmr_hf.utils import atomic_folder

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
SIZES = {"full": (10_000, 2_000), "quick": (512, 256)}
IMAGE_SIZE = 32
TEACHER_SIDE = 96
STUDENT = "resnet18"
PROJECTOR = "2048-2048"
BATCH, LEARNING_RATE, WARMUP, WEIGHT_DECAY = 128, 1e-3, 0.1, 1e-6
FEW_LABELS = 20  # labelled images per class of the few-label probe
COMMON = ["--student", STUDENT, "--image-size", str(IMAGE_SIZE), "--batch-size", str(BATCH),
          "--learning-rate", str(LEARNING_RATE), "--warmup", str(WARMUP), "--weight-decay", str(WEIGHT_DECAY),
          "--num-workers", "0", "--checkpoint-every", "100000", "--log-every", "1000",
          "--projector", PROJECTOR]  # fmt: skip
NO_L1_L2 = ["--invariance-weight", "0", "--variance-weight", "0", "--view-weight", "0"]
MILD = ["--augmentations", "crop,flip"]  # the augmented view without colour, grayscale and blur
ON_AUGMENTED = ["--teacher-view", "augmented"]  # the teachers see x̃, as the baseline's does
HALF_CROPS = ["--crop-scale", "0.5,1"]  # the baseline's crops
MILDER_CROPS = ["--crop-scale", "0.8,1"]
NO_DCOR = ["--representation-weights", "teacher=0"]
NO_PROJECTOR = ["--projector", "none"]  # the teacher's dCor term on the probed features themselves
BASELINE = "classic feature distillation (linear head, 1 - cosine)"


@dataclass(frozen=True)
class Classic:
    """A cell of the reference, classic feature distillation: the area range of its crops."""

    crop_scale: tuple[float, float] = (0.5, 1.0)


# (cell, flags against the paper's objective: λ = μ = α = β = 1, no feature matching; or the reference)
CELLS: list[tuple[str, list[str] | Classic]] = [
    (BASELINE, Classic()),
    ("paper objective (λ = μ = α = β = 1)", ["--feature-matching-weight", "0"]),
    ("teacher dCor term only (λ = μ = α = 0)", [*NO_L1_L2, "--feature-matching-weight", "0"]),
    ("paper objective + feature matching 1", ["--feature-matching-weight", "1"]),
    ("teacher dCor + feature matching 1 (λ = μ = α = 0)", [*NO_L1_L2, "--feature-matching-weight", "1"]),
    (
        "teacher dCor + feature matching 1, crops and flips only",
        [*NO_L1_L2, "--feature-matching-weight", "1", *MILD],
    ),
    ("paper objective + feature matching 1, crops and flips only", ["--feature-matching-weight", "1", *MILD]),
    ("teacher dCor + feature matching 4 (λ = μ = α = 0)", [*NO_L1_L2, "--feature-matching-weight", "4"]),
    (
        "teacher dCor + feature matching 1, crops of 0.5-1 and flips",
        [*NO_L1_L2, "--feature-matching-weight", "1", *MILD, *HALF_CROPS],
    ),
    (
        "teacher dCor + feature matching 1, teachers on the augmented view, crops of 0.5-1 and flips",
        [*NO_L1_L2, "--feature-matching-weight", "1", *ON_AUGMENTED, *MILD, *HALF_CROPS],
    ),
    (
        "feature matching 1 alone, teachers on the augmented view, crops of 0.5-1 and flips (β = 0)",
        [*NO_L1_L2, *NO_DCOR, "--feature-matching-weight", "1", *ON_AUGMENTED, *MILD, *HALF_CROPS],
    ),
    (  # the weights' balance: feature matching (1 - cos, up to 2) four times the dCor term (up to 1)
        "teacher dCor + feature matching 4, teachers on the augmented view, crops of 0.5-1 and flips",
        [*NO_L1_L2, "--feature-matching-weight", "4", *ON_AUGMENTED, *MILD, *HALF_CROPS],
    ),
    (  # dCor on the features that are probed and released, as feature matching is: no projector between
        "teacher dCor + feature matching 1 on the augmented view, crops of 0.5-1 and flips, no projector",
        [*NO_L1_L2, "--feature-matching-weight", "1", *ON_AUGMENTED, *MILD, *HALF_CROPS, *NO_PROJECTOR],
    ),
    (
        "teacher dCor + feature matching 2 on the augmented view, crops of 0.5-1 and flips, no projector",
        [*NO_L1_L2, "--feature-matching-weight", "2", *ON_AUGMENTED, *MILD, *HALF_CROPS, *NO_PROJECTOR],
    ),
    (
        "teacher dCor + feature matching 4 on the augmented view, crops of 0.5-1 and flips, no projector",
        [*NO_L1_L2, "--feature-matching-weight", "4", *ON_AUGMENTED, *MILD, *HALF_CROPS, *NO_PROJECTOR],
    ),
    (  # 4 epochs show each image 4 times: milder crops than the baseline's may serve a short run better
        "teacher dCor + feature matching 1 on the augmented view, crops of 0.8-1 and flips, no projector",
        [*NO_L1_L2, "--feature-matching-weight", "1", *ON_AUGMENTED, *MILD, *MILDER_CROPS, *NO_PROJECTOR],
    ),
    (  # on Fashion-MNIST feature matching alone (β = 0) probed as well as 4 against dCor on the linear probe
        "teacher dCor + feature matching 8 on the augmented view, crops of 0.5-1 and flips, no projector",
        [*NO_L1_L2, "--feature-matching-weight", "8", *ON_AUGMENTED, *MILD, *HALF_CROPS, *NO_PROJECTOR],
    ),
    (
        "teacher dCor + feature matching 4 on the augmented view, crops of 0.8-1 and flips, no projector",
        [*NO_L1_L2, "--feature-matching-weight", "4", *ON_AUGMENTED, *MILD, *MILDER_CROPS, *NO_PROJECTOR],
    ),
    # the reference with the milder crops too: does what helps the dCor student help it as well?
    (f"{BASELINE}, crops of 0.8-1 and flips", Classic((0.8, 1.0))),
]
METRICS = ("linear", "few", "knn")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dimensions, then unsigned bytes."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _stratified(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    per_class = count // len(FASHION_CLASSES)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in range(len(FASHION_CLASSES))]))  # fmt: skip


def write_fashion_mnist(source: Path, folder: Path, sizes: tuple[int, int]) -> Path:
    """A seeded, class-stratified slice of Fashion-MNIST as a local parquet data set (PNG, label)."""
    if (folder / "data").is_dir():
        return folder
    files = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip
    missing = [name for pair in files.values() for name in pair if not (source / name).is_file()]
    if missing:
        raise ConfigError(
            f"Fashion-MNIST is not in {source} (no {missing[0]}): install it with `apt-get install "
            "dataset-fashion-mnist`, or pass --fashion-mnist DIR holding the four IDX .gz files"
        )
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_CLASSES)}
    )
    with atomic_folder(folder) as work:
        (work / "data").mkdir()
        for (split, (images_file, labels_file)), count in zip(files.items(), sizes, strict=True):
            images, labels = _idx(source / images_file), _idx(source / labels_file)
            rows = _stratified(labels, count, rng)
            encoded = []
            for index in rows:
                buffer = io.BytesIO()
                Image.fromarray(images[index], mode="L").save(buffer, format="PNG")
                encoded.append({"bytes": buffer.getvalue(), "path": None})
            table = datasets.Dataset.from_dict(
                {"image": encoded, "label": labels[rows].astype(np.int64).tolist()}, features=features
            )
            table.to_parquet(str(work / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def teacher_at(variant: str, folder: Path, side: int) -> Path:
    """EfficientNet-``variant`` whose processor gives ``side`` px (its ``pretrained_cfg.input_size``)."""
    if not (folder / CONFIG).is_file():
        native = save_efficientnet_lite(folder.parent / f"{folder.name}-native", variant)
        with atomic_folder(folder) as work:
            for file in native.iterdir():
                shutil.copy2(file, work / file.name)
            config = json.loads((work / CONFIG).read_text())
            config["pretrained_cfg"]["input_size"] = [3, side, side]
            (work / CONFIG).write_text(json.dumps(config, indent=2))
    return folder


# ----------------------------------------------------------------------------- the probes


def probe_scores(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Linear probe, the few-label probe (a seeded draw of FEW_LABELS per class) and kNN, in percent."""
    features, labels = train
    generator = torch.Generator().manual_seed(0)
    few = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()),
                     generator=generator)[:FEW_LABELS]] for c in labels.unique()])  # fmt: skip
    return {
        "linear": linear_probe(features, labels, *test).top1,
        "few": linear_probe(features[few], labels[few], *test).top1,
        "knn": knn_classify(features, labels, *test).top1,
    }


def model_scores(model: Path, splits: dict[str, datasets.Dataset], cache: Path) -> dict:
    """The probes of a release or teacher folder's frozen features (through its own eval view)."""
    encoder = load_encoder(str(model))
    sets = {
        name: extract_features(encoder, split, cache_dir=cache, device="cpu")
        for name, split in splits.items()
    }
    return probe_scores(*[(s.features, s.labels) for s in (sets["train"], sets["test"])])


def pixel_scores(splits: dict[str, datasets.Dataset]) -> dict:
    """The probes of the raw 28 px pixels, in [0, 1]."""

    def pixels(split: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        arrays = np.stack([np.asarray(image, dtype=np.float32).ravel() / 255 for image in split["image"]])
        return torch.from_numpy(arrays), torch.tensor(split["label"])

    return probe_scores(pixels(splits["train"]), pixels(splits["test"]))


# ----------------------------------------------------------------------------- classic feature distillation


def _views(split: datasets.Dataset) -> torch.Tensor:
    """The student's non-augmented 32 px views in [0, 1], made as the training loop makes them."""
    images = torch.stack([torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
                          for image in split["image"]]).float().div_(255)  # fmt: skip
    return center_view(images, IMAGE_SIZE, crop_fraction=CENTER_CROP_FRACTION)


def classic_distillation(teacher_folder: Path, split: datasets.Dataset, release: Path, *, epochs: int,
                         seed: int, crop_scale: tuple[float, float]) -> None:  # fmt: skip
    """Train the student the way a user would first try: a linear head into the teacher's space, 1 - cosine.

    Both see the same mildly augmented view of each image every step (a crop of ``crop_scale`` of its
    area, a flip); the student and the head are trained together with the distillation runs'
    optimizer, schedule, batch and epochs, and the student alone (no head, no projector) is released.
    """
    torch.manual_seed(seed)
    views = _views(split)
    teacher = load_teacher(str(teacher_folder)).eval()
    student = build_student(STUDENT, projector="none", image_size=IMAGE_SIZE)
    with torch.no_grad():
        width = teacher(views[:2]).shape[1]
    head = nn.Linear(student.feature_dim, width)
    parameters = [*student.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = len(views) // BATCH
    total = steps_per_epoch * epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(WARMUP * total), total)
    augment = v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, scale=crop_scale, antialias=True),
                          v2.RandomHorizontalFlip()])  # fmt: skip
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(views))
        for step in range(steps_per_epoch):
            batch = torch.stack([augment(views[i]) for i in order[step * BATCH : (step + 1) * BATCH]])
            with torch.no_grad():
                target = teacher(batch)
            loss = (1 - F.cosine_similarity(head(student(batch).features), target, dim=1)).mean()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    export_student(student.eval(), release)


# ----------------------------------------------------------------------------- the table


@dataclass
class Setting:
    """What every cell of one call shares."""

    data: Path
    splits: dict[str, datasets.Dataset]
    work: Path
    epochs: int

    @property
    def cache(self) -> Path:
        return self.work / "feature-cache"


def _distill(setting: Setting, teacher: Path, changes: list[str], run: Path, seed: int) -> None:
    """One run of ``mvmr-distill``, its teacher cache shared through the teacher's pool of caches."""
    pool = setting.work / f"teacher-caches-{teacher.name}"
    pool.mkdir(exist_ok=True)
    share_teacher_caches(pool, run, after=False)
    reset_accelerate()
    argv = [*COMMON, "--teacher", str(teacher), *paper_objective(changes), *changes, "--dataset",
            str(setting.data), "--split", "train", "--no-streaming", "--output-dir", str(run), "--seed",
            str(seed), "--epochs", str(setting.epochs)]  # fmt: skip
    if distill_main(argv):
        raise SystemExit(f"error: the run {run} failed")
    share_teacher_caches(pool, run, after=True)


def cell_scores(setting: Setting, teacher: Path, changes: list[str] | Classic, run: Path, seed: int) -> dict:
    """One seed of a cell: train, release, probe; read from ``run/scores.json`` if an earlier call did it."""
    saved = run / "scores.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    shutil.rmtree(run, ignore_errors=True)  # an earlier call stopped inside this run: start it again
    began = time.perf_counter()
    if isinstance(changes, Classic):
        classic_distillation(teacher, setting.splits["train"], run / "student", epochs=setting.epochs,
                             seed=seed, crop_scale=changes.crop_scale)  # fmt: skip
    else:
        _distill(setting, teacher, changes, run, seed)
    seconds = time.perf_counter() - began
    scores = model_scores(run / "student", setting.splits, setting.cache) | {"seconds": seconds}
    saved.write_text(json.dumps(scores))
    return scores


def reference_rows(setting: Setting, seeds: list[int]) -> list[dict[str, Any]]:
    """Raw pixels and the randomly initialised student: the floors every teacher shares."""
    rows = [{"teacher": "-", "cell": "raw pixels (28 px)", **pixel_scores(setting.splits), "seeds": 1}]
    scores = []
    for seed in seeds:
        torch.manual_seed(seed)
        release = setting.work / f"random-student-{seed}"
        if not release.exists():
            export_student(build_student(STUDENT, projector="none", image_size=IMAGE_SIZE), release)
        scores.append(model_scores(release, setting.splits, setting.cache))
    return [
        *rows,
        seed_row("-", f"{STUDENT} randomly initialised", scores, math.nan, METRICS) | {"teacher": "-"},
    ]


def main() -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--seeds", type=int, default=2, help="seeds per cell (default 2)")
    arguments.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4, quick 1)")
    arguments.add_argument("--teachers", default="lite0,lite2", help="lite0, lite2 or both, comma-separated")
    arguments.add_argument("--cells", default=None, help="indices into CELLS, comma-separated (default: all)")
    arguments.add_argument("--fashion-mnist", type=Path, default=DEFAULT_SOURCE, help="its IDX files' folder")
    arguments.add_argument("--work-dir", type=Path, default=None, help="keep runs here (default: a temp dir)")
    arguments.add_argument("--finished-only", action="store_true",
                           help="train nothing: the table of the runs finished in --work-dir, each cell with "
                           "the seeds it has")  # fmt: skip
    args = arguments.parse_args()
    if args.finished_only and not args.work_dir:
        print("error: --finished-only reads the runs of --work-dir: pass it", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-quality-fashion-"))
    try:
        device = resolve_device(args.device)
        sizes = SIZES["quick" if args.quick else "full"]
        data = write_fashion_mnist(args.fashion_mnist, work / "fashion-mnist", sizes)
    except ConfigError as error:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        print(f"error: {error}", file=sys.stderr)
        return 2
    splits = {name: load_image_dataset(str(data), split=name, streaming=False) for name in ("train", "test")}
    setting = Setting(data, splits, work, args.epochs or (1 if args.quick else 4))
    seeds = list(range(args.seeds))
    cells = [CELLS[int(i)] for i in args.cells.split(",")] if args.cells else CELLS

    rows = reference_rows(setting, seeds)
    start = time.perf_counter()
    for variant in args.teachers.split(","):
        teacher = teacher_at(variant, work / f"teacher-{variant}-{TEACHER_SIDE}px", TEACHER_SIDE)
        label = f"teacher (EfficientNet-{variant.capitalize()}, ImageNet, {TEACHER_SIDE} px)"
        rows.append(
            {"teacher": variant, "cell": label, **model_scores(teacher, splits, setting.cache), "seeds": 1}
        )
        for cell, changes in cells:
            runs = [
                work / "runs" / f"{variant}-{cell}-{seed}".replace(" ", "_").replace("/", "_")
                for seed in seeds
            ]
            if args.finished_only:
                finished = [run / "scores.json" for run in runs if (run / "scores.json").is_file()]
                scores = [json.loads(saved.read_text()) for saved in finished]
                if not scores:
                    continue
            else:
                scores = [
                    cell_scores(setting, teacher, changes, run, seed)
                    for run, seed in zip(runs, seeds, strict=True)
                ]
            seconds = statistics.fmean(s["seconds"] for s in scores)
            rows.append(seed_row(variant, cell, scores, seconds, METRICS) | {"teacher": variant})
            measured = ", ".join(f"{metric} {rows[-1][metric]:.2f}" for metric in METRICS)
            print(f"[{time.perf_counter() - start:.0f} s] {variant}: {cell}: {measured}", flush=True)

    headers = ("linear top-1 %", f"{FEW_LABELS} labels/class %", "kNN top-1 %")
    columns: list[Column] = [("teacher", "teacher", ""), ("cell", "cell", "")]
    for metric, header in zip(METRICS, headers, strict=True):
        columns += [(metric, header, ".2f"), (f"{metric}_spread", "±", ".2f")]
    columns += [("seeds", "seeds", "d"), ("seconds_per_run", "s / run", ".0f")]
    config = {"dataset": f"Fashion-MNIST, class-stratified: {sizes[0]} train / {sizes[1]} test images",
              "teachers": f"EfficientNet-Lite0/Lite2 ImageNet-1k at {TEACHER_SIDE} px, pooled output",
              "student": STUDENT, "projector": PROJECTOR, "epochs": setting.epochs, "seeds": seeds,
              "command": " ".join(COMMON), "threads": torch.get_num_threads()}  # fmt: skip
    notes = [
        "Every dCor cell has the paper's terms at weight 1 unless its flags say otherwise and the projector "
        f"{PROJECTOR} (the paper's 8192-8192-8192 is too slow to train here over every cell); the teachers "
        "see the non-augmented view, read from the exact teacher cache, unless the cell puts them on the "
        "augmented view (--teacher-view augmented: every teacher term then compares student and teacher on "
        "that view, and the student runs once a step when λ = μ = α = 0); feature matching is the "
        "--feature-matching-weight term (a linear head on the student's pooled features of the view the "
        "teachers see, 1 - cosine to their output).",
        "s / run: one training run's wall time; most runs shared the 2 cores with other jobs (tests, CI), "
        "so times compare only roughly.",
        "The spread is half the range over seeds: a difference smaller than the spreads is noise.",
    ]
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    report("quality-fashion", args, device, rows, columns, config=config, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
