"""ImageModule: objectives, NCMI param groups / switches, schedules; every natural config runs one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_ncmi.natural.module import ImageModule, ImageModuleError, lr_factor
from wsi_ncmi.ncmi import ncmi_metric
from wsi_ncmi.training.compose import compose_config

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "natural").glob("*.yaml"))
TINY = dict(backbone="resnet18", num_classes=4, width=0.125, channels_last=False)


def _batch(b: int = 8, views: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (b, 3, 16, 16) if views is None else (b, views, 3, 16, 16)
    return torch.randn(shape, generator=g), torch.arange(b) % 4


@pytest.mark.parametrize("objective", ["ce", "label_smoothing", "focal", "occe", "milloss", "ncmi"])
def test_training_step_returns_finite_loss_and_logs_terms(objective: str) -> None:
    m = ImageModule(objective=objective, **TINY)
    logged: dict[str, torch.Tensor] = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    m.on_train_epoch_start()
    loss = m.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert m.backbone.conv1.weight.grad is not None
    assert "train/loss" in logged
    if objective == "ncmi":
        assert m.head is None and {"train/cmi", "train/gamma"} <= set(logged)
        assert m.criterion.xi.grad is not None and m.criterion.xi.grad.abs().sum() > 0
        assert m._train_acc is not None and int(m._train_acc.counts.sum()) == 8
    else:
        assert m.head is not None and m.head.weight.grad is not None


def test_supcon_uses_two_views_projection_and_detached_probe() -> None:
    m = ImageModule(objective="supcon", proj_dim=16, **TINY)
    m.log = lambda *a, **k: None  # type: ignore[method-assign]
    loss = m.training_step(_batch(views=2), 0)
    loss.backward()
    assert m.proj is not None and m.proj[0].weight.grad is not None
    assert m.head is not None and m.head.weight.grad is not None
    with pytest.raises(ImageModuleError, match="two_views"):
        m.training_step(_batch(), 0)


def test_ncmi_centroids_get_their_own_param_group() -> None:
    m = ImageModule(objective="ncmi", centroid_lr=3.0, centroid_momentum=0.95, lr=0.1, weight_decay=5e-4, **TINY)
    groups = {g["name"]: g for g in m.param_groups()}
    assert set(groups) == {"main", "centroids"}
    assert groups["centroids"]["params"] == [m.criterion.xi]
    assert groups["centroids"]["lr"] == 3.0 and groups["centroids"]["momentum"] == 0.95
    assert groups["centroids"]["weight_decay"] == 0.0
    assert all(p is not m.criterion.xi for p in groups["main"]["params"])
    n_main = sum(p.numel() for p in groups["main"]["params"])
    assert n_main == sum(p.numel() for p in m.backbone.parameters())
    frozen = ImageModule(objective="ncmi", centroid_update="frozen", **TINY)
    assert [g["name"] for g in frozen.param_groups()] == ["main"]


def test_ablation_switches_reach_the_loss() -> None:
    m = ImageModule(objective="ncmi", use_nsf=False, use_centering=False, tau=0.7, **TINY)
    assert m.criterion.use_nsf is False and m.criterion.use_centering is False and m.criterion.tau == 0.7
    assert m.describe()["use_nsf"] is False


def test_validation_logs_topk_and_dataset_ncmi() -> None:
    m = ImageModule(objective="ncmi", **TINY)
    logged: dict[str, float] = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, float(value))  # type: ignore[method-assign]
    m.on_train_epoch_start()
    m.training_step(_batch(), 0)
    m.eval()
    with torch.no_grad():
        m.on_validation_epoch_start()
        assert m._val_centroids is not None and m._val_centroids.shape == (4, m.feature_dim)
        x, y = _batch()
        m.validation_step((x, y), 0)
        m.validation_step((x[:3], y[:3]), 1)  # two batches: the dataset metric is over both
        m.on_validation_epoch_end()
        p = m.criterion.log_probs(m.forward_features(torch.cat([x, x[:3]]))).exp()
    for key in ("val/top1", "val/top5", "val/top_cc1", "val/top_xi1", "val/cmi", "val/gamma", "val/ncmi",
                "val/batch_cmi", "val/batch_gamma"):
        assert key in logged, key
    assert logged["val/top5"] == 1.0  # 4 classes: top-5 always hits
    assert 0.0 <= logged["val/top1"] <= 1.0 and logged["val/ncmi"] > 0
    ref = ncmi_metric(p.double(), torch.cat([y, y[:3]]), num_classes=4)  # dataset level, not the last batch's
    for key in ("cmi", "gamma", "ncmi"):
        assert logged[f"val/{key}"] == pytest.approx(ref[key], rel=1e-5), key


def test_forward_scores_for_ncmi_and_head() -> None:
    x, _ = _batch()
    for obj in ("ce", "ncmi"):
        m = ImageModule(objective=obj, **TINY).eval()
        with torch.no_grad():
            assert m(x).shape == (8, 4)


def test_schedules() -> None:
    assert lr_factor("cosine", 0, 100, 10) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("multistep", 59, 200, 1, milestones=(60, 120), gamma=0.2) == 1.0
    assert lr_factor("multistep", 130, 200, 1, milestones=(60, 120), gamma=0.2) == pytest.approx(0.04)
    assert lr_factor("cosine", 4, 100, 10, warmup_steps=10) == pytest.approx(0.5)
    assert lr_factor("none", 99, 100, 10) == 1.0
    with pytest.raises(ImageModuleError, match="schedule"):
        ImageModule(schedule="step", **TINY)


def test_config_inheritance_resolves_nested_chains() -> None:
    nocenter = compose_config(CONFIGS[0].parent / "cifar100_resnet18_ncmi_nocenter.yaml")
    assert nocenter["model"]["objective"] == "ncmi" and nocenter["model"]["use_centering"] is False
    assert nocenter["model"]["centroid_lr"] == 5.0 and nocenter["trainer"]["max_epochs"] == 200
    assert nocenter["data"]["dataset"] == "cifar100" and "__base__" not in nocenter
    imagenet = compose_config(CONFIGS[0].parent / "imagenet_resnet101_ncmi.yaml")
    assert imagenet["model"]["backbone"] == "resnet101" and imagenet["model"]["lr"] == 0.5
    assert imagenet["model"]["weight_decay"] == 5e-5 and imagenet["data"]["batch_size"] == 1024


def test_expected_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    for obj in ("ce", "ncmi", "ls", "focal", "occe", "milloss", "supcon", "ncmi_nocenter", "ncmi_softmax"):
        assert f"cifar100_resnet18_{obj}" in names
    for m in ("50", "101"):
        assert {f"imagenet_resnet{m}_ce", f"imagenet_resnet{m}_ncmi"} <= names
