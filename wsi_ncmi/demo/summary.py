"""The demo's own report: ``OUT/report/demo.md`` (stages, test metrics, attention check, heatmaps), the
OOD table ``ood.md``, and the attention-vs-ground-truth numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.markdown import markdown_table

from .config import DemoResult

__all__ = ["attention_check", "md_table", "ood_markdown", "summary_table", "write_demo_summary"]


def ood_markdown(table: pd.DataFrame) -> str:
    lines = ["# Out-of-distribution flag (`wsi-ncmi predict`)", "",
             "OOD slides (`ood_ihc_*`): tissue made only of the IHC texture, which the labelled cohort holds only "
             "as a small distractor patch. Each run predicts them together with its test slides (in distribution) "
             "and the unlabelled real slide, with the threshold of its `calibration.json` (a conformal quantile of "
             "validation + out-of-fold training scores, target false-alarm rate 0.1). `auroc_vs_test`: the score's AUROC, OOD slides vs the test split "
             "(`eval/<run>/report.md`).", ""]
    for run, part in table.groupby("run", sort=False):
        by_kind = part.groupby("kind")["ood_flag"].agg(["sum", "count"])
        lines += [f"## {run} (score `{part['ood_score_name'].iloc[0]}`, AUROC vs test "
                  f"{_num(part['auroc_vs_test'].iloc[0])})", "",
                  "flagged: " + "; ".join(f"{k} {int(v['sum'])}/{int(v['count'])}" for k, v in by_kind.iterrows()), ""]
        show = part[part["kind"] != "test (in distribution)"][["slide_id", "kind", "prediction", "ood_score", "ood_flag"]]
        show = show.assign(ood_score=show["ood_score"].map(lambda v: f"{v:.4g}"))  # KL scores can be ~1e-4
        lines += md_table(show)
        lines.append("")
    return "\n".join(lines)


def _num(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{float(v):.3f}"


def attention_check(scores: np.ndarray, tumour_fraction: np.ndarray) -> dict[str, float]:
    """Compare attention [N] on tumour tiles (>= 50 % tumour) with the tissue tiles without tumour.

    Returns counts, the two means, their ratio, the share of the total attention that tumour tiles get
    next to their share of the tiles, and the AUROC of the scores for "is a tumour tile".
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    tum, nor = tumour_fraction >= 0.5, tumour_fraction == 0
    out = {"n_tumour_tiles": int(tum.sum()), "n_normal_tiles": int(nor.sum()),
           "mean_att_tumour": float("nan"), "mean_att_normal": float("nan"), "ratio": float("nan"),
           "auroc": float("nan"), "tumour_tile_share": float(tum.mean()) if s.size else float("nan"),
           "tumour_attention_share": float(s[tum].sum() / s.sum()) if s.sum() > 0 else float("nan")}
    if tum.any() and nor.any():
        out["mean_att_tumour"] = float(s[tum].mean())
        out["mean_att_normal"] = float(s[nor].mean())
        out["ratio"] = out["mean_att_tumour"] / max(out["mean_att_normal"], 1e-12)
        sel = tum | nor
        out["auroc"] = float(roc_auc_score(tum[sel], s[sel]))
    return out


def summary_table(eval_dir: Path, runs: list[str]) -> pd.DataFrame:
    """Test macro-F1 / macro-AUC / accuracy per run and protocol, from each run's ``report.json``."""
    rows = []
    for run in runs:
        p = eval_dir / run / "report.json"
        if not p.is_file():
            continue
        rep = json.loads(p.read_text())
        for proto, splits in (rep.get("metrics") or {}).items():
            test = (splits or {}).get("test") or {}
            rows.append({"run": run, "protocol": proto, "test_macro_f1": test.get("macro_f1"),
                         "test_macro_auc": test.get("macro_auc"), "test_accuracy": test.get("accuracy")})
    return pd.DataFrame(rows)


def md_table(df: pd.DataFrame) -> list[str]:
    """``df`` as Markdown lines (:func:`markdown_table`): floats with 3 decimals, ``-`` for None / NaN, and
    ``|`` inside a cell written as ``/`` so it cannot split the row."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if np.isnan(v) else f"{v:.3f}"
        return "-" if v is None else str(v).replace("|", "/")

    return markdown_table(df.columns, ([cell(v) for v in row] for row in df.itertuples(index=False)))


def write_demo_summary(res: DemoResult) -> Path:
    """``OUT/report/demo.md``: stages, test metrics, attention check and heatmap images."""
    cfg = res.config
    out = cfg.out / "report" / "demo.md"
    lines = ["# wsi_ncmi demo", "",
             f"Cohort: {cfg.n_slides} labelled synthetic slides (real H&E textures, tumour = tiatoolbox texture) "
             f"+ extras; tiles {cfg.patch_size} px at {cfg.target_mpp} um/px, MobileNetV2 (ImageNet) features; "
             f"{cfg.max_epochs} epochs per run. See `wsi_ncmi/demo/cohort.py` for how the slides are made.", "",
             "## Stages", ""]
    lines += md_table(pd.DataFrame([(s.name, s.status, round(s.seconds, 1), s.detail) for s in res.stages],
                                    columns=["stage", "status", "seconds", "detail"]))
    if res.summary is not None and len(res.summary):
        lines += ["", "## Test split (one seed; a demo on synthetic slides, not a benchmark)", ""]
        lines += md_table(res.summary)
        lines += ["", "Per-run reports: " + ", ".join(
            f"[{r}](../eval/{r}/report.md)" for r in res.summary["run"].unique()) + "; summary: [summary.md](summary.md)"]
    if res.attention is not None and len(res.attention):
        lines += ["", "## Attention vs ground truth (tumour test slides)", "",
                  "Tumour tiles: >= 50 % inside the painted tumour mask; normal: tissue tiles with no tumour. "
                  "ratio = mean attention on tumour tiles / on normal tiles; auroc: attention ranks tumour tiles "
                  "above normal ones (0.5 = chance).", ""]
        lines += md_table(res.attention)
    ood_md = cfg.out / "report" / "ood.md"
    if res.paths.get("ood") and ood_md.is_file():
        lines += ["", "## Out-of-distribution slides", "",
                  "Scores and flags of `wsi-ncmi predict` on the cohort's OOD slides: [ood.md](ood.md)"]
    hm = cfg.out / "report" / "heatmaps"
    pngs = sorted(hm.rglob("*.png")) if hm.is_dir() else []
    if pngs:
        lines += ["", "## Heatmaps", ""]
        lines += [f"![{p.relative_to(hm)}](heatmaps/{p.relative_to(hm).as_posix()})" for p in pngs]
    return atomic_write_text(out, "\n".join(lines) + "\n")
