"""Seconds per training epoch and peak memory of every aggregator × {CE, NCMI} on synthetic bags.

    python bench/training.py                                   # GPU default: 400 bags of 8000 × 1024, bf16
    python bench/training.py --bags 40 --instances 500 --dim 256 --epochs 2 --precision 32-true   # CPU

Bags are random tensors held in memory (no disk I/O: this measures the model + objective). One bag per
step, AdamW, Lightning-free loop mirroring ``MILModule._objective`` + backward + step (+ the centroid SGD
step and the model's post-step hook), timed after one warm-up epoch. Prints a markdown table with the
NCMI / CE epoch-time ratio per aggregator (goal ≤ 1.05).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time

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
            if module._manual_xi:
                module._centroid_sgd_step()
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
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    bags = [torch.randn(1, args.instances, args.dim, generator=gen).to(device) for _ in range(args.bags)]
    labels = (torch.arange(args.bags) % args.classes).to(device)
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
