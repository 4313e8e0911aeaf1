"""`wsi-ncmi demo`: the whole pipeline on built-in sample slides, on CPU (what `make demo` runs).

    wsi-ncmi demo --out demo_out            # ~48 slides, a few minutes on 2 cores
    wsi-ncmi demo --out demo_out --quick    # 20 smaller slides, fewer epochs

Stages: cohort -> wsi-preprocess -> split -> fit (ABMIL, TransMIL, AEM, ASMIL, each with CE and NCMI; --quick:
ABMIL only) -> evaluate -> report -> heatmaps. The last line names ``OUT/report/report.html``, the page to open.
A second run reuses the cohort and the bags. Exit status 0 when every stage succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "summary_lines"]


def _say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    from wsi_ncmi.demo.config import RUNS

    p = argparse.ArgumentParser(prog="wsi-ncmi demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--slides", type=int, help="number of labelled synthetic slides (default 48, quick 20)")
    p.add_argument("--quick", action="store_true", help="small slides and fewer epochs (a smoke run)")
    p.add_argument("--epochs", type=int, help="training epochs per run (default 20, quick 12)")
    p.add_argument("--runs", nargs="+", choices=list(RUNS),
                   help="which runs to train (default: all; with --quick: abmil_ce abmil_ncmi)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="slide-reading worker processes in preprocessing")
    return p


def _fmt(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "  -  "
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_lines(summary: Any) -> list[str]:
    """One line per run of a :func:`wsi_ncmi.demo.summary.summary_table` frame (after a header): test
    macro-F1 / macro-AUC of the linear probe and of the run's own classifier (CC for NCMI, head for CE)."""
    lines = ["test split (macro)  LP F1  LP AUC   own    F1     AUC   (own: CC for NCMI runs, head for CE)"]
    for run, g in summary.groupby("run", sort=False):
        by = g.set_index("protocol")
        own = "cc" if "cc" in by.index else "head"

        def cell(proto: str, col: str, by: Any = by) -> str:
            return _fmt(by.at[proto, col] if proto in by.index else None)

        lines.append(f"  {run:<16} {cell('lp', 'test_macro_f1'):>5}  {cell('lp', 'test_macro_auc'):>6}   {own:<4} "
                     f"{cell(own, 'test_macro_f1'):>5}  {cell(own, 'test_macro_auc'):>6}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    import lightning.pytorch  # noqa: F401  (imported first: it sets its own log level at import)

    from wsi_ncmi.demo.config import DemoConfig, DemoError
    from wsi_ncmi.demo.pipeline import run_demo

    for name in ("lightning.pytorch", "lightning.fabric", "preprocessing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # the demo drives LightningCLI in-process on purpose and on tiny data: keep its advice out of the output
    for pattern in (".*LightningCLI's args parameter.*", ".*number of training batches.*", ".*LeafSpec.*",
                    ".*does not have many workers.*", ".*tensorboardX.*"):
        warnings.filterwarnings("ignore", message=pattern)
    cfg = DemoConfig(out=Path(args.out), quick=args.quick, n_slides=args.slides, seed=args.seed,
                     max_epochs=args.epochs, runs=tuple(args.runs) if args.runs else None, workers=args.workers)
    try:
        res = run_demo(config=cfg, notify=_say)
    except DemoError as e:
        sys.stderr.write(f"wsi-ncmi demo: error: {e}\n")
        return 2
    total = sum(s.seconds for s in res.stages)
    _say()
    _say(f"demo finished in {total:.0f} s; outputs under {res.config.out}/")
    for key in ("cohort", "features", "split", "report", "heatmaps", "summary"):
        if key in res.paths:
            _say(f"  {key:<9} {res.paths[key]}")
    if res.summary is not None and len(res.summary):
        _say()
        for line in summary_lines(res.summary):
            _say(line)
    if res.attention is not None and len(res.attention):
        _say()
        for run, g in res.attention.groupby("run"):
            _say(f"  attention {run}: tumour tiles ({100 * g['tumour_tile_share'].mean():.0f} % of tiles) get "
                 f"{100 * g['tumour_attention_share'].mean():.0f} % of the attention; AUROC "
                 f"{g['auroc'].mean():.2f} ({len(g)} tumour test slides)")
    failed = [s for s in res.stages if s.status != "ok"]
    if failed:
        _say()
        for s in failed:
            _say(f"  {s.status.upper()}: {s.name}: {s.detail}")
    if "html" in res.paths:  # the last line: the page to open
        _say()
        _say(f"open the report page: {res.paths['html']}")
    return 1 if failed else 0
