"""What a preset is: the :class:`Preset` record, the registry, and JSON-able model kwargs.

A :class:`Preset` is plain data (its ``kwargs`` are JSON: layer classes are named as dotted strings such as
``"timm.layers.SwiGLUPacked"`` and resolved only when the model is built, :func:`resolve_kwargs`), so a preset
can be listed (``wsi-preprocess --list-encoders --json``, :func:`preset_rows`), recorded in every bag and
compared on resume. The rows themselves are in :mod:`preprocessing.presets.table`.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "Preset",
    "PRESETS",
    "register_preset",
    "POOLINGS",
    "INTERPOLATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "resolve_kwargs",
    "kwargs_to_json",
    "preset_rows",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KAIKO_MEAN = (0.5, 0.5, 0.5)
KAIKO_STD = (0.5, 0.5, 0.5)
# H-optimus-0/1 model cards (bioptimus), identical in TRIDENT
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
# Lunit benchmark-ssl-pathology training statistics (quoted in kaiko-ai/eva's lunit backbones)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
# HistAI/hibou example.ipynb (Normalize) and TRIDENT utils/constants.py (HIBOU_MEAN / HIBOU_STD)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)

POOLINGS = ("cls", "mean", "cls_mean", "model")
INTERPOLATIONS = ("bilinear", "bicubic")
# constructor arguments that take a class / factory: given as dotted names (or {"callable": name, **kw})
CALLABLE_KWARGS = ("mlp_layer", "act_layer", "norm_layer", "block_fn", "embed_layer", "attn_layer")
_CALLABLE_ROOTS = ("timm", "torch", "preprocessing")


@dataclass(frozen=True)
class Preset:
    """A published encoder: how to build it, feed it and pool it (all JSON-serialisable)."""

    arch: str  # timm architecture (builder "timm") or the trunk architecture of a custom builder
    kwargs: dict[str, Any]  # model kwargs (JSON; callables as dotted names, see resolve_kwargs)
    input_size: int | None  # side the model sees
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int  # size of the pooled feature vector (checked by the tests)
    source: str  # where the recipe was checked
    pooling: str = "model"
    resize: int | None = None  # resize side before the center crop to input_size (None: no crop)
    interpolation: str = "bilinear"
    precision: str = "fp32"  # default autocast precision on CUDA (fp32 / fp16 / bf16)
    tile_px: int | None = None  # recommended tile side at mpp
    mpp: float | None = None  # recommended µm/px of the tiles
    converter: str | None = None  # name in CONVERTERS
    builder: str = "timm"
    params: int | None = None  # parameter count of the built model (checked by the tests)
    license: str = ""
    note: str = ""  # what the public sources leave open (fields not verified against them), if anything

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r}: choose from {POOLINGS}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: choose from {INTERPOLATIONS}")

    @property
    def crop(self) -> int | None:
        """Center-crop side (None when the tile is resized straight to ``input_size``)."""
        return self.input_size if self.resize is not None else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["crop"] = list(self.mean), list(self.std), self.crop
        return d


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, preset: Preset) -> Preset:
    PRESETS[name] = preset
    return preset


# ----------------------------------------------------------------------------------- callables in kwargs
def _import_name(name: str) -> Any:
    if not isinstance(name, str) or name.split(".")[0] not in _CALLABLE_ROOTS or "." not in name:
        raise ValueError(f"{name!r}: expected a dotted name under {', '.join(_CALLABLE_ROOTS)} "
                         "(e.g. 'timm.layers.SwiGLUPacked', 'torch.nn.SiLU')")
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        # e.g. "timm.layers.SwiGLUPacked" is an attribute of a package, not a module path
        parent, _, outer = module.rpartition(".")
        try:
            return getattr(getattr(importlib.import_module(parent), outer), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"{name!r}: no such class or function") from None


def resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model kwargs with the named callables (``CALLABLE_KWARGS``) imported.

    ``"torch.nn.SiLU"`` → the class; ``{"callable": "torch.nn.LayerNorm", "eps": 1e-12}`` →
    ``functools.partial(torch.nn.LayerNorm, eps=1e-12)``. Anything else passes through.
    """
    out = dict(kwargs)
    for k in CALLABLE_KWARGS:
        v = out.get(k)
        if isinstance(v, str):
            out[k] = _import_name(v)
        elif isinstance(v, dict) and "callable" in v:
            rest = resolve_kwargs({a: b for a, b in v.items() if a != "callable"})
            out[k] = functools.partial(_import_name(v["callable"]), **rest)
    return out


def _callable_name(v: Any) -> Any:
    if isinstance(v, functools.partial):
        if v.args:
            raise TypeError(f"{v!r}: a partial with positional arguments cannot be recorded as JSON")
        return {"callable": _callable_name(v.func), **kwargs_to_json(dict(v.keywords))}
    mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
    if mod is None or qual is None:
        raise TypeError(f"{v!r} has no importable name")
    return f"{mod}.{qual}"


def kwargs_to_json(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as JSON-able values: classes/functions/partials become their dotted names (for the resume
    fingerprint and the bag attributes); raises TypeError naming the key for anything else."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(kwargs_to_json({str(i): x for i, x in enumerate(v)}).values())
        elif isinstance(v, dict):
            out[k] = kwargs_to_json(v)
        elif callable(v):
            out[k] = _callable_name(v)
        else:
            raise TypeError(f"encoder kwarg {k}={v!r} ({type(v).__name__}) cannot be recorded as JSON")
    return out


def preset_rows() -> list[dict[str, Any]]:
    """One JSON-able row per preset (for ``--list-encoders``)."""
    rows = []
    for name in sorted(PRESETS):
        p = PRESETS[name]
        rows.append({"name": name, **p.to_dict()})
    return rows
