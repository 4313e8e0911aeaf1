"""`wsi-ncmi evaluate` (one checkpoint → report) and `wsi-ncmi report` (several runs → mean ± std).

    wsi-ncmi evaluate --ckpt runs/c17_abmil_ncmi/checkpoints/best.ckpt \\
        --data.bags_dir BAGS --data.split_csv splits/camelyon17/seed0.csv --out runs/c17_abmil_ncmi/eval
    wsi-ncmi report runs/c17_abmil_ncmi_s*/eval runs/c17_abmil_ce_s*/eval --out results/c17

`evaluate` loads the ``MILModule`` checkpoint (``weights_only=True``), embeds the train / val / test splits
once with the frozen aggregator, then runs every protocol that applies (``lp`` always; ``cc`` for NCMI
runs; ``head`` for runs trained with a head) and writes, into ``--out``:

* one seed (the default, ``--seeds 0``): ``report.json``, ``report.md``, ``predictions.csv`` and the
  figures (``roc_*``, ``confusion_*``, ``training_curves.png``, ``embedding_pca.png``) directly in ``--out``;
* several seeds (``--seeds 0 1 2``): one folder ``--out/seed<k>/`` per seed with its own report and
  ROC / confusion figures, and the seed-independent figures in ``--out``. These seeds are the linear probe's
  ``random_state`` (``probe_seed`` in the report); with the default lbfgs solver the probe is deterministic,
  so LP numbers only change with ``--solver saga``. Seeds of *training* are separate runs: evaluate each
  checkpoint and aggregate. The report's ``seed`` is the training seed stored in the checkpoint (or, for
  checkpoints without one, ``seed_everything`` of the run folder's ``config.yaml``; else the probe seed).
* ``embeddings.npz`` (slide ids, labels, embeddings, LP inputs and NCMI log-probs per split; no pickles).

`report` accepts run folders or ``report.json`` files (folders are searched recursively, so either layout
above works) and writes ``summary.json``, ``summary.csv`` and ``summary.md`` into ``--out``.

Data options not given on the command line (``label_map``, ``num_classes``, ``fold`` and, when omitted,
``bags_dir`` / ``split_csv``) are taken from the checkpoint's datamodule hyper-parameters.

Before anything is written the checkpoint is read with ``weights_only=True`` (a malicious, truncated or
foreign file is refused in one line) and the split table is checked against the bags folder as ``fit`` does
(missing bags, bags whose feature dim differs from the model's, a patient in two splits unless
``--allow-patient-leak``, recorded in ``report.json`` as ``allow_patient_leak`` / ``patient_leaks``). Bags with
NaN/inf features are named when they are read.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ncmi.data.atomic import atomic_output

__all__ = ["main", "main_report", "build_parser", "build_report_parser"]

logger = logging.getLogger(__name__)


class EvaluateArgumentError(ValueError):
    """A command-line argument of `wsi-ncmi evaluate` / `report` is wrong (message names it)."""


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
    return p


def build_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi report",
        description="Aggregate evaluated runs: mean ± std over seeds per (dataset, model, objective).",
    )
    p.add_argument("runs", nargs="+", help="run folders (searched for report.json) or report.json files")
    p.add_argument("--out", required=True, help="output folder for summary.json / summary.csv / summary.md")
    return p


# ----------------------------------------------------------------------------------------- helpers
def _echo(text: str, err: bool = False) -> None:
    """The command's output (this is a CLI: it writes to the terminal, library code logs)."""
    (sys.stderr if err else sys.stdout).write(text + "\n")


def _datamodule_hparams(state: Mapping[str, Any]) -> dict[str, Any]:
    hp = state.get("datamodule_hyper_parameters") or {}
    return dict(hp) if isinstance(hp, Mapping) else {}


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _training_seed(state: Mapping[str, Any], ckpt: Path) -> int | None:
    """The seed checkpoint ``ckpt`` (read as ``state``) was trained with: stored by ``MILModule``, else the
    run's ``config.yaml``."""
    import yaml

    seed = state.get("training_seed")
    if isinstance(seed, int):
        return seed
    config = _run_dir(ckpt) / "config.yaml"
    if config.is_file():
        try:
            value = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
        except (yaml.YAMLError, AttributeError) as err:
            logger.warning("%s: cannot read seed_everything (%s)", config, err)
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _find_metrics_csv(ckpt: Path) -> Path | None:
    run_dir = _run_dir(ckpt)
    top = run_dir / "metrics.csv"  # the training log (validate/test runs log into sub-folders)
    if top.is_file():
        return top
    hits = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def _build_data(args: argparse.Namespace, state: Mapping[str, Any], num_classes: int, in_dim: int) -> Any:
    """The datamodule of the evaluated split, after the pre-flight check of ``fit`` (with the model's
    ``in_dim``); the accepted patient leaks are stored on it as ``patient_leaks``."""
    from wsi_ncmi.data import MILDataModule
    from wsi_ncmi.training.preflight import preflight_check

    hp = _datamodule_hparams(state)
    bags_dir = args.bags_dir or hp.get("bags_dir")
    split_csv = args.split_csv or hp.get("split_csv")
    if not bags_dir or not split_csv:
        raise EvaluateArgumentError(
            "--data.bags_dir and --data.split_csv are required (the checkpoint does not record them)"
        )
    fold = args.fold if args.fold is not None else hp.get("fold")
    check = preflight_check(bags_dir, split_csv, num_classes=num_classes, in_dim=in_dim, fold=fold,
                            check_labels=not hp.get("label_map"), allow_patient_leak=args.allow_patient_leak,
                            leak_flag="--allow-patient-leak")
    dm = MILDataModule(
        bags_dir=str(bags_dir),
        split_csv=str(split_csv),
        batch_size=1,
        num_workers=args.num_workers,
        label_map=hp.get("label_map"),
        num_classes=num_classes,
        fold=fold,
        pin_memory=False,
    )
    if dm.num_classes != num_classes:
        raise EvaluateArgumentError(
            f"--data.split_csv {split_csv}: {dm.num_classes} classes, the checkpoint has {num_classes}"
        )
    dm.patient_leaks = check.patient_leaks
    return dm


def _save_embeddings(path: Path, splits: Mapping[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    for name, s in splits.items():
        arrays[f"{name}_slide_ids"] = np.asarray(s.slide_ids, dtype=str)
        arrays[f"{name}_labels"] = s.labels
        arrays[f"{name}_embeddings"] = s.embeddings
        for key in ("logits", "log_probs", "normalized"):
            value = getattr(s, key)
            if value is not None:
                arrays[f"{name}_{key}"] = value
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:  # a file object: numpy would append ".npz"
        np.savez_compressed(fh, **arrays)


def _summary_lines(report: Mapping[str, Any]) -> list[str]:
    from wsi_ncmi.evaluation.paper import paper_for_protocol

    lines = [f"{'protocol':<8} {'split':<5} {'macro-F1':>8} {'macro-AUC':>9} {'acc':>6}   paper F1 / AUC (test)"]
    for proto, per_split in report["metrics"].items():
        for split, m in per_split.items():
            paper = paper_for_protocol(report["dataset"], report["model"], report["objective"], proto,
                                       report.get("num_classes")) if split == "test" else None
            ref = f"{paper['macro_f1']:.3f} / {paper['macro_auc']:.3f}" if paper else ""
            auc = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.3f}"
            lines.append(f"{proto:<8} {split:<5} {m['macro_f1']:>8.3f} {auc:>9} {m['accuracy']:>6.3f}   {ref}")
    return lines


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from wsi_ncmi.evaluation.embed import embed_splits
    from wsi_ncmi.evaluation.paper import detect_dataset
    from wsi_ncmi.evaluation.plots import write_report_plots, write_run_plots
    from wsi_ncmi.evaluation.probe import DEFAULT_CS
    from wsi_ncmi.evaluation.report import SPLITS, evaluate_run, write_report
    from wsi_ncmi.training.checkpoint import load_mil_module

    ckpt = Path(args.ckpt)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluateArgumentError(f"--device {args.device}: CUDA is not available")
    if len(set(args.seeds)) != len(args.seeds):
        raise EvaluateArgumentError(f"--seeds {args.seeds}: seeds must be distinct")
    if not ckpt.is_file():
        raise EvaluateArgumentError(f"--ckpt {ckpt}: no such file")
    module, state = load_mil_module(ckpt, args.device)
    hp = dict(module.hparams)
    num_classes = int(hp["num_classes"])
    dm = _build_data(args, state, num_classes, module.model.in_dim)
    if dm.in_dim != module.model.in_dim:
        raise EvaluateArgumentError(
            f"--data.bags_dir {dm.bags_dir}: bags have D={dm.in_dim}, the checkpoint's model expects {module.model.in_dim}"
        )
    dataset = detect_dataset(dm.split_csv) if args.dataset == "auto" else args.dataset.lower()
    loaders = {s: dm.dataloader(s, shuffle=False) for s in SPLITS}
    splits = embed_splits(module.model, loaders, device=args.device, ncmi_loss=module.ncmi_loss)

    out = Path(args.out)
    _save_embeddings(out / "embeddings.npz", splits)
    extra: dict[str, Any] = {"checkpoint": str(ckpt), "loss": hp.get("loss") if module.objective == "head" else "ncmi",
                             "allow_patient_leak": bool(args.allow_patient_leak),
                             "patient_leaks": list(dm.patient_leaks)}
    if module.ncmi_loss is not None:
        nl = module.ncmi_loss
        extra.update(centroid_update=nl.centroid_update, tau=nl.tau, ncmi_variant=nl.variant)
    metrics_csv = Path(args.metrics_csv) if args.metrics_csv else _find_metrics_csv(ckpt)
    if args.metrics_csv and not metrics_csv.is_file():
        raise EvaluateArgumentError(f"--metrics-csv {metrics_csv}: no such file")

    _ood_calibration(args, module, splits, state, num_classes, dm.class_names, ckpt, out, extra)

    train_seed = _training_seed(state, ckpt)
    multi = len(args.seeds) > 1
    for seed in args.seeds:
        report, preds = evaluate_run(
            splits, num_classes, dataset=dataset, split_csv=str(dm.split_csv), model=str(hp["model"]),
            objective=module.objective, seed=seed, train_seed=train_seed, class_names=dm.class_names,
            class_weight=None if args.class_weight == "none" else args.class_weight,
            Cs=tuple(args.Cs) if args.Cs else DEFAULT_CS, refit=args.refit, extra=extra,
            solver=args.solver,
        )
        seed_dir = out / f"seed{seed}" if multi else out
        write_report(seed_dir, report, preds)
        if not args.no_plots:
            write_report_plots(seed_dir, report, preds)
        _echo(f"\n{dataset} / {hp['model']} / {module.objective} — seed {seed} → {seed_dir / 'report.json'}")
        _echo("\n".join(_summary_lines(report)))
    if not args.no_plots:
        emb = {k: (s.normalized, s.labels) for k, s in splits.items()}
        shared = dict(metrics_csv=metrics_csv, embeddings=emb)
        write_run_plots(out, dm.class_names, **shared)
    return 0


def _ood_calibration(args: argparse.Namespace, module: Any, splits: Mapping[str, Any], state: Mapping[str, Any],
                     num_classes: int, class_names: list[str], ckpt: Path, out: Path, extra: dict[str, Any]) -> None:
    """``calibration.json`` (OOD thresholds at 95 % TPR on val) and, with ``--ood-bags``, ``extra["ood"]``."""
    from wsi_ncmi.data.provenance import CHECKPOINT_KEY
    from wsi_ncmi.evaluation.ood import CALIBRATION_JSON, evaluate_ood
    from wsi_ncmi.evaluation.predict import check_bags, embed_bags, select_bags

    ood = None
    if args.ood_bags:
        bags = select_bags(args.ood_bags)
        check_bags(bags, state, str(ckpt), allow_mismatch=CHECKPOINT_KEY not in state)
        ood = embed_bags(module.model, bags, ncmi_loss=module.ncmi_loss, device=args.device)
    calibration, block = evaluate_ood(splits, module.ncmi_loss, num_classes, class_names, ckpt, ood,
                                      str(args.ood_bags or ""))
    calibration.write(out / CALIBRATION_JSON)
    _echo(f"OOD calibration ({calibration.default_score} default, 95 % TPR on val) → {out / CALIBRATION_JSON}")
    if block is not None:
        extra["ood"] = block
        _echo("OOD vs test: " + ", ".join(f"{k} AUROC {v['auroc']:.3f}" for k, v in block["scores"].items()))


def _user_errors() -> tuple[type[BaseException], ...]:
    from wsi_ncmi.data import BagError, SplitError
    from wsi_ncmi.data.mil import MILDataError
    from wsi_ncmi.data.provenance import ProvenanceError
    from wsi_ncmi.evaluation.embed import EmbedError
    from wsi_ncmi.evaluation.ood import OODError
    from wsi_ncmi.evaluation.predict import PredictError
    from wsi_ncmi.evaluation.probe import ProbeError
    from wsi_ncmi.evaluation.report import ReportError
    from wsi_ncmi.models import MILInputError
    from wsi_ncmi.training.checkpoint import CheckpointError
    from wsi_ncmi.training.preflight import PreflightError

    return (EvaluateArgumentError, BagError, SplitError, MILDataError, EmbedError, ProbeError, ReportError,
            MILInputError, CheckpointError, PreflightError, OODError, ProvenanceError, PredictError)


def main(argv: list[str] | None = None) -> int:
    """`wsi-ncmi evaluate ...`; returns 0 on success, 2 on a user error (message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        return _evaluate(args)
    except _user_errors() as err:
        from wsi_ncmi.commands.errors import one_line

        _echo(f"wsi-ncmi evaluate: error: {one_line(err)}", err=True)
        return 2


def main_report(argv: list[str] | None = None) -> int:
    """`wsi-ncmi report RUNS... --out DIR`; returns 0 on success, 2 on a user error."""
    from wsi_ncmi.evaluation.report import ReportError, aggregate_reports

    args = build_report_parser().parse_args(argv)
    try:
        summary = aggregate_reports(args.runs, args.out)
    except ReportError as err:
        _echo(f"wsi-ncmi report: error: {err}", err=True)
        return 2
    _echo((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    n = sum(g["n_runs"] for g in summary["groups"])
    _echo(f"{n} runs in {len(summary['groups'])} groups → {Path(args.out) / 'summary.json'}")
    return 0
