"""Name -> aggregator registry: ``create_model("abmil", in_dim=1024, num_classes=4)``."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import TypeVar

from .base import MILAggregator, MILConfigError

logger = logging.getLogger(__name__)

__all__ = ["create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., MILAggregator]] = {}
F = TypeVar("F", bound=Callable[..., MILAggregator])


def register_model(name: str) -> Callable[[F], F]:
    """Class/factory decorator: ``@register_model("abmil")``. A name can be registered once."""
    key = name.lower()

    def deco(fn: F) -> F:
        if key in _REGISTRY and _REGISTRY[key] is not fn:
            raise MILConfigError(f"register_model: name {name!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered aggregator names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, in_dim: int, num_classes: int, **kwargs: object) -> MILAggregator:
    """Build a registered aggregator; unknown names raise ``ValueError`` listing the available ones."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise MILConfigError(f"create_model: unknown model {name!r}; available: {', '.join(list_models())}")
    factory = _REGISTRY[key]
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = sorted(k for k in kwargs if k not in accepted) if not takes_any else []
    if unknown:
        options = [n for n, p in accepted.items() if n not in ("in_dim", "num_classes", "self")
                   and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        raise MILConfigError(
            f"create_model: {key} does not take {', '.join(map(repr, unknown))}; its options are: {', '.join(options)}"
        )
    model = factory(in_dim=in_dim, num_classes=num_classes, **kwargs)
    logger.debug("created %s (in_dim=%d, num_classes=%d, embed_dim=%d)", key, in_dim, num_classes,
                 model.embed_dim)
    return model
