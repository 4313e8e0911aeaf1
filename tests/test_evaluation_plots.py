"""Report figures: each is a real, non-empty PNG; bad inputs raise PlotError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_ncmi.evaluation.embed import EmbeddedSplit, center_and_normalize
from wsi_ncmi.evaluation.plots import (
    PlotError,
    plot_confusion,
    plot_embedding,
    plot_roc,
    plot_training_curves,
    project_2d,
    write_plots,
)
from wsi_ncmi.evaluation.protocols import evaluate_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["benign", "atypical", "malignant"]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def _splits() -> dict[str, EmbeddedSplit]:
    rng = np.random.default_rng(0)
    out = {}
    for split, n in {"train": 6, "val": 3, "test": 4}.items():
        y = np.repeat(np.arange(3), n)
        emb = 2.0 * np.eye(5)[y] + 0.5 * rng.standard_normal((y.size, 5))
        out[split] = EmbeddedSplit([f"{split}{i}" for i in range(y.size)], y, emb, logits=emb[:, :3] * 2)
    center = out["train"].embeddings.mean(0)
    for s in out.values():
        s.normalized = center_and_normalize(s.embeddings, center)
    return out


def _metrics_csv(path: Path) -> Path:
    rows = []
    for epoch in range(3):
        rows.append({"epoch": epoch, "step": epoch * 10 + 5, "train/loss": 1.0 / (epoch + 1), "train/cmi": 0.5 - 0.1 * epoch})
        rows.append({"epoch": epoch, "step": epoch * 10 + 9, "val/macro_f1": 0.4 + 0.1 * epoch,
                     "val/macro_auc": 0.6 + 0.1 * epoch, "val/ncmi": 0.9 - 0.2 * epoch})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_write_plots_all_figures(tmp_path: Path) -> None:
    splits = _splits()
    report, preds = evaluate_run(splits, 3, dataset="bracs", split_csv="s.csv", model="abmil", objective="head",
                                 class_names=NAMES, Cs=(1.0,))
    written = write_plots(
        tmp_path, report, preds, metrics_csv=_metrics_csv(tmp_path / "metrics.csv"),
        embeddings={k: (s.normalized, s.labels) for k, s in splits.items()},
    )
    names = sorted(p.name for p in written)
    assert names == sorted([
        "roc_lp_test.png", "confusion_lp_test.png", "roc_head_test.png", "confusion_head_test.png",
        "training_curves.png", "embedding_pca.png",
    ])
    assert all(_is_png(p) for p in written)
    assert not list(tmp_path.glob(".*.png"))  # no temporary files left


def test_single_plots_and_missing_class(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 1])  # class 2 absent: its ROC is undefined but the figure is drawn
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]])
    assert _is_png(plot_roc(y, p, NAMES, tmp_path / "roc.png"))
    assert _is_png(plot_confusion([[1, 1, 0], [0, 2, 0], [0, 0, 0]], NAMES, tmp_path / "cm.png"))
    emb = np.random.default_rng(0).standard_normal((12, 4))
    assert project_2d(emb[:, :1]).shape == (12, 2)  # 1-D input is padded to 2 columns


@pytest.mark.slow
def test_tsne_embedding_plot(tmp_path: Path) -> None:
    emb = np.random.default_rng(0).standard_normal((12, 4))
    assert _is_png(plot_embedding(emb, np.arange(12) % 3, NAMES, tmp_path / "tsne.png", method="tsne"))


def test_plot_errors(tmp_path: Path) -> None:
    with pytest.raises(PlotError):
        plot_roc(np.array([0, 1]), np.ones((2, 2)), NAMES, tmp_path / "x.png")
    with pytest.raises(PlotError):
        plot_confusion([[1, 0], [0, 1]], NAMES, tmp_path / "x.png")
    with pytest.raises(PlotError, match="method"):
        project_2d(np.ones((4, 3)), method="umap")
    bad = tmp_path / "m.csv"
    pd.DataFrame({"step": [1], "foo": [2]}).to_csv(bad, index=False)
    with pytest.raises(PlotError, match="epoch"):
        plot_training_curves(bad, tmp_path / "x.png")
    pd.DataFrame({"epoch": [0], "foo": [2]}).to_csv(bad, index=False)
    with pytest.raises(PlotError, match="no known metric"):
        plot_training_curves(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_curve_panels_draw_every_loss_term() -> None:
    from wsi_ncmi.evaluation.plots import _CURVE_PANELS, _curve_columns

    cols = ["epoch", "step", "train/loss_step", "train/loss_epoch", "train/aem_entropy_epoch", "train/focal",
            "train/lr", "val/loss", "val/macro_f1", "val/cc_accuracy", "val/ncmi", "val/f1_plus_auc"]
    panels = {title: _curve_columns(cols, accepts) for title, accepts in _CURVE_PANELS}
    assert panels["loss terms"] == ["train/loss_epoch", "train/aem_entropy_epoch", "train/focal", "val/loss"]
    assert panels["validation"] == ["val/cc_accuracy", "val/macro_f1"]
    assert panels["dataset-level NCMI (val)"] == ["val/ncmi"]
