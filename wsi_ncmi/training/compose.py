"""Composable YAML configs: a file may name the files it builds on with a top-level ``__base__`` key.

    # configs/mil/camelyon17/abmil_ncmi.yaml
    __base__: [../base.yaml, _data.yaml, ../_model_abmil.yaml, ../_objective_ncmi.yaml]
    model:
      lr: 1.0e-4          # keys here override the bases

Rules: base paths are relative to the file naming them; bases are merged left to right, then the file's own
keys on top; mappings merge recursively, any other value (scalars, lists, ``null``) replaces; bases may
have bases; cycles are an error. jsonargparse has no include mechanism, so ``wsi-ncmi fit -c FILE`` expands
every ``-c/--config`` file through :func:`expand_config_args` before LightningCLI parses the arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from wsi_ncmi.errors import UserError

__all__ = ["BASE_KEY", "ConfigComposeError", "compose_config", "deep_merge", "expand_config_args"]

BASE_KEY = "__base__"
_CONFIG_FLAGS = ("-c", "--config")


class ConfigComposeError(UserError):
    """A config file is missing, not a YAML mapping, or its ``__base__`` chain is invalid."""


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``over``: nested mappings merge, everything else in ``over`` replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigComposeError(f"{path}: config file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigComposeError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigComposeError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def compose_config(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of ``path`` and its ``__base__`` chain (without the ``__base__`` key)."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise ConfigComposeError(f"{path}: __base__ cycle: {chain}")
    data = _load(path)
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigComposeError(f"{path}: {BASE_KEY} must be a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base)
        if not base_path.is_file():
            raise ConfigComposeError(f"{path}: {BASE_KEY} entry {base!r} not found (looked at {base_path})")
        merged = deep_merge(merged, compose_config(base_path, (*_stack, path)))
    return deep_merge(merged, data)


def expand_config_args(argv: list[str]) -> list[str]:
    """Replace each ``-c FILE`` / ``--config FILE`` / ``--config=FILE`` by its composed YAML text.

    Values that are not existing files (e.g. inline YAML) are left as they are.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).is_file():
            value = yaml.safe_dump(compose_config(value), sort_keys=False)
        out += ["--config", value]
    return out
