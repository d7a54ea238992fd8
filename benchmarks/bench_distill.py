"""A short real distillation with and without the GPU speed options: time and quality.

Each configuration is a complete run of the command users type, ``examples/distill.py`` (under
``accelerate launch`` with several processes), in a subprocess: Google's EfficientNet-Lite0
ImageNet-1k weights (the ``demo`` extra, a transformers ``TimmWrapperModel`` fed by its own
processor) teach a resnet18 trained from scratch on scikit-learn's digits (a local parquet data
set at 32 px), without labels. The table gives each run's training rate (the median of the
``images_per_s`` logged in ``metrics.jsonl``, the first log left out: it holds the compilation),
its wall time (start-up and compilation included) and the student's linear-probe and kNN top-1 on
the digits test split (``mvmr_hf.evaluate`` on ``--device``), with the same student randomly
initialised and the teacher as references.

Configurations:

- ``eager``: fp32, channels-last off, augmented views made by the DataLoader workers;
- ``fast``: bf16 autocast, channels-last, ``--compile`` (CUDA only: compiling takes minutes on a
  small CPU) and the augmented views made on the device (``--device-views``).

On CUDA both run with 2 processes when 2 GPUs exist (``--processes``). ``--quick`` runs one
epoch on a slice of the digits (256 training and 128 test images, batch 64): it shows that the
script runs, not what distillation reaches; on CUDA it runs only ``fast`` (the GPU check's budget).

    python benchmarks/bench_distill.py --device cuda
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import DIGITS_SPLITS, linear_and_knn, parser, report, resolve_device

from mvmr_hf.cli import run_cli
from mvmr_hf.data.sample_data import write_digits
from mvmr_hf.errors import ConfigError
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.student import build_student
from mvmr_hf.release.export import export_student
from mvmr_hf.training.metrics import METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
STUDENT = "resnet18"
PROJECTOR = "2048-2048"
BATCH = 128
EPOCHS, QUICK_EPOCHS = 20, 1
COMMON = ["--student", STUDENT, "--image-size", str(IMAGE_SIZE), "--projector", PROJECTOR,
          "--learning-rate", "1e-3", "--warmup", "0.1", "--checkpoint-every", "100000",
          "--seed", "0"]  # fmt: skip
EAGER = ["--mixed-precision", "no", "--channels-last", "false", "--device-views", "false"]
FAST = ["--mixed-precision", "bf16", "--channels-last", "--device-views"]


def _configurations(device: torch.device, quick: bool) -> list[tuple[str, list[str]]]:
    if device.type != "cuda":
        return [("eager", EAGER), ("fast", FAST)]
    fast = ("fast", [*FAST, "--compile"])
    # The GPU check's quick run proves the fast path end to end within its budget; CPU CI runs the eager one.
    return [fast] if quick else [("eager", EAGER), fast]


def _distill(flags: list[str], processes: int, device: torch.device) -> float:
    """Run ``examples/distill.py`` with ``flags``; return its wall time in seconds."""
    script = str(REPO / "examples" / "distill.py")
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                   "--num_machines", "1", "--dynamo_backend", "no", script, *flags]  # fmt: skip
    else:
        command = [sys.executable, script, *flags]
    environment = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
    began = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if result.returncode:
        raise ConfigError(f"the distillation {' '.join(flags)} failed: {result.stderr.strip()[-2000:]}")
    return time.perf_counter() - began


def _rate(run: Path) -> float | None:
    """Median training images/s over the logged steps, the first (compilation, start-up) left out."""
    logged = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    rates = [entry["images_per_s"] for entry in logged[1:]]
    return statistics.median(rates) if rates else None


def main(argv: list[str]) -> None:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--processes", type=int, default=None,
                     help="training processes (default: 2 when 2 GPUs exist, else 1)")  # fmt: skip
    args = cli.parse_args(argv)
    device = resolve_device(args.device)
    processes = args.processes or (min(2, torch.cuda.device_count()) if device.type == "cuda" else 1)
    epochs = QUICK_EPOCHS if args.quick else EPOCHS
    log_every = 2 if args.quick else 10
    batch = 64 if args.quick else BATCH
    splits = DIGITS_SPLITS["quick" if args.quick else "full"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        data = write_digits(work / "digits", image_size=IMAGE_SIZE)
        teacher = save_efficientnet_lite(work / "teacher-efficientnet-lite0")
        features = work / "feature-cache"
        for name, options in _configurations(device, args.quick):
            run = work / name
            flags = [*COMMON, *options, "--dataset", str(data), "--teacher", str(teacher),
                     "--output-dir", str(run), "--epochs", str(epochs), "--log-every", str(log_every),
                     "--batch-size", str(batch), "--num-workers", "4" if device.type == "cuda" else "0",
                     *(["--split", splits[0], "--no-streaming"] if args.quick else [])]  # fmt: skip
            seconds = _distill(flags, processes, device)
            rows.append({"model": f"student, {name}", "options": " ".join(options), "processes": processes,
                         "wall_s": seconds, "images_per_s": _rate(run),
                         **linear_and_knn(run / "student", data, features, device, splits)})  # fmt: skip
            shutil.rmtree(run / "checkpoints")
            print(f"measured {name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        random_student = work / "random-student"
        export_student(build_student(STUDENT, projector=PROJECTOR, image_size=IMAGE_SIZE), random_student)
        rows.append({"model": f"{STUDENT}, random initialisation",
                     **linear_and_knn(random_student, data, features, device, splits)})  # fmt: skip
        rows.append(
            {
                "model": "teacher (EfficientNet-Lite0, ImageNet-1k)",
                **linear_and_knn(teacher, data, features, device, splits),
            }
        )
    columns = [
        ("model", "model", ""),
        ("options", "options", ""),
        ("processes", "processes", "d"),
        ("images_per_s", "train images/s", ".0f"),
        ("wall_s", "wall s", ".0f"),
        ("linear", "linear top-1 %", ".2f"),
        ("knn", "kNN top-1 %", ".2f"),
    ]
    config = {"student": STUDENT, "projector": PROJECTOR, "image_size": IMAGE_SIZE, "batch": batch,
              "epochs": epochs, "splits": list(splits), "command": " ".join(COMMON)}  # fmt: skip
    notes = [
        f"digits at {IMAGE_SIZE} px ({splits[0]} / {splits[1]}), global batch {batch}, {epochs} epochs, "
        f"Adam 1e-3, projector {PROJECTOR}; the teacher runs every step (no cache)",
        "train images/s: median of the rates logged every few steps, the first log (compilation) left out; "
        "wall s: the whole command, start-up, compilation and release included",
    ]
    report("distill", args, device, rows, columns, config=config, notes=notes)


if __name__ == "__main__":
    sys.exit(run_cli(main))
