"""Evaluation reports: protocols on embedded splits → ``report.json`` / ``report.md`` / ``predictions.csv``,
and the mean ± std summary over several runs.

**Protocols** (a registry, :data:`PROTOCOLS`; each runs only where it applies):

* ``"lp"`` — linear probe on the centred, L2-normalised embedding (:class:`~.probe.LinearProbe`), every run;
* ``"cc"`` — nearest class centroid on the NCMI simplex (Eq. 6 from train), runs with NCMI log-probabilities;
* ``"head"`` — the aggregator's own classification head (softmax of its logits), runs that have a head.

**The report** (a stable schema, checked by :func:`validate_report`)::

    {"dataset": str, "split_csv": str, "model": str, "objective": str, "seed": int,
     "n_slides": {"train": n, "val": n, "test": n},
     "metrics": {"<protocol>": {"<split>": {"macro_f1", "macro_auc", "accuracy", "balanced_accuracy",
                                            "per_class_f1": [C], "confusion": [[C x C]]}}},
     "ncmi": {"<split>": {"cmi", "gamma", "ncmi"}},
     ...extra keys ("num_classes", "class_names", "protocol_info", "ncmi_source", "created", ...)}

``"seed"`` is the *training* seed of the checkpoint when it is known (``"seed_source": "training"``), else the
linear probe's seed (``"seed_source": "probe"``); the probe's seed is always in ``"probe_seed"``.

Non-finite numbers (an undefined AUC, an infinite NCMI) are stored as JSON ``null``.

The ``"ncmi"`` block is the dataset-level NCMI metric of each split (closed-form centroids of the split
itself): for NCMI runs on the NCMI simplex probabilities p = NSF(z'); for runs with a head on
softmax(logits) (``"ncmi_source"`` says which). The two are not on the same simplex, so compare NCMI
values only between runs with the same source.

**Summary** (:func:`aggregate_reports`): reports grouped by (dataset, model, objective); for every
protocol / split / scalar metric the mean and the sample standard deviation (ddof = 1; ``null`` for a
single run) over the runs (reports) of the group, with ``n`` the number of runs that had a value.
``n_checkpoints`` counts distinct checkpoints: several LP seeds of one checkpoint are several reports
but one trained model, so their spread is the probe's, not training's.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.markdown import markdown_table
from wsi_ncmi.metrics import SCALAR_METRICS, classification_metrics
from wsi_ncmi.ncmi import ncmi_metric

from .embed import EmbeddedSplit
from .paper import ROW_LABELS, paper_for_protocol, paper_rows
from .probe import DEFAULT_CS, LinearProbe, fit_centroid_classifier

__all__ = [
    "ReportError",
    "ReportSchemaError",
    "PROTOCOLS",
    "SPLITS",
    "NCMI_KEYS",
    "ProtocolResult",
    "evaluate_run",
    "validate_report",
    "write_report",
    "read_report",
    "find_reports",
    "aggregate_reports",
    "report_markdown",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
NCMI_KEYS = ("cmi", "gamma", "ncmi")
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
_RESERVED = {*REQUIRED_KEYS, "ncmi_source", "num_classes", "class_names", "protocol_info", "created", "probe_seed",
             "seed_source"}
REPORT_JSON, REPORT_MD, PREDICTIONS_CSV = "report.json", "report.md", "predictions.csv"


class ReportError(ValueError):
    """A run cannot be evaluated or reports cannot be read / aggregated (names the file or argument)."""


class ReportSchemaError(ReportError):
    """A report dict does not follow the schema; ``problems`` lists every violation found."""

    def __init__(self, problems: list[str], source: str = "report") -> None:
        self.problems = problems
        super().__init__(f"{source} does not follow the report schema: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ protocols
@dataclass
class ProtocolResult:
    """Class probabilities [N, C] per split, plus what the report should say about the fit."""

    proba: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Context:
    num_classes: int
    seed: int
    class_weight: str | None
    Cs: Sequence[float]
    refit: str
    solver: str


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _run_lp(splits: Mapping[str, EmbeddedSplit], ctx: _Context) -> ProtocolResult:
    tr, va = splits["train"], splits["val"]
    probe = LinearProbe(
        ctx.num_classes, Cs=ctx.Cs, class_weight=ctx.class_weight, seed=ctx.seed, refit=ctx.refit, solver=ctx.solver
    )
    probe.fit(tr.normalized, tr.labels, va.normalized, va.labels)
    proba = {name: probe.predict_proba(s.normalized) for name, s in splits.items()}
    info = {
        "C": probe.C_,
        "val_scores": {f"{c:g}": round(v, 6) for c, v in probe.val_scores_.items()},
        "selection": "val macro_f1 + macro_auc, ties -> smaller C",
        "refit": ctx.refit,
        "class_weight": ctx.class_weight,
        "input": "centred, L2-normalised slide embedding",
        "solver": probe.solver,
    }
    return ProtocolResult(proba, info)


def _run_cc(splits: Mapping[str, EmbeddedSplit], ctx: _Context) -> ProtocolResult:
    tr = splits["train"]
    clf = fit_centroid_classifier(tr.log_probs, tr.labels, ctx.num_classes)
    proba = {name: np.asarray(clf.predict_proba(s.probs()), dtype=np.float64) for name, s in splits.items()}
    return ProtocolResult(proba, {"centroids": "mean of train simplex points (Eq. 6)", "scores": "softmax(-KL)"})


def _run_head(splits: Mapping[str, EmbeddedSplit], ctx: _Context) -> ProtocolResult:
    return ProtocolResult({name: _softmax(s.logits.astype(np.float64)) for name, s in splits.items()})


# name -> (applies to these splits?, run)
PROTOCOLS: dict[str, tuple[Callable[[Mapping[str, EmbeddedSplit]], bool], Callable[..., ProtocolResult]]] = {
    "lp": (lambda s: all(x.normalized is not None for x in s.values()), _run_lp),
    "cc": (lambda s: all(x.log_probs is not None for x in s.values()), _run_cc),
    "head": (lambda s: all(x.logits is not None for x in s.values()), _run_head),
}


# ------------------------------------------------------------------------------------------ evaluate
def _ncmi_block(splits: Mapping[str, EmbeddedSplit], num_classes: int) -> tuple[dict[str, Any], str | None]:
    """Dataset-level CMI / Γ / NCMI per split, on the simplex (NCMI runs) or softmax(logits)."""
    first = next(iter(splits.values()))
    if first.log_probs is not None:
        source, get = "ncmi_simplex", lambda s: s.probs()
    elif first.logits is not None:
        source, get = "softmax_logits", lambda s: _softmax(s.logits.astype(np.float64))
    else:
        return {}, None
    block = {}
    for name, s in splits.items():
        with warnings.catch_warnings():
            if len(np.unique(s.labels)) < 2:  # Γ = 0 by definition: ncmi is written as null, no warning
                warnings.simplefilter("ignore", RuntimeWarning)
            block[name] = ncmi_metric(np.asarray(get(s), dtype=np.float64), s.labels, num_classes=num_classes)
    return block, source


def _prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def evaluate_run(
    splits: Mapping[str, EmbeddedSplit],
    num_classes: int,
    *,
    dataset: str,
    split_csv: str,
    model: str,
    objective: str,
    seed: int = 0,
    train_seed: int | None = None,
    class_names: Sequence[str] | None = None,
    class_weight: str | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    refit: str = "train",
    solver: str = "lbfgs",
    protocols: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run every applicable protocol on embedded ``splits`` (must hold train, val and test).

    ``seed`` seeds the linear probe; ``train_seed`` is the seed the checkpoint was trained with (reported as
    ``"seed"`` when given). ``protocols`` restricts the protocols (default: all that apply). Returns the report dict (module
    docstring) and the predictions table (``protocol, split, slide_id, label, prediction, prob_<class>...``).
    """
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ReportError(f"evaluate_run: splits {missing} are missing (got {list(splits)})")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ReportError(f"evaluate_run: {len(names)} class names for {num_classes} classes")
    wanted = list(PROTOCOLS) if protocols is None else list(protocols)
    unknown = [p for p in wanted if p not in PROTOCOLS]
    if unknown:
        raise ReportError(f"evaluate_run: unknown protocols {unknown}; known: {list(PROTOCOLS)}")
    clash = sorted(set(extra or {}) & _RESERVED)
    if clash:
        raise ReportError(f"evaluate_run: extra keys {clash} would overwrite report fields")
    ordered = {s: splits[s] for s in SPLITS}
    ctx = _Context(num_classes, int(seed), class_weight, Cs, refit, solver)

    metrics: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    frames = []
    for proto in wanted:
        applies, run = PROTOCOLS[proto]
        if not applies(ordered):
            logger.info("protocol %s does not apply to this run; skipped", proto)
            continue
        result = run(ordered, ctx)
        info[proto] = result.info
        metrics[proto] = {}
        for split, s in ordered.items():
            proba = result.proba[split]  # [N, C]
            metrics[proto][split] = classification_metrics(s.labels, proba, num_classes)
            frame = pd.DataFrame(
                {
                    "protocol": proto,
                    "split": split,
                    "slide_id": s.slide_ids,
                    "label": s.labels,
                    "prediction": proba.argmax(axis=1),
                }
            )
            frames.append(pd.concat([frame, pd.DataFrame(proba, columns=_prob_columns(names))], axis=1))
    if not metrics:
        raise ReportError("evaluate_run: no protocol applies (no normalized embeddings, log-probs or logits)")
    ncmi, source = _ncmi_block(ordered, num_classes)
    report: dict[str, Any] = {
        "dataset": str(dataset),
        "split_csv": str(split_csv),
        "model": str(model),
        "objective": str(objective),
        "seed": int(seed if train_seed is None else train_seed),
        "seed_source": "probe" if train_seed is None else "training",
        "probe_seed": int(seed),
        "n_slides": {s: len(ordered[s]) for s in SPLITS},
        "metrics": metrics,
        "ncmi": ncmi,
        "ncmi_source": source,
        "num_classes": int(num_classes),
        "class_names": names,
        "protocol_info": info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report.update(extra or {})
    report = _finite(report)
    validate_report(report)
    return report, pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ schema
def _finite(obj: Any) -> Any:
    """Copy of ``obj`` with numpy scalars made Python and non-finite floats made None (JSON-safe)."""
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
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
            problems.append(f"{key!r} must be {getattr(typ, '__name__', typ)}, got {type(report[key]).__name__}")
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
            if proto not in PROTOCOLS:
                problems.append(f"metrics has unknown protocol {proto!r} (known: {list(PROTOCOLS)})")
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
                    problems.append(f"ncmi.{split}.{k} must be a non-negative number or null, got {block[k]!r}")
    if problems:
        raise ReportSchemaError(problems, source)


# ------------------------------------------------------------------------------------------ writing
def _fmt(v: Any, spec: str = ".3f") -> str:
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
        "\"baseline\" = trained with its head, compared with our `head` protocol of a CE run; "
        "\"+NCMI-LP\" = NCMI training + linear probe, compared with our `lp` protocol of an NCMI run):",
        "",
    ]
    lines += markdown_table(
        ["paper row", "macro-F1", "macro-AUC"],
        [[ROW_LABELS[r], _fmt(v["macro_f1"]), _fmt(v["macro_auc"])] for r, v in rows.items()],
    )
    return lines


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
        lines.append(f"- linear probe: C = {lp.get('C')} (selected on val), class_weight = {lp.get('class_weight')}")
    lines += [
        "",
        "Protocols: `lp` = linear probe on the frozen, centred, L2-normalised slide embedding; "
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
                _fmt(m["macro_f1"]),
                _fmt(m["macro_auc"]),
                _fmt(m["accuracy"]),
                _fmt(m["balanced_accuracy"]),
                _fmt(paper["macro_f1"]) if paper else "—",
                _fmt(paper["macro_auc"]) if paper else "—",
            ]
        )
    lines += markdown_table(
        ["protocol", "macro-F1", "macro-AUC", "accuracy", "balanced acc.", "paper macro-F1", "paper macro-AUC"], rows
    )
    lines += ["", *_paper_note(ds, model, c), "", "## All splits", ""]
    lines += markdown_table(
        ["protocol", "split", "macro-F1", "macro-AUC", "accuracy", "balanced acc."],
        [
            [proto, split, *(_fmt(m[k]) for k in SCALAR_METRICS)]
            for proto, per_split in report["metrics"].items()
            for split, m in per_split.items()
        ],
    )
    lines += ["", "## Per-class F1 (test)", ""]
    lines += markdown_table(
        ["protocol", *names],
        [[p, *(_fmt(v) for v in ps["test"]["per_class_f1"])] for p, ps in report["metrics"].items() if "test" in ps],
    )
    if report["ncmi"]:
        lines += ["", f"## Dataset-level NCMI (source: {report.get('ncmi_source', 'n/a')})", ""]
        lines += markdown_table(
            ["split", "CMI", "Γ", "NCMI"],
            [[s, *(_fmt(b[k], ".4g") for k in NCMI_KEYS)] for s, b in report["ncmi"].items()],
        )
    if report.get("ood"):
        from .ood import ood_markdown

        lines += ood_markdown(report["ood"])
    for proto, per_split in report["metrics"].items():
        if "test" not in per_split:
            continue
        lines += ["", f"## Confusion matrix, {proto}, test (rows = true, columns = predicted)", ""]
        lines += markdown_table(["true \\ pred", *names], [[n, *r] for n, r in zip(names, per_split["test"]["confusion"])])
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, report: Mapping[str, Any], predictions: pd.DataFrame) -> dict[str, Path]:
    """Validate and write ``report.json``, ``report.md`` and ``predictions.csv`` (each atomically)."""
    out = Path(out_dir)
    clean = _finite(report)
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


# ------------------------------------------------------------------------------------------ summary
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
                raise ReportError(f"{p}: no {REPORT_JSON} found under this folder (run `wsi-ncmi evaluate` first)")
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


def _summarize_group(reports: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    protos = list(dict.fromkeys(p for r in reports for p in r["metrics"]))
    for proto in protos:
        metrics[proto] = {}
        for split in SPLITS:
            entries = [r["metrics"].get(proto, {}).get(split) for r in reports]
            if all(e is None for e in entries):
                continue
            metrics[proto][split] = {k: _mean_std([e[k] if e else None for e in entries]) for k in SCALAR_METRICS}
    ncmi: dict[str, Any] = {}
    for split in SPLITS:
        blocks = [r["ncmi"].get(split) for r in reports]
        if any(b is not None for b in blocks):
            ncmi[split] = {k: _mean_std([b[k] if b else None for b in blocks]) for k in NCMI_KEYS}
    return {"metrics": metrics, "ncmi": ncmi}


def _pm(stat: Mapping[str, Any], fmt: str = ".3f") -> str:
    if stat["mean"] is None:
        return "n/a"
    std = stat["std"]
    return f"{stat['mean']:{fmt}} ± {std:{fmt}}" if std is not None else f"{stat['mean']:{fmt}} (n=1)"


def _summary_markdown(summary: Mapping[str, Any]) -> str:
    lines = [
        "# Summary over runs",
        "",
        "Mean ± sample std (ddof = 1) over the runs of each group; test split. F1 = macro-F1, AUC = macro "
        "one-vs-rest. Paper = NCMI paper Table III (test): `head` of a CE run vs the paper's baseline row, "
        "`lp` of an NCMI run vs its +NCMI-LP row.",
    ]
    for g in summary["groups"]:
        lines += ["", f"## {g['dataset']} / {g['model']} / {g['objective']} "
                  f"({g['n_runs']} reports of {g['n_checkpoints']} checkpoints)", ""]
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
                    _fmt(paper["macro_f1"]) if paper else "—",
                    _fmt(paper["macro_auc"]) if paper else "—",
                ]
            )
        lines += markdown_table(
            ["protocol", "macro-F1", "macro-AUC", "accuracy", "balanced acc.", "paper macro-F1", "paper macro-AUC"],
            rows,
        )
        if "test" in g["ncmi"]:
            t = g["ncmi"]["test"]
            # CMI and Γ of a wide NSF simplex are tiny (p is spread over D coordinates): significant digits
            lines += ["", "Test NCMI: " + ", ".join(f"{k} {_pm(t[k], '.3g')}" for k in NCMI_KEYS)]
    return "\n".join(lines) + "\n"


def _summary_csv(summary: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "model", "objective", "n_runs", "block", "protocol", "split", "metric", "mean", "std", "n", "paper"])
    for g in summary["groups"]:
        head = [g["dataset"], g["model"], g["objective"], g["n_runs"]]
        for proto, per_split in g["metrics"].items():
            for split, stats in per_split.items():
                for metric, st in stats.items():
                    paper = g["paper"].get(proto) if split == "test" else None
                    ref = paper.get(metric, "") if paper else ""
                    w.writerow([*head, "metrics", proto, split, metric, _csv_num(st["mean"]), _csv_num(st["std"]), st["n"], ref])
        for split, stats in g["ncmi"].items():
            for metric, st in stats.items():
                w.writerow([*head, "ncmi", "", split, metric, _csv_num(st["mean"]), _csv_num(st["std"]), st["n"], ""])
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
            raise ReportError(f"aggregate_reports: runs of {ds}/{model}/{obj} disagree on num_classes {sorted(map(str, classes))}")
        num_classes = classes.pop()
        stats = _summarize_group(reports)
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
    summary = _finite(
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
