"""Image-track evaluation: top-k, CC, LP, evaluate CLI JSON, ncmi-metric (paper Figure 2) CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import write_imagefolder
from torch import nn

from wsi_ncmi.natural.evaluate import cc_scores, evaluate_image_model, topk_accuracy
from wsi_ncmi.natural.metric import pearson_r
from wsi_ncmi.natural.probe import LinearProbeConfig, fit_linear_probe


def test_topk_accuracy_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, labels, ks=(1, 2))
    assert acc["top1"] == pytest.approx(1 / 3) and acc["top2"] == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, ks=(1, 5))["top5"] == 1.0  # k capped at C


def test_cc_scores_pick_the_nearest_training_centroid() -> None:
    train = torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    ytr = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[0.6, 0.2, 0.2], [0.15, 0.15, 0.7]])
    s = cc_scores(train, ytr, test, num_classes=2)
    assert s.shape == (2, 2) and s.argmax(dim=1).tolist() == [0, 1]
    cent1 = torch.tensor([0.15, 0.1, 0.75])
    kl = float((test[1] * (test[1] / cent1).log()).sum())
    assert -float(s[1, 1]) == pytest.approx(kl, rel=1e-5)


def test_linear_probe_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(300) % 3
    x = torch.nn.functional.normalize(centers[y] + 0.3 * torch.randn(300, 8, generator=g), dim=1)
    layer = fit_linear_probe(x, y, 3, LinearProbeConfig(epochs=20, batch_size=64))
    assert (layer(x).argmax(1) == y).float().mean() > 0.97


class _ToyBackbone(nn.Module):
    """Flattens a 2×2 image; features = the 12 pixel values (fixed, no training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _toy_loader(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 2, 2, generator=g) * 0.2
    x[torch.arange(n), 0, 0, y.clamp(max=1)] += 2.0 * (y < 2)
    x[torch.arange(n), 1, 1, 1] += 2.0 * (y == 2)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def test_evaluate_image_model_head_cc_and_lp() -> None:
    from wsi_ncmi.ncmi import NCMILoss

    torch.manual_seed(0)
    head = nn.Linear(12, 3)
    ncmi = NCMILoss(3, 12, tau=0.2, use_centering=True)
    ncmi.train()
    ncmi.center(torch.cat([b[0].flatten(1) for b in _toy_loader(96, 0)]))  # initialise the center
    res = evaluate_image_model(
        _ToyBackbone(), _toy_loader(96, 0), _toy_loader(48, 1), 3, head=head, ncmi=ncmi,
        lp=LinearProbeConfig(epochs=30, batch_size=32),
    )  # fmt: skip
    assert set(res["protocols"]) == {"head", "cc", "lp"}
    assert res["protocols"]["cc"]["top1"] > 0.95 and res["protocols"]["lp"]["top1"] > 0.95
    assert res["lp_input"] == "ncmi_center_l2" and res["n_test"] == 48 and res["n_train"] == 96
    assert set(res["ncmi_metric"]) == {"cmi", "gamma", "ncmi"}
    ce_res = evaluate_image_model(_ToyBackbone(), _toy_loader(96, 0), _toy_loader(48, 1), 3, head=head,
                                  protocols=("head", "cc", "lp"), lp=LinearProbeConfig(epochs=5))
    assert set(ce_res["protocols"]) == {"head", "lp"} and ce_res["lp_input"] == "train_mean_l2"


def test_pearson_r() -> None:
    assert pearson_r([1, 2, 3], [2, 4, 6.5]) == pytest.approx(float(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1]))
    assert pearson_r([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(pearson_r([1.0], [2.0]))


def _write_imagefolder(root: Path, per_class: int = 4) -> Path:
    return write_imagefolder(root, per_class=per_class, size=(24, 30))


def test_ncmi_metric_cli_on_tiny_imagefolder(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    from wsi_ncmi.commands.ncmi_metric_cli import main_ncmi_metric
    from wsi_ncmi.natural.backbones import create_classifier

    data = _write_imagefolder(tmp_path / "val")
    weights = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = create_classifier("resnet18", 3, width=0.125)
        path = tmp_path / f"r18_seed{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        weights.append(str(path))
    out = tmp_path / "out"
    rc = main_ncmi_metric([
        "--model", "resnet18", "--weights", *weights, "--data", str(data), "--image-size", "32",
        "--width", "0.125", "--batch-size", "5", "--workers", "0", "--device", "cpu", "--limit", "10",
        "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "ncmi_vs_top1.json").read_text())
    assert len(report["rows"]) == 3 and all(r["n"] == 10 for r in report["rows"])
    xs = [r["ncmi"] for r in report["rows"]]
    ys = [r["top1"] for r in report["rows"]]
    assert report["pearson_r"] == pytest.approx(pearson_r(xs, ys), nan_ok=True)
    rows = list(csv.DictReader((out / "ncmi_vs_top1.csv").open()))
    assert [r["name"] for r in rows] == ["r18_seed0", "r18_seed1", "r18_seed2"]
    assert (out / "ncmi_vs_top1.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pearson r" in (out / "ncmi_vs_top1.md").read_text()
    assert "| r18_seed1 |" in capsys.readouterr().out


def test_ncmi_metric_cli_rejects_class_count_mismatch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from wsi_ncmi.commands.ncmi_metric_cli import main_ncmi_metric
    from wsi_ncmi.natural.backbones import create_classifier

    data = _write_imagefolder(tmp_path / "val", per_class=1)
    path = tmp_path / "w.safetensors"
    save_file(dict(create_classifier("resnet18", 5, width=0.125).state_dict()), str(path))
    rc = main_ncmi_metric(
        ["--model", "resnet18", "--width", "0.125", "--weights", str(path), "--data", str(data), "--workers", "0"]
    )
    assert rc == 2


def test_natural_fit_then_evaluate_writes_json(tmp_path: Path, monkeypatch) -> None:
    from wsi_ncmi.commands.natural_cli import main

    monkeypatch.chdir(tmp_path)
    argv = [
        "fit", "--data.dataset", "digits", "--data.image_size", "16", "--data.batch_size", "16",
        "--data.num_workers", "0", "--data.limit_train", "64", "--data.limit_val", "32",
        "--model.objective", "ncmi", "--model.width", "0.125", "--model.channels_last", "false",
        "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--ckpt", str(ckpts[0]), "--out", str(out), "--device", "cpu", "--lp-epochs", "2"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["protocols"]) == {"cc", "lp"}  # NCMI: no head
    assert res["run"]["objective"] == "ncmi" and res["run"]["centroid_update"] == "sgd"
    assert res["data"]["dataset"] == "digits" and res["n_train"] == 64 and res["n_test"] == 32
    assert 0.0 <= res["protocols"]["cc"]["top1"] <= 1.0
