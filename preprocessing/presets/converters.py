"""Key converters: a published state dict (its authors' key names) → the keys of the model a preset builds.

Each converter is registered by name in :data:`CONVERTERS` (``@register_converter``) and applied to every
``--weights`` file before the strict key/shape check (:mod:`preprocessing.encoder_weights`):

* ``hf_vit`` / ``hf_dinov2``: Hugging Face ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel``
  files, as saved by transformers 4 (``attention.attention.query``, ``mlp.weights_in``) or 5 (``q_proj``,
  ``gate_proj`` / ``up_proj``), → timm; a position embedding saved at another grid is resampled to the
  model's once, the way transformers does at every forward.
* ``dinov2_teacher``: a facebookresearch/dinov2 training checkpoint or exported backbone → timm.
* ``conch_v15`` / ``conch_v1``: the CONCH vision towers (position-embedding grid; CoCa text tower dropped).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .towers import ConchV15Tower

__all__ = ["CONVERTERS", "register_converter", "Converter"]

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


_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")  # transformers 4 | 5 (ViT)
_HF_QKV = re.compile(r"^(?:attention\.)?(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)$")
_HF_GLU = re.compile(r"^mlp\.(gate_proj|up_proj)\.(weight|bias)$")  # transformers 5 SwiGLU, split in two
# Hugging Face names inside one encoder layer -> timm names inside blocks.N (ViTModel and Dinov2Model)
_HF_BLOCK_NAMES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",  # ViT
    "norm1": "norm1", "norm2": "norm2",  # Dinov2
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",  # ViT
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",  # Dinov2
    "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",  # Dinov2 SwiGLU -> timm SwiGLUPacked
    "mlp.down_proj": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q_proj": 0, "k_proj": 1, "v_proj": 2}


def _fold_registers(out: dict[str, torch.Tensor], model: nn.Module) -> None:
    """DINOv2 with registers adds the class token's position before inserting the registers; a timm
    ``no_embed_class`` model adds positions to the patches only: move the class position into the token."""
    if "reg_token" in out and getattr(model, "no_embed_class", False) and "pos_embed" in out:
        pos = out["pos_embed"]  # [1, 1 + N, C]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]


def _hf_resample(pos: torch.Tensor, model: nn.Module, antialias: bool) -> torch.Tensor:
    """[1, 1 + g², C] (class position first) → the model's grid, as transformers' (5.25) Dinov2
    ``interpolate_pos_encoding`` does at run time (bicubic to the target size, float32, no align_corners;
    ``antialias`` in ``Dinov2WithRegisters``; older 4.x releases used a 0.1-offset scale factor instead, which
    can differ in the last digits). Unchanged when the grids already agree."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    n = pos.shape[1] - 1
    g = int(round(n ** 0.5))
    if grid is None or g * g != n or (g, g) == tuple(grid):
        return pos
    c = pos.shape[-1]
    patch = pos[:, 1:].reshape(1, g, g, c).permute(0, 3, 1, 2).float()  # [1, C, g, g]
    patch = nn.functional.interpolate(patch, size=tuple(grid), mode="bicubic", align_corners=False,
                                      antialias=antialias)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, c).to(pos.dtype)], dim=1)


def _hf_to_timm(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    if "embeddings.cls_token" not in sd:
        return sd  # already timm keys
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    glu: dict[int, dict[str, torch.Tensor]] = {}
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
        if (part := _HF_QKV.match(rest)) is not None:
            qkv.setdefault(i, {})[f"{_QKV_ORDER[part.group(1)]}.{part.group(2)}"] = v
            continue
        if (part := _HF_GLU.match(rest)) is not None:  # silu(gate) * up == timm GluMlp on fc1 = [gate; up]
            glu.setdefault(i, {})[f"{part.group(1)}.{part.group(2)}"] = v
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
            if all(f"{n}.{leaf}" in parts for n in range(3)):
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts[f"{n}.{leaf}"] for n in range(3)], dim=0)
    for i, parts in glu.items():
        for leaf in ("weight", "bias"):
            if all(f"{n}.{leaf}" in parts for n in ("gate_proj", "up_proj")):
                out[f"blocks.{i}.mlp.fc1.{leaf}"] = torch.cat([parts[f"gate_proj.{leaf}"], parts[f"up_proj.{leaf}"]])
    if "pos_embed" in out:
        out["pos_embed"] = _hf_resample(out["pos_embed"], model, antialias="reg_token" in out)
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


_CONCH_V1_DROP = ("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.", "visual.ln_caption.",
                  "visual.proj_contrast")


@register_converter("conch_v1")
def convert_conch_v1(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """MahmoodLab/CONCH ``pytorch_model.bin`` (the whole CoCa model): keep the vision tower's feature path
    (``visual.trunk``, ``visual.attn_pool_contrast``, ``visual.ln_contrast``) without its ``visual.`` prefix;
    the text tower, the captioning pooler, the contrastive projection and ``logit_scale`` are dropped."""
    if not any(k.startswith("visual.") for k in sd):
        return sd  # already the tower's own keys
    return {k[len("visual."):] if k.startswith("visual.") else k: v for k, v in sd.items()
            if not k.startswith(_CONCH_V1_DROP)}
