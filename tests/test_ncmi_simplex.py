"""NSF / log-NSF numerics and FeatureCenter semantics (NCMI.md §1)."""

import pytest
import torch

from wsi_ncmi.ncmi import FeatureCenter, NCMIError, log_nsf, nsf


def _reference_nsf64(z: torch.Tensor) -> torch.Tensor:
    s = 1.0 / (1.0 + torch.exp(-z.double()))
    return s / s.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("scale", [1.0, 10.0, 50.0])
def test_nsf_matches_float64_definition(scale):
    torch.manual_seed(0)
    z = torch.randn(16, 33) * scale
    z[0, :5] = torch.tensor([50.0, -50.0, 0.0, 49.0, -49.9])
    ref = _reference_nsf64(z)
    p = nsf(z)
    torch.testing.assert_close(p.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.sum(-1), torch.ones(16), rtol=0, atol=1e-5)
    # the log is computed from the logs, so it is finite and accurate where the ratio is tiny
    lp = log_nsf(z)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp.double(), ref.log(), rtol=1e-5, atol=1e-5)


def test_log_nsf_extreme_values_finite_and_exact():
    z = torch.tensor([[-50.0, 50.0, 50.0], [-50.0, -50.0, -50.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    lp = log_nsf(z)
    assert torch.isfinite(lp).all()
    ref = _reference_nsf64(z).log()
    torch.testing.assert_close(lp, ref, rtol=1e-12, atol=1e-12)
    # float32 input with very negative entries: log(p) would be -inf after rounding, log_nsf must not be
    z32 = torch.tensor([[-50.0, 50.0, 10.0]])
    lp32 = log_nsf(z32)
    assert torch.isfinite(lp32).all()
    assert lp32[0, 0] < -45
    g = torch.autograd.grad(log_nsf(z32.requires_grad_()).sum(), z32)[0]
    assert torch.isfinite(g).all()


def test_nsf_dim_argument():
    z = torch.randn(3, 4, 5)
    torch.testing.assert_close(nsf(z, dim=1).sum(1), torch.ones(3, 5))
    torch.testing.assert_close(nsf(z, dim=1), nsf(z.transpose(1, 2), dim=-1).transpose(1, 2))


def test_nsf_differs_from_softmax():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    assert not torch.allclose(nsf(z), torch.softmax(z, -1))


def test_feature_center_first_batch_then_ema_then_frozen():
    torch.manual_seed(1)
    fc = FeatureCenter(4, momentum=0.9)
    assert not bool(fc.initialized)
    f1 = torch.randn(8, 4) + 3.0
    out1 = fc(f1)
    assert bool(fc.initialized)
    torch.testing.assert_close(fc.center, f1.mean(0))
    torch.testing.assert_close(out1, f1 - f1.mean(0))  # updated before use
    f2 = torch.randn(5, 4) - 1.0
    out2 = fc(f2)
    expected = 0.9 * f1.mean(0) + 0.1 * f2.mean(0)
    torch.testing.assert_close(fc.center, expected)
    torch.testing.assert_close(out2, f2 - expected)
    fc.eval()
    out3 = fc(torch.randn(6, 4) * 100)
    torch.testing.assert_close(fc.center, expected)  # frozen in eval
    assert out3.shape == (6, 4)


def test_feature_center_is_detached_buffer_in_state_dict():
    fc = FeatureCenter(3, momentum=0.5)
    f = torch.randn(4, 3, requires_grad=True)
    out = fc(f)
    assert not fc.center.requires_grad
    g = torch.autograd.grad(out.sum(), f)[0]
    torch.testing.assert_close(g, torch.ones(4, 3))  # the center carries no gradient
    sd = fc.state_dict()
    assert set(sd) == {"center", "initialized"}
    assert not any(n for n, _ in fc.named_parameters())
    fc2 = FeatureCenter(3, momentum=0.5)
    fc2.load_state_dict(sd)
    assert bool(fc2.initialized)
    torch.testing.assert_close(fc2.center, fc.center)
    # a loaded, initialised center is updated by EMA, not re-initialised
    f3 = torch.randn(4, 3)
    fc2(f3)
    torch.testing.assert_close(fc2.center, 0.5 * fc.center + 0.5 * f3.mean(0))


def test_feature_center_uninitialised_eval_is_identity():
    fc = FeatureCenter(3).eval()
    f = torch.randn(2, 3)
    torch.testing.assert_close(fc(f), f)
    assert not bool(fc.initialized)


def test_feature_center_bad_input():
    fc = FeatureCenter(3)
    with pytest.raises(NCMIError, match="expected features"):
        fc(torch.randn(2, 4))
    with pytest.raises(ValueError, match="momentum"):
        FeatureCenter(3, momentum=1.5)
