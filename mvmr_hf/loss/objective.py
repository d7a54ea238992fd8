"""The MV-MR objective (paper, section 4.1, eq. 4-10).

    L1 = λ·d(Z, Z̃) + μ·[v(Z) + v(Z̃)]                  (eq. 4-7)
    L2 = α·[1 - dCor(Z̃, Z)]                            (eq. 8)
    L3 = Σ_k β_k·[1 - dCor(Z̃, Z*_k)]                   (eq. 9)
    L  = L1 + L2 + L3                                   (eq. 10)

``Z`` embeds the non-augmented views, ``Z̃`` the augmented ones, and each ``Z*_k`` is a
representation of the non-augmented views of any shape: a hand-crafted descriptor in
self-supervised pretraining, a frozen teacher's output in distillation (section 5.2), or
both. Distance correlation needs no common dimension, so no projection to the teacher's
space and no labels are involved.

Not in the paper, and off unless asked: :class:`FeatureMatching`, classic feature distillation
through trained linear heads, an extra term that :meth:`LossOutput.plus` adds to eq. 10.

Example::

    >>> loss_fn = MVMRLoss(representation_weights={"teacher": 1.0})
    >>> out = loss_fn(z, z_aug, {"teacher": teacher_embeddings, "hog": hog_features})
    >>> out.total.backward(); out.terms   # {"invariance": ..., "variance": ..., "dcor/views": ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvmr_hf.loss.dcor import (
    CenteredDistances,
    centered_distances,
    check_estimator,
    dcor_from_centered,
    gather_no_grad,
    gather_with_grad,
    min_batch_size,
)

__all__ = [
    "INVARIANCE_REDUCTIONS",
    "SCOPES",
    "FeatureMatching",
    "LossOutput",
    "MVMRLoss",
    "invariance",
    "variance_hinge",
]

SCOPES = ("global", "local")
INVARIANCE_REDUCTIONS = ("mean", "sum")


def invariance(z: Tensor, z_aug: Tensor, *, reduction: str = "mean") -> Tensor:
    """The invariance term d(Z, Z̃) of eq. 4.

    ``reduction="sum"`` is eq. 4 as printed, (1/B)·Σ_i ||z_i - z̃_i||², summed over the D
    embedding dimensions; ``"mean"`` also averages over them, (1/(B·D))·Σ_i ||z_i - z̃_i||²
    (``F.mse_loss``, what the paper's released code and VICReg compute). With an 8192-d
    projector the sum is 8192 times larger and outweighs every other term at λ = μ = 1.
    """
    if reduction not in INVARIANCE_REDUCTIONS:
        raise ValueError(
            f"unknown invariance reduction {reduction!r}: use one of {', '.join(INVARIANCE_REDUCTIONS)}"
        )
    per_sample = (z - z_aug).pow(2).sum(dim=1)
    return per_sample.mean() / (z.shape[1] if reduction == "mean" else 1)


def variance_hinge(z: Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """v(Z) = (1/D)·Σ_d max(0, γ - S(z[d], ε)), with S(a, ε) = sqrt(Var(a) + ε) (eq. 5-6).

    Var is the unbiased sample variance along the batch, as in VICReg.
    """
    std = torch.sqrt(z.var(dim=0) + eps)
    return torch.relu(gamma - std).mean()


@dataclass
class LossOutput:
    """The total loss, its weighted terms (which sum to it) and the raw distance correlations.

    ``terms`` holds ``invariance`` (λ·d), ``variance`` (μ·[v(Z) + v(Z̃)]), ``dcor/views``
    (α·[1 - dCor(Z̃, Z)]) and one ``dcor/<name>`` (β_k·[1 - dCor(Z̃, Z*_k)]) per
    representation; ``dcor`` holds the unweighted dCor values under the same names.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    dcor: dict[str, Tensor] = field(default_factory=dict)

    def plus(self, terms: Mapping[str, Tensor]) -> LossOutput:
        """A new output with the weighted ``terms`` (e.g. :class:`FeatureMatching`'s) added to the total."""
        total = torch.stack([self.total, *terms.values()]).sum() if terms else self.total
        return LossOutput(total=total, terms={**self.terms, **terms}, dcor=dict(self.dcor))


class MVMRLoss(nn.Module):
    """MV-MR loss of eq. 10: invariance, variance, and distance correlation terms.

    Args:
        invariance_weight: λ in eq. 7 (paper: 1).
        variance_weight: μ in eq. 7 (paper: 1).
        view_weight: α in eq. 8 (paper: 1).
        representation_weights: β_k in eq. 9 by representation name; names not listed get
            ``default_representation_weight``.
        default_representation_weight: β_k in eq. 9 of every representation that
            ``representation_weights`` does not name (paper: 1).
        gamma: margin γ of the variance hinge, eq. 5 (paper: 1).
        eps: ε of the variance hinge's S(a, ε) = sqrt(Var(a) + ε), eq. 6 (paper: 1e-4).
        invariance_reduction: ``"mean"`` over batch and dimensions (the paper's released code,
            the default) or ``"sum"`` over dimensions (eq. 4 as printed); see :func:`invariance`.
        squared: use R² (eq. 11 as printed) or R (the paper's released code); ``None`` (the
            default) picks R for the biased estimator and R², the only defined form, for the
            bias-corrected one.
        unbiased: use the bias-corrected (U-centred) estimator; only defined squared.
        scope: ``"global"`` computes every term on the batch gathered from all processes
            (embeddings with gradients), so that with data-parallel gradient averaging the
            update equals a one-process run on the global batch; ``"local"`` uses each
            process's own batch, as the paper's original code did.

    Shapes: ``z`` and ``z_aug`` are (B, D); each representation is (B, ...) of any shape.
    ``z`` may be ``None`` when λ = μ = α = 0 (:attr:`needs_non_augmented`): only the
    representations' terms (eq. 9) remain, so the caller need not embed the non-augmented view.
    Call with a ``gather`` mapping ``{name: False}`` to keep a very wide representation on
    the local batch in the global scope (its term then pairs it with the local ``z_aug``).
    """

    def __init__(
        self,
        *,
        invariance_weight: float = 1.0,
        variance_weight: float = 1.0,
        view_weight: float = 1.0,
        representation_weights: Mapping[str, float] | None = None,
        default_representation_weight: float = 1.0,
        gamma: float = 1.0,
        eps: float = 1e-4,
        invariance_reduction: str = "mean",
        squared: bool | None = None,
        unbiased: bool = False,
        scope: str = "global",
    ) -> None:
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"unknown dCor scope {scope!r}: use one of {', '.join(SCOPES)}")
        if invariance_reduction not in INVARIANCE_REDUCTIONS:
            raise ValueError(
                f"unknown invariance reduction {invariance_reduction!r}: use one of "
                f"{', '.join(INVARIANCE_REDUCTIONS)}"
            )
        check_estimator(unbiased=unbiased, squared=squared, fix="use squared=True with unbiased=True")
        self.invariance_weight = invariance_weight
        self.variance_weight = variance_weight
        self.view_weight = view_weight
        self.representation_weights = dict(representation_weights or {})
        self.default_representation_weight = default_representation_weight
        self.gamma = gamma
        self.eps = eps
        self.invariance_reduction = invariance_reduction
        self.squared = unbiased if squared is None else squared
        self.unbiased = unbiased
        self.scope = scope

    @property
    def min_batch_size(self) -> int:
        """Smallest (global) batch the chosen estimator is defined for."""
        return min_batch_size(unbiased=self.unbiased)

    @property
    def needs_non_augmented(self) -> bool:
        """Whether any term reads Z, the non-augmented view's embedding (λ, μ or α is not 0)."""
        return any((self.invariance_weight, self.variance_weight, self.view_weight))

    def weight(self, name: str) -> float:
        """β for the representation called ``name``."""
        return self.representation_weights.get(name, self.default_representation_weight)

    def forward(
        self,
        z: Tensor | None,
        z_aug: Tensor,
        representations: Mapping[str, Tensor] | None = None,
        gather: Mapping[str, bool] | None = None,
    ) -> LossOutput:
        if z is None and self.needs_non_augmented:
            raise ValueError("z is None but λ, μ or α is not 0: embed the non-augmented view too")
        if z_aug.dim() != 2 or (z is not None and z.shape != z_aug.shape):
            shapes = f"{tuple(z_aug.shape)}" if z is None else f"{tuple(z.shape)} and {tuple(z_aug.shape)}"
            raise ValueError(f"z and z_aug must be (B, D) embeddings of the same shape, got {shapes}")
        representations = dict(representations or {})
        for name, rep in representations.items():
            if rep.shape[0] != z_aug.shape[0]:
                raise ValueError(
                    f"representation {name!r} holds {rep.shape[0]} samples but the embeddings hold "
                    f"{z_aug.shape[0]}: compute it on the same batch"
                )
        gather = dict(gather or {})
        is_global = self.scope == "global"
        local_z_aug = z_aug
        if is_global:
            z_aug = gather_with_grad(z_aug)
        # The augmented embedding's distance matrix is computed once and reused by every dCor term.
        centred_aug = centered_distances(z_aug, unbiased=self.unbiased)
        terms, values = {}, {}
        if z is not None:
            if is_global:
                z = gather_with_grad(z)
            terms["invariance"] = self.invariance_weight * invariance(
                z, z_aug, reduction=self.invariance_reduction
            )
            terms["variance"] = self.variance_weight * (
                variance_hinge(z, gamma=self.gamma, eps=self.eps)
                + variance_hinge(z_aug, gamma=self.gamma, eps=self.eps)
            )
            values["dcor/views"] = self._dcor(centred_aug, z)
            terms["dcor/views"] = self.view_weight * (1.0 - values["dcor/views"])
        # Representations kept on the local batch pair with the local augmented embedding.
        centred_local_aug = None if is_global else centred_aug
        for name, rep in representations.items():
            key = f"dcor/{name}"
            if is_global and gather.get(name, True):
                values[key] = self._dcor(centred_aug, gather_no_grad(rep.detach()))
            else:
                if centred_local_aug is None:
                    centred_local_aug = centered_distances(local_z_aug, unbiased=self.unbiased)
                values[key] = self._dcor(centred_local_aug, rep.detach())
            terms[key] = self.weight(name) * (1.0 - values[key])
        # no term at all (z None and no representation): zero, for a term added after (feature matching)
        total = torch.stack(list(terms.values())).sum() if terms else z_aug.sum() * 0.0
        return LossOutput(total=total, terms=terms, dcor=values)

    def _dcor(self, centred_aug: CenteredDistances, other: Tensor) -> Tensor:
        return dcor_from_centered(
            centred_aug, centered_distances(other, unbiased=self.unbiased), squared=self.squared
        )

    def extra_repr(self) -> str:
        estimator = "bias-corrected" if self.unbiased else "biased"
        return (
            f"λ={self.invariance_weight}, μ={self.variance_weight}, α={self.view_weight}, "
            f"β={self.representation_weights or self.default_representation_weight}, γ={self.gamma}, "
            f"ε={self.eps}, invariance={self.invariance_reduction}, "
            f"dCor={'R²' if self.squared else 'R'} {estimator}, scope={self.scope}"
        )


class FeatureMatching(nn.Module):
    """Feature matching through trained linear heads: ``weight·[1 - cos(W_k·h + b_k, t_k)]`` per teacher.

    Not in the paper: classic feature distillation (FitNets, Romero et al. 2015; "a trained linear
    head into the teacher's space"), added as one more term next to eq. 10, because on real data it
    distils better than the dCor terms alone (measured: README, "Quality"). ``h`` are the student's
    pooled backbone features (``StudentOutput.features``), ``t_k`` teacher k's output and ``W_k``,
    ``b_k`` one ``nn.Linear`` per teacher in :attr:`heads`, trained with the student by the same
    optimizer; the heads are not part of the release (they live in the training checkpoints only).

    It pairs the student's features of the view the teachers see (``--teacher-view``: distillation's
    default, the augmented view x̃; the non-augmented view x keeps the teacher cache exact) with the
    teachers' outputs of that same view. ``weight`` is the term's own scale; distillation's default
    weight (``mvmr_hf.config``) was measured (README, "Quality"). The term is per sample (the mean
    over the local batch), so data-parallel gradient averaging makes it the global batch's mean.
    The heads run in float32 even under mixed precision: the cosine of nearly aligned vectors is lost
    in bf16 rounding.

    Shapes: ``features`` (B, F); each target (B, D_k), a pooled output (not a token grid).
    """

    def __init__(self, feature_dim: int, target_dims: Mapping[str, int], weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, dim) for name, dim in target_dims.items()})

    def forward(self, features: Tensor, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"match/<name>": weight·mean_i[1 - cos(head(h_i), t_i)]}`` per head; targets get no gradient."""
        with torch.autocast(features.device.type, enabled=False):
            features = features.float()
            return {
                f"match/{name}": self.weight
                * (1.0 - F.cosine_similarity(head(features), targets[name].detach().float(), dim=1)).mean()
                for name, head in self.heads.items()
            }

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
