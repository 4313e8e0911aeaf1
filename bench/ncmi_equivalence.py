"""Does a refactor of the NCMI training code change what it computes? Train tiny NCMI runs, dump their numbers.

Runs (CPU, a few minutes): MIL (``wsi-ncmi fit`` through ``run_cli``) ABMIL and AEM × {class-means ξ init + the
manual ξ SGD step, public init + ξ as a param group}, harmonic NCMI with the center warm-up, on a 24-slide, 3-class
witness task; natural-image NCMI (``wsi-ncmi natural fit``) on sklearn digits. Per run: every logged metric at the
end and the sum of every ξ / center / momentum tensor. With ``--compare BEFORE.json`` it prints a markdown table of
before/after and the largest difference; state-dict keys and metric names from before ``NCMITraining``
(``ncmi_loss.*``, ``xi_momentum``, natural ``criterion.*``; ``val/top_xi1`` ...) are matched to today's.

    PYTHONPATH=. python bench/ncmi_equivalence.py --work /tmp/eq --out after.json --compare before.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OLD_KEYS = {"ncmi_loss.": "ncmi_training.loss.", "criterion.": "ncmi_training.loss.",
            "xi_momentum": "ncmi_training.xi_momentum"}
OLD_METRICS = {"val/top_xi1": "val/xi_accuracy", "val/top_xi5": "val/xi_top5", "val/top_cc1": "val/cc_accuracy",
               "val/top_cc5": "val/cc_top5"}
MIL_MODELS = {"abmil": '{"inner_dim": 8, "attn_hidden": 8}', "aem": '{"inner_dim": 8, "num_heads": 2}'}


def _digest(state: dict) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in state.items()
            if any(s in k for s in ("ncmi", "xi", "center", "criterion"))}


def capture(work: Path, models: list[str], epochs: int, natural_epochs: int) -> dict[str, dict]:
    from _synthetic import make_witness_bags

    from wsi_ncmi.commands.natural_cli import NaturalCLI
    from wsi_ncmi.training.cli import run_cli

    out: dict[str, dict] = {}
    bags = work / "bags"
    if not bags.exists():
        make_witness_bags(bags, n_slides=24, num_classes=3, dim=8, n_instances=(4, 10), seed=0)
    for model in models:
        for cinit, copt in (("class_means", "sgd"), ("public", "group")):
            cli = run_cli("fit", [
                "--data.bags_dir", str(bags), "--data.split_csv", str(bags / "split.csv"), "--data.num_workers", "0",
                "--data.pin_memory", "false", "--trainer.default_root_dir", str(work / f"run_{model}_{cinit}"),
                "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--trainer.max_epochs", str(epochs), "--model.lr", "3e-3",
                "--seed_everything", "0", "--model.model", model, "--model.model_kwargs", MIL_MODELS[model],
                "--model.objective", "ncmi", "--model.ncmi_kwargs", '{"variant": "harmonic", "tau": 0.5}',
                "--model.centroid_init", cinit, "--model.centroid_optimizer", copt,
                "--model.center_init_batches", "4", "--model.warmup_epochs", "1", "--trainer.logger", "false"])
            m: dict = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
            m["_digest"] = _digest(cli.model.state_dict())
            out[f"mil_{model}_{cinit}_{copt}"] = m
    if natural_epochs > 0:
        cli = NaturalCLI([
            "fit", "--data.dataset", "digits", "--data.image_size", "16", "--data.num_workers", "0",
            "--data.batch_size", "64", "--trainer.accelerator", "cpu", "--trainer.max_epochs", str(natural_epochs),
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--model.width", "0.125", "--model.objective", "ncmi",
            "--model.lr", "0.05", "--model.ncmi_kwargs", '{"tau": 0.3, "variant": "paper"}', "--model.centroid_lr",
            "1.0", "--seed_everything", "0", "--data.limit_train", "256", "--data.limit_val", "128",
            "--trainer.default_root_dir", str(work / "natural")])
        m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
        m["_digest"] = _digest(cli.model.state_dict())
        out["natural"] = m
    return out


def _today(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    return name


def compare(before: dict[str, dict], after: dict[str, dict]) -> float:
    """Print | run | quantity | before | after | |diff| | and return the largest difference (inf: missing)."""
    print("| run | quantity | before | after | abs diff |\n|---|---|---|---|---|")
    worst = 0.0
    for run in sorted(before):
        rows = [(k, v, after.get(run, {}).get(_today(k, OLD_METRICS))) for k, v in before[run].items()
                if k != "_digest"]
        rows += [(k, v, after.get(run, {}).get("_digest", {}).get(_today(k, OLD_KEYS)))
                 for k, v in before[run].get("_digest", {}).items()]
        for key, b, a in sorted(rows):
            diff = abs(b - a) if a is not None else float("inf")
            worst = max(worst, diff)
            print(f"| {run} | {key} | {b:.9g} | {'missing' if a is None else f'{a:.9g}'} | {diff:.2g} |")
    print(f"\nlargest difference: {worst:.3g}")
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (bags, run folders)")
    ap.add_argument("--out", type=Path, required=True, help="JSON of this run's numbers")
    ap.add_argument("--compare", type=Path, help="a JSON written by an earlier run (e.g. before a refactor)")
    ap.add_argument("--models", nargs="+", default=list(MIL_MODELS), choices=list(MIL_MODELS))
    ap.add_argument("--epochs", type=int, default=3, help="MIL epochs")
    ap.add_argument("--natural-epochs", type=int, default=2, help="natural-image epochs (0: skip)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = capture(args.work, args.models, args.epochs, args.natural_epochs)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    if args.compare is not None:
        compare(json.loads(args.compare.read_text()), result)
    else:
        compare(result, result)  # the table of this run's numbers
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
