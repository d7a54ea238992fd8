"""Alignment head: a linear map from student features to a teacher's image-embedding space.

A distilled student is trained only to be *dependent* on its teacher (paper eq. 9: maximise
dCor between the student embedding and the teacher's representation), so its features live
in their own space. A CLIP-style teacher's zero-shot classifier needs features in the
teacher's image-embedding space. The alignment head closes that gap with a ridge regression
fitted in closed form on unlabelled images,

    W, b = argmin ||X W + b - Y||² + λ ||W||²,   Y = teacher embeddings / ||·||

where X are the student's frozen backbone features. No label is used, so the head can be fitted
on any image collection. It is stored in a release as ``alignment.safetensors`` (``weight``
(E, D), ``bias`` (E,)) with ``alignment.json`` describing it.

Example::

    fit = fit_alignment(student_features, teacher_embeddings)
    fit.head(student_features)          # (N, E), approximately the normalised teacher embeddings
    save_alignment(fit, release_folder, teacher="openai/clip-vit-base-patch16", teacher_output="image_embeds")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mvmr_hf.config import teacher_specs
from mvmr_hf.errors import ConfigError

ALIGNMENT_WEIGHTS = "alignment.safetensors"
ALIGNMENT_CONFIG = "alignment.json"
# Ridge strengths relative to the mean eigenvalue of the centred Gram matrix X^T X / D.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class AlignmentHead(nn.Linear):
    """``nn.Linear`` from student features (D) to the teacher's normalised image-embedding space (E)."""


@dataclass
class AlignmentFit:
    """A fitted head and how well it fits: the chosen ridge and the held-out cosine similarity."""

    head: AlignmentHead
    ridge: float
    val_cosine: float
    num_images: int


@dataclass
class AlignmentInfo:
    """What ``alignment.json`` records about a stored alignment head.

    Attributes:
        teacher: the model id or folder whose image-embedding space the head maps into; its text
            tower classifies zero-shot.
        teacher_output: the kind of teacher output the head was fitted to (``mvmr-align``:
            ``embedding``).
        in_features: D, the width of the student's backbone features the head takes.
        out_features: E, the width of the teacher's embedding the head gives.
        ridge: the ridge strength λ of the refit on all images (absolute, not relative to the
            features' scale).
        val_cosine: the mean cosine similarity to the normalised teacher embeddings on the held-out
            images, at the chosen ridge.
        num_images: the unlabelled images the head was fitted on.
        target: what the head regresses onto.
    """

    teacher: str
    teacher_output: str
    in_features: int
    out_features: int
    ridge: float
    val_cosine: float
    num_images: int
    target: str = "l2-normalised teacher image embedding"


def ridge_solve(x: Tensor, y: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Closed-form ridge regression with an unpenalised intercept, in float64.

    Returns ``(weight (E, D), bias (E,))`` minimising ``||x Wᵀ + b - y||² + ridge·||W||²``.
    """
    x64, y64 = x.double(), y.double()
    x_mean, y_mean = x64.mean(0), y64.mean(0)
    xc, yc = x64 - x_mean, y64 - y64.mean(0)
    gram = xc.T @ xc
    gram.diagonal().add_(ridge)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    bias = y_mean - weight @ x_mean
    return weight, bias


def _mean_eigenvalue(x: Tensor) -> float:
    """Mean eigenvalue of the centred Gram matrix ``XcᵀXc``: its trace over the dimension."""
    return ((x - x.mean(0)).square().sum() / x.shape[1]).item()


def _mean_cosine(prediction: Tensor, target: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(prediction, target, dim=1).mean().item()


def fit_alignment(
    student_features: Tensor,
    teacher_embeddings: Tensor,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> AlignmentFit:
    """Fit an :class:`AlignmentHead` by ridge regression onto the normalised teacher embeddings.

    The ridge strength is picked from :data:`RIDGE_GRID` (relative to the mean eigenvalue of the
    centred Gram matrix, so the choice does not depend on the feature scale) by the mean cosine
    similarity on a held-out ``val_fraction`` of the images; the head is then refitted on all images.
    No labels are involved. ``val_cosine`` is the held-out cosine of the chosen ridge.
    """
    if student_features.ndim != 2 or teacher_embeddings.ndim != 2:
        raise ConfigError("fit_alignment needs 2-D (N, D) student features and (N, E) teacher embeddings.")
    num = student_features.shape[0]
    if teacher_embeddings.shape[0] != num:
        raise ConfigError(
            f"fit_alignment got {num} student feature rows but {teacher_embeddings.shape[0]} teacher "
            "embeddings; pass features of the same images in the same order."
        )
    num_val = int(num * val_fraction)
    if num_val < 2 or num - num_val < 2:
        needed = int(4 / val_fraction)
        raise ConfigError(f"fit_alignment got only {num} images; pass at least {needed} unlabelled images.")
    x = student_features.double()
    y = nn.functional.normalize(teacher_embeddings.double(), dim=1)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    val, train = order[:num_val], order[num_val:]
    scale = _mean_eigenvalue(x[train])
    scores = {}
    for relative in RIDGE_GRID:
        weight, bias = ridge_solve(x[train], y[train], relative * scale)
        scores[relative] = _mean_cosine(x[val] @ weight.T + bias, y[val])
    best = max(scores, key=scores.__getitem__)
    ridge = best * _mean_eigenvalue(x)
    weight, bias = ridge_solve(x, y, ridge)
    head = AlignmentHead(x.shape[1], y.shape[1])
    with torch.no_grad():
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    return AlignmentFit(head=head.eval(), ridge=ridge, val_cosine=scores[best], num_images=num)


def save_alignment(fit: AlignmentFit, folder: str | Path, *, teacher: str, teacher_output: str) -> None:
    """Write ``alignment.safetensors`` and ``alignment.json`` into ``folder`` (which must exist)."""
    folder = Path(folder)
    head = fit.head
    save_file(
        {"weight": head.weight.detach().contiguous().cpu(), "bias": head.bias.detach().contiguous().cpu()},
        folder / ALIGNMENT_WEIGHTS,
    )
    info = AlignmentInfo(
        teacher=teacher,
        teacher_output=teacher_output,
        in_features=head.in_features,
        out_features=head.out_features,
        ridge=fit.ridge,
        val_cosine=fit.val_cosine,
        num_images=fit.num_images,
    )
    (folder / ALIGNMENT_CONFIG).write_text(json.dumps(asdict(info), indent=2) + "\n")


def load_alignment(folder: str | Path) -> tuple[AlignmentHead, AlignmentInfo] | None:
    """Read the alignment head of a release folder, or ``None`` when none was fitted."""
    folder = Path(folder)
    if not (folder / ALIGNMENT_CONFIG).is_file():
        return None
    raw: dict[str, Any] = json.loads((folder / ALIGNMENT_CONFIG).read_text())
    info = AlignmentInfo(**raw)
    head = AlignmentHead(info.in_features, info.out_features)
    head.load_state_dict(load_file(folder / ALIGNMENT_WEIGHTS))
    return head.eval(), info


def alignment_teacher(training_args: dict[str, Any], requested: str | None) -> str:
    """The teacher whose image-embedding space a student's head maps to: a model id or folder.

    ``requested`` is one of the run's teacher names, or any CLIP-style model; without it, the
    run's teacher, which must then be the only one.
    """
    specs = teacher_specs(training_args)
    by_name = {spec.name: spec.model for spec in specs}
    if requested:
        return by_name.get(requested, requested)
    if not specs:
        raise ConfigError(
            "the student was not distilled from a teacher: pass the CLIP-style model with --teacher"
        )
    if len(specs) > 1:
        raise ConfigError(
            f"the student was distilled from {len(specs)} teachers ({', '.join(by_name)}): choose the one "
            "whose embedding space the head maps to with --teacher NAME"
        )
    return specs[0].model
