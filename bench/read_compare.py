"""Peer reading loops for ``bench/extract.py --compare``: the same slides and tile geometry read the way CLAM's
feature extractor reads them, and through ``hs2p`` (when importable). Each runs in this process on one core and
returns (tiles, CPU seconds, wall seconds), so the rate per busy core is tiles / CPU seconds.

* CLAM (``dataset_modules/dataset_h5.py``, ``Whole_Slide_Bag_FP.__getitem__``): one OpenSlide ``read_region``
  per tile at the patch level, ``.convert('RGB')``, then ``img.resize(target_patch_size)`` when the patch is
  downsampled (PIL's default filter). Its ``ToTensor`` + ``Normalize`` on the CPU is not counted (our
  pipeline normalises on the device), nor its separate tissue segmentation step: both favour CLAM.
* hs2p (``pip install hs2p``): ``tile_slide`` (its tissue segmentation + tiling, OpenSlide backend) and
  ``iter_tile_arrays_from_result`` (its grouped region reads), so tissue is counted as in our read+tissue.
  It yields tiles at the read level (512 px for 0.25 → 0.5 µm/px); the same cv2 ``INTER_AREA`` resize as our
  exact path is added so every loop ends with 256-px tiles.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from preprocessing.readers import OpenSlideReader
from preprocessing.tiling import grid_coords, plan_tiles

__all__ = ["clam_loop", "hs2p_loop", "hs2p_available"]


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def clam_loop(slides: Sequence[Path], target_mpp: float, patch: int) -> tuple[int, float, float]:
    """CLAM's per-tile loop over every grid tile of ``slides`` (all-tissue synthetic slides)."""
    import openslide

    n, (c0, w0) = 0, _clock()
    for path in slides:
        with OpenSlideReader(path, fast=False) as r:  # only for mpp and the grid: the same geometry as ours
            plan = plan_tiles(r.mpp, r.level_downsamples, target_mpp, patch)
            coords = grid_coords(*r.dimensions, plan)
        wsi = openslide.OpenSlide(str(path))
        for x, y in coords:
            img = wsi.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size)).convert("RGB")
            if plan.read_size != patch:
                img = img.resize((patch, patch))
            np.asarray(img)
            n += 1
        wsi.close()
    c1, w1 = _clock()
    return n, c1 - c0, w1 - w0


def hs2p_available() -> str:
    """"" when hs2p imports, else why not."""
    try:
        import hs2p.api  # noqa: F401
        from hs2p.wsi.streaming.stream import iter_tile_arrays_from_result  # noqa: F401
    except Exception as e:  # not installed, or one of its dependencies missing
        return f"{type(e).__name__}: {e}"
    return ""


def hs2p_loop(slides: Sequence[Path], target_mpp: float, patch: int) -> tuple[int, float, float]:
    """hs2p's tiling (segmentation included) and tile reads, OpenSlide backend, one process."""
    from hs2p.api import SegmentationConfig, SlideSpec, TilingConfig, tile_slide
    from hs2p.wsi.streaming.stream import iter_tile_arrays_from_result

    tiling = TilingConfig(requested_spacing_um=target_mpp, requested_tile_size_px=patch, tolerance=0.05,
                          overlap=0.0, backend="openslide")
    n, (c0, w0) = 0, _clock()
    for path in slides:
        result = tile_slide(SlideSpec(sample_id=path.stem, image_path=path), tiling=tiling,
                            segmentation=SegmentationConfig(method="hsv"), num_workers=1)  # its default method
        for tile in iter_tile_arrays_from_result(result=result, num_workers=1):
            if tile.shape[:2] != (patch, patch):  # hs2p yields the read-level tile: our exact path's resize
                tile = cv2.resize(tile, (patch, patch), interpolation=cv2.INTER_AREA)
            n += 1
    c1, w1 = _clock()
    return n, c1 - c0, w1 - w0
