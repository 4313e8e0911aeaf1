"""Benchmark: NCMILoss forward+backward vs a linear cross-entropy head (not a test).

    .venv/bin/python bench/ncmi_loss.py --device cpu --repeats 3
    .venv/bin/python bench/ncmi_loss.py --device cuda --repeats 50

For each (B, C, D) it times one forward+backward of
  * ``ncmi``  — NCMILoss(C, D) (paper variant, matmul form, sgd centroids) on features [B, D];
  * ``ce``    — nn.Linear(D, C) + cross entropy on the same features (the cost NCMI replaces);
  * ``naive`` — the same paper-variant loss written with [B, C, D] broadcasting (small size only),
and reports the median time, the peak extra memory and the ratio to ``ce``.

Each case runs in a fresh subprocess so its memory peak is its own: on CPU the peak is the rise of the
process's max RSS over its value after inputs and modules were created (page-level, approximate); on
CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory allocated before the first step.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = [(256, 100, 512), (1024, 1000, 2048)]
NAIVE_SIZES = [(256, 100, 512)]


def _naive_paper_loss(features, target, xi, center, tau):  # pragma: no cover - benchmark only
    """Paper-variant NCMI with [B, C, D] broadcasting, as the public code materialises it."""
    import torch
    import torch.nn.functional as F

    from wsi_ncmi.ncmi import log_nsf

    b, c = features.shape[0], xi.shape[0]
    z = F.normalize(features - center, dim=1) / tau
    log_p = log_nsf(z)  # [B, D]
    log_q = log_nsf(xi)  # [C, D]
    p, q = log_p.exp(), log_q.exp()
    kl_pq = (p[:, None, :] * (log_p[:, None, :] - log_q[None, :, :])).sum(-1)  # [B, C] via [B, C, D]
    kl_qp = (q[None, :, :] * (log_q[None, :, :] - log_p[:, None, :])).sum(-1)  # [B, C] via [B, C, D]
    rows = torch.arange(b, device=features.device)
    cmi = kl_pq[rows, target].mean()
    counts = torch.bincount(target, minlength=c).to(p.dtype)
    w = (1 - F.one_hot(target, c).to(p.dtype)) * counts[None]
    gamma = (w * kl_qp).sum() / b**2
    return cmi / gamma


def _worker(
    method: str, b: int, c: int, d: int, device: str, repeats: int, warmup: int, threads: int
) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from wsi_ncmi.ncmi import NCMILoss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    feats = torch.randn(b, d, device=dev, requires_grad=True)
    target = torch.randint(0, c, (b,), device=dev)
    if method == "ncmi":
        mod = NCMILoss(c, d).to(dev)

        def step():
            return mod(feats, target)["loss"]

    elif method == "ce":
        mod = nn.Linear(d, c).to(dev)

        def step():
            return F.cross_entropy(mod(feats), target)

    elif method == "naive":
        mod = NCMILoss(c, d).to(dev)
        center = feats.detach().mean(0)

        def step():
            return _naive_paper_loss(feats, target, mod.xi, center, mod.tau)

    else:
        raise SystemExit(f"unknown method {method}")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_once():
        feats.grad = None
        for prm in mod.parameters():
            prm.grad = None
        step().backward()

    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(warmup):
        run_once()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_once()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base_mem
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    return {
        "method": method,
        "B": b,
        "C": c,
        "D": d,
        "device": device,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "peak_mb": peak / 2**20,
        "repeats": repeats,
    }


def _run_case(args: argparse.Namespace, method: str, size: tuple[int, int, int], device: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        *map(str, size),
        "--device",
        device,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {
            "method": method,
            "B": size[0],
            "C": size[1],
            "D": size[2],
            "device": device,
            "error": out.stderr[-500:],
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when present)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: a shared machine oversubscribed by 2 threads gives 10-100x noise)",
    )
    ap.add_argument("--sizes", default="", help="override sizes, e.g. '64x10x32,128x20x64'")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "B", "C", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        method, b, c, d = args.worker[0], *map(int, args.worker[1:])
        res = _worker(method, b, c, d, args.device, args.repeats, args.warmup, args.threads)
        print(json.dumps(res))
        return 0

    import torch

    if args.device == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")] if args.sizes else SIZES
    naive_sizes = [s for s in sizes if s in NAIVE_SIZES] or sizes[:1]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, cpu threads {args.threads}, gpu {gpu}"
    )
    print(f"repeats {args.repeats}, warmup {args.warmup}")
    print("| device | B | C | D | method | median ms | min ms | peak MB | time / CE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for size in sizes:
            methods = ["ce", "ncmi"] + (["naive"] if size in naive_sizes else [])
            results = {m: _run_case(args, m, size, device) for m in methods}
            ce_ms = results["ce"].get("median_ms")
            for m, r in results.items():
                if "error" in r:
                    print(
                        f"| {device} | {size[0]} | {size[1]} | {size[2]} | {m} | failed: {r['error'].splitlines()[-1]} |||||"
                    )
                    continue
                ratio = f"{r['median_ms'] / ce_ms:.2f}" if ce_ms else "n/a"
                print(
                    f"| {device} | {size[0]} | {size[1]} | {size[2]} | {m} | {r['median_ms']:.2f} | "
                    f"{r['min_ms']:.2f} | {r['peak_mb']:.1f} | {ratio} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
