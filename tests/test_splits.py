"""Split tables: shipped official protocols, loading/validation errors, make_split strategies, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_ncmi.commands import splits_cli
from wsi_ncmi.data.bags import write_bag
from wsi_ncmi.data.official import (
    BRACS_3CLASS,
    OFFICIAL_PROTOCOLS,
    detect_dataset,
    official_expected,
    official_tables,
    readme_sections,
)
from wsi_ncmi.data.split_check import validate_split
from wsi_ncmi.data.splits import (
    SplitError,
    load_split,
    make_split,
    summary_markdown,
    write_split,
)

ROOT = Path(__file__).resolve().parents[1]
SPLITS_DIR = ROOT / "splits"
REFERENCE = ROOT.parent / "shared" / "reference"
C17_SEEDS = [SPLITS_DIR / f"camelyon17/seed{s}.csv" for s in (0, 1, 2)]
C17_LOCO = [SPLITS_DIR / f"camelyon17/loco_center{c}.csv" for c in range(5)]
BRACS = {k: SPLITS_DIR / f"bracs/official_{k}class.csv" for k in (3, 7)}
SHIPPED = [*C17_SEEDS, *C17_LOCO, *BRACS.values()]


def _no_leak(df: pd.DataFrame) -> None:
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()


# ------------------------------------------------------------------------------------------ shipped tables
@pytest.mark.parametrize("path", C17_SEEDS, ids=lambda p: p.name)
def test_camelyon17_seed_tables(path: Path) -> None:
    df = load_split(path)
    assert len(df) == 500
    assert df["label"].value_counts().sort_index().tolist() == [318, 36, 59, 87]
    test = df[df["split"] == "test"]
    assert len(test) == 200 and set(test["center"]) == {3, 4}
    assert set(df.loc[df["split"] != "test", "center"]) == {0, 1, 2}
    assert (df.loc[df["center"].isin([3, 4]), "split"] == "test").all()
    assert df.loc[df["split"] == "val", "patient_id"].nunique() == 6  # 10% of the 60 patients of centers 0-2
    assert (df["patient_id"] == df["slide_id"].str.extract(r"^(patient_\d+)_node")[0]).all()
    _no_leak(df)
    validate_split(path, num_classes=4, expected_counts={"test": 200, "all": {0: 318, 1: 36, 2: 59, 3: 87}},
                   strict=True)


def test_camelyon17_seeds_differ() -> None:
    vals = [frozenset(load_split(p).query("split == 'val'")["slide_id"]) for p in C17_SEEDS]
    assert len(set(vals)) == 3


@pytest.mark.parametrize("center", range(5))
def test_camelyon17_loco_tables(center: int) -> None:
    df = load_split(C17_LOCO[center])
    assert len(df) == 500 and df["label"].value_counts().sort_index().tolist() == [318, 36, 59, 87]
    test = df[df["split"] == "test"]
    assert len(test) == 100 and set(test["center"]) == {center}
    assert center not in set(df.loc[df["split"] != "test", "center"])
    assert df.loc[df["split"] == "val", "patient_id"].nunique() == 8
    _no_leak(df)


def test_bracs_tables() -> None:
    three, seven = load_split(BRACS[3]), load_split(BRACS[7])
    for df in (three, seven):
        assert df["split"].value_counts().to_dict() == {"train": 395, "test": 87, "val": 65}
        assert df["slide_id"].is_unique
        _no_leak(df)
    assert seven["label"].value_counts().sort_index().tolist() == [44, 147, 74, 41, 48, 61, 132]
    assert three["label"].value_counts().sort_index().tolist() == [265, 89, 193]
    merged = three.merge(seven, on="slide_id", suffixes=("_3", "_7"))
    assert len(merged) == 547 and (merged["split_3"] == merged["split_7"]).all()
    assert (merged["label_name_7"].map(BRACS_3CLASS) == merged["label_3"]).all()
    assert dict(zip(three["label"], three["label_name"])) == {0: "benign", 1: "atypical", 2: "malignant"}


def test_readme_tables_match_the_csvs() -> None:
    sections = readme_sections((SPLITS_DIR / "README.md").read_text(encoding="utf-8"))
    assert sorted(sections) == sorted(str(p.relative_to(SPLITS_DIR)) for p in SHIPPED)
    for path in SHIPPED:
        assert sections[str(path.relative_to(SPLITS_DIR))] == summary_markdown(load_split(path)), path



def test_official_protocols_know_their_names_counts_and_paths() -> None:
    """One registry: every shipped table belongs to exactly one protocol, which detect_dataset names from its
    path and whose expected counts the table meets."""
    listed = [name for p in OFFICIAL_PROTOCOLS.values() for name in p.paths]
    assert sorted(listed) == sorted(str(p.relative_to(SPLITS_DIR)) for p in SHIPPED)
    for proto in OFFICIAL_PROTOCOLS.values():
        for name in proto.paths:
            assert detect_dataset(SPLITS_DIR / name) == proto.name
            assert official_expected(name) is proto.expected
            validate_split(SPLITS_DIR / name, expected_counts=proto.expected, strict=True)

@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference not present")
def test_shipped_tables_are_what_the_generator_produces() -> None:
    tables = official_tables(REFERENCE / "camelyon17_slides.csv", REFERENCE / "bracs_slides.csv")
    assert sorted(tables) == sorted(str(p.relative_to(SPLITS_DIR)) for p in SHIPPED)
    for name, table in tables.items():
        shipped = load_split(SPLITS_DIR / name)
        pd.testing.assert_frame_equal(shipped, table.astype(shipped.dtypes.to_dict()), check_dtype=False)
    assert splits_cli.main(["official", "--check", "--camelyon17", str(REFERENCE / "camelyon17_slides.csv"),
                            "--bracs", str(REFERENCE / "bracs_slides.csv"), "--out", str(SPLITS_DIR)]) == 0


# ------------------------------------------------------------------------------------------ load / validate
def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("slide_id,label,split\na,0,train\n", r"missing column\(s\) \['patient_id'\]"),
        ("slide_id,patient_id,label,split\na,p,0,train\nb,q,0,training\n", "row 3: split must be one of"),
        ("slide_id,patient_id,label,split\na,p,zero,train\n", "row 2: column 'label' must be an integer"),
        ("slide_id,patient_id,label,split\na,p,-1,train\n", "row 2: negative label"),
        ("slide_id,patient_id,label,split\na,p,0,train\na,p,1,test\n", "row 3: slide 'a' appears twice"),
        ("slide_id,patient_id,label,split\na,,0,train\n", "row 2: empty 'patient_id'"),
        ("slide_id,patient_id,label,split\n", "no rows"),
        ("", "not a readable CSV"),
        ("slide_id,patient_id,label,split,label_name\na,p,0,train,x\nb,q,0,val,y\n", "several label_name"),
    ],
)
def test_load_split_errors_name_file_and_row(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(SplitError, match=match) as err:
        load_split(path)
    assert str(path) in str(err.value)


def test_load_split_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="not found"):
        load_split(tmp_path / "nope.csv")


def _small_table() -> pd.DataFrame:
    return pd.DataFrame({
        "slide_id": ["a", "b", "c", "d"], "patient_id": ["p1", "p1", "p2", "p3"],
        "label": [0, 1, 1, 0], "split": ["train", "train", "val", "test"],
    })


def test_validate_split_detects_problems(tmp_path: Path) -> None:
    ok = validate_split(_small_table(), num_classes=2)
    assert ok.ok and ok.counts == {"test": {0: 1}, "train": {0: 1, 1: 1}, "val": {1: 1}}
    leak = _small_table()
    leak.loc[1, "split"] = "val"
    report = validate_split(leak)
    assert not report.ok and "patient 'p1'" in report.errors[0]
    with pytest.raises(SplitError, match="patient leak"):
        validate_split(leak, strict=True)
    assert "outside 0..0" in validate_split(_small_table(), num_classes=1).errors[0]
    bags = tmp_path / "bags"
    write_bag(bags / "a.h5", np.zeros((1, 2), np.float32), np.zeros((1, 2), int), {})
    report = validate_split(_small_table(), bags_dir=bags)
    assert report.ok and report.missing_bags == ["b", "c", "d"] and "3 of 4 slides in split table have no bag" in report.warnings[0]
    with pytest.raises(SplitError, match="no bag"):
        validate_split(_small_table(), bags_dir=bags, strict=True)
    bad = validate_split(_small_table(), expected_counts={"train": 3, "all": {0: 2, 1: 1}})
    assert any("train: 2 slides != expected 3" in w for w in bad.warnings)
    assert any("all: label counts" in w for w in bad.warnings)
    with pytest.raises(SplitError, match="expected 3"):
        validate_split(_small_table(), expected_counts={"train": 3}, strict=True)


def test_write_split_is_atomic_and_validated(tmp_path: Path) -> None:
    out = write_split(_small_table(), tmp_path / "sub" / "s.csv")
    pd.testing.assert_frame_equal(load_split(out), _small_table())
    assert not list(out.parent.glob("*.tmp"))
    with pytest.raises(SplitError, match="missing column"):
        write_split(_small_table().drop(columns="split"), tmp_path / "x.csv")
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------------------------------------- make_split
def _labels(n_patients: int = 40, per_patient: int = 3, centers: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    rows = []
    for p in range(n_patients):
        plabel = int(rng.integers(0, 3))
        for s in range(per_patient):
            rows.append({"slide_id": f"P{p:03d}_S{s}", "patient_id": f"P{p:03d}",
                         "label": plabel if s == 0 else int(rng.integers(0, plabel + 1)), "center": p % centers})
    return pd.DataFrame(rows)


def test_make_split_holdout_grouped_seeded() -> None:
    labels = _labels()
    a = make_split(labels, "holdout", val=0.1, test=0.2, seed=3)
    _no_leak(a)
    patients = a.groupby("split")["patient_id"].nunique().to_dict()
    assert patients == {"test": 8, "val": 4, "train": 28}
    pd.testing.assert_frame_equal(a, make_split(labels, "holdout", val=0.1, test=0.2, seed=3))
    shuffled = labels.sample(frac=1.0, random_state=1)
    same = make_split(shuffled, "holdout", val=0.1, test=0.2, seed=3).set_index("slide_id")["split"]
    assert same.sort_index().equals(a.set_index("slide_id")["split"].sort_index())  # order-independent
    assert not a["split"].equals(make_split(labels, "holdout", val=0.1, test=0.2, seed=4)["split"])
    # stratified by the patients' highest label: every class reaches the test split
    assert set(a.loc[a["split"] == "test", "label"]) == {0, 1, 2}


def test_make_split_kfold() -> None:
    labels = _labels()
    df = make_split(labels, "kfold", val=0.1, test=0.2, folds=4, seed=0)
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3] and len(df) == 4 * len(labels)
    tests = [frozenset(df[(df["fold"] == f) & (df["split"] == "test")]["patient_id"]) for f in range(4)]
    assert len(set(tests)) == 1 and len(tests[0]) == 8
    vals = [set(df[(df["fold"] == f) & (df["split"] == "val")]["patient_id"]) for f in range(4)]
    union = set().union(*vals)
    assert sum(len(v) for v in vals) == len(union) == 32  # every non-test patient is val exactly once
    assert validate_split(df).ok
    with pytest.raises(SplitError, match="folds >= 2"):
        make_split(labels, "kfold", folds=1)


def test_make_split_center() -> None:
    labels = _labels()
    df = make_split(labels, "center", val=0.1, test_centers=[2], seed=0)
    assert set(df.loc[df["split"] == "test", "center"]) == {2}
    assert (df.loc[df["center"] == 2, "split"] == "test").all()
    _no_leak(df)
    loco = make_split(labels, "center", val=0.1, seed=0)
    assert sorted(loco["fold"].unique()) == [0, 1, 2, 3]
    for f in range(4):
        assert set(loco[(loco["fold"] == f) & (loco["split"] == "test")]["center"]) == {f}
    with pytest.raises(SplitError, match="needs a 'center' column"):
        make_split(labels.drop(columns="center"), "center")
    with pytest.raises(SplitError, match="not in the table's centers"):
        make_split(labels, "center", test_centers=[9])


def test_make_split_string_labels_and_errors() -> None:
    labels = _labels().drop(columns="center")
    labels["label"] = labels["label"].map({0: "benign", 1: "atypical", 2: "malignant"})
    df = make_split(labels, "holdout", seed=0)
    assert dict(zip(df["label_name"], df["label"])) == {"atypical": 0, "benign": 1, "malignant": 2}
    with pytest.raises(SplitError, match="unknown strategy"):
        make_split(labels, "random")
    with pytest.raises(SplitError, match="leaves no training"):
        make_split(labels, val=0.5, test=0.5)
    with pytest.raises(SplitError, match="group_by column 'case'"):
        make_split(labels, group_by="case")
    no_patient = labels.drop(columns="patient_id")
    assert (make_split(no_patient)["patient_id"] == make_split(no_patient)["slide_id"]).all()


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_make_and_validate(tmp_path: Path, capsys) -> None:
    labels = _labels()
    lcsv = tmp_path / "labels.csv"
    labels.to_csv(lcsv, index=False)
    bags = tmp_path / "bags"
    for sid in labels["slide_id"][:5]:
        write_bag(bags / f"{sid}.h5", np.zeros((1, 2), np.float32), np.zeros((1, 2), int), {})
    out = tmp_path / "mine.csv"
    argv = ["make", "--labels", str(lcsv), "--bags", str(bags), "--strategy", "holdout", "--val", "0.1",
            "--test", "0.2", "--seed", "1", "--out", str(out)]
    assert splits_cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "have no bag" in captured.err
    first = out.read_text()
    assert splits_cli.main(argv) == 0 and out.read_text() == first
    assert splits_cli.main(["validate", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert splits_cli.main(["validate", str(out), "--bags", str(bags), "--strict"]) == 1
    assert splits_cli.main(["validate", str(out), "--protocol", "bracs"]) == 0  # warnings only
    assert splits_cli.main(["validate", str(out), "--protocol", "bracs", "--strict"]) == 1
    assert splits_cli.main(["make", "--labels", str(lcsv), "--strategy", "kfold", "--folds", "3",
                            "--out", str(tmp_path / "k.csv")]) == 0
    assert load_split(tmp_path / "k.csv")["fold"].nunique() == 3
    assert splits_cli.main(["validate", str(tmp_path / "missing.csv")]) == 2


def test_cli_official_writes_and_checks(tmp_path: Path) -> None:
    c17 = tmp_path / "c17.csv"
    rows = [{"slide_id": f"patient_{p:03d}_node_{n}", "label": (p + n) % 4 if n == 0 else 0, "center": p // 20}
            for p in range(100) for n in range(5)]
    pd.DataFrame(rows).to_csv(c17, index=False)
    bracs = tmp_path / "bracs.csv"
    subtypes = ["N", "PB", "UDH", "FEA", "ADH", "DCIS", "IC"]
    groups = ["BT", "BT", "BT", "AT", "AT", "MT", "MT"]
    brows = [{"slide_id": f"BRACS_{i}", "split": "train" if i < 395 else "val" if i < 460 else "test",
              "group": groups[i % 7], "subtype": subtypes[i % 7], "label": i % 7} for i in range(547)]
    pd.DataFrame(brows).to_csv(bracs, index=False)
    out = tmp_path / "out"
    args = ["--camelyon17", str(c17), "--bracs", str(bracs), "--out", str(out)]
    # these synthetic label counts differ from the published ones: the generator refuses to write them
    assert splits_cli.main(["official", *args]) == 2
    assert not (out / "README.md").exists()
    assert splits_cli.main(["official", "--check", *args]) == 1  # nothing shipped there yet
