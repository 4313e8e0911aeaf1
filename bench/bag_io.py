"""Read throughput of HDF5 bags: raw bytes vs `read_features` vs a DataLoader with K workers.

    python bench/bag_io.py --bags 1000 --n 10000 --dim 1024 --workers 0 2 4

Writes M bags of N x D float16 features into bench/out/bag_io/ (kept for reuse with the same shape unless
--fresh), then times, over the same files:
  raw       plain `readinto` of every file's bytes (what `dd` would measure),
  h5        `wsi_ncmi.data.bags.read_features` one bag after another,
  loader-K  `MILDataModule`-style DataLoader (BagDataset + collate_bags, batch 1) with K workers.
Before each pass it tries `echo 3 > /proc/sys/vm/drop_caches` (needs root); when that fails the reads
are warm (from the page cache) and the report says so.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from wsi_ncmi.data.bags import list_bags, read_features, write_bag
from wsi_ncmi.data.batching import collate_bags
from wsi_ncmi.data.mil import BagDataset

OUT = Path(__file__).resolve().parent / "out" / "bag_io"


def drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def make_bags(folder: Path, m: int, n: int, d: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d)).astype(np.float16)
    coords = np.stack([np.arange(n), np.arange(n)], 1) * 256
    existing = list_bags(folder)
    for i in range(m):
        sid = f"slide_{i:05d}"
        if sid in existing:
            continue
        base[i % n] += np.float16(1.0)  # distinct content per file, no compression anyway
        write_bag(folder / f"{sid}.h5", base, coords, {"encoder": "bench", "slide_id": sid})
    return [folder / f"slide_{i:05d}.h5" for i in range(m)]


def time_raw(paths: list[Path]) -> tuple[float, int]:
    buf = bytearray(max(p.stat().st_size for p in paths))
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            total += fh.readinto(buf)
    return time.perf_counter() - t0, total


def time_h5(paths: list[Path]) -> tuple[float, int]:
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        total += read_features(p).nbytes
    return time.perf_counter() - t0, total


def time_loader(paths: list[Path], folder: Path, workers: int) -> tuple[float, int]:
    table = pd.DataFrame({"slide_id": [p.name[:-3] for p in paths], "patient_id": [p.name for p in paths],
                          "label": 0, "split": "test"})
    ds = BagDataset(table, folder, "test")
    loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate_bags)
    total = 0
    t0 = time.perf_counter()
    for batch in loader:
        total += batch["features"].numel() * 2  # bytes as stored (fp16) for a like-for-like GB/s
    return time.perf_counter() - t0, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bags", type=int, default=1000, help="M bags")
    ap.add_argument("--n", type=int, default=10000, help="instances per bag")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--repeats", type=int, default=2, help="passes per method (best is reported)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fresh", action="store_true", help="delete and regenerate the bags")
    ap.add_argument("--cleanup", action="store_true", help="delete the bags afterwards")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder = args.out / f"{args.bags}x{args.n}x{args.dim}"
    if args.fresh and folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    paths = make_bags(folder, args.bags, args.n, args.dim)
    gen_s = time.perf_counter() - t0
    size_gb = sum(p.stat().st_size for p in paths) / 1e9
    cold = drop_caches()
    print(f"# bag_io: {args.bags} bags x {args.n} x {args.dim} fp16 = {size_gb:.2f} GB on disk "
          f"(prepared in {gen_s:.1f} s); {platform.node()}, {torch.get_num_threads()} torch thread(s), "
          f"reads {'cold (page cache dropped before each pass)' if cold else 'WARM (cannot drop page cache)'}")
    methods = [("raw", lambda: time_raw(paths)), ("h5", lambda: time_h5(paths))]
    methods += [(f"loader-{k}", (lambda k=k: time_loader(paths, folder, k))) for k in args.workers]
    print("| method | bags/s | GB/s | seconds | vs raw |")
    print("|---|---|---|---|---|")
    raw_rate = None
    for name, fn in methods:
        best = None
        for _ in range(args.repeats):
            drop_caches()
            secs, nbytes = fn()
            best = (secs, nbytes) if best is None or secs < best[0] else best
        secs, nbytes = best
        rate = nbytes / secs / 1e9
        raw_rate = raw_rate or rate
        print(f"| {name} | {args.bags / secs:.1f} | {rate:.2f} | {secs:.2f} | {rate / raw_rate:.2f}x |")
    if args.cleanup:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
