"""Baseline losses vs values computed by hand (plain math) on a 3-class example, plus the registry."""

import ast
import math
from pathlib import Path

import pytest
import torch

from wsi_ncmi.losses import INPUT_KINDS, LossError, create_loss, list_losses, register_loss
from wsi_ncmi.ncmi import NCMILoss

Z = [[2.0, 1.0, 0.1], [0.5, 2.5, -1.0], [0.3, -0.2, 1.2]]
Y = [0, 2, 2]
C = 3


def _softmax(row):
    e = [math.exp(x) for x in row]
    s = sum(e)
    return [x / s for x in e]


def _mean(xs):
    return sum(xs) / len(xs)


def _ce_rows():
    return [-math.log(_softmax(z)[y]) for z, y in zip(Z, Y)]


def _run(name, **kw):
    logits = torch.tensor(Z, dtype=torch.float64, requires_grad=True)
    out = create_loss(name, **kw)(logits, torch.tensor(Y))
    assert torch.isfinite(out["loss"])
    return out, logits


def test_registry_lists_every_loss_with_input_kind():
    expected = {
        "ce",
        "label_smoothing",
        "focal",
        "poly",
        "squentropy",
        "occe",
        "milloss",
        "supcon",
        "ncmi",
    }
    assert expected <= set(list_losses())
    kinds = {
        n: create_loss(n, **({"num_classes": 3, "embed_dim": 4} if n == "ncmi" else {})).input_kind
        for n in expected
    }
    assert all(k in INPUT_KINDS for k in kinds.values())
    assert kinds["ce"] == "logits" and kinds["ncmi"] == "embedding" and kinds["supcon"] == "embedding"
    assert "aem_entropy" not in list_losses()  # the AEM regulariser is the model's own aux term


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown loss 'nope'.*ce"):
        create_loss("nope")
    with pytest.raises(LossError, match="already registered"):
        register_loss("ce")(type("X", (torch.nn.Module,), {"input_kind": "logits"}))
    with pytest.raises(LossError, match="input_kind"):
        register_loss("brand_new_loss")(type("Y", (torch.nn.Module,), {}))


def test_create_loss_rejects_unknown_kwargs_naming_loss_and_options():
    with pytest.raises(LossError, match=r"create_loss: focal does not take 'gama'; its options are: gamma"):
        create_loss("focal", gama=2.0)
    with pytest.raises(
        LossError, match=r"create_loss: ncmi does not take 'bogus', 'tau_x'; .*embed_dim, tau"
    ):
        create_loss("ncmi", num_classes=3, embed_dim=4, tau_x=0.5, bogus=1)
    assert create_loss("focal", gamma=1.0).gamma == 1.0  # accepted arguments still pass


def test_loss_modules_import_without_a_circle():
    """The registry must not import the losses that import it (the old lazy ``_ensure_builtins``)."""
    pkg = Path(__file__).resolve().parents[1] / "wsi_ncmi" / "losses"
    graph: dict[str, set[str]] = {}
    for path in pkg.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = graph.setdefault(path.stem, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                deps.update(n.split(".")[0] for n in names)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(mod: str, path: list[str]) -> None:
        if state.get(mod) == 1:
            raise AssertionError(f"import circle in wsi_ncmi.losses: {' -> '.join([*path, mod])}")
        if state.get(mod) == 2 or mod not in graph:
            return
        state[mod] = 1
        for dep in sorted(graph[mod]):
            visit(dep, [*path, mod])
        state[mod] = 2

    for mod in sorted(graph):
        visit(mod, [])


def test_ce_literal_and_weighted():
    out, _ = _run("ce")
    assert abs(-math.log(_softmax(Z[0])[0]) - 0.4170300) < 1e-6  # the hand value of row 0
    assert out["loss"].item() == pytest.approx(_mean(_ce_rows()), abs=1e-12)
    w = [1.0, 2.0, 5.0]
    out_w, _ = _run("ce", weight=w)
    expected = sum(w[y] * ce for y, ce in zip(Y, _ce_rows())) / sum(w[y] for y in Y)
    assert out_w["loss"].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="weight has 2 entries"):
        create_loss("ce", weight=[1.0, 2.0])(torch.randn(2, 3), torch.tensor([0, 1]))


def test_label_smoothing():
    out, _ = _run("label_smoothing")
    eps = 0.1
    rows = []
    for z, y in zip(Z, Y):
        p = _softmax(z)
        rows.append(-sum(((1 - eps) * (j == y) + eps / C) * math.log(p[j]) for j in range(C)))
    assert out["loss"].item() == pytest.approx(_mean(rows), abs=1e-12)


def test_focal():
    out, _ = _run("focal")
    rows = [-((1 - _softmax(z)[y]) ** 2) * math.log(_softmax(z)[y]) for z, y in zip(Z, Y)]
    assert out["loss"].item() == pytest.approx(_mean(rows), abs=1e-12)
    out0, _ = _run("focal", gamma=0.0)
    assert out0["loss"].item() == pytest.approx(_mean(_ce_rows()), abs=1e-12)


def test_poly1():
    out, _ = _run("poly")
    poly = _mean([1 - _softmax(z)[y] for z, y in zip(Z, Y)])
    assert out["poly"].item() == pytest.approx(poly, abs=1e-12)
    assert out["loss"].item() == pytest.approx(_mean(_ce_rows()) + poly, abs=1e-12)


def test_squentropy():
    out, _ = _run("squentropy")
    sq = _mean([sum(z[j] ** 2 for j in range(C) if j != y) / (C - 1) for z, y in zip(Z, Y)])
    assert out["sq"].item() == pytest.approx(sq, abs=1e-12)
    assert out["loss"].item() == pytest.approx(_mean(_ce_rows()) + sq, abs=1e-12)


def test_occe_value_and_closed_form_gradient():
    out, logits = _run("occe")
    occe = _mean(
        [
            -sum(math.log(_softmax([-x for x in z])[j]) / (C - 1) for j in range(C) if j != y)
            for z, y in zip(Z, Y)
        ]
    )
    assert out["occe"].item() == pytest.approx(occe, abs=1e-12)
    assert out["ce"].item() == pytest.approx(_mean(_ce_rows()), abs=1e-12)
    assert out["loss"].item() == pytest.approx(_mean(_ce_rows()) + occe, abs=1e-12)
    (g_occe,) = torch.autograd.grad(out["occe"], logits, retain_graph=True)
    z = logits.detach()
    onehot = torch.nn.functional.one_hot(torch.tensor(Y), C).double()
    cold = (1 - onehot) / (C - 1)
    closed = (cold - torch.softmax(-z, 1)) / len(Y)
    torch.testing.assert_close(g_occe, closed, rtol=1e-12, atol=1e-12)
    (g_total,) = torch.autograd.grad(out["loss"], logits)
    torch.testing.assert_close(
        g_total, (torch.softmax(z, 1) - onehot) / len(Y) + closed, rtol=1e-12, atol=1e-12
    )
    out2, _ = _run("occe", gamma=0.5)
    assert out2["loss"].item() == pytest.approx(_mean(_ce_rows()) + 0.5 * occe, abs=1e-12)


def test_milloss():
    out, _ = _run("milloss")
    ps = [_softmax(z) for z in Z]
    marginal = [_mean([p[j] for p in ps]) for j in range(C)]
    h_model = -sum(m * math.log(m) for m in marginal)
    dist = [Y.count(j) / len(Y) for j in range(C)]
    h_labels = -sum(d * math.log(d) for d in dist if d > 0)
    gap = abs(h_model - h_labels)
    assert out["label_entropy"].item() == pytest.approx(gap, abs=1e-12)
    assert out["loss"].item() == pytest.approx(_mean(_ce_rows()) + 50 * gap, abs=1e-10)


def _supcon_reference(feats, labels, tau):
    us = [[x / math.sqrt(sum(y * y for y in f)) for x in f] for f in feats]
    n = len(us)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    losses = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        if not pos:
            continue
        denom = sum(math.exp(dot(us[a], us[k]) / tau) for k in range(n) if k != a)
        losses.append(-_mean([math.log(math.exp(dot(us[a], us[p]) / tau) / denom) for p in pos]))
    return _mean(losses)


def test_supcon_two_views():
    torch.manual_seed(0)
    feats = torch.randn(3, 2, 4, dtype=torch.float64)  # [B, V, D]
    labels = [0, 1, 0]
    out = create_loss("supcon")(feats, torch.tensor(labels))
    flat = feats.reshape(6, 4).tolist()  # sample-major: views of sample 0, then 1, then 2
    ref = _supcon_reference(flat, [lab for lab in labels for _ in range(2)], 0.1)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    # no positives at all (single view, distinct labels): zero loss that still back-propagates
    x = torch.randn(3, 4, requires_grad=True)
    zero = create_loss("supcon")(x, torch.tensor([0, 1, 2]))["loss"]
    assert zero.item() == 0.0
    zero.backward()
    with pytest.raises(ValueError, match="supcon"):
        create_loss("supcon")(torch.randn(3), torch.tensor([0, 1, 2]))


def test_ncmi_via_registry_matches_core_and_accepts_aux():
    torch.manual_seed(0)
    a = create_loss("ncmi", num_classes=3, embed_dim=5, variant="official")
    torch.manual_seed(0)
    b = NCMILoss(3, 5, variant="official")
    assert a.state_dict().keys() == b.state_dict().keys()
    f, t = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(a(f, t, attention=None)["loss"], b(f, t)["loss"])


@pytest.mark.parametrize("name", ["ce", "label_smoothing", "focal", "poly", "squentropy", "occe", "milloss"])
def test_logit_losses_validate_and_backprop(name):
    loss = create_loss(name)
    logits = torch.randn(4, 3, requires_grad=True)
    out = loss(logits, torch.tensor([0, 1, 2, 1]), attention=None)
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\]"):
        loss(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2-D"):
        loss(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        loss(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
