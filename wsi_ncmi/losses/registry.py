"""Decorator registry of training objectives: ``create_loss("focal", gamma=2.0)``.

Every registered loss is an ``nn.Module`` with a class attribute ``input_kind`` in
{"logits", "embedding"} and ``forward(inputs, target, **aux) -> dict[str, Tensor]`` whose
``"loss"`` entry is the total to back-propagate (other entries are named terms, for logging).

This module imports none of the losses: the built-ins register themselves when the package
``wsi_ncmi.losses`` imports them (importing this module runs the package ``__init__`` first), so the
registry is full before anyone can call :func:`create_loss` and there is no import circle.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from wsi_ncmi.errors import UserError

__all__ = ["LossError", "register_loss", "create_loss", "list_losses", "INPUT_KINDS"]

INPUT_KINDS = ("logits", "embedding")
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

T = TypeVar("T", bound=Callable[..., nn.Module])


class LossError(UserError):
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


def _check_kwargs(name: str, factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """Unknown keyword -> :class:`LossError` naming the loss and the arguments it accepts."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        options = [
            n
            for n, p in params.items()
            if n != "self"
            and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        raise LossError(
            f"create_loss: {name} does not take {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(options) or '(none)'}"
        )


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with ``kwargs`` (checked against its signature)."""
    if name not in _REGISTRY:
        raise LossError(f"unknown loss {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


def list_losses() -> list[str]:
    """Sorted names of the registered losses."""
    return sorted(_REGISTRY)
