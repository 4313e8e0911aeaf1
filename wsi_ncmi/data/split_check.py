"""Checking a split table against its protocol and its bags folder: the one owner of "split table + bags folder".

* :func:`locate_bags` lists a bags folder once and maps slide ids to their ``<slide_id>.h5`` files;
  :func:`missing_bags_message` is the one wording of "these slides have no bag" (every caller raises its own
  error class with it).
* :func:`resolve_split_bags` → :class:`SplitBags`: one fold of a split table with the resolved slide → bag path
  table (one folder listing) and each bag's header (N, D, dtype) read at most once, on first use. The
  pre-flight check and :class:`~wsi_ncmi.data.mil.MILDataModule` share it: the check returns it
  (``PreflightReport.resolved``) and the caller passes it to the datamodule (its ``_split_bags`` argument);
  :func:`split_bags_for` takes a given resolution of the same (bags folder, split CSV, fold) or resolves afresh.
* :func:`validate_split` checks a table against its protocol (patient leaks, label range, expected counts,
  optionally missing bags) and returns a :class:`SplitReport`.
* :func:`preflight_check`, run before any training or evaluation, checks the pair and raises
  :class:`PreflightError` (a ``ValueError``) naming every problem at once, in one line
  (``pre-flight check failed: <problem>; <problem>``):

  - slides of the split without a bag file (all of them are counted, up to 20 named);
  - bags whose feature dimension differs from the others (or from ``in_dim`` when given);
  - labels outside ``[0, num_classes)`` when ``num_classes`` is given, an empty train split, and a class with
    no training slide (e.g. a 4-class config on a 2-class table);
  - a patient in two splits (train and val/test: the evaluation would score slides of patients it trained on),
    unless ``allow_patient_leak=True`` (then a warning; the leaks are listed in the report).

  Classes missing from the validation split only log a warning.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_ncmi.data.bags import check_header, list_bags
from wsi_ncmi.data.splits import SplitError, check_table, load_split, patient_leaks, select_fold
from wsi_ncmi.errors import UserError

__all__ = [
    "SplitBags",
    "SplitReport",
    "PreflightError",
    "PreflightReport",
    "check_patient_leak",
    "locate_bags",
    "missing_bags_message",
    "preflight_check",
    "resolve_split_bags",
    "split_bags_for",
    "validate_split",
]

logger = logging.getLogger(__name__)
_SHOW = 20


# ------------------------------------------------------------------------------------------ resolve
def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _classes(ids: Sequence[int]) -> str:
    """``[a, b, ...]`` of class ids, at most ``_SHOW`` of them (a config with 10^6 classes gives a short line)."""
    shown = ", ".join(str(i) for i in ids[:_SHOW])
    return f"[{shown}" + (f", ... ({len(ids) - _SHOW} more)]" if len(ids) > _SHOW else "]")


def missing_bags_message(
    missing: Sequence[str], n_slides: int, where: str, bags_dir: str | os.PathLike
) -> str:
    """``"<k> of <n> slides in <where> have no bag in <bags_dir>: a, b, ... (m more)"``; a shown slide whose
    ``<id>.h5`` exists but is not a file (a folder, a broken link) is marked so."""
    shown = [s if (Path(bags_dir) / f"{s}.h5").is_file() or not os.path.lexists(Path(bags_dir) / f"{s}.h5")
             else f"{s} ({s}.h5 is {'a folder' if (Path(bags_dir) / f'{s}.h5').is_dir() else 'not a file'})"
             for s in list(missing)[:_SHOW]]
    return (f"{len(missing)} of {n_slides} slides in {where} have no bag in {bags_dir}: "
            f"{_names(shown + list(missing)[_SHOW:])}")


def locate_bags(slide_ids: Iterable[str], bags_dir: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """List ``bags_dir`` once: ``({slide_id: bag path}, [slide ids without a bag])``, both in the given order.

    A missing folder raises :class:`~wsi_ncmi.data.bags.BagError` naming it.
    """
    bags = list_bags(bags_dir)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for sid in dict.fromkeys(str(s) for s in slide_ids):
        if sid in bags:
            found[sid] = bags[sid]
        else:
            missing.append(sid)
    return found, missing


@dataclass
class SplitBags:
    """One fold of a split table resolved against a bags folder (labels as in the table, no label map).

    ``paths``: slide id → bag file for the slides that have one (table order); ``missing``: the others.
    :meth:`header` / :meth:`dims` read each bag's header once and remember it.
    """

    split_csv: str
    bags_dir: Path
    fold: int | None
    table: pd.DataFrame
    paths: dict[str, Path]
    missing: list[str]
    _headers: dict[str, tuple[int, int, np.dtype]] = field(default_factory=dict, repr=False)

    def missing_message(self) -> str:
        return missing_bags_message(
            self.missing, self.table["slide_id"].nunique(), self.split_csv, self.bags_dir
        )

    def header(self, slide_id: str) -> tuple[int, int, np.dtype]:
        """(N, D, dtype) of one slide's bag, read and checked (:func:`~wsi_ncmi.data.bags.check_header`) on first
        use."""
        if slide_id not in self._headers:
            self._headers[slide_id] = check_header(self.paths[slide_id])  # refuses bags a model must not use
        return self._headers[slide_id]

    def dims(self) -> dict[str, int]:
        """Feature dim D of every bag found (headers read once)."""
        return {sid: int(self.header(sid)[1]) for sid in self.paths}

    def matches(self, bags_dir: str | os.PathLike, split_csv: str | os.PathLike, fold: int | None) -> bool:
        return (Path(bags_dir).resolve(), Path(split_csv).resolve(), fold) == (
            self.bags_dir.resolve(),
            Path(self.split_csv).resolve(),
            self.fold,
        )


def resolve_split_bags(
    bags_dir: str | os.PathLike, split_csv: str | os.PathLike, fold: int | None = None
) -> SplitBags:
    """Load one ``fold`` of ``split_csv`` and locate its bags in ``bags_dir`` (one listing, no bag opened)."""
    table = select_fold(load_split(split_csv), fold, str(split_csv))
    paths, missing = locate_bags(table["slide_id"], bags_dir)
    return SplitBags(str(split_csv), Path(bags_dir), fold, table, paths, missing)


def split_bags_for(
    bags_dir: str | os.PathLike,
    split_csv: str | os.PathLike,
    fold: int | None = None,
    given: SplitBags | None = None,
) -> SplitBags:
    """``given`` when it resolves this (bags folder, split CSV, fold), else a new :func:`resolve_split_bags`."""
    if given is not None and given.matches(bags_dir, split_csv, fold):
        return given
    return resolve_split_bags(bags_dir, split_csv, fold)


# ----------------------------------------------------------------------------------------- validate
@dataclass
class SplitReport:
    """What ``validate_split`` found. ``errors`` make a table unusable; ``warnings`` deserve a look."""

    source: str
    n_rows: int
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # "[fold<f>/]split" -> label -> n
    missing_bags: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _counts_by_split(df: pd.DataFrame) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    has_fold = "fold" in df.columns and df["fold"].nunique() > 1
    for keys, sub in df.groupby(["fold", "split"] if has_fold else ["split"], sort=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        name = f"fold{keys[0]}/{keys[1]}" if has_fold else str(keys[0])
        out[name] = {int(k): int(v) for k, v in sub["label"].value_counts().sort_index().items()}
    return out


def _expected_mismatches(
    counts: dict[str, dict[int, int]], df: pd.DataFrame, expected: Mapping[str, Any]
) -> list[str]:
    out = []
    for key, want in expected.items():
        have = (
            {int(k): int(v) for k, v in df["label"].value_counts().items()}
            if key == "all"
            else counts.get(str(key), {})
        )
        if isinstance(want, Mapping):
            want_d = {int(k): int(v) for k, v in want.items()}
            have_d = {k: have.get(k, 0) for k in sorted(set(want_d) | set(have))}
            if have_d != {k: want_d.get(k, 0) for k in have_d}:
                out.append(f"{key}: label counts {have_d} != expected {want_d}")
        elif sum(have.values()) != int(want):
            out.append(f"{key}: {sum(have.values())} slides != expected {int(want)}")
    return out


def validate_split(
    table: pd.DataFrame | str | os.PathLike,
    bags_dir: str | os.PathLike | None = None,
    num_classes: int | None = None,
    expected_counts: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> SplitReport:
    """Check a split table against its protocol and (optionally) a folder of bags.

    Always errors: a patient in two splits (of one fold), labels outside 0..C-1. Missing bags and counts
    that differ from ``expected_counts`` ({split|"all": n or {label: n}}) are warnings, errors with
    ``strict``. With ``strict`` any error raises ``SplitError``; otherwise the report lists them.
    """
    if isinstance(table, (str, os.PathLike)):
        source, df = str(table), load_split(table)
    else:
        source, df = "split table", check_table(table, "split table")
    report = SplitReport(source=source, n_rows=len(df), counts=_counts_by_split(df))
    report.errors += [f"patient leak: {m}" for m in patient_leaks(df)]
    labels = sorted(int(v) for v in df["label"].unique())
    c = num_classes if num_classes is not None else labels[-1] + 1
    out_of_range = [v for v in labels if v >= c]
    if out_of_range:
        report.errors.append(f"labels {out_of_range} outside 0..{c - 1} (num_classes={c})")
    train_labels = set(df.loc[df["split"] == "train", "label"].astype(int))
    absent = [k for k in range(c) if k not in train_labels]
    if train_labels and absent:
        report.warnings.append(f"classes {absent} have no training slide")
    soft: list[str] = []
    if bags_dir is not None:
        slides = list(dict.fromkeys(df["slide_id"]))
        report.missing_bags = sorted(locate_bags(slides, bags_dir)[1])
        if report.missing_bags:
            soft.append(missing_bags_message(report.missing_bags, len(slides), source, bags_dir))
    if expected_counts:
        soft += _expected_mismatches(report.counts, df, expected_counts)
    (report.errors if strict else report.warnings).extend(soft)
    for w in report.warnings:
        logger.warning("%s: %s", source, w)
    if strict and report.errors:
        raise SplitError(f"{source}: " + "; ".join(report.errors))
    return report


# ---------------------------------------------------------------------------------------- pre-flight
class PreflightError(UserError):
    """The split table and the bags folder are inconsistent (missing bags, dims, labels)."""


@dataclass
class PreflightReport:
    """What the check found: slide count, the common feature dim, classes seen, counts per split."""

    n_slides: int
    in_dim: int
    num_labels: int  # max label + 1
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # split -> label -> count
    patient_leaks: list[str] = field(default_factory=list)  # accepted leaks (allow_patient_leak=True)
    resolved: SplitBags | None = field(default=None, repr=False)  # the split resolved against the bags folder


def _leak_problem(split_csv: str | Path, leaks: list[str], flag: str) -> str:
    return (
        f"{split_csv}: patient leak: {len(leaks)} patient(s) in more than one split ({_names(leaks)}); "
        f"regroup the table by patient (wsi-ncmi splits make) or pass {flag} to accept it"
    )


def check_patient_leak(
    split_csv: str | Path,
    fold: int | None = None,
    allow: bool = False,
    flag: str = "--allow_patient_leak true",
) -> list[str]:
    """The patients of ``split_csv`` (one ``fold``) found in more than one split; raises :class:`PreflightError`
    naming the file and the patients unless ``allow`` (then logs a warning). ``flag`` is the override named in
    the message (the CLIs spell it differently)."""
    leaks = patient_leaks(select_fold(load_split(split_csv), fold, str(split_csv)))
    if leaks and not allow:
        raise PreflightError(_leak_problem(split_csv, leaks, flag))
    if leaks:
        logger.warning("%s: patient leak accepted (%s): %s", split_csv, flag, _names(leaks))
    return leaks


def preflight_check(
    bags_dir: str | Path | SplitBags,
    split_csv: str | Path,
    num_classes: int | None = None,
    in_dim: int | None = None,
    fold: int | None = None,
    check_labels: bool = True,
    allow_patient_leak: bool = False,
    leak_flag: str = "--allow_patient_leak true",
) -> PreflightReport:
    """Check that every slide of ``split_csv`` (one ``fold`` of it) has a readable bag in ``bags_dir`` with one
    common feature dim (``in_dim`` if given), that labels fit ``num_classes`` and that no patient is in two
    splits (unless ``allow_patient_leak``; ``leak_flag`` names the override in the message); see the module
    docstring.

    ``check_labels=False`` skips the label-range check (e.g. when a label map remaps the table's labels).
    ``bags_dir`` may be a :class:`SplitBags` already resolved (then ``fold`` is its own); the report carries it as
    ``resolved`` so the caller can pass it to the datamodule (``MILDataModule(..., _split_bags=report.resolved)``).
    """
    resolved = bags_dir if isinstance(bags_dir, SplitBags) else resolve_split_bags(bags_dir, split_csv, fold)
    table, bags, bags_dir = resolved.table, resolved.paths, resolved.bags_dir
    problems: list[str] = []
    leaks = patient_leaks(table)
    if leaks and not allow_patient_leak:
        problems.append(_leak_problem(split_csv, leaks, leak_flag))
    elif leaks:
        logger.warning("%s: patient leak accepted (%s): %s", split_csv, leak_flag, _names(leaks))

    ids = [str(s) for s in table["slide_id"]]
    if resolved.missing:
        problems.append(missing_bags_message(resolved.missing, len(ids), str(split_csv), bags_dir))

    dims = resolved.dims()
    common = in_dim
    if dims:
        by_dim = Counter(dims.values())
        if common is None:
            common = by_dim.most_common(1)[0][0]
        odd = [f"{bags[s].name} (D={d})" for s, d in dims.items() if d != common]
        if odd:
            expected = "the model's" if in_dim is not None else "the others'"
            problems.append(
                f"{len(odd)} bag(s) in {bags_dir} have a feature dim other than {common} "
                f"({expected}): {_names(odd)}"
            )

    labels = [int(v) for v in table["label"]]
    num_labels = max(labels) + 1 if labels else 0
    if num_classes is not None and check_labels:
        bad = sorted({v for v in labels if v < 0 or v >= num_classes})
        if bad:
            problems.append(
                f"{split_csv}: labels {_classes(bad)} are outside [0, {num_classes - 1}] "
                f"(num_classes={num_classes}); fix the table or data.num_classes"
            )
    splits = [str(s) for s in table["split"]]
    counts: dict[str, dict[int, int]] = {}
    for s, y in zip(splits, labels):
        counts.setdefault(s, {}).setdefault(y, 0)
        counts[s][y] += 1
    n_cls = num_classes if num_classes is not None else num_labels
    if "train" not in counts:
        problems.append(f"{split_csv}: no slide has split == 'train'")
    else:
        untrained = [c for c in range(n_cls) if counts["train"].get(c, 0) == 0]
        if untrained:
            problems.append(
                f"{split_csv}: classes {_classes(untrained)} have no slide in the train split "
                f"(num_classes={n_cls}); fix the table or data.num_classes"
            )

    if problems:
        raise PreflightError("pre-flight check failed: " + "; ".join(problems))

    absent = [c for c in range(n_cls) if counts.get("val", {}).get(c, 0) == 0]
    if "val" in counts and absent:
        logger.warning("pre-flight: classes %s have no slide in the val split", _classes(absent))
    logger.info("pre-flight ok: %d slides, D=%s, counts %s", len(ids), common, counts)
    return PreflightReport(
        n_slides=len(ids),
        in_dim=int(common or 0),
        num_labels=num_labels,
        counts=counts,
        patient_leaks=leaks,
        resolved=resolved,
    )
