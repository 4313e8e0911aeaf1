"""MILModule (head / NCMI), the fit CLI, resume, pre-flight errors, schedules and validation metrics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as lightning
import numpy as np
import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.data import MILDataModule, write_bag
from wsi_ncmi.data.split_check import PreflightError, preflight_check
from wsi_ncmi.training import (
    MILModule,
    TrainingConfigError,
    build_scheduler,
    epoch_metrics,
)

DIM = 32


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("witness")
    split = make_witness_bags(d, n_slides=48, num_classes=2, dim=DIM, n_instances=(5, 30), seed=0,
                              witness_strength=5.0, fractions=(0.6, 0.3, 0.1))
    return d, split


def _fit(bags_dir: Path, split: Path, root: Path, model: str, objective: str, epochs: int, **module_kw):
    from wsi_ncmi.training import RNGStateCheckpoint

    lightning.seed_everything(0)
    dm = MILDataModule(str(bags_dir), str(split), num_workers=0, pin_memory=False)
    module = MILModule(model=model, in_dim=dm.in_dim, num_classes=dm.num_classes, objective=objective,
                       lr=3e-3, **module_kw)
    ckpt = lightning.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", filename="best",
                                               monitor="val/f1_plus_auc", mode="max", save_last=True)
    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[ckpt, RNGStateCheckpoint()],
                                default_root_dir=root)
    trainer.fit(module, datamodule=dm)
    return trainer, module


# ----------------------------------------------------------------------------------------- synthetic data
def test_make_witness_bags_layout(tmp_path):
    split = make_witness_bags(tmp_path, n_slides=12, num_classes=3, dim=8, n_instances=(5, 9), seed=1)
    rows = list(csv.DictReader(split.open()))
    assert len(rows) == 12 and len(list(tmp_path.glob("*.h5"))) == 12
    for s in ("train", "val", "test"):
        assert {int(r["label"]) for r in rows if r["split"] == s} == {0, 1, 2}
    dm = MILDataModule(str(tmp_path), str(split), num_workers=0, pin_memory=False)
    assert dm.in_dim == 8 and dm.num_classes == 3


# ------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("objective", ["head", "ncmi"])
def test_abmil_learns_witness_task(bags, tmp_path, objective):
    trainer, module = _fit(*bags, tmp_path, "abmil", objective, epochs=6)
    m = trainer.callback_metrics
    assert float(m["val/macro_auc"]) > 0.8, dict(m)
    assert math.isfinite(float(m["train/loss"]))
    if objective == "ncmi":
        assert module.ncmi_loss is not None and isinstance(module.model.head, torch.nn.Identity)
        for key in ("val/cmi", "val/gamma", "val/ncmi", "val/cc_accuracy", "val/xi_accuracy", "train/cmi",
                    "train/gamma"):
            assert key in m, key
        assert float(m["val/xi_accuracy"]) == float(m["val/accuracy"])
        assert float(m["val/cc_accuracy"]) > 0.7, dict(m)
    else:
        assert module.ncmi_loss is None and "train/ce" in m


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["head", "ncmi"])
@pytest.mark.parametrize("model", ["transmil", "aem", "asmil"])
def test_every_aggregator_learns(bags, tmp_path, model, objective):
    kw = {"transmil": {"model_kwargs": {"dim": 64, "num_landmarks": 16}},
          "asmil": {"model_kwargs": {"inner_dim": 32, "num_heads": 4}}}.get(model, {})
    trainer, _ = _fit(*bags, tmp_path, model, objective, epochs=8 if model == "asmil" else 6, **kw)
    assert float(trainer.callback_metrics["val/macro_auc"]) > 0.75, dict(trainer.callback_metrics)
    if model in ("aem", "asmil"):
        assert any(k.startswith("train/") and k not in ("train/loss", "train/ce", "train/ncmi", "train/cmi",
                   "train/gamma", "train/lr") for k in trainer.callback_metrics), "aux term not logged"


def test_online_cc_accuracy_is_nearest_train_class_mean():
    module = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi")
    module.trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    cc, sum_fn = module.ncmi_training.train_cc, module._sum_over_ranks
    assert cc.accuracy(torch.full((3, 4), 0.25), torch.zeros(3, dtype=torch.long), sum_fn) is None
    class0 = torch.tensor([[0.75, 0.25, 0.0, 0.0]] * 4)  # class means: [.75 .25 0 0]
    class1 = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)  # and [0 0 .5 .5]
    cc.update(class0.log(), torch.zeros(4, dtype=torch.long))
    cc.update(class1.log(), torch.ones(2, dtype=torch.long))
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.1, 0.5, 0.4], [0.1, 0.0, 0.45, 0.45]])
    assert cc.accuracy(p, torch.tensor([0, 1, 1]), sum_fn) == pytest.approx(1.0)
    assert cc.accuracy(p, torch.tensor([1, 1, 0]), sum_fn) == pytest.approx(1 / 3)
    module.on_train_epoch_start()  # a new epoch in which class 1 has no training bag: never predicted
    cc.update(class0.log(), torch.zeros(4, dtype=torch.long))
    assert cc.accuracy(p, torch.tensor([0, 0, 0]), sum_fn) == pytest.approx(1.0)


def test_online_cc_epoch_metrics_score_the_nearest_train_class_mean():
    """``cc_macro_f1`` / ``cc_macro_auc`` / ``cc_f1_plus_auc``: the online CC as a classifier with scores
    softmax(−KL to the class means), independent of ξ (a checkpoint monitor candidate, docs/ncmi_mil.md)."""
    module = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi")
    module.trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    ncmi, sum_fn = module.ncmi_training, module._sum_over_ranks
    p = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.1, 0.5, 0.4], [0.1, 0.0, 0.45, 0.45], [0.6, 0.3, 0.05, 0.05]])
    assert "cc_f1_plus_auc" not in ncmi.eval_metrics(p, torch.tensor([0, 1, 1, 0]), 0.5, sum_fn)  # no class means
    ncmi.train_cc.update(torch.tensor([[0.75, 0.25, 0.0, 0.0]] * 4).log(), torch.zeros(4, dtype=torch.long))
    ncmi.train_cc.update(torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2).log(), torch.ones(2, dtype=torch.long))
    right = ncmi.eval_metrics(p, torch.tensor([0, 1, 1, 0]), 0.5, sum_fn)
    assert (right["cc_accuracy"], right["cc_macro_f1"], right["cc_macro_auc"]) == pytest.approx((1.0, 1.0, 1.0))
    assert right["cc_f1_plus_auc"] == pytest.approx(2.0) and right["xi_accuracy"] == 0.5
    wrong = ncmi.eval_metrics(p, torch.tensor([1, 0, 0, 1]), 0.5, sum_fn)  # every label swapped
    assert (wrong["cc_accuracy"], wrong["cc_macro_f1"], wrong["cc_macro_auc"]) == pytest.approx((0.0, 0.0, 0.0))


# ---------------------------------------------------------------------------------------------- resume
class _StepLosses(lightning.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("data_kw", [{}, {"instance_dropout": 0.3, "max_instances": 12, "balanced_sampler": True}],
                         ids=["plain", "dropout_subset_balanced"])
def test_resume_reproduces_next_steps(bags, tmp_path, data_kw):
    """3 epochs straight == 2 epochs, then resume from last.ckpt for the 3rd (NCMI: center, ξ, RNG, Adam;
    instance subsets/dropout and the balanced bag order follow (seed, epoch))."""
    from wsi_ncmi.training import RNGStateCheckpoint

    bags_dir, split = bags

    class _StopAfter(lightning.Callback):  # stop early without changing max_epochs (the lr schedule spans it)
        def __init__(self, epochs: int) -> None:
            self.epochs = epochs

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch + 1 >= self.epochs:
                trainer.should_stop = True

    def run(root: Path, stop_after: int, ckpt_path: str | None = None) -> list[float]:
        lightning.seed_everything(0)
        dm = MILDataModule(str(bags_dir), str(split), num_workers=0, pin_memory=False, **data_kw)
        module = MILModule(model="aem", in_dim=DIM, num_classes=2, objective="ncmi", lr=3e-3)
        rec = _StepLosses()
        ckpt = lightning.callbacks.ModelCheckpoint(dirpath=root, save_last=True)
        trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                                    enable_model_summary=False,
                                    callbacks=[ckpt, rec, RNGStateCheckpoint(), _StopAfter(stop_after)],
                                    limit_train_batches=6, limit_val_batches=3)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        assert dm.dataset("train").epoch == stop_after - 1  # MILModule told the data each epoch
        return rec.losses

    straight = run(tmp_path / "a", 3)
    first = run(tmp_path / "b", 2)
    resumed = run(tmp_path / "c", 3, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert first == straight[:12]
    assert len(resumed) == 6
    np.testing.assert_allclose(resumed, straight[12:], rtol=1e-6, atol=1e-7)


def test_checkpoint_rebuilds_module(bags, tmp_path):
    _, module = _fit(*bags, tmp_path, "abmil", "ncmi", epochs=1)
    path = tmp_path / "checkpoints" / "last.ckpt"
    loaded = MILModule.load_from_checkpoint(path, weights_only=True)
    assert loaded.objective == "ncmi" and loaded.hparams.model == "abmil"
    assert bool(loaded.ncmi_loss.center.initialized)
    torch.testing.assert_close(loaded.ncmi_loss.center.center, module.ncmi_loss.center.center)
    torch.testing.assert_close(loaded.ncmi_loss.xi, module.ncmi_loss.xi)
    x = torch.randn(2, 7, DIM)
    torch.testing.assert_close(loaded.embed(x), module.embed(x))
    assert loaded.embed(x).shape == (2, module.model.embed_dim)


# ---------------------------------------------------------------------------------- centroid updates
def _one_step(module: MILModule) -> torch.Tensor:
    before = module.ncmi_loss.xi.detach().clone()
    batch = {"features": torch.randn(2, 6, DIM), "mask": None, "label": torch.tensor([0, 1])}
    module.ncmi_loss.center.update(torch.randn(4, module.model.embed_dim))
    named, _ = module._objective(batch)
    named["loss"].backward()
    module.ncmi_training.before_optimizer_step()
    return before


def test_centroid_sgd_moves_xi_and_keeps_momentum():
    module = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi", centroid_lr=0.5)
    assert module.ncmi_training.manual_xi and "ncmi_training.xi_momentum" in dict(module.named_buffers())
    assert all(p is not module.ncmi_loss.xi for g in [module.model.parameters()] for p in g)
    before = _one_step(module)
    assert not torch.equal(before, module.ncmi_loss.xi) and module.ncmi_loss.xi.grad is None
    assert module.ncmi_training.xi_momentum.abs().sum() > 0


def test_centroid_group_and_frozen_modes():
    grouped = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi", centroid_optimizer="group")
    assert not grouped.ncmi_training.manual_xi
    frozen = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi",
                       ncmi_kwargs={"centroid_update": "frozen"})
    assert not frozen.ncmi_training.manual_xi and not frozen.ncmi_loss.xi.requires_grad


def test_bad_module_arguments():
    with pytest.raises(TrainingConfigError, match="objective"):
        MILModule(objective="nope", in_dim=DIM)
    with pytest.raises(TrainingConfigError, match="class_weights"):
        MILModule(in_dim=DIM, num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(TrainingConfigError, match="class_weights"):
        MILModule(in_dim=DIM, objective="ncmi", class_weights=[1.0, 2.0])


def test_module_rejects_mismatched_datamodule(bags, tmp_path):
    bags_dir, split = bags
    dm = MILDataModule(str(bags_dir), str(split), num_workers=0, pin_memory=False)
    module = MILModule(in_dim=DIM, num_classes=3)
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                default_root_dir=tmp_path)
    with pytest.raises(TrainingConfigError, match="2 classes"):
        trainer.fit(module, datamodule=dm)


# --------------------------------------------------------------------------------------------- CLI
def _cli_args(bags_dir: Path, split: Path, root: Path, *extra: str) -> list[str]:
    return ["--data.bags_dir", str(bags_dir), "--data.split_csv", str(split), "--data.num_workers", "0",
            "--data.pin_memory", "false", "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.lr", "3e-3", "--seed_everything", "0", *extra]


def test_fit_cli_run_folder_layout(bags, tmp_path):
    from wsi_ncmi.commands.train_cli import main_fit, main_test

    root = tmp_path / "run"
    args = _cli_args(*bags, root, "--trainer.max_epochs", "2", "--model.objective", "ncmi")
    assert main_fit(args) == 0
    assert (root / "checkpoints" / "best.ckpt").is_file() and (root / "checkpoints" / "last.ckpt").is_file()
    assert (root / "config.yaml").is_file()
    header = (root / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("train/loss_epoch", "train/cmi_epoch", "val/f1_plus_auc", "val/ncmi", "epoch"):
        assert col in header, header
    ckpt = str(root / "checkpoints" / "best.ckpt")
    assert main_test([*_cli_args(*bags, tmp_path / "test_run"), "--model.objective", "ncmi",
                      "--ckpt_path", ckpt]) == 0


def test_last_ckpt_is_the_last_epoch_when_the_monitor_stops_improving(bags, tmp_path):
    from wsi_ncmi.commands.train_cli import main_fit

    root = tmp_path / "run"
    # a monitor that only "improves" in epoch 0: best.ckpt stays there, last.ckpt must follow every epoch
    args = _cli_args(*bags, root, "--trainer.max_epochs", "3", "--checkpoint.monitor", "epoch",
                     "--checkpoint.mode", "min")
    assert main_fit(args) == 0
    best = torch.load(root / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert best["epoch"] == 0 and last["epoch"] == 2 and last["global_step"] == 3 * best["global_step"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_no_monitor_keeps_the_last_epoch_as_best(bags, tmp_path):
    """``checkpoint.monitor: null`` (the shipped NCMI leaves): best.ckpt is the final epoch, not a selected one."""
    from wsi_ncmi.commands.train_cli import main_fit

    root = tmp_path / "run"
    assert main_fit(_cli_args(*bags, root, "--trainer.max_epochs", "3", "--model.objective", "ncmi",
                              "--checkpoint.monitor", "null")) == 0
    best = torch.load(root / "checkpoints" / "best.ckpt", weights_only=True, map_location="cpu")
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert best["epoch"] == last["epoch"] == 2 and best["global_step"] == last["global_step"]
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_preflight_errors_before_training(tmp_path, capsys):
    from wsi_ncmi.commands.train_cli import main_fit

    split = make_witness_bags(tmp_path, n_slides=9, num_classes=3, dim=8, n_instances=(5, 8))
    # label count: three classes in the table, two declared
    rc = main_fit(_cli_args(tmp_path, split, tmp_path / "r1", "--data.num_classes", "2"))
    assert rc == 2 and "labels [2] are outside [0, 1]" in capsys.readouterr().err
    # a bag with another feature dim
    write_bag(tmp_path / "slide_004.h5", np.zeros((5, 12), np.float32), np.zeros((5, 2), np.int64))
    with pytest.raises(PreflightError, match=r"slide_004.h5 \(D=12\)"):
        preflight_check(tmp_path, split)
    rc = main_fit(_cli_args(tmp_path, split, tmp_path / "r2"))
    assert rc == 2 and "feature dim other than 8" in capsys.readouterr().err
    # missing bags (all listed)
    (tmp_path / "slide_004.h5").unlink()
    (tmp_path / "slide_007.h5").unlink()
    with pytest.raises(PreflightError, match="2 of 9 slides .* slide_004, slide_007"):
        preflight_check(tmp_path, split)
    assert not (tmp_path / "r2" / "checkpoints").exists()
    # more classes declared than the train split holds (a 4-class config on a 3-class table)
    other = tmp_path / "other"
    split3 = make_witness_bags(other, n_slides=9, num_classes=3, dim=8, n_instances=(5, 8))
    with pytest.raises(PreflightError, match=r"classes \[3\] have no slide in the train split"):
        preflight_check(other, split3, num_classes=4)



def test_fit_setup_lists_the_bags_folder_once_and_reads_each_header_once(bags, tmp_path, monkeypatch):
    """One owner of "split table + bags folder": the pre-flight check resolves the split, the datamodule and its
    datasets take the resolved paths (no second listing, no second header read, whatever module asks)."""
    import sys

    from wsi_ncmi.data import bags as bags_mod
    from wsi_ncmi.data.provenance import datamodule_provenance
    from wsi_ncmi.training.cli import MILCLI

    calls = {"list_bags": [], "check_header": []}  # check_header: read_header plus the checks of a usable bag

    def counting(name):
        real = getattr(bags_mod, name)

        def wrapper(path, *a, **k):
            calls[name].append(str(path))
            return real(path, *a, **k)

        return real, wrapper

    for name in calls:
        real, wrapper = counting(name)
        for mod in [m for n, m in sys.modules.items() if n.startswith("wsi_ncmi") and m is not None]:
            if getattr(mod, name, None) is real:
                monkeypatch.setattr(mod, name, wrapper)
    cli = MILCLI(args=_cli_args(*bags, tmp_path / "run", "--data.cache", "auto"), run=False)
    dm = cli.datamodule
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))
    dm.dataset("test")
    assert datamodule_provenance(dm) is not None
    n_slides = len(dm.table)
    assert calls["list_bags"] == [str(bags[0])]
    assert len(calls["check_header"]) == n_slides == len(set(calls["check_header"]))

# --------------------------------------------------------------------------------- schedule / metrics
def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0}], lr=0.1)
    sched = build_scheduler("cosine", opt, total_steps=12, warmup_steps=2)
    lrs = []
    for _ in range(12):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx([0.05, 0.5]) and lrs[2] == pytest.approx([0.1, 1.0])
    assert lrs[7][0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert build_scheduler("none", opt, 10) is None


def test_ncmi_centroids_in_the_optimizer_follow_its_warmup_and_cosine():
    """``centroid_optimizer="group"`` in MIL (tried for AEM / ASMIL in tuning round 3, docs/ncmi_mil.md): ξ is a group
    of the main AdamW with its own lr and no weight decay, scaled by the network's warm-up + cosine."""
    import types

    module = MILModule(model="abmil", in_dim=DIM, num_classes=3, objective="ncmi", lr=3e-4, warmup_epochs=1.0,
                       centroid_optimizer="group", centroid_lr=3e-3)
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=20, max_epochs=4)  # 5 steps per epoch
    assert "xi_momentum" not in dict(module.named_buffers())  # no manual SGD step
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    (xi_group,) = [g for g in opt.param_groups if any(p is module.ncmi_training.loss.xi for p in g["params"])]
    assert xi_group["weight_decay"] == 0.0
    lrs = []
    for _ in range(20):
        lrs.append((opt.param_groups[0]["lr"], xi_group["lr"]))
        opt.step()
        sched.step()
    assert lrs[0][1] < lrs[3][1] < lrs[4][1] == pytest.approx(3e-3)  # linear warm-up over the first epoch
    assert all(xi == pytest.approx(10 * net) for net, xi in lrs)  # the network's schedule, ×10
    assert lrs[-1][1] < 0.05 * 3e-3  # cosine to ~0: the last epoch's ξ hardly moves


def test_validation_metrics_with_absent_class():
    scores = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1, 0, 1])  # class 2 absent
    m = epoch_metrics(scores, labels)
    assert m["accuracy"] == 1.0 and m["macro_auc"] == 1.0 and m["f1_plus_auc"] == 2.0
    assert math.isnan(epoch_metrics(scores, np.zeros(4, dtype=int))["macro_auc"])
    assert epoch_metrics(scores[:1], labels[:1])["f1_plus_auc"] == 1.0


def test_ncmi_metrics_skipped_when_validation_holds_one_class(monkeypatch):
    import types
    import warnings

    module = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi")
    module._trainer = types.SimpleNamespace(world_size=1)  # _gather needs only world_size
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, value))
    features = torch.randn(1, 6, DIM)
    for labels in ([0, 0], [0, 1]):
        logged.clear()
        for y in labels:
            module._eval_step({"features": features + y, "label": torch.tensor([y])})
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # ncmi_metric warns on Γ = 0
            module._log_eval("val")
        assert "val/xi_accuracy" in logged and "val/loss" in logged
        assert "val/cc_accuracy" not in logged  # no training epoch yet: no class means to compare with
        assert ("val/ncmi" in logged) == (len(set(labels)) == 2)
        assert ("val/gamma" in logged) == (len(set(labels)) == 2)


def test_half_precision_bags_are_cast_to_float32_on_the_device(tmp_path):
    split = make_witness_bags(tmp_path, n_slides=8, num_classes=2, dim=8, n_instances=(4, 6))
    dm = MILDataModule(str(tmp_path), str(split), num_workers=0, pin_memory=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = MILModule(model="abmil", in_dim=dm.in_dim, num_classes=dm.num_classes)
    half = batch["features"].half()
    assert torch.allclose(module.embed(half, batch["mask"]), module.embed(half.float(), batch["mask"]))
    module.eval()
    terms_half, _ = module._objective({**batch, "features": half})
    terms_full, _ = module._objective({**batch, "features": half.float()})
    assert terms_half["loss"].dtype == torch.float32 and torch.allclose(terms_half["loss"], terms_full["loss"])


def test_datamodule_without_num_classes_works_with_a_logger(tmp_path):
    """The inferred class count is what Lightning merges into the logger's hparams (no model/data mismatch)."""
    from lightning.pytorch.loggers import CSVLogger

    split = make_witness_bags(tmp_path, n_slides=9, num_classes=2, dim=8, n_instances=(4, 6))
    dm = MILDataModule(str(tmp_path), str(split), num_workers=0, pin_memory=False)
    assert dm.hparams_initial["num_classes"] == 2
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path / "logs"),
                                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(MILModule(in_dim=8, num_classes=2), datamodule=dm)
    assert trainer.current_epoch == 1


def test_centroid_sgd_step_skips_a_non_finite_gradient():
    module = MILModule(model="abmil", in_dim=DIM, num_classes=2, objective="ncmi", centroid_lr=0.5,
                       centroid_momentum=0.9)
    xi, ncmi = module.ncmi_loss.xi, module.ncmi_training
    before, mom = xi.detach().clone(), ncmi.xi_momentum.clone()
    xi.grad = torch.full_like(xi, float("nan"))
    ncmi.before_optimizer_step()
    assert torch.equal(xi.detach(), before) and torch.equal(ncmi.xi_momentum, mom) and xi.grad is None
    g = torch.ones_like(xi)
    xi.grad = g.clone()
    ncmi.before_optimizer_step()
    assert torch.allclose(ncmi.xi_momentum, 0.9 * mom + g)
    assert torch.allclose(xi.detach(), before - 0.5 * (0.9 * mom + g))


class _XiAtFirstStep(lightning.Callback):
    """ξ and the center as the first training step sees them, and the embeddings of every training bag then."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx or hasattr(self, "xi"):
            return
        self.xi = pl_module.ncmi_loss.xi.detach().clone()
        dm = trainer.datamodule
        ds = dm.dataset("train")
        emb = torch.cat([pl_module.embed(ds[i]["features"][None]) for i in range(len(ds))])
        self.z = pl_module.ncmi_loss.normalized(emb)
        self.y = torch.as_tensor(ds.labels)


def test_centroid_init_class_means_sets_xi_before_the_first_step(bags, tmp_path):
    trace = _XiAtFirstStep()
    lightning.seed_everything(0)
    dm = MILDataModule(str(bags[0]), str(bags[1]), num_workers=0, pin_memory=False)
    module = MILModule(model="abmil", in_dim=dm.in_dim, num_classes=dm.num_classes, objective="ncmi", lr=3e-3,
                       centroid_init="class_means")
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False, callbacks=[trace],
                                default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    means = torch.stack([trace.z[trace.y == c].mean(0) for c in range(2)])  # [C, E]
    expected = 10.0 * torch.nn.functional.normalize(means - means.mean(0), dim=1)
    torch.testing.assert_close(trace.xi, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(TrainingConfigError, match="centroid_init must be one of"):
        MILModule(objective="ncmi", centroid_init="kmeans")
