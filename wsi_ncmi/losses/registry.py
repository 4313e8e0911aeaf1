"""Decorator registry of training objectives: ``create_loss("focal", gamma=2.0)``.

Every registered loss is an ``nn.Module`` with a class attribute ``input_kind`` in
{"logits", "embedding", "attention"} and ``forward(inputs, target, **aux) -> dict[str, Tensor]`` whose
``"loss"`` entry is the total to back-propagate (other entries are named terms, for logging).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["LossError", "register_loss", "create_loss", "list_losses", "INPUT_KINDS"]

INPUT_KINDS = ("logits", "embedding", "attention")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

T = TypeVar("T", bound=Callable[..., nn.Module])


class LossError(ValueError):
    """Unknown loss name, bad loss argument or bad loss input."""


def register_loss(name: str) -> Callable[[T], T]:
    """Class decorator: register ``cls`` under ``name`` (names are unique)."""

    def deco(cls: T) -> T:
        if name in _REGISTRY:
            raise LossError(f"loss {name!r} is already registered")
        kind = getattr(cls, "input_kind", None)
        if kind not in INPUT_KINDS:
            raise LossError(f"loss {name!r}: input_kind must be one of {INPUT_KINDS}, got {kind!r}")
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_builtins() -> None:
    # importing the package registers the built-in losses (decorators run at import)
    from . import attention, classification, contrastive, ncmi  # noqa: F401


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``kwargs``."""
    _ensure_builtins()
    if name not in _REGISTRY:
        raise LossError(f"unknown loss {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_losses() -> list[str]:
    """Sorted names of the registered losses."""
    _ensure_builtins()
    return sorted(_REGISTRY)
