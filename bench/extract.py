"""Throughput of `wsi-preprocess`: full pipeline vs bare encoder ceiling, plus CPU read+tissue rates.

    python bench/extract.py --tiles 20000 --encoders resnet50_trunc vit_base_patch16_224 vit_large_patch16_224

Writes synthetic all-tissue slides holding ~``--tiles`` tiles at the target mpp, then per encoder (random
weights) measures in the same process:
  * ceiling  — random uint8 tiles already on the device, same model, batch and precision;
  * pipeline — ``preprocessing.extract.run`` end to end (read, tissue, tiles, encode, write bags);
and once: read — the SlideStream alone (tissue + tile decode + resize in DataLoader workers, no model),
with the busy cores it used (CPU seconds of main + workers / wall seconds) and the load average.
Prints a Markdown table. ``--encoders`` with no names measures read+tissue only.

Read+tissue is measured ``--repeats`` times per ``--read-path`` (fast, exact or both) and ``--jpeg-decode``
(cpu, device or both) and reported as min / median / max of tiles/s (wall) and of tiles per CPU second of
main + workers ("per busy core", the number that means something on a shared machine), plus the median tiles
per CPU second of the workers alone (with ``--jpeg-decode device`` the main process decodes on ``--device``: on
a GPU that leaves the workers reading bytes; on CPU the decode moves to the main process's core). ``--compare`` adds, on the same slides and tile grid,
CLAM's per-tile OpenSlide loop and hs2p (``bench/read_compare.py``), each on one core.

    nice -n 10 python bench/extract.py --encoders --tiles 1600 --tiles-per-slide 400 --workers 2 \
        --read-path both --repeats 3 --compare
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from preprocessing import readers, synthetic
from preprocessing.config import PreprocessConfig
from preprocessing.device_decode import DeviceDecoder
from preprocessing.encoders import build_encoder, resolve_device
from preprocessing.extract import _identity, _loader_kwargs, run
from preprocessing.plan import plan_slides, settings_fingerprint
from preprocessing.stream import SlideStream, read_tile


def make_slides(folder: Path, n_tiles: int, patch: int, target_mpp: float, slide_mpp: float, per_slide: int,
                quality: int = 90, jpeg_rgb: bool = False) -> int:
    tex = synthetic.package_textures() or {"x": synthetic.stripes(256, 256, 16)}
    texture = next(iter(tex.values()))
    foot = round(patch * target_mpp / slide_mpp)
    n_slides = max(1, round(n_tiles / per_slide))
    side = int(np.ceil(np.sqrt(n_tiles / n_slides))) * foot
    for i in range(n_slides):
        reps = (side // texture.shape[0] + 1, side // texture.shape[1] + 1, 1)
        rgb = np.ascontiguousarray(np.roll(np.tile(texture, reps)[:side, :side], 37 * i, axis=1))
        synthetic.write_svs(folder / f"bench_{i:03d}.svs", rgb, mpp=slide_mpp, downsamples=(1, 4, 16),
                            jpeg_quality=quality, jpeg_rgb=jpeg_rgb)
    return n_slides


def ceiling(enc, batch: int, patch: int, seconds: float) -> float:
    x = torch.randint(0, 256, (batch, patch, patch, 3), dtype=torch.uint8, device=enc.device)
    enc.encode(x)  # warm-up
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        enc.encode(x)
        n += batch
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def cpu_seconds(who: int | None = None) -> float:
    """CPU time (user + system) of this process and its reaped children (the DataLoader workers); ``who``:
    ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN`` alone."""
    use = [resource.getrusage(w) for w in ((who,) if who is not None else (resource.RUSAGE_SELF,
                                                                            resource.RUSAGE_CHILDREN))]
    return sum(u.ru_utime + u.ru_stime for u in use)


def read_rate(cfg: PreprocessConfig) -> tuple[float, int, float, float]:
    """(tiles/s wall, tiles, busy cores = CPU seconds / wall seconds of main + workers, of the workers) of the
    SlideStream alone; ``jpeg`` messages (``--jpeg-decode device``) decoded here on ``cfg.device``."""
    tasks = plan_slides(cfg)
    stream = SlideStream(tasks, cfg, settings_fingerprint(cfg, "random"), os.getpid(), Path(cfg.output) / "readonly",
                         workers=cfg.workers)
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.workers, collate_fn=_identity,
                        prefetch_factor=4 if cfg.workers else None, **_loader_kwargs())
    device = resolve_device(cfg.device)
    decoder = DeviceDecoder(device, tasks, read_tile, cfg.read_path == "fast") if cfg.jpeg_decode == "device" else None
    n, t0, c0, w0 = 0, time.perf_counter(), cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    for msg in loader:  # exhausting the iterator joins (reaps) the workers, so their CPU time is counted
        if msg["kind"] == "jpeg":  # only sent with --jpeg-decode device
            msg = decoder.tiles(msg)
        if msg["kind"] == "tiles":
            n += len(msg["index"])
            stream.release(msg)  # as the pipeline's main loop does once a batch is encoded
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if decoder is not None:
        decoder.close()
    del loader
    return n / dt, n, (cpu_seconds() - c0) / dt, (cpu_seconds(resource.RUSAGE_CHILDREN) - w0) / dt


def spread(values: list[float]) -> str:
    """min / median / max."""
    return " / ".join(f"{v:,.0f}" for v in (min(values), statistics.median(values), max(values)))


def read_rows(cfg: PreprocessConfig, paths: list[str], repeats: int, decodes: tuple[str, ...] = ("cpu",)) -> list[str]:
    """One table row per read path and JPEG decode: tiles, tiles/s wall and per busy core (min / median / max
    of repeats), and per busy core of the workers alone (median)."""
    rows = []
    for path in paths:
        for dec in decodes:
            wall, per_core, busy, per_worker, n = [], [], [], [], 0
            for r in range(repeats):  # a fresh output folder each time (the stream leaves its locks behind)
                shutil.rmtree(f"{cfg.output}_{path}_{dec}_{r}", ignore_errors=True)
                rate, n, b, bw = read_rate(replace(cfg, read_path=path, jpeg_decode=dec,
                                                   output=f"{cfg.output}_{path}_{dec}_{r}"))
                wall.append(rate)
                busy.append(b)
                per_core.append(rate / max(b, 1e-9))
                per_worker.append(rate / max(bw, 1e-9) if cfg.workers else float("nan"))
            rows.append(f"| ours, --read-path {path} --jpeg-decode {dec} ({cfg.workers} workers) | {n} | "
                        f"{spread(wall)} | {statistics.median(busy):.2f} | **{spread(per_core)}** | "
                        f"{statistics.median(per_worker):,.0f} |")
    return rows


def compare_rows(slides: list[Path], target_mpp: float, patch: int, repeats: int) -> list[str]:
    """CLAM's loop and hs2p on the same slides, one core each (tiles per CPU second)."""
    import read_compare as rc

    loops = {"CLAM loop (OpenSlide read_region per tile + PIL resize)": rc.clam_loop}
    why = rc.hs2p_available()
    if not why:
        loops["hs2p 6.x (tile_slide + iter_tile_arrays_from_result, OpenSlide)"] = rc.hs2p_loop
    rows = []
    for name, loop in loops.items():
        wall, per_core, busy, n = [], [], [], 0
        for _ in range(repeats):
            n, cpu, dt = loop(slides, target_mpp, patch)
            wall.append(n / dt)
            busy.append(cpu / dt)
            per_core.append(n / max(cpu, 1e-9))
        rows.append(f"| {name} (1 process) | {n} | {spread(wall)} | {statistics.median(busy):.2f} | "
                    f"**{spread(per_core)}** | - |")
    if why:
        rows.append(f"| hs2p: not measured ({why}) | - | - | - | - | - |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=20000)
    ap.add_argument("--tiles-per-slide", type=int, default=5000)
    ap.add_argument("--encoders", nargs="*", default=["resnet50_trunc", "vit_base_patch16_224", "vit_large_patch16_224"],
                    help="none: measure read+tissue only")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--slide-mpp", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--ceiling-seconds", type=float, default=10.0)
    ap.add_argument("--openslide-only", action="store_true",
                    help="baseline: read every region through OpenSlide (no direct TIFF tile decoding)")
    ap.add_argument("--read-path", choices=("fast", "exact", "both"), default="both")
    ap.add_argument("--jpeg-decode", choices=("cpu", "device", "both"), default="cpu",
                    help="where whole-tile JPEG regions are decoded (device: the main process, on --device)")
    ap.add_argument("--repeats", type=int, default=1, help="read+tissue (and --compare) repeats: min/median/max")
    ap.add_argument("--compare", action="store_true", help="also CLAM's per-tile loop and hs2p, same slides")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--jpeg-rgb", action="store_true", help="RGB JPEG tiles, no chroma subsampling (Aperio "
                    "'JPEG/RGB'); default YCbCr 4:2:0")
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep slides/outputs in")
    a = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    if a.openslide_only:  # DataLoader workers are forked, so they inherit the patched registry
        for ext, cls in list(readers.READERS.items()):
            if cls is readers.OpenSlideReader:
                readers.READERS[ext] = functools.partial(readers.OpenSlideReader, fast=False)
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    slides, out = root / "slides", root / "out"
    slides.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_slides = make_slides(slides, a.tiles, a.patch_size, a.target_mpp, a.slide_mpp, a.tiles_per_slide,
                           a.jpeg_quality, a.jpeg_rgb)
    print(f"wrote {n_slides} synthetic slide(s) in {time.perf_counter() - t0:.1f}s under {slides}")
    base = dict(input=str(slides), target_mpp=a.target_mpp, patch_size=a.patch_size, batch_size=a.batch_size,
                workers=a.workers, device=a.device, precision=a.precision, compile=a.compile, weights="random",
                min_tissue=0.1, progress=False)
    load0 = os.getloadavg()
    paths = ["fast", "exact"] if a.read_path == "both" else [a.read_path]
    decodes = ("cpu", "device") if a.jpeg_decode == "both" else (a.jpeg_decode,)
    rows = read_rows(PreprocessConfig(output=str(out / "read"), **base).validate(), paths, a.repeats, decodes)
    if a.compare:
        rows += compare_rows(sorted(slides.glob("*.svs")), a.target_mpp, a.patch_size, a.repeats)
    notes = [f"load average before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; "
             "per busy core = tiles / CPU seconds (main process + DataLoader workers); of the workers: their CPU "
             "seconds alone"]
    enc_rows = []
    for name in a.encoders:
        enc = build_encoder(name, "random", base["device"], a.precision, a.compile, tile_size=a.patch_size)
        ceil = ceiling(enc, a.batch_size, enc.preprocess.size or a.patch_size, a.ceiling_seconds)
        del enc
        for dec in decodes:
            cfg = PreprocessConfig(output=str(out / f"{name}_{dec}"), encoder=name, read_path=paths[0],
                                   jpeg_decode=dec, **base).validate()
            t, c = time.perf_counter(), cpu_seconds()
            res = run(cfg)
            dt = time.perf_counter() - t
            notes.append(f"{name} --jpeg-decode {dec} pipeline: {(cpu_seconds() - c) / dt:.2f} busy cores, load "
                         f"average {os.getloadavg()[0]:.2f}")
            from wsi_ncmi.data.bags import read_header

            n = sum(read_header(Path(cfg.output) / "bags" / f"{s}.h5")[0] for s in res.written)
            enc_rows.append(f"| {name}, --jpeg-decode {dec} | {ceil:,.3g} | {n} | {n / dt:,.3g} | {n / dt / ceil:.2f} |")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else "CPU"
    print(f"\ndevice: {dev}; torch {torch.__version__}; precision {a.precision}; batch {a.batch_size}; "
          f"patch {a.patch_size} @ {a.target_mpp} µm/px from {a.slide_mpp} µm/px slides; compile={a.compile}; "
          f"workers {a.workers}; JPEG Q={a.jpeg_quality} {'RGB' if a.jpeg_rgb else 'YCbCr 4:2:0'}; "
          f"reads: {'OpenSlide only' if a.openslide_only else 'direct TIFF tiles'}\n")
    print("| read+tissue | tiles | tiles/s wall (min / median / max) | busy cores | tiles/s per busy core | "
          "per busy core of the workers |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if enc_rows:
        print("\n| encoder | ceiling tiles/s | tiles | pipeline tiles/s | pipeline / ceiling |")
        print("|---|---|---|---|---|")
        print("\n".join(enc_rows))
    print("\n" + "\n".join(notes))
    if a.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
