"""Published pathology encoders as exact, offline presets: architecture, preprocessing, pooling, converters.

A :class:`Preset` is plain data (its ``kwargs`` are JSON: layer classes are named as dotted strings such as
``"timm.layers.SwiGLUPacked"`` and resolved only when the model is built), so a preset can be listed
(``wsi-preprocess --list-encoders --json``), recorded in every bag and compared on resume.

* ``builder``: ``"timm"`` (``timm.create_model(arch, num_classes=0, **kwargs)``) or a name in :data:`BUILDERS`
  (``"conch_v15"``: a timm ViT-L/16 trunk + CONCH's attentional pooler).
* ``pooling``: ``cls`` (first token), ``mean`` (average of the patch tokens, i.e. after the
  ``num_prefix_tokens`` class + register tokens), ``cls_mean`` (both, concatenated) or ``model`` (the
  module returns the pooled vector itself: CNNs, CONCH's attention pooler).
* preprocessing: ``resize`` (side the tile is resized to first; ``None``: straight to ``input_size``),
  then a center crop to ``input_size``; ``interpolation`` ``bilinear``/``bicubic`` (antialiased, as
  torchvision does on PIL images); ``mean``/``std`` on the 0..1 scale.
* ``converter``: a name in :data:`CONVERTERS` that maps the published state dict (Hugging Face ViT /
  Dinov2, DINOv2 teacher checkpoint, CONCH v1.5 vision tower) onto the built model's keys; applied to
  every ``--weights`` file before the strict key/shape check.

Every recipe below names the public source it was checked against (``source``). Weights are never
bundled or downloaded; ``license`` repeats the licence the authors state publicly.

This file holds a single concept, the preset table (each :class:`Preset` with the builders, poolings and
key converters its rows name), and is longer than the ~450-line guide on purpose: a recipe is read and
checked next to the others and its converter, so it is not split.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "Preset",
    "PRESETS",
    "register_preset",
    "CONVERTERS",
    "register_converter",
    "BUILDERS",
    "POOLINGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "resolve_kwargs",
    "kwargs_to_json",
    "TokenPool",
    "pool_model",
    "AttentionalPooler",
    "ConchV15Tower",
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


# ------------------------------------------------------------------------------------------------ pooling
class TokenPool(nn.Module):
    """A ViT's token sequence → one vector: ``cls``, ``mean`` (patch tokens only) or ``cls_mean``."""

    def __init__(self, trunk: nn.Module, pooling: str):
        super().__init__()
        if pooling not in ("cls", "mean", "cls_mean"):
            raise ValueError(f"TokenPool: pooling {pooling!r}")
        self.trunk, self.pooling = trunk, pooling
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))
        self.num_features = int(trunk.num_features) * (2 if pooling == "cls_mean" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, D]
        tokens = self.trunk.forward_features(x)  # [B, T, C], after the final norm
        if self.pooling == "cls":
            return tokens[:, 0]
        mean = tokens[:, self.num_prefix_tokens:].mean(dim=1)  # [B, C]
        return mean if self.pooling == "mean" else torch.cat([tokens[:, 0], mean], dim=-1)


def pool_model(trunk: nn.Module, pooling: str) -> nn.Module:
    """The module that returns [B, D]: ``trunk`` itself for ``model`` pooling, else a :class:`TokenPool`."""
    return trunk if pooling == "model" else TokenPool(trunk, pooling)


# -------------------------------------------------------------------------------------------- CONCH v1.5
class AttentionalPooler(nn.Module):
    """Learned queries attending over the (layer-normed) tokens, as in CONCH's vision tower (CoCa-style)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.heads = n_head
        inner = (d_model // n_head) * n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, h*d] -> [B, h, T, d]
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, C] -> [B, Q, D]
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # [B, N, h*d] each
        q = self.to_q(self.ln_q(self.query)).expand(x.shape[0], -1, -1)  # [B, Q, h*d]
        out = nn.functional.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        return self.to_out(out.transpose(1, 2).flatten(2))  # [B, Q, D]


class ConchV15Tower(nn.Module):
    """CONCH v1.5 vision encoder: timm ViT trunk → attentional pooler (1 query) → LayerNorm → [B, pool_dim].

    The published trunk's position embedding is kept at its ``base_grid`` (14x14 for 224 px) and
    interpolated at every forward; here the trunk is built at the preset's input size and the
    ``conch_v15`` converter performs that same interpolation once, on loading.
    """

    def __init__(self, trunk: str = "vit_large_patch16_224", pool_dim: int = 768, pool_heads: int = 8,
                 base_grid: int = 14, **trunk_kwargs: Any):
        super().__init__()
        import timm

        self.base_grid = int(base_grid)
        self.trunk = timm.create_model(trunk, pretrained=False, num_classes=0, **trunk_kwargs)
        self.attn_pool_contrast = AttentionalPooler(pool_dim, int(self.trunk.num_features), pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(pool_dim)
        self.num_features = pool_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, pool_dim]
        tokens = self.trunk.forward_features(x)  # [B, T, C]
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def _timm_builder(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _conch_v15_builder(arch: str, **kwargs: Any) -> nn.Module:
    return ConchV15Tower(trunk=arch, **kwargs)


BUILDERS: dict[str, Callable[..., nn.Module]] = {"timm": _timm_builder, "conch_v15": _conch_v15_builder}


# ------------------------------------------------------------------------------------------- converters
Converter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        CONVERTERS[name] = fn
        return fn

    return deco


def _strip(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face names inside one encoder layer -> timm names inside blocks.N (ViTModel and Dinov2Model)
_HF_BLOCK_NAMES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",  # ViT
    "norm1": "norm1", "norm2": "norm2",  # Dinov2
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",  # ViT
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",  # Dinov2
    "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",  # Dinov2 SwiGLU -> timm SwiGLUPacked
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def _fold_registers(out: dict[str, torch.Tensor], model: nn.Module) -> None:
    """DINOv2 with registers adds the class token's position before inserting the registers; a timm
    ``no_embed_class`` model adds positions to the patches only: move the class position into the token."""
    if "reg_token" in out and getattr(model, "no_embed_class", False) and "pos_embed" in out:
        pos = out["pos_embed"]  # [1, 1 + N, C]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]


def _hf_to_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    if "embeddings.cls_token" not in sd:
        return sd  # already timm keys
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("pooler.") or k == "embeddings.mask_token":
            continue  # not part of the feature path
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        if k == "embeddings.register_tokens":
            out["reg_token"] = v
            continue
        m = _HF_LAYER.match(k)
        if m is None:
            out[k] = v  # left as is: the strict check names it
            continue
        i, rest = int(m.group(1)), m.group(2)
        part = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if part is not None:
            qkv.setdefault(i, {})[f"{part.group(1)}.{part.group(2)}"] = v
            continue
        name, _, leaf = rest.rpartition(".")
        if name in _HF_BLOCK_NAMES:
            out[f"blocks.{i}.{_HF_BLOCK_NAMES[name]}.{leaf}"] = v
        elif rest in _HF_BLOCK_NAMES:  # layer_scale*.lambda1 has no .weight leaf
            out[f"blocks.{i}.{_HF_BLOCK_NAMES[rest]}"] = v
        else:
            out[k] = v
    for i, parts in qkv.items():
        for leaf in ("weight", "bias"):
            if all(f"{n}.{leaf}" in parts for n in ("query", "key", "value")):
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[f"{n}.{leaf}"] for n in
                                                               ("query", "key", "value")], dim=0)
    _fold_registers(out, model)
    return out


@register_converter("hf_vit")
def convert_hf_vit(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face ``ViTModel`` (e.g. owkin/phikon) → timm ``VisionTransformer``; drops the pooler."""
    return _hf_to_timm(_strip(sd, ("vit.",)), model)


@register_converter("hf_dinov2")
def convert_hf_dinov2(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Hugging Face ``Dinov2Model`` (with or without registers, MLP or SwiGLU) → timm; drops mask_token."""
    return _hf_to_timm(_strip(sd, ("dinov2.",)), model)


@register_converter("dinov2_teacher")
def convert_dinov2_teacher(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A facebookresearch/dinov2 training checkpoint (``teacher.backbone.*``, chunked ``blocks.C.I``,
    SwiGLU ``w12``/``w3``, ``register_tokens``) or its exported backbone → timm; heads are dropped."""
    if any(k.startswith(("teacher.", "student.")) for k in sd):
        sd = {k[len("teacher."):]: v for k, v in sd.items() if k.startswith("teacher.")}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block chunks: blocks.C.I -> blocks.I
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out["reg_token" if k == "register_tokens" else k] = v
    _fold_registers(out, model)
    return out


def _dino_interpolate(pos: torch.Tensor, base: int, grid: int) -> torch.Tensor:
    """[1, 1 + base², C] → [1, 1 + grid², C] the way DINO/iBOT's ``interpolate_pos_encoding`` does it
    (bicubic, scale factor (grid + 0.1) / base, no antialias)."""
    cls, patch = pos[:, :1], pos[:, 1:]
    c = patch.shape[-1]
    g = grid + 0.1
    patch = nn.functional.interpolate(patch.reshape(1, base, base, c).permute(0, 3, 1, 2).float(),
                                      scale_factor=(g / base, g / base), mode="bicubic")
    if patch.shape[-1] != grid or patch.shape[-2] != grid:
        raise ValueError(f"position embedding interpolation gave {tuple(patch.shape[-2:])}, expected {grid}")
    return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, grid * grid, c).to(pos.dtype)], dim=1)


@register_converter("conch_v15")
def convert_conch_v15(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """MahmoodLab/conchv1_5 ``pytorch_model_vision.bin``: the trunk's position embedding is first brought
    to the reference grid (bilinear, as the reference loader does when the file differs), then
    interpolated to the input grid exactly as the reference forward does at run time."""
    key = "trunk.pos_embed"
    if key not in sd or not isinstance(model, ConchV15Tower):
        return sd
    from timm.layers import resample_abs_pos_embed

    pos = sd[key]
    base, grid = model.base_grid, int(model.trunk.patch_embed.grid_size[0])
    if pos.shape[1] != 1 + base * base:
        pos = resample_abs_pos_embed(pos, new_size=(base, base), num_prefix_tokens=1, interpolation="bilinear",
                                     antialias=False, verbose=False)
    if grid != base:
        pos = _dino_interpolate(pos, base, grid)
    return {**sd, key: pos}


# -------------------------------------------------------------------------------------------- the presets
_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}
_TRIDENT = "mahmoodlab/TRIDENT trident/patch_encoder_models/load.py @a91fa84"
_TRIDENT_TABLE = "mahmoodlab/TRIDENT README patch-encoder table @a91fa84"

register_preset("uni", Preset(
    "vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1024,
    f"huggingface.co/MahmoodLab/UNI card; {_TRIDENT} (UNIInferenceEncoder); mahmoodlab/CLAM models/builder.py; "
    f"{_TRIDENT_TABLE} (256 px, 20x)",
    pooling="cls", resize=224, interpolation="bilinear", precision="fp16", tile_px=256, mpp=0.5,
    params=303_350_784, license="CC-BY-NC-ND-4.0, gated (MahmoodLab/UNI on Hugging Face)"))
register_preset("uni2_h", Preset(
    "vit_giant_patch14_224",
    {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
     "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True, **_SWIGLU},
    224, IMAGENET_MEAN, IMAGENET_STD, 1536,
    f"huggingface.co/MahmoodLab/UNI2-h card; {_TRIDENT} (UNIv2InferenceEncoder); {_TRIDENT_TABLE} (256 px, 20x)",
    pooling="cls", resize=224, interpolation="bilinear", precision="bf16", tile_px=256, mpp=0.5,
    params=681_394_176, license="CC-BY-NC-ND-4.0, gated (MahmoodLab/UNI2-h on Hugging Face)"))

_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU}
for _name, _kw, _pool, _dim, _params, _card in (
        ("virchow", _VIRCHOW, "cls_mean", 2560, 631_229_184, "paige-ai/Virchow"),
        ("virchow_cls", _VIRCHOW, "cls", 1280, 631_229_184, "paige-ai/Virchow"),
        ("virchow2", {**_VIRCHOW, "reg_tokens": 4}, "cls_mean", 2560, 631_239_424, "paige-ai/Virchow2"),
        ("virchow2_cls", {**_VIRCHOW, "reg_tokens": 4}, "cls", 1280, 631_239_424, "paige-ai/Virchow2")):
    register_preset(_name, Preset(
        "vit_huge_patch14_224", dict(_kw), 224, IMAGENET_MEAN, IMAGENET_STD, _dim,
        f"huggingface.co/{_card} card; {_TRIDENT} (Virchow/Virchow2InferenceEncoder: class token ⊕ mean of the "
        f"patch tokens after the {1 + _kw.get('reg_tokens', 0)} prefix tokens); {_TRIDENT_TABLE} (224 px, 20x)",
        pooling=_pool, resize=None, interpolation="bicubic", precision="fp16", tile_px=224, mpp=0.5,
        params=_params, license=f"gated; licence as stated on the {_card} card"))

register_preset("gigapath", Preset(
    "vit_giant_patch14_dinov2",
    {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
     "mlp_ratio": 5.33334, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1536,
    f"huggingface.co/prov-gigapath/prov-gigapath card (resize 256 bicubic + center crop 224); {_TRIDENT} "
    f"(GigaPathInferenceEncoder); {_TRIDENT_TABLE} (256 px, 20x). SwiGLUPacked/SiLU and init_values 1e-5 come "
    "from timm's vit_giant_patch14_dinov2 defaults",
    pooling="cls", resize=256, interpolation="bicubic", precision="fp16", tile_px=256, mpp=0.5,
    params=1_134_953_984, license="Apache-2.0 with gated access (prov-gigapath/prov-gigapath on Hugging Face)"))
for _name, _card in (("hoptimus0", "bioptimus/H-optimus-0"), ("hoptimus1", "bioptimus/H-optimus-1")):
    register_preset(_name, Preset(
        "vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        224, HOPTIMUS_MEAN, HOPTIMUS_STD, 1536,
        f"huggingface.co/{_card} card (224 px at 0.5 µm/px, its mean/std); {_TRIDENT} (HOptimus0/1InferenceEncoder)",
        pooling="cls", resize=None, interpolation="bilinear", precision="fp16", tile_px=224, mpp=0.5,
        params=1_134_774_272,
        license="Apache-2.0 (bioptimus/H-optimus-0 on Hugging Face)" if _name == "hoptimus0"
        else "gated; licence as stated on the bioptimus/H-optimus-1 card"))
register_preset("gpfm", Preset(
    "vit_large_patch14_dinov2", {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
    224, IMAGENET_MEAN, IMAGENET_STD, 1024,
    f"huggingface.co/majiabo/GPFM; {_TRIDENT} (GPFMInferenceEncoder: GPFM.pth loads strictly into this timm "
    f"model; resize 224 bicubic); {_TRIDENT_TABLE} (224 px, 20x)",
    pooling="cls", resize=None, interpolation="bicubic", precision="fp16", tile_px=224, mpp=0.5,
    converter="dinov2_teacher", params=303_227_904, license="licence as stated on the majiabo/GPFM card"))
register_preset("conch_v15", Preset(
    "vit_large_patch16_224",
    {"img_size": 448, "init_values": 1.0, "pool_dim": 768, "pool_heads": 8, "base_grid": 14},
    448, IMAGENET_MEAN, IMAGENET_STD, 768,
    f"huggingface.co/MahmoodLab/conchv1_5; {_TRIDENT} + model_zoo/conchv1_5/conchv1_5.py (ViT-L/16 trunk with "
    "LayerScale 1.0, attentional pooler 768-d / 8 heads / 1 query, LayerNorm; resize 448 bilinear + crop 448; "
    f"position embedding interpolated DINO-style at run time); {_TRIDENT_TABLE} (512 px, 20x)",
    pooling="model", resize=448, interpolation="bilinear", precision="fp16", tile_px=512, mpp=0.5,
    converter="conch_v15", builder="conch_v15", params=306_711_296,  # pos_embed held at 28x28
    license="CC-BY-NC-ND-4.0, gated (MahmoodLab/conchv1_5 on Hugging Face)"))
for _name, _arch, _img, _patch, _dim, _params in (
        ("kaiko_s16", "vit_small_patch16_224", 224, 16, 384, 21_665_664),
        ("kaiko_s8", "vit_small_patch8_224", 224, 8, 384, 21_670_272),
        ("kaiko_b16", "vit_base_patch16_224", 224, 16, 768, 85_798_656),
        ("kaiko_b8", "vit_base_patch8_224", 224, 8, 768, 85_807_872),
        ("kaiko_l14", "vit_large_patch14_reg4_dinov2", 518, 14, 1024, 304_370_688)):
    register_preset(_name, Preset(
        _arch, {"img_size": _img, "dynamic_img_size": True}, 224, KAIKO_MEAN, KAIKO_STD, _dim,
        f"kaiko-ai/towards_large_pathology_fms (hf-hub:1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms); "
        f"{_TRIDENT} (Kaiko*InferenceEncoder: built at {_img} px, fed 224 px, resize 224 bilinear + crop 224, "
        f"mean/std 0.5); kaiko-ai/eva pathology backbones; {_TRIDENT_TABLE} (256 px, 20x)",
        pooling="cls", resize=224, interpolation="bilinear", precision="fp32", tile_px=256, mpp=0.5,
        params=_params, license="licence as stated in kaiko-ai/towards_large_pathology_fms"))
register_preset("phikon", Preset(
    "vit_base_patch16_224",
    {"img_size": 224, "norm_layer": {"callable": "torch.nn.LayerNorm", "eps": 1e-12}},
    224, IMAGENET_MEAN, IMAGENET_STD, 768,
    "huggingface.co/owkin/phikon config.json (ViTModel: ViT-B/16, 224 px, qkv bias, layer_norm_eps 1e-12); "
    f"{_TRIDENT} (PhikonInferenceEncoder: class token of last_hidden_state, resize 224 bilinear); "
    f"{_TRIDENT_TABLE} (224 px, 20x)",
    pooling="cls", resize=None, interpolation="bilinear", precision="fp32", tile_px=224, mpp=0.5,
    converter="hf_vit", params=85_798_656, license="licence as stated on the owkin/phikon card"))


def preset_rows() -> list[dict[str, Any]]:
    """One JSON-able row per preset (for ``--list-encoders``)."""
    rows = []
    for name in sorted(PRESETS):
        p = PRESETS[name]
        rows.append({"name": name, **p.to_dict()})
    return rows
