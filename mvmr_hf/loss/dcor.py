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

Numerics: each batch is centred by its mean, its Gram
matrix is formed in float32 (float64 for float64 input) with autocast off, squared distances
not above the smallest normal number become 0 before the square root, and those distances
get a zero gradient. This gives an exact zero diagonal, finite gradients for duplicate rows
and constant inputs, and no dependence on the scale of the inputs.

Cost: the Gram matrix is accumulated over cache-sized column blocks that are converted and
centred on the fly, and the backward is written by hand (one B x B x D product), so a call
takes close to the two Gram products' time and its extra memory is O(B² + one block) plus
the gradient; ``benchmarks/bench_dcor.py`` measures both.

Example::

    >>> x, y = torch.randn(64, 8192), torch.randn(64, 3, 32, 32)
    >>> distance_correlation(x, y, squared=True)            # eq. 11, biased
    >>> a = centered_distances(x)                             # reuse for several y
    >>> [dcor_from_centered(a, centered_distances(r)) for r in (y, y ** 2)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mvmr_hf.errors import ConfigError

_CPU_BLOCK_BYTES = 4 * 2**20  # a centred float32 column block that stays in the CPU's cache
_ACCELERATOR_BLOCK_BYTES = 64 * 2**20  # fewer, larger products on a GPU

__all__ = [
    "CenteredDistances",
    "centered_distances",
    "check_batch_size",
    "check_estimator",
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


def check_batch_size(size: int, *, unbiased: bool, what: str, fix: str) -> None:
    """ConfigError (a ValueError) unless ``size`` samples suffice for the estimator; ``what`` names them."""
    needed = min_batch_size(unbiased=unbiased)
    if size < needed:
        kind = "bias-corrected" if unbiased else "biased"
        raise ConfigError(
            f"{what} is too small for the {kind} distance correlation, which needs at least {needed} "
            f"samples: {fix}"
        )


def check_estimator(*, unbiased: bool, squared: bool | None, fix: str) -> None:
    """ConfigError (a ValueError) for the unbiased estimator unsquared: it can be negative, R is undefined."""
    if unbiased and squared is False:
        raise ConfigError(
            f"the bias-corrected distance correlation can be negative and is only defined squared: {fix}"
        )


def _check_batch(x: Tensor, *, unbiased: bool) -> None:
    if x.dim() < 1:
        raise ValueError("distance correlation needs a batch: a tensor of shape (B, ...), got a scalar")
    check_batch_size(
        x.shape[0], unbiased=unbiased, what=f"a batch of {x.shape[0]} samples", fix="increase the batch size"
    )


def _sqrt_with_zero(t: Tensor) -> Tensor:
    """sqrt(t) that is exactly 0, with a zero gradient, where t <= 0 (rounding can go below zero)."""
    tiny = torch.finfo(t.dtype).tiny
    return t.clamp(min=tiny).sqrt() * (t > tiny)


def _column_blocks(batch: int, width: int, device: torch.device) -> list[slice]:
    """Column slices of at most one block of float32 values each (``width`` 0 gives one empty slice)."""
    block_bytes = _CPU_BLOCK_BYTES if device.type == "cpu" else _ACCELERATOR_BLOCK_BYTES
    columns = max(1, block_bytes // (4 * batch))
    return [slice(start, min(start + columns, width)) for start in range(0, max(width, 1), columns)]


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off inside where it is on (a no-op context otherwise: it costs more than a small product)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _blocks(
    flat: Tensor, blocks: list[slice], dtype: torch.dtype, mean: Tensor | None = None
) -> Iterator[Tensor]:
    """Each column block of ``flat`` in ``dtype``, minus ``mean``; never a view that aliases ``flat``.

    Several blocks are copied into one reused cache-sized buffer rather than a fresh tensor per
    block: new memory costs page faults, and the extra memory stays one block.
    """
    if len(blocks) == 1 and mean is not None:  # nothing to reuse
        yield torch.sub(flat, mean)
        return
    buffer = flat.new_empty((flat.shape[0], blocks[0].stop - blocks[0].start), dtype=dtype)
    for columns in blocks:
        block = buffer[:, : columns.stop - columns.start].copy_(flat[:, columns])
        yield block if mean is None else block.sub_(mean[columns])


class _DistanceMatrix(torch.autograd.Function):
    """x (B, D) -> its (B, B) Euclidean distance matrix, optionally centred, with a hand-written backward.

    Forward: the column mean, then the Gram matrix of the mean-centred batch accumulated over
    column blocks that are converted and centred on the fly (no centred copy of the batch),
    then ``a_ij = sqrt(g_ii + g_jj - 2 g_ij)`` (exactly 0 on the diagonal and where the square
    is not positive), then the centring of eq. 14 (``"double"``) or U-centring (``"u"``).
    Backward: the centring's adjoint, ``dS = dA / 2a`` (0 where a = 0) and, with
    ``H = dS + dSᵀ``, the gradient ``2 (diag(H·1) - H) X_c``, block by block: one B x B x D
    product instead of autograd's two. Centring x adds no backward term because
    ``diag(H·1) - H`` has zero column sums.
    """

    @staticmethod
    def forward(ctx, x: Tensor, centring: str | None) -> Tensor:  # type: ignore[override]
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        blocks = _column_blocks(batch, flat.shape[1], x.device)
        with _full_precision(x.device):
            if len(blocks) == 1:
                mean = flat.mean(dim=0, dtype=dtype)
            else:  # a bf16 batch's column mean is faster from float32 blocks than in one call
                weights = flat.new_full((batch,), 1.0 / batch, dtype=dtype)
                mean = torch.cat([torch.mv(block.T, weights) for block in _blocks(flat, blocks, dtype)])
            gram = None
            for block in _blocks(flat, blocks, dtype, mean):
                gram = block @ block.T if gram is None else gram.addmm_(block, block.T)
            norms = gram.diagonal()
            # g_ii + g_ii - 2 g_ii is exactly 0: an exact zero diagonal.
            squared = torch.add(norms[:, None], norms[None, :]).sub_(gram, alpha=2)
            distances = F.threshold_(squared, torch.finfo(dtype).tiny, 0.0).sqrt_()
        ctx.save_for_backward(x, mean, distances)
        ctx.centring, ctx.blocks = centring, blocks
        return _centre(distances, centring)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        x, mean, distances = ctx.saved_tensors
        with _full_precision(x.device):
            grad_distances = _centring_adjoint(grad.to(distances.dtype), ctx.centring)
            grad_squared = grad_distances.div_(distances).masked_fill_(distances == 0, 0.0)
            # With Q = dA/a = 2 dS and H = dS + dSᵀ: 2 (diag(H·1) - H) = diag(K·1) - K, K = Q + Qᵀ.
            symmetric = grad_squared + grad_squared.T
            laplacian = torch.diag_embed(symmetric.sum(dim=1)).sub_(symmetric)
            flat = x.reshape(x.shape[0], -1)
            grad_x = torch.empty_like(flat)
            # A float32 gradient is written in place; another dtype goes through one reused buffer.
            buffer = None if x.dtype == mean.dtype else laplacian.new_empty((len(flat), ctx.blocks[0].stop))
            for columns, block in zip(ctx.blocks, _blocks(flat, ctx.blocks, mean.dtype, mean), strict=True):
                if buffer is None:
                    torch.mm(laplacian, block, out=grad_x[:, columns])
                else:
                    grad_x[:, columns] = torch.mm(laplacian, block, out=buffer[:, : block.shape[1]])
        return grad_x.reshape(x.shape), None


def _centre(distances: Tensor, centring: str | None) -> Tensor:
    """Eq. 14's double centring (with means) or U-centring (with sums, zero diagonal) of ``a``."""
    if centring is None:
        return distances
    n = distances.shape[0]
    if centring == "double":
        row = distances.mean(dim=1)
        offset = row - row.mean() / 2  # a_ij - a_i. - a_.j + a_.. = a_ij - c_i - c_j (a is symmetric)
    else:
        row = distances.sum(dim=1)
        offset = row / (n - 2) - row.sum() / (2 * (n - 1) * (n - 2))
    centred = (distances - offset[:, None]).sub_(offset[None, :])
    return centred.fill_diagonal_(0.0) if centring == "u" else centred


def _centring_adjoint(grad: Tensor, centring: str | None) -> Tensor:
    """The gradient with respect to the distances, given the gradient of the centred matrix (a new tensor)."""
    if centring is None:
        return grad.clone()
    n = grad.shape[0]
    if centring == "double":
        rows, columns, total = grad.mean(dim=1), grad.mean(dim=0), grad.mean()
        return (grad - rows[:, None]).sub_(columns[None, :] - total)
    grad = grad.clone().fill_diagonal_(0.0)  # the centred diagonal is constant 0
    rows, columns, total = grad.sum(dim=1), grad.sum(dim=0), grad.sum()
    grad.sub_(rows[:, None] / (n - 2)).sub_(columns[None, :] / (n - 2) - total / ((n - 1) * (n - 2)))
    return grad


def pairwise_distances(x: Tensor) -> Tensor:
    """Exact Euclidean distances between the rows of ``x`` (B, ...) as a (B, B) matrix.

    Computed in float32 (float64 for float64 input) even under autocast, from the Gram
    matrix of the mean-centred batch; the diagonal is exactly zero and gradients are
    finite for duplicate rows.
    """
    return _DistanceMatrix.apply(x, None)


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
    inner = torch.dot(a.reshape(-1), b.reshape(-1))  # one pass, no B x B temporary
    return inner / (n * (n - 3)) if unbiased else inner / (n * n)


def centered_distances(x: Tensor, *, unbiased: bool = False) -> CenteredDistances:
    """Pairwise distances of ``x`` (B, ...) centred for distance covariance.

    Biased (eq. 14): ``A_ij = a_ij - a_i. - a_.j + a_..`` with means. Bias-corrected
    (U-centring): ``A_ij = a_ij - a_i./(n-2) - a_.j/(n-2) + a_../((n-1)(n-2))`` with sums,
    and a zero diagonal.
    """
    _check_batch(x, unbiased=unbiased)
    matrix = _DistanceMatrix.apply(x, "u" if unbiased else "double")
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
    check_estimator(unbiased=a.unbiased, squared=squared, fix="pass squared=True")
    dcov = _dcov_sqr(a.matrix, b.matrix, unbiased=a.unbiased)
    # Each scale on its own: the product of the two variances underflows float32 for inputs of scale
    # 1e-10 and below (the variances are fourth powers of the input scale), and dCor dropped to 0.
    tiny = torch.finfo(dcov.dtype).tiny
    denominator = a.variance.clamp(min=tiny).sqrt() * b.variance.clamp(min=tiny).sqrt()
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
        raise ValueError(f"x and y must hold the same number of samples, got {x.shape[0]} and {y.shape[0]}")
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
