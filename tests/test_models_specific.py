"""Behaviour specific to each aggregator and to the shared layers."""

from __future__ import annotations

import math
import resource

import pytest
import torch
from torch import nn

from wsi_ncmi.models import MILConfigError, create_model
from wsi_ncmi.models.aem import negative_entropy
from wsi_ncmi.models.layers import (
    CrossAttentionBlock,
    GatedAttention,
    NystromAttention,
    default_inner_dim,
    masked_normalized_sigmoid,
    masked_softmax,
)

D = 12


# ------------------------------------------------------------------------------------------ layers
def test_masked_softmax_zero_on_padding_and_no_nan_when_empty() -> None:
    scores = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    out = masked_softmax(scores, mask)
    expected0 = torch.softmax(scores[0, [0, 1, 3]], dim=0)
    assert torch.allclose(out[0, [0, 1, 3]], expected0) and (out[0, [2, 4]] == 0).all()
    assert (out[1] == 0).all() and out[2, 0] == 1.0
    out.pow(2).sum().backward()
    assert torch.isfinite(scores.grad).all()


def test_masked_normalized_sigmoid_matches_definition() -> None:
    s = torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 0]]).bool()
    p = masked_normalized_sigmoid(s, mask, temperature=0.5)
    sig = torch.sigmoid(s / 0.5) * mask
    assert torch.allclose(p, sig / sig.sum(dim=1, keepdim=True), atol=1e-6)


def test_default_inner_dim_table() -> None:
    assert [default_inner_dim(d) for d in (384, 512, 768, 1024, 1536)] == [128, 256, 384, 512, 768]
    assert default_inner_dim(100) == 50 and default_inner_dim(1) == 1


def test_gated_attention_is_softmax_of_its_scores() -> None:
    torch.manual_seed(0)
    layer = GatedAttention(8, hidden=4)
    h = torch.randn(2, 5, 8)
    scores, attn = layer(h)
    manual = layer.w(torch.tanh(layer.V(h)) * torch.sigmoid(layer.U(h))).squeeze(-1)
    assert torch.allclose(scores, manual) and torch.allclose(attn, torch.softmax(manual, dim=1))


def test_cross_attention_block_matches_a_hand_computation() -> None:
    torch.manual_seed(0)
    block = CrossAttentionBlock(8, num_queries=2, num_heads=2, dropout=0.0).eval()
    h = torch.randn(1, 5, 8)
    res = block(h)
    q = block.q_proj(block.query).view(2, 2, 4)  # [Q, H, d]
    k = block.k_proj(h[0]).view(5, 2, 4)  # [N, H, d]
    v = block.v_proj(h[0]).view(5, 2, 4)
    a = torch.softmax(torch.einsum("qhd,nhd->qhn", q, k) / 2.0, dim=-1)  # [Q, H, N]
    ctx = torch.einsum("qhn,nhd->qhd", a, v).reshape(2, 8)
    assert torch.allclose(res.attention[0], a, atol=1e-6)
    assert torch.allclose(res.out[0], block.norm(block.out_proj(ctx)), atol=1e-5)


def test_nystrom_equals_exact_attention_when_every_token_is_a_landmark() -> None:
    torch.manual_seed(0)
    layer = NystromAttention(16, num_heads=2, dim_head=8, num_landmarks=64, pinv_iterations=30,
                             dropout=0.0).eval()
    x = torch.randn(1, 10, 16)
    out, _ = layer(x)
    q, k, v = (t.view(1, 10, 2, 8).transpose(1, 2) for t in layer.to_qkv(x).chunk(3, dim=-1))
    exact = torch.softmax(q @ k.transpose(-1, -2) * layer.scale, dim=-1) @ v + layer.res_conv(v)
    exact = layer.to_out(exact.transpose(1, 2).reshape(1, 10, 16))
    assert torch.allclose(out, exact, atol=1e-4)


def test_nystrom_padding_invariant_with_fewer_landmarks_than_tokens() -> None:
    torch.manual_seed(0)
    layer = NystromAttention(16, num_heads=2, dim_head=8, num_landmarks=4, dropout=0.0).eval()
    x = torch.randn(2, 30, 16)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :30], mask[1, :17] = True, True
    batch, attn0 = layer(x, mask, query0_key_mask=mask)
    single, single0 = layer(x[1:, :17], query0_key_mask=mask[1:, :17])
    assert torch.allclose(batch[1, :17], single[0], atol=1e-5) and (batch[1, 17:] == 0).all()
    assert torch.allclose(attn0[1, :, :17], single0[0], atol=1e-6) and (attn0[1, :, 17:] == 0).all()


# ------------------------------------------------------------------------------------------- ABMIL
def test_abmil_embedding_is_attention_weighted_sum() -> None:
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=1024, num_classes=2).eval()
    assert model.embed_dim == 512 and model.reduce.fc.bias is None
    x = torch.randn(1, 6, 1024)
    out = model(x)
    h = torch.relu(x[0] @ model.reduce.fc.weight.T)  # [N, 512]
    assert torch.allclose(out.embedding[0], (out.attention[0, :, None] * h).sum(0), atol=1e-5)


# --------------------------------------------------------------------------------------------- AEM
def _aem_by_hand(heads: torch.Tensor, lam: float) -> torch.Tensor:
    """λ · mean over bags of (1/H) Σ_h Σ_n a log a, summing real (a > 0) instances with explicit loops."""
    b, h, n = heads.shape
    total = 0.0
    for i in range(b):
        per_bag = 0.0
        for j in range(h):
            per_bag += sum(float(a) * math.log(float(a)) for a in heads[i, j] if a > 0)
        total += per_bag / h
    return torch.tensor(lam * total / b)


def test_aem_aux_equals_lambda_negative_entropy() -> None:
    torch.manual_seed(0)
    model = create_model("aem", in_dim=D, num_classes=3, aem_lambda=0.3).train()
    x = torch.randn(2, 9, D)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(x, mask)
    assert out.attention_heads.shape == (2, 8, 9)
    assert torch.allclose(out.aux["aem_entropy"], _aem_by_hand(out.attention_heads.detach(), 0.3), atol=1e-5)
    out.aux["aem_entropy"].backward()
    assert torch.isfinite(model.attention.query.grad).all()


def test_negative_entropy_padding_and_heads_by_hand() -> None:
    """Padding (a = 0) adds nothing, heads are averaged, bags are averaged, and 0 log 0 has a finite grad."""
    att = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])  # [B=2, N=3], bag 0 padded at n=2
    neg_h = [2 * 0.5 * math.log(0.5), 0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)]
    assert negative_entropy(att[:, None]).item() == pytest.approx(sum(neg_h) / 2, abs=1e-6)
    second = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    heads = torch.stack([att, second], dim=1).requires_grad_(True)  # [B, H=2, N]
    neg_h2 = [0.0, math.log(1 / 3)]
    expected = sum((a + b) / 2 for a, b in zip(neg_h, neg_h2, strict=True)) / 2
    value = negative_entropy(heads)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()
    assert torch.isfinite(heads.grad).all()


def test_aem_lambda_schedule() -> None:
    const = create_model("aem", in_dim=D, num_classes=3)
    cos = create_model("aem", in_dim=D, num_classes=3, lambda_schedule="cosine", aem_lambda=0.2)
    const.set_progress(0.7)
    assert const.aem_lambda == pytest.approx(0.1)
    for t, lam in [(0.0, 0.2), (0.5, 0.1), (1.0, 0.0), (2.0, 0.0)]:
        cos.set_progress(t)
        assert cos.aem_lambda == pytest.approx(lam, abs=1e-12)
    cos.train()
    assert cos(torch.randn(1, 5, D)).aux["aem_entropy"] == 0
    with pytest.raises(MILConfigError, match="lambda_schedule"):
        create_model("aem", in_dim=D, num_classes=3, lambda_schedule="linear")


# ------------------------------------------------------------------------------------------- ASMIL
def test_asmil_anchor_ema_moves_toward_student_and_gets_no_grad() -> None:
    torch.manual_seed(0)
    model = create_model("asmil", in_dim=D, num_classes=3, anchor_decay=0.9).train()
    assert all(not p.requires_grad for p in model.anchor.parameters())
    out = model(torch.randn(1, 7, D))
    (out.logits.sum() + out.aux["asmil_align"]).backward()
    assert all(p.grad is None for p in model.anchor.parameters())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.anchor.parameters()]
    dist0 = sum((a - s).norm() for a, s in zip(model.anchor.parameters(), model.student.parameters()))
    model.on_after_optimizer_step()
    for a0, a, s in zip(before, model.anchor.parameters(), model.student.parameters()):
        assert torch.allclose(a, 0.9 * a0 + 0.1 * s, atol=1e-6)
    dist1 = sum((a - s).norm() for a, s in zip(model.anchor.parameters(), model.student.parameters()))
    assert dist1 < dist0
    trainable = [p for p in model.parameters() if p.requires_grad]  # what the optimizer must receive
    assert len(trainable) == len(list(model.parameters())) - len(list(model.anchor.parameters()))


def test_asmil_align_loss_by_hand() -> None:
    torch.manual_seed(0)
    model = create_model("asmil", in_dim=D, num_classes=3, align_weight=2.0).train()
    with torch.no_grad():
        for p in model.anchor.parameters():
            p.add_(0.3 * torch.randn_like(p))  # make the anchor differ from the student
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out = model(x, mask)
    h = model.reduce(x)
    s_logits, a_logits = model.student.attention_logits(h), model.anchor.attention_logits(h)  # [B, T, H, N]
    losses = []
    for b in range(2):
        n = int(mask[b].sum())
        sig = torch.sigmoid(a_logits[b, ..., :n] / 0.5)
        p = sig / sig.sum(-1, keepdim=True)
        losses.append(-(p * torch.log_softmax(s_logits[b, ..., :n], dim=-1)).sum(-1) / n)  # [T, H] mean over N
    assert torch.allclose(out.aux["asmil_align"], 2.0 * torch.stack(losses).mean(), atol=1e-5)


def test_asmil_token_dropping_only_in_training() -> None:
    model = create_model("asmil", in_dim=D, num_classes=3, n_token=6, n_drop=2, dropout=0.0)
    model.eval()
    assert model._keep_tokens(torch.device("cpu")).tolist() == list(range(6))
    model.train()
    draws = {tuple(model._keep_tokens(torch.device("cpu")).tolist()) for _ in range(20)}
    assert all(len(d) == 4 and len(set(d)) == 4 and list(d) == sorted(d) for d in draws) and len(draws) > 1
    x = torch.randn(1, 5, D)
    embs = {tuple(model.forward_features(x).embedding[0, :3].tolist()) for _ in range(10)}
    assert len(embs) > 1  # branches differ between training steps
    model.eval()
    assert torch.equal(model(x).embedding, model(x).embedding)
    with pytest.raises(MILConfigError, match="n_drop"):
        create_model("asmil", in_dim=D, num_classes=3, n_token=2, n_drop=2)


# ---------------------------------------------------------------------------------------- TransMIL
def test_transmil_padding_invariant_with_few_landmarks() -> None:
    torch.manual_seed(0)
    model = create_model("transmil", in_dim=D, num_classes=3, dim=32, num_heads=2, dim_head=16,
                         num_landmarks=4).eval()
    x = torch.randn(2, 40, D)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0], mask[1, ::3] = True, True  # bag 1: every third instance
    with torch.no_grad():
        batch = model(x, mask)
        for b in range(2):
            single = model(x[b : b + 1, mask[b]])
            assert torch.allclose(batch.logits[b], single.logits[0], atol=1e-5)
            assert torch.allclose(batch.attention[b, mask[b]], single.attention[0], atol=1e-6)


def test_transmil_class_attention_is_exact_softmax_over_real_instances() -> None:
    torch.manual_seed(0)
    model = create_model("transmil", in_dim=D, num_classes=3, dim=32, num_heads=2, dim_head=16).eval()
    x = torch.randn(1, 5, D)  # squared to 9 tokens: 4 repeats must get no attention
    captured = {}
    model.layer2.attn.register_forward_hook(lambda m, i, o: captured.update(x=i[0]))
    out = model(x)
    attn = model.layer2.attn
    q, k, _ = (t.view(1, 10, 2, 16).transpose(1, 2) for t in attn.to_qkv(captured["x"]).chunk(3, dim=-1))
    manual = torch.softmax((q[:, :, :1] @ k[:, :, 1:6].transpose(-1, -2)).squeeze(2) * attn.scale, -1)
    assert torch.allclose(out.attention_heads, manual, atol=1e-6)


def test_transmil_20k_instances_without_quadratic_memory() -> None:
    """N = 20,000: an N×N float32 matrix per head would need 1.6 GB; we allow far less growth."""
    torch.manual_seed(0)
    model = create_model("transmil", in_dim=D, num_classes=3, dim=32, num_heads=2, dim_head=16).eval()
    x = torch.randn(1, 20_000, D)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with torch.no_grad():
        out = model(x)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024
    assert out.attention.shape == (1, 20_000) and torch.isfinite(out.logits).all()
    assert torch.allclose(out.attention.sum(), torch.tensor(1.0), atol=1e-4)
    assert grown_mb < 600, f"peak RSS grew by {grown_mb:.0f} MB"


def test_transmil_any_in_dim_and_squaring_sizes() -> None:
    for n in (1, 2, 3, 5, 17):
        model = create_model("transmil", in_dim=7, num_classes=2, dim=16, num_heads=2, dim_head=8).eval()
        out = model(torch.randn(1, n, 7))
        assert out.logits.shape == (1, 2) and out.attention.shape == (1, n)


def test_models_accept_unusual_in_dim() -> None:
    for name in ("abmil", "aem", "asmil"):
        model = create_model(name, in_dim=10, num_classes=2).eval()  # inner 5: not divisible by 8 heads
        assert model(torch.randn(2, 4, 10)).logits.shape == (2, 2)
        assert isinstance(model.head, nn.Linear)
