"""Quality of the objective's variants: a real pretrained teacher, real images, linear and kNN probes.

Every cell is a complete run of the command users type (``mvmr_hf.cli.train.distill_main`` /
``pretrain_main``, in this process), released and then evaluated by ``mvmr_hf.evaluate`` with a
linear probe and kNN on frozen backbone features, over several seeds. Nothing is reimplemented:
the benchmark only chooses flags.

Material, all offline: scikit-learn's 1,797 handwritten digits (train 1,437 / test 360, written
as a local parquet data set at 16 px); Google's EfficientNet-Lite0 ImageNet-1k weights as the
teacher (``mvmr_hf.models.efficientnet_lite``, a transformers ``TimmWrapperModel`` seen through its own
processor: 256 px bicubic resize, 224 px crop, mean = std = 0.5); a resnet18 student from scratch
at 16 px. The teacher's outputs are cached exactly (``--cache-teacher``): the first run fills the
cache, later runs start from a hard-linked copy of it, which gives the same losses as running the
teacher (the cache's own tests prove it) at a fraction of the time.

Cells (each against the candidate defaults, one change at a time):

- distillation: invariance as a mean over elements (the released code) or a sum over dimensions
  (eq. 4 as printed); dCor as R (the released code) or R² (eq. 11 as printed); the biased or the
  bias-corrected estimator; L1 (invariance + variance) and L2 (dCor between the views) each on or
  off; projector widths;
- pretraining (no teacher): no descriptor, each of the paper's five alone, all five;
- several teachers: EfficientNet-Lite2 (ImageNet, 260 px) alone, Lite0 and Lite2 distilled together
  (two dCor terms, no adaptor), and Lite0 together with a teacher that knows nothing (the same
  architecture, randomly initialised): what a useless teacher does to the mix;
- feature matching (``--feature-matching-weight``, not in the paper) on one mildly augmented view seen
  by teacher and student, with the teacher's dCor term (distillation's defaults) and alone (β = 0),
  against the paper's objective (``--groups matching``).

Rows also give the two references: the same student randomly initialised (the floor) and the
teacher itself (the ceiling). Numbers are means over seeds with the spread (max - min) / 2.
CPU only (``--device cuda`` runs the same cells on a GPU); ``--quick`` runs two cells on a slice
of the data (256 training and 128 test images, so that the teacher's passes take seconds) for the
smoke test and ``make bench``: its numbers show the script runs, not what the objective does.

    python benchmarks/bench_quality.py            # full grid, about an hour on 2 cores
    python benchmarks/bench_quality.py --groups teachers --output benchmarks/results/quality-teachers-cpu.json
    python benchmarks/bench_quality.py --groups matching --output benchmarks/results/quality-matching-cpu.json
    python benchmarks/bench_quality.py --quick
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from common import (
    DIGITS_SPLITS,
    Column,
    linear_and_knn,
    paper_objective,
    parser,
    report,
    reset_accelerate,
    resolve_device,
    seed_row,
    share_teacher_caches,
)
from safetensors.torch import save_file

from mvmr_hf.cli.train import distill_main, pretrain_main
from mvmr_hf.config import PAPER_REPRESENTATIONS
from mvmr_hf.data.sample_data import write_digits
from mvmr_hf.errors import ConfigError
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.student import build_student
from mvmr_hf.models.timm_folder import CONFIG, WEIGHTS, write_timm_config
from mvmr_hf.release.export import export_student
from mvmr_hf.utils import atomic_folder

IMAGE_SIZE = 16  # the digits are 8 x 8: 16 px keeps every detail at a quarter of the cost of 32 px
STUDENT = "resnet18"
PROJECTOR = "2048-2048"
# A short schedule that fits a 2-core machine; the same for every cell.
COMMON = ["--student", STUDENT, "--image-size", str(IMAGE_SIZE), "--batch-size", "64",
          "--learning-rate", "1e-3", "--warmup", "0.1", "--num-workers", "0",
          "--checkpoint-every", "100000", "--log-every", "1000"]  # fmt: skip
DEFAULTS = ["--projector", PROJECTOR]

# (group, cell, command, flags changed against the candidate defaults; later flags win, except that a
# repeated comma-list option such as --teacher extends its list: a cell's --teacher replaces the default one)
DISTILL_CELLS = [
    ("distill", "defaults: mean, R, biased, L1 + L2", "distill", []),
    ("distill", "invariance sum (eq. 4 as printed)", "distill", ["--invariance-reduction", "sum"]),
    ("distill", "dCor R² (eq. 11 as printed)", "distill", ["--dcor-squared"]),
    ("distill", "sum and R² (the equations as printed)", "distill",
     ["--invariance-reduction", "sum", "--dcor-squared"]),
    ("distill", "bias-corrected dCor (R²)", "distill", ["--dcor-estimator", "unbiased"]),
    ("distill", "no L1 (λ = μ = 0)", "distill", ["--invariance-weight", "0", "--variance-weight", "0"]),
    ("distill", "no L2 (α = 0)", "distill", ["--view-weight", "0"]),
    ("distill", "teacher term only (λ = μ = α = 0)", "distill",
     ["--invariance-weight", "0", "--variance-weight", "0", "--view-weight", "0"]),
    ("distill", "projector none", "distill", ["--projector", "none"]),
    ("distill", "projector 512-512", "distill", ["--projector", "512-512"]),
]  # fmt: skip
# The feature-matching term (not in the paper) on digits, in the settings bench_quality_fashion.py measured
# best: on the augmented view, which the teacher then sees too, made of crops of 0.5-1 and flips.
ONE_MILD_VIEW = ["--feature-matching-weight", "1", "--teacher-view", "augmented",
                 "--augmentations", "crop,flip", "--crop-scale", "0.5,1", "--invariance-weight", "0",
                 "--variance-weight", "0", "--view-weight", "0"]  # fmt: skip
MATCHING_CELLS = [
    ("matching", "paper objective, no feature matching", "distill", []),
    ("matching", "teacher dCor + feature matching, teacher and student on one mild view (λ = μ = α = 0)",
     "distill", ONE_MILD_VIEW),
    ("matching", "feature matching alone on that view (β = 0)", "distill",
     [*ONE_MILD_VIEW, "--representation-weights", "teacher=0"]),
    ("matching", "teacher dCor + feature matching 4 on that view", "distill",
     [*ONE_MILD_VIEW, "--feature-matching-weight", "4"]),
    # dCor on the features that are probed and released, as feature matching is: no projector between
    ("matching", "teacher dCor + feature matching on that view, no projector", "distill",
     [*ONE_MILD_VIEW, "--projector", "none"]),
    ("matching", "teacher dCor + feature matching 4 on that view, no projector", "distill",
     [*ONE_MILD_VIEW, "--feature-matching-weight", "4", "--projector", "none"]),
    ("matching", "teacher dCor + feature matching 4 on that view, crops of 0.8-1, no projector", "distill",
     [*ONE_MILD_VIEW, "--feature-matching-weight", "4", "--projector", "none", "--crop-scale", "0.8,1"]),
]  # fmt: skip
# {lite0}, {lite2} and {random} are the teachers' folders.
TEACHER_CELLS = [
    ("teachers", "EfficientNet-Lite0 alone (the defaults cell)", "distill", []),
    ("teachers", "EfficientNet-Lite2 alone", "distill", ["--teacher", "{lite2}"]),
    ("teachers", "Lite0 + Lite2", "distill",
     ["--teacher", "{lite0},{lite2}", "--teacher-names", "lite0,lite2"]),
    ("teachers", "Lite0 + random-init Lite0", "distill",
     ["--teacher", "{lite0},{random}", "--teacher-names", "lite0,random"]),
]  # fmt: skip
PRETRAIN_CELLS = [
    ("pretrain", "no descriptor (L1 + L2 only)", "pretrain", ["--handcrafted", ""]),
    ("pretrain", "scatnet, hog, lsd (no pixels)", "pretrain", ["--handcrafted", "scatnet,hog,lsd"]),
    ("pretrain", "all five (paper)", "pretrain", ["--handcrafted", ",".join(PAPER_REPRESENTATIONS)]),
]
QUICK_CELLS = [DISTILL_CELLS[0], DISTILL_CELLS[1]]


def _random_teacher(folder: Path) -> Path:
    """EfficientNet-Lite0's architecture with random weights: a teacher that knows nothing."""
    if not (folder / WEIGHTS).is_file():
        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        with atomic_folder(folder) as work:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / WEIGHTS)
            write_timm_config(model, work / CONFIG)
    return folder


def main() -> int:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 2, quick 2)")
    arguments.add_argument("--epochs", type=int, default=None, help="epochs per run (default 8, quick 2)")
    arguments.add_argument("--work-dir", type=Path, default=None, help="keep runs here (default: a temp dir)")
    arguments.add_argument("--groups", default="distill,pretrain,teachers,matching",
                           help="cell groups to run, comma-separated (references always run)")  # fmt: skip
    args = arguments.parse_args()
    try:
        device = resolve_device(args.device)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seeds = list(range(args.seeds or 2))
    epochs = args.epochs or (2 if args.quick else 8)
    groups = set(args.groups.split(","))
    cells = QUICK_CELLS if args.quick else DISTILL_CELLS + PRETRAIN_CELLS + TEACHER_CELLS + MATCHING_CELLS
    cells = [cell for cell in cells if cell[0] in groups]
    splits = DIGITS_SPLITS["quick" if args.quick else "full"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-quality-"))
    data = (
        write_digits(work / "digits", image_size=IMAGE_SIZE)
        if not (work / "digits").exists()
        else work / "digits"
    )
    teacher = save_efficientnet_lite(work / "teacher-efficientnet-lite0")
    folders = {"lite0": teacher, "random": _random_teacher(work / "teacher-random-lite0"),
               "lite2": save_efficientnet_lite(work / "teacher-efficientnet-lite2", "lite2")}  # fmt: skip
    pool = work / "teacher-caches"
    pool.mkdir(exist_ok=True)
    features = work / "feature-cache"

    rows: list[dict] = []
    start = time.perf_counter()
    references = [("lite0", "EfficientNet-Lite0, ImageNet")]
    if any(group == "teachers" for group, *_ in cells):
        references += [("lite2", "EfficientNet-Lite2, ImageNet"), ("random", "random-init Lite0")]
    for key, label in references:
        reference = linear_and_knn(str(folders[key]), data, features, device, splits)
        rows.append({"group": "reference", "cell": f"teacher ({label})",
                     "linear": reference["linear"], "knn": reference["knn"], "seeds": 1})  # fmt: skip
    random_scores = []
    for seed in seeds:
        torch.manual_seed(seed)
        release = work / f"random-student-{seed}"
        if not release.exists():
            export_student(build_student(STUDENT, projector=PROJECTOR, image_size=IMAGE_SIZE), release)
        random_scores.append(linear_and_knn(str(release), data, features, device, splits))
    rows.append(seed_row("reference", f"{STUDENT} randomly initialised", random_scores, 0.0))

    for group, cell, command, changes in cells:
        changes = [change.format(**folders) for change in changes]
        scores, seconds = [], 0.0
        for seed in seeds:
            run = work / "runs" / f"{cell}-{seed}".replace(" ", "_").replace("/", "_")
            argv = [*COMMON, *DEFAULTS, *changes, "--dataset", str(data), "--output-dir", str(run),
                    *(["--split", splits[0], "--no-streaming"] if args.quick else []),
                    "--seed", str(seed), "--epochs", str(epochs)]  # fmt: skip
            if command == "distill":
                default_teacher = [] if "--teacher" in changes else ["--teacher", str(teacher)]
                # The paper's objective is what every cell varies; the matching cells turn the term on.
                paper = [*default_teacher, *paper_objective(changes)]
                argv = [*argv[: len(COMMON)], *paper, *argv[len(COMMON) :]]
                if not run.exists():
                    share_teacher_caches(pool, run, after=False)
            began = time.perf_counter()
            reset_accelerate()
            status = (distill_main if command == "distill" else pretrain_main)([*argv, "--resume"])
            if status:
                print(f"error: the run {run} failed with status {status}", file=sys.stderr)
                return status
            # The training's time, kept with the run: a later call only resumes the finished run.
            timing = run / "seconds.json"
            if not timing.is_file():
                timing.write_text(json.dumps({"seconds": time.perf_counter() - began}))
            seconds += json.loads(timing.read_text())["seconds"]
            if command == "distill":
                share_teacher_caches(pool, run, after=True)
            scores.append(linear_and_knn(str(run / "student"), data, features, device, splits))
        rows.append(seed_row(group, cell, scores, seconds / len(seeds)))
        print(f"[{time.perf_counter() - start:.0f} s] {group}: {cell}: {rows[-1]['linear']:.2f} linear, "
              f"{rows[-1]['knn']:.2f} kNN", flush=True)  # fmt: skip

    columns: list[Column] = [
        ("group", "group", ""),
        ("cell", "cell", ""),
        ("linear", "linear top-1 %", ".2f"),
        ("linear_spread", "± (half range)", ".2f"),
        ("knn", "kNN top-1 %", ".2f"),
        ("knn_spread", "±", ".2f"),
        ("seeds", "seeds", "d"),
        ("seconds_per_run", "s / run", ".0f"),
    ]
    config = {"dataset": "scikit-learn digits at 16 px (train 1437 / test 360)",
              "teacher": "EfficientNet-Lite0 ImageNet-1k (timm tf_efficientnet_lite0), pooled 1280-d output",
              "student": STUDENT, "projector": PROJECTOR, "epochs": epochs, "seeds": seeds,
              "command": " ".join(COMMON), "threads": torch.get_num_threads()}  # fmt: skip
    notes = [
        "Each distillation cell changes its flags against the paper's objective (invariance mean, dCor R, "
        f"biased, λ = μ = α = β = 1, all five augmentations, crops of 0.08-1, no feature matching; projector "
        f"{PROJECTOR}); the paper's own 8192-8192-8192 projector is too slow to train here over every cell.",
        "s / run: the training's wall time, kept in the run's seconds.json by the call that trained it; "
        "cells trained while other jobs shared the 2 cores are slower than alone.",
        "The spread is half the range over seeds: a difference smaller than the spreads is noise.",
    ]
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    report("quality", args, device, rows, columns, config=config, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
