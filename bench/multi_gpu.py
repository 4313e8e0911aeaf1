"""``wsi-preprocess --devices``: one GPU vs every GPU of the node, same slides, same settings.

    python bench/multi_gpu.py --runs 0 all --workers 15 --encoder vit_base_patch16_224 --tiles 40000

Writes synthetic 40×-like slides (``bench/extract.py``'s), then for each ``--runs`` entry runs the whole pipeline
(``preprocessing.extract.run`` with ``devices=<entry>``, random weights, its own output folder) and prints
tiles/s, tiles/s per device and each GPU's busy share (``utilization.gpu`` sampled by ``nvidia-smi`` every
0.5 s while the run lasts; "-" without nvidia-smi). Also checks that every run wrote the same bags: same
coords, and features within bf16 noise of the first run (max abs difference printed). ``--runs cpu cpu,cpu
--device cpu --encoder test_resnet --tiles 400`` is a CPU smoke test.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
from extract import make_slides

from preprocessing.config import PreprocessConfig
from preprocessing.devices import parse_devices
from preprocessing.extract import run


class GpuSampler(threading.Thread):
    """``nvidia-smi`` utilization.gpu [%] per GPU every ``period`` seconds until stopped."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append([float(v) for v in out.split()])
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.stop.wait(self.period)

    def busy(self, devices: list[str]) -> str:
        if not self.samples:
            return "-"
        util = np.asarray(self.samples, float).mean(axis=0)  # [GPUs]
        idx = [int(d.split(":")[1]) for d in devices if d.startswith("cuda:")]
        return ", ".join(f"GPU{i} {util[i]:.0f}%" for i in idx if i < len(util)) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["0", "all"], help="--devices values, e.g. 0 all / 0 0,1")
    ap.add_argument("--encoder", default="vit_base_patch16_224")
    ap.add_argument("--tiles", type=int, default=40000)
    ap.add_argument("--tiles-per-slide", type=int, default=2500)
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--read-path", default="fast")
    ap.add_argument("--slide-mpp", type=float, default=0.25)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_multi_gpu_"))
    make_slides(root / "slides", a.tiles, 256, 0.5, a.slide_mpp, a.tiles_per_slide)
    print("| --devices | tiles | wall s | tiles/s | tiles/s per device | GPU busy (mean of samples) | "
          "max |Δfeature| vs first run |")
    print("|---|---|---|---|---|---|---|")
    first: Path | None = None
    for spec in a.runs:
        out = root / f"out_{spec.replace(',', '_')}"
        cfg = PreprocessConfig(input=str(root / "slides"), output=str(out), encoder=a.encoder, weights="random",
                               batch_size=a.batch_size, workers=a.workers, device=a.device, precision=a.precision,
                               read_path=a.read_path, devices=spec, progress=False).validate()
        devices = parse_devices(spec)
        sampler = GpuSampler()
        sampler.start()
        t0 = time.perf_counter()
        res = run(cfg)
        dt = time.perf_counter() - t0
        sampler.stop.set()
        n, diff = 0, 0.0
        for sid in res.written:
            with h5py.File(out / "bags" / f"{sid}.h5") as f:
                n += len(f["coords"])
                if first is not None:
                    with h5py.File(first / "bags" / f"{sid}.h5") as g:
                        assert np.array_equal(f["coords"][:], g["coords"][:]), sid
                        diff = max(diff, float(np.abs(f["features"][:].astype(np.float32)
                                                      - g["features"][:].astype(np.float32)).max()))
        first = first or out
        print(f"| {spec} | {n} | {dt:.1f} | {n / dt:,.0f} | {n / dt / len(devices):,.0f} | {sampler.busy(devices)} "
              f"| {diff:.3g} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
