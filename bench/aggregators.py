"""Throughput and memory of every MIL aggregator: training step (forward + backward) and inference.

One bag per step (the MIL recipe). On CUDA: bf16 autocast, N = 1k, 10k, 50k, inference at 100k, peak memory
from ``torch.cuda.max_memory_allocated`` per configuration. On CPU: fp32 and smaller N by default; memory is
the process peak RSS (monotonic over the run, so it bounds every earlier row).

    python bench/aggregators.py                                   # defaults for the device found
    python bench/aggregators.py --n 1000 10000 50000 --infer-n 100000 --out bench/results/aggregators_gpu.md
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from wsi_ncmi.models import create_model, list_models  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool, dtype: torch.dtype | None) -> None:
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype is not None else torch.autocast(x.device.type,
                                                                                               enabled=False)
    if train:
        with ctx:
            out = model(x)
            loss = F.cross_entropy(out.logits.float(), y) + sum(v.float() for v in out.aux.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.inference_mode(), ctx:
            model(x)


def measure(name: str, n: int, args: argparse.Namespace, device: torch.device, train: bool) -> dict:
    torch.manual_seed(0)
    model = create_model(name, in_dim=args.dim, num_classes=args.classes).to(device).train(train)
    x = torch.randn(1, n, args.dim, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.fp32 else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(args.warmup):
            _step(model, x, y, train, dtype)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            _step(model, x, y, train, dtype)
        _sync(device)
        elapsed = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        return {"bags_s": "OOM", "peak": "OOM"}
    rate = args.repeats / elapsed
    return {"bags_s": f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}", "peak": f"{_peak_mb(device):,.0f}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None, help=f"default: all ({', '.join(list_models())})")
    p.add_argument("--n", nargs="+", type=int, default=None, help="bag sizes for the training step")
    p.add_argument("--infer-n", type=int, default=None, help="bag size for inference (0 = skip)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.n = args.n or ([1000, 10000, 50000] if gpu else [1000, 4000])
    args.infer_n = args.infer_n if args.infer_n is not None else (100000 if gpu else 20000)
    args.repeats = args.repeats or (20 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = args.models or list_models()
    mem = "peak alloc MB" if gpu else "process peak RSS MB"
    prec = "bf16 autocast" if gpu and not args.fp32 else "fp32"
    dev = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"device: {dev}; {prec}; D={args.dim}; batch = 1 bag; repeats={args.repeats}, warmup={args.warmup};"
             f" torch {torch.__version__}", "",
             f"| model | mode | N | bags/s | {mem} |", "|---|---|---|---|---|"]
    for name in models:
        runs = [("train fwd+bwd", n, True) for n in args.n] + ([("inference", args.infer_n, False)]
                                                               if args.infer_n else [])
        for mode, n, train in runs:
            r = measure(name, n, args, device, train)
            lines.append(f"| {name} | {mode} | {n:,} | {r['bags_s']} | {r['peak']} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(table, encoding="utf-8")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
