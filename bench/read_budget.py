"""Where the CPU of read+tissue goes, per output tile, on the ``--read-path fast`` path (issue #26's budget).

    nice -n 10 python bench/read_budget.py --tiles 3072 --tiles-per-slide 1024 --workers 2 --batch-size 64 \
        --repeats 3

Writes the synthetic Aperio-like slides of ``bench/extract.py`` (same options), then measures in one run, CPU
seconds (``time.process_time``, ``getrusage`` for the stream), min / median of ``--repeats``, µs per output tile:

* **decode** — the JPEG tiles of every region, already in memory (``read_region_jpeg``), decoded at the
  reduced scale by the pipeline's decoder call (:data:`preprocessing.jpeg_tiles.DECODERS`) into one buffer:
  libjpeg-turbo's part, the floor of this path;
* **decode + write into the batch** — the same, each decoded JPEG tile copied into its place in the tile's
  slot of a ``--batch-size`` batch (``[B, P, P, 3]``, cycled through as the workers do): + writing 3·P² bytes
  per tile to memory that is not in the cache;
* **read, hot slot** — ``read_tile`` into one batch slot: + file reads, Python, assembling the tile;
* **read, batch** — ``read_tile`` cycling through the batch, as the workers fill theirs;
* **per slide** — open, thumbnail, segmentation, tile grid, overview PNG (``SlideStream._segment_and_tile``,
  warm process), per tile of the slide;
* **stream** — the whole ``SlideStream`` with ``--workers`` DataLoader workers (``bench/extract.py``'s
  ``read_rate``): CPU of main + workers per tile, and of the main process alone;
* **rest** = stream − read, batch − per slide: per-run and per-batch costs (fork, worker start and exit, first
  touch of the shared-memory batches, a cold first slide, messages).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from extract import make_slides, read_rate

from preprocessing.config import PreprocessConfig
from preprocessing.jpeg_tiles import DECODERS, default_decoder
from preprocessing.plan import SlideTask, plan_slides, settings_fingerprint
from preprocessing.readers import open_slide
from preprocessing.stream import SlideStream, read_tile
from preprocessing.tiling import plan_tiles


def per_tile(fn: Callable[[], int], repeats: int) -> list[float]:
    """µs of CPU per tile of ``fn`` (which returns how many tiles it did), once per repeat."""
    out = []
    for _ in range(repeats):
        t0 = time.process_time()
        n = fn()
        out.append((time.process_time() - t0) / max(n, 1) * 1e6)
    return out


def slide_parts(cfg: PreprocessConfig, repeats: int) -> dict[str, list[float]]:
    """decode / read (hot, batch) / per-slide µs per tile, over every slide of ``cfg.input`` (one process)."""
    tasks = plan_slides(cfg)
    out = Path(cfg.output) / "budget"
    shutil.rmtree(out, ignore_errors=True)
    stream = SlideStream(tasks, cfg, settings_fingerprint(cfg, "random"), os.getpid(), out, workers=0)
    p = cfg.patch_size
    batch = np.zeros((cfg.batch_size, p, p, 3), np.uint8)  # [B, P, P, 3], written once so its pages exist
    parts: dict[str, list[float]] = {}
    for task in tasks:
        reader = open_slide(task.path)
        try:
            for name, v in one_slide(stream, task, reader, cfg, batch, repeats).items():
                parts.setdefault(name, []).extend(v)
        finally:
            reader.close()
    return parts


def one_slide(stream: SlideStream, task: SlideTask, reader: Any, cfg: PreprocessConfig, batch: np.ndarray,
              repeats: int) -> dict[str, list[float]]:
    """The four in-process parts for one open slide."""
    p = cfg.patch_size
    plan = plan_tiles(reader.mpp, reader.level_downsamples, cfg.target_mpp, p, cfg.overlap, cfg.mpp_tolerance)
    coords, _ = stream._segment_and_tile(task, reader, plan)  # [K, 2]; also warms the process up
    factor, size = plan.read_size // p, (plan.read_size, plan.read_size)
    data, ends, grid = bytearray(), [0], None
    for xy in coords:  # the regions' JPEG tiles as standalone streams, read once
        grid = reader.read_region_jpeg((int(xy[0]), int(xy[1])), plan.level, size, data, ends)
        if grid is None:
            raise SystemExit(f"{task.path}: region {tuple(xy)} is not made of whole JPEG tiles")
    rows, cols, th, tw = grid if grid is not None else (1, 1, p, p)
    scratch = np.empty((th // factor, tw // factor, 3), np.uint8)  # [th / f, tw / f, 3]
    view, decode = memoryview(data), DECODERS[default_decoder()]

    def dec() -> int:
        for k in range(len(ends) - 1):
            decode(view[ends[k]:ends[k + 1]], factor, (th, tw), scratch)
        return len(coords)

    def dec_write() -> int:
        for i in range(len(coords)):
            tile = batch[i % len(batch)]  # [P, P, 3]
            for q in range(rows * cols):
                k = i * rows * cols + q
                decode(view[ends[k]:ends[k + 1]], factor, (th, tw), scratch)
                y, x = (q // cols) * scratch.shape[0], (q % cols) * scratch.shape[1]
                tile[y:y + scratch.shape[0], x:x + scratch.shape[1]] = scratch
        return len(coords)

    def read(slots: int) -> Callable[[], int]:
        def run() -> int:
            for i, xy in enumerate(coords):
                read_tile(reader, xy, plan, True, out=batch[i % slots])
            return len(coords)
        return run

    def slide() -> int:
        r = open_slide(task.path)
        try:
            return len(stream._segment_and_tile(task, r, plan)[0])
        finally:
            r.close()

    fns = {"decode": dec, "decode + write into the batch": dec_write, "read, hot slot": read(1),
           "read, batch": read(len(batch)), "per slide": slide}
    parts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # the parts interleaved, so that a change of load hits them alike
        for name, fn in fns.items():
            parts[name] += per_tile(fn, 1)
    return parts


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f} / {statistics.median(values):,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=3072)
    ap.add_argument("--tiles-per-slide", type=int, default=1024)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--slide-mpp", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--jpeg-rgb", action="store_true", help="RGB JPEG tiles, no chroma subsampling")
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep slides/outputs in")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench_budget_"))
    slides = root / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    make_slides(slides, a.tiles, a.patch_size, a.target_mpp, a.slide_mpp, a.tiles_per_slide, a.jpeg_quality,
                a.jpeg_rgb)
    cfg = PreprocessConfig(input=str(slides), output=str(root / "out"), target_mpp=a.target_mpp,
                           patch_size=a.patch_size, batch_size=a.batch_size, workers=a.workers, device="cpu",
                           weights="random", min_tissue=0.1, progress=False, read_path="fast",
                           jpeg_decode="cpu").validate()
    load0 = os.getloadavg()[0]
    parts = slide_parts(cfg, a.repeats)
    total, main_only, n = [], [], 0
    for r in range(a.repeats):
        rate, n, busy, busy_workers = read_rate(replace(cfg, output=f"{cfg.output}_{r}"))
        total.append(busy / rate * 1e6)
        main_only.append((busy - busy_workers) / rate * 1e6)
    parts["stream (main + workers)"] = total
    parts["of which the main process"] = main_only
    rest = [t - statistics.median(parts["read, batch"]) - statistics.median(parts["per slide"]) for t in total]
    parts["rest = stream − read, batch − per slide"] = rest
    ref = statistics.median(total)
    print(f"{n} tiles, {a.workers} workers, batch {a.batch_size}, JPEG Q={a.jpeg_quality} "
          f"{'RGB' if a.jpeg_rgb else 'YCbCr 4:2:0'}, {a.slide_mpp} → {a.target_mpp} µm/px\n")
    print("| part | µs of CPU per output tile (min / median) | share of the stream (median) |\n|---|---|---|")
    for name, v in parts.items():
        print(f"| {name} | {spread(v)} | {statistics.median(v) / ref:.0%} |")
    print(f"\nstream: {1e6 / ref:,.0f} tiles per CPU second (median); decode floor alone: "
          f"{1e6 / statistics.median(parts['decode']):,.0f}; load average before {load0:.2f}, after "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if a.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
