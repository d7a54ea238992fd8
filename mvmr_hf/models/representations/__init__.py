"""Frozen representations r_k(x) of the non-augmented view, matched by the L3 term (eq. 9), by name.

A representation is an ``nn.Module`` whose ``forward(images01)`` maps float ``(B, 3, H, W)``
images in [0, 1] to a ``(B, ...)`` tensor under ``torch.no_grad()``, batched, on the input's
device, with frozen parameters. It carries three attributes (``docs/architecture.md``):
``name``; ``deterministic`` (the output depends only on the image, so it may be cached);
``gather`` (cheap enough to all-gather for a global-batch dCor; false for very wide ones).

The registry (:mod:`.registry`) follows timm's: :func:`register` adds a factory under a name,
:func:`build` makes a frozen module from a name and options, :func:`available` lists the names. The
built-in hand-crafted representations of section 7 (:mod:`.handcrafted`) are ``pixels``,
``augmented-pixels``, ``scatnet``, ``hog`` and ``lsd``.

Example::

    >>> from mvmr_hf.models import representations
    >>> representations.available()
    ['augmented-pixels', 'hog', 'lsd', 'pixels', 'scatnet']
    >>> hog = representations.build("hog", orientations=24)
    >>> hog(images01).shape                       # (B, 3 * 24, H // 8, W // 8)

    >>> @representations.register("edges")
    ... class Edges(representations.Representation):
    ...     name = "edges"
    ...     def compute(self, images):
    ...         return images.diff(dim=-1).abs()
"""

from __future__ import annotations

from mvmr_hf.models.representations.handcrafted import (
    HOG,
    LSD,
    AugmentedPixels,
    Pixels,
    ScatNet,
    hog_histograms,
    local_std,
)
from mvmr_hf.models.representations.registry import Representation, available, build, register

__all__ = [
    "HOG",
    "LSD",
    "AugmentedPixels",
    "Pixels",
    "Representation",
    "ScatNet",
    "available",
    "build",
    "hog_histograms",
    "local_std",
    "register",
]
