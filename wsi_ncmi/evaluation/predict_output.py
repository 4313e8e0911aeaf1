"""The files `wsi-ncmi predict` writes: ``predictions.csv``, ``summary.md`` and ``predict.json``
(:func:`write_prediction`, for a :class:`~.predict.Prediction`; see :mod:`.predict` for the columns)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.markdown import markdown_table

from .ood import OOD_SCORERS

if TYPE_CHECKING:
    from .predict import Prediction

__all__ = ["PREDICTIONS_CSV", "PREDICT_JSON", "SUMMARY_MD", "summary_markdown", "write_prediction"]

logger = logging.getLogger(__name__)

PREDICTIONS_CSV, SUMMARY_MD, PREDICT_JSON = "predictions.csv", "summary.md", "predict.json"


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"


def summary_markdown(pred: Prediction, meta: Mapping[str, Any]) -> str:
    """``summary.md``: counts per class, the OOD score and threshold, flagged slides, mismatches, metrics."""
    t = pred.table
    lines = ["# Predictions", "",
             f"- checkpoint: `{meta.get('checkpoint')}`", f"- bags: `{meta.get('bags_dir')}` ({len(t)} slides)"]
    if meta.get("preprocessed"):
        lines.append(f"- preprocessed from `{meta['preprocessed']['slides_dir']}` with the checkpoint's recorded "
                     "settings")
    if pred.classifier:
        src = (f"from `{meta['classifier_dir']}`, temperature {pred.temperature:.4g} fitted on validation"
               if meta.get("classifier_dir") else "the run's own scores: no evaluation folder, uncalibrated")
        lines.append(f"- classifier: `{pred.classifier}` ({src})")
    desc = OOD_SCORERS[pred.score_name].description
    if pred.threshold is None:
        lines.append(f"- OOD score: `{pred.score_name}` ({desc}); **no calibration**: scores only, no flag "
                     "(run `wsi-ncmi evaluate` on the checkpoint and pass its `calibration.json`)")
    else:
        lines.append(f"- OOD score: `{pred.score_name}` ({desc}); threshold {pred.threshold:.4g} from "
                     f"`{meta.get('calibration')}` ({meta.get('ood_rule', 'keeps ≥ 95 % of validation slides')}); "
                     "flag = score > threshold")
    lines += ["", "## Predicted classes", ""]
    flags = t["ood_flag"].fillna(False).astype(bool)
    per_class = [(n, t["prediction"] == n) for n in pred.class_names]
    lines += markdown_table(["class", "slides", "flagged OOD"],
                            [[n, int(sel.sum()), int((sel & flags).sum())] for n, sel in per_class])
    lines += ["", f"## Flagged slides ({int(flags.sum())}): do not trust these predictions", ""]
    if flags.any():
        flagged = t[flags].sort_values("ood_score", ascending=False).itertuples()
        lines += markdown_table(["slide", "prediction", "ood_score"],
                                [[r.slide_id, r.prediction, f"{r.ood_score:.4g}"] for r in flagged])
    else:
        lines.append("none" if pred.threshold is not None else "not computed (no calibration)")
    mism = meta.get("mismatches") or {}
    if mism:
        lines += ["", f"## Provenance mismatches ({len(mism)} slides, allowed with --allow-mismatch)", ""]
        lines += [f"- {sid}: {'; '.join(w)}" for sid, w in mism.items()]
    if pred.metrics is not None:
        m = pred.metrics
        lines += ["", "## Against the given labels", "",
                  f"macro-F1 {_fmt(m['macro_f1'])}, macro-AUC {_fmt(m['macro_auc'])}, accuracy {_fmt(m['accuracy'])}"]
    hm = meta.get("heatmaps") or {}
    if hm:
        lines += ["", "## Heatmaps", ""]
        lines += [f"- {sid}: {v}" for sid, v in hm.items()]
    return "\n".join(lines) + "\n"


def write_prediction(out_dir: str | os.PathLike, pred: Prediction, meta: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``predictions.csv``, ``summary.md`` and ``predict.json`` (settings, calibration, mismatches)."""
    out = Path(out_dir)
    paths = {"predictions": out / PREDICTIONS_CSV, "summary": out / SUMMARY_MD, "json": out / PREDICT_JSON}
    atomic_write_text(paths["predictions"], pred.table.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(paths["summary"], summary_markdown(pred, meta))
    flags = pred.table["ood_flag"].fillna(False).astype(bool)
    doc = {**meta, "ood_score": pred.score_name, "threshold": pred.threshold, "n_slides": len(pred.table),
           "n_flagged": int(flags.sum()) if pred.threshold is not None else None,
           "counts": {n: int((pred.table["prediction"] == n).sum()) for n in pred.class_names},
           "metrics": pred.metrics, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str) + "\n")
    logger.info("wrote %d predictions to %s", len(pred.table), out)
    return paths
