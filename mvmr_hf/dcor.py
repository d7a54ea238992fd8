"""Distance correlation between batches of any shape (paper, appendix A, eq. 11-14).

For a batch ``x`` of ``B`` samples (any trailing shape, flattened per sample) the pairwise
Euclidean distances ``a_ij = ||x_i - x_j||`` are double-centred,
``A_ij = a_ij - a_i. - a_.j + a_..`` (eq. 14), and

    dCov²(x, y) = mean(A ∘ B)                        (eq. 12)
    dCor(x, y)  = dCov²(x, y) / sqrt(dCov²(x, x) · dCov²(y, y))   (eq. 11)

Eq. 11 is the *squared* distance correlation R² (``squared=True``); ``squared=False``
returns R = sqrt(R²), which is what the `dcor` package calls ``distance_correlation``.
``unbiased=True`` uses the U-centred, bias-corrected estimator of Székely & Rizzo (2014),
which stays near 0 for independent high-dimensional data where the biased one tends to 1;
it can be negative, so it exists only squared.

Numerics (``../shared/notes/dcor-numerics.md``): each batch is centred by its mean, its Gram
matrix is formed in float32 (float64 for float64 input) with autocast off, squared distances
are clamped at the smallest normal number before the square root, and distances whose
square is not positive (the diagonal among them) are multiplied by zero. This gives an
exact zero diagonal, finite gradients for duplicate rows and constant inputs, no
dependence on the scale of the inputs, and O(B² + B·D) memory.

Example::

    >>> x, y = torch.randn(64, 8192), torch.randn(64, 3, 32, 32)
    >>> distance_correlation(x, y, squared=True)            # eq. 11, biased
    >>> a = centered_distances(x)                             # reuse for several y
    >>> [dcor_from_centered(a, centered_distances(r)) for r in (y, y ** 2)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "CenteredDistances",
    "centered_distances",
    "dcor_from_centered",
    "distance_correlation",
    "gather_no_grad",
    "gather_with_grad",
    "min_batch_size",
    "pairwise_distances",
]


def min_batch_size(*, unbiased: bool) -> int:
    """Smallest batch the estimator is defined for: 2 (biased) or 4 (bias-corrected)."""
    return 4 if unbiased else 2


def _check_batch(x: Tensor, *, unbiased: bool) -> None:
    if x.dim() < 1:
        raise ValueError("distance correlation needs a batch: a tensor of shape (B, ...), got a scalar")
    needed = min_batch_size(unbiased=unbiased)
    if x.shape[0] < needed:
        kind = "bias-corrected" if unbiased else "biased"
        raise ValueError(
            f"the {kind} distance correlation needs a batch of at least {needed} samples, got {x.shape[0]}: "
            "increase the batch size"
        )


def _sqrt_with_zero(t: Tensor) -> Tensor:
    """sqrt(t) that is exactly 0, with a zero gradient, where t <= 0 (rounding can go below zero)."""
    tiny = torch.finfo(t.dtype).tiny
    return t.clamp(min=tiny).sqrt() * (t > tiny)


def pairwise_distances(x: Tensor) -> Tensor:
    """Exact Euclidean distances between the rows of ``x`` (B, ...) as a (B, B) matrix.

    Computed in float32 (float64 for float64 input) even under autocast, from the Gram
    matrix of the mean-centred batch; the diagonal is exactly zero and gradients are
    finite for duplicate rows.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        flat = x.reshape(x.shape[0], -1).to(dtype)
        flat = flat - flat.mean(dim=0, keepdim=True)
        gram = flat @ flat.T
        squared_norms = gram.diagonal()
        squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
        # The diagonal is 2·g_ii - 2·g_ii = 0 exactly.
        return _sqrt_with_zero(squared)


@dataclass(frozen=True)
class CenteredDistances:
    """A batch's centred distance matrix and its distance variance, reusable against many others.

    Attributes:
        matrix: (B, B) double-centred (eq. 14) or U-centred distance matrix.
        variance: dCov²(x, x), the batch's own (squared) distance variance.
        unbiased: whether ``matrix`` is U-centred.
    """

    matrix: Tensor
    variance: Tensor
    unbiased: bool


def _dcov_sqr(a: Tensor, b: Tensor, *, unbiased: bool) -> Tensor:
    n = a.shape[0]
    if unbiased:
        return (a * b).sum() / (n * (n - 3))
    return (a * b).mean()


def centered_distances(x: Tensor, *, unbiased: bool = False) -> CenteredDistances:
    """Pairwise distances of ``x`` (B, ...) centred for distance covariance.

    Biased (eq. 14): ``A_ij = a_ij - a_i. - a_.j + a_..`` with means. Bias-corrected
    (U-centring): ``A_ij = a_ij - a_i./(n-2) - a_.j/(n-2) + a_../((n-1)(n-2))`` with sums,
    and a zero diagonal.
    """
    _check_batch(x, unbiased=unbiased)
    distances = pairwise_distances(x)
    n = distances.shape[0]
    if unbiased:
        row = distances.sum(dim=1, keepdim=True)
        total = row.sum()
        matrix = distances - row / (n - 2) - row.T / (n - 2) + total / ((n - 1) * (n - 2))
        matrix = matrix * (1.0 - torch.eye(n, dtype=matrix.dtype, device=matrix.device))
    else:
        row = distances.mean(dim=1, keepdim=True)
        matrix = distances - row - row.T + row.mean()
    return CenteredDistances(matrix, _dcov_sqr(matrix, matrix, unbiased=unbiased), unbiased)


def dcor_from_centered(a: CenteredDistances, b: CenteredDistances, *, squared: bool = False) -> Tensor:
    """Distance correlation (eq. 11) from two centred distance matrices of the same batch.

    Returns R² when ``squared`` (eq. 11 as printed), else R. A constant batch has zero
    distance variance; its correlation with anything is 0.
    """
    if a.unbiased != b.unbiased:
        raise ValueError("both centred distance matrices must use the same estimator (biased or unbiased)")
    if a.matrix.shape != b.matrix.shape:
        raise ValueError(
            f"the two batches differ in size ({a.matrix.shape[0]} and {b.matrix.shape[0]} samples): "
            "distance correlation pairs sample i of one with sample i of the other"
        )
    if a.unbiased and not squared:
        raise ValueError(
            "the bias-corrected distance correlation can be negative and is only defined squared: "
            "pass squared=True"
        )
    dcov = _dcov_sqr(a.matrix, b.matrix, unbiased=a.unbiased)
    denominator = (a.variance * b.variance).clamp(min=torch.finfo(dcov.dtype).tiny).sqrt()
    r_squared = dcov / denominator
    return r_squared if squared else _sqrt_with_zero(r_squared)


def distance_correlation(x: Tensor, y: Tensor, *, squared: bool = False, unbiased: bool = False) -> Tensor:
    """Distance correlation between ``x`` (B, ...) and ``y`` (B, ...), a scalar tensor.

    Trailing shapes may differ (each sample is flattened). With ``unbiased=False`` this
    equals ``dcor.distance_correlation`` (``squared=True``: ``dcor.distance_correlation_sqr``,
    the paper's eq. 11); with ``unbiased=True, squared=True`` it equals
    ``dcor.u_distance_correlation_sqr``. Raises ``ValueError`` for B < 2 (B < 4 unbiased).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}"
        )
    return dcor_from_centered(
        centered_distances(x, unbiased=unbiased), centered_distances(y, unbiased=unbiased), squared=squared
    )


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather(x: Tensor) -> list[Tensor]:
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    if any(int(size) != x.shape[0] for size in sizes):
        raise ValueError(
            f"every process must hold the same number of samples to gather a global batch, got "
            f"{[int(s) for s in sizes]}: use drop_last=True or an evenly divisible batch"
        )
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return parts


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; all-reduce (sum) the gradient backward and keep the own slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(_all_gather(x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, with gradients (identity on one process).

    Every process then holds the same global batch and computes the same loss. The
    backward sums the gradients of all processes and keeps the local slice, so after
    data-parallel gradient *averaging* the update equals a one-process run on the
    concatenated batch.
    """
    if _distributed_world() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, without gradients (identity on one process)."""
    if _distributed_world() == 1:
        return x
    return torch.cat(_all_gather(x))
