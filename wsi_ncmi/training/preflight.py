"""Pre-flight checks of a split table against its bags folder, run before any training starts.

``preflight_check(bags_dir, split_csv, num_classes)`` reads only the bag headers (N, D) and raises
:class:`PreflightError` (a ``ValueError``) naming every problem at once:

* slides of the split without a bag file (all of them are listed, up to 20 by name);
* bags whose feature dimension differs from the others (or from ``in_dim`` when given);
* labels outside ``[0, num_classes)`` when ``num_classes`` is given, an empty train split, and a class with
  no training slide (e.g. a 4-class config on a 2-class table);
* a patient in two splits (train and val/test: the evaluation would score slides of patients it trained on),
  unless ``allow_patient_leak=True`` (then a warning; the leaks are listed in the report).

The message is one line: ``pre-flight check failed: <problem>; <problem>``.

Classes missing from the validation split only log a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ncmi.data.bags import list_bags, read_header
from wsi_ncmi.data.splits import load_split, patient_leaks, select_fold

__all__ = ["PreflightError", "PreflightReport", "check_patient_leak", "preflight_check"]

logger = logging.getLogger(__name__)
_SHOW = 20


class PreflightError(ValueError):
    """The split table and the bags folder are inconsistent (missing bags, dims, labels)."""


@dataclass
class PreflightReport:
    """What the check found: slide count, the common feature dim, classes seen, counts per split."""

    n_slides: int
    in_dim: int
    num_labels: int  # max label + 1
    counts: dict[str, dict[int, int]] = field(default_factory=dict)  # split -> label -> count
    patient_leaks: list[str] = field(default_factory=list)  # accepted leaks (allow_patient_leak=True)


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _leak_problem(split_csv: str | Path, leaks: list[str], flag: str) -> str:
    return (f"{split_csv}: patient leak: {len(leaks)} patient(s) in more than one split ({_names(leaks)}); "
            f"regroup the table by patient (wsi-ncmi splits make) or pass {flag} to accept it")


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
    bags_dir: str | Path,
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
    """
    table = select_fold(load_split(split_csv), fold, str(split_csv))
    bags = list_bags(bags_dir)
    problems: list[str] = []
    leaks = patient_leaks(table)
    if leaks and not allow_patient_leak:
        problems.append(_leak_problem(split_csv, leaks, leak_flag))
    elif leaks:
        logger.warning("%s: patient leak accepted (%s): %s", split_csv, leak_flag, _names(leaks))

    ids = [str(s) for s in table["slide_id"]]
    missing = [s for s in ids if s not in bags]
    if missing:
        problems.append(f"{len(missing)} of {len(ids)} slides in {split_csv} have no bag in {bags_dir}: "
                        f"{_names(missing)}")

    dims: dict[str, int] = {}
    for sid in ids:
        if sid in bags:
            _, d, _ = read_header(bags[sid])
            dims[sid] = int(d)
    common = in_dim
    if dims:
        by_dim = Counter(dims.values())
        if common is None:
            common = by_dim.most_common(1)[0][0]
        odd = [f"{bags[s].name} (D={d})" for s, d in dims.items() if d != common]
        if odd:
            expected = "the model's" if in_dim is not None else "the others'"
            problems.append(f"{len(odd)} bag(s) in {bags_dir} have a feature dim other than {common} "
                            f"({expected}): {_names(odd)}")

    labels = [int(v) for v in table["label"]]
    num_labels = max(labels) + 1 if labels else 0
    if num_classes is not None and check_labels:
        bad = sorted({v for v in labels if v < 0 or v >= num_classes})
        if bad:
            problems.append(f"{split_csv}: labels {bad} are outside [0, {num_classes - 1}] "
                            f"(num_classes={num_classes}); fix the table or data.num_classes")
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
            problems.append(f"{split_csv}: classes {untrained} have no slide in the train split "
                            f"(num_classes={n_cls}); fix the table or data.num_classes")

    if problems:
        raise PreflightError("pre-flight check failed: " + "; ".join(problems))

    absent = [c for c in range(n_cls) if counts.get("val", {}).get(c, 0) == 0]
    if "val" in counts and absent:
        logger.warning("pre-flight: classes %s have no slide in the val split", absent)
    logger.info("pre-flight ok: %d slides, D=%s, counts %s", len(ids), common, counts)
    return PreflightReport(n_slides=len(ids), in_dim=int(common or 0), num_labels=num_labels, counts=counts,
                           patient_leaks=leaks)
