"""The ``report.html`` page of a ``wsi-ncmi predict`` folder (see :mod:`.html_report`).

From ``predict.json`` and ``predictions.csv``: per slide the predicted class, the class scores, the OOD score and
flag (flagged rows highlighted) and the attention-heatmap thumbnail when one was drawn (linked to the full PNG);
the counts per class, the metrics against given labels, the provenance mismatches, the provenance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_ncmi.metrics import SCALAR_METRICS

from .html_parts import (
    Raw,
    fmt,
    heading,
    heatmap_gallery,
    inside,
    joined,
    key_values,
    para,
    parse_flag,
    read_json,
    read_results_csv,
    table,
    thumbnail_link,
)

__all__ = ["predict_page"]

PREDICTIONS_CSV, PREDICT_JSON = "predictions.csv", "predict.json"
METRIC_LABELS = {"macro_f1": "macro-F1", "macro_auc": "macro-AUC", "accuracy": "accuracy",
                 "balanced_accuracy": "balanced accuracy"}


def _heatmap_cell(folder: Path, sid: str, recorded: Any) -> Any:
    p = inside(folder, os.path.relpath(recorded, folder)) if isinstance(recorded, str) and recorded.endswith(".png") \
        else None
    p = p or inside(folder, f"heatmaps/{sid}.png")
    if p is not None:
        return thumbnail_link(p, f"{sid}: attention heatmap", folder)
    return recorded if isinstance(recorded, str) else "—"


def predict_page(folder: Path) -> tuple[str, list[Raw]]:
    from .ood import OOD_SCORERS

    meta = read_json(folder / "predict.json")
    df = read_results_csv(folder / PREDICTIONS_CSV)
    probs = [c for c in df.columns if c.startswith("prob_")]
    names = [c[5:] for c in probs]
    flags = [parse_flag(v) for v in df.get("ood_flag", [""] * len(df))]
    labelled = "label" in df.columns
    hm = meta.get("heatmaps") if isinstance(meta.get("heatmaps"), Mapping) else {}
    score, thr = meta.get("ood_score"), meta.get("threshold")
    title = f"Predictions: {len(df)} slides"
    desc = OOD_SCORERS[score].description if isinstance(score, str) and score in OOD_SCORERS else ""
    n_flag = sum(bool(f) for f in flags)
    parts: list[Raw] = [
        heading(1, title),
        para(f"{n_flag} slide(s) flagged as out of distribution: do not trust their predictions." if thr is not None
           else "No calibration: OOD scores only, no flag (run `wsi-ncmi evaluate` on the checkpoint and pass its "
                "calibration.json).", "lead"),
        heading(2, "Per slide", "slides"),
        para(f"OOD score: {score} ({desc}); flag = score > threshold {fmt(thr, '.4g')}. Flagged rows are highlighted"
           + ("; wrong predictions are shaded red." if labelled else "."), "note")]
    rows, classes = [], []
    for i, r in enumerate(df.to_dict("records")):
        flag = flags[i]
        rows.append([r["slide_id"], *([r["label"]] if labelled else []), r.get("prediction", ""),
                     *(r[c] for c in probs), r.get("ood_score"),
                     Raw('<span class="badge">OOD</span>') if flag else ("no" if flag is False else "—"),
                     *([_heatmap_cell(folder, r["slide_id"], hm.get(r["slide_id"]))] if hm else [])])
        classes.append("flag" if flag else "wrong" if labelled and r["label"] != r.get("prediction") else None)
    header = ["slide", *(["label"] if labelled else []), "prediction", *(f"P({n})" for n in names), "OOD score",
              "OOD flag", *(["heatmap"] if hm else [])]
    parts.append(table(header, rows, table_id="predictions", row_classes=classes,
                       caption=f"{len(df)} rows of {PREDICTIONS_CSV}; click a column header to sort"))
    pred = df.get("prediction", pd.Series([""] * len(df)))
    parts += [heading(2, "Counts", "counts"),
              table(["class", "slides", "flagged OOD"],
                    [[n, int((pred == n).sum()), sum(bool(f) for f, p in zip(flags, pred) if p == n)] for n in names],
                    sortable=False)]
    m = meta.get("metrics")
    if isinstance(m, Mapping):
        parts += [heading(3, "Against the given labels"),
                  key_values([(METRIC_LABELS.get(k, k), m.get(k)) for k in SCALAR_METRICS])]
    mism = meta.get("mismatches") if isinstance(meta.get("mismatches"), Mapping) else {}
    if mism:
        parts += [heading(3, f"Provenance mismatches ({len(mism)}; allowed with --allow-mismatch)"),
                  table(["slide", "difference"], [[s, "; ".join(map(str, w)) if isinstance(w, list) else w]
                                                  for s, w in mism.items()])]
    bags = meta.get("training_bags") if isinstance(meta.get("training_bags"), Mapping) else {}
    pre = meta.get("preprocessed") if isinstance(meta.get("preprocessed"), Mapping) else {}
    parts += [heading(2, "Provenance", "provenance"),
              key_values([("checkpoint", meta.get("checkpoint")), ("checkpoint SHA-256", meta.get("checkpoint_sha256")),
                          ("objective", meta.get("objective")), ("bags folder", meta.get("bags_dir")),
                          ("OOD rule", meta.get("ood_rule") or meta.get("rule")),
                          *((f"training bags: {k}", joined(v)) for k, v in bags.items()),
                          ("preprocessed from", pre.get("slides_dir")), ("calibration", meta.get("calibration")),
                          ("mismatches allowed", meta.get("allow_mismatch")), ("created", meta.get("created"))])]
    parts += heatmap_gallery(folder) if not hm else []
    return title, parts
