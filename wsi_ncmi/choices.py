"""Fixed choices: one runtime check of every ``Literal[...]``-annotated argument of a callable.

An option that takes one of a fixed set of values is annotated with a ``Literal[...]`` alias defined once,
next to the tuple or registry it mirrors. jsonargparse then validates it on the command line and ``--help``
lists the choices; :func:`check_choices` gives the Python API the same refusal, one line naming the option,
the bad value and the allowed values. Open registries (models, losses, backbones) are not ``Literal``: they
check their own names.

A leaf: standard library and :mod:`wsi_ncmi.errors` only.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from wsi_ncmi.errors import UserError

__all__ = ["ChoiceError", "check_choices", "literal_choices"]


class ChoiceError(UserError):
    """A value outside the fixed choices of an option (the caller may name its own error class instead)."""


def literal_choices(tp: Any) -> tuple[Any, ...] | None:
    """The values a ``Literal`` annotation allows (also the ``Literal`` arms of a union), or None when ``tp``
    holds no ``Literal``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        found = [literal_choices(arm) for arm in typing.get_args(tp)]
        if any(f is not None for f in found):
            return tuple(v for f in found if f is not None for v in f)
    return None


def _other_arms(tp: Any) -> tuple[Any, ...]:
    """The arms of a union annotation that are not ``Literal`` (None spelled ``NoneType``)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if typing.get_origin(a) is not Literal)
    return ()


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _fits(value: Any, choices: tuple[Any, ...], others: tuple[Any, ...]) -> bool:
    if any(value is c or (type(value) is type(c) and value == c) for c in choices):
        return True
    for arm in others:
        cls = typing.get_origin(arm) or arm
        if isinstance(cls, type) and isinstance(value, cls) and not (cls is int and isinstance(value, bool)):
            return True
    return False


@functools.cache
def _literal_params(target: Callable[..., Any]) -> dict[str, tuple[tuple[Any, ...], tuple[Any, ...]]]:
    """name -> (Literal choices, other union arms) for every parameter of ``target`` annotated with a Literal."""
    hints = typing.get_type_hints(target)
    out = {}
    for name in inspect.signature(target).parameters:
        choices = literal_choices(hints.get(name))
        if choices is not None:
            out[name] = (choices, _other_arms(hints[name]))
    return out


def check_choices(func: Callable[..., Any], values: Mapping[str, Any], where: str,
                  error_cls: Callable[[str], Exception] = ChoiceError) -> None:
    """Raise ``error_cls`` unless every ``Literal``-annotated parameter of ``func`` (a class: its ``__init__``)
    present in ``values`` holds one of its choices (or a value of another arm of its union, e.g. None).

    ``values`` maps argument names to values (``locals()`` at the top of a constructor works: other keys are
    ignored). The message: ``"{where}: {name} must be one of {choices}, got {value!r}"``.
    """
    target = func.__init__ if inspect.isclass(func) else func  # type: ignore[misc]
    for name, (choices, others) in _literal_params(target).items():
        if name in values and not _fits(values[name], choices, others):
            extra = [_type_name(a) for a in others if a is not type(None)]
            also = f" (or a {' / '.join(extra)})" if extra else ""
            raise error_cls(f"{where}: {name} must be one of {choices}{also}, got {values[name]!r}")
