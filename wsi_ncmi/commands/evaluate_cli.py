"""`wsi-ncmi evaluate` (one checkpoint → report) and `wsi-ncmi report` (several runs → mean ± std).

    wsi-ncmi evaluate --ckpt runs/c17_abmil_ncmi/checkpoints/best.ckpt \\
        --data.bags_dir BAGS --data.split_csv splits/camelyon17/seed0.csv --out runs/c17_abmil_ncmi/eval
    wsi-ncmi report runs/c17_abmil_ncmi_s*/eval runs/c17_abmil_ce_s*/eval --out results/c17

`evaluate` reads the checkpoint (``weights_only=True``: a malicious, truncated or foreign file is refused in one
line), rebuilds its datamodule after the pre-flight check of ``fit`` (``wsi_ncmi.training.checkpoint``) and runs
:func:`wsi_ncmi.evaluation.run.evaluate_module`, which documents what is written into ``--out`` (one seed:
the report there; several ``--seeds``: ``--out/seed<k>/``; ``embeddings.npz``, ``calibration.json``, figures).
Bags with NaN/inf features are named when they are read; ``--allow-patient-leak`` is recorded in ``report.json``.

`report` accepts run folders or ``report.json`` files (folders are searched recursively, so either layout
above works) and writes ``summary.json``, ``summary.csv``, ``summary.md`` and ``report.html`` (mean ± std and
links to each run's own page, :mod:`wsi_ncmi.evaluation.html_report`) into ``--out``.

Data options not given on the command line (``label_map``, ``num_classes``, ``fold`` and, when omitted,
``bags_dir`` / ``split_csv``) are taken from the checkpoint's datamodule hyper-parameters.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wsi_ncmi.errors import UserError

__all__ = ["main", "main_report", "build_parser", "build_report_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi evaluate",
        description="Freeze a trained MIL aggregator and evaluate it with linear probing (LP), "
        "nearest-centroid (CC, NCMI runs) and its own head (CE runs).",
    )
    p.add_argument("--ckpt", required=True, help="MILModule checkpoint (.ckpt) written by `wsi-ncmi fit`")
    p.add_argument("--data.bags_dir", dest="bags_dir", default=None, help="folder of <slide_id>.h5 bags")
    p.add_argument("--data.split_csv", dest="split_csv", default=None, help="split table (slide_id, label, split, ...)")
    p.add_argument("--data.fold", dest="fold", type=int, default=None, help="fold of a k-fold split table")
    p.add_argument("--data.num_workers", dest="num_workers", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder of the report")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="linear-probe seeds (default: 0; only stochastic solvers such as saga depend on them)")
    p.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                   help="class_weight of the linear probe (default: none)")
    p.add_argument("--refit", choices=["train", "train+val"], default="train",
                   help="fit the selected probe on train only (default) or on train+val")
    p.add_argument("--solver", default="lbfgs", help="LogisticRegression solver: lbfgs (default), newton-cg, sag, saga, ...")
    p.add_argument("--lp-input", choices=["auto", "normalized", "raw"], default="auto",
                   help="linear-probe input: the centred, L2-normalised embedding, the raw embedding f, or auto "
                        "(default: both, the one with the better validation score is kept)")
    p.add_argument("--Cs", type=float, nargs="+", default=None, help="grid of inverse regularisation strengths")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dataset", default="auto",
                   help="camelyon17 | bracs | any name | auto (detected from the split CSV path)")
    p.add_argument("--metrics-csv", default=None,
                   help="training metrics.csv for the curves (default: searched under the checkpoint's run folder)")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--allow-patient-leak", action="store_true",
                   help="evaluate a split table with a patient in two splits (recorded in report.json)")
    p.add_argument("--ood-bags", default=None,
                   help="folder of out-of-distribution bags: AUROC / FPR@95TPR of each OOD score against the test "
                        "split (report.json `ood`, report.md)")
    p.add_argument("--ood-false-alarm", type=float, default=0.1,
                   help="target false-alarm rate of the OOD flag: the share of in-distribution slides it may flag "
                        "(default 0.1; the threshold is a conformal quantile of validation + out-of-fold scores)")
    return p


def build_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi report",
        description="Aggregate evaluated runs: mean ± std over seeds per (dataset, model, objective).",
    )
    p.add_argument("runs", nargs="+", help="run folders (searched for report.json) or report.json files")
    p.add_argument("--out", required=True, help="output folder for summary.json / summary.csv / summary.md")
    return p


def _echo(text: str, err: bool = False) -> None:
    """The command's output (this is a CLI: it writes to the terminal, library code logs)."""
    (sys.stderr if err else sys.stdout).write(text + "\n")


def _evaluate(args: argparse.Namespace) -> int:
    from wsi_ncmi.evaluation.probe import DEFAULT_CS
    from wsi_ncmi.evaluation.run import EvaluateOptions, evaluate_checkpoint

    options = EvaluateOptions(
        seeds=tuple(args.seeds), class_weight=None if args.class_weight == "none" else args.class_weight,
        refit=args.refit, Cs=tuple(args.Cs) if args.Cs else DEFAULT_CS, solver=args.solver, lp_input=args.lp_input,
        device=args.device,
        dataset=args.dataset, metrics_csv=Path(args.metrics_csv) if args.metrics_csv else None,
        plots=not args.no_plots, allow_patient_leak=args.allow_patient_leak, ood_bags=args.ood_bags,
        false_alarm=args.ood_false_alarm,
    )
    evaluate_checkpoint(args.ckpt, args.out, options, bags_dir=args.bags_dir, split_csv=args.split_csv,
                        fold=args.fold, num_workers=args.num_workers, echo=_echo)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`wsi-ncmi evaluate ...`; returns 0 on success, 2 on a user error (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return _evaluate(args)
    except UserError as err:
        from wsi_ncmi.commands.errors import one_line

        _echo(f"wsi-ncmi evaluate: error: {one_line(err)}", err=True)
        return 2
    except OSError as err:  # disk full, read-only, ... while writing --out (an earlier report there is kept)
        from wsi_ncmi.commands.errors import write_failure

        line = write_failure(err, f"--out {args.out}")
        if line is None:
            raise
        kept = "; the earlier report in --out is unchanged" if (Path(args.out) / "report.json").is_file() else ""
        _echo(f"wsi-ncmi evaluate: error: {line}{kept}", err=True)
        return 2


def main_report(argv: list[str] | None = None) -> int:
    """`wsi-ncmi report RUNS... --out DIR`; returns 0 on success, 2 on a user error."""
    from wsi_ncmi.evaluation.report_schema import ReportError
    from wsi_ncmi.evaluation.summary import aggregate_reports

    args = build_report_parser().parse_args(argv)
    try:
        summary = aggregate_reports(args.runs, args.out)
    except ReportError as err:
        _echo(f"wsi-ncmi report: error: {err}", err=True)
        return 2
    _echo((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    n = sum(g["n_runs"] for g in summary["groups"])
    _echo(f"{n} runs in {len(summary['groups'])} groups → {Path(args.out) / 'summary.json'}")
    from wsi_ncmi.evaluation.html_report import write_html_report

    try:
        page = write_html_report(args.out)
    except ReportError as err:
        _echo(f"wsi-ncmi report: error: {err}", err=True)
        return 2
    _echo(f"report page → {page}")
    return 0
