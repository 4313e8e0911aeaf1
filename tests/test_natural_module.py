"""ImageModule: objectives, NCMI param groups / switches, schedules; every natural config runs one step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_ncmi.natural.module import ImageModule, ImageModuleError
from wsi_ncmi.natural.optimizer import image_param_groups
from wsi_ncmi.ncmi import ncmi_metric
from wsi_ncmi.training.compose import compose_config
from wsi_ncmi.training.optim import WarmupSchedule

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs" / "natural").glob("*.yaml"))
TINY = dict(backbone="resnet18", num_classes=4, width=0.125, channels_last=False)


def _batch(b: int = 8, views: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (b, 3, 16, 16) if views is None else (b, views, 3, 16, 16)
    return torch.randn(shape, generator=g), torch.arange(b) % 4


@pytest.mark.parametrize("loss", ["ce", "label_smoothing", "focal", "occe", "milloss", "ncmi"])
def test_training_step_returns_finite_loss_and_logs_terms(loss: str) -> None:
    objective = "ncmi" if loss == "ncmi" else "head"
    m = ImageModule(objective=objective, loss=loss, **TINY)
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
        assert m.ncmi.xi.grad is not None and m.ncmi.xi.grad.abs().sum() > 0
        assert m.ncmi_training.train_cc.count == 8
    else:
        assert m.head is not None and m.head.weight.grad is not None


def test_supcon_uses_two_views_projection_and_detached_probe() -> None:
    m = ImageModule(objective="contrastive", loss="supcon", proj_dim=16, **TINY)
    m.log = lambda *a, **k: None  # type: ignore[method-assign]
    loss = m.training_step(_batch(views=2), 0)
    loss.backward()
    assert m.proj is not None and m.proj[0].weight.grad is not None
    assert m.head is not None and m.head.weight.grad is not None
    with pytest.raises(ImageModuleError, match="two_views"):
        m.training_step(_batch(), 0)


def test_ncmi_centroids_get_their_own_param_group() -> None:
    m = ImageModule(objective="ncmi", centroid_lr=3.0, centroid_momentum=0.95, lr=0.1, weight_decay=5e-4, **TINY)
    groups = {g["name"]: g for g in image_param_groups(m)}
    assert set(groups) == {"main", "centroids"}
    assert groups["centroids"]["params"] == [m.ncmi.xi]
    assert groups["centroids"]["lr"] == 3.0 and groups["centroids"]["momentum"] == 0.95
    assert groups["centroids"]["weight_decay"] == 0.0
    assert all(p is not m.ncmi.xi for p in groups["main"]["params"])
    n_main = sum(p.numel() for p in groups["main"]["params"])
    assert n_main == sum(p.numel() for p in m.backbone.parameters())
    frozen = ImageModule(objective="ncmi", ncmi_kwargs={"centroid_update": "frozen"}, **TINY)
    assert [g["name"] for g in image_param_groups(frozen)] == ["main"]


def test_ablation_switches_reach_the_loss() -> None:
    m = ImageModule(objective="ncmi", ncmi_kwargs={"use_nsf": False, "use_centering": False, "tau": 0.7}, **TINY)
    assert m.ncmi.use_nsf is False and m.ncmi.use_centering is False and m.ncmi.tau == 0.7
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
        assert m._val.centroids is not None and m._val.centroids.shape == (4, m.feature_dim)
        x, y = _batch()
        m.validation_step((x, y), 0)
        m.validation_step((x[:3], y[:3]), 1)  # two batches: the dataset metric is over both
        m.on_validation_epoch_end()
        p = m.ncmi.log_probs(m.forward_features(torch.cat([x, x[:3]]))).exp()
    for key in ("val/top1", "val/top5", "val/cc_accuracy", "val/cc_top5", "val/xi_accuracy", "val/xi_top5", "val/cmi", "val/gamma", "val/ncmi",
                "val/batch_cmi", "val/batch_gamma"):
        assert key in logged, key
    assert logged["val/top5"] == 1.0  # 4 classes: top-5 always hits
    assert 0.0 <= logged["val/top1"] <= 1.0 and logged["val/ncmi"] > 0
    ref = ncmi_metric(p.double(), torch.cat([y, y[:3]]), num_classes=4)  # dataset level, not the last batch's
    for key in ("cmi", "gamma", "ncmi"):
        assert logged[f"val/{key}"] == pytest.approx(ref[key], rel=1e-5), key


def test_forward_scores_for_ncmi_and_head() -> None:
    x, _ = _batch()
    for obj in ("head", "ncmi"):
        m = ImageModule(objective=obj, **TINY).eval()
        with torch.no_grad():
            assert m(x).shape == (8, 4)


def test_schedules() -> None:
    assert WarmupSchedule("cosine", 100)(0) == pytest.approx(1.0)
    assert WarmupSchedule("cosine", 100)(50) == pytest.approx(0.5)
    assert WarmupSchedule("cosine", 100)(100) == pytest.approx(0.0, abs=1e-12)
    assert WarmupSchedule("multistep", 200, milestones=(60, 120), gamma=0.2)(59) == 1.0
    assert WarmupSchedule("multistep", 200, milestones=(60, 120), gamma=0.2)(130) == pytest.approx(0.04)
    assert WarmupSchedule("cosine", 100, warmup_steps=10)(4) == pytest.approx(0.5)
    assert WarmupSchedule("constant", 100)(99) == 1.0
    assert WarmupSchedule("constant", 100, start_step=30)(29) == 0.0
    with pytest.raises(ImageModuleError, match="scheduler"):
        ImageModule(scheduler="step", **TINY)
    with pytest.raises(ImageModuleError, match="objective"):
        ImageModule(objective="ce", **TINY)
    with pytest.raises(ImageModuleError, match="needs a loss on logits"):
        ImageModule(objective="head", loss="supcon", **TINY)


def test_multistep_with_warmup_and_late_centroids_per_param_group() -> None:
    """The CIFAR NCMI recipe: 1 warm-up epoch, x0.2 at epochs 2 and 3 (after warm-up), ξ from epoch 2."""

    class _Trainer:
        estimated_stepping_batches = 50
        max_epochs = 5

    m = ImageModule(objective="ncmi", scheduler="multistep", milestones=[2, 3], lr_gamma=0.2, warmup_epochs=1,
                    centroid_schedule=True, centroid_start_epoch=2, **TINY)  # fmt: skip
    m._trainer = _Trainer()  # type: ignore[assignment]
    sched = m.configure_optimizers()["lr_scheduler"]["scheduler"]
    main, xi = sched.lr_lambdas
    per_epoch = 10
    assert main(0) == pytest.approx(0.1) and main(per_epoch - 1) == pytest.approx(1.0)  # warm-up
    assert main(per_epoch + 2 * per_epoch - 1) == 1.0 and main(3 * per_epoch) == pytest.approx(0.2)
    assert main(4 * per_epoch) == pytest.approx(0.04)
    assert xi(2 * per_epoch - 1) == 0.0 and xi(2 * per_epoch) == main(2 * per_epoch)
    m._trainer = None


def test_config_inheritance_resolves_nested_chains() -> None:
    nocenter = compose_config(CONFIGS[0].parent / "cifar100_resnet18_ncmi_nocenter.yaml")
    assert nocenter["model"]["objective"] == "ncmi" and nocenter["model"]["ncmi_kwargs"]["use_centering"] is False
    assert nocenter["model"]["ncmi_kwargs"]["tau"] == 0.3  # the base's NCMI options merge with the override
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
