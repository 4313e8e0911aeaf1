"""Epoch weight averaging (wsi_ncmi.training.weight_average, MILModule(weight_average=...))."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from wsi_ncmi.training.weight_average import CHECKPOINT_KEY, EpochWeightAverage, WeightAverageError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    net[1].bias.requires_grad_(False)  # not trainable: never averaged
    return net


def _train_epochs(net: nn.Module, avg: EpochWeightAverage, epochs: range, max_epochs: int) -> list[dict]:
    """Move the weights by a fixed amount per epoch; return the trainable weights after each epoch's 'steps'."""
    seen = []
    for epoch in epochs:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(float(epoch + 1))
        seen.append({k: v.detach().clone() for k, v in net.named_parameters() if v.requires_grad})
        avg.epoch_end(net, epoch, max_epochs)
    return seen


def test_the_final_weights_are_the_mean_of_the_last_epochs_and_frozen_ones_are_untouched() -> None:
    net, avg = _net(), EpochWeightAverage(0.5)
    assert avg.first_epoch(4) == 2 and EpochWeightAverage(0.1).first_epoch(4) == 3  # at least one epoch
    frozen_before = net[1].bias.detach().clone()
    seen = _train_epochs(net, avg, range(4), 4)
    assert avg.count == 2
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, (seen[2][name] + seen[3][name]) / 2), name
    assert torch.allclose(net[1].bias, frozen_before + 10.0)  # moved with "training", not averaged


def test_off_changes_nothing_and_bad_settings_are_refused() -> None:
    net, avg = _net(), EpochWeightAverage(0.0)
    seen = _train_epochs(net, avg, range(3), 3)
    assert not avg.enabled and torch.equal(net[0].weight, seen[-1]["0.weight"])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(WeightAverageError, match="weight_average must be in"):
            EpochWeightAverage(bad)
    with pytest.raises(WeightAverageError, match="max_epochs"):
        EpochWeightAverage(0.5).first_epoch(-1)


def test_a_resumed_average_ends_where_an_uninterrupted_one_does() -> None:
    whole_net, whole = _net(), EpochWeightAverage(0.75)
    _train_epochs(whole_net, whole, range(4), 4)
    net, first = _net(), EpochWeightAverage(0.75)
    _train_epochs(net, first, range(2), 4)
    saved = first.state_dict()
    assert saved["count"] == 1 and set(saved["mean"]) == {"0.weight", "0.bias", "1.weight"}
    resumed = EpochWeightAverage(0.75)
    resumed.load_state_dict(saved)
    _train_epochs(net, resumed, range(2, 4), 4)
    for a, b in zip(net.parameters(), whole_net.parameters(), strict=True):
        assert torch.allclose(a, b)
    with pytest.raises(WeightAverageError, match="fraction 0.75"):
        EpochWeightAverage(0.5).load_state_dict(saved, "run/last.ckpt")
    with pytest.raises(WeightAverageError, match="tensors"):
        EpochWeightAverage(0.75).load_state_dict({"fraction": 0.75, "mean": {"w": [1.0]}})


class _Snapshots(pl.Callback):
    """The trainable weights after each epoch's last optimizer step (callback hooks run before the module's)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.weights.append({k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad})


@pytest.mark.parametrize("objective", ["ncmi", "head"])
def test_mil_module_validates_and_saves_the_averaged_model(tmp_path: Path, objective: str) -> None:
    from _synthetic import make_witness_bags

    from wsi_ncmi.data import MILDataModule
    from wsi_ncmi.training import MILModule
    from wsi_ncmi.training.checkpoint import load_mil_module

    split = make_witness_bags(tmp_path / "bags", n_slides=12, num_classes=3, dim=8, n_instances=(4, 8))
    dm = MILDataModule(str(tmp_path / "bags"), str(split), num_workers=0, pin_memory=False, num_classes=3)
    pl.seed_everything(0)
    module = MILModule(in_dim=8, num_classes=3, objective=objective, lr=3e-3, weight_average=0.5,
                       model_kwargs={"inner_dim": 8, "attn_hidden": 8})
    snaps = _Snapshots()
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[snaps], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert len(snaps.weights) == 4 and module.weight_average.count == 2
    for name, p in module.named_parameters():
        if p.requires_grad:
            mean = (snaps.weights[2][name].double() + snaps.weights[3][name].double()) / 2
            assert torch.allclose(p.double(), mean, atol=1e-6), name
    assert all(not torch.equal(snaps.weights[3][k], snaps.weights[2][k]) for k in snaps.weights[3])  # they moved
    if objective == "ncmi":
        assert "ncmi_training.loss.xi" in snaps.weights[3]  # ξ is averaged with the network
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert saved[CHECKPOINT_KEY]["count"] == 2 and saved["hyper_parameters"]["weight_average"] == 0.5
    loaded, _ = load_mil_module(ckpt)  # evaluate / predict read the averaged weights
    for (name, a), b in zip(loaded.state_dict().items(), module.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b.cpu()), name


def test_mil_module_refuses_a_bad_fraction() -> None:
    from wsi_ncmi.training import MILModule, TrainingConfigError

    with pytest.raises(TrainingConfigError, match="weight_average must be in"):
        MILModule(in_dim=8, num_classes=2, weight_average=2.0)


def test_fit_cli_trains_an_averaged_model_and_warns_when_best_ckpt_may_predate_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from test_ncmi_objective import _tiny_ncmi_fit_args

    from wsi_ncmi.commands.train_cli import main_fit

    args = [*_tiny_ncmi_fit_args(tmp_path), "--model.weight_average", "0.5", "--trainer.max_epochs", "2"]
    with caplog.at_level("WARNING"):
        assert main_fit([*args, "--trainer.default_root_dir", str(tmp_path / "a")]) == 0
    assert "best.ckpt may be an epoch from before the averaging" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main_fit([*args, "--checkpoint.monitor", "null", "--trainer.default_root_dir", str(tmp_path / "b")]) == 0
    assert "before the averaging" not in caplog.text
    best = torch.load(tmp_path / "b" / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 1 and best[CHECKPOINT_KEY]["count"] == 1
    assert main_fit([*args, "--model.weight_average", "1.5", "--trainer.default_root_dir", str(tmp_path / "c")]) != 0
