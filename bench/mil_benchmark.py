"""CE vs NCMI on witness-instance MIL tasks that can tell the objectives apart (issue #13).

    python bench/mil_benchmark.py        # 3 tasks × {abmil, aem} × {CE, CE @ NCMI lr, NCMI} × 3 seeds, ~15-20 min
    python bench/mil_benchmark.py --jobs 2 --out bench/results/mil_benchmark.md
    python bench/mil_benchmark.py --tasks digits4 --models abmil --seeds 0 --epochs 2 --bags 40   # smoke

Tasks (``bench/mil_tasks.py``): real H&E textures encoded by the packaged MobileNetV2 with a 1-5 % tumour
share (2 and 4 classes), and a 4-class witness task on scikit-learn's real handwritten digits (1-4 %).

Every run is the product's own path, in-process: ``wsi-ncmi fit`` with the shipped leaf configs
(``configs/mil/camelyon17/<aggregator>_{ce,ncmi}.yaml``; only the epoch count, the seed, the class count and the
data paths are overridden), bags served from the RAM cache, then
``wsi-ncmi evaluate`` on the best checkpoint (val macro-F1 + macro-AUC): test macro-F1 / macro-AUC of the CE
head, of the linear probe on the CE embedding (CE-LP), of the linear probe on the NCMI embedding (NCMI-LP;
both probes with evaluate's default ``--lp-input auto``, whose kept input is listed under the table) and of the
nearest-centroid protocol (NCMI-CC). A control, "CE head @ NCMI lr" (objective ``ce_lr``), trains the CE leaf
with the NCMI leaf's learning rate and warm-up, so that the table shows which part of a gap is the objective and
which the learning rate. Mean ± std over seeds (the training seed; each task's bags
are one fixed draw). ``--jobs`` runs that many trainings in parallel processes, one thread each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from mil_tasks import TASKS, build_task, load_pools  # noqa: E402

CONFIGS = ROOT / "configs" / "mil"
# "ce_lr": the control — the CE leaf config trained with the NCMI leaf's learning rate and warm-up, so that a gap
# between CE and NCMI is not just the NCMI recipe's higher learning rate
OBJECTIVES = ("ce", "ce_lr", "ncmi")
PROTOCOLS = [("ce", "head", "CE head"), ("ce", "lp", "CE-LP"), ("ce_lr", "head", "CE head @ NCMI lr"),
             ("ncmi", "lp", "NCMI-LP"), ("ncmi", "cc", "NCMI-CC")]
LR_KEYS = ("lr", "warmup_epochs")


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
    """Fit one aggregator × objective × seed through `wsi-ncmi fit`, evaluate it; return its test metrics."""
    import torch

    _quiet()
    torch.set_num_threads(job["threads"])
    from wsi_ncmi.commands.evaluate_cli import main as evaluate_main
    from wsi_ncmi.training.cli import run_cli

    run = Path(job["run_dir"])
    args = shipped_fit_args(job["model"], job["objective"], job["bags"], job["split"], job["classes"],
                            job["epochs"], run)
    args += ["--data.cache", "ram", "--seed_everything", str(job["seed"]), "--trainer.enable_progress_bar", "false"]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_cli("fit", args)
        fit_s = time.perf_counter() - t0
        rc = evaluate_main(["--ckpt", str(run / "checkpoints" / "best.ckpt"), "--out", str(run / "eval"),
                            "--dataset", job["task"], "--no-plots"])
    if rc != 0:
        raise RuntimeError(f"evaluate failed for {job}")
    report = json.loads((run / "eval" / "report.json").read_text())
    metrics = {proto: {k: report["metrics"][proto]["test"][k] for k in ("macro_f1", "macro_auc")}
               for proto in report["metrics"]}
    lp = report["protocol_info"]["lp"]
    return {**{k: job[k] for k in ("task", "model", "objective", "seed")}, "metrics": metrics, "fit_s": fit_s,
            "total_s": time.perf_counter() - t0, "lp_input": lp["kept_input"],
            "lp_input_val_scores": lp["input_val_scores"], "calibration": report.get("calibration")}


def _fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—"


def table(results: list[dict], tasks: list[str], models: list[str]) -> list[str]:
    lines = ["| task | aggregator | protocol | test macro-F1 | test macro-AUC | seeds |", "|---|---|---|---|---|---|"]
    for task in tasks:
        for model in models:
            for objective, proto, label in PROTOCOLS:
                rows = [r for r in results if (r["task"], r["model"], r["objective"]) == (task, model, objective)
                        and proto in r["metrics"]]
                f1 = [r["metrics"][proto]["macro_f1"] for r in rows]
                auc = [r["metrics"][proto]["macro_auc"] for r in rows if r["metrics"][proto]["macro_auc"] is not None]
                lines.append(f"| {task} | {model} | {label} | {_fmt(f1)} | {_fmt(auc)} | {len(rows)} |")
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
                    return _fmt([c["test"][when][key] for c in rows if c["test"][when][key] is not None])

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
    return ["LP input kept on validation per seed (`--lp-input auto`): " + "; ".join(out) + "."] if out else []


def verdict(results: list[dict], tasks: list[str], models: list[str], tol: float = 0.01) -> list[str]:
    """The acceptance rule of issue #13 per task × aggregator: NCMI-LP ≥ CE head − tol (F1 and AUC), std ≤ 2×;
    against the shipped CE recipe and against the ``ce_lr`` control."""
    def vals(task: str, model: str, objective: str, proto: str, key: str) -> list[float]:
        return [r["metrics"][proto][key] for r in results
                if (r["task"], r["model"], r["objective"]) == (task, model, objective) and proto in r["metrics"]]

    out = []
    for task in tasks:
        for model in models:
            for ce_obj, what in (("ce", "CE"), ("ce_lr", "CE @ NCMI lr")):
                checks = []
                for key in ("macro_f1", "macro_auc"):
                    ce, nc = vals(task, model, ce_obj, "head", key), vals(task, model, "ncmi", "lp", key)
                    if not ce or not nc:
                        continue
                    ok_mean = np.mean(nc) >= np.mean(ce) - tol
                    ok_std = np.std(nc) <= 2 * np.std(ce) + 1e-9
                    checks.append(f"{key}: NCMI-LP {np.mean(nc):.3f} vs {what} {np.mean(ce):.3f} "
                                  f"({'ok' if ok_mean else 'LOSES'}), std {np.std(nc):.3f} vs {np.std(ce):.3f} "
                                  f"({'ok' if ok_std else 'too noisy'})")
                if checks:
                    out.append(f"- {task} / {model} vs {what}: " + "; ".join(checks))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=["abmil", "aem"])
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: each task's own)")
    p.add_argument("--bags", type=int, default=None,
                   help="bags per task, train/val/test = 60/20/20 %% (default: each task's own)")
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes (one thread each)")
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "mil_benchmark"), help="bags and runs (ignored folder)")
    p.add_argument("--out", default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    _quiet()
    work = Path(args.work)
    t0 = time.perf_counter()
    pools = load_pools(work, args.tasks)
    data = {t: build_task(t, work, pools, n_bags=args.bags) for t in args.tasks}
    prep_s = time.perf_counter() - t0
    jobs = [{"task": t, "model": m, "objective": o, "seed": s, "epochs": args.epochs or TASKS[t].epochs, "threads": 1,
             "bags": str(data[t][0]), "split": str(data[t][1]), "classes": data[t][2],
             "run_dir": str(work / "runs" / f"{t}_{m}_{o}_s{s}")}
            for t in args.tasks for m in args.models for s in args.seeds for o in args.objectives]
    results = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for r in pool.map(run_one, jobs):
                results.append(r)
                print(f"  {r['task']} {r['model']} {r['objective']} seed {r['seed']}: "
                      f"{ {k: round(v['macro_auc'] or 0, 3) for k, v in r['metrics'].items()} } {r['total_s']:.0f}s",
                      flush=True)
    else:
        for job in jobs:
            results.append(run_one(job))
    wall = time.perf_counter() - t0
    import torch

    head = ["# MIL benchmark: CE vs NCMI on witness tasks (`bench/mil_benchmark.py`)", "",
            f"torch {torch.__version__}, {os.cpu_count()} CPUs, --jobs {args.jobs}; "
            + ", ".join(f"{t}: {args.bags or TASKS[t].n_bags} bags, {args.epochs or TASKS[t].epochs} epochs"
                        for t in args.tasks)
            + f"; seeds {args.seeds}; wall {wall / 60:.1f} min "
            f"(data {prep_s:.0f} s, trainings {sum(r['total_s'] for r in results) / 60:.1f} CPU-min)", ""]
    lines = head + table(results, args.tasks, args.models) + ["", "Acceptance (issue #13: NCMI-LP ≥ CE head − 0.01, "
                                                               "seed std ≤ 2× CE's):", ""]
    lines += verdict(results, args.tasks, args.models)
    lines += [""] + lp_inputs(results, args.tasks, args.models)
    lines += [""] + calibration(results, args.tasks, args.models)
    text = "\n".join(lines) + "\n"
    print(text)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
