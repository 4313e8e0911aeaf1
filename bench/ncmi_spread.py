"""Why NCMI's seed spread (issue #23 part 4): what differs between NCMI MIL runs, from their checkpoints.

    python bench/ncmi_spread.py RUN [RUN ...] [--ckpt best|last|both] [--out DIR]
    python bench/ncmi_spread.py GOOD_RUN ... --compare BAD_RUN ... [--labels good bad]

A RUN is a `wsi-ncmi fit` run folder of an NCMI objective (``checkpoints/best.ckpt``, ``last.ckpt``; the training
log ``metrics.csv`` of ``RunCSVLogger``; ``eval/report.json`` of `wsi-ncmi evaluate` when there is one). Each
checkpoint is loaded through ``wsi_ncmi.training.checkpoint.load_mil_module`` (weights only), its recorded
datamodule rebuilt, and the train / val / test bags embedded with ``wsi_ncmi.evaluation.embed.embed_splits``.
Per checkpoint it reports:

* **per class**: val / test F1 of NCMI-LP (from ``report.json`` for the checkpoint it evaluated, else the probe
  refitted as `evaluate` fits it: ``evaluation.protocols.evaluate_run``), of NCMI-CC (recomputed:
  class means of p over the training bags, nearest by KL, as `evaluate` does), of the learned centroids ξ (nearest
  q = NSF(ξ) by KL: the classifier behind training's val metrics and so the checkpoint monitor
  ``val/f1_plus_auc``), of the same ξ directions at the bags' radius (``xi_dir``: q = NSF(ξ/‖ξ‖/τ), where an
  embedding pointing along ξ_v lands; if it beats ``xi``, ξ points the right way at the wrong scale) and of a
  nearest-class-mean rule on the centred, L2-normalised embedding (train class means,
  cosine: the embedding's quality without any probe); the class each ξ_v is nearest to (cosine between the ξ rows,
  and KL(q_v ‖ q_u) on the simplex); ‖ξ_v‖ (class-means init: exactly 10); ``xi_align`` = cos(ξ_v, m_v − m̄) with m_v
  the *final* class mean of the centred, normalised training embeddings, the direction the class-means init would
  give now (the init's own embeddings are gone after training, so ξ's movement is measured against the final
  class means, not against its start); ``xi_points_to`` = the class u maximising cos(ξ_v, m_u − m̄);
  the centroid most of the class's training bags are nearest to (``bags_go_to``: two classes with the same one
  share a centroid in practice);
* **per run**: ξ pairs with cosine ≥ ``--share-cos`` (geometrically shared centroids), the closest ξ pair, the
  feature center ‖c‖ and the offset of the training mean embedding from it relative to the bags' spread,
  the between / within-class distance ratio of the normalised embedding on train and val, the largest
  off-diagonal entry of CC's val confusion, the LP − CC and NCM − CC val gaps, and the validation curve
  (``metrics.csv``: per-epoch ``val/macro_f1``, the best epoch by ``val/f1_plus_auc``, the mean |step| of val F1).

Choices must use validation numbers only: test F1 is printed for completeness, never as a basis for a recipe.
``--compare`` puts the mean of every run-level number and per-class vector of group A (the positional runs) next to
group B's, with B − A. Output: a markdown table on stdout, and with ``--out DIR`` ``spread.md`` + ``spread.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARE_COS = 0.99  # ξ rows at least this cosine-similar count as one shared centroid


# ----------------------------------------------------------------------------- pure statistics (numpy)
def cosine_matrix(a: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity [C, C] of a [C, D] (zero rows give 0)."""
    a = np.asarray(a, dtype=np.float64)
    u = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    return u @ u.T


def simplex_kl_matrix(log_q: np.ndarray) -> np.ndarray:
    """KL(q_u ‖ q_v) [C, C] of simplex points given as log-probabilities log_q [C, D]."""
    log_q = np.asarray(log_q, dtype=np.float64)
    q = np.exp(log_q)
    return (q * log_q).sum(1)[:, None] - q @ log_q.T


def nearest_other(dist: np.ndarray) -> list[int]:
    """For each row, the index of the smallest off-diagonal entry of dist [C, C] (the nearest *other* class)."""
    d = np.array(dist, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    return [int(i) for i in d.argmin(1)]


def closest_pair(dist: np.ndarray) -> tuple[int, int, float]:
    """(u, v, dist) of the closest pair u < v of a symmetric-ish distance matrix [C, C]."""
    d = np.array(dist, dtype=np.float64)
    d = (d + d.T) / 2
    iu = np.triu_indices(len(d), 1)
    k = int(np.argmin(d[iu]))
    return int(iu[0][k]), int(iu[1][k]), float(d[iu][k])


def shared_pairs(cos: np.ndarray, threshold: float = SHARE_COS) -> list[tuple[int, int]]:
    """Class pairs u < v whose centroids have cosine similarity ≥ ``threshold`` (one centroid for two classes)."""
    iu, iv = np.triu_indices(len(cos), 1)
    return [(int(u), int(v)) for u, v in zip(iu, iv) if cos[u, v] >= threshold]


def class_means(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class mean rows [C, D] of x [N, D] (NaN rows for absent classes)."""
    out = np.full((num_classes, x.shape[1]), np.nan)
    for c in range(num_classes):
        if (y == c).any():
            out[c] = x[y == c].mean(0)
    return out


def majority_target(pred: np.ndarray, y: np.ndarray, num_classes: int) -> list[int | None]:
    """Per true class, the predicted index most of its rows get (None for an absent class)."""
    return [int(np.bincount(pred[y == c], minlength=num_classes).argmax()) if (y == c).any() else None
            for c in range(num_classes)]


def nearest_mean_scores(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Cosine of each row of x [N, D] to each class mean [C, D] -> [N, C] (absent classes, NaN rows: −1e9);
    argmax = the nearest class mean."""
    sim = cosine_matrix(np.vstack([x, np.nan_to_num(means)]))[: len(x), len(x):]  # [N, C]
    sim[:, np.isnan(means).any(1)] = -1e9
    return sim


def separation_ratio(x: np.ndarray, y: np.ndarray, num_classes: int) -> float:
    """Mean distance between class means (over present pairs) / mean distance of a row to its own class mean;
    large = classes apart relative to their spread, about 0 = no class structure. NaN with < 2 classes."""
    means = class_means(x, y, num_classes)
    present = [c for c in range(num_classes) if not np.isnan(means[c]).any()]
    if len(present) < 2:
        return float("nan")
    between = np.mean([np.linalg.norm(means[u] - means[v]) for i, u in enumerate(present) for v in present[i + 1:]])
    within = np.mean(np.linalg.norm(x - means[y], axis=1))
    return float(between / max(within, 1e-12))


def largest_confusion(cm: np.ndarray) -> dict[str, Any]:
    """The largest off-diagonal entry of a confusion matrix (rows true, columns predicted): which class goes where."""
    c = np.array(cm, dtype=np.int64)
    off = c.copy()
    np.fill_diagonal(off, -1)
    t, p = np.unravel_index(int(off.argmax()), off.shape)
    row = max(int(c[t].sum()), 1)
    return {"true": int(t), "pred": int(p), "count": int(c[t, p]), "share_of_true": c[t, p] / row}


def f1_and_confusion(y: np.ndarray, scores: np.ndarray, num_classes: int) -> dict[str, Any]:
    """macro-F1, macro-AUC (one-vs-rest on softmax(scores); None when undefined), accuracy, per-class F1 and
    confusion [C, C] of class scores [N, C] (prediction: argmax, ties to the lowest class as in evaluate)."""
    from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

    labels = list(range(num_classes))
    pred = scores.argmax(1)
    per = f1_score(y, pred, labels=labels, average=None, zero_division=0)
    e = np.exp(scores - scores.max(1, keepdims=True))
    try:
        auc = float(roc_auc_score(y, e / e.sum(1, keepdims=True), multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from y
        auc = None
    return {"macro_f1": float(per.mean()), "macro_auc": auc, "accuracy": float((y == pred).mean()),
            "per_class_f1": per.tolist(), "confusion": confusion_matrix(y, pred, labels=labels).tolist()}


def curve_summary(rows: list[dict[str, str]]) -> dict[str, Any] | None:
    """The validation curve of a ``metrics.csv`` (rows as read by csv.DictReader); None without val rows."""
    def num(r: dict[str, str], k: str) -> float | None:
        v = r.get(k, "")
        return float(v) if v not in ("", None) else None

    val = [r for r in rows if num(r, "val/macro_f1") is not None]
    if not val:
        return None
    f1 = [num(r, "val/macro_f1") for r in val]
    score = [num(r, "val/f1_plus_auc") or -math.inf for r in val]
    best = int(np.argmax(score))
    loss = [num(r, "train/loss_epoch") for r in rows if num(r, "train/loss_epoch") is not None]
    return {"epochs": len(val), "best_epoch": int(float(val[best]["epoch"])), "val_f1_best": f1[best],
            "val_f1_last": f1[-1], "val_f1_max": max(f1), "val_f1_mean_abs_step": float(np.mean(np.abs(np.diff(f1))))
            if len(f1) > 1 else 0.0, "val_f1_curve": [round(v, 3) for v in f1],
            "val_auc_curve": [round(num(r, "val/macro_auc") or float("nan"), 3) for r in val],
            "val_cc_accuracy_curve": [round(num(r, "val/cc_accuracy") or float("nan"), 3) for r in val],
            "val_cc_f1_curve": [round(num(r, "val/cc_macro_f1") or float("nan"), 3) for r in val],  # newer runs
            "train_loss_curve": [round(v, 4) for v in loss]}


# ----------------------------------------------------------------------------- one checkpoint
def read_curve(run: Path) -> dict[str, Any] | None:
    """The run's training log (``RunCSVLogger``: ``<run>/metrics.csv``) as :func:`curve_summary`."""
    path = run / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        return curve_summary(list(csv.DictReader(fh)))


def diagnose_checkpoint(ckpt: Path, report: dict[str, Any] | None = None, share_cos: float = SHARE_COS,
                        device: str = "cpu") -> dict[str, Any]:
    """Every number of the module docstring for one NCMI checkpoint (``report``: its `evaluate` report, if any)."""
    import torch

    from wsi_ncmi.evaluation.embed import embed_splits
    from wsi_ncmi.evaluation.probe import fit_centroid_classifier
    from wsi_ncmi.evaluation.protocols import evaluate_run
    from wsi_ncmi.ncmi import log_nsf
    from wsi_ncmi.training.checkpoint import checkpoint_datamodule, load_mil_module

    module, state = load_mil_module(ckpt, device)
    nl = module.ncmi_loss
    if nl is None:
        raise SystemExit(f"ncmi_spread: {ckpt}: not an NCMI run (objective {module.objective})")
    if nl.centroids_per_class != 1:
        raise SystemExit(f"ncmi_spread: {ckpt}: {nl.centroids_per_class} centroids per class; only 1 is supported")
    dm = checkpoint_datamodule(module, state)
    splits = embed_splits(module.model, {s: dm.dataloader(s, shuffle=False) for s in ("train", "val", "test")},
                          device=device, ncmi_loss=nl)
    n_cls, names = int(module.hparams["num_classes"]), list(dm.class_names)
    xi = nl.xi.detach().double().cpu().numpy()  # [C, E]
    log_q = nl.centroid_log_probs().detach().double().cpu().numpy()  # [C, E]
    cos_xi, kl_q = cosine_matrix(xi), simplex_kl_matrix(log_q)
    tr, va = splits["train"], splits["val"]
    means = class_means(tr.normalized.astype(np.float64), tr.labels, n_cls)  # [C, E], final embeddings
    present = ~np.isnan(means).any(1)
    dirs = means - means[present].mean(0)  # the class-means init's direction, from the final embeddings
    align = cosine_matrix(np.vstack([xi, np.nan_to_num(dirs)]))[:n_cls, n_cls:]  # [C ξ, C class dirs]
    align[:, ~present] = np.nan

    # ξ at the bags' radius: q = NSF(ξ_v / ‖ξ_v‖ / τ), the point p of an embedding pointing along ξ_v would get
    log_q_dir = log_nsf(torch.nn.functional.normalize(torch.from_numpy(xi), dim=1) / nl.tau).numpy()  # [C, E]

    def kl_to(log_p: np.ndarray, lq: np.ndarray) -> np.ndarray:  # KL(p_i ‖ q_v) [N, C]
        lp = log_p.astype(np.float64)
        return (np.exp(lp) * lp).sum(1, keepdims=True) - np.exp(lp) @ lq.T

    def xi_pred(s: Any) -> np.ndarray:  # the learned-centroid classifier of training's val metrics
        return kl_to(s.log_probs, log_q).argmin(1)

    cc = fit_centroid_classifier(tr.log_probs, tr.labels, n_cls)  # the CC of `evaluate` (float64)
    out: dict[str, Any] = {"checkpoint": str(ckpt), "class_names": names, "epoch": state.get("epoch"),
                           "n": {k: len(s) for k, s in splits.items()},
                           "val_class_counts": np.bincount(va.labels, minlength=n_cls).tolist()}
    out["lp_source"] = "report.json" if report and "lp" in report.get("metrics", {}) else "refitted"
    if out["lp_source"] == "refitted":  # e.g. last.ckpt: the probe as `evaluate` fits it (C swept on val, input auto)
        report = evaluate_run(splits, n_cls, dataset="spread", split_csv=str(dm.split_csv),
                              model=str(module.hparams["model"]), objective=module.objective, class_names=names,
                              protocols=["lp"])[0]
    per_split: dict[str, dict[str, Any]] = {}
    for split in ("val", "test"):
        s = splits[split]
        per_split[split] = {"cc": f1_and_confusion(s.labels, -np.asarray(cc.kl_to_centroids(s.probs())), n_cls),
                            "xi": f1_and_confusion(s.labels, -kl_to(s.log_probs, log_q), n_cls),
                            "xi_dir": f1_and_confusion(s.labels, -kl_to(s.log_probs, log_q_dir), n_cls),
                            "ncm": f1_and_confusion(s.labels, nearest_mean_scores(s.normalized, means), n_cls)}
        m = report["metrics"]["lp"][split]
        per_split[split]["lp"] = {k: m[k] for k in ("macro_f1", "macro_auc", "accuracy", "per_class_f1", "confusion")}
    out["metrics"] = per_split
    f_tr = tr.embeddings.astype(np.float64)
    center = nl.center.center.detach().double().cpu().numpy()
    spread = float(np.linalg.norm(f_tr - f_tr.mean(0), axis=1).mean())
    bags_go_to = majority_target(xi_pred(tr), tr.labels, n_cls)
    u, v, d = closest_pair(1 - cos_xi)
    out["classes"] = [{"name": names[c], "xi_norm": float(np.linalg.norm(xi[c])),
                       "xi_nearest_cos": nearest_other(1 - cos_xi)[c], "xi_nearest_kl": nearest_other(kl_q)[c],
                       "xi_align": float(align[c, c]), "xi_points_to": int(np.nanargmax(align[c]))
                       if present.any() else None, "bags_go_to": bags_go_to[c]} for c in range(n_cls)]
    val_cc = per_split["val"]["cc"]
    out["run"] = {
        "xi_cos_matrix": np.round(cos_xi, 4).tolist(), "xi_kl_matrix": np.round(kl_q, 6).tolist(),
        "closest_xi_pair": [u, v], "closest_xi_cos": 1 - d, "shared_xi_pairs": shared_pairs(cos_xi, share_cos),
        "centroid_shared_by_bags": sorted({c for c in range(n_cls) if bags_go_to[c] is not None
                                           and bags_go_to.count(bags_go_to[c]) > 1}),
        "center_norm": float(np.linalg.norm(center)),
        "center_offset_over_spread": float(np.linalg.norm(f_tr.mean(0) - center)) / max(spread, 1e-12),
        "embedding_spread": spread,
        "separation_train": separation_ratio(tr.normalized.astype(np.float64), tr.labels, n_cls),
        "separation_val": separation_ratio(va.normalized.astype(np.float64), va.labels, n_cls),
        "cc_val_largest_confusion": largest_confusion(np.array(val_cc["confusion"])),
    }
    for name in ("lp", "ncm", "xi", "xi_dir"):
        if name in per_split["val"]:
            out["run"][f"{name}_minus_cc_val_f1"] = per_split["val"][name]["macro_f1"] - val_cc["macro_f1"]
    return out


def diagnose_run(run: Path, which: str = "best", share_cos: float = SHARE_COS) -> dict[str, Any]:
    """:func:`diagnose_checkpoint` of the run's ``best`` / ``last`` / ``both`` checkpoints plus its val curve."""
    run = Path(run)
    report_path = run / "eval" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    names = ["best", "last"] if which == "both" else [which]
    ckpts = {}
    for name in names:
        path = run / "checkpoints" / f"{name}.ckpt"
        if path.is_file():  # the report is the best checkpoint's (`evaluate --ckpt .../best.ckpt`)
            rep = report if report and Path(report.get("checkpoint", "")).name == path.name else None
            ckpts[name] = diagnose_checkpoint(path, rep, share_cos)
    if not ckpts:
        raise SystemExit(f"ncmi_spread: {run}: no checkpoints/{'|'.join(names)}.ckpt")
    return {"run": str(run), "curve": read_curve(run), "checkpoints": ckpts}


# ----------------------------------------------------------------------------- output
def _f(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def scalars(d: dict[str, Any], ckpt: str = "best") -> dict[str, float]:
    """Run-level numbers (and per-class numbers as ``name[class]``) of one diagnosed checkpoint, for --compare."""
    c = d["checkpoints"].get(ckpt) or next(iter(d["checkpoints"].values()))
    out: dict[str, float] = {}
    for proto, m in c["metrics"]["val"].items():
        out[f"val {proto} macro-F1"] = m["macro_f1"]
        if m.get("macro_auc") is not None:
            out[f"val {proto} macro-AUC"] = m["macro_auc"]
        for k, f in enumerate(m["per_class_f1"]):
            out[f"val {proto} F1[{c['class_names'][k]}]"] = f
    for k in ("separation_train", "separation_val", "closest_xi_cos", "center_norm", "center_offset_over_spread",
              "lp_minus_cc_val_f1", "ncm_minus_cc_val_f1", "xi_minus_cc_val_f1", "xi_dir_minus_cc_val_f1"):
        if k in c["run"]:
            out[k] = c["run"][k]
    out["shared ξ pairs"] = len(c["run"]["shared_xi_pairs"])
    out["classes sharing a centroid (bags)"] = len(c["run"]["centroid_shared_by_bags"])
    for cl in c["classes"]:
        out[f"xi_align[{cl['name']}]"] = cl["xi_align"]
        out[f"xi_norm[{cl['name']}]"] = cl["xi_norm"]
    if d["curve"]:
        for k in ("best_epoch", "val_f1_best", "val_f1_last", "val_f1_max", "val_f1_mean_abs_step"):
            out[f"curve {k}"] = d["curve"][k]
    return out


def run_markdown(d: dict[str, Any]) -> list[str]:
    lines = [f"## {d['run']}", ""]
    if d["curve"]:
        cv = d["curve"]
        lines += [f"Validation curve (metrics.csv, {cv['epochs']} epochs): val macro-F1 {cv['val_f1_curve']}; best "
                  f"epoch {cv['best_epoch']} (val F1 {cv['val_f1_best']:.3f}), last {cv['val_f1_last']:.3f}, "
                  f"mean |step| {cv['val_f1_mean_abs_step']:.3f}; val macro-AUC {cv['val_auc_curve']}; val CC accuracy {cv['val_cc_accuracy_curve']}, "
                  f"macro-F1 {cv['val_cc_f1_curve']}; "
                  f"train loss {cv['train_loss_curve']}", ""]
    else:
        lines += ["No per-epoch validation metrics on disk (no metrics.csv with val/macro_f1).", ""]
    for name, c in d["checkpoints"].items():
        r, names = c["run"], c["class_names"]
        val, test = c["metrics"]["val"], c["metrics"]["test"]
        protos = [p for p in ("lp", "cc", "xi", "xi_dir", "ncm") if p in val]
        lines += [f"### {name}.ckpt (epoch {c['epoch']}; bags {c['n']})", "",
                  "| class | n val | " + " | ".join(f"{p.upper()} val F1" for p in protos) + " | "
                  + " | ".join(f"{p.upper()} test F1" for p in protos if p in ("lp", "cc"))
                  + " | ξ nearest (cos / KL) | ‖ξ‖ | ξ align | ξ points to | bags go to |",
                  "|---" * (len(protos) + len([p for p in protos if p in ("lp", "cc")]) + 7) + "|"]
        def nm(i: int | None, names: list[str] = names) -> str:
            return names[i] if i is not None else "—"

        for k, cl in enumerate(c["classes"]):
            lines.append(f"| {names[k]} | {c['val_class_counts'][k]} | " + " | ".join(_f(val[p]["per_class_f1"][k]) for p in protos) + " | "
                         + " | ".join(_f(test[p]["per_class_f1"][k]) for p in protos if p in ("lp", "cc"))
                         + f" | {nm(cl['xi_nearest_cos'])} / {nm(cl['xi_nearest_kl'])} | {cl['xi_norm']:.2f} "
                         f"| {_f(cl['xi_align'])} | {nm(cl['xi_points_to'])} | {nm(cl['bags_go_to'])} |")
        lc = r["cc_val_largest_confusion"]
        lines += ["", "val macro-F1 / AUC: " + ", ".join(f"{p.upper()} {val[p]['macro_f1']:.3f} / "
                                                         f"{_f(val[p].get('macro_auc'))}" for p in protos)
                  + f"; closest ξ pair {names[r['closest_xi_pair'][0]]}–{names[r['closest_xi_pair'][1]]} "
                  f"(cos {r['closest_xi_cos']:.3f}); shared ξ pairs {[(names[a], names[b]) for a, b in r['shared_xi_pairs']]}; "
                  f"classes whose bags share a centroid {[names[i] for i in r['centroid_shared_by_bags']]}; "
                  f"CC val largest confusion {names[lc['true']]}→{names[lc['pred']]} ({lc['count']}, "
                  f"{lc['share_of_true']:.2f} of the class); separation train {r['separation_train']:.3f} / val "
                  f"{r['separation_val']:.3f}; ‖c‖ {r['center_norm']:.2f}, train-mean offset / spread "
                  f"{r['center_offset_over_spread']:.2f}", ""]
    return lines


def compare_markdown(a: list[dict[str, Any]], b: list[dict[str, Any]], labels: tuple[str, str],
                     ckpt: str = "best") -> list[str]:
    sa, sb = [scalars(d, ckpt) for d in a], [scalars(d, ckpt) for d in b]
    keys = [k for k in sa[0] if all(k in s for s in sa + sb)]
    lines = [f"## {labels[0]} ({len(a)} runs) vs {labels[1]} ({len(b)} runs), {ckpt} checkpoint", "",
             f"| number | {labels[0]} mean (runs) | {labels[1]} mean (runs) | {labels[1]} − {labels[0]} |",
             "|---|---|---|---|"]
    for k in keys:
        va, vb = [s[k] for s in sa], [s[k] for s in sb]
        ma, mb = float(np.nanmean(va)), float(np.nanmean(vb))
        lines.append(f"| {k} | {ma:.3f} ({', '.join(_f(float(v)) for v in va)}) | {mb:.3f} "
                     f"({', '.join(_f(float(v)) for v in vb)}) | {mb - ma:+.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="NCMI run folders (group A with --compare)")
    p.add_argument("--compare", nargs="+", type=Path, default=None, help="group B run folders")
    p.add_argument("--labels", nargs=2, default=("A", "B"), help="names of the two groups")
    p.add_argument("--ckpt", choices=("best", "last", "both"), default="both")
    p.add_argument("--share-cos", type=float, default=SHARE_COS, help="ξ cosine at which two classes share one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write spread.md and spread.json here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("wsi_ncmi").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    from wsi_ncmi.errors import UserError

    try:  # a moved bags folder, a foreign checkpoint...: one line naming the file
        groups = [[diagnose_run(r, args.ckpt, args.share_cos) for r in runs] for runs in [args.runs, args.compare]
                  if runs]
    except UserError as err:
        print(f"ncmi_spread: {err}", file=sys.stderr)
        return 2
    lines = ["# NCMI spread diagnosis (`bench/ncmi_spread.py`)", "",
             "Choices use validation numbers only; test F1 is shown for completeness.", ""]
    for d in (d for g in groups for d in g):
        lines += run_markdown(d)
    if args.compare:
        for ck in (["best", "last"] if args.ckpt == "both" else [args.ckpt]):
            lines += compare_markdown(groups[0], groups[1], tuple(args.labels), ck) + [""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from wsi_ncmi.data.atomic import atomic_output

        args.out.mkdir(parents=True, exist_ok=True)
        for name, body in (("spread.md", text), ("spread.json", json.dumps({"groups": groups}, indent=1))):
            with atomic_output(args.out / name) as tmp:
                Path(tmp).write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
