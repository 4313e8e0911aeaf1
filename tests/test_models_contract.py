"""Every registered MIL aggregator honours the contract of wsi_ncmi.models.base (docs/internals.md)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from wsi_ncmi.models import (
    INPUT_NORMS,
    BagFeatures,
    InputNorm,
    MILAggregator,
    MILConfigError,
    MILInputError,
    MILOutput,
    create_model,
    list_models,
    register_model,
)

D, C = 12, 3
MODELS = list_models()
ATOL = 1e-5


def make(name: str, seed: int = 0, **kw) -> MILAggregator:
    torch.manual_seed(seed)
    return create_model(name, in_dim=D, num_classes=C, **kw)


def padded_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch; the last bag gets a scattered (non-prefix) mask."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, D, generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, nb in enumerate(lengths[:-1]):
        mask[b, :nb] = True
    mask[-1, torch.randperm(n, generator=g)[: lengths[-1]]] = True
    x[~mask] = 100.0  # garbage in the padding must not matter
    return x, mask


def test_registry_lists_the_four_models() -> None:
    assert {"abmil", "transmil", "aem", "asmil"} <= set(MODELS)
    assert MODELS == sorted(MODELS)


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'.*abmil.*asmil"):
        create_model("nope", in_dim=D, num_classes=C)


def test_register_model_refuses_duplicate_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("abmil")(lambda **kw: None)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 7])
def test_forward_shapes_and_attention(name: str, n: int) -> None:
    model = make(name).eval()
    x = torch.randn(1, n, D)
    out = model(x)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (1, C)
    assert out.embedding.shape == (1, model.embed_dim)
    assert out.attention.shape == (1, n)
    assert torch.allclose(out.attention.sum(dim=1), torch.ones(1), atol=1e-6)
    assert (out.attention >= 0).all()
    if out.attention_heads is not None:
        assert out.attention_heads.shape[0] == 1 and out.attention_heads.shape[-1] == n
        assert torch.allclose(out.attention_heads.mean(dim=1), out.attention, atol=1e-6)
    feats = model.forward_features(x)
    assert isinstance(feats, BagFeatures)
    assert torch.equal(model.forward_head(feats.embedding, pre_logits=True), feats.embedding)
    assert torch.allclose(model.forward_head(feats.embedding), out.logits)


@pytest.mark.parametrize("name", MODELS)
def test_padded_batch_equals_each_bag(name: str) -> None:
    model = make(name).eval()
    lengths = [7, 1, 12, 9]
    x, mask = padded_batch(lengths)
    with torch.no_grad():
        batch = model(x, mask)
        assert torch.allclose(batch.attention.sum(dim=1), torch.ones(len(lengths)), atol=1e-6)
        assert (batch.attention[~mask] == 0).all()
        for b in range(len(lengths)):
            single = model(x[b : b + 1, mask[b]])
            assert torch.allclose(batch.logits[b], single.logits[0], atol=ATOL)
            assert torch.allclose(batch.embedding[b], single.embedding[0], atol=ATOL)
            assert torch.allclose(batch.attention[b, mask[b]], single.attention[0], atol=ATOL)


@pytest.mark.parametrize("name", MODELS)
def test_bag_center_ignores_a_shift_shared_by_the_bag_and_keeps_padding_invariance(name: str) -> None:
    import typing

    assert set(typing.get_args(InputNorm)) == set(INPUT_NORMS)
    model = make(name).eval()
    model.set_input_norm("bag_center")
    lengths = [7, 1, 12, 9]
    x, mask = padded_batch(lengths)
    shift = 3.0 * torch.randn(len(lengths), 1, D)  # one offset per bag, e.g. a centre's stain through the encoder
    with torch.no_grad():
        batch, moved = model(x, mask), model(torch.where(mask.unsqueeze(-1), x + shift, x), mask)
        assert torch.allclose(batch.logits, moved.logits, atol=ATOL)
        assert torch.allclose(batch.attention, moved.attention, atol=ATOL)
        for b in range(len(lengths)):  # padding still changes nothing
            single = model(x[b : b + 1, mask[b]])
            assert torch.allclose(batch.embedding[b], single.embedding[0], atol=ATOL)
        model.set_input_norm("none")  # without it the same shift moves the output
        assert not torch.allclose(model(x, mask).logits, model(torch.where(mask.unsqueeze(-1), x + shift, x),
                                                                 mask).logits, atol=1e-3)
    with pytest.raises(MILConfigError, match="input_norm must be one of .*'bag_center'.* got 'zscore'"):
        model.set_input_norm("zscore")


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_trainable_parameter(name: str) -> None:
    model = make(name).train()
    x, mask = padded_batch([5, 8])
    out = model(x, mask)
    loss = nn.functional.cross_entropy(out.logits, torch.tensor([0, 2])) + sum(out.aux.values())
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    assert x.grad is None


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic_for_a_seed(name: str) -> None:
    x, mask = padded_batch([6, 4])
    a, b = make(name, seed=3).eval(), make(name, seed=3).eval()
    with torch.no_grad():
        out1, out2, out3 = a(x, mask), a(x, mask), b(x, mask)
    assert torch.equal(out1.logits, out2.logits) and torch.equal(out1.logits, out3.logits)
    assert torch.equal(out1.attention, out3.attention)
    c = make(name, seed=4).eval()
    with torch.no_grad():
        assert not torch.allclose(c(x, mask).logits, out1.logits)


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name: str) -> None:
    src, dst = make(name, seed=1).eval(), make(name, seed=2).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf, weights_only=True))
    x, mask = padded_batch([3, 6])
    with torch.no_grad():
        assert torch.equal(src(x, mask).logits, dst(x, mask).logits)


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name: str) -> None:
    model = make(name).eval()
    x, mask = padded_batch([4, 2])
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity) and model.num_classes == 0
    out = model(x, mask)
    assert out.logits.shape == (2, model.embed_dim)
    assert torch.equal(out.logits, out.embedding)
    model.reset_classifier(5)
    assert model(x, mask).logits.shape == (2, 5)
    with pytest.raises(ValueError):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name", MODELS)
def test_aux_losses_finite_in_training_and_absent_in_eval(name: str) -> None:
    model = make(name)
    x, mask = padded_batch([6, 3])
    model.train()
    aux = model(x, mask).aux
    for key, value in aux.items():
        assert isinstance(key, str) and value.ndim == 0 and torch.isfinite(value), key
    model.eval()
    assert model(x, mask).aux == {}


@pytest.mark.parametrize("name", MODELS)
def test_hooks_exist_and_are_callable(name: str) -> None:
    """Both trainer hooks run on every aggregator, and on a fresh model they change no weight and no output
    (ASMIL's anchor starts equal to its student, so its EMA step is a fixed point there)."""
    model = make(name).eval()
    x, mask = padded_batch([6, 3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(x, mask).logits
    assert model.set_progress(0.5) is None and model.on_after_optimizer_step() is None
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name}: hooks changed {changed} of a fresh model"
    torch.testing.assert_close(model(x, mask).logits, logits)


def test_set_progress_drives_the_aem_lambda_schedule() -> None:
    model = make("aem", aem_lambda=0.2, lambda_schedule="cosine").train()
    x, mask = padded_batch([6, 3])
    assert model.aem_lambda == pytest.approx(0.2)  # progress 0: λ0
    model.set_progress(0.5)
    assert model.aem_lambda == pytest.approx(0.1)  # ½(1 + cos(π/2)) = ½
    model.set_progress(7.0)  # clamped to 1: λ annealed to 0, and so is the auxiliary term
    assert model.aem_lambda == pytest.approx(0.0, abs=1e-12)
    assert float(model(x, mask).aux["aem_entropy"]) == pytest.approx(0.0, abs=1e-12)
    model.set_progress(-1.0)
    assert model.aem_lambda == pytest.approx(0.2)


def test_on_after_optimizer_step_moves_the_asmil_anchor_toward_the_student() -> None:
    model = make("asmil", anchor_decay=0.75)
    with torch.no_grad():  # as if an optimizer step moved the student
        for p in model.student.parameters():
            p.add_(1.0)
    student = [p.detach().clone() for p in model.student.parameters()]
    anchor = [p.detach().clone() for p in model.anchor.parameters()]
    model.on_after_optimizer_step()
    for a0, s, a1 in zip(anchor, student, model.anchor.parameters(), strict=True):
        torch.testing.assert_close(a1, 0.75 * a0 + 0.25 * s)  # anchor ← decay·anchor + (1 − decay)·student
    for s, p in zip(student, model.student.parameters(), strict=True):
        assert torch.equal(s, p)  # the student is left alone


BAD_INPUTS = {
    "wrong in_dim": (lambda: (torch.randn(1, 4, D + 1), None), rf"expected in_dim={D}, got {D + 1}"),
    "empty bag": (lambda: (torch.randn(1, 0, D), None), "empty bag"),
    "2-d input": (lambda: (torch.randn(4, D), None), "3 dims"),
    "mask shape": (lambda: (torch.randn(2, 4, D), torch.ones(2, 5, dtype=torch.bool)), "mask shape"),
    "mask dtype": (lambda: (torch.randn(1, 4, D), torch.ones(1, 4)), "bool"),
    "nan": (lambda: (torch.randn(1, 4, D).index_fill_(1, torch.tensor([2]), float("nan")), None), "NaN"),
    "inf": (lambda: (torch.randn(1, 4, D).index_fill_(1, torch.tensor([0]), float("inf")), None), "inf"),
    "all-False mask": (lambda: (torch.randn(2, 4, D), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).bool()),
                       r"bag\(s\) \[1\]"),
    "integer x": (lambda: (torch.ones(1, 4, D, dtype=torch.long), None), "floating point"),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_value_error(name: str, case: str) -> None:
    model = make(name).eval()
    build, pattern = BAD_INPUTS[case]
    x, mask = build()
    with pytest.raises(MILInputError, match=pattern):
        model(x, mask)
    with pytest.raises(ValueError):
        model.forward_features(x, mask)


def test_value_checks_cover_padding_and_can_be_disabled() -> None:
    """NaN anywhere in x (padding included) is rejected; ``check_values=False`` skips the value checks."""
    model = make("abmil").eval()
    x, mask = padded_batch([2, 4])
    x[0, 3] = float("nan")  # a padded position
    with pytest.raises(MILInputError, match="NaN"):
        model(x, mask)
    model.check_values = False
    assert model(x, mask).logits.shape == (2, C)  # no error raised: the caller vouches for its inputs


@pytest.mark.parametrize("name", MODELS)
def test_float16_features_are_cast_and_overflow_is_named(name: str) -> None:
    """Bags are stored float16: such input gives the float32 result; a finite input too large for the arithmetic
    is an error naming the problem, not silent NaN logits; a diverged model is named as such."""
    model = make(name).eval()
    x, mask = padded_batch([6, 3])
    ref = model(x.half().float(), mask).logits
    assert torch.allclose(model(x.half(), mask).logits, ref, atol=1e-6)
    huge = x.clamp(-1, 1) * 1e30  # finite, but LayerNorm / softmax statistics of such values overflow float32
    try:
        assert torch.isfinite(model(huge, mask).logits).all()  # either finite logits (ABMIL) ...
    except MILInputError as err:  # ... or an error that says what is wrong, never NaN logits
        assert "overflow" in str(err)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(MILInputError, match="not finite"):
        model(x, mask)


def test_unknown_model_keyword_lists_the_options() -> None:
    from wsi_ncmi.models import MILConfigError, create_model

    with pytest.raises(MILConfigError, match=r"asmil does not take 'dim'; its options are: .*n_token"):
        create_model("asmil", in_dim=D, num_classes=C, dim=64)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_bf16_autocast_on_cuda(name: str) -> None:
    model = make(name).cuda().train()
    x, mask = padded_batch([50, 30])
    x, mask = x.cuda(), mask.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, mask)
        loss = out.logits.float().sum() + sum(out.aux.values())
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.allclose(out.attention.float().sum(dim=1), torch.ones(2, device="cuda"), atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_matches_eager_on_cuda(name: str) -> None:
    model = make(name).cuda().eval()
    x, mask = padded_batch([50, 30])
    x, mask = x.cuda(), mask.cuda()
    compiled = torch.compile(model)
    with torch.no_grad():
        assert torch.allclose(compiled(x, mask).logits, model(x, mask).logits, atol=1e-4)
