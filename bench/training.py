"""Seconds per training epoch and peak memory of every aggregator × {CE, NCMI} on synthetic bags, and
`wsi-ncmi fit` against a plain PyTorch loop (``--fit``).

    python bench/training.py                                   # GPU default: 400 bags of 8000 × 1024, bf16
    python bench/training.py --bags 40 --instances 500 --dim 256 --epochs 2 --precision 32-true   # CPU
    python bench/training.py --fit --bags 240 --val-bags 80 --instances 250 --models abmil   # fit / plain (CPU)

``--fit``: the same bags are written to a temporary folder; ``wsi-ncmi fit`` (in-process, the shipped
``configs/mil`` base + model + objective files, ``--data.cache`` auto) is timed at ``--fit-epochs`` E1 and E2
epochs, validation every epoch, and the per-epoch time is (t(E2) − t(E1)) / (E2 − E1) so start-up cancels.
The plain loop is what a user would write: the same model and objective, AdamW + per-step cosine, bags
pre-loaded as float16 tensors, one bag per step, a validation pass (class scores + macro-AUC) every epoch,
timed the same way. Prints train bags/s of both and ``fit / plain`` (goal ≥ 1.0).

Bags are random tensors held in memory (no disk I/O: this measures the model + objective). One bag per
step, AdamW, Lightning-free loop mirroring ``MILModule._objective`` + backward + step (+ the centroid SGD
step and the model's post-step hook), timed after one warm-up epoch. Prints a markdown table with the
NCMI / CE epoch-time ratio per aggregator (goal ≤ 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import resource
import sys
import time

import numpy as np
import torch

from wsi_ncmi.models import list_models
from wsi_ncmi.training import MILModule


def _autocast(device: torch.device, precision: str):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process max RSS (KiB on Linux)


def run_one(model: str, objective: str, bags: list[torch.Tensor], labels: torch.Tensor, args, device) -> tuple[float, float]:
    torch.manual_seed(0)
    module = MILModule(model=model, in_dim=args.dim, num_classes=args.classes,
                       objective="ncmi" if objective == "ncmi" else "head").to(device)
    module.train()
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-5)
    if module.ncmi_loss is not None:
        module.ncmi_loss.center.update(torch.randn(4, module.model.embed_dim, device=device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def epoch() -> None:
        for x, y in zip(bags, labels):
            with _autocast(device, args.precision):
                named, _ = module._objective({"features": x, "mask": None, "label": y.view(1)})
            opt.zero_grad(set_to_none=True)
            named["loss"].backward()
            if module.ncmi_training is not None:
                module.ncmi_training.before_optimizer_step()
            opt.step()
            module.model.on_after_optimizer_step()

    epoch()  # warm-up
    times = []
    for _ in range(args.epochs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        epoch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times), _peak_mb(device)


# ------------------------------------------------------------------------------------ fit vs plain loop
def _write_bags(root, bags, labels, n_train: int) -> tuple[str, str]:
    import pandas as pd

    from wsi_ncmi.data.bags import write_bag
    from wsi_ncmi.data.splits import write_split

    rows = []
    for i, (x, y) in enumerate(zip(bags, labels.tolist())):
        feats = x[0].cpu().half().numpy()
        write_bag(root / f"b{i:04d}.h5", feats, np.zeros((feats.shape[0], 2), np.int64), {})
        rows.append({"slide_id": f"b{i:04d}", "patient_id": f"p{i:04d}", "label": y,
                     "split": "train" if i < n_train else "val"})
    split = write_split(pd.DataFrame(rows), root / "split.csv")
    return str(root), str(split)


def _plain_epochs(model: str, objective: str, bags, labels, n_train: int, epochs: int, args, device) -> float:
    """Seconds for ``epochs`` epochs of the hand-written loop (train + validation each epoch)."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    module = MILModule(model=model, in_dim=args.dim, num_classes=args.classes,
                       objective="ncmi" if objective == "ncmi" else "head", lr=args.lr).to(device)
    data = [b[0].half().to(device) for b in bags]  # what a user keeps in memory: float16 bags
    y = labels.to(device)
    opt = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-5)
    steps = epochs * n_train
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    if module.ncmi_loss is not None:
        with torch.no_grad():
            module.ncmi_loss.center.update(torch.stack([module.embed(data[i][None]).squeeze(0) for i in range(min(16, n_train))]).mean(0, keepdim=True))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        module.train()
        for i in torch.randperm(n_train, generator=gen).tolist():
            with _autocast(device, args.precision):
                named, _ = module._objective({"features": data[i][None], "mask": None, "label": y[i:i + 1]})
            opt.zero_grad(set_to_none=True)
            named["loss"].backward()
            if module.ncmi_training is not None:
                module.ncmi_training.before_optimizer_step()
            opt.step()
            sched.step()
            module.model.on_after_optimizer_step()
        module.eval()
        with torch.no_grad(), _autocast(device, args.precision):
            scores = torch.cat([module(data[i][None]) for i in range(n_train, len(data))]).float().cpu().numpy()
        truth = labels[n_train:].numpy()
        if len(set(truth.tolist())) == args.classes:
            roc_auc_score(truth, scores, multi_class="ovr", average="macro")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _fit_seconds(model: str, objective: str, bags_dir: str, split: str, epochs: int, root, args) -> float:
    import contextlib
    import io
    import logging

    from mil_benchmark import shipped_fit_args

    from wsi_ncmi.training.cli import run_cli

    for name in ("lightning", "lightning.pytorch", "wsi_ncmi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cli_args = shipped_fit_args(model, objective, bags_dir, split, args.classes, epochs,
                                root / f"{model}_{objective}_{epochs}")
    cli_args += ["--model.lr", str(args.lr), "--trainer.precision", args.precision]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run_cli("fit", cli_args)
    return time.perf_counter() - t0


def fit_vs_plain(args, device) -> None:
    import tempfile
    from pathlib import Path

    gen = torch.Generator().manual_seed(0)
    n = args.bags + args.val_bags
    bags = [torch.randn(1, args.instances, args.dim, generator=gen) for _ in range(n)]
    labels = torch.arange(n) % args.classes
    e1, e2 = args.fit_epochs
    print(f"\n`wsi-ncmi fit` vs a plain loop: {args.bags} train + {args.val_bags} val bags × {args.instances} × "
          f"{args.dim} (float16 on disk), one bag per step, validation every epoch; epochs {e1} and {e2}\n")
    print("| aggregator | objective | plain s/epoch | fit s/epoch | plain train bags/s | fit train bags/s | fit / plain |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bags").mkdir()
        bags_dir, split = _write_bags(root / "bags", bags, labels, args.bags)
        for model in args.models or ["abmil"]:
            for objective in ("ce", "ncmi"):
                plain = (_plain_epochs(model, objective, bags, labels, args.bags, e2, args, device)
                         - _plain_epochs(model, objective, bags, labels, args.bags, e1, args, device)) / (e2 - e1)
                fit = (_fit_seconds(model, objective, bags_dir, split, e2, root, args)
                       - _fit_seconds(model, objective, bags_dir, split, e1, root, args)) / (e2 - e1)
                print(f"| {model} | {objective} | {plain:.2f} | {fit:.2f} | {args.bags / plain:.1f} | "
                      f"{args.bags / fit:.1f} | {plain / fit:.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bags", type=int, default=400)
    p.add_argument("--instances", type=int, default=8000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up (min is reported)")
    p.add_argument("--precision", default=None, help="bf16-mixed (CUDA default) | 16-mixed | 32-true (CPU default)")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fit", action="store_true", help="time `wsi-ncmi fit` against a plain loop instead")
    p.add_argument("--val-bags", type=int, default=80, help="--fit: validation bags")
    p.add_argument("--fit-epochs", type=int, nargs=2, default=(1, 3), help="--fit: the two epoch counts timed")
    p.add_argument("--lr", type=float, default=1e-4, help="--fit: learning rate of both loops")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    bags = [torch.randn(1, args.instances, args.dim, generator=gen).to(device) for _ in range(args.bags)]
    labels = (torch.arange(args.bags) % args.classes).to(device)
    if args.fit:
        fit_vs_plain(args, device)
        return 0
    models = args.models or list_models()
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, {args.bags} bags × {args.instances} × {args.dim}, C={args.classes}, "
          f"{args.precision}, threads={torch.get_num_threads()}")
    print("\n| aggregator | CE s/epoch | NCMI s/epoch | NCMI/CE | CE peak MB | NCMI peak MB |")
    print("|---|---|---|---|---|---|")
    for model in models:
        ce_t, ce_m = run_one(model, "ce", bags, labels, args, device)
        nc_t, nc_m = run_one(model, "ncmi", bags, labels, args, device)
        print(f"| {model} | {ce_t:.3f} | {nc_t:.3f} | {nc_t / ce_t:.3f} | {ce_m:.0f} | {nc_m:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
