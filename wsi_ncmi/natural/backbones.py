"""ResNet image backbones (timm) for the natural-image track; pooled penultimate feature, no classifier.

``create_backbone("resnet18", cifar_stem=True)`` returns ``(module, feature_dim)`` where
``module(x [B, 3, H, W]) -> [B, feature_dim]``. The CIFAR variant replaces the 7×7 stride-2 stem and
its max-pool by a 3×3 stride-1 convolution (the usual 32-px ResNet). Weights are only read from a
local file (``.safetensors`` or a ``torch.save`` state dict loaded with ``weights_only=True``); nothing
is ever downloaded. Keys of a full classifier (``fc.*``) are ignored when loading into a backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ncmi.data.weights import nonfinite_keys, read_error_line, read_weight_file, unwrap_state_dict
from wsi_ncmi.errors import UserError

__all__ = ["BackboneError", "BACKBONES", "create_backbone", "create_classifier", "load_state_dict_file"]

logger = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")


class BackboneError(UserError):
    """Unknown backbone name, unreadable weight file or mismatching weights."""


def read_backbone_weights(path: str | Path) -> Any:
    """The object stored in ``path`` (:func:`wsi_ncmi.data.weights.read_weight_file`: safetensors, or a torch
    file read with ``weights_only=True``, never unpickled code). Raises :class:`BackboneError` naming the file
    when it is missing, unreadable, or its tensors hold NaN / inf."""
    path = Path(path).expanduser()
    try:
        obj = read_weight_file(path)
    except FileNotFoundError:
        raise BackboneError(f"weights file not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - any reader failure becomes one clear error
        raise BackboneError(f"{path}: cannot read weights ({read_error_line(err)})") from None
    sd = unwrap_state_dict(obj, ("state_dict", "model", "module"))
    bad = nonfinite_keys(sd) if isinstance(sd, dict) else []
    if bad:
        raise BackboneError(f"{path}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[:3]}); the file is "
                            "corrupt or was saved from a diverged run")
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``; never unpickles code).

    A torch file holding ``{"state_dict": ...}`` (Lightning) or ``{"model": ...}`` is unwrapped.
    """
    sd = unwrap_state_dict(read_backbone_weights(path))
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{Path(path).expanduser()}: not a state dict of tensors")
    return sd


def _apply_cifar_stem(model: nn.Module) -> None:
    old: nn.Conv2d = model.conv1  # type: ignore[assignment]
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _build(name: str, num_classes: int, cifar_stem: bool, width: float) -> nn.Module:
    import timm

    if name not in BACKBONES:
        raise BackboneError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if width <= 0:
        raise BackboneError(f"backbone width must be > 0, got {width}")
    kwargs: dict = {}
    if width != 1.0:  # narrower ResNet (tests / CPU demos): scale every stage and the stem
        kwargs["channels"] = tuple(max(4, int(round(c * width))) for c in (64, 128, 256, 512))
        kwargs["stem_width"] = max(4, int(round(64 * width)))
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if cifar_stem:
        _apply_cifar_stem(model)
    return model


def _load_into(model: nn.Module, path: str | Path, *, strict_head: bool) -> None:
    sd = load_state_dict_file(path)
    if not strict_head:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneError(f"{path}: weights do not match the model ({err})") from err
    missing = [k for k in missing if strict_head or not k.startswith("fc.")]
    if missing or unexpected:
        raise BackboneError(
            f"{path}: weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    logger.info("loaded weights from %s", path)


def create_backbone(
    name: str, cifar_stem: bool = False, weights: str | None = None, width: float = 1.0
) -> tuple[nn.Module, int]:
    """A timm ResNet without classifier -> ``(module, feature_dim)``; ``module(x) -> [B, feature_dim]``.

    Args:
        name: one of :data:`BACKBONES`.
        cifar_stem: 3×3 stride-1 stem conv and no max-pool (32-px inputs).
        weights: optional local weight file (safetensors or torch state dict); ``fc.*`` keys are ignored.
        width: channel multiplier (1.0 = the standard network; smaller for quick CPU runs).
    """
    model = _build(name, 0, cifar_stem, width)
    if weights:
        _load_into(model, weights, strict_head=False)
    return model, int(model.num_features)


def create_classifier(
    name: str, num_classes: int, cifar_stem: bool = False, weights: str | None = None, width: float = 1.0
) -> nn.Module:
    """A full timm ResNet classifier (backbone + ``fc``), e.g. to measure a pretrained ImageNet model."""
    model = _build(name, num_classes, cifar_stem, width)
    if weights:
        _load_into(model, weights, strict_head=True)
    return model
