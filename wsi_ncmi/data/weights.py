"""Local weight files and the device they run on: the one reader shared by ``preprocessing`` and the package.

A leaf: it imports torch (and safetensors lazily), nothing of ours, so ``preprocessing`` may import it
(``tests/test_import_direction.py``). Callers word their own errors (``--weights X: no such file`` for
``wsi-preprocess``, ``weights file not found: X`` for the image backbones); this module only reads.

* :func:`read_weight_file`: a ``.safetensors`` file, or a torch file read with ``weights_only=True``
  (tensors and plain containers only, never unpickled code). Nothing is ever downloaded.
* :func:`unwrap_state_dict`: ``{"state_dict": ...}`` (Lightning), ``{"model": ...}``, ... wrappers removed.
* :func:`strip_prefixes`: wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile) removed,
  either only while *every* key carries one (a whole-model wrapper) or key by key.
* :func:`tensors_only`: the tensor entries of a mapping.
* :func:`nonfinite_keys`: the keys whose floating tensors hold NaN or inf (a corrupt file, a diverged run).
* :func:`resolve_device`: ``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; :func:`check_device`: the
  one "is the CUDA device asked for there" check (``wsi-preprocess`` and ``wsi-ncmi evaluate`` word it alike).
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["check_device", "nonfinite_keys", "read_error_line", "read_weight_file", "resolve_device", "strip_prefixes",
           "tensors_only", "unwrap_state_dict"]


def read_weight_file(path: str | Path) -> Any:
    """The object stored in ``path`` (a safetensors dict, or what a ``weights_only`` torch file holds), on CPU.

    Raises ``FileNotFoundError`` when ``path`` is not a file; any reader error propagates unchanged, so each
    caller words it (the path is not expanded: pass ``Path(p).expanduser()`` where ``~`` is allowed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such weights file", str(path))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=True)


def read_error_line(err: BaseException) -> str:
    """One line saying why a weight / checkpoint file could not be read (torch's weights-only refusal is many
    lines long: it becomes the name of the Python object the file would have unpickled)."""
    import re

    found = re.search(r"GLOBAL (\S+)", str(err))
    if found:
        return f"refused: it holds a Python object ({found.group(1)}) that only a full unpickle could rebuild"
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {first[:200]}".rstrip(": ")


def unwrap_state_dict(obj: Any, wrappers: tuple[str, ...] = ("state_dict", "model")) -> Any:
    """``obj`` with each wrapper key in ``wrappers`` (in that order) unwrapped when its value is a dict."""
    for key in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def strip_prefixes(sd: Mapping[str, Any], prefixes: tuple[str, ...], *, every_key: bool) -> dict[str, Any]:
    """``sd`` with wrapper ``prefixes`` removed from its keys.

    ``every_key=True``: a prefix is removed only while every key starts with it, repeatedly (nested wrappers,
    e.g. ``module._orig_mod.``); ``every_key=False``: each key loses each of ``prefixes`` in turn, where it has it.
    """
    out = dict(sd)
    if not every_key:
        for prefix in prefixes:
            out = {k.removeprefix(prefix): v for k, v in out.items()}
        return out
    changed = True
    while changed and out:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def tensors_only(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The entries of ``obj`` whose value is a tensor (drops step counters, config strings, ...)."""
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def nonfinite_keys(sd: Mapping[str, Any]) -> list[str]:
    """Keys of ``sd`` whose floating-point tensor holds NaN or inf (sorted). Attention-mask buffers (a key
    ending in ``mask``) may hold -inf by design and are not checked."""
    return sorted(k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                  and not str(k).endswith("mask") and not bool(torch.isfinite(v).all()))


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; any other name is returned unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(name: str) -> str:
    """:func:`resolve_device`, then ``ValueError("--device NAME: CUDA is not available on this machine")`` when the
    result names CUDA and there is none; callers re-raise it as their own error type."""
    device = resolve_device(name)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device
