"""HDF5 bag schema: round trips, foreign (CLAM / TRIDENT) files, validation errors, atomic writes, CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_ncmi.commands import bags_cli
from wsi_ncmi.data.bags import (
    SCHEMA_VERSION,
    BagError,
    LazyFeatures,
    inspect_bag,
    list_bags,
    read_bag,
    read_features,
    read_header,
    stale_tmp_files,
    validate_bag,
    write_bag,
)

RNG = np.random.default_rng(0)


def _feats(n: int = 12, d: int = 8, dtype: str = "float16") -> np.ndarray:
    return RNG.standard_normal((n, d)).astype(dtype)


def _coords(n: int = 12) -> np.ndarray:
    return (np.arange(2 * n).reshape(n, 2) * 256).astype(np.int32)


ATTRS = {
    "encoder": "resnet18",
    "weights_sha256": "ab" * 32,
    "source_path": "/data/slide.svs",
    "source_size": (4096, 2048),
    "slide_mpp": 0.25,
    "target_mpp": 0.5,
    "effective_mpp": 0.5,
    "normalization": "imagenet",
    "patch_size": 224,
    "patch_level": 0,
    "patch_size_level0": 448,
    "level0_magnification": 40,
    "target_magnification": 20,
}


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("as_torch", [False, True])
def test_round_trip_every_dtype(tmp_path: Path, dtype: str, as_torch: bool) -> None:
    feats, xy = _feats(dtype=dtype), _coords()
    tissue = RNG.random(12)
    f_in = torch.from_numpy(feats) if as_torch else feats
    path = write_bag(tmp_path / "slide_a.h5", f_in, xy, ATTRS, tissue_fraction=tissue)
    assert path == tmp_path / "slide_a.h5" and path.is_file()
    bag = read_bag(path)
    assert bag.format == "wsi_ncmi" and bag.slide_id == "slide_a"
    assert bag.features.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bag.features, feats)
    assert bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.coords, xy)
    np.testing.assert_allclose(bag.tissue_fraction, tissue.astype(np.float32))
    assert (bag.n, bag.dim) == (12, 8)
    a = bag.attrs
    assert a["schema_version"] == SCHEMA_VERSION and a["embed_dim"] == 8 and a["precision"] == dtype
    assert a["created_by"].startswith("wsi_ncmi ")
    assert a["encoder"] == "resnet18" and a["source_size"] == [4096, 2048] and a["slide_mpp"] == 0.25
    assert "patch_size" not in a  # coords attrs live on coords
    assert bag.coords_attrs == {k: ATTRS[k] for k in
                                ("patch_size", "patch_level", "patch_size_level0", "level0_magnification",
                                 "target_magnification")}
    np.testing.assert_array_equal(read_features(path), feats)
    assert read_header(path) == (12, 8, np.dtype(dtype))
    assert not list(tmp_path.glob("*.tmp"))


def test_chunking_compression_and_coords_attrs_override(tmp_path: Path) -> None:
    feats = _feats(n=3000, d=16)
    path = write_bag(tmp_path / "s.h5", feats, _coords(3000), {"patch_size": 256, "slide_id": "custom"},
                     coords_attrs={"patch_size": 512}, compression="gzip")
    with h5py.File(path) as f:
        assert f["features"].chunks == (1024, 16)
        assert f["features"].compression == "gzip"
        assert f["coords"].attrs["patch_size"] == 512
    small = write_bag(tmp_path / "t.h5", _feats(n=5), _coords(5), {})
    with h5py.File(small) as f:
        assert f["features"].chunks == (5, 8)
    assert read_bag(path).slide_id == "custom"
    np.testing.assert_array_equal(read_features(path), feats)


def test_lazy_features_read_on_demand(tmp_path: Path) -> None:
    feats = _feats(n=50, dtype="float32")
    path = write_bag(tmp_path / "s.h5", feats, _coords(50), {})
    bag = read_bag(path, lazy=True)
    assert isinstance(bag.features, LazyFeatures)
    assert bag.features.shape == (50, 8) and len(bag.features) == 50 and bag.n == 50
    np.testing.assert_array_equal(bag.features[10:20], feats[10:20])
    np.testing.assert_array_equal(np.asarray(bag.features), feats)
    path.unlink()
    with pytest.raises(BagError, match="s.h5"):
        bag.features.read()


@pytest.mark.parametrize(
    ("feats", "xy", "match"),
    [
        (np.zeros((4, 8), np.float64), np.zeros((4, 2), int), "float16 or float32"),
        (np.zeros((4,), np.float32), np.zeros((4, 2), int), r"\[N, D\]"),
        (np.zeros((4, 8), np.float32), np.zeros((5, 2), int), "4 feature rows but 5 coords"),
        (np.zeros((4, 8), np.float32), np.zeros((4, 3), int), r"\[N, 2\]"),
        (np.zeros((4, 8), np.float32), np.zeros((4, 2), np.float32), "integers"),
        (np.zeros((0, 8), np.float32), np.zeros((0, 2), int), "empty"),
        (np.full((4, 8), np.nan, np.float32), np.zeros((4, 2), int), "NaN"),
    ],
)
def test_write_validates_before_writing(tmp_path: Path, feats, xy, match) -> None:
    target = tmp_path / "bad.h5"
    with pytest.raises(BagError, match=match) as err:
        write_bag(target, feats, xy, {})
    assert "bad.h5" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_write_rejects_bfloat16_and_wrong_embed_dim(tmp_path: Path) -> None:
    with pytest.raises(BagError, match="bfloat16"):
        write_bag(tmp_path / "a.h5", torch.zeros(3, 4, dtype=torch.bfloat16), np.zeros((3, 2), int), {})
    with pytest.raises(BagError, match="embed_dim"):
        write_bag(tmp_path / "a.h5", _feats(3, 4), _coords(3), {"embed_dim": 5})
    with pytest.raises(BagError, match="compression"):
        write_bag(tmp_path / "a.h5", _feats(3, 4), _coords(3), {}, compression="zstd")
    assert not list(tmp_path.iterdir())


def test_overwrite_replaces_atomically(tmp_path: Path) -> None:
    p = write_bag(tmp_path / "s.h5", _feats(n=4), _coords(4), {})
    write_bag(p, _feats(n=7), _coords(7), {})
    assert read_bag(p).n == 7


# ------------------------------------------------------------------------------------------ foreign files
def test_reads_clam_feature_file(tmp_path: Path) -> None:
    # CLAM's extract_features_fp.py: `features` float32 [N, D] and `coords` [N, 2], no attributes.
    feats = RNG.standard_normal((9, 1024)).astype(np.float32)
    xy = RNG.integers(0, 50000, (9, 2))
    path = tmp_path / "TCGA-XX.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, maxshape=(None, 1024), chunks=(1, 1024))
        f.create_dataset("coords", data=xy, maxshape=(None, 2), chunks=(1, 2))
    bag = read_bag(path)
    assert bag.format == "clam" and bag.slide_id == "TCGA-XX"
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, xy)
    assert bag.attrs == {} and bag.coords_attrs == {} and bag.tissue_fraction is None
    info = validate_bag(path)
    assert info["format"] == "clam" and info["n"] == 9 and info["dim"] == 1024 and info["encoder"] is None


def test_reads_trident_feature_file(tmp_path: Path) -> None:
    # TRIDENT: attributes on the datasets (coords: patch geometry; features: encoder name), none on root.
    feats = RNG.standard_normal((6, 32)).astype(np.float32)
    xy = RNG.integers(0, 50000, (6, 2)).astype(np.int64)
    path = tmp_path / "slide7.h5"
    with h5py.File(path, "w") as f:
        c = f.create_dataset("coords", data=xy)
        c.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                        "target_magnification": 20, "overlap": 0, "name": "slide7"})
        fd = f.create_dataset("features", data=feats)
        fd.attrs.update({"name": "uni_v1", "savetodir": "/x"})
    bag = read_bag(path)
    assert bag.format == "trident"
    assert bag.coords_attrs["patch_size_level0"] == 512 and bag.coords_attrs["target_magnification"] == 20
    np.testing.assert_array_equal(bag.features, feats)
    info = inspect_bag(path)
    assert info["encoder"] == "uni_v1" and info["format"] == "trident" and info["schema_version"] is None


def test_reads_leading_singleton_layout(tmp_path: Path) -> None:
    feats = RNG.standard_normal((1, 5, 4)).astype(np.float32)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = np.zeros((5, 2), np.int64)
    np.testing.assert_array_equal(read_bag(path).features, feats[0])
    np.testing.assert_array_equal(read_bag(path, lazy=True).features[1:3], feats[0, 1:3])
    np.testing.assert_array_equal(read_features(path), feats[0])
    assert validate_bag(path)["n"] == 5


# ------------------------------------------------------------------------------------------------ validate
def _raw(path: Path, **datasets) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


@pytest.mark.parametrize(
    ("datasets", "match"),
    [
        ({"coords": np.zeros((3, 2), int)}, "missing dataset 'features'"),
        ({"features": np.zeros((3, 4), np.float32)}, "missing dataset 'coords'"),
        ({"features": np.zeros((3, 4), np.float32), "coords": np.zeros((4, 2), int)}, "3 feature rows but 4"),
        ({"features": np.zeros((0, 4), np.float32), "coords": np.zeros((0, 2), int)}, "zero rows"),
        ({"features": np.zeros((3,), np.float32), "coords": np.zeros((3, 2), int)}, r"\[N, D\]"),
        ({"features": np.zeros((3, 4), np.int32), "coords": np.zeros((3, 2), int)}, "floating point"),
        ({"features": np.zeros((3, 4), np.float32), "coords": np.zeros((3, 2), "S2")}, "integers"),
        ({"features": np.zeros((3, 4), np.float32), "coords": np.full((3, 2), 0.5)}, "not integral"),
    ],
)
def test_validate_rejects_broken_files(tmp_path: Path, datasets, match) -> None:
    path = _raw(tmp_path / "broken.h5", **datasets)
    with pytest.raises(BagError, match=match) as err:
        validate_bag(path)
    assert str(path) in str(err.value)


def test_validate_finds_nan_in_a_late_chunk(tmp_path: Path) -> None:
    feats = np.zeros((3000, 4), np.float16)
    path = write_bag(tmp_path / "s.h5", feats, _coords(3000), {})
    with h5py.File(path, "r+") as f:
        f["features"][2500, 1] = np.inf
    assert validate_bag(path, check_values=False)["n"] == 3000
    with pytest.raises(BagError, match="row 2500"):
        validate_bag(path)


def test_validate_wrong_dtype_in_our_schema(tmp_path: Path) -> None:
    path = write_bag(tmp_path / "s.h5", _feats(3, 4), _coords(3), {})
    with h5py.File(path, "r+") as f:
        del f["features"]
        f["features"] = np.zeros((3, 4), np.float64)
    with pytest.raises(BagError, match="float16 or float32"):
        validate_bag(path)
    with pytest.raises(BagError, match="float16 or float32"):
        read_bag(path)


def test_truncated_and_garbage_files_raise_bag_error(tmp_path: Path) -> None:
    good = write_bag(tmp_path / "good.h5", _feats(n=4000, d=64), _coords(4000), {})
    data = good.read_bytes()
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 100)
    for path in (trunc, garbage, tmp_path / "absent.h5"):
        for fn in (validate_bag, read_bag, read_features, inspect_bag):
            with pytest.raises(BagError, match=path.name):
                fn(path)


# ----------------------------------------------------------------------------------------- folder / atomic
def test_list_bags_ignores_tmp_files(tmp_path: Path, caplog) -> None:
    write_bag(tmp_path / "b.h5", _feats(), _coords(), {})
    write_bag(tmp_path / "a.h5", _feats(), _coords(), {})
    (tmp_path / "c.h5.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    with caplog.at_level("WARNING"):
        bags = list_bags(tmp_path)
    assert list(bags) == ["a", "b"]
    assert "c.h5.tmp" in caplog.text
    assert stale_tmp_files(tmp_path) == [tmp_path / "c.h5.tmp"]
    with pytest.raises(BagError, match="does not exist"):
        list_bags(tmp_path / "nope")


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from wsi_ncmi.data.bags import write_bag
    out = sys.argv[1]
    feats = np.random.default_rng(0).standard_normal((30000, 256)).astype(np.float32)
    xy = np.zeros((30000, 2), np.int64)
    for i in range(1000):
        write_bag(f"{out}/slide_{i % 3}.h5", feats, xy, {"encoder": "x"}, compression="gzip")
    """
)


def test_killed_writer_never_leaves_an_invalid_bag(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    try:
        deadline = time.monotonic() + 40
        # wait until at least one bag is complete and the next one is half-written
        while time.monotonic() < deadline and not (list(tmp_path.glob("*.h5")) and stale_tmp_files(tmp_path)):
            time.sleep(0.02)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert stale_tmp_files(tmp_path), "the writer was expected to be killed mid-write"
    bags = list_bags(tmp_path)
    assert bags
    for path in bags.values():
        assert validate_bag(path)["n"] == 30000


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_inspect_and_validate(tmp_path: Path, capsys) -> None:
    for name in ("s1", "s2"):
        write_bag(tmp_path / f"{name}.h5", _feats(), _coords(), {"encoder": "resnet18", "target_mpp": 0.5})
    assert bags_cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "s1" in out and "resnet18" in out and "2 valid bag(s), 24 instances" in out
    assert bags_cli.main(["validate", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [b["slide_id"] for b in report["bags"]] == ["s1", "s2"] and report["invalid"] == []

    write_bag(tmp_path / "s3.h5", _feats(d=16), _coords(), {"encoder": "uni"})
    assert bags_cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "inconsistent feature dims" in err and "s3" in err and "inconsistent encoders" in err

    (tmp_path / "s3.h5").unlink()
    (tmp_path / "zz.h5").write_bytes(b"junk")
    assert bags_cli.main(["validate", str(tmp_path)]) == 1
    assert "zz.h5" in capsys.readouterr().err
    assert bags_cli.main(["validate", str(tmp_path / "s1.h5")]) == 0
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert bags_cli.main(["inspect", str(empty)]) == 1
