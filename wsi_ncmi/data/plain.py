"""Plain values: what a checkpoint's hyper-parameters and every free-form options dict may hold.

A checkpoint, like a slide or a bag, comes from someone else. Its hyper-parameters are *data*: numbers, strings,
booleans, None, and lists / string-keyed dicts of those. Nothing in them names code: a ``class_path`` /
``init_args`` (jsonargparse's way of naming a class to build) is refused wherever it appears, also inside a
kwargs dict of a YAML config, where it is never needed.

* :data:`PlainKwargs` is the type of every ``*_kwargs`` option (``model_kwargs``, ``loss_kwargs``,
  ``ncmi_kwargs``): jsonargparse validates it and never instantiates anything from it.
* :func:`check_plain` refuses anything else in a value (one line naming where); :func:`check_plain_kwargs` checks
  a module's ``*_kwargs`` options at once, raising the module's own error class.
* :func:`check_signature_values` checks a mapping of keyword arguments against a callable's signature: every
  key known, every value plain and of the annotated type (``int``, ``float``, ``str``, ``bool``, unions,
  ``Literal``, ``list[...]``, ``dict[str, ...]``, ``Any`` = any plain value).

A leaf: standard library and :mod:`wsi_ncmi.errors` only.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, Union

from wsi_ncmi.errors import UserError

__all__ = ["CODE_KEYS", "PlainKwargs", "PlainValue", "PlainValueError", "Scalar", "check_plain",
           "check_plain_kwargs", "check_signature_values"]

Scalar = Union[bool, int, float, str, None]  # noqa: UP007 - jsonargparse reads this annotation at run time
PlainValue = Union[bool, int, float, str, None, list[Scalar], dict[str, Scalar]]  # noqa: UP007
PlainKwargs = dict[str, PlainValue]

#: keys that name code to build in jsonargparse / Lightning configs: refused anywhere in a plain value
CODE_KEYS = frozenset({"class_path", "init_args", "dict_kwargs", "_class_path", "__class__", "__init__"})
_MAX_DEPTH = 4
_MAX_ITEMS = 100_000
_MAX_TEXT = 80  # how much of an offending value a message quotes


class PlainValueError(UserError):
    """A value that is not plain data (or not of the expected type); the message names where it was found."""


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def check_plain(value: Any, where: str, _depth: int = 0) -> None:
    """Raise :class:`PlainValueError` unless ``value`` is plain data (see the module docstring).

    ``where`` names the value in the message (e.g. ``"runs/a/best.ckpt: hyper_parameters.model_kwargs"``).
    """
    if _depth > _MAX_DEPTH:
        raise PlainValueError(f"{where}: nested more than {_MAX_DEPTH} levels deep; options are plain values")
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        if len(value) > _MAX_ITEMS:
            raise PlainValueError(f"{where}: a list of {len(value)} items (more than {_MAX_ITEMS})")
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", _depth + 1)
        return
    if isinstance(value, Mapping):
        if len(value) > _MAX_ITEMS:
            raise PlainValueError(f"{where}: a dict of {len(value)} keys (more than {_MAX_ITEMS})")
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise PlainValueError(f"{where}: key {_quote(key)} is not a string")
            if key in CODE_KEYS:
                raise PlainValueError(
                    f"{where}.{key}: refused: {key!r} names code to import or build; options hold plain values "
                    f"(numbers, strings, lists, dicts), a class is chosen by its registry name"
                )
            check_plain(item, f"{where}.{key}", _depth + 1)
        return
    raise PlainValueError(f"{where}: a {type(value).__name__} is not a plain value (numbers, strings, lists, dicts)")



def check_plain_kwargs(options: Mapping[str, Any], prefix: str, error: type[Exception]) -> None:
    """:func:`check_plain` of each ``{name: value}`` (named ``<prefix><name>``), raised as ``error`` in one line."""
    for name, value in options.items():
        try:
            check_plain(value, f"{prefix}{name}")
        except PlainValueError as err:
            raise error(str(err)) from None

def _is_pathlike(tp: Any) -> bool:
    return tp is os.PathLike or typing.get_origin(tp) is os.PathLike


def _matches(value: Any, tp: Any) -> bool:
    """Whether the plain ``value`` fits the annotation ``tp`` (ints count as floats; bools are not ints)."""
    if tp is Any or tp is object:
        return True
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str or _is_pathlike(tp):
        return isinstance(value, str)
    args = typing.get_args(tp)
    if origin in (list, tuple, cabc.Sequence, cabc.MutableSequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        if not isinstance(value, Mapping):
            return False
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        return all(_matches(k, key_tp) and _matches(v, val_tp) for k, v in value.items())
    return False  # a tensor, a DataFrame, a callable ...: never in a checkpoint's plain hyper-parameters


def _type_name(tp: Any) -> str:
    text = str(tp).replace("typing.", "").replace("NoneType", "None")
    return getattr(tp, "__name__", text) if typing.get_origin(tp) is None else text


def check_signature_values(func: Callable[..., Any], values: Mapping[str, Any], where: str,
                           ignore: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``values`` as a dict of keyword arguments of ``func`` (a class: its ``__init__``), each checked.

    Every key must be a parameter of ``func``, every value plain (:func:`check_plain`) and of the parameter's
    annotated type. ``ignore`` maps keys that may be present with one exact value (Lightning's bookkeeping,
    e.g. ``_instantiator``) to that value; they are dropped. Raises :class:`PlainValueError` naming
    ``where`` and the key.
    """
    target = func.__init__ if inspect.isclass(func) else func  # type: ignore[misc]
    params = {n: p for n, p in inspect.signature(target).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    hints = typing.get_type_hints(target)
    ignore = dict(ignore or {})
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise PlainValueError(f"{where}: key {_quote(key)} is not a string")
        if key in ignore:
            if value != ignore[key]:
                raise PlainValueError(f"{where}.{key}: refused: {_quote(value)} (only {ignore[key]!r} is accepted)")
            continue
        if key in CODE_KEYS:
            raise PlainValueError(f"{where}.{key}: refused: {key!r} names code to import or build; "
                                  "nothing a file names is ever imported or instantiated")
        if key not in params:
            raise PlainValueError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(params))})")
        check_plain(value, f"{where}.{key}")
        tp = hints.get(key, Any)
        if not _matches(value, tp):
            raise PlainValueError(f"{where}.{key}: {_quote(value)} is not a {_type_name(tp)}")
        out[key] = value
    return out
