"""Evaluation of frozen aggregators: embed a split (`embed`), linear probe and nearest centroid (`probe`),
the protocols that evaluate a run (`protocols`), the report schema (`report_schema`), its files
(`report`) and the summary over runs (`summary`), figures (`plots`) and the
published numbers to compare with (`paper`). Heatmaps (`heatmap`) live beside them; the natural-image
track's evaluation is :mod:`wsi_ncmi.natural.evaluate`.

Names are re-exported lazily so that importing one submodule (e.g. ``wsi_ncmi.evaluation.heatmap``) does
not pull in scikit-learn, pandas or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # embed
    "EmbedError": "embed",
    "EmbeddedSplit": "embed",
    "embed_split": "embed",
    "embed_splits": "embed",
    "center_and_normalize": "embed",
    # probe
    "ProbeError": "probe",
    "LinearProbe": "probe",
    "DEFAULT_CS": "probe",
    "fit_centroid_classifier": "probe",
    # protocols (evaluate a run)
    "PROTOCOLS": "protocols",
    "evaluate_run": "protocols",
    # report_schema
    "ReportError": "report_schema",
    "ReportSchemaError": "report_schema",
    "validate_report": "report_schema",
    # report (files)
    "write_report": "report",
    "read_report": "report",
    # summary over runs
    "find_reports": "summary",
    "aggregate_reports": "summary",
    # plots
    "PlotError": "plots",
    "plot_roc": "plots",
    "plot_confusion": "plots",
    "plot_training_curves": "plots",
    "plot_embedding": "plots",
    "write_plots": "plots",
    # paper
    "PAPER_TABLE_III": "paper",
    "paper_for_protocol": "paper",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wsi_ncmi.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
