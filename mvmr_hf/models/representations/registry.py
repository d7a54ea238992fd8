"""The registry of representations, a leaf module: the representation modules import it to register.

It follows timm's ``_registry``: :func:`register` adds a factory under a name, :func:`build`
makes a frozen module from a name and options, :func:`available` lists the names.
:class:`Representation` is the base class of the hand-crafted ones. Being a leaf (it imports no
representation), it lets :mod:`mvmr_hf.models.representations` import the built-in modules at its top.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from mvmr_hf.data.augment import check_image_batch
from mvmr_hf.errors import ConfigError

__all__ = ["Representation", "available", "build", "check_options", "register"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

FactoryT = TypeVar("FactoryT", bound=Callable[..., nn.Module])


class Representation(nn.Module):
    """Base class of the hand-crafted representations: checks the input, runs :meth:`compute`.

    ``forward`` validates the ``(B, 3, H, W)`` float batch, casts it to float32 (float64
    input stays float64) and calls :meth:`compute` under ``torch.no_grad()``.
    """

    name: str = ""
    deterministic: bool = True
    gather: bool = True

    def __init__(self) -> None:  # no options unless a subclass declares some
        super().__init__()

    def compute(self, images: Tensor) -> Tensor:
        """The representation of a checked ``(B, 3, H, W)`` float32/float64 batch."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images01: Tensor) -> Tensor:
        check_image_batch(images01, f"The {self.name!r} representation")
        images = images01.detach()
        return self.compute(images if images.dtype == torch.float64 else images.float())


def register(name: str) -> Callable[[FactoryT], FactoryT]:
    """Decorator: register a factory (a class or a function returning an ``nn.Module``) as ``name``."""

    def decorator(factory: FactoryT) -> FactoryT:
        if name in _REGISTRY:
            raise ValueError(f"A representation named {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return decorator


def check_options(factory: Callable[..., object], where: str, *args: object, **kwargs: object) -> None:
    """Raise :class:`ConfigError` unless ``factory(*args, **kwargs)`` matches its signature."""
    signature = inspect.signature(factory)
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        accepted = ", ".join(list(signature.parameters)[len(args) :]) or "no options"
        raise ConfigError(f"Bad options for {where} ({error}); it accepts: {accepted}.") from None


def available() -> list[str]:
    """The registered representation names, sorted."""
    return sorted(_REGISTRY)


def build(name: str, **kwargs: object) -> nn.Module:
    """Build the representation ``name`` with options ``kwargs``, frozen and in eval mode.

    Raises:
        ConfigError: the name is unknown (the message lists the known names and the closest
            one), or an option is not accepted by that representation.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        close = difflib.get_close_matches(str(name), available(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"Unknown representation {name!r}{hint}: choose one of {', '.join(available())}.")
    check_options(factory, f"the {name!r} representation", **kwargs)
    module = factory(**kwargs)
    module.requires_grad_(False)
    return module.eval()
