"""NCMITraining, the NCMI objective both tracks hold: ξ step, init pass, DDP center, online CC, metric names, and
checkpoints written before it (old state-dict keys) loading through every loader and ``--ckpt_path`` resume."""

from __future__ import annotations

import types
from pathlib import Path

import lightning.pytorch as lightning
import pytest
import torch
import torch.nn.functional as F

from wsi_ncmi.ncmi.loss import init_centroids
from wsi_ncmi.training.ncmi_objective import (
    NCMIConfigError,
    NCMITraining,
    OnlineClassMeans,
    metric_name,
    rename_legacy_keys,
)

C, D = 3, 6


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# ------------------------------------------------------------------------------------------ ξ step policy
class _Scaler:
    def __init__(self, scale: float, enabled: bool = True) -> None:
        self.scale, self.enabled = scale, enabled

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        return self.scale


@pytest.mark.parametrize("scaler", [None, _Scaler(1024.0), _Scaler(1024.0, enabled=False)],
                         ids=["no_scaler", "fp16_scaler", "disabled_scaler"])
def test_manual_xi_step_is_paper_sgd_with_momentum_and_unscales(scaler) -> None:
    obj = NCMITraining(C, D, centroid_lr=0.5, centroid_momentum=0.9)
    assert obj.manual_xi and obj.xi_param_group() is None
    xi = obj.loss.xi
    g = torch.randn_like(xi)
    scale = scaler.scale if scaler is not None and scaler.enabled else 1.0
    for _ in range(2):
        before, mom = xi.detach().clone(), obj.xi_momentum.clone()
        xi.grad = g * scale  # what backward leaves under a GradScaler
        obj.before_optimizer_step(scaler)
        torch.testing.assert_close(obj.xi_momentum, 0.9 * mom + g)
        torch.testing.assert_close(xi.detach(), before - 0.5 * (0.9 * mom + g))
        assert xi.grad is None
    xi.grad = torch.full_like(xi, float("inf"))  # an overflowed fp16 step is skipped
    before, mom = xi.detach().clone(), obj.xi_momentum.clone()
    obj.before_optimizer_step(scaler)
    assert torch.equal(xi.detach(), before) and torch.equal(obj.xi_momentum, mom)


def test_group_frozen_and_ema_modes() -> None:
    grouped = NCMITraining(C, D, centroid_optimizer="group", centroid_lr=3.0)
    assert not grouped.manual_xi and "xi_momentum" not in dict(grouped.named_buffers())
    group = grouped.xi_param_group(name="centroids", momentum=0.95)
    assert group == {"params": [grouped.loss.xi], "lr": 3.0, "weight_decay": 0.0, "name": "centroids",
                     "momentum": 0.95}
    xi = grouped.loss.xi
    xi.grad = torch.ones_like(xi)
    grouped.before_optimizer_step()  # the optimizer steps ξ, not the component
    assert xi.grad is not None
    for update in ("frozen", "ema"):
        obj = NCMITraining(C, D, {"centroid_update": update})
        assert not obj.manual_xi and obj.xi_param_group() is None
    ema = NCMITraining(C, D, {"centroid_update": "ema"})
    ema.after_optimizer_step(lambda t: t * 0 + 1.0)  # a stand-in "mean over ranks"
    assert torch.equal(ema.loss.xi.detach(), torch.ones(C, D))
    frozen = NCMITraining(C, D, {"centroid_update": "frozen"})
    before = frozen.loss.xi.detach().clone()
    frozen.after_optimizer_step(lambda t: t * 0)  # only EMA centroids are averaged
    assert torch.equal(frozen.loss.xi.detach(), before)


def test_xi_schedule_starts_late_and_follows_main_or_stays_constant() -> None:
    from wsi_ncmi.training.optim import WarmupSchedule

    main = WarmupSchedule("cosine", 100, warmup_steps=10)
    follow, const = NCMITraining.xi_schedule(main, 20, True), NCMITraining.xi_schedule(main, 20, False)
    assert follow(19) == const(19) == 0.0
    assert follow(60) == main(60) < 1.0 and const(60) == 1.0


def test_bad_settings_are_named() -> None:
    with pytest.raises(NCMIConfigError, match="centroid_init must be one of"):
        NCMITraining(C, D, centroid_init="kmeans")
    with pytest.raises(NCMIConfigError, match="centroid_optimizer must be one of"):
        NCMITraining(C, D, centroid_optimizer="adam")
    with pytest.raises(NCMIConfigError, match="center_init_batches"):
        NCMITraining(C, D, center_init_batches=-1)
    with pytest.raises(NCMIConfigError, match="ncmi_kwargs: .*'temperature'.*tau"):
        NCMITraining(C, D, {"temperature": 0.5})


# ----------------------------------------------------------------------------------------- the loss
def test_forward_with_a_rank_sum_feeds_the_center_the_global_batch_mean() -> None:
    torch.manual_seed(0)
    f, y = torch.randn(4, D), torch.tensor([0, 1, 2, 0])
    other = torch.randn(2, D) + 3.0  # rows of a second rank

    def two_ranks(t: torch.Tensor) -> torch.Tensor:  # [D + 1] sums and count of this rank + the other's
        return t + torch.cat([other.sum(0), torch.tensor([2.0])])

    ddp, single = NCMITraining(C, D), NCMITraining(C, D)
    out = ddp(f, y, two_ranks)
    torch.testing.assert_close(ddp.loss.center.center, torch.cat([f, other]).mean(0))
    assert ddp.loss.center.training  # restored after the loss ran
    single.loss.center.update(torch.cat([f, other]).mean(0, keepdim=True))
    single.loss.center.eval()
    torch.testing.assert_close(out["loss"], single.loss(f, y)["loss"])
    local = NCMITraining(C, D)
    local(f, y)
    torch.testing.assert_close(local.loss.center.center, f.mean(0))


# ------------------------------------------------------------------------------------ init pass
def _batches(n: int, b: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, D, generator=g) + torch.arange(b)[:, None] % C, torch.arange(b) % C) for _ in range(n)]


def test_init_pass_sets_the_center_and_class_means_xi() -> None:
    batches = _batches(5)
    obj = NCMITraining(C, D, centroid_init="class_means", center_init_batches=2)
    calls: list[int] = []

    def embed(batch):
        calls.append(1)
        return batch

    obj.init_from_training(lambda: batches, embed, _identity, fresh=True)
    assert len(calls) == 5  # class means read the whole split
    feats = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    torch.testing.assert_close(obj.loss.center.center, feats[:8].mean(0))
    z = F.normalize(feats - feats[:8].mean(0), dim=1)
    means = torch.stack([z[labels == c].mean(0) for c in range(C)])
    torch.testing.assert_close(obj.loss.xi.detach(), 10 * F.normalize(means - means.mean(0), dim=1))


def test_init_pass_reads_only_what_it_needs() -> None:
    batches = _batches(5)
    calls: list[int] = []

    def embed(batch):
        calls.append(1)
        return batch

    center_only = NCMITraining(C, D, center_init_batches=2)
    center_only.init_from_training(lambda: batches, embed, _identity, fresh=True)
    assert len(calls) == 2 and torch.equal(center_only.loss.xi.detach(), init_centroids(C, D))
    resumed = NCMITraining(C, D, centroid_init="class_means", center_init_batches=2)
    resumed.loss.center.update(torch.zeros(1, D))  # a resumed run: center and ξ come from the checkpoint
    resumed.init_from_training(lambda: pytest.fail("no pass needed"), embed, _identity, fresh=False)
    off = NCMITraining(C, D)  # the defaults: no pass, the first training batch sets the center
    off.init_from_training(lambda: pytest.fail("no pass needed"), embed, _identity, fresh=True)
    assert not bool(off.loss.center.initialized)


# ------------------------------------------------------------------------------------ online CC, names
def test_online_class_means_follow_the_loss_and_reset_per_epoch() -> None:
    obj = NCMITraining(C, D)
    assert obj.train_cc.centroids() is None and obj.train_cc.accuracy(torch.full((2, D), 1 / D),
                                                                       torch.zeros(2, dtype=torch.long)) is None
    f, y = torch.randn(6, D), torch.tensor([0, 0, 1, 1, 2, 2])
    obj(f, y)
    obj.observe_train(y)
    p = obj.loss.last_log_probs.double().exp()
    expected = torch.stack([p[y == c].mean(0) for c in range(C)])
    torch.testing.assert_close(obj.train_cc.centroids(), expected)
    assert obj.train_cc.count == 6
    assert obj.train_cc.accuracy(expected, torch.arange(C)) == 1.0  # each class mean is nearest to itself
    obj.reset_epoch()
    assert obj.train_cc.count == 0 and obj.train_cc.centroids() is None


def test_online_class_means_never_predict_an_unseen_class() -> None:
    cc = OnlineClassMeans(2)
    cc.update(torch.tensor([[0.75, 0.25, 0.0, 0.0]] * 2).log(), torch.zeros(2, dtype=torch.long))
    assert torch.isnan(cc.centroids()[1]).all()
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5]])  # far from class 0's mean, but class 1 has none
    assert cc.accuracy(p, torch.tensor([0])) == 1.0


def test_metric_names_are_one_scheme() -> None:
    assert (metric_name("xi"), metric_name("cc")) == ("xi_accuracy", "cc_accuracy")
    assert (metric_name("xi", 5), metric_name("cc", 5)) == ("xi_top5", "cc_top5")
    with pytest.raises(NCMIConfigError, match="centroids must be one of"):
        metric_name("train")


def test_rename_legacy_keys() -> None:
    sd = {"ncmi_loss.xi": 1, "ncmi_loss.center.center": 2, "xi_momentum": 3, "model.xi_momentum": 4}
    rename_legacy_keys(sd, "", {"ncmi_loss.": "ncmi_training.loss.", "xi_momentum": "ncmi_training.xi_momentum"})
    assert sd == {"ncmi_training.loss.xi": 1, "ncmi_training.loss.center.center": 2,
                  "ncmi_training.xi_momentum": 3, "model.xi_momentum": 4}
    already = {"ncmi_training.loss.xi": 1, "ncmi_loss.xi": 9}  # a key already under its new name wins
    rename_legacy_keys(already, "", {"ncmi_loss.": "ncmi_training.loss."})
    assert already == {"ncmi_training.loss.xi": 1, "ncmi_loss.xi": 9}


# ------------------------------------------------------------------------------- natural: new options
TINY = dict(backbone="resnet18", num_classes=4, width=0.125, channels_last=False, objective="ncmi")


def _image_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 4) for _ in range(n)]


def _fake_trainer(batches) -> types.SimpleNamespace:
    return types.SimpleNamespace(datamodule=types.SimpleNamespace(train_dataloader=lambda: batches), world_size=1,
                                 global_step=0)


def test_natural_class_means_init_and_center_warmup() -> None:
    from wsi_ncmi.natural.module import ImageModule

    batches = _image_batches(3)
    torch.manual_seed(0)
    m = ImageModule(centroid_init="class_means", center_init_batches=2, **TINY)
    public = m.ncmi.xi.detach().clone()
    m._trainer = _fake_trainer(batches)  # type: ignore[assignment]
    m.train()
    m.on_train_start()
    assert m.training  # the pass ran in eval mode and gave train mode back
    m.eval()
    with torch.no_grad():
        feats = torch.cat([m.forward_features(x) for x, _ in batches])  # [24, D]
    labels = torch.cat([y for _, y in batches])
    center = feats[:16].mean(0)
    torch.testing.assert_close(m.ncmi.center.center, center, rtol=1e-5, atol=1e-5)
    z = F.normalize(feats - center, dim=1)
    means = torch.stack([z[labels == c].mean(0) for c in range(4)])
    torch.testing.assert_close(m.ncmi.xi.detach(), 10 * F.normalize(means - means.mean(0), dim=1),
                               rtol=1e-4, atol=1e-4)
    assert not torch.allclose(m.ncmi.xi.detach(), public)
    assert m.describe()["centroid_init"] == "class_means"
    m._trainer = None
    default = ImageModule(**TINY)  # default: neither (the natural track's behaviour before the options)
    before = default.ncmi.xi.detach().clone()
    default._trainer = _fake_trainer(batches)  # type: ignore[assignment]
    default.on_train_start()
    assert torch.equal(default.ncmi.xi.detach(), before) and not bool(default.ncmi.center.initialized)
    default._trainer = None


class _StateAtFirstStep(lightning.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "xi"):
            self.xi = pl_module.ncmi.xi.detach().clone()
            self.center_set = bool(pl_module.ncmi.center.initialized)


@pytest.mark.parametrize("options", [{}, {"centroid_init": "class_means", "center_init_batches": 2}],
                         ids=["default", "class_means_warmup"])
def test_natural_fit_runs_the_init_pass_before_the_first_step(tmp_path: Path, options: dict) -> None:
    from wsi_ncmi.natural.data import ImageDataModule
    from wsi_ncmi.natural.module import ImageModule

    lightning.seed_everything(0)
    dm = ImageDataModule(dataset="digits", image_size=16, batch_size=16, num_workers=0, pin_memory=False,
                         limit_train=64, limit_val=16)
    m = ImageModule(backbone="resnet18", num_classes=10, width=0.125, channels_last=False, objective="ncmi",
                    **options)
    public = m.ncmi.xi.detach().clone()
    trace = _StateAtFirstStep()
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False, callbacks=[trace],
                                limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                                default_root_dir=tmp_path)
    trainer.fit(m, datamodule=dm)
    assert trace.center_set == bool(options)
    assert torch.equal(trace.xi, public) != bool(options)
    assert "val/xi_accuracy" in trainer.callback_metrics and "val/cc_accuracy" in trainer.callback_metrics


# ------------------------------------------------------------------ checkpoints written before NCMITraining
def _with_old_keys(path: Path, out: Path, renames: dict[str, str]) -> dict[str, torch.Tensor]:
    """Rewrite checkpoint ``path`` as the code before NCMITraining saved it (its state-dict key names) into
    ``out``; returns today's state dict of ``path``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    today = dict(state["state_dict"])
    old = {}
    for key, value in today.items():
        for new, was in renames.items():
            if key.startswith(new):
                key = was + key[len(new):]
                break
        old[key] = value
    assert not any(k.startswith("ncmi_training.") for k in old)
    torch.save({**state, "state_dict": old}, out)
    return today


def _tiny_ncmi_fit_args(tmp_path: Path) -> list[str]:
    """`wsi-ncmi fit` arguments of a tiny ABMIL NCMI run on 12 synthetic bags written under ``tmp_path``."""
    from _synthetic import make_witness_bags

    split = make_witness_bags(tmp_path / "bags", n_slides=12, num_classes=3, dim=8, n_instances=(4, 8))
    return ["--data.bags_dir", str(tmp_path / "bags"), "--data.split_csv", str(split), "--data.num_workers", "0",
            "--data.pin_memory", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--model.lr", "3e-3", "--seed_everything", "0",
            "--model.model_kwargs", '{"inner_dim": 8, "attn_hidden": 8}', "--model.objective", "ncmi"]


def test_mil_checkpoint_with_old_keys_loads_and_resumes(tmp_path: Path) -> None:

    from wsi_ncmi.commands.train_cli import main_fit
    from wsi_ncmi.training.checkpoint import load_mil_module

    args = _tiny_ncmi_fit_args(tmp_path)
    assert main_fit([*args, "--trainer.default_root_dir", str(tmp_path / "a"), "--trainer.max_epochs", "1"]) == 0
    old_path = tmp_path / "old.ckpt"
    today = _with_old_keys(tmp_path / "a" / "checkpoints" / "last.ckpt", old_path,
                           {"ncmi_training.loss.": "ncmi_loss.", "ncmi_training.xi_momentum": "xi_momentum"})
    old_sd = torch.load(old_path, weights_only=True)["state_dict"]
    assert {"ncmi_loss.xi", "ncmi_loss.center.center", "xi_momentum"} <= set(old_sd)
    module, _ = load_mil_module(old_path)
    for key, value in module.state_dict().items():
        assert torch.equal(value, today[key]), key
    assert float(module.ncmi_training.xi_momentum.abs().sum()) > 0
    # Lightning's resume path (on_load_checkpoint, then load_state_dict, strict) through the CLI
    assert main_fit([*args, "--trainer.default_root_dir", str(tmp_path / "b"), "--trainer.max_epochs", "2",
                     "--ckpt_path", str(old_path)]) == 0
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 1 and "ncmi_training.loss.xi" in resumed["state_dict"]


def test_natural_checkpoint_with_old_keys_loads_and_resumes(tmp_path: Path) -> None:
    from wsi_ncmi.commands import natural_cli
    from wsi_ncmi.natural.metric import WeightSpec, _load_image_module
    from wsi_ncmi.natural.module import ImageModule
    from wsi_ncmi.training.checkpoint import load_module

    args = ["--data.dataset", "digits", "--data.image_size", "16", "--data.num_workers", "0", "--data.batch_size",
            "16", "--data.limit_train", "48", "--data.limit_val", "16", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--model.width", "0.125",
            "--model.objective", "ncmi", "--seed_everything", "0"]
    assert natural_cli.main(["fit", *args, "--trainer.max_epochs", "1",
                             "--trainer.default_root_dir", str(tmp_path / "a")]) == 0
    (ckpt,) = (tmp_path / "a").rglob("*.ckpt")
    old_path = tmp_path / "old.ckpt"
    today = _with_old_keys(ckpt, old_path, {"ncmi_training.loss.": "criterion."})
    old = torch.load(old_path, weights_only=True)
    assert {"criterion.xi", "criterion.center.center"} <= set(old["state_dict"])
    module, _ = load_module(old_path, ImageModule, overrides={"weights": None})  # natural evaluate's loader
    for key, value in module.state_dict().items():
        assert torch.equal(value, today[key]), key
    spec = WeightSpec(name="old", path=old_path)  # the loader of `wsi-ncmi ncmi-metric`
    loaded = _load_image_module(spec, old["state_dict"], old["hyper_parameters"])
    assert torch.equal(loaded.model.module.ncmi.xi.detach(), today["ncmi_training.loss.xi"])
    assert natural_cli.main(["fit", *args, "--trainer.max_epochs", "2", "--trainer.default_root_dir",
                             str(tmp_path / "b"), "--ckpt_path", str(old_path)]) == 0
    (resumed,) = (tmp_path / "b").rglob("*.ckpt")
    state = torch.load(resumed, weights_only=True)
    assert state["epoch"] == 1 and "ncmi_training.loss.xi" in state["state_dict"]


def test_input_norm_is_kept_in_the_checkpoint_and_a_resume_cannot_change_it(tmp_path: Path) -> None:

    from wsi_ncmi.commands.train_cli import main_fit
    from wsi_ncmi.training.checkpoint import load_mil_module

    args = _tiny_ncmi_fit_args(tmp_path)
    assert main_fit([*args, "--model.input_norm", "bag_center", "--trainer.default_root_dir", str(tmp_path / "a"),
                     "--trainer.max_epochs", "1"]) == 0
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    module, _ = load_mil_module(ckpt)  # evaluate / predict / heatmap load through this
    assert module.hparams["input_norm"] == "bag_center" and module.model.input_norm == "bag_center"
    x = torch.randn(1, 6, 8)
    assert torch.allclose(module.embed(x), module.embed(x + 2.0), atol=1e-5)  # a slide-wide shift is ignored
    assert main_fit([*args, "--trainer.default_root_dir", str(tmp_path / "b"), "--trainer.max_epochs", "2",
                     "--ckpt_path", str(ckpt)]) != 0  # the config says input_norm none: a resume is refused
    assert main_fit([*args, "--model.input_norm", "zscore", "--trainer.default_root_dir", str(tmp_path / "c")]) != 0
