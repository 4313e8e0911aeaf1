"""Every natural-image config instantiates through `wsi-ncmi natural fit` and runs one step on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wsi_ncmi.commands.natural_cli import main
from wsi_ncmi.training.compose import compose_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "natural").glob("*.yaml"))
RUN_CONFIGS = [p for p in CONFIGS if not p.name.startswith("_")]


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_natural_config_runs_one_step(config: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    resolved = compose_config(config)
    argv = [
        "fit", "-c", str(config),
        "--data.dataset", "digits", "--data.image_size", "16", "--data.batch_size", "8",
        "--data.num_workers", "0", "--data.limit_train", "16", "--data.limit_val", "16",
        "--model.width", "0.125",
        "--trainer.fast_dev_run", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    # main() returns 0 whenever nothing raised: check that the config really trained one step
    import lightning.pytorch as pl

    fitted: list[pl.Trainer] = []
    real_fit = pl.Trainer.fit

    def spy_fit(trainer: pl.Trainer, *args, **kwargs):
        real_fit(trainer, *args, **kwargs)
        fitted.append(trainer)

    monkeypatch.setattr(pl.Trainer, "fit", spy_fit)
    assert main(argv) == 0
    assert len(fitted) == 1, "`natural fit` did not run Trainer.fit"
    trainer = fitted[0]
    assert trainer.state.finished and trainer.global_step == 1
    params = [p for p in trainer.lightning_module.parameters() if p.requires_grad]
    assert params and all(torch.isfinite(p).all() for p in params)
    assert resolved["model"]["objective"] in {"head", "ncmi", "contrastive"}
    assert resolved["model"]["objective"] == "ncmi" or resolved["model"]["loss"] in {
        "ce", "label_smoothing", "focal", "occe", "milloss", "supcon"}  # fmt: skip
