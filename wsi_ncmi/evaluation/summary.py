"""The summary over runs: :func:`aggregate_reports` → ``summary.{json,csv,md}``.

Reports grouped by (dataset, model, objective); for every protocol / split / scalar metric the mean and the
sample standard deviation (ddof = 1; ``null`` for a single run) over the runs (reports) of the group, with
``n`` the number of runs that had a value. ``n_checkpoints`` counts distinct checkpoints: several LP seeds of
one checkpoint are several reports but one trained model, so their spread is the probe's, not training's.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.markdown import markdown_table
from wsi_ncmi.metrics import SCALAR_METRICS

from .paper import paper_for_protocol
from .report import REPORT_JSON, TEST_TABLE_HEADER, format_number, read_report
from .report_schema import NCMI_KEYS, SPLITS, ReportError, json_safe

__all__ = ["find_reports", "aggregate_reports", "format_mean_std", "summarize_group"]

logger = logging.getLogger(__name__)


def find_reports(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """``report.json`` files: each path is a report file or a folder searched recursively."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(p.rglob(REPORT_JSON))
            if not hits:
                raise ReportError(
                    f"{p}: no {REPORT_JSON} found under this folder (run `wsi-ncmi evaluate` first)"
                )
            found += hits
        else:
            raise ReportError(f"{p}: no such file or folder")
    return sorted(dict.fromkeys(found))


def _mean_std(values: list[float | None]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    n = len(vals)
    mean = float(np.mean(vals)) if n else None
    std = float(np.std(vals, ddof=1)) if n >= 2 else None
    return {"mean": mean, "std": std, "n": n}


def summarize_group(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std (``{"mean", "std", "n"}``) of every protocol / split / scalar metric and NCMI term of ``reports``."""
    metrics: dict[str, Any] = {}
    protos = list(dict.fromkeys(p for r in reports for p in r["metrics"]))
    for proto in protos:
        metrics[proto] = {}
        for split in SPLITS:
            entries = [r["metrics"].get(proto, {}).get(split) for r in reports]
            if all(e is None for e in entries):
                continue
            metrics[proto][split] = {
                k: _mean_std([e[k] if e else None for e in entries]) for k in SCALAR_METRICS
            }
    ncmi: dict[str, Any] = {}
    for split in SPLITS:
        blocks = [r["ncmi"].get(split) for r in reports]
        if any(b is not None for b in blocks):
            ncmi[split] = {k: _mean_std([b[k] if b else None for b in blocks]) for k in NCMI_KEYS}
    return {"metrics": metrics, "ncmi": ncmi}


def format_mean_std(stat: Mapping[str, Any], fmt: str = ".3f") -> str:
    """``"mean ± std"`` of a :func:`summarize_group` entry ("mean (n=1)" for one run, "n/a" for none)."""
    if stat["mean"] is None:
        return "n/a"
    std = stat["std"]
    return f"{stat['mean']:{fmt}} ± {std:{fmt}}" if std is not None else f"{stat['mean']:{fmt}} (n=1)"


_pm = format_mean_std


def _summary_markdown(summary: Mapping[str, Any]) -> str:
    lines = [
        "# Summary over runs",
        "",
        "Mean ± sample std (ddof = 1) over the runs of each group; test split. F1 = macro-F1, AUC = macro "
        "one-vs-rest. Paper = NCMI paper Table III (test): `head` of a CE run vs the paper's baseline row, "
        "`lp` of an NCMI run vs its +NCMI-LP row.",
    ]
    for g in summary["groups"]:
        lines += [
            "",
            f"## {g['dataset']} / {g['model']} / {g['objective']} "
            f"({g['n_runs']} reports of {g['n_checkpoints']} checkpoints)",
            "",
        ]
        rows = []
        for proto, per_split in g["metrics"].items():
            t = per_split.get("test")
            if t is None:
                continue
            paper = g["paper"].get(proto)
            rows.append(
                [
                    proto,
                    *(_pm(t[k]) for k in SCALAR_METRICS),
                    format_number(paper["macro_f1"]) if paper else "—",
                    format_number(paper["macro_auc"]) if paper else "—",
                ]
            )
        lines += markdown_table(TEST_TABLE_HEADER, rows)
        if "test" in g["ncmi"]:
            t = g["ncmi"]["test"]
            # CMI and Γ of a wide NSF simplex are tiny (p is spread over D coordinates): significant digits
            lines += ["", "Test NCMI: " + ", ".join(f"{k} {_pm(t[k], '.3g')}" for k in NCMI_KEYS)]
    return "\n".join(lines) + "\n"


def _summary_csv(summary: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "dataset",
            "model",
            "objective",
            "n_runs",
            "block",
            "protocol",
            "split",
            "metric",
            "mean",
            "std",
            "n",
            "paper",
        ]
    )
    for g in summary["groups"]:
        head = [g["dataset"], g["model"], g["objective"], g["n_runs"]]
        for proto, per_split in g["metrics"].items():
            for split, stats in per_split.items():
                for metric, st in stats.items():
                    paper = g["paper"].get(proto) if split == "test" else None
                    ref = paper.get(metric, "") if paper else ""
                    w.writerow(
                        [
                            *head,
                            "metrics",
                            proto,
                            split,
                            metric,
                            _csv_num(st["mean"]),
                            _csv_num(st["std"]),
                            st["n"],
                            ref,
                        ]
                    )
        for split, stats in g["ncmi"].items():
            for metric, st in stats.items():
                w.writerow(
                    [*head, "ncmi", "", split, metric, _csv_num(st["mean"]), _csv_num(st["std"]), st["n"], ""]
                )
    return buf.getvalue()


def _csv_num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def aggregate_reports(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Mean ± std over runs grouped by (dataset, model, objective) → ``summary.{json,csv,md}`` in ``out_dir``.

    ``run_dirs``: report files or folders (searched recursively for ``report.json``). Returns the summary.
    """
    paths = find_reports(run_dirs)
    if not paths:
        raise ReportError("aggregate_reports: no report given")
    groups: dict[tuple[str, str, str], list[tuple[Path, dict[str, Any]]]] = {}
    for p in paths:
        r = read_report(p)
        groups.setdefault((r["dataset"], r["model"], r["objective"]), []).append((p, r))
    out_groups = []
    for (ds, model, obj), items in sorted(groups.items()):
        reports = [r for _, r in items]
        classes = {r.get("num_classes") for r in reports}
        if len(classes) > 1:
            raise ReportError(
                f"aggregate_reports: runs of {ds}/{model}/{obj} disagree on num_classes {sorted(map(str, classes))}"
            )
        num_classes = classes.pop()
        stats = summarize_group(reports)
        paper = {
            proto: ref
            for proto in stats["metrics"]
            if (ref := paper_for_protocol(ds, model, obj, proto, num_classes)) is not None
        }
        out_groups.append(
            {
                "dataset": ds,
                "model": model,
                "objective": obj,
                "n_runs": len(items),
                "n_checkpoints": len({r.get("checkpoint", str(p)) for p, r in items}),
                "reports": [str(p) for p, _ in items],
                "seeds": [r["seed"] for r in reports],
                "num_classes": num_classes,
                **stats,
                "paper": paper,
            }
        )
    summary = json_safe(
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "std": "sample standard deviation (ddof=1); null for a single run",
            "groups": out_groups,
        }
    )
    out = Path(out_dir)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "summary.csv", _summary_csv(summary))
    atomic_write_text(out / "summary.md", _summary_markdown(summary))
    logger.info("summarised %d reports in %d groups into %s", len(paths), len(out_groups), out)
    return summary
