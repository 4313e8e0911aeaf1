"""``--read-path fast`` internals: the JPEG tile decoders (simplejpeg, OpenCV: the same pixels), tiles written
straight into a batch slot, and the DataLoader worker's pool of shared-memory batches."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from _images import preprocess_config
from torch.utils.data import DataLoader

from preprocessing import jpeg_tiles, synthetic
from preprocessing.extract import _identity, _loader_kwargs
from preprocessing.plan import plan_slides, settings_fingerprint
from preprocessing.readers import open_slide
from preprocessing.stream import POOL_SLOTS, SlideStream, read_tile
from preprocessing.tiling import plan_tiles

HAVE_SIMPLEJPEG = jpeg_tiles._simplejpeg is not None
DECODERS = ["opencv", "simplejpeg"] if HAVE_SIMPLEJPEG else ["opencv"]


def _slide(tmp_path: Path, jpeg_rgb: bool = False, name: str = "s.svs", seed: int = 5) -> Path:
    rgb, _ = synthetic.synthetic_tissue(512, 768, seed=seed, n_blobs=3, coverage=0.7,
                                        textures=synthetic.package_textures())
    return synthetic.write_svs(tmp_path / name, rgb, mpp=0.25, downsamples=(1, 4), jpeg_rgb=jpeg_rgb)


def _tiles(path: Path) -> tuple[object, list[bytes]]:
    import tifffile

    tif = tifffile.TiffFile(path)
    page, fh, out = tif.pages[0], tif.filehandle, []
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        fh.seek(offset)
        out.append(fh.read(count))
    tif.close()
    return page, out


@pytest.mark.skipif(not HAVE_SIMPLEJPEG, reason="simplejpeg is not installed")
@pytest.mark.parametrize("jpeg_rgb", [False, True])
def test_simplejpeg_and_opencv_decode_the_same_pixels(tmp_path, jpeg_rgb):
    page, tiles = _tiles(_slide(tmp_path, jpeg_rgb))
    shape = (int(page.tilelength), int(page.tilewidth))
    dec = {name: jpeg_tiles.TileDecoder(page.jpegtables, jpeg_rgb, shape, name) for name in DECODERS}
    for i, data in enumerate(tiles):
        for f in (1, 2, 4, 8):
            a, b = dec["simplejpeg"](data, f), dec["opencv"](data, f)
            assert a.shape == (shape[0] // f, shape[1] // f, 3) and a.dtype == np.uint8
            np.testing.assert_array_equal(a, b, err_msg=f"tile {i} at 1/{f}")
    cmu = synthetic.cmu_small_region_path()  # real Aperio: RGB in JPEG, tables in JPEGTables
    if cmu is not None:
        page, tiles = _tiles(Path(cmu))
        shape = (int(page.tilelength), int(page.tilewidth))
        dec = {name: jpeg_tiles.TileDecoder(page.jpegtables, True, shape, name) for name in DECODERS}
        for data in tiles[:12]:
            for f in (1, 2):
                np.testing.assert_array_equal(dec["simplejpeg"](data, f), dec["opencv"](data, f))


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_tile_that_is_not_the_page_s_frame_is_refused(decoder):
    dec = jpeg_tiles.TileDecoder(None, False, (64, 48), decoder)
    small = cv2.imencode(".jpg", np.zeros((32, 48, 3), np.uint8))[1].tobytes()
    with pytest.raises(ValueError, match="expected 64x48x3"):  # another size: never decoded
        dec(small, 2)
    gray = cv2.imencode(".jpg", np.zeros((64, 48), np.uint8))[1].tobytes()
    with pytest.raises(ValueError, match="expected 64x48x3"):  # one component
        dec(gray, 2)
    with pytest.raises(ValueError, match="SOI"):
        dec(b"\x00\x01rest", 2)
    with pytest.raises(ValueError, match="1/3"):
        dec(cv2.imencode(".jpg", np.zeros((64, 48, 3), np.uint8))[1].tobytes(), 3)
    assert dec(cv2.imencode(".jpg", np.full((64, 48, 3), 200, np.uint8))[1].tobytes(), 4).shape == (16, 12, 3)


def test_tiles_read_from_the_file_decode_as_from_bytes(tmp_path):
    path = _slide(tmp_path)
    page, tiles = _tiles(path)
    dec = jpeg_tiles.TileDecoder(page.jpegtables, False, (int(page.tilelength), int(page.tilewidth)))
    fd = os.open(path, os.O_RDONLY)
    try:
        scratch = np.empty((128, 128, 3), np.uint8)
        for i in (0, 3, 1, 3):
            got = dec.read(fd, int(page.dataoffsets[i]), int(page.databytecounts[i]), 2, out=scratch)
            assert np.shares_memory(got, scratch)
            np.testing.assert_array_equal(got, dec(tiles[i], 2))
        with pytest.raises(ValueError, match="SOI"):  # not where a tile starts
            dec.read(fd, int(page.dataoffsets[1]) + 1, int(page.databytecounts[1]), 2)
        with pytest.raises(OSError, match="bytes at offset"):  # past the end of the file
            dec.read(fd, os.path.getsize(path) - 10, 100, 2)
        np.testing.assert_array_equal(dec.read(fd, int(page.dataoffsets[0]), int(page.databytecounts[0]), 2),
                                      dec(tiles[0], 2))  # the prefix was put back after each read
    finally:
        os.close(fd)


def test_whole_tile_regions_read_by_descriptor_match_the_general_path(tmp_path):
    path = _slide(tmp_path)
    spots = [(0, 0), (256, 0), (0, 256), (256, 256)]
    with open_slide(path) as r:
        assert r._fast._fd is not None  # regions of whole tiles: os.preadv, scratch buffer, no cache
        fast = [r.read_region_reduced(xy, 0, (512, 256), 2).copy() for xy in spots]
        os.close(r._fast._fd)
        r._fast._fd = None  # the general path: tifffile's handle, per-tile arrays, cache
        for xy, want in zip(spots, fast):
            np.testing.assert_array_equal(r.read_region_reduced(xy, 0, (512, 256), 2), want)


def test_reduced_regions_do_not_depend_on_what_was_read_before(tmp_path):
    """Tiles a region holds whole are decoded into one scratch buffer, tiles it cuts are cached: any order
    of reads gives the same pixels."""
    path = _slide(tmp_path)
    spots = [(0, 0), (256, 128), (512, 0), (128, 256), (256, 0), (0, 0)]
    with open_slide(path) as r:
        first = {xy: r.read_region_reduced(xy, 0, (256, 256), 2).copy() for xy in spots}
    with open_slide(path) as r:
        for xy in reversed(spots):
            np.testing.assert_array_equal(r.read_region_reduced(xy, 0, (256, 256), 2), first[xy])


def test_without_simplejpeg_opencv_reads_the_same_regions(tmp_path, monkeypatch):
    path = _slide(tmp_path)
    spots = [(0, 0), (256, 512), (768 - 512, 0), (512, 256)]  # aligned, not, edge (half outside)
    with open_slide(path) as r:
        before = [r.read_region_reduced(xy, 0, (512, 512), 2) for xy in spots]
    monkeypatch.setattr(jpeg_tiles, "_simplejpeg", None)
    assert jpeg_tiles.default_decoder() == "opencv"
    with open_slide(path) as r:
        for xy, want in zip(spots, before):
            got = r.read_region_reduced(xy, 0, (512, 512), 2)
            assert got is not None and want is not None
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target_mpp", [0.5, 0.25])  # read 2x the tile (reduced or resized) / read as is
def test_read_tile_into_a_batch_slot_gives_the_same_tile(tmp_path, target_mpp):
    path = _slide(tmp_path)
    with open_slide(path) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, target_mpp, 64)
        batch = np.full((3, 64, 64, 3), 7, np.uint8)  # garbage: every pixel must be written
        for fast in (False, True):
            for xy in [(0, 0), (96, 160), (768 - 64, 512 - 64), (760, 500)]:  # the last one mostly outside
                got = read_tile(r, xy, plan, fast, out=batch[1])
                assert got is batch[1] or np.shares_memory(got, batch)
                np.testing.assert_array_equal(batch[1], read_tile(r, xy, plan, fast))
                assert (batch[0] == 7).all() and (batch[2] == 7).all()  # the neighbouring slots are left alone


def _stream(cfg, workers: int, release: bool) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[int]]:
    """slide -> (tile indices [K], tiles [K, P, P, 3]) and the pool slot of every batch, through a DataLoader."""
    tasks = plan_slides(cfg)
    stream = SlideStream(tasks, cfg, settings_fingerprint(cfg, "random"), os.getpid(), Path(cfg.output),
                         workers=workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity,
                        prefetch_factor=2 if workers else None, **_loader_kwargs())
    parts: dict[int, list] = {}
    slots = []
    for msg in loader:
        if msg["kind"] != "tiles":
            continue
        slots.append(msg["slot"])
        # kept without a copy when not released: a pooled batch must never be refilled while the consumer holds it
        parts.setdefault(msg["slide"], []).append((msg["index"], msg["tiles"].clone() if release else msg["tiles"]))
        if release:
            stream.release(msg)
    out = {s: (np.concatenate([i for i, _ in p]), np.concatenate([t.numpy() for _, t in p])) for s, p in parts.items()}
    return out, slots


@pytest.mark.parametrize("release", [True, False])
def test_pooled_shared_memory_batches_carry_the_same_tiles(tmp_path, release):
    (tmp_path / "in").mkdir()
    for i in range(2):
        _slide(tmp_path / "in", name=f"s{i}.svs", seed=20 + i)
    cfg = preprocess_config(tmp_path / "in", tmp_path / "out", target_mpp=0.5, patch_size=32, batch_size=3,
                            min_tissue=0.0, tissue_method="fixed").validate()
    want, none = _stream(cfg, 0, release=True)
    assert set(none) == {-1} and len(none) > 2 * POOL_SLOTS  # in process: plain batches, no pool
    got, slots = _stream(replace(cfg, output=str(tmp_path / "out1")), 1, release)
    assert got.keys() == want.keys()
    for s in want:
        np.testing.assert_array_equal(got[s][0], want[s][0])
        np.testing.assert_array_equal(got[s][1], want[s][1])
    if release:  # each batch refills one of the worker's released batches
        assert min(slots) >= 0 and len(set(slots)) < len(slots)
    else:  # the pool runs dry and fresh batches follow
        assert sorted(slots[:POOL_SLOTS]) == list(range(POOL_SLOTS)) and set(slots[POOL_SLOTS:]) == {-1}
