"""NCMILoss against a slow explicit-loop reference written from NCMI.md §2, plus modes and edge cases."""

import pytest
import torch

from wsi_ncmi.ncmi import NCMIError, NCMILoss, log_nsf


# --------------------------------------------------------------------------- the reference
def _nsf_vec(v):
    s = 1.0 / (1.0 + torch.exp(-v))
    return s / s.sum()


def _kl(a, b):
    total = 0.0
    for d in range(a.shape[0]):
        total = total + a[d] * (torch.log(a[d]) - torch.log(b[d]))
    return total


def reference(features, target, xi, num_classes, k, tau, variant, center):
    """Loops over samples, classes and centroids; centroid m = v*k + j. Returns (loss, cmi, gamma)."""
    b = features.shape[0]
    ps = []
    for i in range(b):
        z = features[i] - center if center is not None else features[i]
        z = z / torch.sqrt((z * z).sum()) / tau
        ps.append(_nsf_vec(z))
    qs = [_nsf_vec(xi[m]) for m in range(num_classes * k)]
    labels = [int(t) for t in target]

    def own(i):  # nearest centroid of the true class
        return torch.stack([_kl(ps[i], qs[labels[i] * k + j]) for j in range(k)]).min()

    def sep(i, v):  # mean over the class's centroids of KL(q || p_i)
        return sum(_kl(qs[v * k + j], ps[i]) for j in range(k)) / k

    if variant == "paper":
        cmi = sum(own(i) for i in range(b)) / b
        counts = [labels.count(v) for v in range(num_classes)]
        pairs = sum(counts[v] for i in range(b) for v in range(num_classes) if v != labels[i])
        if pairs > 0:
            gamma = 0.0
            for i in range(b):
                for v in range(num_classes):
                    if v != labels[i]:
                        gamma = gamma + counts[v] * sep(i, v)
            gamma = gamma / b**2
        else:  # one-class batch: documented uniform fallback
            gamma = 0.0
            for i in range(b):
                for v in range(num_classes):
                    if v != labels[i]:
                        gamma = gamma + sep(i, v)
            gamma = gamma / (b * (num_classes - 1))
        return cmi / gamma, cmi, gamma
    if variant == "harmonic":  # per sample: a_i times the mean over other classes v of 1 / R_i^v
        losses, cmis, gammas = [], [], []
        for i in range(b):
            inv = sum(1.0 / sep(i, v) for v in range(num_classes) if v != labels[i]) / (num_classes - 1)
            losses.append(own(i) * inv)
            cmis.append(own(i))
            gammas.append(1.0 / inv)  # harmonic mean of the separations
        return sum(losses) / b, sum(cmis) / b, sum(gammas) / b
    ratios, cmis, gammas = [], [], []
    for i in range(b):
        g = sum(sep(i, v) for v in range(num_classes) if v != labels[i]) / num_classes
        a = own(i)
        ratios.append((a + 1e-10) / g)
        cmis.append(a)
        gammas.append(g)
    return sum(ratios) / b, sum(cmis) / b, sum(gammas) / b


CASES = [
    # (B, C, D, K, labels)
    (8, 3, 5, 1, [0, 1, 2, 0, 1, 2, 0, 0]),
    (7, 4, 6, 2, [0, 1, 1, 3, 3, 0, 1]),  # class 2 absent
    (6, 5, 3, 1, [4, 0, 0, 2, 1, 4]),  # D < C, class 3 absent
    (5, 6, 4, 3, [5, 5, 1, 0, 2]),  # D < C, K = 3
    (5, 3, 4, 2, [1, 1, 1, 1, 1]),  # one-class batch
]


def _make(case, variant, seed=0):
    b, c, d, k, labels = case
    torch.manual_seed(seed)
    loss = NCMILoss(c, d, tau=0.7, variant=variant, centroids_per_class=k, center_momentum=0.9).double()
    with torch.no_grad():
        loss.xi.copy_(torch.randn(c * k, d, dtype=torch.float64) * 2.0)
    feats = (torch.randn(b, d, dtype=torch.float64) + 0.5).requires_grad_(True)
    return loss, feats, torch.tensor(labels)


@pytest.mark.parametrize("variant", ["paper", "official", "harmonic"])
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}C{c[1]}D{c[2]}K{c[3]}" for c in CASES])
def test_loss_and_gradients_match_reference(case, variant):
    loss_mod, feats, target = _make(case, variant)
    out = loss_mod(feats, target)
    center = feats.detach().mean(0)  # first training batch initialises the center
    torch.testing.assert_close(loss_mod.center.center, center)
    xi_ref = loss_mod.xi.detach().clone().requires_grad_(True)
    feats_ref = feats.detach().clone().requires_grad_(True)
    ref_loss, ref_cmi, ref_gamma = reference(
        feats_ref, target, xi_ref, case[1], case[3], 0.7, variant, center
    )
    torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["cmi"], ref_cmi, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["gamma"], ref_gamma, rtol=1e-6, atol=1e-9)
    g_f, g_xi = torch.autograd.grad(out["loss"], [feats, loss_mod.xi])
    r_f, r_xi = torch.autograd.grad(ref_loss, [feats_ref, xi_ref])
    torch.testing.assert_close(g_f, r_f, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_xi, r_xi, rtol=1e-6, atol=1e-9)
    assert float(out["loss"].detach()) > 0


def test_one_class_batch_is_finite_positive_and_uses_fallback():
    loss_mod, feats, target = _make(CASES[-1], "paper")
    out = loss_mod(feats, target)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and out["gamma"] > 0
    g = torch.autograd.grad(out["loss"], feats)[0]
    assert torch.isfinite(g).all()


def test_public_init_d_ge_c():
    loss_mod = NCMILoss(3, 5)
    expected = torch.full((3, 5), 1e-6)
    expected[:, :3] += 10 * torch.eye(3)
    torch.testing.assert_close(loss_mod.xi.data, expected, rtol=0, atol=0)
    torch.manual_seed(0)
    multi = NCMILoss(3, 5, centroids_per_class=2)
    torch.testing.assert_close(multi.xi.data[0::2], expected, rtol=0, atol=0)  # k = 0 rows: public init
    assert not torch.allclose(multi.xi.data[1::2], expected)  # k >= 1: perturbed, distinct
    assert (multi.xi.data[1::2] - expected).abs().max() < 10


def test_init_d_lt_c_is_seeded_and_scaled():
    torch.manual_seed(3)
    a = NCMILoss(10, 4, centroids_per_class=2).xi.data
    torch.manual_seed(3)
    b = NCMILoss(10, 4, centroids_per_class=2).xi.data
    assert a.shape == (20, 4)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.full((20,), 10.0))
    assert torch.linalg.matrix_rank(a) == 4


@pytest.mark.parametrize("variant,k", [("paper", 1), ("official", 1), ("paper", 2), ("harmonic", 2)])
def test_gradcheck_small(variant, k):
    torch.manual_seed(5)
    loss_mod = NCMILoss(3, 4, tau=0.8, variant=variant, centroids_per_class=k).double().eval()
    with torch.no_grad():
        loss_mod.xi.copy_(torch.randn(3 * k, 4, dtype=torch.float64))
        loss_mod.center.center.copy_(torch.randn(4, dtype=torch.float64) * 0.1)
    feats = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    xi = loss_mod.xi.detach().clone().requires_grad_(True)
    target = torch.tensor([0, 1, 2, 1, 0])

    def fn(f, x):
        return torch.func.functional_call(loss_mod, {"xi": x}, (f, target))["loss"]

    assert torch.autograd.gradcheck(fn, (feats, xi))


@pytest.mark.parametrize("variant", ["paper", "official", "harmonic"])
def test_zero_rows_and_huge_features_are_finite(variant):
    loss_mod = NCMILoss(4, 6, variant=variant)
    zeros = torch.zeros(5, 6, requires_grad=True)
    out = loss_mod(zeros, torch.tensor([0, 1, 2, 3, 0]))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    g = torch.autograd.grad(out["loss"], [zeros, loss_mod.xi])
    assert all(torch.isfinite(t).all() for t in g)
    torch.testing.assert_close(loss_mod.log_probs(torch.zeros(2, 6)).exp(), torch.full((2, 6), 1 / 6))
    torch.manual_seed(0)
    huge = (torch.randn(8, 6) * 1e6).requires_grad_(True)
    loss2 = NCMILoss(4, 6, variant=variant, use_centering=False)
    out2 = loss2(huge, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert torch.isfinite(out2["loss"]) and out2["loss"] > 0
    g2 = torch.autograd.grad(out2["loss"], [huge, loss2.xi])
    assert all(torch.isfinite(t).all() for t in g2)
    centred = NCMILoss(4, 6, variant=variant)  # with the center: first batch small, second batch 1e6-scale
    centred(torch.randn(8, 6), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    out3 = centred(huge, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert torch.isfinite(out3["loss"]) and out3["loss"] > 0
    assert torch.isfinite(torch.autograd.grad(out3["loss"], huge)[0]).all()


def test_frozen_centroids_get_no_gradient():
    loss_mod = NCMILoss(3, 4, centroid_update="frozen")
    assert not loss_mod.xi.requires_grad
    before = loss_mod.xi.detach().clone()
    feats = torch.randn(6, 4, requires_grad=True)
    out = loss_mod(feats, torch.tensor([0, 1, 2, 0, 1, 2]))
    out["loss"].backward()
    assert loss_mod.xi.grad is None
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    torch.testing.assert_close(loss_mod.xi.data, before, rtol=0, atol=0)


def test_sgd_centroids_train_and_reduce_loss():
    torch.manual_seed(0)
    loss_mod = NCMILoss(3, 8, centroid_update="sgd", use_centering=False)
    assert loss_mod.xi.requires_grad
    feats = torch.randn(12, 8)
    target = torch.arange(12) % 3
    first = loss_mod(feats, target)["loss"].item()
    for _ in range(10):  # plain gradient steps on ξ (torch.optim's first use is slow to import)
        (grad,) = torch.autograd.grad(loss_mod(feats, target)["loss"], loss_mod.xi)
        assert grad.abs().sum() > 0
        with torch.no_grad():
            loss_mod.xi -= 2.0 * grad
    assert loss_mod(feats, target)["loss"].item() < first


def test_ema_centroids_move_toward_class_means():
    torch.manual_seed(0)
    loss_mod = NCMILoss(4, 5, tau=0.5, centroid_update="ema", ema_momentum=0.8, use_centering=False)
    assert not loss_mod.xi.requires_grad
    before = loss_mod.xi.detach().clone()
    feats = torch.randn(6, 5)
    target = torch.tensor([0, 0, 1, 3, 3, 3])  # class 2 absent
    out = loss_mod(feats, target)
    zs = torch.nn.functional.normalize(feats, dim=1) / 0.5
    for v in range(4):
        sel = target == v
        if sel.any():
            expected = 0.8 * before[v] + 0.2 * zs[sel].mean(0)
        else:
            expected = before[v]
        torch.testing.assert_close(loss_mod.xi.data[v], expected)
    # the loss of that batch used the centroids from before the update
    ref = NCMILoss(4, 5, tau=0.5, centroid_update="frozen", use_centering=False)
    ref.xi.data.copy_(before)
    torch.testing.assert_close(out["loss"], ref(feats, target)["loss"])
    loss_mod.eval()
    after = loss_mod.xi.detach().clone()
    loss_mod(feats, target)
    torch.testing.assert_close(loss_mod.xi.data, after, rtol=0, atol=0)


def test_ema_multi_centroid_moves_only_nearest():
    loss_mod = NCMILoss(
        2, 3, tau=1.0, centroid_update="ema", centroids_per_class=2, ema_momentum=0.5, use_centering=False
    )
    with torch.no_grad():
        loss_mod.xi.copy_(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, 0, 0]]))
    before = loss_mod.xi.detach().clone()
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # class 0 near centroid 0; class 1 near 2
    loss_mod(feats, torch.tensor([0, 1]))
    torch.testing.assert_close(loss_mod.xi.data[0], 0.5 * before[0] + 0.5 * feats[0])
    torch.testing.assert_close(loss_mod.xi.data[2], 0.5 * before[2] + 0.5 * feats[1])
    torch.testing.assert_close(loss_mod.xi.data[[1, 3]], before[[1, 3]], rtol=0, atol=0)


def test_switches_softmax_and_no_centering():
    torch.manual_seed(0)
    feats = torch.randn(4, 6) + 2.0
    sm = NCMILoss(3, 6, use_nsf=False, use_centering=False, tau=0.5)
    zs = torch.nn.functional.normalize(feats, dim=1) / 0.5
    torch.testing.assert_close(sm.log_probs(feats), torch.log_softmax(zs, 1))
    torch.testing.assert_close(sm.centroid_log_probs(), torch.log_softmax(sm.xi, 1))
    sm.train()(feats, torch.tensor([0, 1, 2, 0]))
    assert not bool(sm.center.initialized)  # centering disabled: never touched
    ns = NCMILoss(3, 6, use_centering=True, tau=0.5)
    ns(feats, torch.tensor([0, 1, 2, 0]))
    zc = torch.nn.functional.normalize(feats - feats.mean(0), dim=1) / 0.5
    torch.testing.assert_close(ns.log_probs(feats), log_nsf(zc))
    torch.testing.assert_close(ns.centroid_log_probs(), log_nsf(ns.xi))


def test_log_probs_and_normalized_do_not_update_center():
    loss_mod = NCMILoss(3, 4, center_momentum=0.5)
    feats = torch.randn(5, 4)
    loss_mod(feats, torch.tensor([0, 1, 2, 0, 1]))
    c = loss_mod.center.center.clone()
    lp = loss_mod.log_probs(torch.randn(7, 4) * 3)
    nz = loss_mod.normalized(torch.randn(7, 4) * 3)
    torch.testing.assert_close(loss_mod.center.center, c, rtol=0, atol=0)
    assert lp.shape == (7, 4) and nz.shape == (7, 4)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(7))
    torch.testing.assert_close(nz.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(loss_mod.normalized(feats), torch.nn.functional.normalize(feats - c, dim=1))


def test_eval_mode_freezes_center_and_is_deterministic():
    loss_mod = NCMILoss(3, 4).eval()
    feats = torch.randn(5, 4)
    t = torch.tensor([0, 1, 2, 0, 1])
    a, b = loss_mod(feats, t)["loss"], loss_mod(feats, t)["loss"]
    torch.testing.assert_close(a, b)
    assert not bool(loss_mod.center.initialized)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = NCMILoss(3, 4, centroids_per_class=2)
    a(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    sd = a.state_dict()
    assert {"xi", "center.center", "center.initialized"} <= set(sd)
    b = NCMILoss(3, 4, centroids_per_class=2)
    b.load_state_dict(sd)
    a.eval()
    b.eval()
    f = torch.randn(3, 4)
    torch.testing.assert_close(a.log_probs(f), b.log_probs(f))


def test_bad_inputs_raise_value_error():
    loss_mod = NCMILoss(3, 4)
    t = torch.tensor([0, 1])
    with pytest.raises(NCMIError, match="feature dim 5"):
        loss_mod(torch.randn(2, 5), t)
    with pytest.raises(ValueError, match="2-D"):
        loss_mod(torch.randn(2, 4, 1), t)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        loss_mod(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be in"):
        loss_mod(torch.randn(2, 4), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer"):
        loss_mod(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        loss_mod(torch.randn(2, 4), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="2 features"):
        loss_mod(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="variant"):
        NCMILoss(3, 4, variant="nope")
    with pytest.raises(ValueError, match="centroid_update"):
        NCMILoss(3, 4, centroid_update="adam")
    with pytest.raises(ValueError, match="num_classes"):
        NCMILoss(1, 4)
    nan = torch.randn(2, 4)
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        NCMILoss(3, 4, check_finite=True)(nan, t)
    NCMILoss(3, 4)(nan, t)  # the check is opt-in: no error without it


def test_extra_repr_and_input_kind():
    r = repr(NCMILoss(3, 4, variant="official", centroid_update="ema"))
    assert "variant='official'" in r and "centroid_update='ema'" in r
    assert NCMILoss.input_kind == "embedding"


def test_autocast_bf16_runs_in_float32():
    loss_mod = NCMILoss(3, 8)
    feats = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_mod(feats.to(torch.bfloat16), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out["loss"].dtype == torch.float32
    ref = NCMILoss(3, 8)
    torch.testing.assert_close(
        out["loss"], ref(feats.to(torch.bfloat16).float(), torch.tensor([0, 1, 2, 0, 1, 2]))["loss"]
    )


def test_last_log_probs_is_the_forward_simplex_point() -> None:
    torch.manual_seed(0)
    loss = NCMILoss(num_classes=3, embed_dim=5, tau=0.4)
    assert loss.last_log_probs is None
    f, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    loss(f, y)  # training mode: the center is updated before it is used
    assert loss.last_log_probs is not None and not loss.last_log_probs.requires_grad
    assert torch.allclose(loss.last_log_probs, loss.log_probs(f), atol=1e-6)


def test_harmonic_separation_is_not_fooled_by_one_far_class():
    """The MIL failure of the arithmetic Γ (docs/ncmi_mil.md): a misclassified sample (nearest centroid: class
    1) that is far from class 2 gets a *lower* paper-variant loss than a correctly classified one, so training
    has no reason to fix it. The harmonic separation ranks the two the right way round."""
    xi = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]])
    right = torch.tensor([[-0.29, -0.61, -0.43, 0.73]])  # class 0, nearest centroid class 0
    wrong = torch.tensor([[0.69, 2.24, -0.27, -0.03]])  # class 0, nearest centroid class 1
    target = torch.tensor([0])
    loss = {}
    for variant in ("paper", "official", "harmonic"):
        m = NCMILoss(3, 4, tau=0.25, variant=variant, use_centering=False, centroid_update="frozen")
        with torch.no_grad():
            m.xi.copy_(xi)
        if variant == "paper":
            log_q = m.centroid_log_probs()
            for f, expected in ((right, 0), (wrong, 1)):
                log_p = m.log_probs(f)
                kls = (log_p.exp() * log_p).sum(1, keepdim=True) - log_p.exp() @ log_q.T
                assert int(kls.argmin()) == expected
        loss[variant] = (float(m(right, target)["loss"]), float(m(wrong, target)["loss"]))
    assert loss["paper"][1] < loss["paper"][0] and loss["official"][1] < loss["official"][0], loss
    assert loss["harmonic"][1] > 1.5 * loss["harmonic"][0], loss


def test_init_centroids_from_means_points_each_centroid_at_its_class():
    torch.manual_seed(0)
    c, d, k = 3, 6, 2
    loss = NCMILoss(c, d, centroids_per_class=k, centroid_update="frozen")
    before = loss.xi.detach().clone()
    means = torch.zeros(c, d)
    means[0, 3], means[1, 4] = 1.0, 1.0  # class 2 absent
    present = torch.tensor([True, True, False])
    loss.init_centroids_from_means(means, present)
    xi = loss.xi.detach()
    centred = means[:2] - means[:2].mean(0)
    for v in range(2):
        for j in range(k):
            row = xi[v * k + j]
            assert abs(float(row.norm()) - 10.0) < 1e-4
            cos = float(torch.nn.functional.cosine_similarity(row, centred[v], dim=0))
            assert cos > (0.999 if j == 0 else 0.5), (v, j, cos)
    assert not torch.equal(xi[0], xi[1])  # the extra centroid of a class is distinct
    assert torch.equal(xi[4:], before[4:])  # the absent class keeps its rows
    with pytest.raises(ValueError, match="at least two classes"):
        loss.init_centroids_from_means(means, torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match=r"expected means \[3, 6\]"):
        loss.init_centroids_from_means(means[:2], present)


def test_class_scores_are_minus_kl_to_the_nearest_centroid_of_each_class():
    torch.manual_seed(0)
    c, d, k, b = 3, 8, 2, 5
    loss = NCMILoss(c, d, centroids_per_class=k, tau=0.5).eval()
    loss.xi.data.add_(torch.randn_like(loss.xi))
    feats = torch.randn(b, d, dtype=torch.float64)
    p = loss.log_probs(feats).exp()  # [B, D]
    q = loss.centroid_log_probs().exp().double()  # [C*K, D]
    kl = (p[:, None, :] * (p[:, None, :].log() - q[None].log())).sum(-1)  # [B, C*K], the direct sum
    expected = -kl.view(b, c, k).min(dim=2).values
    scores = loss.class_scores(feats)
    assert scores.shape == (b, c)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(loss.centroid_kl(loss.log_probs(feats)), -expected)
    assert not bool(loss.center.initialized)  # scoring never touches the feature center
