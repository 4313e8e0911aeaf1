"""Report files: ``report.md`` (Markdown) and :func:`write_report` / :func:`read_report` of ``report.json``,
``report.md`` and ``predictions.csv``.

The report dict comes from :func:`~.protocols.evaluate_run`; its schema is :mod:`.report_schema`. Every file is
written atomically; a report is validated before it is written and after it is read.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.markdown import markdown_table
from wsi_ncmi.metrics import SCALAR_METRICS

from .paper import ROW_LABELS, paper_for_protocol, paper_rows
from .report_schema import NCMI_KEYS, ReportError, json_safe, validate_report

__all__ = [
    "REPORT_JSON",
    "REPORT_MD",
    "TEST_TABLE_HEADER",
    "PREDICTIONS_CSV",
    "format_number",
    "report_markdown",
    "write_report",
    "read_report",
]

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, PREDICTIONS_CSV = "report.json", "report.md", "predictions.csv"


def format_number(v: Any, spec: str = ".3f") -> str:
    """``v`` formatted with ``spec`` (".4g" for NCMI terms, which span many orders of magnitude), or "n/a"."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:{spec}}"


def _paper_note(dataset: str, model: str, num_classes: int | None) -> list[str]:
    rows = paper_rows(dataset, model, num_classes)
    if rows is None:
        return [
            f"The NCMI paper's Table III has no entry for dataset `{dataset}` / aggregator `{model}`"
            + (f" / {num_classes} classes" if num_classes else "")
            + "; no published numbers are shown."
        ]
    lines = [
        f"Published reference (NCMI paper, Table III, **test** split, {dataset} / {model}; "
        '"baseline" = trained with its head, compared with our `head` protocol of a CE run; '
        '"+NCMI-LP" = NCMI training + linear probe, compared with our `lp` protocol of an NCMI run):',
        "",
    ]
    lines += markdown_table(
        ["paper row", "macro-F1", "macro-AUC"],
        [
            [ROW_LABELS[r], format_number(v["macro_f1"]), format_number(v["macro_auc"])]
            for r, v in rows.items()
        ],
    )
    return lines


# the columns of the per-protocol test table in report.md and in the multi-run summary.md
TEST_TABLE_HEADER = ("protocol", "macro-F1", "macro-AUC", "accuracy", "balanced acc.", "paper macro-F1",
                     "paper macro-AUC")


def _lp_input(report: Mapping[str, Any]) -> str:
    info = report.get("protocol_info", {}).get("lp", {})
    kept = info.get("input", "centred, L2-normalised slide embedding")
    how = "chosen on validation" if info.get("lp_input", "auto") == "auto" else "set by --lp-input"
    return f"here {kept}, {how}"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The human-readable ``report.md`` for a report dict."""
    ds, model, obj = report["dataset"], report["model"], report["objective"]
    c = report.get("num_classes")
    names = report.get("class_names") or [str(i) for i in range(c or 0)]
    lines = [
        f"# Evaluation: {model} ({obj} objective) on {ds}",
        "",
        f"- split table: `{report['split_csv']}`; slides: "
        + ", ".join(f"{k} {v}" for k, v in report["n_slides"].items()),
        f"- seed: {report['seed']} ({report.get('seed_source', 'probe')})"
        + (f"; probe seed {report['probe_seed']}" if report.get("probe_seed") is not None else "")
        + (f"; created {report['created']}" if report.get("created") else ""),
    ]
    for key in ("checkpoint", "centroid_update", "ncmi_source"):
        if report.get(key) is not None:
            lines.append(f"- {key}: `{report[key]}`")
    lp = report.get("protocol_info", {}).get("lp")
    if lp:
        lines.append(
            f"- linear probe: C = {lp.get('C')} (selected on val), class_weight = {lp.get('class_weight')}"
        )
    lines += [
        "",
        "Protocols: `lp` = linear probe on the frozen slide embedding (centred and L2-normalised, or raw: "
        f"{_lp_input(report)}); "
        "`cc` = nearest class centroid on the NCMI simplex (train centroids, Eq. 6); "
        "`head` = the aggregator's own classifier. F1 is always **macro**-F1; AUC is macro one-vs-rest.",
        "",
        "## Test split",
        "",
    ]
    rows = []
    for proto, per_split in report["metrics"].items():
        m = per_split.get("test")
        if m is None:
            continue
        paper = paper_for_protocol(ds, model, obj, proto, c)
        rows.append(
            [
                proto,
                format_number(m["macro_f1"]),
                format_number(m["macro_auc"]),
                format_number(m["accuracy"]),
                format_number(m["balanced_accuracy"]),
                format_number(paper["macro_f1"]) if paper else "—",
                format_number(paper["macro_auc"]) if paper else "—",
            ]
        )
    lines += markdown_table(TEST_TABLE_HEADER, rows)
    lines += ["", *_paper_note(ds, model, c), "", "## All splits", ""]
    lines += markdown_table(
        ["protocol", "split", "macro-F1", "macro-AUC", "accuracy", "balanced acc."],
        [
            [proto, split, *(format_number(m[k]) for k in SCALAR_METRICS)]
            for proto, per_split in report["metrics"].items()
            for split, m in per_split.items()
        ],
    )
    lines += ["", "## Per-class F1 (test)", ""]
    lines += markdown_table(
        ["protocol", *names],
        [
            [p, *(format_number(v) for v in ps["test"]["per_class_f1"])]
            for p, ps in report["metrics"].items()
            if "test" in ps
        ],
    )
    if report["ncmi"]:
        lines += ["", f"## Dataset-level NCMI (source: {report.get('ncmi_source', 'n/a')})", ""]
        lines += markdown_table(
            ["split", "CMI", "Γ", "NCMI"],
            [[s, *(format_number(b[k], ".4g") for k in NCMI_KEYS)] for s, b in report["ncmi"].items()],
        )
    if report.get("calibration"):
        from .calibration import calibration_markdown

        lines += calibration_markdown(report["calibration"])
    if report.get("ood"):
        from .ood_threshold import ood_report_markdown

        lines += ood_report_markdown(report["ood"])
    for proto, per_split in report["metrics"].items():
        if "test" not in per_split:
            continue
        lines += ["", f"## Confusion matrix, {proto}, test (rows = true, columns = predicted)", ""]
        lines += markdown_table(
            ["true \\ pred", *names], [[n, *r] for n, r in zip(names, per_split["test"]["confusion"])]
        )
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | os.PathLike, report: Mapping[str, Any], predictions: pd.DataFrame
) -> dict[str, Path]:
    """Validate and write ``report.json``, ``report.md`` and ``predictions.csv`` (each atomically)."""
    out = Path(out_dir)
    clean = json_safe(report)
    validate_report(clean)
    paths = {"json": out / REPORT_JSON, "md": out / REPORT_MD, "predictions": out / PREDICTIONS_CSV}
    atomic_write_text(paths["json"], json.dumps(clean, indent=2, allow_nan=False) + "\n")
    atomic_write_text(paths["md"], report_markdown(clean))
    buf = io.StringIO()
    predictions.to_csv(buf, index=False, float_format="%.6g")
    atomic_write_text(paths["predictions"], buf.getvalue())
    logger.info("wrote report to %s", out)
    return paths


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate a ``report.json``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{p}: cannot read report ({err})") from err
    validate_report(data, source=str(p))
    return data
