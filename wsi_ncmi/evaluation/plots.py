"""Figures for an evaluation report (matplotlib, Agg backend; PNG files written atomically).

* :func:`plot_roc` — one-vs-rest ROC curve per class (with its AUC) for one protocol / split;
* :func:`plot_confusion` — a confusion matrix with counts;
* :func:`plot_training_curves` — loss terms, validation macro-F1 / macro-AUC and NCMI per epoch from a
  Lightning ``metrics.csv``;
* :func:`plot_embedding` — 2-D projection of slide embeddings coloured by class (PCA; t-SNE optional);
* :func:`write_report_plots` (ROC + confusion per protocol), :func:`write_run_plots` (curves + embedding),
  :func:`write_plots` — both into one report folder.

matplotlib is imported inside the functions (no work at import time) and always with the Agg backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from wsi_ncmi.data.atomic import atomic_output
from wsi_ncmi.errors import UserError

__all__ = [
    "PlotError",
    "plot_roc",
    "plot_confusion",
    "plot_training_curves",
    "plot_embedding",
    "project_2d",
    "write_plots",
    "write_report_plots",
    "write_run_plots",
]

logger = logging.getLogger(__name__)


class PlotError(UserError):
    """A figure cannot be drawn from the given data (names the file or argument)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    out = Path(path)
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        _pyplot().close(fig)
    return out


def plot_roc(
    y_true: Any, proba: Any, class_names: Sequence[str], path: str | os.PathLike, title: str = "ROC"
) -> Path:
    """One-vs-rest ROC per class of ``proba`` [N, C] against ``y_true`` [N]; classes absent from
    ``y_true`` (or present in every row) have no curve and are marked in the legend."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (y.shape[0], len(class_names)):
        raise PlotError(f"plot_roc: proba must be [N={y.shape[0]}, C={len(class_names)}], got {p.shape}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, name in enumerate(class_names):
        pos = y == c
        if pos.all() or not pos.any():
            ax.plot([], [], label=f"{name} (undefined)")
            continue
        fpr, tpr, _ = roc_curve(pos.astype(np.int64), p[:, c])
        auc = float(area_under_curve(fpr, tpr))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion(
    confusion: Any, class_names: Sequence[str], path: str | os.PathLike, title: str = "confusion"
) -> Path:
    """Confusion matrix [C, C] (rows = true, columns = predicted) with counts in the cells."""
    cm = np.asarray(confusion)
    c = len(class_names)
    if cm.shape != (c, c):
        raise PlotError(f"plot_confusion: confusion must be [{c}, {c}], got {cm.shape}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * c, 1.0 + 0.7 * c))
    ax.imshow(cm, cmap="Blues")
    top = cm.max() if cm.size else 0
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    ax.set_xticks(range(c), class_names, rotation=45, ha="right")
    ax.set_yticks(range(c), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


# metrics.csv column groups -> panel title; a column joins the first panel whose rule accepts its base name
# (the name before an ``_epoch`` / ``_step`` suffix). Loss terms are every ``train/*`` scalar but the lr, so
# auxiliary terms (AEM entropy, ASMIL alignment) and any registry loss's own terms are drawn too.
_VAL_SCORES = ("val/macro_f1", "val/macro_auc", "val/accuracy", "val/balanced_accuracy", "val/cc_accuracy",
               "val/xi_accuracy")
_VAL_NCMI = ("val/ncmi", "val/cmi", "val/gamma")
_CURVE_PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss terms", lambda b: (b.startswith("train/") and not b.startswith("train/lr")) or b == "val/loss"),
    ("validation", lambda b: b in _VAL_SCORES),
    ("dataset-level NCMI (val)", lambda b: b in _VAL_NCMI),
)


def _curve_columns(columns: Sequence[str], accepts: Callable[[str], bool]) -> list[str]:
    """Columns accepted by a panel rule, one per base name: the ``_epoch`` column wins over ``_step``."""
    chosen: dict[str, str] = {}
    for col in columns:
        base = col.removesuffix("_epoch").removesuffix("_step")
        if not accepts(base):
            continue
        if base not in chosen or col.endswith("_epoch") or col == base:
            chosen[base] = col
    return [chosen[b] for b in sorted(chosen, key=lambda b: (b != "train/loss", b))]


def _epoch_table(metrics_csv: str | os.PathLike) -> pd.DataFrame:
    path = Path(metrics_csv)
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise PlotError(f"{path}: cannot read metrics csv ({err})") from err
    if "epoch" not in df.columns:
        raise PlotError(f"{path}: metrics csv has no 'epoch' column (columns: {list(df.columns)})")
    numeric = df.apply(pd.to_numeric, errors="coerce")
    # Lightning logs step-level and epoch-level rows separately: average what each epoch has
    return numeric.dropna(subset=["epoch"]).groupby("epoch").mean(numeric_only=True)


def plot_training_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Per-epoch curves from a Lightning CSVLogger ``metrics.csv`` (one panel per group that exists).

    Panels: every ``train/*`` loss term (+ ``val/loss``), the validation scores, the dataset-level NCMI;
    step-level columns are averaged per epoch, and an ``_epoch`` column is preferred over its ``_step`` twin.
    """
    table = _epoch_table(metrics_csv)
    present = [c for c in table.columns if table[c].notna().any()]
    panels = [(title, cols) for title, accepts in _CURVE_PANELS if (cols := _curve_columns(present, accepts))]
    if not panels:
        raise PlotError(f"{metrics_csv}: no known metric columns to plot (columns: {list(table.columns)})")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, cols) in zip(axes[0], panels):
        for col in cols:
            s = table[col].dropna()
            ax.plot(s.index, s.values, marker="o", ms=3, label=col)
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    return _save(fig, path)


def project_2d(x: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, E] -> [N, 2] by PCA (default) or t-SNE (``method="tsne"``; perplexity clipped to N)."""
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim != 2 or xa.shape[0] < 2:
        raise PlotError(f"project_2d: need at least 2 rows [N, E], got shape {xa.shape}")
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, xa.shape[0], xa.shape[1])
        out = PCA(n_components=k, random_state=seed).fit_transform(xa)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (xa.shape[0] - 1) / 3)))
        out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(xa)
    else:
        raise PlotError(f"project_2d: method must be 'pca' or 'tsne', got {method!r}")
    if out.shape[1] < 2:
        out = np.concatenate([out, np.zeros((out.shape[0], 2 - out.shape[1]))], axis=1)
    return out


def plot_embedding(
    embeddings: Any,
    labels: Any,
    class_names: Sequence[str],
    path: str | os.PathLike,
    method: str = "pca",
    markers: Any = None,
    title: str | None = None,
) -> Path:
    """Scatter of a 2-D projection of ``embeddings`` [N, E] coloured by class; optional ``markers`` [N]
    (e.g. the split name of each slide) select the marker shape."""
    y = np.asarray(labels).astype(np.int64)
    xy = project_2d(embeddings, method)
    groups = np.asarray(markers) if markers is not None else np.full(y.shape[0], "")
    shapes = dict(zip(dict.fromkeys(groups.tolist()), "o^sDvP*X"))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(class_names):
        for g, shape in shapes.items():
            sel = (y == c) & (groups == g)
            if sel.any():
                label = f"{name}" + (f" ({g})" if g else "")
                ax.scatter(xy[sel, 0], xy[sel, 1], s=16, color=cmap(c % 10), marker=shape, label=label, alpha=0.8)
    ax.set(title=title or f"slide embeddings ({method.upper()})", xlabel="component 1", ylabel="component 2")
    ax.legend(fontsize=7, markerscale=1.2)
    return _save(fig, path)


def write_report_plots(
    out_dir: str | os.PathLike, report: Mapping[str, Any], predictions: pd.DataFrame, split: str = "test"
) -> list[Path]:
    """``roc_<protocol>_<split>.png`` and ``confusion_<protocol>_<split>.png`` for every protocol of a report."""
    out = Path(out_dir)
    names = list(report.get("class_names") or [str(i) for i in range(report["num_classes"])])
    prob_cols = [f"prob_{n}" for n in names]
    written: list[Path] = []
    for proto, per_split in report["metrics"].items():
        sel = predictions[(predictions["protocol"] == proto) & (predictions["split"] == split)]
        if split not in per_split or sel.empty:
            continue
        written.append(
            plot_roc(sel["label"].to_numpy(), sel[prob_cols].to_numpy(), names, out / f"roc_{proto}_{split}.png",
                     title=f"ROC, {proto}, {split}")
        )
        written.append(
            plot_confusion(per_split[split]["confusion"], names, out / f"confusion_{proto}_{split}.png",
                           title=f"confusion, {proto}, {split}")
        )
    return written


def write_run_plots(
    out_dir: str | os.PathLike,
    class_names: Sequence[str],
    metrics_csv: str | os.PathLike | None = None,
    embeddings: Mapping[str, Any] | None = None,
) -> list[Path]:
    """The figures that do not depend on a probe: ``training_curves.png`` (when ``metrics_csv`` is given)
    and ``embedding_pca.png`` (when ``embeddings`` = {split: (array [N, E], labels [N])} is given).

    A figure that cannot be drawn is logged and skipped; the list holds the files written.
    """
    out = Path(out_dir)
    written: list[Path] = []
    if metrics_csv is not None:
        try:
            written.append(plot_training_curves(metrics_csv, out / "training_curves.png"))
        except PlotError as err:
            logger.warning("training curves skipped: %s", err)
    if embeddings:
        xs = [np.asarray(x) for x, _ in embeddings.values()]
        ys = [np.asarray(y) for _, y in embeddings.values()]
        tags = np.concatenate([np.full(len(y), s) for s, y in zip(embeddings, ys)])
        try:
            written.append(plot_embedding(np.concatenate(xs), np.concatenate(ys), list(class_names),
                                          out / "embedding_pca.png", markers=tags))
        except PlotError as err:
            logger.warning("embedding plot skipped: %s", err)
    return written


def write_plots(
    out_dir: str | os.PathLike,
    report: Mapping[str, Any],
    predictions: pd.DataFrame,
    metrics_csv: str | os.PathLike | None = None,
    embeddings: Mapping[str, Any] | None = None,
    split: str = "test",
) -> list[Path]:
    """:func:`write_report_plots` + :func:`write_run_plots` into one folder; returns the files written."""
    names = list(report.get("class_names") or [str(i) for i in range(report["num_classes"])])
    return write_report_plots(out_dir, report, predictions, split) + write_run_plots(
        out_dir, names, metrics_csv, embeddings
    )
