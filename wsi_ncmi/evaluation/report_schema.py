"""The report schema: the keys of ``report.json``, the errors, and :func:`validate_report`.

The report is a stable file format (written by :func:`~.protocols.evaluate_run` and
:func:`~.report.write_report`, read by :func:`~.report.read_report` and :mod:`.summary`)::

    {"dataset": str, "split_csv": str, "model": str, "objective": str, "seed": int,
     "n_slides": {"train": n, "val": n, "test": n},
     "metrics": {"<protocol>": {"<split>": {"macro_f1", "macro_auc", "accuracy", "balanced_accuracy",
                                            "per_class_f1": [C], "confusion": [[C x C]]}}},
     "ncmi": {"<split>": {"cmi", "gamma", "ncmi"}},
     ...extra keys ("num_classes", "class_names", "protocol_info", "ncmi_source", "created", ...)}

``<protocol>`` is one of :data:`REPORT_PROTOCOLS` (the names of :data:`~.protocols.PROTOCOLS`; a test keeps the
two equal). Non-finite numbers (an undefined AUC, an infinite NCMI) are stored as JSON ``null``
(:func:`json_safe`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from wsi_ncmi.errors import UserError
from wsi_ncmi.metrics import SCALAR_METRICS

__all__ = [
    "ReportError",
    "ReportSchemaError",
    "SPLITS",
    "NCMI_KEYS",
    "METRIC_KEYS",
    "REQUIRED_KEYS",
    "RESERVED_KEYS",
    "REPORT_PROTOCOLS",
    "json_safe",
    "validate_report",
]

SPLITS = ("train", "val", "test")
NCMI_KEYS = ("cmi", "gamma", "ncmi")
REPORT_PROTOCOLS = ("lp", "cc", "head")
METRIC_KEYS = (*SCALAR_METRICS, "per_class_f1", "confusion")
REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "dataset": str,
    "split_csv": str,
    "model": str,
    "objective": str,
    "seed": int,
    "n_slides": dict,
    "metrics": dict,
    "ncmi": dict,
}
RESERVED_KEYS = {
    *REQUIRED_KEYS,
    "ncmi_source",
    "num_classes",
    "class_names",
    "protocol_info",
    "created",
    "probe_seed",
    "seed_source",
}


class ReportError(UserError):
    """A run cannot be evaluated or reports cannot be read / aggregated (names the file or argument)."""


class ReportSchemaError(ReportError):
    """A report dict does not follow the schema; ``problems`` lists every violation found."""

    def __init__(self, problems: list[str], source: str = "report") -> None:
        self.problems = problems
        super().__init__(f"{source} does not follow the report schema: " + "; ".join(problems))


def json_safe(obj: Any) -> Any:
    """Copy of ``obj`` with numpy scalars made Python and non-finite floats made None (JSON-safe)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj


def _is_number(v: Any, allow_none: bool = True) -> bool:
    if v is None:
        return allow_none
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_metrics_entry(where: str, m: Any, problems: list[str]) -> None:
    if not isinstance(m, Mapping):
        problems.append(f"{where} must be an object, got {type(m).__name__}")
        return
    missing = [k for k in METRIC_KEYS if k not in m]
    if missing:
        problems.append(f"{where} lacks {missing}")
    for k in SCALAR_METRICS:
        if k in m and not (_is_number(m[k]) and (m[k] is None or 0.0 <= m[k] <= 1.0)):
            problems.append(f"{where}.{k} must be a number in [0, 1] or null, got {m[k]!r}")
    cm = m.get("confusion")
    c = None
    if cm is not None:
        if (
            not isinstance(cm, list)
            or not cm
            or not all(isinstance(r, list) and len(r) == len(cm) for r in cm)
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for r in cm for v in r)
        ):
            problems.append(f"{where}.confusion must be a square list of lists of non-negative ints")
        else:
            c = len(cm)
    f1 = m.get("per_class_f1")
    if f1 is not None:
        if not isinstance(f1, list) or not all(_is_number(v) for v in f1):
            problems.append(f"{where}.per_class_f1 must be a list of numbers or nulls")
        elif c is not None and len(f1) != c:
            problems.append(f"{where}.per_class_f1 has {len(f1)} entries for a {c}x{c} confusion matrix")


def validate_report(report: Any, source: str = "report") -> None:
    """Raise :class:`ReportSchemaError` listing every way ``report`` departs from the schema."""
    problems: list[str] = []
    if not isinstance(report, Mapping):
        raise ReportSchemaError([f"must be a JSON object, got {type(report).__name__}"], source)
    for key, typ in REQUIRED_KEYS.items():
        if key not in report:
            problems.append(f"missing key {key!r}")
        elif not isinstance(report[key], typ) or isinstance(report[key], bool):
            problems.append(
                f"{key!r} must be {getattr(typ, '__name__', typ)}, got {type(report[key]).__name__}"
            )
    n_slides = report.get("n_slides")
    if isinstance(n_slides, Mapping):
        if sorted(n_slides) != sorted(SPLITS):
            problems.append(f"n_slides must have exactly the keys {list(SPLITS)}, got {list(n_slides)}")
        for k, v in n_slides.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                problems.append(f"n_slides.{k} must be a non-negative int, got {v!r}")
    metrics = report.get("metrics")
    if isinstance(metrics, Mapping):
        if not metrics:
            problems.append("metrics has no protocol")
        for proto, per_split in metrics.items():
            if proto not in REPORT_PROTOCOLS:
                problems.append(f"metrics has unknown protocol {proto!r} (known: {list(REPORT_PROTOCOLS)})")
            if not isinstance(per_split, Mapping) or not per_split:
                problems.append(f"metrics.{proto} must be a non-empty object of splits")
                continue
            for split, m in per_split.items():
                if split not in SPLITS:
                    problems.append(f"metrics.{proto} has unknown split {split!r}")
                _check_metrics_entry(f"metrics.{proto}.{split}", m, problems)
    ncmi = report.get("ncmi")
    if isinstance(ncmi, Mapping):
        for split, block in ncmi.items():
            if split not in SPLITS:
                problems.append(f"ncmi has unknown split {split!r}")
            if not isinstance(block, Mapping) or sorted(block) != sorted(NCMI_KEYS):
                problems.append(f"ncmi.{split} must have exactly the keys {list(NCMI_KEYS)}")
                continue
            for k in NCMI_KEYS:
                if not _is_number(block[k]) or (block[k] is not None and block[k] < 0):
                    problems.append(
                        f"ncmi.{split}.{k} must be a non-negative number or null, got {block[k]!r}"
                    )
    if problems:
        raise ReportSchemaError(problems, source)
