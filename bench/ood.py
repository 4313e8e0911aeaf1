"""OOD detection of slides: the NCMI distance (min KL to a class centroid) vs MSP and energy, mean ± std over seeds.

    python bench/ood.py --out bench/results/ood.md                       # witness task, 3 seeds (CPU, ~1-2 min)
    python bench/ood.py --demo-out demo_out --out bench/results/ood.md    # + an existing `wsi-ncmi demo --out demo_out`

**Witness task** (built here, like ``tests/_synthetic.make_witness_bags``): every instance is N(0, I_D); a slide
of class k ≥ 1 also holds 2-5 "witness" instances shifted by ``strength · u_k`` (orthonormal u_k), class 0 has
none. Held-out OOD bags, never seen in training, of two kinds:

* ``unseen_class``: the same noise with witnesses along a new direction u_new orthogonal to every u_k (a lesion
  type the cohort never contains);
* ``shifted``: every instance N(0, 2²·I) + 2·u_new (another scanner / stain: the whole slide is off).

For each seed, ABMIL is trained with CE (head) and with NCMI by the same ``MILModule`` + ``MILDataModule`` path
as ``wsi-ncmi fit``, then embedded and scored by the same code as ``wsi-ncmi evaluate --ood-bags``
(:func:`wsi_ncmi.evaluation.ood.evaluate_ood`): in-distribution = the test split. Reported: AUROC (OOD =
positive) and FPR@95TPR of ``ncmi_xi`` / ``ncmi_means`` (NCMI run), ``msp`` / ``energy`` (both runs), and which
NCMI distance the validation split picked.

**Demo cohort** (``--demo-out``): the bags of a finished demo (``features/bags``, ``split.csv``) and its OOD
slides (``cohort/extras.csv`` rows whose note starts with "out-of-distribution"); ABMIL CE / NCMI with the
demo's settings (lr 5e-4, balanced sampler) for ``--demo-epochs`` epochs per seed.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ncmi.data import MILDataModule
from wsi_ncmi.data.bags import list_bags, write_bag
from wsi_ncmi.evaluation.embed import embed_splits
from wsi_ncmi.evaluation.ood import compute_scores, evaluate_ood, score_inputs
from wsi_ncmi.evaluation.ood_threshold import evaluate_rule
from wsi_ncmi.evaluation.predict import embed_bags
from wsi_ncmi.training import MILModule

SCORES = (("ncmi", "ncmi_xi"), ("ncmi", "ncmi_means"), ("ncmi", "radius"), ("ncmi", "msp"), ("ncmi", "energy"),
          ("ncmi", "input_z"), ("head", "msp"), ("head", "energy"), ("head", "radius"), ("head", "input_z"))


# --------------------------------------------------------------------------------------------- data
def _directions(n: int, dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q[:n].astype(np.float32)  # [n, D] orthonormal


def _write(path: Path, x: np.ndarray) -> None:
    write_bag(path, x.astype(np.float32), np.zeros((len(x), 2), np.int64),
              {"slide_id": path.stem, "encoder": "bench-witness", "patch_size": 256, "patch_level": 0})


def make_task(root: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """ID bags + split.csv in ``root/id``, OOD bags in ``root/ood_<kind>``."""
    rng = np.random.default_rng(seed)
    c = args.classes
    dirs = _directions(c, args.dim, seed)  # rows 0..C-2: class witnesses, row C-1: never in training
    rows = []
    for i in range(args.n_slides):
        y = i % c
        n = int(rng.integers(args.instances // 2, args.instances + 1))
        x = rng.standard_normal((n, args.dim)).astype(np.float32)
        if y > 0:
            k = int(rng.integers(2, 6))
            x[rng.choice(n, size=min(k, n), replace=False)] += args.strength * dirs[y - 1]
        sid = f"s{i:03d}"
        _write(root / "id" / f"{sid}.h5", x)
        r, per = i // c, -(-args.n_slides // c)  # stratified ~60 / 20 / 20 by position within the class
        n_eval = max(1, round(0.2 * per))
        split = "train" if r < per - 2 * n_eval else "val" if r < per - n_eval else "test"
        rows.append({"slide_id": sid, "patient_id": f"p{i:03d}", "label": y, "split": split})
    split_csv = root / "id" / "split.csv"
    with split_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    new = dirs[c - 1]
    for i in range(args.n_ood):
        n = int(rng.integers(args.instances // 2, args.instances + 1))
        x = rng.standard_normal((n, args.dim)).astype(np.float32)
        k = int(rng.integers(2, 6))
        x[rng.choice(n, size=min(k, n), replace=False)] += args.strength * new
        _write(root / "ood_unseen_class" / f"u{i:03d}.h5", x)
        _write(root / "ood_shifted" / f"v{i:03d}.h5",
               2.0 * rng.standard_normal((n, args.dim)).astype(np.float32) + 2.0 * new)
    return {"bags": root / "id", "split": split_csv,
            "ood": {"unseen_class": root / "ood_unseen_class", "shifted": root / "ood_shifted"}}


# ------------------------------------------------------------------------------------ train / score
def fit(bags: Path, split: Path, objective: str, seed: int, epochs: int, lr: float, model_kwargs: dict,
        balanced: bool, root: Path) -> tuple[MILModule, MILDataModule]:
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    dm = MILDataModule(str(bags), str(split), num_workers=0, pin_memory=False, balanced_sampler=balanced,
                       seed=seed, cache=True)
    module = MILModule(model="abmil", model_kwargs=model_kwargs, in_dim=dm.in_dim, num_classes=dm.num_classes,
                       objective=objective, lr=lr)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(module, datamodule=dm)
    return module.eval(), dm


def _flagged(cal: Any, thresholds: dict[str, float], splits: dict[str, Any], emb: Any,
             ncmi_loss: Any) -> dict[str, tuple[float, float]]:
    """{score: (share of test slides, share of OOD bags) above ``thresholds[score]``}."""
    def scores(s: Any) -> dict[str, np.ndarray]:
        return compute_scores(score_inputs(logits=s.logits, log_probs=s.log_probs, ncmi_loss=ncmi_loss,
                                           class_means=cal.class_means_array(), embeddings=s.embeddings,
                                           train_mean=cal.train_mean_array(), input_means=s.input_means,
                                           input_stats=cal.input_stats()))

    test, bad = scores(splits["test"]), scores(emb)
    return {k: (float((test[k] > t).mean()), float((bad[k] > t).mean())) for k, t in thresholds.items()}


def score_run(module: MILModule, dm: MILDataModule, ood: dict[str, dict[str, Path]],
              alpha: float = 0.1) -> dict[str, Any]:
    """{kind: ood block (+ flagged shares under the old and the new threshold rule)} and the default score, via
    the `evaluate --ood-bags` code."""
    splits = embed_splits(module.model, {s: dm.dataloader(s) for s in ("train", "val", "test")},
                          ncmi_loss=module.ncmi_loss)
    out: dict[str, Any] = {}
    for kind, bags in ood.items():
        emb = embed_bags(module.model, bags, ncmi_loss=module.ncmi_loss)
        cal, block = evaluate_ood(splits, module.ncmi_loss, dm.num_classes, dm.class_names, None, emb, kind)
        old = _flagged(cal, dict(cal.thresholds), splits, emb, module.ncmi_loss)  # ≥ 95 % of val kept
        evaluate_rule(cal, splits, module.ncmi_loss, dm.num_classes, emb, alpha)
        new = _flagged(cal, dict(cal.thresholds), splits, emb, module.ncmi_loss)
        for name, m in block["scores"].items():
            m["flag_old"], m["flag_new"] = old[name], new[name]
        out[kind] = block
        out["default"] = cal.default_score
    out["accuracy"] = _accuracy(module, splits["test"])
    return out


def _accuracy(module: MILModule, test: Any) -> float:
    with torch.no_grad():
        scores = module.class_scores(torch.as_tensor(test.embeddings))
    return float((scores.argmax(1).numpy() == test.labels).mean())


def run_task(name: str, data: dict[str, Any], seeds: list[int], epochs: int, lr: float, model_kwargs: dict,
             balanced: bool, root: Path, per_seed_data: bool = False, make=None, alpha: float = 0.1) -> dict[str, Any]:
    """results[kind][(objective, score)] = [(auroc, fpr)] per seed, + accuracy and default picks."""
    res: dict[str, Any] = {"scores": {}, "accuracy": {"ncmi": [], "head": []}, "default": []}
    for seed in seeds:
        d = make(seed) if per_seed_data else data
        ood = {k: list_bags(v) for k, v in d["ood"].items()}
        for objective in ("ncmi", "head"):
            t0 = time.perf_counter()
            module, dm = fit(d["bags"], d["split"], objective, seed, epochs, lr, model_kwargs, balanced, root)
            r = score_run(module, dm, ood, alpha)
            res["accuracy"][objective].append(r["accuracy"])
            if objective == "ncmi":
                res["default"].append(r["default"])
            for kind in ood:
                for score, m in r[kind]["scores"].items():
                    res["scores"].setdefault(kind, {}).setdefault((objective, score), []).append(
                        (m["auroc"], m["fpr_at_95tpr"], *m["flag_old"], *m["flag_new"]))
            logging.getLogger("bench.ood").info("%s seed %d %s: %.1f s", name, seed, objective,
                                                time.perf_counter() - t0)
    return res


# ------------------------------------------------------------------------------------------ output
def _pm(values: list[float]) -> str:
    a = np.asarray(values, dtype=np.float64)
    return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}" if a.size > 1 else f"{a.mean():.3f}"


def table(name: str, res: dict[str, Any], n_seeds: int, alpha: float = 0.1) -> list[str]:
    lines = [f"### {name}", "",
             f"Test accuracy of the runs' own classifier: NCMI (ξ) {_pm(res['accuracy']['ncmi'])}, "
             f"CE (head) {_pm(res['accuracy']['head'])}; default OOD score (NCMI run): "
             + ", ".join(f"{s} ×{res['default'].count(s)}" for s in sorted(set(res["default"]))), ""]
    for kind, per in res["scores"].items():
        lines += [f"OOD = `{kind}` ({n_seeds} seed(s), mean ± std). Flagged: share of test (ID) slides and of OOD "
                  "bags above the threshold; *old* = keep ≥ 95 % of validation (`evaluate` before issue #27), *new* = "
                  f"conformal quantile of validation + out-of-fold training scores at false-alarm rate {alpha:g}:", "",
                  "| run | score | AUROC ↑ | FPR@95TPR ↓ | ID flagged, old | OOD flagged, old | ID flagged, new ↓ "
                  "| OOD flagged, new ↑ |", "|---|---|---|---|---|---|---|---|"]
        best = max(np.mean([v[0] for v in vals]) for vals in per.values())
        for (objective, score), vals in sorted(per.items(), key=lambda kv: [k for k in SCORES].index(kv[0])):
            cols = list(zip(*vals))  # auroc, fpr, id_old, ood_old, id_new, ood_new: one tuple per seed
            mark = " **best**" if np.isclose(np.mean(cols[0]), best) else ""
            run = "NCMI" if objective == "ncmi" else "CE"
            lines.append(f"| {run} | {score} | {_pm(list(cols[0]))}{mark} | "
                         + " | ".join(_pm(list(c)) for c in cols[1:]) + " |")
        lines.append("")
    return lines


def demo_data(demo_out: Path) -> dict[str, Any]:
    extras = list(csv.DictReader((demo_out / "cohort" / "extras.csv").open()))
    bags = list_bags(demo_out / "features" / "bags")
    ood = [r["slide_id"] for r in extras if r.get("note", "").startswith("out-of-distribution") and r["slide_id"] in bags]
    if not ood:
        raise SystemExit(f"{demo_out}: no out-of-distribution extras with a bag (cohort/extras.csv)")
    folder = Path(tempfile.mkdtemp(prefix="ood_demo_"))
    for sid in ood:
        (folder / f"{sid}.h5").symlink_to(bags[sid].resolve())
    return {"bags": demo_out / "features" / "bags", "split": demo_out / "split.csv", "ood": {"demo_ood_slides": folder}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-slides", type=int, default=90, help="in-distribution witness slides")
    p.add_argument("--n-ood", type=int, default=20, help="OOD bags of each kind")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--instances", type=int, default=24, help="bag size: uniform in [n/2, n]")
    p.add_argument("--strength", type=float, default=6.0, help="witness shift")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--demo-out", default=None, help="a finished `wsi-ncmi demo --out` folder with OOD extras")
    p.add_argument("--demo-epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--false-alarm", type=float, default=0.1, help="target false-alarm rate of the new threshold rule")
    p.add_argument("--skip-witness", action="store_true", help="only the demo cohort (with --demo-out)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "wsi_ncmi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    lines = ["# OOD detection: NCMI distance vs MSP vs energy", "",
             f"`python bench/ood.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kw = {"inner_dim": args.dim, "attn_hidden": args.dim}

        def make(seed: int) -> dict[str, Any]:
            return make_task(root / f"witness{seed}", args, seed)

        a = args.false_alarm
        if not args.skip_witness:
            res = run_task("witness", {}, args.seeds, args.epochs, args.lr, kw, False, root, per_seed_data=True,
                           make=make, alpha=a)
            lines += table(f"Witness task: {args.classes} classes, D={args.dim}, {args.n_slides} ID slides, ABMIL "
                           f"(inner {args.dim}), {args.epochs} epochs, lr {args.lr}; data and training seeded per "
                           "seed", res, len(args.seeds), a)
        if args.demo_out:
            d = demo_data(Path(args.demo_out))
            res = run_task("demo", d, args.seeds, args.demo_epochs, 5e-4, {}, True, root, alpha=a)
            lines += table(f"Demo cohort `{args.demo_out}` (ABMIL defaults, {args.demo_epochs} epochs, lr 5e-4, "
                           f"balanced sampler)", res, len(args.seeds), a)
    lines += [f"Total time {time.perf_counter() - t0:.0f} s ({torch.get_num_threads()} threads)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
