"""Offline smoke run of the whole pipeline: data -> distillation -> release -> evaluation.

    make demo                 # sets up .venv, then runs this file
    python examples/demo.py [OUTPUT_DIR]

Everything is local and small so that it runs on a laptop CPU without network in about
two minutes: scikit-learn's 1,797 digits written as a parquet dataset, a *randomly
initialised* 2-layer CLIP built from a config as the teacher (the real default is
openai/clip-vit-base-patch16), and a ResNet-18 student at 32 px. The accuracies it prints
show that the pipeline runs end to end; they say nothing about distillation quality,
since the teacher knows nothing. The real command is

    accelerate launch examples/distill.py --student resnet50 --dataset ORG/DATASET
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mvmr_hf.cli.release import evaluate_main
from mvmr_hf.cli.train import distill_main
from mvmr_hf.sample_data import write_digits
from mvmr_hf.tiny_models import save_tiny_teacher

IMAGE_SIZE = 32


def main(output: Path) -> int:
    start = time.perf_counter()
    data = output / "digits"
    teacher = output / "tiny-clip-teacher"
    run = output / "run"
    if not data.exists():
        write_digits(data, image_size=IMAGE_SIZE)
    if not teacher.exists():
        save_tiny_teacher("clip", teacher, image_size=IMAGE_SIZE)
    print(f"[demo] smoke run: digits at {data}, random tiny CLIP teacher at {teacher}", flush=True)

    status = distill_main([
        "--dataset", str(data), "--teacher", str(teacher), "--student", "resnet18",
        "--image-size", str(IMAGE_SIZE), "--projector", "256-256", "--batch-size", "64",
        "--epochs", "2", "--warmup", "5", "--num-workers", "0", "--checkpoint-every", "20",
        "--cache-teacher", "--output-dir", str(run), "--overwrite",
    ])
    if status:
        return status
    for model in (run / "student", teacher):
        print(f"[demo] linear probe and kNN of {model.name} on the digits test split", flush=True)
        status = evaluate_main([
            "--model", str(model), "--dataset", str(data), "--protocol", "linear,knn",
            "--cache-dir", str(output / "feature-cache"),
            *(["--update-card"] if model.name == "student" else []),
        ])
        if status:
            return status
    print(f"[demo] done in {time.perf_counter() - start:.0f} s. The student release is {run / 'student'}:")
    print(f"  timm.create_model('local-dir:{run / 'student'}', pretrained=True)")
    print(f"  transformers.AutoModel.from_pretrained('{run / 'student'}')")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")))
