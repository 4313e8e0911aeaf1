"""The modules presets build: token pooling over a ViT trunk, and CONCH's vision towers (v1 and v1.5).

* :class:`TokenPool` / :func:`pool_model`: a ViT's tokens [B, T, C] → ``cls``, ``mean`` (patch tokens
  only, after the ``num_prefix_tokens`` class + register tokens) or ``cls_mean`` (both, concatenated).
* :class:`ConchV15Tower`: timm ViT-L/16 trunk → :class:`AttentionalPooler` (to_q / to_kv) → LayerNorm.
* :class:`ConchV1Tower`: timm ViT-B/16 trunk at 448 px → :class:`MultiheadAttentionPooler`
  (``nn.MultiheadAttention`` with a key/value width other than the query's, as CONCH v1's CoCa code) → LayerNorm.
* :data:`BUILDERS`: the preset ``builder`` names → ``build(arch, **kwargs) -> nn.Module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TokenPool", "pool_model", "AttentionalPooler", "ConchV15Tower", "MultiheadAttentionPooler",
           "ConchV1Tower", "BUILDERS"]


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


# ------------------------------------------------------------------------------------------- CONCH v1.5
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


# --------------------------------------------------------------------------------------------- CONCH v1
class MultiheadAttentionPooler(nn.Module):
    """CONCH v1's attentional pooler: learned queries, LayerNorm on queries and tokens, then
    ``nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)`` (keys as released:
    ``query``, ``ln_q``, ``ln_k``, ``attn.{q,k,v}_proj_weight``, ``attn.in_proj_bias``, ``attn.out_proj``)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, C] -> [B, Q, D]
        kv = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)  # [B, Q, D]
        return self.attn(q, kv, kv, need_weights=False)[0]


class ConchV1Tower(nn.Module):
    """CONCH (v1) vision encoder, the image embedding before the contrastive projection
    (``encode_image(proj_contrast=False, normalize=False)``): timm ViT trunk → pooler (1 query) →
    LayerNorm → [B, pool_dim]."""

    def __init__(self, trunk: str = "vit_base_patch16_224", pool_dim: int = 512, pool_heads: int = 8,
                 **trunk_kwargs: Any):
        super().__init__()
        import timm

        self.trunk = timm.create_model(trunk, pretrained=False, num_classes=0, **trunk_kwargs)
        self.attn_pool_contrast = MultiheadAttentionPooler(pool_dim, int(self.trunk.num_features), pool_heads, 1)
        self.ln_contrast = nn.LayerNorm(pool_dim)
        self.num_features = pool_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, pool_dim]
        tokens = self.trunk.forward_features(x)  # [B, T, C], after the trunk's final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def _timm_builder(arch: str, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def _conch_v15_builder(arch: str, **kwargs: Any) -> nn.Module:
    return ConchV15Tower(trunk=arch, **kwargs)


def _conch_v1_builder(arch: str, **kwargs: Any) -> nn.Module:
    return ConchV1Tower(trunk=arch, **kwargs)


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "timm": _timm_builder, "conch_v15": _conch_v15_builder, "conch_v1": _conch_v1_builder}
