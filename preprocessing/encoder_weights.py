"""The weight-file side of an encoder: read a local file, check it fits, name the preset it fits instead.

Weights come ONLY from a local file: ``.safetensors`` or a ``torch.load(weights_only=True)`` checkpoint (read
through :mod:`wsi_ncmi.data.weights`; its sha256 is recorded), or the word :data:`RANDOM` for a seeded random
init (recorded as ``"random"``). Nothing is downloaded. :func:`apply_weights` checks the file key by key and
shape by shape (after the preset's key converter) before any slide; a file made for another preset fails with a
message naming the file, the encoder asked for and the preset(s) whose model it fits (:func:`identify_weights`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from wsi_ncmi.data.weights import (
    nonfinite_keys,
    read_error_line,
    read_weight_file,
    strip_prefixes,
    tensors_only,
    unwrap_state_dict,
)

from .encoder_specs import EncoderError, EncoderSpec, preset_spec
from .presets import CONVERTERS, PRESETS

log = logging.getLogger(__name__)

__all__ = ["RANDOM", "RANDOM_SEED", "sha256_file", "load_weights", "identify_weights", "apply_weights"]

RANDOM = "random"
RANDOM_SEED = 0


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a tensors-only torch checkpoint (never unpickles objects)."""
    path = Path(path)
    try:
        sd = read_weight_file(path)
    except FileNotFoundError:
        raise EncoderError(f"--weights {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any reader failure (safetensors, torch, OS) is one line naming the file
        what = ("not a safetensors file (a pickled checkpoint renamed .safetensors?)" if path.suffix == ".safetensors"
                else "not a tensors-only torch checkpoint")
        raise EncoderError(f"--weights {path}: {what} ({read_error_line(e)})") from None
    # common wrappers (teacher: DINOv2 training)
    sd = unwrap_state_dict(sd, ("state_dict", "model", "module", "teacher"))
    if not isinstance(sd, dict):
        raise EncoderError(f"--weights {path}: expected a state dict, got {type(sd).__name__}")
    sd = strip_prefixes(tensors_only(sd), ("module.",), every_key=False)
    bad = nonfinite_keys(sd)
    if bad:
        raise EncoderError(f"--weights {path}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[:3]}); the "
                           "file is corrupt or was saved from a diverged run")
    return sd


def _mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], ignore: tuple[str, ...]) -> str | None:
    """Why ``sd`` does not fit a model whose state dict is ``own`` (keys, then shapes), or None."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignore)]
    if missing or unexpected:
        return (f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]})")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if tuple(own[k].shape) != tuple(sd[k].shape)]
    return f"shape mismatch for {bad[:3]} (file vs model)" if bad else None


def _convert(spec: EncoderSpec, sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    return CONVERTERS[spec.converter](sd, model) if spec.converter else sd


@functools.cache
def _preset_signature(name: str) -> tuple[EncoderSpec, nn.Module]:
    """A preset's spec and its model on the meta device (shapes only, nothing allocated)."""
    spec = preset_spec(name, PRESETS[name])
    with torch.device("meta"):
        model = spec.make()
    return spec, model


def identify_weights(sd: dict[str, torch.Tensor], exclude: str | None = None) -> list[str]:
    """The presets whose model this state dict fits exactly (after each preset's converter)."""
    found = []
    for name in sorted(PRESETS):
        if name == exclude:
            continue
        try:
            spec, model = _preset_signature(name)
            if _mismatch(model.state_dict(), _convert(spec, dict(sd), model), ()) is None:
                found.append(name)
        except Exception as e:  # a preset that cannot be built here (e.g. a missing optional package)
            log.debug("identify_weights: skipping preset %s: %s", name, e)
    return found


def apply_weights(model: nn.Module, spec: EncoderSpec, sd: dict[str, torch.Tensor], path: Path) -> None:
    """Strict key and shape check, then load; raises EncoderError naming the file, the encoder asked for and
    the preset(s) the file does fit."""
    sd = _convert(spec, sd, model)
    own = model.state_dict()
    why = _mismatch(own, sd, spec.ignore_prefixes)
    if why is not None:
        fits = identify_weights(sd, exclude=spec.name)
        hint = (f"; the file fits preset {' / '.join(repr(f) for f in fits)} instead: --encoder {fits[0]}"
                if fits else "")
        raise EncoderError(f"--weights {path} do not fit encoder {spec.name!r}"
                           f"{f' (preset {spec.preset!r})' if spec.preset else ''}: {why}{hint}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
