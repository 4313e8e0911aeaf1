"""Pre-flight checks of a split table against its bags folder, run before any training starts.

``preflight_check(bags_dir, split_csv, num_classes)`` reads only the bag headers (N, D) and raises
:class:`PreflightError` (a ``ValueError``) naming every problem at once:

* slides of the split without a bag file (all of them are listed, up to 20 by name);
* bags whose feature dimension differs from the others (or from ``in_dim`` when given);
* labels outside ``[0, num_classes)`` when ``num_classes`` is given, an empty train split, and a class with
  no training slide (e.g. a 4-class config on a 2-class table).

Classes missing from the validation split only log a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from wsi_ncmi.data.bags import list_bags, read_header
from wsi_ncmi.data.splits import load_split, select_fold

__all__ = ["PreflightError", "PreflightReport", "preflight_check"]

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


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def preflight_check(
    bags_dir: str | Path,
    split_csv: str | Path,
    num_classes: int | None = None,
    in_dim: int | None = None,
    fold: int | None = None,
    check_labels: bool = True,
) -> PreflightReport:
    """Check that every slide of ``split_csv`` (one ``fold`` of it) has a readable bag in ``bags_dir`` with one
    common feature dim (``in_dim`` if given) and that labels fit ``num_classes``; see the module docstring.

    ``check_labels=False`` skips the label-range check (e.g. when a label map remaps the table's labels).
    """
    table = select_fold(load_split(split_csv), fold, str(split_csv))
    bags = list_bags(bags_dir)
    problems: list[str] = []

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
            problems.append(f"{len(odd)} bag(s) have a feature dim other than {common}: {_names(odd)}")

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
        raise PreflightError("pre-flight check failed:\n  - " + "\n  - ".join(problems))

    absent = [c for c in range(n_cls) if counts.get("val", {}).get(c, 0) == 0]
    if "val" in counts and absent:
        logger.warning("pre-flight: classes %s have no slide in the val split", absent)
    logger.info("pre-flight ok: %d slides, D=%s, counts %s", len(ids), common, counts)
    return PreflightReport(n_slides=len(ids), in_dim=int(common or 0), num_labels=num_labels, counts=counts)
