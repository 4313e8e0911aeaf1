"""``report.html``: one self-contained page per evaluation, prediction or summary folder.

:func:`write_html_report` renders from what a folder already holds and writes ``folder/report.html``
atomically (building blocks, embedding and sizes: :mod:`.html_parts`). The folder's kind is the first entry of
:data:`PAGE_KINDS` whose file is there:

* ``predict``  — ``predict.json`` + ``predictions.csv`` (``wsi-ncmi predict``): per slide the predicted class,
  the class scores, the OOD score and flag, the heatmap thumbnail when one was drawn; counts, flagged slides,
  provenance.
* ``summary``  — ``summary.json`` (``wsi-ncmi report``): mean ± std per (dataset, model, objective), each run's
  test numbers linked to its own page.
* ``evaluate`` — ``report.json`` (one seed) or ``seed<k>/report.json`` (``wsi-ncmi evaluate --seeds``): the test
  table (mean ± std over the seeds when there are several), every split, per-class F1, ROC and confusion
  figures, the per-slide predictions (sortable), the calibration (``calibration.json`` and the report's
  ``calibration`` block) and the OOD block with the slides it flags, the provenance (checkpoint and its
  SHA-256, bags folder, encoder, config).

Every page also shows the heatmap PNGs under the folder's ``heatmaps/`` as thumbnails linked to the full
images, and ``related`` pages as links. Files a page names (a figure, a heatmap) are only read when they lie
inside the folder.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.metrics import SCALAR_METRICS

from .html_parts import (
    HtmlReportError,
    Raw,
    class_name,
    details,
    esc,
    figure,
    fmt,
    heading,
    heatmap_gallery,
    inside,
    joined,
    key_values,
    page,
    para,
    read_json,
    read_results_csv,
    rel_link,
    related_links,
    section_nav,
    table,
)
from .html_predict import predict_page
from .paper import paper_for_protocol
from .report import PREDICTIONS_CSV, REPORT_JSON, TEST_TABLE_HEADER, read_report
from .report_schema import NCMI_KEYS, ReportError
from .summary import format_mean_std, summarize_group

__all__ = ["HTML_REPORT", "HtmlReportError", "PAGE_KINDS", "render_html_report", "write_html_report"]

logger = logging.getLogger(__name__)

HTML_REPORT = "report.html"
METRIC_LABELS = dict(zip(SCALAR_METRICS, TEST_TABLE_HEADER[1:5]))
CALIBRATION_METRICS = {"ece": "ECE", "brier": "Brier score", "mean_max_prob": "mean max probability",
                       "mean_max_prob_correct": "mean max probability, correct slides"}


# ------------------------------------------------------------------------------------- evaluate page
def _report_folders(folder: Path) -> list[Path]:
    if (folder / REPORT_JSON).is_file():
        return [folder]
    seeds = [p.parent for p in folder.glob(f"seed*/{REPORT_JSON}") if re.fullmatch(r"seed\d+", p.parent.name)]
    return sorted(seeds, key=lambda p: int(p.name[4:]))


def _test_table(reports: Sequence[Mapping[str, Any]]) -> Raw:
    r0 = reports[0]
    rows = []
    if len(reports) == 1:
        stats = {p: {k: {"mean": s["test"][k], "std": None, "n": 1} for k in SCALAR_METRICS}
                 for p, s in r0["metrics"].items() if "test" in s}
    else:
        stats = {p: s["test"] for p, s in summarize_group(list(reports))["metrics"].items() if "test" in s}
    for proto, st in stats.items():
        paper = paper_for_protocol(r0["dataset"], r0["model"], r0["objective"], proto, r0.get("num_classes"))
        cells = [st[k]["mean"] if len(reports) == 1 else format_mean_std(st[k]) for k in SCALAR_METRICS]
        rows.append([proto, *cells, *(fmt(paper[k]) if paper else "—" for k in ("macro_f1", "macro_auc"))])
    return table(TEST_TABLE_HEADER, rows, table_id="test-table", sortable=False)


def _figures(folder: Path, page_dir: Path, names: Sequence[tuple[str, str]]) -> list[Raw]:
    figs = [figure(p, caption, page_dir) for name, caption in names if (p := inside(folder, name))]
    return [Raw('<div class="figs">' + "".join(figs) + "</div>")] if figs else []


def _predictions_table(path: Path, names: Sequence[str], table_id: str) -> Raw:
    df = read_results_csv(path)
    probs = [c for c in df.columns if c.startswith("prob_")]
    lab = [class_name(v, names) for v in df.get("label", [""] * len(df))]
    pred = [class_name(v, names) for v in df.get("prediction", [""] * len(df))]
    rows = [[r.get("protocol", ""), r.get("split", ""), r["slide_id"], lab[i], pred[i],
             "yes" if lab[i] == pred[i] else "no", *(r[c] for c in probs)]
            for i, r in enumerate(df.to_dict("records"))]
    return table(["protocol", "split", "slide", "label", "prediction", "correct", *(c[5:] for c in probs)], rows,
                 table_id=table_id, caption=f"{len(df)} rows of {path.name}; click a column header to sort",
                 row_classes=["wrong" if lab[i] != pred[i] else None for i in range(len(df))])


def _run_parts(folder: Path, d: Path, r: Mapping[str, Any], seed_label: str | None) -> list[Raw]:
    names = list(r.get("class_names") or [str(i) for i in range(r.get("num_classes") or 0)])
    parts: list[Raw] = [heading(2, f"{seed_label}: details" if seed_label else "All splits", d.name if seed_label
                           else "splits")]
    parts.append(table(["protocol", "split", *METRIC_LABELS.values()],
                       [[p, s, *(m[k] for k in SCALAR_METRICS)] for p, ps in r["metrics"].items()
                        for s, m in ps.items()], sortable=False))
    parts += [heading(3, "Per-class F1 (test)"),
              table(["protocol", *names], [[p, *ps["test"]["per_class_f1"]] for p, ps in r["metrics"].items()
                                           if "test" in ps], sortable=False)]
    if r.get("ncmi"):
        parts += [heading(3, f"Dataset-level NCMI (source: {r.get('ncmi_source', 'n/a')})"),
                  table(["split", "CMI", "Γ", "NCMI"], [[s, *(b[k] for k in NCMI_KEYS)] for s, b in r["ncmi"].items()],
                        sortable=False)]
    figs = [(f"{kind}_{p}_test.png", f"{label}, {p}, test") for p in r["metrics"]
            for kind, label in (("roc", "ROC"), ("confusion", "confusion"))]
    fig_parts = _figures(d, folder, figs)
    if fig_parts:
        parts += [heading(3, "ROC and confusion (test)"), *fig_parts]
    if (d / PREDICTIONS_CSV).is_file():
        tid = f"predictions-{d.name}" if seed_label else "predictions"
        parts += [heading(3, "Per-slide predictions"),
                  para("Rows with a wrong prediction are shaded. Probabilities are the protocol's class scores.", "note"),
                  details(f"{PREDICTIONS_CSV} as a table", _predictions_table(d / PREDICTIONS_CSV, names, tid),
                          open_=True)]
    return parts


def _calibration_parts(folder: Path, report: Mapping[str, Any]) -> list[Raw]:
    parts: list[Raw] = []
    cal = report.get("calibration")
    if isinstance(cal, Mapping):
        test = cal.get("test") if isinstance(cal.get("test"), Mapping) else {}
        before, after = test.get("before") or {}, test.get("after") or {}
        keys = list(dict.fromkeys([*before, *after]))
        parts += [heading(3, "Probability calibration"),
                  key_values([("classifier", cal.get("classifier")), ("method", cal.get("method")),
                              ("temperature", cal.get("temperature"))]),
                  table(["test split", "before", "after"],
                        [[CALIBRATION_METRICS.get(k, k), before.get(k), after.get(k)] for k in keys], sortable=False)]
        parts += _figures(folder, folder, [(cal.get("reliability_png"), "reliability diagram")])
    path = folder / "calibration.json"
    if path.is_file():
        c = read_json(path)
        th = c.get("thresholds") if isinstance(c.get("thresholds"), Mapping) else {}
        q = c.get("val_quantiles") if isinstance(c.get("val_quantiles"), Mapping) else {}
        kept = c.get("val_kept") if isinstance(c.get("val_kept"), Mapping) else {}
        tpr = c.get("tpr")
        parts += [heading(3, "OOD thresholds (calibration.json)"),
                  para(f"Calibrated on {c.get('n_val', '?')} validation slides: a slide is flagged when its score is "
                     f"above the threshold, which keeps {fmt(tpr, '.0%') if tpr is not None else '?'} of them. "
                     f"Default score: {c.get('default_score')}."),
                  table(["score", "threshold", "val kept", "val q5", "val q50", "val q95", "default"],
                        [[n, t, kept.get(n), *((q.get(n) or {}).get(k) for k in ("q5", "q50", "q95")),
                          "yes" if n == c.get("default_score") else ""] for n, t in th.items()], sortable=False)]
    return [heading(2, "Calibration", "calibration"), *parts] if parts else []


def _ood_parts(report: Mapping[str, Any]) -> list[Raw]:
    block = report.get("ood")
    if not isinstance(block, Mapping) or not block:
        return []
    parts = [heading(2, "Out-of-distribution detection", "ood"),
             key_values([("score", block.get("score") or block.get("default_score")),
                         ("threshold", None if block.get("threshold") is None else fmt(block["threshold"], ".4g")), ("rule", block.get("rule")),
                         ("target false-alarm rate", block.get("target_false_alarm")),
                         ("in-distribution", f"{block['id_split']} split, {block.get('n_id')} slides"
                          if block.get("id_split") else None),
                         ("OOD bags", f"{block.get('ood_bags')} ({block.get('n_ood')} slides)"
                          if block.get("ood_bags") else None)])]
    scores = block.get("scores")
    if isinstance(scores, Mapping) and scores:
        fpr = next((k for m in scores.values() if isinstance(m, Mapping) for k in m if k.startswith("fpr_at")), None)
        parts += [para("AUROC: OOD = positive, higher score = more OOD; FPR: share of OOD slides kept at the "
                     "threshold that keeps 95 % of in-distribution slides (lower is better).", "note"),
                  table(["score", "AUROC", "FPR@95TPR", "threshold"],
                        [[n, m.get("auroc"), m.get(fpr) if fpr else None, m.get("threshold")]
                         for n, m in scores.items() if isinstance(m, Mapping)], table_id="ood-scores")]
    flagged = block.get("flagged_test")
    if isinstance(flagged, list):
        parts.append(heading(3, f"Test slides flagged as out of distribution ({len(flagged)})"))
        if not flagged:
            parts.append(para("none"))
        elif all(isinstance(f, Mapping) for f in flagged):
            cols = list(dict.fromkeys(k for f in flagged for k in f))
            parts.append(table(cols, [[joined(f.get(k)) for k in cols] for f in flagged], table_id="ood-flagged"))
        else:
            parts.append(table(["slide"], [[joined(f)] for f in flagged], table_id="ood-flagged"))
    return parts


def _config_text(path: Any) -> str | None:
    if not isinstance(path, str) or not path.endswith((".yaml", ".yml")):
        return None
    try:
        p = Path(path)
        return p.read_text(encoding="utf-8")[:50_000] if p.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def _evaluate_provenance(folder: Path, r: Mapping[str, Any]) -> list[Raw]:
    prov = r.get("provenance") if isinstance(r.get("provenance"), Mapping) else {}
    bags = prov.get("training_bags") if isinstance(prov.get("training_bags"), Mapping) else {}
    sha = prov.get("checkpoint_sha256")
    if not sha and (folder / "calibration.json").is_file():
        sha = read_json(folder / "calibration.json").get("checkpoint_sha256")
    lp = (r.get("protocol_info") or {}).get("lp") or {}
    items = [("checkpoint", r.get("checkpoint")), ("checkpoint SHA-256", sha), ("split table", r.get("split_csv")),
             ("bags folder", prov.get("bags_dir")),
             *((f"training bags: {k}", joined(v)) for k, v in bags.items()),
             ("objective / loss", f"{r.get('objective')} / {r.get('loss', 'n/a')}"),
             ("training seed", f"{r.get('seed')} ({r.get('seed_source', 'n/a')})"), ("probe seed", r.get("probe_seed")),
             ("linear probe", f"C = {lp.get('C')}, input: {lp.get('input', 'n/a')}" if lp else None),
             ("NCMI", f"tau {r.get('tau')}, centroid update {r.get('centroid_update')}, variant {r.get('ncmi_variant')}"
              if r.get("tau") is not None else None),
             ("patient leak allowed", r.get("allow_patient_leak")), ("created", r.get("created")),
             ("config", prov.get("config"))]
    parts = [heading(2, "Provenance", "provenance"), key_values(items)]
    text = _config_text(prov.get("config"))
    if text:
        parts.append(details("training config (config.yaml)", Raw(f"<pre>{esc(text)}</pre>")))
    return parts


def _evaluate_page(folder: Path) -> tuple[str, list[Raw]]:
    dirs = _report_folders(folder)
    reports = [read_report(d / REPORT_JSON) for d in dirs]
    r0, multi = reports[0], len(reports) > 1
    title = f"Evaluation: {r0['model']} ({r0['objective']} objective) on {r0['dataset']}"
    n = ", ".join(f"{k} {v}" for k, v in r0["n_slides"].items())
    parts: list[Raw] = [heading(1, title), para(f"Slides: {n}. F1 is macro-F1, AUC macro one-vs-rest. lp = linear probe on "
                                         "the frozen slide embedding; cc = nearest class centroid on the NCMI simplex; "
                                         "head = the aggregator's own classifier.", "lead"),
                        heading(2, "Test split" + (f": mean ± std over {len(reports)} probe seeds" if multi else ""), "test"),
                        _test_table(reports)]
    for d, r in zip(dirs, reports):
        parts += _run_parts(folder, d, r, f"Probe seed {r.get('probe_seed', d.name)}" if multi else None)
    run_figs = _figures(folder, folder, [("training_curves.png", "training curves"),
                                         ("embedding_pca.png", "slide embeddings (PCA)")])
    if run_figs:
        parts += [heading(2, "Training and embedding", "training"), *run_figs]
    parts += _calibration_parts(folder, r0) + _ood_parts(r0) + heatmap_gallery(folder) + _evaluate_provenance(folder, r0)
    return title, parts


# -------------------------------------------------------------------------------------- summary page
def _summary_page(folder: Path) -> tuple[str, list[Raw]]:
    summary = read_json(folder / "summary.json")
    groups = summary.get("groups") if isinstance(summary.get("groups"), list) else []
    title = "Summary over runs"
    parts: list[Raw] = [heading(1, title), para("Mean ± sample std (ddof = 1) over the runs of each group, test split. "
                                         "Each run's own page has its figures, predictions and provenance.", "lead"),
                        heading(2, "Groups", "groups")]
    run_rows: list[list[Any]] = []
    for g in groups:
        parts += [heading(3, f"{g.get('dataset')} / {g.get('model')} / {g.get('objective')} ({g.get('n_runs')} reports of "
                        f"{g.get('n_checkpoints')} checkpoints)")]
        paper = g.get("paper") or {}
        rows = [[p, *(format_mean_std(ps["test"][k]) for k in SCALAR_METRICS),
                 *(fmt(paper[p][k]) if p in paper else "—" for k in ("macro_f1", "macro_auc"))]
                for p, ps in (g.get("metrics") or {}).items() if "test" in ps]
        parts.append(table(TEST_TABLE_HEADER, rows, sortable=False))
        for rep in g.get("reports") or []:
            p = Path(rep)
            page_file = p.parent / HTML_REPORT
            link = (Raw(f'<a href="{esc(rel_link(page_file, folder))}">{esc(p.parent.name)}</a>')
                    if page_file.is_file() else p.parent.name)
            try:
                r = read_report(p)
            except ReportError:
                run_rows.append([link, g.get("model"), g.get("objective"), "—", "—", "—", "—"])
                continue
            for proto, ps in r["metrics"].items():
                t = ps.get("test") or {}
                run_rows.append([link, r["model"], r["objective"], proto, t.get("macro_f1"), t.get("macro_auc"),
                                 t.get("accuracy")])
    parts += [heading(2, "Runs", "runs"),
              table(["run", "model", "objective", "protocol", "macro-F1", "macro-AUC", "accuracy"], run_rows,
                    table_id="runs", caption="test split, one row per run and protocol; click a header to sort")]
    return title, parts + heatmap_gallery(folder)


# ------------------------------------------------------------------------------------------- entry
PAGE_KINDS: dict[str, tuple[Callable[[Path], bool], Callable[[Path], tuple[str, list[Raw]]]]] = {
    "predict": (lambda f: (f / "predict.json").is_file(), predict_page),
    "summary": (lambda f: (f / "summary.json").is_file(), _summary_page),
    "evaluate": (lambda f: bool(_report_folders(f)), _evaluate_page),
}


def render_html_report(folder: str | os.PathLike, related: Sequence[str | os.PathLike] = ()) -> str:
    """The HTML of ``folder``'s page (module docstring); :class:`HtmlReportError` when nothing is there."""
    f = Path(folder)
    for _kind, (found, build) in PAGE_KINDS.items():
        if found(f):
            title, parts = build(f)
            parts += related_links(f, [Path(p) for p in related])
            return page(title, [*parts[:2], section_nav(parts), *parts[2:]])
    raise HtmlReportError(f"{f}: no predict.json, summary.json or report.json to render")


def write_html_report(folder: str | os.PathLike, related: Sequence[str | os.PathLike] = ()) -> Path:
    """Render ``folder`` (:func:`render_html_report`) into ``folder/report.html`` atomically; returns its path."""
    out = Path(folder) / HTML_REPORT
    atomic_write_text(out, render_html_report(folder, related))
    logger.info("wrote %s (%.0f kB)", out, out.stat().st_size / 1024)
    return out
