"""The 2-D scattering transform of kymatio (the paper's ScatNet), with every wavelet of a scale at once.

Same Morlet filters (``kymatio.scattering2d.filter_bank``), reflection padding, paths and
output order as ``kymatio``'s ``Scattering2D``; the results agree to float32 rounding
(``tests/models/test_representations.py`` checks them against kymatio's NumPy backend). kymatio's
torch backend runs one wavelet per call on the whole batch; here, for a chunk of images that
fits in the CPU cache, all L wavelets of a scale are applied together and each filtered
spectrum is periodized (the Fourier side of subsampling) alias by alias with ``addcmul_``,
never materialising the full-resolution product. The last order's low-pass uses real FFTs
and subsamples in space. ``benchmarks/bench_representations.py`` compares it with kymatio.
"""

from __future__ import annotations

import torch
from kymatio.scattering2d.backend.torch_backend import Pad
from kymatio.scattering2d.filter_bank import filter_bank
from kymatio.scattering2d.utils import compute_padding
from torch import Tensor, nn

__all__ = ["Scattering2D"]

_CPU_CHUNK_BYTES = 8 * 2**20  # complex second-order spectra of one chunk of images: cache-sized
_ACCELERATOR_CHUNK_BYTES = 512 * 2**20


def _filter_periodized(spectrum: Tensor, filters: Tensor, k: int) -> Tensor:
    """``periodize_k(spectrum[..., None, :, :] * filters)``: (..., M, N) x (T, M, N) -> (..., T, M/k, N/k).

    Periodizing by k (summing the k² aliases) is the Fourier side of keeping every k-th pixel;
    the 1/k² of the mean is folded into ``filters``.
    """
    rows, columns = filters.shape[-2] // k, filters.shape[-1] // k
    out = None
    for a in range(k):
        for b in range(k):
            window = (..., slice(a * rows, (a + 1) * rows), slice(b * columns, (b + 1) * columns))
            part, weights = spectrum[..., None, :, :][window], filters[window]
            out = part * weights if out is None else out.addcmul_(part, weights)
    return out


class Scattering2D(nn.Module):
    """Scattering coefficients of orders 0 to ``max_order`` for (..., H, W) maps: (..., K, H/2^J, W/2^J).

    ``K = 1 + J·L (+ L²·J·(J-1)/2 for order 2)``, in kymatio's order: the low-pass, then the
    first order by (scale, angle), then the second order by (scale 1, angle 1, scale 2, angle 2).

    Args:
        J: the number of scales; the output is subsampled by 2^J (paper, section 7: J = 2).
        L: the number of wavelet angles (paper, section 7: L = 8).
        max_order: the highest order computed: 2 adds the second order, a lower value stops at the first.
        height: H of the maps this module is built for (the filters are made for its padded size).
        width: W of the maps this module is built for.
    """

    def __init__(self, J: int, L: int, max_order: int, height: int, width: int) -> None:  # noqa: N803
        super().__init__()
        self.J, self.L, self.max_order = J, L, max_order
        self.padded = compute_padding(height, width, J)
        rows, columns = self.padded[0] - height, self.padded[1] - width
        self.pad = Pad([rows // 2, (rows + 1) // 2, columns // 2, (columns + 1) // 2], [height, width])
        bank = filter_bank(*self.padded, J, L)
        for j, level in enumerate(bank["phi"]["levels"]):  # the low-pass at resolution 2^-j
            self.register_buffer(f"phi{j}", torch.from_numpy(level).float(), persistent=False)
        for j in range(J):
            wavelets = [psi for psi in bank["psi"] if psi["j"] == j]  # by angle
            for resolution in range(len(wavelets[0]["levels"])):
                k = 2 ** (j - resolution)  # applied to spectra at 2^-resolution, periodized by k
                stacked = torch.stack([torch.from_numpy(psi["levels"][resolution]) for psi in wavelets])
                self.register_buffer(f"psi{j}_{resolution}", stacked.float() / k**2, persistent=False)

    def _wavelet_modulus(self, spectrum: Tensor, j: int, resolution: int) -> Tensor:
        """|x ⋆ ψ_j,θ| for all L angles θ, subsampled to resolution 2^-j: (..., L, M/2^j, N/2^j)."""
        filters = getattr(self, f"psi{j}_{resolution}")
        return torch.fft.ifft2(_filter_periodized(spectrum, filters, 2 ** (j - resolution))).abs()

    def _low_pass(self, spectrum: Tensor, resolution: int) -> Tensor:
        """x ⋆ φ_J subsampled to 2^-J and unpadded, from x's spectrum at resolution 2^-resolution."""
        k = 2 ** (self.J - resolution)
        phi = getattr(self, f"phi{resolution}")[None] / k**2
        return torch.fft.ifft2(_filter_periodized(spectrum, phi, k)[..., 0, :, :]).real[..., 1:-1, 1:-1]

    def _low_pass_real(self, signal: Tensor, resolution: int) -> Tensor:
        """:meth:`_low_pass` of a real map at resolution 2^-resolution, by real FFTs (φ is real and even)."""
        k = 2 ** (self.J - resolution)
        phi = getattr(self, f"phi{resolution}")
        rows, columns = phi.shape
        half = phi[:, : columns // 2 + 1]
        smooth = torch.fft.irfft2(torch.fft.rfft2(signal) * half, s=(rows, columns))
        return smooth[..., ::k, ::k][..., 1:-1, 1:-1]

    def _chunk(self, maps: Tensor) -> Tensor:
        spectrum = torch.fft.fft2(self.pad(maps)[..., 0])
        orders = [self._low_pass(spectrum, 0)[:, None]]
        second = []
        for j1 in range(self.J):
            first = self._wavelet_modulus(spectrum, j1, 0)  # (n, L, ...)
            if self.max_order < 2 or j1 == self.J - 1:  # no second order starts here
                orders.append(self._low_pass_real(first, j1))
                continue
            first_spectrum = torch.fft.fft2(first)
            orders.append(self._low_pass(first_spectrum, j1))
            paths = [
                self._low_pass_real(self._wavelet_modulus(first_spectrum, j2, j1), j2)
                for j2 in range(j1 + 1, self.J)
            ]  # each (n, L angle 1, L angle 2, h, w)
            second.append(torch.cat(paths, dim=2).flatten(1, 2))
        return torch.cat(orders + second, dim=1)

    def forward(self, maps: Tensor) -> Tensor:
        *batch, height, width = maps.shape
        flat = maps.reshape(-1, height, width)
        budget = _CPU_CHUNK_BYTES if maps.device.type == "cpu" else _ACCELERATOR_CHUNK_BYTES
        per_map = self.L**2 * self.padded[0] * self.padded[1] * 2  # complex64, periodized by 2
        out = torch.cat([self._chunk(part) for part in flat.split(max(1, budget // per_map))])
        return out.reshape(*batch, *out.shape[-3:])
