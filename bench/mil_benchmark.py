"""CE vs NCMI on task families of witness-instance MIL (issues #13, #23).

    python bench/mil_benchmark.py --families c17 --models abmil --seeds 0 1 --draws 0     # a first look
    python bench/mil_benchmark.py --out bench/results/mil_benchmark_table.md   # the default: ~25 min on 2 cores
    python bench/mil_benchmark.py --held-out --out bench/results/mil_heldout.md         # ONCE, recipe frozen
    python bench/mil_benchmark.py --full ...                                            # paper-scale (GPU)
    python bench/mil_benchmark.py --families texture4 --draws 1 --objectives ncmi --ncmi-set model.centroid_lr=1.0
                                                                  # a tuning candidate (refused with --held-out)

Families (``bench/families/``): ``texture2``, ``texture4``, ``digits4`` (the original tasks), the witness grid
``witness_*`` (width 256-1,536, share 0.3-5 %, 2-7 classes, CAMELYON-17 balance), ``c17`` (the CAMELYON-17-shaped
cohort of ``splits/``: protocols ``official``, ``loco0`` … ``loco4``) and ``bracs`` (``7class``, ``3class``).
Name a protocol as ``family:protocol`` (default: the family's first). Every family is generated per *draw*
(seed from family name and draw): recipes are tuned on the tuning draws 0-4; the held-out draws
100-104 run only with ``--held-out``, which refuses to start while ``configs/mil``, the NCMI / training code or
the families have uncommitted changes and records the commit of the frozen recipe in the results.

Every run is the product's own path, in-process: ``wsi-ncmi fit`` with the shipped leaf configs
(``configs/mil/camelyon17/<aggregator>_{ce,ncmi}.yaml``; only the epoch count, the seed, the class count and the
data paths are overridden), bags served from the RAM cache, then ``wsi-ncmi evaluate`` on the best checkpoint
(val macro-F1 + macro-AUC): test macro-F1 / macro-AUC of the CE head, of the linear probe on the frozen CE
embedding (CE-LP), of the linear probe on the NCMI embedding (NCMI-LP; both probes with evaluate's default
``--lp-input auto``) and of the nearest-centroid protocol (NCMI-CC). A control, "CE head @ NCMI lr" (objective
``ce_lr``), trains the CE leaf with the NCMI leaf's learning rate and warm-up. Each cell: mean ± sample std and a
95 % Student-t interval of the mean over all its runs (seeds × draws pooled). ``--jobs`` runs that many trainings
in parallel processes, one thread each.

The default run is sized for 2 CPU cores (~25 min, printed at start from ``CPU_RUN_S``): every family at its CPU
size (``cpu_scale``, ``epochs``, ``cpu_bags`` / ``cpu_slides``: a stratified subset keeping the split shape and
label shares), ABMIL, CE, CE @ NCMI lr and NCMI, seeds 0 1, tuning draw 0 (``DEFAULT_GRID``). ``--full`` is paper scale and the
issue's grid (abmil aem asmil × every objective × seeds 0-4 × draws 0-4) for whatever is not named.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from families import FAMILIES, TUNING_DRAWS, Family, parse_task  # noqa: E402
from families.guard import HeldOutError, choose_draws, frozen_recipe  # noqa: E402
from families.stats import fmt, summary  # noqa: E402
from families.subset import subset_split  # noqa: E402

CONFIGS = ROOT / "configs" / "mil"
# "ce_lr": the control — the CE leaf config trained with the NCMI leaf's learning rate and warm-up, so that a gap
# between CE and NCMI is not just the NCMI recipe's higher learning rate
OBJECTIVES = ("ce", "ce_lr", "ncmi")
PROTOCOLS = [("ce", "head", "CE head"), ("ce", "lp", "CE-LP"), ("ce_lr", "head", "CE head @ NCMI lr"),
             ("ncmi", "lp", "NCMI-LP"), ("ncmi", "cc", "NCMI-CC")]
LR_KEYS = ("lr", "warmup_epochs")
# CPU-seconds (time.process_time, one thread) of one ABMIL CE run — fit + evaluate — per family at its CPU defaults
# (epochs, scale, cpu_bags / cpu_slides), tuning draw 0, measured `nice -n 10` on the shared 2-core machine
# (bench/results/mil_families.md; bracs: its default protocol 7class). NCMI runs cost ~1.1× a CE run (NCMI_COST,
# measured on c17 / bracs / witness_skew in the first pass); AEM / ASMIL are taken as ABMIL's (ASMIL is ~1.5×).
CPU_RUN_S: dict[str, float] = {"texture2": 23, "texture4": 36, "digits4": 39, "witness_w1536": 57,
                                "witness_share03": 77, "witness_c2": 23, "witness_c7": 38, "witness_skew": 73,
                                "c17": 47, "bracs": 77}
NCMI_COST = 1.1
# The families' CPU epochs (``Family.epochs``) were sized for ABMIL. At those epochs the AEM and ASMIL CE heads
# mostly stayed at the majority class (held-out draw 102, bench/results/mil_heldout_d102.md). The default CPU run
# multiplies a family's epochs by this factor per aggregator, for every objective alike (CE, the control and NCMI);
# --epochs and --full set the epochs outright. Chosen on tuning draw 1, validation only, CE runs only (so the choice
# cannot favour NCMI): the smallest factor at which the CE head leaves the majority class on both seeds of every
# tuned family (texture2, texture4, witness_c2, c17:official): AEM 2; ASMIL none up to 3 (its CE head still stays
# at the majority class on one seed of texture2 and of witness_c2 at 3×), so 3, the most the CPU run affords
# (docs/ncmi_mil.md, "Epochs per aggregator").
EPOCH_FACTOR: dict[str, int] = {"abmil": 1, "transmil": 1, "aem": 2, "asmil": 3}
# NCMI runs train ceil(NCMI_EPOCH_RATIO × the CE runs' epochs) (the shipped recipe: 1, the same epochs);
# --ncmi-epoch-ratio tries another ratio on tuning draws (docs/ncmi_mil.md, "Tuning round 5")
NCMI_EPOCH_RATIO = 1.0
# CPU cost of a run relative to ABMIL's at the same epochs: texture2, CE, 10 epochs, one thread, user CPU-s of fit +
# evaluate 24.6 (ABMIL) / 33.1 (AEM) / 45.7 (ASMIL; its EMA anchor and two attention stages), measured 2026-12-07
MODEL_COST: dict[str, float] = {"abmil": 1.0, "transmil": 1.0, "aem": 1.3, "asmil": 1.8}
DEFAULT_GRID = {"models": ["abmil"], "objectives": ["ce", "ce_lr", "ncmi"], "seeds": [0, 1], "draws": [0]}


def cpu_epochs(family: Family, model: str) -> int:
    """Epochs of ``model`` on ``family`` in the default CPU run: the family's epochs × the aggregator's factor."""
    return family.epochs * EPOCH_FACTOR.get(model, 1)


def ncmi_epochs(epochs: int, ratio: float) -> int:
    """An NCMI run's epochs when the CE runs of its aggregator and family train ``epochs``: ceil(ratio × epochs)."""
    return max(1, math.ceil(round(ratio * epochs, 6)))


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "wsi_ncmi", "preprocessing"):
        logging.getLogger(name).setLevel(logging.ERROR)


def ncmi_lr_args(model: str) -> list[str]:
    """``--model.lr`` / ``--model.warmup_epochs`` of the shipped NCMI leaf of ``model`` (the ``ce_lr`` control)."""
    from wsi_ncmi.training.compose import compose_config

    m = compose_config(CONFIGS / "camelyon17" / f"{model}_ncmi.yaml")["model"]
    return [arg for key in LR_KEYS for arg in (f"--model.{key}", str(m[key]))]


def ce_lr_is_ce(model: str) -> bool:
    """True when the shipped CE and NCMI leaves of ``model`` share learning rate and warm-up: the ``ce_lr``
    control would then train the CE leaf again with the same arguments, so it is not run but reported as the
    CE head's runs."""
    from wsi_ncmi.training.compose import compose_config

    ce = compose_config(CONFIGS / "camelyon17" / f"{model}_ce.yaml")["model"]
    ncmi = compose_config(CONFIGS / "camelyon17" / f"{model}_ncmi.yaml")["model"]
    return all(ce.get(key) == ncmi.get(key) for key in LR_KEYS)


def _run_key(job: dict) -> tuple:
    """A run's identity apart from its objective (jobs and results carry the same keys)."""
    return job["task"], job["draw"], job["model"], job["seed"]


def split_duplicate_controls(jobs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(jobs to run, ``ce_lr`` jobs whose run would repeat a ``ce`` job of the list: :func:`ce_lr_is_ce`)."""
    ce_runs = {_run_key(j) for j in jobs if j["objective"] == "ce"}
    same = {m: ce_lr_is_ce(m) for m in {j["model"] for j in jobs if j["objective"] == "ce_lr"}}
    run, dupes = [], []
    for j in jobs:
        dupe = j["objective"] == "ce_lr" and same[j["model"]] and _run_key(j) in ce_runs
        (dupes if dupe else run).append(j)
    return run, dupes


def copy_controls(results: list[dict], dupes: list[dict]) -> list[dict]:
    """The ``ce`` result of each duplicate ``ce_lr`` job, relabelled ``ce_lr`` (marked ``"same_as": "ce"``)."""
    by_key = {_run_key(r): r for r in results if r["objective"] == "ce"}
    return [{**by_key[_run_key(j)], "objective": "ce_lr", "same_as": "ce"} for j in dupes]


def shipped_fit_args(model: str, objective: str, bags: str, split: str, classes: int, epochs: int,
                     root: str | Path) -> list[str]:
    """`wsi-ncmi fit` arguments: the shipped leaf config ``configs/mil/camelyon17/<model>_<objective>.yaml``
    (base + model + objective + that leaf's own keys), only data, epochs and run folder overridden (shared with
    ``bench/training.py --fit``); ``ce_lr`` is the CE leaf with the NCMI leaf's learning rate and warm-up."""
    if objective == "ce_lr":
        return shipped_fit_args(model, "ce", bags, split, classes, epochs, root) + ncmi_lr_args(model)
    return ["-c", str(CONFIGS / "camelyon17" / f"{model}_{objective}.yaml"),
            "--data.bags_dir", bags, "--data.split_csv", split,
            "--data.num_classes", str(classes), "--trainer.max_epochs", str(epochs),
            "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false"]


def run_one(job: dict) -> dict:
    """Fit one aggregator × objective × seed on one draw through `wsi-ncmi fit`, evaluate it; return test metrics."""
    import torch

    _quiet()
    torch.set_num_threads(job["threads"])
    from wsi_ncmi.evaluation.run import EvaluateOptions, evaluate_checkpoint
    from wsi_ncmi.training.cli import run_cli

    run = Path(job["run_dir"])
    args = shipped_fit_args(job["model"], job["objective"], job["bags"], job["split"], job["classes"],
                            job["epochs"], run)
    args += job["fit_extra"] + ["--data.cache", "ram", "--seed_everything", str(job["seed"]),
                                "--trainer.enable_progress_bar", "false"]
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_cli("fit", args)
        fit_s = time.perf_counter() - t0
        evaluate_checkpoint(run / "checkpoints" / "best.ckpt", run / "eval",
                            EvaluateOptions(dataset=job["task"].replace(":", "-"), plots=False))
    report = json.loads((run / "eval" / "report.json").read_text())
    metrics = {proto: {k: report["metrics"][proto]["test"][k] for k in ("macro_f1", "macro_auc")}
               for proto in report["metrics"]}
    lp = report["protocol_info"]["lp"]
    return {**{k: job[k] for k in ("task", "draw", "model", "objective", "seed")}, "metrics": metrics,
            "fit_s": fit_s, "total_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "lp_input": lp["kept_input"], "lp_input_val_scores": lp["input_val_scores"],
            "calibration": report.get("calibration")}


def _cell(results: list[dict], task: str, model: str, objective: str, proto: str, key: str) -> list[float]:
    """Every run's test ``key`` of one table cell (seeds × draws pooled); AUC may be None (one class in test)."""
    return [r["metrics"][proto][key] for r in results
            if (r["task"], r["model"], r["objective"]) == (task, model, objective) and proto in r["metrics"]
            and r["metrics"][proto][key] is not None]


def table(results: list[dict], tasks: list[str], models: list[str]) -> list[str]:
    lines = ["| task | aggregator | protocol | test macro-F1 | test macro-AUC | runs |", "|---|---|---|---|---|---|"]
    for task in tasks:
        for model in models:
            for objective, proto, label in PROTOCOLS:
                f1 = _cell(results, task, model, objective, proto, "macro_f1")
                auc = _cell(results, task, model, objective, proto, "macro_auc")
                lines.append(f"| {task} | {model} | {label} | {fmt(f1)} | {fmt(auc)} | {len(f1)} |")
    return lines


def calibration(results: list[dict], tasks: list[str], models: list[str]) -> list[str]:
    """Test calibration of each run's primary classifier (NCMI: LP, CE: head) before / after the temperature
    `wsi-ncmi evaluate` fits on val (issue #27)."""
    lines = ["Calibration of the primary classifier on test (temperature fitted on val; mean ± std over seeds):", "",
             "| task | aggregator | run | classifier | T per seed | ECE before | ECE after | mean max-p (correct) before "
             "| mean max-p (correct) after | Brier before | Brier after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for model in models:
            for objective in OBJECTIVES:
                rows = [r["calibration"] for r in results if (r["task"], r["model"], r["objective"]) ==
                        (task, model, objective) and r.get("calibration")]
                if not rows:
                    continue

                def col(when: str, key: str, rows: list[dict] = rows) -> str:
                    return fmt([c["test"][when][key] for c in rows if c["test"][when][key] is not None])

                temps = ", ".join(f"{c['temperature']:.3g}" for c in rows)  # per seed: T spans decades
                lines.append(f"| {task} | {model} | {objective} | {rows[0]['classifier']} | "
                             f"{temps} | {col('before', 'ece')} | {col('after', 'ece')} "
                             f"| {col('before', 'mean_max_prob_correct')} | {col('after', 'mean_max_prob_correct')} "
                             f"| {col('before', 'brier')} | {col('after', 'brier')} |")
    return lines


def lp_inputs(results: list[dict], tasks: list[str], models: list[str]) -> list[str]:
    """Which LP input `evaluate --lp-input auto` kept on validation, per task × aggregator × objective."""
    out = []
    for task in tasks:
        for model in models:
            for objective in OBJECTIVES:
                kept = [r.get("lp_input", "?") for r in results
                        if (r["task"], r["model"], r["objective"]) == (task, model, objective)]
                if kept:
                    out.append(f"{task} / {model} / {objective}: " + ", ".join(kept))
    return ["LP input kept on validation per run (`--lp-input auto`): " + "; ".join(out) + "."] if out else []


def seed_sd(results: list[dict], task: str, model: str, objective: str, proto: str, key: str) -> float:
    """The seed spread of one cell: the sample std over seeds within each draw, averaged over draws (draw-to-draw
    differences are not seed noise); NaN with fewer than two seeds."""
    draws = sorted({r["draw"] for r in results if (r["task"], r["model"], r["objective"]) == (task, model, objective)})
    sds = []
    for d in draws:
        vals = _cell([r for r in results if r["draw"] == d], task, model, objective, proto, key)
        if len(vals) > 1:
            sds.append(summary(vals)["sd"])
    return float(sum(sds) / len(sds)) if sds else float("nan")


def verdict(results: list[dict], tasks: list[str], models: list[str], tol: float = 0.01) -> list[str]:
    """The acceptance rule of issue #23 per task × aggregator, in macro-F1 and macro-AUC: mean NCMI-LP ≥
    max(CE head shipped, CE head @ NCMI lr) − ``tol``, and NCMI-LP's seed std ≤ 2 × that CE's seed std + ``tol``
    (seed std: :func:`seed_sd`). Only the CE rows that ran are compared; ``PASS`` needs all four checks."""
    out = []
    for task in tasks:
        for model in models:
            checks, ok_all = [], True
            for key in ("macro_f1", "macro_auc"):
                nc = summary(_cell(results, task, model, "ncmi", "lp", key))
                ces = {obj: summary(_cell(results, task, model, obj, "head", key)) for obj in ("ce", "ce_lr")}
                ces = {obj: s for obj, s in ces.items() if s["n"]}
                if not nc["n"] or not ces:
                    ok_all = False
                    continue
                best = max(ces, key=lambda o: ces[o]["mean"])
                ok_mean = nc["mean"] >= ces[best]["mean"] - tol
                nc_sd = seed_sd(results, task, model, "ncmi", "lp", key)
                ce_sd = seed_sd(results, task, model, best, "head", key)
                ok_sd = not (nc_sd > 2 * ce_sd + tol)  # NaN (one seed) is not a failure of the spread
                ok_all &= ok_mean and ok_sd
                what = "CE" if best == "ce" else "CE @ NCMI lr"
                checks.append(f"{key}: NCMI-LP {nc['mean']:.3f} vs {what} {ces[best]['mean']:.3f} "
                              f"({'ok' if ok_mean else 'LOSES'} by {nc['mean'] - ces[best]['mean']:+.3f}), seed std "
                              f"{nc_sd:.3f} vs {ce_sd:.3f} ({'ok' if ok_sd else 'too noisy'})")
            if checks:
                out.append(f"- {task} / {model}: **{'PASS' if ok_all else 'FAIL'}** — " + "; ".join(checks))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", "--tasks", dest="tasks", nargs="+", default=list(FAMILIES),
                   help="families, each as FAMILY or FAMILY:PROTOCOL (default: every family, its first protocol)")
    p.add_argument("--draws", nargs="+", type=int, default=None,
                   help=f"draws of each family (default: {DEFAULT_GRID['draws']}; the tuning draws are "
                        f"{list(TUNING_DRAWS)}; held-out draws (>= 100) need --held-out)")
    p.add_argument("--held-out", action="store_true",
                   help="run the held-out draws (default 100-104) once, on a recipe frozen in a commit")
    p.add_argument("--models", nargs="+", default=None,
                   help=f"aggregators (default {DEFAULT_GRID['models']}; the issue's table: abmil aem asmil)")
    p.add_argument("--objectives", nargs="+", default=None, choices=list(OBJECTIVES),
                   help=f"default {DEFAULT_GRID['objectives']}; the issue's table: {' '.join(OBJECTIVES)}")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help=f"default {DEFAULT_GRID['seeds']}; the issue's table: 0 1 2 3 4")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: each family's own)")
    p.add_argument("--scale", type=float, default=None,
                   help="bag-size scale, 1.0 = full size (default: each family's CPU scale)")
    p.add_argument("--full", action="store_true",
                   help="paper scale: --scale 1, every bag / slide, each family's full epochs (50), and the "
                        "issue's grid (abmil aem asmil × every objective × seeds 0-4 × draws 0-4) unless named")
    p.add_argument("--bags", type=int, default=None,
                   help="bags per witness family, train/val/test = 60/20/20 %% (default: the family's cpu_bags; "
                        "c17 and bracs are fixed cohorts: use --slides)")
    p.add_argument("--slides", type=float, default=None,
                   help="share of each (split, label) stratum trained on, 0-1 (default: the family's cpu_slides; "
                        "1 = every slide)")
    p.add_argument("--ncmi-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a tuning candidate: append --KEY VALUE to every NCMI run's `wsi-ncmi fit` (the shipped leaf "
                        "otherwise), e.g. model.centroid_lr=1.0; repeatable; refused with --held-out, named in the "
                        "report")
    p.add_argument("--ncmi-epoch-ratio", type=float, default=None, metavar="R",
                   help=f"a tuning candidate: NCMI runs train ceil(R × the CE runs' epochs) (shipped: "
                        f"{NCMI_EPOCH_RATIO:g}); refused with --held-out, named in the report")
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes (one thread each)")
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "mil_benchmark"), help="bags and runs (ignored folder)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    try:
        args.ncmi_args = ncmi_overrides(args.ncmi_set)
    except ValueError as err:
        p.error(str(err))
    if args.held_out and args.ncmi_args:
        p.error("--ncmi-set is for tuning draws: a held-out run uses the frozen recipe as committed")
    if args.ncmi_epoch_ratio is not None and not 0 < args.ncmi_epoch_ratio <= 4:
        p.error(f"--ncmi-epoch-ratio wants a ratio in (0, 4], got {args.ncmi_epoch_ratio:g}")
    if args.held_out and args.ncmi_epoch_ratio is not None:
        p.error("--ncmi-epoch-ratio is for tuning draws: a held-out run uses the frozen recipe as committed")
    args.ncmi_ratio = NCMI_EPOCH_RATIO if args.ncmi_epoch_ratio is None else args.ncmi_epoch_ratio  # as run
    full = {"models": ["abmil", "aem", "asmil"], "objectives": list(OBJECTIVES), "seeds": [0, 1, 2, 3, 4],
            "draws": list(TUNING_DRAWS)}
    for key in DEFAULT_GRID:
        if getattr(args, key) is None and not (key == "draws" and args.held_out):
            setattr(args, key, (full if args.full else DEFAULT_GRID)[key])
    return args


def ncmi_overrides(pairs: list[str]) -> list[str]:
    """``["model.centroid_lr=1.0", ...]`` → ``["--model.centroid_lr", "1.0", ...]`` for the NCMI runs' fit."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or key.startswith("-") or not value:
            raise ValueError(f"--ncmi-set wants KEY=VALUE (e.g. model.centroid_lr=1.0), got {pair!r}")
        out += [f"--{key.strip()}", value]
    return out


def run_name(objective: str, extra: list[str]) -> str:
    """The objective's part of a run folder; runs with ``extra`` fit arguments (a tuning candidate) get a digest of
    them, so they never overwrite the shipped recipe's runs in the same ``--work``."""
    return f"{objective}-{hashlib.sha1(' '.join(extra).encode()).hexdigest()[:8]}" if extra else objective


def prepare(args: argparse.Namespace, tasks: list[tuple[str, str]], draws: list[int], work: Path) -> list[dict]:
    """Write (or reuse) every family × draw cohort; return one job per task × draw × model × seed × objective."""
    jobs = []
    extra = {o: args.ncmi_args if o == "ncmi" else [] for o in args.objectives}  # a candidate changes NCMI only
    ratio = args.ncmi_ratio
    tag = {o: extra[o] + ([f"epochs×{ratio:g}"] if o == "ncmi" and ratio != NCMI_EPOCH_RATIO else [])
           for o in args.objectives}
    names = {o: run_name(o, tag[o]) for o in args.objectives}
    for family, protocol in tasks:
        fam = FAMILIES[family]
        scale = args.scale if args.scale is not None else (1.0 if args.full else fam.cpu_scale)
        epochs = {m: args.epochs or (fam.full_epochs if args.full else cpu_epochs(fam, m)) for m in args.models}
        n_bags = None if fam.fixed_cohort else (args.bags or (None if args.full else fam.cpu_bags))
        slides = args.slides if args.slides is not None else (1.0 if args.full else fam.cpu_slides)
        for draw in draws:
            cohort = fam.make(draw, scale, out=work / "families", n_bags=n_bags)
            task = f"{family}:{protocol}"
            split = cohort.splits[protocol]
            if slides < 1.0:  # the same split shape and label shares on fewer slides
                from wsi_ncmi.data.splits import load_split, write_split

                split = work / "splits" / f"{family}-{protocol}_d{draw}_s{scale:g}_f{slides:g}.csv"
                split.parent.mkdir(parents=True, exist_ok=True)
                write_split(subset_split(load_split(cohort.splits[protocol]), slides, seed=draw), split)
            jobs += [{"task": task, "draw": draw, "model": m, "objective": o, "seed": s,
                      "epochs": ncmi_epochs(epochs[m], ratio) if o == "ncmi" else epochs[m],
                      "threads": 1, "bags": str(cohort.bags_dir), "split": str(split),
                      "classes": cohort.classes[protocol], "scale": scale, "slides": slides, "family": family,
                      "fit_extra": extra[o],
                      "run_dir": str(work / "runs" / f"{family}-{protocol}_d{draw}_{m}_{names[o]}_s{s}")}
                     for m in args.models for s in args.seeds for o in args.objectives]
    return jobs


def sizes_line(jobs: list[dict]) -> str:
    """Each task's size as run: epochs per aggregator, bag-size scale and slide share, e.g.
    ``texture2:default: 10 epochs (aem 30, asmil 30), scale 1``."""
    parts = []
    for task, scale, slides in sorted({(j["task"], j["scale"], j["slides"]) for j in jobs}):
        mine = [j for j in jobs if (j["task"], j["scale"], j["slides"]) == (task, scale, slides)]
        rest = [j for j in mine if j["objective"] != "ncmi"] or mine  # the CE runs' epochs where there are any
        per_model = {j["model"]: j["epochs"] for j in rest}
        ncmi = {j["model"]: j["epochs"] for j in mine if j["objective"] == "ncmi"}
        values = list(per_model.values())
        common = max(values, key=values.count)  # ties: the first aggregator's
        other = ", ".join(f"{m} {e}" for m, e in per_model.items() if e != common)
        apart = ", ".join(f"{m} {e}" for m, e in ncmi.items() if e != per_model[m])
        parts.append(f"{task}: {common} epochs" + (f" ({other})" if other else "")
                     + (f" (NCMI: {apart})" if apart else "") + f", scale {scale:g}"
                     + (f", {slides:g} of the slides" if slides < 1 else ""))
    return ", ".join(parts)


def expected_duration(jobs: list[dict], parallel: int) -> str:
    """One line: the run's expected CPU time from ``CPU_RUN_S`` (linear in epochs × scale × slide share away from
    a family's CPU defaults) and the wall time on ``parallel`` quiet cores."""
    total, unknown = 0.0, set()
    for j in jobs:
        if j["family"] not in CPU_RUN_S:
            unknown.add(j["family"])
            continue
        fam = FAMILIES[j["family"]]
        size = (j["epochs"] / fam.epochs) * (j["scale"] / fam.cpu_scale) * (j["slides"] / fam.cpu_slides)
        cost = (NCMI_COST if j["objective"] == "ncmi" else 1.0) * MODEL_COST.get(j.get("model", "abmil"), 1.0)
        total += CPU_RUN_S[j["family"]] * cost * size
    line = (f"mil_benchmark: {len(jobs)} runs, expected ~{total / 60:.0f} CPU-min ≈ {total / 60 / max(1, parallel):.0f}"
            f" min on {parallel} quiet cores (per-family cost table of ABMIL at the CPU defaults × MODEL_COST)")
    return line + (f"; no cost measured for {sorted(unknown)}" if unknown else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    try:
        tasks = [parse_task(t) for t in args.tasks]
        draws = choose_draws(args.draws, args.held_out)
        frozen = frozen_recipe(ROOT) if args.held_out else None
    except (ValueError, HeldOutError) as exc:
        print(f"mil_benchmark: {exc}", file=sys.stderr)
        return 2
    work = Path(args.work)
    t0 = time.perf_counter()
    jobs = prepare(args, tasks, draws, work)
    prep_s = time.perf_counter() - t0
    jobs, dupes = split_duplicate_controls(jobs)
    same = sorted({j["model"] for j in dupes})  # aggregators whose "CE head @ NCMI lr" is the CE head
    print(expected_duration(jobs, args.jobs), flush=True)
    if dupes:
        print(f"mil_benchmark: CE head @ NCMI lr of {same} = the CE head (same lr and warm-up): {len(dupes)} "
              "run(s) reported from the CE runs, not trained twice", flush=True)
    results = []
    with contextlib.ExitStack() as stack:
        runner = stack.enter_context(ProcessPoolExecutor(max_workers=args.jobs)).map if args.jobs > 1 else map
        for r in runner(run_one, jobs):
            results.append(r)
            print(f"  {r['task']} d{r['draw']} {r['model']} {r['objective']} seed {r['seed']}: "
                  f"{ {k: round(v['macro_auc'] or 0, 3) for k, v in r['metrics'].items()} } {r['total_s']:.0f}s",
                  flush=True)
    results += copy_controls(results, dupes)
    wall = time.perf_counter() - t0
    import torch

    names = [f"{f}:{p}" for f, p in tasks]
    kind = "HELD-OUT draws" if args.held_out else "tuning draws (not for reporting: held-out numbers only)"
    head = ["# MIL benchmark: CE vs NCMI on task families (`bench/mil_benchmark.py`)", "",
            f"{kind} {draws}; seeds {args.seeds}; " + sizes_line(jobs)
            + f". torch {torch.__version__}, {os.cpu_count()} CPUs, --jobs {args.jobs}; wall {wall / 60:.1f} min "
            f"(data {prep_s:.0f} s, trainings {sum(r['cpu_s'] for r in results) / 60:.1f} CPU-min).",
            "Cells: mean ± sample std [95 % Student-t interval of the mean] over seeds × draws.", ""]
    if args.ncmi_args:
        head[2:2] = [f"NCMI runs with `{' '.join(args.ncmi_args)}` appended to the shipped leaf (a tuning candidate, "
                     "not the shipped recipe).", ""]
    if args.ncmi_ratio != NCMI_EPOCH_RATIO:
        head[2:2] = [f"NCMI runs train ceil({args.ncmi_ratio:g} × the CE runs' epochs) (a tuning candidate; "
                     f"shipped: {NCMI_EPOCH_RATIO:g}).", ""]
    if frozen:
        head[2:2] = [f"Frozen recipe: commit {frozen['recipe_commit']} (last change under configs/mil, the NCMI / "
                     f"training code and the families); HEAD {frozen['head']}.", ""]
    note = ["", f"CE head @ NCMI lr of {', '.join(same)}: the CE head's runs (its shipped CE and NCMI leaves share lr "
                "and warm-up, so the control was not trained twice)."] if same else []
    lines = head + table(results, names, args.models) + note + ["", "Acceptance (issue #23: mean NCMI-LP ≥ max(CE head, CE head @ "
                                                           "NCMI lr) − 0.01 in macro-F1 and macro-AUC; NCMI-LP seed std "
                                                           "≤ 2 × that CE's + 0.01):", ""]
    lines += verdict(results, names, args.models)
    lines += [""] + lp_inputs(results, names, args.models)
    lines += [""] + calibration(results, names, args.models)
    text = "\n".join(lines) + "\n"
    print(text)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps({"frozen": frozen, "draws": draws, "ncmi_set": args.ncmi_args,
                                                   "ncmi_epoch_ratio": args.ncmi_epoch_ratio,
                                                   "results": results}, indent=1))
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
