"""Building blocks shared by the aggregators (one copy each, never duplicated per model).

Masks are bool with ``True`` = real token. Every masked operation gives padded tokens exactly zero weight,
so a padded batch reproduces each bag's unpadded result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MILConfigError

__all__ = [
    "CrossAttentionBlock",
    "CrossAttentionResult",
    "DimReduction",
    "GatedAttention",
    "NystromAttention",
    "PPEG",
    "default_inner_dim",
    "masked_normalized_sigmoid",
    "masked_softmax",
]

# D_in of common encoders -> D_inner used by the ABMIL/AEM/ACMIL/ASMIL family (NCMI.md §5).
_INNER_DIM = {384: 128, 512: 256, 768: 384, 1024: 512, 1536: 768}


def default_inner_dim(in_dim: int) -> int:
    """Inner width after DimReduction: table value for known encoders, else ``max(1, in_dim // 2)``."""
    return _INNER_DIM.get(int(in_dim), max(1, int(in_dim) // 2))


def masked_softmax(scores: Tensor, mask: Tensor | None, dim: int = -1, zero_empty: bool = True) -> Tensor:
    """Softmax over ``dim`` ignoring positions where ``mask`` (broadcastable bool) is False.

    Masked positions get exactly 0 whenever the slice has a real position. A fully masked slice gives all
    zeros (never NaN, also in backward); ``zero_empty=False`` skips that extra pass when the caller ignores
    such slices (they are then uniform).
    """
    if mask is None:
        return torch.softmax(scores, dim=dim)
    out = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=dim)
    return out * mask.any(dim=dim, keepdim=True) if zero_empty else out


def masked_normalized_sigmoid(scores: Tensor, mask: Tensor | None, temperature: float = 1.0,
                              dim: int = -1) -> Tensor:
    """Normalised sigmoid σ(s/T) / Σ σ(s/T) over the real positions (computed as softmax of logsigmoid)."""
    return masked_softmax(F.logsigmoid(scores / temperature), mask, dim=dim)


class DimReduction(nn.Module):
    """Linear (no bias) + ReLU: ``[..., D_in] -> [..., D_out]``."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(F.relu(self.fc(x)))


class GatedAttention(nn.Module):
    """Gated attention (Ilse et al. 2018): score = w · (tanh(V h) ⊙ sigmoid(U h)), masked softmax over N."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``h [B, N, D]``, ``mask [B, N]`` -> (raw scores ``[B, N]``, attention ``[B, N]``)."""
        gated = self.drop(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))  # [B, N, hidden]
        scores = self.w(gated).squeeze(-1)  # [B, N]
        return scores, masked_softmax(scores, mask, dim=-1)


@dataclass
class CrossAttentionResult:
    out: Tensor  # [B, Q, dim] one feature per query
    attention: Tensor  # [B, Q, H, N] per-head attention of each query, 0 on padding
    logits: Tensor  # [B, Q, H, N] pre-softmax scores (scaled)


class CrossAttentionBlock(nn.Module):
    """Learnable queries doing multi-head cross-attention over the instances (masked).

    ``num_queries`` query vectors share the q/k/v/out projections. Heads split an inner width of
    ``num_heads * ceil(dim / num_heads)`` so any ``dim`` works. Output: out-projection, dropout, LayerNorm.
    """

    def __init__(self, dim: int, num_queries: int = 1, num_heads: int = 8, dropout: float = 0.1,
                 query_std: float = 0.02) -> None:
        super().__init__()
        if num_queries < 1 or num_heads < 1:
            raise MILConfigError(f"CrossAttentionBlock: num_queries={num_queries}, num_heads={num_heads} must be >= 1")
        self.num_heads = num_heads
        self.head_dim = math.ceil(dim / num_heads)
        inner = num_heads * self.head_dim
        self.query = nn.Parameter(torch.randn(num_queries, dim) * query_std)  # [Q, dim]
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def _split(self, t: Tensor) -> Tensor:  # [B, L, H*d] -> [B, H, L, d]
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def attention_logits(self, h: Tensor) -> Tensor:
        """Scaled scores of every query against every instance: ``h [B, N, dim] -> [B, Q, H, N]``."""
        b = h.shape[0]
        q = self._split(self.q_proj(self.query).unsqueeze(0).expand(b, -1, -1))  # [B, H, Q, d]
        k = self._split(self.k_proj(h))  # [B, H, N, d]
        return (q @ k.transpose(-1, -2) * self.head_dim ** -0.5).transpose(1, 2)  # [B, Q, H, N]

    def forward(self, h: Tensor, mask: Tensor | None = None) -> CrossAttentionResult:
        """``h [B, N, dim]``, ``mask [B, N]`` -> :class:`CrossAttentionResult`."""
        b = h.shape[0]
        logits = self.attention_logits(h)  # [B, Q, H, N]
        attn = masked_softmax(logits, None if mask is None else mask[:, None, None, :], dim=-1)
        v = self._split(self.v_proj(h))  # [B, H, N, d]
        ctx = attn.transpose(1, 2) @ v  # [B, H, Q, d]
        ctx = ctx.transpose(1, 2).reshape(b, -1, self.num_heads * self.head_dim)  # [B, Q, H*d]
        out = self.norm(self.drop(self.out_proj(ctx)))  # [B, Q, dim]
        return CrossAttentionResult(out=out, attention=attn, logits=logits)


def _newton_schulz_pinv(x: Tensor, iters: int) -> Tensor:
    """Iterative Moore-Penrose pseudo-inverse of ``x [..., m, m]`` (Razavi et al.), scaled per matrix."""
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).amax(dim=-1, keepdim=True)  # [..., 1]
    row = abs_x.sum(dim=-2).amax(dim=-1, keepdim=True)  # [..., 1]
    z = x.transpose(-1, -2) / (col * row).unsqueeze(-1)
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def _landmark_pool(mask: Tensor, num_landmarks: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Averaging matrix over contiguous groups of real tokens.

    Bag b with n_b real tokens gets m_b = min(num_landmarks, n_b) landmarks: the k-th real token (by order)
    goes to group floor(k * m_b / n_b). Returns pool ``[B, m, L]`` (rows average their group) and the
    landmark mask ``[B, m]`` (False for the unused slots of short bags).
    """
    counts = mask.sum(dim=1, keepdim=True)  # [B, 1]
    m_b = counts.clamp(max=num_landmarks)  # [B, 1]
    rank = mask.long().cumsum(dim=1) - 1  # [B, L]
    group = torch.div(rank * m_b, counts.clamp(min=1), rounding_mode="floor")  # [B, L]
    slots = torch.arange(num_landmarks, device=mask.device)
    onehot = (group.unsqueeze(1) == slots[None, :, None]) & mask.unsqueeze(1)  # [B, m, L]
    size = onehot.sum(dim=-1, keepdim=True)  # [B, m, 1]
    pool = onehot.to(dtype) / size.clamp(min=1).to(dtype)
    return pool, size.squeeze(-1) > 0


class NystromAttention(nn.Module):
    """Nyström self-attention (Xiong et al. 2021) with a key padding mask; never builds an L×L matrix.

    Landmarks are means of contiguous groups of real tokens (padding never enters them); padded keys get
    zero weight; the pseudo-inverse uses per-matrix scaling so bags do not influence each other; values
    get a residual depth-wise convolution along the sequence (padded values are zeroed before it).
    """

    def __init__(self, dim: int, num_heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_heads, self.dim_head = num_heads, dim_head
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * num_heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(num_heads * dim_head, dim), nn.Dropout(dropout))
        pad = residual_kernel // 2
        self.res_conv = nn.Conv2d(num_heads, num_heads, (residual_kernel, 1), padding=(pad, 0),
                                  groups=num_heads, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None,
                query0_key_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``x [B, L, dim]``, ``mask [B, L]`` -> (out ``[B, L, dim]``, optional ``[B, H, L]``).

        When ``query0_key_mask [B, L]`` is given, also returns the exact softmax attention of token 0's
        query over the keys where that mask is True (used for class-token heatmaps).
        """
        b, n, _ = x.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        x = x * mask[..., None]  # padded tokens: zero values (they feed the residual conv)
        q, k, v = (t.view(b, n, self.num_heads, self.dim_head).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))  # [B, H, L, d] each
        # min(m, L) slots: a bag never uses more landmarks than it has tokens (unused slots change nothing)
        pool, lm_mask = _landmark_pool(mask, min(self.num_landmarks, n), x.dtype)  # [B, m, L], [B, m]
        # to_qkv is linear without bias, so the mean of projected tokens = projection of the mean token.
        q_l, k_l, _ = (t.view(b, -1, self.num_heads, self.dim_head).transpose(1, 2)
                       for t in self.to_qkv(pool @ x).chunk(3, dim=-1))  # [B, H, m, d] each
        k_l = k_l * self.scale
        key_mask = mask[:, None, None, :]  # [B, 1, 1, L]
        # Rows of kernel1 always have a landmark; kernel3 rows of unused landmark slots meet zero columns
        # of kernel1, so neither needs its fully-masked rows zeroed.
        kernel1 = masked_softmax(q @ k_l.transpose(-1, -2), lm_mask[:, None, None, :], zero_empty=False)
        lm_pair = lm_mask[:, None, :, None] & lm_mask[:, None, None, :]  # [B, 1, m, m]
        kernel2 = masked_softmax(q_l @ k_l.transpose(-1, -2), lm_pair)  # [B, H, m, m]
        eye = torch.eye(lm_mask.shape[1], device=x.device, dtype=kernel2.dtype)
        kernel2 = kernel2 + eye * (~lm_mask)[:, None, :, None]  # unused slots: identity block
        kernel3 = masked_softmax((q_l * self.scale) @ k.transpose(-1, -2), key_mask, zero_empty=False)
        context = kernel3 @ v  # [B, H, m, d]
        with torch.autocast(x.device.type, enabled=False):  # the m×m pseudo-inverse is cheap: keep it in fp32
            pinv = _newton_schulz_pinv(kernel2.float(), self.pinv_iterations).to(kernel2.dtype)
        out = kernel1 @ (pinv @ context)  # [B, H, L, d]
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.dim_head)
        out = self.to_out(out) * mask[..., None]  # [B, L, dim]
        attn0 = None
        if query0_key_mask is not None:
            scores = (q[:, :, :1] * self.scale) @ k.transpose(-1, -2)  # [B, H, 1, L]
            attn0 = masked_softmax(scores.squeeze(2), query0_key_mask[:, None, :])  # [B, H, L]
        return out, attn0


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depth-wise 7×7, 5×5, 3×3 convs on the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: Tensor, side: int) -> Tensor:
        """``tokens [B, side*side, dim]`` (no class token) -> same shape."""
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, side, side)  # [B, dim, s, s]
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return grid.flatten(2).transpose(1, 2)
