"""Split tables: one CSV row per slide saying which split (and fold) it belongs to.

Columns: ``slide_id, patient_id, label, split`` (split in train/val/test) and optionally ``center``,
``fold`` and ``label_name``. A k-fold table repeats every slide once per fold; ``(fold, slide_id)`` is unique.

This module loads and checks such tables (columns, types, uniqueness: ``load_split``, ``check_table``) and
generates new ones (grouped, stratified, seeded: ``make_split``). Checking a table against its protocol and its
bags folder is :mod:`wsi_ncmi.data.split_check`. The official protocols shipped in ``splits/`` (CAMELYON-17, BRACS) are built from it in
:mod:`wsi_ncmi.data.official`.
"""

from __future__ import annotations

import logging
import os
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from wsi_ncmi.data.atomic import atomic_output
from wsi_ncmi.data.markdown import markdown_table
from wsi_ncmi.errors import UserError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("slide_id", "patient_id", "label", "split")
OPTIONAL_COLUMNS = ("center", "fold", "label_name")
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = typing.get_args(Split)
STRATEGIES = ("holdout", "kfold", "center")


class SplitError(UserError):
    """A split table is malformed or violates its protocol; the message names the file (and row)."""


# ------------------------------------------------------------------------------------------------ load
def _int_column(df: pd.DataFrame, col: str, where: str, allow_empty: bool = False) -> pd.Series:
    out = []
    for i, v in enumerate(df[col].tolist()):
        s = str(v).strip()
        if s == "" and allow_empty:
            out.append(pd.NA)
            continue
        if not re.fullmatch(r"[+-]?\d+(\.0+)?", s):
            raise SplitError(f"{where} row {i + 2}: column {col!r} must be an integer, got {v!r}")
        out.append(int(float(s)))
    return pd.Series(out, index=df.index, dtype="Int64" if allow_empty else "int64")


def check_table(df: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SplitError(f"{where}: missing column(s) {missing}; a split table needs {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise SplitError(f"{where}: the split table has no rows")
    df = df.copy()
    for col in ("slide_id", "patient_id", "split"):
        df[col] = df[col].astype(str).str.strip()
        empty = df.index[df[col].isin(["", "nan", "None", "<NA>"])]
        if len(empty):
            raise SplitError(f"{where} row {int(empty[0]) + 2}: empty {col!r}")
    bad = df.index[~df["split"].isin(SPLITS)]
    if len(bad):
        r = int(bad[0])
        raise SplitError(f"{where} row {r + 2}: split must be one of {SPLITS}, got {df.at[bad[0], 'split']!r}")
    df["label"] = _int_column(df, "label", where)
    neg = df.index[df["label"] < 0]
    if len(neg):
        raise SplitError(f"{where} row {int(neg[0]) + 2}: negative label {int(df.at[neg[0], 'label'])}")
    if "fold" in df.columns:
        df["fold"] = _int_column(df, "fold", where)
    if "center" in df.columns:
        df["center"] = _int_column(df, "center", where, allow_empty=True)
    if "label_name" in df.columns:
        df["label_name"] = df["label_name"].astype(str).str.strip()
        names = df.groupby("label")["label_name"].nunique()
        clash = names[names > 1]
        if len(clash):
            raise SplitError(f"{where}: label {int(clash.index[0])} has several label_name values")
    keys = ["fold", "slide_id"] if "fold" in df.columns else ["slide_id"]
    dup = df.index[df.duplicated(keys)]
    if len(dup):
        raise SplitError(f"{where} row {int(dup[0]) + 2}: slide {df.at[dup[0], 'slide_id']!r} appears twice"
                         + (" in the same fold" if "fold" in keys else ""))
    cols = [*REQUIRED_COLUMNS, *[c for c in OPTIONAL_COLUMNS if c in df.columns]]
    extra = [c for c in df.columns if c not in cols]
    return df[cols + extra].reset_index(drop=True)


def load_split(csv: str | os.PathLike) -> pd.DataFrame:
    """Read and check a split CSV (columns, value types, uniqueness); errors name the file and row."""
    path = Path(csv)
    if not path.is_file():
        raise SplitError(f"{path}: split table not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: not a readable CSV: {exc}") from exc
    return check_table(df, str(path))


def write_split(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Check ``table`` and write it as CSV atomically (tmp file + ``os.replace``)."""
    path = Path(path)
    df = check_table(table, str(path))
    with atomic_output(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    return path


def select_fold(table: pd.DataFrame, fold: int | None, where: str = "split table") -> pd.DataFrame:
    """The rows of one fold (tables without a ``fold`` column have a single fold)."""
    if "fold" not in table.columns:
        if fold not in (None, 0):
            raise SplitError(f"{where}: has no 'fold' column, cannot select fold {fold}")
        return table
    folds = sorted(int(f) for f in table["fold"].unique())
    if fold is None:
        if len(folds) > 1:
            raise SplitError(f"{where}: has folds {folds}; choose one (fold=...)")
        fold = folds[0]
    if fold not in folds:
        raise SplitError(f"{where}: no fold {fold}; folds are {folds}")
    return table[table["fold"] == fold].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- inspect
def patient_leaks(df: pd.DataFrame) -> list[str]:
    """One line per patient found in more than one split (per fold): ``"patient 'p7' is in ['train', 'val']"``."""
    leaks = []
    groups = df.groupby("fold") if "fold" in df.columns else [(None, df)]
    for fold, sub in groups:
        n_splits = sub.groupby("patient_id")["split"].nunique()
        for patient in n_splits[n_splits > 1].index:
            splits = sorted(sub.loc[sub["patient_id"] == patient, "split"].unique())
            leaks.append(f"patient {patient!r} is in {splits}" + (f" (fold {fold})" if fold is not None else ""))
    return leaks


def summary_markdown(table: pd.DataFrame) -> str:
    """A markdown table of slides (and patients) per split and label: the README's per-file summary."""
    df = table
    names = {}
    if "label_name" in df.columns:
        names = df.drop_duplicates("label").set_index("label")["label_name"].to_dict()
    labels = sorted(int(v) for v in df["label"].unique())
    header = ["split", *[f"{k} {names.get(k, '')}".strip() for k in labels], "slides", "patients"]
    rows = []
    for split in [*SPLITS, "all"]:
        sub = df if split == "all" else df[df["split"] == split]
        if len(sub) == 0:
            continue
        counts = sub["label"].value_counts()
        rows.append([split, *[int(counts.get(k, 0)) for k in labels], len(sub), sub["patient_id"].nunique()])
    return "\n".join(markdown_table(header, rows))


# ---------------------------------------------------------------------------------------------- generate
def _allocate(sizes: Mapping[Any, int], total: int) -> dict[Any, int]:
    """Integer counts per stratum summing to ``total``, proportional to ``sizes`` (largest remainder)."""
    n = sum(sizes.values())
    if n == 0:
        return dict.fromkeys(sizes, 0)
    exact = {k: total * v / n for k, v in sizes.items()}
    out = {k: int(np.floor(x)) for k, x in exact.items()}
    order = sorted(sizes, key=lambda k: (-(exact[k] - out[k]), str(k)))
    for k in order[: total - sum(out.values())]:
        out[k] += 1
    return out


def _group_table(df: pd.DataFrame, group_by: str) -> pd.DataFrame:
    """One row per group with its stratum (max label of its slides), sorted for determinism."""
    g = df.groupby(group_by, sort=True)["label"].max().rename("stratum").reset_index()
    return g.sort_values(group_by, kind="stable").reset_index(drop=True)


def _pick_groups(groups: pd.DataFrame, group_by: str, frac: float, rng: np.random.Generator) -> set[str]:
    """A stratified random subset holding round(frac * #groups) groups."""
    if frac <= 0 or len(groups) == 0:
        return set()
    sizes = groups.groupby("stratum").size().to_dict()
    take = _allocate(sizes, int(round(frac * len(groups))))
    picked: set[str] = set()
    for stratum in sorted(sizes):
        members = groups.loc[groups["stratum"] == stratum, group_by].tolist()
        order = rng.permutation(len(members))
        picked.update(members[i] for i in order[: take[stratum]])
    return picked


def _deal_folds(groups: pd.DataFrame, group_by: str, folds: int, rng: np.random.Generator) -> dict[str, int]:
    """Stratified round-robin assignment of groups to ``folds`` folds."""
    out: dict[str, int] = {}
    k = 0
    for stratum in sorted(groups["stratum"].unique()):
        members = groups.loc[groups["stratum"] == stratum, group_by].tolist()
        for i in rng.permutation(len(members)):
            out[members[i]] = k % folds
            k += 1
    return out


def _prepare_labels(labels_df: pd.DataFrame, group_by: str) -> pd.DataFrame:
    df = labels_df.copy()
    for col in ("slide_id", "label"):
        if col not in df.columns:
            raise SplitError(f"labels table: missing column {col!r} (has {list(df.columns)})")
    df["slide_id"] = df["slide_id"].astype(str).str.strip()
    if df["slide_id"].duplicated().any():
        raise SplitError(f"labels table: slide {df.loc[df['slide_id'].duplicated(), 'slide_id'].iloc[0]!r} twice")
    if "patient_id" not in df.columns:
        log.warning("labels table has no patient_id column: every slide is its own patient")
        df["patient_id"] = df["slide_id"]
    df["patient_id"] = df["patient_id"].astype(str).str.strip()
    if group_by not in df.columns:
        raise SplitError(f"labels table: group_by column {group_by!r} not found (has {list(df.columns)})")
    labels = df["label"]
    as_int = pd.to_numeric(labels, errors="coerce")
    if as_int.isna().any() or (as_int % 1 != 0).any():  # class names: map to 0..C-1 in sorted order
        names = sorted(labels.astype(str).str.strip().unique())
        df["label_name"] = labels.astype(str).str.strip()
        df["label"] = df["label_name"].map({n: i for i, n in enumerate(names)}).astype("int64")
    else:
        df["label"] = as_int.astype("int64")
    return df


def _holdout_assign(df: pd.DataFrame, group_by: str, val: float, test: float,
                    rng: np.random.Generator) -> pd.Series:
    groups = _group_table(df, group_by)
    test_g = _pick_groups(groups, group_by, test, rng)
    rest = groups[~groups[group_by].isin(test_g)].reset_index(drop=True)
    # val is a fraction of all groups when there is a test set, of the remainder otherwise
    val_frac = min(1.0, val * len(groups) / len(rest)) if len(rest) else 0.0
    val_g = _pick_groups(rest, group_by, val_frac, rng)
    split = np.where(df[group_by].isin(test_g), "test", np.where(df[group_by].isin(val_g), "val", "train"))
    return pd.Series(split, index=df.index)


def _finish(df: pd.DataFrame, split: pd.Series, fold: int | None = None) -> pd.DataFrame:
    out = df.copy()
    out["split"] = split.values
    if fold is not None:
        out["fold"] = fold
    cols = [*REQUIRED_COLUMNS, *[c for c in OPTIONAL_COLUMNS if c in out.columns]]
    return out[cols]


def _make_holdout(df: pd.DataFrame, group_by: str, val: float, test: float, folds: int, seed: int,
                  test_centers: Iterable[int] | None) -> pd.DataFrame:
    return _finish(df, _holdout_assign(df, group_by, val, test, np.random.default_rng(seed)))


def _make_kfold(df: pd.DataFrame, group_by: str, val: float, test: float, folds: int, seed: int,
                test_centers: Iterable[int] | None) -> pd.DataFrame:
    if folds < 2:
        raise SplitError(f"kfold needs folds >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    groups = _group_table(df, group_by)
    test_g = _pick_groups(groups, group_by, test, rng)
    rest = groups[~groups[group_by].isin(test_g)].reset_index(drop=True)
    if len(rest) < folds:
        raise SplitError(f"kfold: {len(rest)} {group_by} group(s) left for {folds} folds")
    fold_of = _deal_folds(rest, group_by, folds, rng)
    tables = []
    for f in range(folds):
        val_g = {g for g, k in fold_of.items() if k == f}
        split = np.where(df[group_by].isin(test_g), "test", np.where(df[group_by].isin(val_g), "val", "train"))
        tables.append(_finish(df, pd.Series(split, index=df.index), fold=f))
    return pd.concat(tables, ignore_index=True)


def _make_center(df: pd.DataFrame, group_by: str, val: float, test: float, folds: int, seed: int,
                 test_centers: Iterable[int] | None) -> pd.DataFrame:
    if "center" not in df.columns:
        raise SplitError("strategy 'center' needs a 'center' column in the labels table")
    centers = pd.to_numeric(df["center"], errors="raise").astype("int64")
    df = df.assign(center=centers)
    crossing = df.groupby(group_by)["center"].nunique()
    if (crossing > 1).any():
        raise SplitError(f"{group_by} {crossing[crossing > 1].index[0]!r} spans several centers")
    all_centers = sorted(int(c) for c in centers.unique())
    held = [[int(c)] for c in all_centers] if test_centers is None else [sorted(int(c) for c in test_centers)]
    tables = []
    for f, test_c in enumerate(held):
        unknown = [c for c in test_c if c not in all_centers]
        if unknown:
            raise SplitError(f"test centers {unknown} not in the table's centers {all_centers}")
        rng = np.random.default_rng(seed)
        is_test = df["center"].isin(test_c)
        rest = df[~is_test]
        split = pd.Series("test", index=df.index, dtype=object)
        split[rest.index] = _holdout_assign(rest, group_by, val, 0.0, rng)
        tables.append(_finish(df, split, fold=f if test_centers is None else None))
    return pd.concat(tables, ignore_index=True)


_STRATEGIES: dict[str, Callable[..., pd.DataFrame]] = {
    "holdout": _make_holdout,
    "kfold": _make_kfold,
    "center": _make_center,
}


def make_split(
    labels_df: pd.DataFrame,
    strategy: str = "holdout",
    group_by: str = "patient_id",
    val: float = 0.1,
    test: float = 0.2,
    folds: int = 5,
    seed: int = 0,
    test_centers: Iterable[int] | None = None,
) -> pd.DataFrame:
    """Make a split table from ``slide_id, label[, patient_id, center, label_name]``.

    Groups (``group_by``, a patient by default) never straddle splits; groups are stratified by their
    highest label; the result depends only on the table's content and ``seed``.

    - ``holdout``: ``test`` and ``val`` fractions of the groups.
    - ``kfold``: a fixed ``test`` fraction, then ``folds`` folds of the rest (fold f: val = f-th part);
      one row per slide and fold, with a ``fold`` column.
    - ``center``: test = slides of ``test_centers``; train/val (``val`` fraction of those groups) from the
      others. Without ``test_centers``: leave-one-center-out, one fold per center.

    String labels are mapped to 0..C-1 in sorted order and kept in ``label_name``.
    """
    if strategy not in _STRATEGIES:
        raise SplitError(f"unknown strategy {strategy!r}; choose from {sorted(_STRATEGIES)}")
    for name, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise SplitError(f"{name} must be a fraction in [0, 1), got {frac}")
    if val + test >= 1.0:
        raise SplitError(f"val + test = {val + test} leaves no training data")
    df = _prepare_labels(labels_df, group_by)
    out = _STRATEGIES[strategy](df, group_by, val, test, folds, seed, test_centers)
    return check_table(out, f"make_split({strategy})")
