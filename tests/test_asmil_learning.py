"""ASMIL learning behaviour: gradients reach the student, the anchor is an EMA, a short training fits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wsi_ncmi.models import create_model

D = 16


def _witness_bags(n_bags: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Bags of N(0, I) instances; class-1 bags hold 1-3 witnesses shifted by 4 along a fixed direction."""
    g = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(D, generator=g), dim=0)
    bags = []
    for i in range(n_bags):
        y = i % 2
        n = int(torch.randint(8, 24, (1,), generator=g))
        x = torch.randn(n, D, generator=g)
        if y:
            k = int(torch.randint(1, 4, (1,), generator=g))
            x[torch.randperm(n, generator=g)[:k]] += 4.0 * direction
        bags.append((x[None], y))
    return bags


def _small_asmil(**kw: object) -> torch.nn.Module:
    return create_model("asmil", in_dim=D, num_classes=2, inner_dim=16, num_heads=2, n_token=4, n_drop=1, **kw)


def test_asmil_gradient_reaches_every_student_parameter_and_never_the_anchor() -> None:
    torch.manual_seed(0)
    model = _small_asmil().train()
    x, y = _witness_bags(2, seed=1)[1]
    out = model(x)
    (F.cross_entropy(out.logits, torch.tensor([y])) + out.aux["asmil_align"]).backward()
    anchor = {id(p) for p in model.anchor.parameters()}
    for name, p in model.named_parameters():
        if id(p) in anchor:
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # the alignment term alone moves the student queries (it is not detached from them)
    model.zero_grad()
    model(x).aux["asmil_align"].backward()
    assert model.student.query.grad.abs().sum() > 0


def test_asmil_anchor_follows_the_ema_recurrence_over_optimizer_steps() -> None:
    torch.manual_seed(0)
    decay = 0.8
    model = _small_asmil(anchor_decay=decay).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    expected = [p.detach().clone() for p in model.student.parameters()]  # anchor starts as the student
    for x, y in _witness_bags(4, seed=2):
        out = model(x)
        opt.zero_grad()
        (F.cross_entropy(out.logits, torch.tensor([y])) + out.aux["asmil_align"]).backward()
        opt.step()
        model.on_after_optimizer_step()
        expected = [decay * e + (1 - decay) * s.detach() for e, s in zip(expected, model.student.parameters())]
    for e, a in zip(expected, model.anchor.parameters(), strict=True):
        assert torch.allclose(a, e, atol=1e-6)
    moved = sum(float((a - s.detach()).abs().sum()) for a, s in zip(model.anchor.parameters(), model.student.parameters()))
    assert moved > 0  # the anchor lags the student: it is not a copy kept in sync
    assert all(not p.requires_grad for p in model.anchor.parameters())


def test_asmil_short_training_fits_witness_bags() -> None:
    """A few epochs of AdamW bring the training CE well below chance and classify every training bag."""
    torch.manual_seed(0)
    bags = _witness_bags(16, seed=3)
    model = _small_asmil(dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-5)

    def mean_ce() -> float:
        model.eval()
        with torch.no_grad():
            return float(torch.stack([F.cross_entropy(model(x).logits, torch.tensor([y])) for x, y in bags]).mean())

    ce0 = mean_ce()
    for _ in range(15):
        model.train()
        for i in torch.randperm(len(bags)).tolist():
            x, y = bags[i]
            out = model(x)
            opt.zero_grad()
            (F.cross_entropy(out.logits, torch.tensor([y])) + out.aux["asmil_align"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            model.on_after_optimizer_step()
    ce1 = mean_ce()
    model.eval()
    with torch.no_grad():
        correct = sum(int(model(x).logits.argmax()) == y for x, y in bags)
    assert ce1 < 0.5 * ce0 and ce1 < 0.2, (ce0, ce1)
    assert correct == len(bags)
