"""Distance correlation against the `dcor` package (the independent reference) and by hand."""

from __future__ import annotations

import dcor as dcor_reference
import numpy as np
import pytest
import torch

import mvmr_hf.loss.dcor as dcor_module
from mvmr_hf.loss.dcor import (
    centered_distances,
    dcor_from_centered,
    distance_correlation,
    pairwise_distances,
)

SHAPES = [
    ((16, 3), (16, 5)),
    ((32, 64), (32, 1)),
    ((10, 2, 3, 4), (10, 7)),
    ((50, 512), (50, 3, 8, 8)),
]


def _dependent_pair(shape_x, shape_y, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, generator=generator, dtype=torch.float64)
    flat = x.reshape(x.shape[0], -1)
    mixing = torch.randn(flat.shape[1], int(np.prod(shape_y[1:])), generator=generator, dtype=torch.float64)
    y = torch.tanh(flat @ mixing) + 0.5 * torch.randn(
        shape_y[0], mixing.shape[1], generator=generator, dtype=torch.float64
    )
    return x, y.reshape(shape_y)


def _np(t):
    return t.reshape(t.shape[0], -1).numpy()


@pytest.mark.parametrize(("shape_x", "shape_y"), SHAPES)
def test_matches_dcor_package(shape_x, shape_y):
    x, y = _dependent_pair(shape_x, shape_y)
    cases = [
        (dict(), dcor_reference.distance_correlation),
        (dict(squared=True), dcor_reference.distance_correlation_sqr),
        (dict(squared=True, unbiased=True), dcor_reference.u_distance_correlation_sqr),
    ]
    for kwargs, reference in cases:
        expected = reference(_np(x), _np(y))
        assert distance_correlation(x, y, **kwargs).item() == pytest.approx(expected, abs=1e-6), kwargs


def test_float32_close_to_float64_reference():
    x, y = _dependent_pair((64, 256), (64, 32), seed=3)
    expected = dcor_reference.distance_correlation_sqr(_np(x), _np(y))
    value = distance_correlation(x.float(), y.float(), squared=True)
    assert value.item() == pytest.approx(expected, abs=1e-5)


def test_hand_computed_two_by_two():
    # Two samples: a = [[0, d], [d, 0]] centres to [[-d/2, d/2], [d/2, -d/2]]; every pair is
    # perfectly dependent, so R² = R = 1.
    x = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [2.0, 5.0]], dtype=torch.float64)
    centred = centered_distances(x)
    assert torch.allclose(centred.matrix, torch.tensor([[-1.5, 1.5], [1.5, -1.5]], dtype=torch.float64))
    assert centred.variance.item() == pytest.approx(1.5**2)
    assert distance_correlation(x, y).item() == pytest.approx(1.0)


def test_pairwise_distances_exact_zero_diagonal_and_values():
    x = torch.randn(20, 100) * 1e3 + 5e3
    d = pairwise_distances(x)
    assert torch.equal(d.diagonal(), torch.zeros(20))
    expected = torch.cdist(x.double(), x.double())
    assert torch.allclose(d.double(), expected, rtol=1e-5, atol=1e-3)


def test_scale_invariance():
    x, y = _dependent_pair((24, 12), (24, 6), seed=1)
    base = distance_correlation(x, y).item()
    for scale in (1e-6, 1e6):
        assert distance_correlation(x * scale, y / scale).item() == pytest.approx(base, abs=1e-9)


@pytest.mark.parametrize("unbiased", [False, True])
def test_tiny_float32_inputs_keep_their_correlation(unbiased):
    """Scale 1e-12 in float32: each distance variance is ~1e-24, their product would underflow (~1e-48)."""
    x, y = _dependent_pair((24, 12), (24, 6), seed=1)
    reference = (
        dcor_reference.u_distance_correlation_sqr if unbiased else dcor_reference.distance_correlation_sqr
    )
    expected = reference(x.numpy(), y.numpy())
    for scale in (1e-12, 1e-6):
        tiny = distance_correlation(
            (x * scale).float(), (y * scale).float(), squared=True, unbiased=unbiased
        ).item()
        assert tiny == pytest.approx(expected, rel=1e-4), scale


@pytest.mark.parametrize("unbiased", [False, True])
def test_gradients_match_finite_differences(unbiased):
    x, y = _dependent_pair((8, 3), (8, 2), seed=2)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: distance_correlation(t, y, squared=True, unbiased=unbiased), (x,), eps=1e-6, atol=1e-6
    )


def test_gradients_finite_with_duplicate_rows_and_constant_input():
    x = torch.randn(6, 4)
    x = torch.cat([x, x[:2]]).requires_grad_(True)  # rows 6, 7 duplicate rows 0, 1
    y = torch.randn(8, 3)
    distance_correlation(x, y).backward()
    assert torch.isfinite(x.grad).all()

    constant = torch.ones(8, 5, requires_grad=True)
    value = distance_correlation(constant, y)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(constant.grad).all()
    assert dcor_reference.distance_correlation(constant.detach().numpy(), y.numpy()) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize(("unbiased", "squared"), [(False, False), (False, True), (True, True)])
def test_cuda_matches_dcor_package_and_its_gradient_the_cpus(unbiased, squared):
    x, y = _dependent_pair((256, 3 * 32 * 32), (256, 512), seed=5)
    reference = {
        (False, False): dcor_reference.distance_correlation,
        (False, True): dcor_reference.distance_correlation_sqr,
        (True, True): dcor_reference.u_distance_correlation_sqr,
    }[unbiased, squared](_np(x), _np(y))
    gradients = []
    for device in ("cpu", "cuda"):
        x_device = x.float().to(device).requires_grad_(True)
        value = distance_correlation(x_device, y.float().to(device), unbiased=unbiased, squared=squared)
        assert value.item() == pytest.approx(reference, abs=1e-5)
        value.backward()
        gradients.append(x_device.grad.cpu())
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-3, atol=1e-4 * gradients[0].abs().max())
    x32, y32 = x.float().cuda(), y.float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = distance_correlation(x32 @ torch.eye(x32.shape[1], device="cuda"), y32, squared=squared)
    assert low.dtype == torch.float32
    assert abs(low.item() - distance_correlation(x32, y32, squared=squared).item()) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_stays_within_1e5_of_fp32(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3 * 32 * 32, generator=generator)
    y = torch.rand(64, 256, generator=generator) + x[:, :256]
    reference = distance_correlation(x, y, squared=True)
    weight = torch.eye(256)
    with torch.autocast("cpu", dtype=dtype):
        y_low = y @ weight  # a low-precision activation, as a network under autocast produces
        value = distance_correlation(x, y_low, squared=True)
    assert value.dtype == torch.float32
    exact_low = distance_correlation(x, y.to(dtype), squared=True)  # same rounded input, fp32 maths
    assert abs(value.item() - exact_low.item()) <= 1e-5
    assert abs(value.item() - reference.item()) <= 1e-2


def test_reusing_a_centred_matrix_against_several_representations():
    x, y = _dependent_pair((30, 16), (30, 8), seed=4)
    z = y**2
    a = centered_distances(x)
    for other in (y, z):
        expected = dcor_reference.distance_correlation(_np(x), _np(other))
        assert dcor_from_centered(a, centered_distances(other)).item() == pytest.approx(expected, abs=1e-6)


def test_memory_is_quadratic_in_batch_not_batch_squared_times_width():
    # A B x B x D intermediate for B=256, D=200_000 would need 52 GB; the Gram path needs ~200 MB.
    x = torch.randn(256, 200_000)
    assert distance_correlation(x, x[:, :10]).item() > 0


@pytest.mark.parametrize(("batch", "unbiased"), [(1, False), (3, True)])
def test_too_small_batch_raises(batch, unbiased):
    with pytest.raises(ValueError, match=r"at least (2|4) samples"):
        distance_correlation(torch.randn(batch, 3), torch.randn(batch, 3), squared=True, unbiased=unbiased)


def test_mismatched_batches_and_unsquared_unbiased_raise():
    with pytest.raises(ValueError, match="same number of samples"):
        distance_correlation(torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="only defined squared"):
        distance_correlation(torch.randn(5, 3), torch.randn(5, 3), unbiased=True)


@pytest.mark.parametrize("unbiased", [False, True])
def test_column_blocks_give_the_reference_value_and_gradient(monkeypatch, unbiased):
    # Blocks of 3 columns (the last one partial) instead of one cache-sized block.
    monkeypatch.setattr(dcor_module, "_CPU_BLOCK_BYTES", 4 * 3 * 8)
    x, y = _dependent_pair((8, 2, 5), (8, 7), seed=5)
    expected = (
        dcor_reference.u_distance_correlation_sqr if unbiased else dcor_reference.distance_correlation_sqr
    )(_np(x), _np(y))
    assert distance_correlation(x, y, squared=True, unbiased=unbiased).item() == pytest.approx(
        expected, abs=1e-9
    )
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: distance_correlation(t, y, squared=True, unbiased=unbiased), (x,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_input_gets_a_gradient_of_its_own_dtype(monkeypatch, dtype):
    monkeypatch.setattr(dcor_module, "_CPU_BLOCK_BYTES", 4 * 3 * 8)
    x64, y64 = _dependent_pair((8, 10), (8, 4), seed=6)
    x = x64.to(dtype).requires_grad_(True)
    distance_correlation(x, y64.float(), squared=True).backward()
    # The reference: the same rounded input in float64, differentiated by autograd's own formulas.
    exact = x.detach().double().requires_grad_(True)
    flat = exact - exact.mean(0)
    distances = (flat[:, None] - flat[None]).square().sum(-1).add(torch.eye(8)).sqrt() * (1 - torch.eye(8))

    def centred(a):
        return a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()

    a, b = centred(distances), centred(torch.cdist(y64, y64))
    ((a * b).mean() / ((a * a).mean() * (b * b).mean()).sqrt()).backward()
    assert x.grad.dtype == dtype
    assert torch.allclose(x.grad.double(), exact.grad, rtol=1e-2, atol=1e-4)
