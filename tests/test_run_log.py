"""The run folder's metrics.csv: a resumed fit appends (and equals an uninterrupted run), test runs leave it alone."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests._synthetic import make_witness_bags
from wsi_ncmi.training import trim_metrics_csv

DIM = 16


@pytest.fixture(scope="module")
def bags(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bags_runlog")
    split = make_witness_bags(d, n_slides=16, num_classes=2, dim=DIM, n_instances=(5, 12), seed=3)
    return d, split


def _args(bags: tuple[Path, Path], root: Path, *extra: str) -> list[str]:
    bags_dir, split = bags
    return ["--data.bags_dir", str(bags_dir), "--data.split_csv", str(split), "--data.num_workers", "0",
            "--data.pin_memory", "false", "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.lr", "3e-3", "--model.scheduler", "none", "--model.objective", "ncmi",
            "--model.model", "abmil", "--seed_everything", "7", *extra]


def _val_rows(path: Path) -> dict[int, dict[str, str]]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/loss")]
    return {int(float(r["epoch"])): r for r in rows}


def test_resumed_fit_appends_and_matches_an_uninterrupted_run(bags, tmp_path):
    from wsi_ncmi.commands.train_cli import main_fit, main_test

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main_fit(_args(bags, straight, "--trainer.max_epochs", "3")) == 0
    assert main_fit(_args(bags, resumed, "--trainer.max_epochs", "2")) == 0
    assert sorted(_val_rows(resumed / "metrics.csv")) == [0, 1]
    assert main_fit(_args(bags, resumed, "--trainer.max_epochs", "3", "--ckpt_path", "last")) == 0

    a, b = _val_rows(straight / "metrics.csv"), _val_rows(resumed / "metrics.csv")
    assert sorted(b) == [0, 1, 2], "epochs logged before the resume were lost"
    for epoch in (0, 1, 2):
        for key in ("val/loss", "val/ncmi", "val/macro_auc", "train/loss_epoch"):
            if key in a[epoch] and a[epoch][key]:
                assert float(b[epoch][key]) == pytest.approx(float(a[epoch][key]), rel=1e-5, abs=1e-7), (epoch, key)

    # a test run in the same folder keeps the training log and writes its own
    before = (resumed / "metrics.csv").read_text()
    ckpt = str(resumed / "checkpoints" / "last.ckpt")
    assert main_test([*_args(bags, resumed), "--ckpt_path", ckpt]) == 0
    assert (resumed / "metrics.csv").read_text() == before
    assert "test/macro_f1" in (resumed / "test" / "metrics.csv").read_text()

    # a fresh fit into the same folder starts a fresh log (no rows of the earlier run)
    assert main_fit(_args(bags, resumed, "--trainer.max_epochs", "1")) == 0
    assert sorted(_val_rows(resumed / "metrics.csv")) == [0]


def test_trim_metrics_csv_drops_a_partly_logged_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,0,1.0\n0,1,0.9\n1,2,0.8\n,3,\n2,4,0.7\n")
    assert trim_metrics_csv(path, 1) == 2
    assert path.read_text().splitlines() == ["epoch,step,train/loss", "0,0,1.0", "0,1,0.9", ",3,"]
    assert trim_metrics_csv(path, 5) == 0
    assert trim_metrics_csv(tmp_path / "missing.csv", 0) == 0
