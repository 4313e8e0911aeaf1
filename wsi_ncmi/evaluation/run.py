"""Evaluate a loaded MIL checkpoint: the workflow behind `wsi-ncmi evaluate` (and the demo's evaluate stage).

:func:`evaluate_module` takes a ``MILModule`` already loaded (``wsi_ncmi.training.checkpoint.load_mil_module``)
and the datamodule of the evaluated split (``wsi_ncmi.training.checkpoint.checkpoint_datamodule``, which runs the
pre-flight check of ``fit``): evaluation may not import training, so the caller loads and passes them down. It
embeds the train / val / test splits once with the frozen aggregator, then runs every protocol that applies
(``lp`` always; ``cc`` for NCMI runs; ``head`` for runs trained with a head) and writes, into ``out``:

* one seed (the default): ``report.json``, ``report.md``, ``predictions.csv`` and the figures (``roc_*``,
  ``confusion_*``, ``training_curves.png``, ``embedding_pca.png``) directly in ``out``;
* several seeds: one folder ``out/seed<k>/`` per seed with its own report and ROC / confusion figures, and the
  seed-independent figures in ``out``. These seeds are the linear probe's ``random_state`` (``probe_seed`` in the
  report); with the default lbfgs solver the probe is deterministic, so LP numbers only change with ``saga``.
  The report's ``seed`` is the training seed stored in the checkpoint (or, for checkpoints without one,
  ``seed_everything`` of the run folder's ``config.yaml``; else the probe seed);
* ``embeddings.npz`` (slide ids, labels, embeddings, LP inputs and NCMI log-probs per split; no pickles);
* ``calibration.json`` (OOD thresholds, a conformal quantile at ``false_alarm``, :mod:`.ood_threshold`) and the
  report's ``ood`` block (the flag on the test split; with ``ood_bags``, each score's AUROC);
* next to each ``report.json``: ``classifier.npz`` / ``classifier.json`` (the fitted LP and CC as plain arrays,
  the report's primary protocol and a temperature per classifier fitted on val, :mod:`.classifier_io`,
  :mod:`.calibration`), the report's ``calibration`` block, ``reliability.png`` and ``cal_prob_<class>``
  columns in ``predictions.csv``; the run folder's ``evaluations.json`` records where they are, for
  ``wsi-ncmi predict``.
* ``report.html`` last (:mod:`.html_report`): everything above on one self-contained page. The report's
  ``provenance`` block (checkpoint SHA-256, bags folder, the training bags' encoder record, config.yaml) is
  what the page shows of where the numbers come from.

Everything is written into a new sibling folder ``.<out>.<random>.partial`` that replaces ``out`` only once complete
(:func:`wsi_ncmi.data.atomic.staged_folder`): an evaluation that fails, is interrupted or killed leaves an earlier
report in ``out`` intact (a killed one also leaves its ``.partial`` folder, safe to delete). Because ``out`` is
replaced as a whole, an existing ``out`` that holds anything but an earlier evaluation is refused.

Lines meant for the user (the calibration, each seed's summary table) go to ``echo`` (the command prints them).
Errors the user can fix are :class:`EvaluateError`, whose message names the option as its command-line flag.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ncmi.data.atomic import atomic_output, staged_folder
from wsi_ncmi.data.official import detect_dataset
from wsi_ncmi.data.provenance import CHECKPOINT_KEY
from wsi_ncmi.data.weights import check_device
from wsi_ncmi.errors import UserError

from .calibration import (
    RELIABILITY_PNG,
    apply_temperature,
    calibration_block,
    fit_temperature,
    plot_reliability,
    protocol_probabilities,
)
from .classifier_io import SavedClassifier, record_evaluation
from .embed import embed_splits
from .ood import CALIBRATION_JSON, evaluate_ood, sha256_of
from .ood_threshold import DEFAULT_FALSE_ALARM, evaluate_rule
from .paper import paper_for_protocol
from .predict import check_bag_files, check_bags, embed_bags, select_bags
from .probe import DEFAULT_CS
from .protocols import evaluate_run
from .report import write_report
from .report_schema import SPLITS, json_safe

__all__ = ["EvaluateError", "EvaluateOptions", "evaluate_checkpoint", "evaluate_module", "find_metrics_csv", "fit_classifier", "run_dir",
           "run_provenance", "save_embeddings", "summary_lines", "training_seed"]

logger = logging.getLogger(__name__)


class EvaluateError(UserError):
    """An option of the evaluation is wrong (the message names it as its `wsi-ncmi evaluate` flag)."""


@dataclass
class EvaluateOptions:
    """How to evaluate (the `wsi-ncmi evaluate` flags after ``--ckpt`` / ``--data.*`` / ``--out``)."""

    seeds: tuple[int, ...] = (0,)  # linear-probe seeds
    class_weight: str | None = None  # None | "balanced"
    refit: str = "train"  # "train" | "train+val"
    Cs: tuple[float, ...] = DEFAULT_CS
    solver: str = "lbfgs"
    lp_input: str = "auto"  # "auto" | "normalized" | "raw" (evaluation.protocols.LP_INPUTS)
    device: str = "cpu"
    dataset: str = "auto"  # "auto": detected from the split CSV path
    metrics_csv: Path | None = None  # None: searched under the checkpoint's run folder
    plots: bool = True
    allow_patient_leak: bool = False  # recorded in the report
    ood_bags: str | None = None  # folder of out-of-distribution bags
    false_alarm: float = DEFAULT_FALSE_ALARM  # target false-alarm rate of the OOD flag (evaluation.ood_threshold)

    def check(self) -> None:
        """Raise :class:`EvaluateError` for a device that is not there or repeated seeds."""
        try:
            check_device(self.device)
        except ValueError as e:
            raise EvaluateError(str(e)) from None
        if not 0 < self.false_alarm < 1:
            raise EvaluateError(f"--ood-false-alarm {self.false_alarm}: must be in (0, 1)")
        if len(set(self.seeds)) != len(self.seeds):
            raise EvaluateError(f"--seeds {list(self.seeds)}: seeds must be distinct")


def run_dir(ckpt: Path) -> Path:
    """The run folder of checkpoint ``ckpt`` (``<run>/checkpoints/x.ckpt`` -> ``<run>``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def training_seed(state: Mapping[str, Any], ckpt: Path) -> int | None:
    """The seed checkpoint ``ckpt`` (read as ``state``) was trained with: stored by ``MILModule``, else the
    run's ``config.yaml``."""
    import yaml

    seed = state.get("training_seed")
    if isinstance(seed, int):
        return seed
    config = run_dir(ckpt) / "config.yaml"
    if config.is_file():
        try:
            value = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
        except (yaml.YAMLError, AttributeError) as err:
            logger.warning("%s: cannot read seed_everything (%s)", config, err)
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def find_metrics_csv(ckpt: Path) -> Path | None:
    """The training ``metrics.csv`` of ``ckpt``'s run folder (else the newest one below it), or None."""
    folder = run_dir(ckpt)
    top = folder / "metrics.csv"  # the training log (validate/test runs log into sub-folders)
    if top.is_file():
        return top
    hits = sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None


def run_provenance(state: Mapping[str, Any], ckpt: Path, bags_dir: str | Path) -> dict[str, Any]:
    """The report's ``provenance``: checkpoint SHA-256, bags folder, the training bags' record (encoder, weights,
    mpp, ...; :mod:`wsi_ncmi.data.provenance`) and the run's ``config.yaml`` when there is one."""
    recorded = state.get(CHECKPOINT_KEY)
    config = run_dir(ckpt) / "config.yaml"
    return {"checkpoint_sha256": sha256_of(ckpt), "bags_dir": str(bags_dir),
            "training_bags": dict(recorded.get("values") or {}) if isinstance(recorded, Mapping) else None,
            "config": str(config) if config.is_file() else None}


def save_embeddings(path: Path, splits: Mapping[str, Any]) -> None:
    """``embeddings.npz`` of embedded ``splits`` (plain arrays, atomic)."""
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


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A report's metrics as a text table, with the paper's test numbers where they apply."""
    lines = [f"{'protocol':<8} {'split':<5} {'macro-F1':>8} {'macro-AUC':>9} {'acc':>6}   paper F1 / AUC (test)"]
    for proto, per_split in report["metrics"].items():
        for split, m in per_split.items():
            paper = paper_for_protocol(report["dataset"], report["model"], report["objective"], proto,
                                       report.get("num_classes")) if split == "test" else None
            ref = f"{paper['macro_f1']:.3f} / {paper['macro_auc']:.3f}" if paper else ""
            auc = "n/a" if m["macro_auc"] is None else f"{m['macro_auc']:.3f}"
            lines.append(f"{proto:<8} {split:<5} {m['macro_f1']:>8.3f} {auc:>9} {m['accuracy']:>6.3f}   {ref}")
    return lines


#: what marks a folder as an earlier `wsi-ncmi evaluate` output (which may be replaced as a whole)
_EVALUATE_OUTPUTS = ("report.json", "embeddings.npz", CALIBRATION_JSON)


def check_out_folder(out: str | Path) -> Path:
    """``out`` may receive an evaluation: it does not exist, is empty, or holds an earlier evaluation (it is
    replaced as a whole, so a folder with other files, e.g. a run folder with its checkpoints, is refused)."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not (any((out / n).is_file() for n in _EVALUATE_OUTPUTS)
                                                     or any(out.glob("seed*/report.json"))):
        raise EvaluateError(f"--out {out}: the folder exists and holds no earlier evaluation (no report.json); "
                            "evaluate replaces --out as a whole, so give a new or empty folder")
    return out


def _ood_calibration(module: Any, splits: Mapping[str, Any], state: Mapping[str, Any], num_classes: int,
                     class_names: list[str], ckpt: Path, out: Path, extra: dict[str, Any], options: EvaluateOptions,
                     echo: Callable[[str], None], shown: Path) -> None:
    """``calibration.json`` (OOD thresholds: :mod:`.ood_threshold`) and ``extra["ood"]`` (the flag rule on test; with
    ``ood_bags``, also the AUROC of every score); ``out`` is the staged folder that becomes ``shown``."""
    ood = None
    if options.ood_bags:
        bags = select_bags(options.ood_bags)
        check_bags(bags, state, str(ckpt), allow_mismatch=CHECKPOINT_KEY not in state)
        check_bag_files(bags, module.model.in_dim)
        ood = embed_bags(module.model, bags, ncmi_loss=module.ncmi_loss, device=options.device)
    calibration, block = evaluate_ood(splits, module.ncmi_loss, num_classes, class_names, ckpt, ood,
                                      str(options.ood_bags or ""))
    rule = evaluate_rule(calibration, splits, module.ncmi_loss, num_classes, ood, options.false_alarm)
    calibration.write(out / CALIBRATION_JSON)
    extra["ood"] = {**(block or {}), **rule}
    echo(f"OOD flag: {rule['score']} > {rule['threshold']:.4g} ({calibration.rule}, false alarms ≤ "
         f"{options.false_alarm:g}; {len(rule['flagged_test'])} of {len(splits['test'])} test slides flagged"
         + (f", {len(rule['flagged_ood'])} of {len(ood)} OOD bags" if ood is not None else "")
         + f") → {shown / CALIBRATION_JSON}")
    if block is not None:
        echo("OOD vs test: " + ", ".join(f"{k} AUROC {v['auroc']:.3f}" for k, v in block["scores"].items()))


def fit_classifier(module: Any, splits: Mapping[str, Any], report: dict[str, Any], preds: Any,
                   fitted: Mapping[str, Mapping[str, np.ndarray]], checkpoint_sha256: str,
                   seed_dir: Path | None = None) -> tuple[SavedClassifier, Any]:
    """Temperatures of every classifier fitted on val, ``report["calibration"]`` (the primary protocol), the
    ``cal_prob_<class>`` columns of ``preds`` and the :class:`SavedClassifier`; with ``seed_dir``, the
    reliability diagram there. Returns the classifier and the extended predictions table."""
    names = list(report["class_names"])
    temps = {}
    for proto in report["metrics"]:
        temps[proto] = fit_temperature(*protocol_probabilities(preds, proto, "val", names))
    nl = module.ncmi_loss
    lp_center = None
    if nl is not None:
        lp_center = nl.center.center.detach().cpu().double().numpy() if nl.use_centering else None
    elif "lp" in fitted:
        lp_center = splits["train"].embeddings.astype(np.float64).mean(axis=0)  # [E], as embed_splits
    lp_info = report.get("protocol_info", {}).get("lp", {})
    saved = SavedClassifier.from_fit(fitted, module.objective, names, int(module.model.embed_dim), lp_center,
                                     lp_info.get("kept_input"), temps, checkpoint_sha256)
    if nl is not None:
        temps["xi"] = saved.temperatures["xi"] = fit_temperature(saved.proba("xi", splits["val"], nl),
                                                                 splits["val"].labels)
    cols = [f"prob_{n}" for n in names]
    cal = np.zeros((len(preds), len(names)))  # [rows, C]
    for proto in report["metrics"]:
        rows = (preds["protocol"] == proto).to_numpy()
        cal[rows] = apply_temperature(preds.loc[rows, cols].to_numpy(dtype=np.float64), temps[proto])
    preds = preds.assign(**{f"cal_prob_{n}": cal[:, i] for i, n in enumerate(names)})
    primary = saved.primary if saved.primary in report["metrics"] else "lp"
    png = RELIABILITY_PNG if seed_dir is not None else None
    val, test = (protocol_probabilities(preds, primary, s, names) for s in ("val", "test"))
    report["calibration"] = json_safe(calibration_block(primary, temps[primary], val, test, png,
                                                        {k: v for k, v in temps.items() if k != primary}))
    if seed_dir is not None:
        plot_reliability(seed_dir / RELIABILITY_PNG, *test, temps[primary], title=f"{primary}, test split")
    return saved, preds


def evaluate_module(module: Any, state: Mapping[str, Any], datamodule: Any, ckpt: str | Path, out: str | Path,
                    options: EvaluateOptions | None = None,
                    echo: Callable[[str], None] | None = None) -> dict[int, Path]:
    """Evaluate the loaded ``module`` (a ``MILModule``: ``.model``, ``.ncmi_loss``, ``.objective``, ``.hparams``)
    of checkpoint ``ckpt`` (read as ``state``) on ``datamodule``'s splits; write everything into ``out`` (see the
    module docstring). Returns ``{probe seed: folder of its report.json}``."""
    options = options or EvaluateOptions()
    say = echo or (lambda _line: None)
    ckpt, out = Path(ckpt), check_out_folder(out)
    dm = datamodule
    if dm.in_dim != module.model.in_dim:
        raise EvaluateError(
            f"--data.bags_dir {dm.bags_dir}: bags have D={dm.in_dim}, the checkpoint's model expects {module.model.in_dim}"
        )
    dataset = detect_dataset(dm.split_csv) if options.dataset == "auto" else options.dataset.lower()
    loaders = {s: dm.dataloader(s, shuffle=False) for s in SPLITS}
    splits = embed_splits(module.model, loaders, device=options.device, ncmi_loss=module.ncmi_loss)
    lines: list[str] = []  # said once the folder is in place
    with staged_folder(out) as stage:
        written = _write_outputs(module, state, dm, splits, ckpt, stage, out, dataset, options, lines.append)
    for line in lines:
        say(line)
    final = {seed: out / folder.relative_to(stage) for seed, folder in written.items()}
    record_evaluation(ckpt, sha256_of(ckpt), out, final[options.seeds[0]])  # for `wsi-ncmi predict`
    return final


def _write_outputs(module: Any, state: Mapping[str, Any], dm: Any, splits: Mapping[str, Any], ckpt: Path, out: Path,
                   shown: Path, dataset: str, options: EvaluateOptions,
                   say: Callable[[str], None]) -> dict[int, Path]:
    """Everything of :func:`evaluate_module` after the embedding, written into ``out`` (the staged folder that
    becomes ``shown``)."""
    hp = dict(module.hparams)
    num_classes = int(hp["num_classes"])
    save_embeddings(out / "embeddings.npz", splits)
    extra: dict[str, Any] = {"checkpoint": str(ckpt), "loss": hp.get("loss") if module.objective == "head" else "ncmi",
                             "allow_patient_leak": bool(options.allow_patient_leak),
                             "patient_leaks": list(getattr(dm, "patient_leaks", [])),
                             "provenance": run_provenance(state, ckpt, dm.bags_dir)}
    if module.ncmi_loss is not None:
        nl = module.ncmi_loss
        extra.update(centroid_update=nl.centroid_update, tau=nl.tau, ncmi_variant=nl.variant)
    metrics_csv = Path(options.metrics_csv) if options.metrics_csv else find_metrics_csv(ckpt)
    if options.metrics_csv and not metrics_csv.is_file():
        raise EvaluateError(f"--metrics-csv {metrics_csv}: no such file")

    _ood_calibration(module, splits, state, num_classes, dm.class_names, ckpt, out, extra, options, say, shown)

    train_seed = training_seed(state, ckpt)
    multi = len(options.seeds) > 1
    written: dict[int, Path] = {}
    digest = sha256_of(ckpt)
    for seed in options.seeds:
        fitted: dict[str, dict[str, np.ndarray]] = {}
        report, preds = evaluate_run(
            splits, num_classes, dataset=dataset, split_csv=str(dm.split_csv), model=str(hp["model"]),
            objective=module.objective, seed=seed, train_seed=train_seed, class_names=dm.class_names,
            class_weight=options.class_weight, Cs=tuple(options.Cs), refit=options.refit, extra=extra,
            solver=options.solver, lp_input=options.lp_input, fitted=fitted,
        )
        seed_dir = out / f"seed{seed}" if multi else out
        saved, preds = fit_classifier(module, splits, report, preds, fitted, digest,
                                      seed_dir if options.plots else None)
        saved.write(seed_dir)
        write_report(seed_dir, report, preds)
        if options.plots:
            from .plots import write_report_plots

            write_report_plots(seed_dir, report, preds)
        say(f"\n{dataset} / {hp['model']} / {module.objective} — seed {seed} → "
            f"{shown / seed_dir.relative_to(out) / 'report.json'}")
        say("\n".join(summary_lines(report)))
        written[seed] = seed_dir
    if options.plots:
        from .plots import write_run_plots

        emb = {k: (s.normalized, s.labels) for k, s in splits.items()}
        write_run_plots(out, dm.class_names, metrics_csv=metrics_csv, embeddings=emb)
    from .html_report import write_html_report

    say(f"report page → {shown / write_html_report(out).relative_to(out)}")
    return written


def evaluate_checkpoint(ckpt: str | Path, out: str | Path, options: EvaluateOptions | None = None, *,
                        bags_dir: str | Path | None = None, split_csv: str | Path | None = None,
                        fold: int | None = None, num_workers: int = 0,
                        echo: Callable[[str], None] | None = None) -> dict[int, Path]:
    """Evaluate the ``wsi-ncmi fit`` checkpoint ``ckpt`` into ``out`` in one call (what ``wsi-ncmi evaluate``, the
    demo and ``bench/mil_benchmark.py`` do): check the paths, load the module as data
    (:func:`wsi_ncmi.training.checkpoint.load_mil_module`), rebuild its datamodule (the recorded bags folder and
    split table unless given) and run :func:`evaluate_module`. Returns ``{probe seed: folder of its report.json}``.
    Raises a :class:`~wsi_ncmi.errors.UserError` (one line naming the file) for a bad checkpoint, split or bag."""
    from wsi_ncmi.data.outputs import check_output_dir
    from wsi_ncmi.training.checkpoint import checkpoint_datamodule, load_mil_module

    options = options or EvaluateOptions()
    options.check()
    ckpt = Path(ckpt)
    if ckpt.is_dir():
        raise EvaluateError(f"--ckpt {ckpt}: is a folder; give the checkpoint file (e.g. {ckpt / 'best.ckpt'})")
    if not ckpt.is_file():
        raise EvaluateError(f"--ckpt {ckpt}: no such file")
    check_out_folder(check_output_dir(out, "--out"))  # before any work: a file, read-only, a foreign folder
    module, state = load_mil_module(ckpt, options.device)
    dm = checkpoint_datamodule(module, state, bags_dir=bags_dir, split_csv=split_csv, fold=fold,
                               num_workers=num_workers, allow_patient_leak=options.allow_patient_leak)
    return evaluate_module(module, state, dm, ckpt, out, options, echo=echo)

