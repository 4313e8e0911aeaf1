"""MIL data layer: BagDataset, collate_bags (padding + mask), MILDataModule errors and samplers."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_ncmi.data.bags import write_bag
from wsi_ncmi.data.batching import collate_bags
from wsi_ncmi.data.mil import BagDataset, MILDataError, MILDataModule

D = 6


def _table(n: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(n):
        split = "test" if i >= n - 3 else "val" if i >= n - 5 else "train"
        label = i % 3
        rows.append({"slide_id": f"s{i:02d}", "patient_id": f"p{i:02d}", "label": label, "split": split,
                     "label_name": ["neg", "low", "high"][label]})
    return pd.DataFrame(rows)


@pytest.fixture()
def data(tmp_path: Path) -> tuple[Path, Path, pd.DataFrame]:
    table = _table()
    bags = tmp_path / "bags"
    rng = np.random.default_rng(0)
    for i, slide in enumerate(table["slide_id"]):
        n = 3 + 2 * i  # different sizes
        feats = (rng.standard_normal((n, D)) + i).astype(np.float16)
        write_bag(bags / f"{slide}.h5", feats, np.stack([np.arange(n), np.arange(n) * 2], 1), {"encoder": "t"})
    csv = tmp_path / "split.csv"
    table.to_csv(csv, index=False)
    return bags, csv, table


def test_bag_dataset_items(data) -> None:
    bags, csv, table = data
    ds = BagDataset(csv, bags, "val", return_coords=True)
    assert len(ds) == 2 and ds.slide_ids == ["s07", "s08"]
    item = ds[0]
    # features keep the bag's stored dtype (float16 here) until they reach the device
    assert item["features"].dtype == torch.float16 and item["features"].shape == (3 + 2 * 7, D)
    assert item["label"] == 1 and item["slide_id"] == "s07"
    assert item["coords"].dtype == torch.int64 and item["coords"].shape == (17, 2)
    assert torch.equal(item["coords"][:, 1], item["coords"][:, 0] * 2)
    assert len(BagDataset(csv, bags, "all")) == 12


def test_max_instances_and_dropout_only_in_training(data) -> None:
    bags, csv, _ = data
    train = BagDataset(csv, bags, "train", max_instances=4, return_coords=True, seed=1)
    full = BagDataset(csv, bags, "train")
    big = 6  # s06 has 15 instances
    sub = train[big]
    assert sub["features"].shape == (4, D)
    # the subset is a subset of the full bag's rows, coords kept in step
    rows = sub["coords"][:, 0].tolist()
    assert torch.equal(sub["features"], full[big]["features"][rows])
    assert train[0]["features"].shape[0] == 3  # smaller than max_instances: untouched
    # a pure function of (seed, epoch, index): repeated reads agree, a new epoch draws a new subset
    assert all(torch.equal(train[big]["coords"], sub["coords"]) for _ in range(3))
    again = BagDataset(csv, bags, "train", max_instances=4, return_coords=True, seed=1)
    assert torch.equal(again[big]["coords"], sub["coords"])  # seeded
    draws = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        draws.add(tuple(train[big]["coords"][:, 0].tolist()))
    assert len(draws) > 1
    again.set_epoch(5)
    assert torch.equal(again[big]["coords"], train[big]["coords"])
    other_seed = BagDataset(csv, bags, "train", max_instances=4, return_coords=True, seed=2)
    assert any(not torch.equal(other_seed[i]["coords"], again[i]["coords"]) for i in range(4, 7))
    val = BagDataset(csv, bags, "val", max_instances=2, instance_dropout=0.5)
    assert val[0]["features"].shape[0] == 17
    drop = BagDataset(csv, bags, "train", instance_dropout=0.5, seed=0)
    sizes = []
    masks = set()
    for epoch in range(20):
        drop.set_epoch(epoch)
        item = drop[big]["features"]
        sizes.append(item.shape[0])
        masks.add(item.numpy().tobytes())
        assert torch.equal(drop[big]["features"], item)  # same (seed, epoch, index): same mask
    assert min(sizes) >= 1 and max(sizes) < 15 and np.mean(sizes) < 12 and len(masks) > 1
    val.set_epoch(3)
    assert val[0]["features"].shape[0] == 17  # evaluation never drops or subsamples


def test_cache_keeps_features(data) -> None:
    bags, csv, _ = data
    ds = BagDataset(csv, bags, "test", cache=True)
    first = ds[0]["features"]
    (bags / "s09.h5").unlink()
    assert torch.equal(ds[0]["features"], first)
    ds_nocache = BagDataset(csv, bags, "train")
    (bags / "s00.h5").unlink()
    with pytest.raises(ValueError, match="s00.h5"):
        ds_nocache[0]


def test_label_map(data) -> None:
    bags, csv, _ = data
    ds = BagDataset(csv, bags, "train", label_map={"neg": 0, "low": 1, "high": 1})
    assert sorted(set(ds.labels)) == [0, 1]
    ds_int = BagDataset(csv, bags, "train", label_map={0: 1, 1: 0, 2: 0})
    assert ds_int.labels[:3] == [1, 0, 0]
    with pytest.raises(MILDataError, match="not in label_map"):
        BagDataset(csv, bags, "train", label_map={"neg": 0})


def test_collate_pads_and_masks() -> None:
    items = [
        {"features": torch.ones(2, 3), "label": 1, "slide_id": "a", "coords": torch.zeros(2, 2, dtype=torch.long)},
        {"features": torch.full((4, 3), 2.0), "label": 0, "slide_id": "b", "coords": torch.ones(4, 2, dtype=torch.long)},
    ]
    out = collate_bags(items)
    assert out["features"].shape == (2, 4, 3) and out["mask"].dtype == torch.bool
    assert out["mask"].tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(out["features"][0, :2], torch.ones(2, 3)) and out["features"][0, 2:].abs().sum() == 0
    assert torch.equal(out["features"][1], torch.full((4, 3), 2.0))
    assert out["label"].dtype == torch.long and out["label"].tolist() == [1, 0]
    assert out["slide_id"] == ["a", "b"]
    assert out["coords"].shape == (2, 4, 2) and out["coords"][0, 2:].eq(-1).all()
    single = collate_bags(items[1:])
    assert single["features"].shape == (1, 4, 3) and single["mask"].all() and "coords" in single
    with pytest.raises(ValueError, match="different feature dims"):
        collate_bags([items[0], {"features": torch.ones(2, 5), "label": 0, "slide_id": "c"}])


def test_datamodule_properties_and_loaders(data) -> None:
    bags, csv, _ = data
    dm = MILDataModule(str(bags), str(csv), batch_size=2, pin_memory=False)
    assert dm.in_dim == D and dm.num_classes == 3 and dm.class_names == ["neg", "low", "high"]
    assert dm.split_sizes() == {"train": 7, "val": 2, "test": 3}
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].shape[0] == 2 and batch["features"].shape[2] == D
    assert batch["mask"].shape == batch["features"].shape[:2]
    val_ids = [sid for b in dm.val_dataloader() for sid in b["slide_id"]]
    assert val_ids == ["s07", "s08"]
    test_ids = [sid for b in dm.dataloader("test") for sid in b["slide_id"]]
    assert test_ids == ["s09", "s10", "s11"]
    assert MILDataModule(str(bags), str(csv), num_classes=5).num_classes == 5
    # the inferred class count is what the hyper-parameters record (Lightning compares them with the model's)
    assert dm.hparams["num_classes"] == 3


def test_datamodule_worker_loader(data) -> None:
    bags, csv, _ = data
    dm = MILDataModule(str(bags), str(csv), num_workers=1, max_instances=3, pin_memory=False)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    sizes = [b["features"].shape[1] for b in batches]
    assert len(sizes) == 7 and max(sizes) == 3
    assert all(b["features"].dtype == torch.float16 for b in batches)  # half the bytes between processes


def test_collate_keeps_a_common_dtype_and_promotes_a_mixed_one() -> None:
    half = {"features": torch.ones(2, 3, dtype=torch.float16), "label": 0, "slide_id": "a"}
    half2 = {"features": torch.ones(3, 3, dtype=torch.float16), "label": 1, "slide_id": "b"}
    full = {"features": torch.ones(3, 3), "label": 1, "slide_id": "c"}
    assert collate_bags([half])["features"].dtype == torch.float16
    assert collate_bags([half, half2])["features"].dtype == torch.float16
    assert collate_bags([half, full])["features"].dtype == torch.float32


def _epoch_items(dm: MILDataModule, epoch: int) -> dict[str, torch.Tensor]:
    dm.set_epoch(epoch)
    return {b["slide_id"][0]: b["features"][0] for b in dm.dataloader("train")}  # table order


def test_training_draws_do_not_depend_on_workers(data) -> None:
    bags, csv, _ = data
    kw = {"max_instances": 4, "instance_dropout": 0.3, "pin_memory": False, "seed": 3}
    # serial reads from the (default, auto) RAM cache; the workers read the files: same draws either way
    serial = MILDataModule(str(bags), str(csv), **kw)
    workers = MILDataModule(str(bags), str(csv), num_workers=2, cache="none", **kw)
    assert not workers.dataloader("train").persistent_workers  # each epoch's workers see the new epoch
    assert workers.dataloader("val").persistent_workers
    for epoch in (0, 1):
        a, b = _epoch_items(serial, epoch), _epoch_items(workers, epoch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    e0, e1 = _epoch_items(serial, 0), _epoch_items(serial, 1)
    assert any(not torch.equal(e0[k], e1[k]) for k in e0)


def test_balanced_sampler(tmp_path: Path) -> None:
    rows = [{"slide_id": f"s{i}", "patient_id": f"p{i}", "label": int(i >= 18), "split": "train"} for i in range(20)]
    rows += [{"slide_id": "v0", "patient_id": "v0", "label": 0, "split": "val"}]
    bags = tmp_path / "bags"
    for r in rows:
        write_bag(bags / f"{r['slide_id']}.h5", np.zeros((2, 3), np.float32), np.zeros((2, 2), int), {})
    csv = tmp_path / "s.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    dm = MILDataModule(str(bags), str(csv), balanced_sampler=True, pin_memory=False, seed=4)
    loader = dm.train_dataloader()
    labels, orders = [], []
    for epoch in range(10):
        dm.set_epoch(epoch)  # reaches the sampler of a loader built earlier
        order = [b["slide_id"][0] for b in loader]
        labels += [int(s[1:]) >= 18 for s in order]
        orders.append(order)
        # a pure function of (seed, epoch): a loader built later (e.g. after a resume) draws the same bags
        assert [b["slide_id"][0] for b in dm.train_dataloader()] == order
        assert [b["slide_id"][0] for b in loader] == order
    assert 0.35 < np.mean(labels) < 0.65  # 10% positives in the table, ~50% drawn
    assert len({tuple(o) for o in orders}) == 10
    other = MILDataModule(str(bags), str(csv), balanced_sampler=True, pin_memory=False, seed=5)
    assert [b["slide_id"][0] for b in other.train_dataloader()] != orders[0]
    plain = MILDataModule(str(bags), str(csv), pin_memory=False)
    assert np.mean([int(b["label"]) for b in plain.train_dataloader()]) == pytest.approx(0.1)


def test_datamodule_errors_name_the_split_csv(data, tmp_path: Path) -> None:
    bags, csv, table = data
    (bags / "s03.h5").unlink()
    with pytest.raises(MILDataError, match=r"1 of \d+ slides in \S*split\.csv have no bag.*s03"):
        MILDataModule(str(bags), str(csv))
    write_bag(bags / "s03.h5", np.zeros((2, D + 1), np.float32), np.zeros((2, 2), int), {})
    dm = MILDataModule(str(bags), str(csv))
    with pytest.raises(MILDataError, match=r"split\.csv.*different feature dims.*s03 \(D=7\)"):
        dm.setup("fit")
    no_test = tmp_path / "no_test.csv"
    table[table["split"] != "test"].to_csv(no_test, index=False)
    write_bag(bags / "s03.h5", np.zeros((2, D), np.float32), np.zeros((2, 2), int), {})
    dm = MILDataModule(str(bags), str(no_test))
    dm.setup("fit")
    with pytest.raises(MILDataError, match=r"no_test\.csv.*split 'test' is empty"):
        dm.setup("test")
    with pytest.raises(MILDataError, match="num_classes=2"):
        MILDataModule(str(bags), str(csv), num_classes=2)
    with pytest.raises(MILDataError, match=r"split\.csv.*nothing: bags folder does not exist"):
        MILDataModule(str(tmp_path / "nothing"), str(csv))


def test_datamodule_signature_is_cli_friendly() -> None:
    sig = inspect.signature(MILDataModule.__init__)
    for name, p in list(sig.parameters.items())[1:]:
        assert p.annotation is not inspect.Parameter.empty, name
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MILDataModule, "data")
    cfg = parser.parse_args(["--data.bags_dir=b", "--data.split_csv=s.csv", "--data.label_map={\"a\": 1}"])
    assert cfg.data.batch_size == 1 and cfg.data.label_map == {"a": 1}
    assert "_split_bags" not in cfg.data  # the pre-flight's resolution is passed in code, never configured


def test_datamodule_reuses_a_given_resolution_of_its_own_split_only(data, monkeypatch) -> None:
    """``_split_bags`` (the pre-flight's resolution) spares a second folder listing; one of another split or fold
    is ignored; it is not a hyper-parameter (a checkpoint must not carry a table)."""
    from wsi_ncmi.data import split_check

    bags, csv, _ = data
    given = split_check.resolve_split_bags(bags, csv)
    listed = []
    real = split_check.list_bags
    monkeypatch.setattr(split_check, "list_bags", lambda d: listed.append(d) or real(d))
    dm = MILDataModule(str(bags), str(csv), _split_bags=given)
    assert listed == [] and dm.bag_paths is given.paths and "_split_bags" not in dm.hparams
    MILDataModule(str(bags), str(csv), fold=0, _split_bags=given)  # another fold: resolved afresh
    assert listed == [bags]


# ------------------------------------------------------------------------------------------- bag cache
def test_ram_cache_serves_the_same_items_from_memory(data) -> None:
    bags, csv, _ = data
    kw = {"max_instances": 4, "instance_dropout": 0.3, "pin_memory": False, "seed": 3}
    cached = MILDataModule(str(bags), str(csv), cache="ram", num_workers=3, **kw)
    disk = MILDataModule(str(bags), str(csv), cache="none", num_workers=0, **kw)
    loader = cached.dataloader("train")
    assert loader.num_workers == 0 and cached.dataset("train").features_cache is not None
    assert disk.dataset("train").features_cache is None
    for epoch in (0, 1):  # training draws (subset + dropout) are the same function of (seed, epoch, index)
        a, b = _epoch_items(cached, epoch), _epoch_items(disk, epoch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float16 for k in a)
    for s in ("s00", "s01"):  # once cached, the files are not needed any more
        (bags / f"{s}.h5").unlink()
    assert len(_epoch_items(cached, 2)) == 7


def test_float32_bags_are_cached_as_float16(tmp_path: Path) -> None:
    from wsi_ncmi.data.cache import BagCache

    small = np.full((3, 2), 0.5, np.float32)
    large = np.full((3, 2), 1e6, np.float32)  # beyond float16: kept as float32
    write_bag(tmp_path / "a.h5", small, np.zeros((3, 2), int), {})
    write_bag(tmp_path / "b.h5", large, np.zeros((3, 2), int), {})
    cache = BagCache([tmp_path / "a.h5", tmp_path / "b.h5"], progress=False)
    assert cache[0].dtype == torch.float16 and cache[1].dtype == torch.float32
    assert cache.nbytes == 3 * 2 * 2 + 3 * 2 * 4


def test_explicit_ram_cache_that_does_not_fit_fails_before_training(data, monkeypatch) -> None:
    import wsi_ncmi.data.cache as cache_mod

    bags, csv, _ = data
    monkeypatch.setattr(cache_mod, "available_memory", lambda device: 1000)  # bytes
    with pytest.raises(MILDataError, match=r"cache=ram needs .* GiB .* budget is .* available on cpu"):
        MILDataModule(str(bags), str(csv), cache="ram", pin_memory=False).setup("fit")
    dm = MILDataModule(str(bags), str(csv), cache="auto", pin_memory=False)
    dm.setup("fit")  # auto falls back to reading from disk, with workers
    assert dm.dataset("train").features_cache is None
    assert dm.dataloader("train").num_workers == min(4, __import__("os").cpu_count() or 1)


def test_cache_checks_each_bag_once_and_names_a_bad_one(data) -> None:
    bags, csv, _ = data
    feats = np.ones((4, D), np.float32)
    feats[2, 1] = np.nan
    write_bag(bags / "s03.h5", feats, np.zeros((4, 2), int), {}, check_values=False)
    dm = MILDataModule(str(bags), str(csv), cache="ram", pin_memory=False)
    with pytest.raises(MILDataError, match=r"s03\.h5: features contain NaN or inf in 1 row"):
        dm.setup("fit")


def test_a_bag_changed_after_caching_is_not_reread(data, caplog) -> None:
    bags, csv, _ = data
    dm = MILDataModule(str(bags), str(csv), cache="ram", pin_memory=False)
    dm.setup("fit")
    before = dm.dataset("train")[0]["features"].clone()
    write_bag(bags / "s00.h5", np.zeros((2, D), np.float16), np.zeros((2, 2), int), {})
    with caplog.at_level("WARNING"):
        dm.set_epoch(1)
        dm.set_epoch(2)  # warned once
    assert torch.equal(dm.dataset("train")[0]["features"], before)
    hits = [r for r in caplog.records if "s00.h5 changed on disk" in r.getMessage()]
    assert len(hits) == 1 and "keeps using the cached copy" in hits[0].getMessage()
