"""What a teacher costs: memory and time of its forward, and how far bfloat16 weights move its outputs.

Each teacher is loaded with :func:`mvmr_hf.models.representations.teacher.load_teacher` in float32 and
with ``dtype=torch.bfloat16`` (``--teacher-dtype bfloat16``) and run as training runs it, under
``no_grad`` on a batch of 224 px views of real photographs (scikit-image's, centre views):

- peak memory of one forward over the weights already loaded (``common.PeakMemory``: CUDA's
  allocator peak, or the process's resident-set growth on CPU), and the weights' own size;
- milliseconds per image;
- agreement of the bfloat16 outputs with the float32 ones: the mean cosine similarity and the
  distance correlation between the two (B, D) output sets (1 = the same geometry).

Teachers: the default, CLIP ViT-B/16's image tower (``openai/clip-vit-base-patch16``), built
from its configuration with random weights (its memory and time do not depend on them, so its
agreement is not reported), and Google's EfficientNet-Lite0 and Lite2 ImageNet weights
(``mvmr_hf.models.efficientnet_lite``, real, offline). On CUDA the batch is the distillation default,
512; on a 2-core CPU that forward takes minutes, so the CPU grid measures batches 32 and 64 and
extrapolates the memory to 512 linearly (activations grow with the batch).

    python benchmarks/bench_teachers.py [--device cuda] [--quick]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    PeakMemory,
    parser,
    photo_batch,
    prepare_memory_measurement,
    report,
    resolve_device,
    time_call,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from mvmr_hf.cli import run_cli
from mvmr_hf.loss.dcor import distance_correlation
from mvmr_hf.models.efficientnet_lite import save_efficientnet_lite
from mvmr_hf.models.representations.teacher import Teacher, load_teacher

DEFAULT_BATCH = 512  # --batch-size of mvmr-distill
BICUBIC = 3
DTYPES = ("float32", "bfloat16")
# openai/clip-vit-base-patch16's vision tower and processor, from its configuration
CLIP_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "patch_size": 16, "image_size": 224, "projection_dim": 512}  # fmt: skip
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _save_clip_b16(folder: Path) -> Path:
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_B16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=BICUBIC,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(folder)  # fmt: skip
    return folder


def _weights_mib(teacher: Teacher) -> float:
    return sum(p.numel() * p.element_size() for p in teacher.parameters()) / 2**20


def _measure(
    name: str, folder: Path, images: torch.Tensor, device: torch.device, agreement: bool
) -> list[dict]:
    rows: list[dict[str, Any]] = []
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):  # the order of DTYPES
        teacher = load_teacher(str(folder), dtype=dtype).to(device)
        batch = images.to(device)
        with PeakMemory(device) as peak:
            outputs[dtype] = teacher(batch)
        timing = time_call(
            lambda teacher=teacher, batch=batch: teacher(batch), device, budget_s=5.0, max_repeats=3
        )
        rows.append({"teacher": name, "dtype": str(dtype).removeprefix("torch."), "batch": len(images),
                     "weights_mib": _weights_mib(teacher),
                     "peak_mib": None if peak.bytes is None else peak.bytes / 2**20,
                     "ms_per_image": timing.best / len(images) * 1e3})  # fmt: skip
        del teacher
    if agreement:
        full, low = outputs[torch.float32].double().cpu(), outputs[torch.bfloat16].double().cpu()
        rows[-1]["cosine"] = torch.nn.functional.cosine_similarity(full, low, dim=1).mean().item()
        rows[-1]["dcor"] = distance_correlation(full, low).item()
    return rows


def _extrapolated(rows: list[dict[str, Any]], name: str, dtype: str, batches: list[int]) -> str:
    """The forward's peak at the default batch, linear in the batch through the two measured ones."""
    small, large = (next(r for r in rows if (r["teacher"], r["dtype"], r["batch"]) == (name, dtype, b))
                    for b in batches)  # fmt: skip
    if small["peak_mib"] is None or large["peak_mib"] is None:
        return f"{name}, {dtype}: peak memory not measurable here"
    per_image = (large["peak_mib"] - small["peak_mib"]) / (batches[1] - batches[0])
    at_default = large["peak_mib"] + per_image * (DEFAULT_BATCH - batches[1])
    return (
        f"{name}, {dtype}: weights {large['weights_mib']:.0f} MiB + forward peak about "
        f"{at_default / 1024:.1f} GiB at batch {DEFAULT_BATCH} (linear through batches {batches[0]} and "
        f"{batches[1]})"
    )


def main(argv: list[str]) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    device = resolve_device(args.device)
    memory_method = prepare_memory_measurement(device)
    if device.type == "cuda":
        batches = [16] if args.quick else [DEFAULT_BATCH]
    else:
        batches = [8] if args.quick else [32, 64]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        teachers = [("CLIP ViT-B/16 (random weights)", _save_clip_b16(Path(tmp) / "clip"), False)]
        for variant in ("lite0", "lite2"):
            folder = save_efficientnet_lite(Path(tmp) / variant, variant)
            teachers.append((f"EfficientNet-{variant.capitalize()} (ImageNet)", folder, True))
        for batch in batches:
            images = photo_batch(batch, 224)
            for name, folder, agreement in teachers:
                rows += _measure(name, folder, images, device, agreement)
                print(f"measured {name}, batch {batch}", file=sys.stderr, flush=True)
    notes = [
        f"peak memory: {memory_method}; weights: parameters only",
        "cosine, dCor: bfloat16 against float32 outputs of the same images (on the bfloat16 rows)",
    ]
    if len(batches) == 2:
        notes += [_extrapolated(rows, name, dtype, batches) for name, *_ in teachers for dtype in DTYPES]
    columns = [
        ("teacher", "teacher", ""),
        ("dtype", "weights", ""),
        ("batch", "batch", "d"),
        ("weights_mib", "weights MiB", ".0f"),
        ("peak_mib", "forward peak MiB", ".0f"),
        ("ms_per_image", "ms / image", ".2f"),
        ("cosine", "cosine to fp32", ".5f"),
        ("dcor", "dCor to fp32", ".5f"),
    ]
    report(
        "teachers", args, device, rows, columns, config={"batches": batches, "image_size": 224}, notes=notes
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
