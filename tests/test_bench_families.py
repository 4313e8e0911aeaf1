"""The task families of bench/mil_benchmark.py (issue #23): exact cohorts, determinism per draw, held-out guard.

The pixel pools (C17, BRACS) are replaced by tiny random pools written where the family looks for its cache,
so no tile is encoded here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import families as F  # noqa: E402
from families import bracs, camelyon  # noqa: E402
from families.guard import HeldOutError, choose_draws, frozen_recipe  # noqa: E402
from families.pools import pool_versions  # noqa: E402
from families.stats import summary  # noqa: E402

from wsi_ncmi.data.bags import read_bag  # noqa: E402


def _fake_pool(out: Path, group: str, names: list[str], dim: int = 8, n: int = 30) -> None:
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: rng.normal(size=(n, dim)).astype(np.float32) + i for i, k in enumerate(names)}
    np.savez(out / f"pools_{group}.npz", _version=np.int64(pool_versions((group,))[group]), **arrays)


def _c17_pool(out: Path) -> None:
    _fake_pool(out, "c17_tiles", [f"{k}_c{c}" for c in range(5) for k in ("normal", "tumour")])


def _bracs_pool(out: Path) -> None:
    _fake_pool(out, "bracs_tiles", ["normal"] + [f"grade{g}" for g in range(bracs.GRADES)], n=bracs.LESION_PER_GRADE)


def test_draw_seed_is_fixed_per_family_and_draw() -> None:
    assert F.draw_seed("c17", 0) == F.draw_seed("c17", 0)
    assert len({F.draw_seed(f, d) for f in ("c17", "bracs") for d in (0, 1, 100)}) == 6
    assert F.TUNING_DRAWS == (0, 1, 2, 3, 4) and all(F.is_held_out(d) for d in F.HELD_OUT_DRAWS)
    assert not any(F.is_held_out(d) for d in F.TUNING_DRAWS)


def test_c17_cohort_is_the_shipped_cohort_with_witnesses_by_label(tmp_path: Path) -> None:
    _c17_pool(tmp_path)
    cohort = F.FAMILIES["c17"].make(0, scale=0.01, out=tmp_path)
    official = pd.read_csv(cohort.splits["official"])
    assert len(official) == 500 and official["patient_id"].nunique() == 100
    assert np.bincount(official["label"]).tolist() == [318, 36, 59, 87]
    assert np.bincount(official["center"]).tolist() == [100] * 5
    assert set(cohort.splits) == {"official", "loco0", "loco1", "loco2", "loco3", "loco4"}
    for protocol, name in camelyon.PROTOCOL_FILES.items():  # the shipped tables, unchanged
        shipped = pd.read_csv(ROOT / "splits" / "camelyon17" / name)
        pd.testing.assert_frame_equal(pd.read_csv(cohort.splits[protocol]), shipped, check_dtype=False)
    assert cohort.classes == {p: 4 for p in cohort.splits}
    assert set(pd.read_csv(cohort.splits["loco3"]).query("split == 'test'")["center"]) == {3}
    slides = official.sort_values("slide_id")
    witness = dict(zip(slides["slide_id"], cohort.meta["witness"]))
    lo, hi = cohort.meta["background"]
    for sid, label in zip(slides["slide_id"], slides["label"]):
        k = witness[sid]
        if label == 0:
            assert k == 0
        else:
            wlo, whi, _ = camelyon.WITNESS[label]
            assert wlo <= k <= whi, (sid, label, k)
    sid = slides["slide_id"].iloc[0]
    n = len(read_bag(cohort.bags_dir / f"{sid}.h5").features)
    assert lo + witness[sid] <= n <= hi + witness[sid]
    assert len(list(cohort.bags_dir.glob("*.h5"))) == 500


def test_bracs_cohort_has_the_official_split_and_both_groupings(tmp_path: Path) -> None:
    _bracs_pool(tmp_path)
    cohort = F.FAMILIES["bracs"].make(0, scale=0.01, out=tmp_path)
    assert cohort.classes == {"7class": 7, "3class": 3}
    seven, three = (pd.read_csv(cohort.splits[p]).set_index("slide_id") for p in ("7class", "3class"))
    assert len(seven) == 547 and seven["split"].value_counts().to_dict() == {"train": 395, "test": 87, "val": 65}
    assert (three.loc[seven.index, "split"] == seven["split"]).all()
    group = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}  # N PB UDH / FEA ADH / DCIS IC
    assert (three.loc[seven.index, "label"] == seven["label"].map(group)).all()
    assert len(list(cohort.bags_dir.glob("*.h5"))) == 547


def test_a_draw_is_deterministic_and_draws_differ(tmp_path: Path) -> None:
    fam = F.FAMILIES["digits4"]
    a, b = (fam.make(0, out=tmp_path / x, n_bags=12) for x in ("a", "b"))
    c = fam.make(1, out=tmp_path / "a", n_bags=12)
    assert a.meta == b.meta
    assert pd.read_csv(a.splits["default"]).equals(pd.read_csv(b.splits["default"]))
    for sid in pd.read_csv(a.splits["default"])["slide_id"]:
        np.testing.assert_array_equal(read_bag(a.bags_dir / f"{sid}.h5").features,
                                      read_bag(b.bags_dir / f"{sid}.h5").features)
    same = [np.array_equal(read_bag(a.bags_dir / f"{s}.h5").features, read_bag(c.bags_dir / f"{s}.h5").features)
            for s in pd.read_csv(a.splits["default"])["slide_id"]]
    assert not any(same)
    draws = {tuple(fam.make(d, out=tmp_path / "a", n_bags=12).meta["witness_digits"]) for d in range(5)}
    assert len(draws) > 1  # the draw chooses which digits are the witnesses


@pytest.mark.parametrize("name,width,classes", [("witness_w1536", 1536, 4), ("witness_c7", 512, 7),
                                                ("witness_c2", 768, 2)])
def test_witness_grid_width_and_classes(tmp_path: Path, name: str, width: int, classes: int) -> None:
    cohort = F.FAMILIES[name].make(0, out=tmp_path, n_bags=4 * classes, scale=0.2)
    table = pd.read_csv(cohort.splits["default"])
    assert cohort.classes["default"] == classes and sorted(table["label"].unique()) == list(range(classes))
    assert read_bag(cohort.bags_dir / f"{table['slide_id'][0]}.h5").features.shape[1] == width


def test_witness_skew_has_the_camelyon17_balance(tmp_path: Path) -> None:
    cohort = F.FAMILIES["witness_skew"].make(0, out=tmp_path, scale=0.1, n_bags=100)
    counts = np.bincount(pd.read_csv(cohort.splits["default"])["label"])
    np.testing.assert_allclose(counts / counts.sum(), np.array([318, 36, 59, 87]) / 500, atol=0.02)


def test_held_out_draws_are_refused_without_the_flag() -> None:
    assert choose_draws(None, held_out=False) == [0, 1, 2, 3, 4]
    assert choose_draws(None, held_out=True) == [100, 101, 102, 103, 104]
    with pytest.raises(HeldOutError, match="--held-out"):
        choose_draws([0, 100], held_out=False)
    with pytest.raises(HeldOutError, match="held-out draws only"):
        choose_draws([0, 100], held_out=True)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mil_benchmark.py"), "--families", "digits4",
                           "--draws", "101"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "held out" in proc.stderr and "|" not in proc.stdout


def test_held_out_needs_a_committed_recipe(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "configs" / "mil").mkdir(parents=True)
    (tmp_path / "configs" / "mil" / "base.yaml").write_text("lr: 1\n")
    (tmp_path / "README.md").write_text("x\n")
    git("add", ".")
    git("commit", "-qm", "recipe")
    recipe = git("rev-parse", "HEAD")
    (tmp_path / "README.md").write_text("y\n")  # not a recipe path: still frozen
    git("commit", "-qam", "docs")
    got = frozen_recipe(tmp_path)
    assert got == {"recipe_commit": recipe, "head": git("rev-parse", "HEAD")}
    (tmp_path / "configs" / "mil" / "base.yaml").write_text("lr: 2\n")
    with pytest.raises(HeldOutError, match="not frozen"):
        frozen_recipe(tmp_path)


def test_cell_summary_is_a_student_t_interval() -> None:
    s = summary([1.0, 2.0, 3.0])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["sd"] == 1.0
    assert s["hi"] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert np.isnan(summary([0.5])["lo"])


def test_separability_tells_separable_from_identical_pools() -> None:
    rng = np.random.default_rng(0)
    same = {f"{k}_c{c}": rng.normal(size=(40, 6)) for c in range(5) for k in ("normal", "tumour")}
    apart = {k: v + np.eye(6)[0] * 4.0 if k.startswith("tumour") else v + np.eye(6)[1 + int(k[-1])] * 4.0
             for k, v in same.items()}  # tumour moved along axis 0, centre c's normals along axis 1 + c
    low, high = camelyon.separability(same), camelyon.separability(apart)
    assert low["tile_tumour_auc"] < 0.7 and high["tile_tumour_auc"] > 0.95
    assert low["centre_accuracy"] < 0.45 and high["centre_accuracy"] > 0.9


def test_a_changed_recipe_rebuilds_the_cohort_without_stale_bags(tmp_path: Path) -> None:
    fam = F.FAMILIES["witness_c2"]
    fam.make(0, out=tmp_path, n_bags=12, scale=0.1)
    cohort = fam.make(0, out=tmp_path, n_bags=8, scale=0.1)  # same folder, new recipe
    assert len(list(cohort.bags_dir.glob("*.h5"))) == 8 and len(pd.read_csv(cohort.splits["default"])) == 8
    stamp = (cohort.bags_dir.parent / "recipe.json").stat().st_mtime_ns
    fam.make(0, out=tmp_path, n_bags=8, scale=0.1)  # unchanged recipe: reused, not rewritten
    assert (cohort.bags_dir.parent / "recipe.json").stat().st_mtime_ns == stamp


def test_subset_keeps_the_split_shape_and_label_shares() -> None:
    from families.subset import subset_split

    table = pd.read_csv(ROOT / "splits" / "camelyon17" / "seed0.csv")
    half = subset_split(table, 0.5, seed=3)
    assert set(half["slide_id"]) <= set(table["slide_id"]) and half["slide_id"].is_unique
    full_counts = table.groupby(["split", "label"]).size()
    got = half.groupby(["split", "label"]).size()
    assert ((got - full_counts * 0.5).abs() <= 0.5 + 1e-9).all()  # every stratum halved (rounded), none dropped
    merged = half.merge(table, on="slide_id", suffixes=("", "_full"))
    assert (merged["split"] == merged["split_full"]).all() and (merged["label"] == merged["label_full"]).all()
    assert subset_split(table, 0.5, seed=3).equals(half) and not subset_split(table, 0.5, seed=4).equals(half)
    assert subset_split(table, 1.0) is table
    with pytest.raises(ValueError, match="fraction"):
        subset_split(table, 0.0)


def test_witness_confusion_draws_some_witnesses_from_the_other_classes() -> None:
    pools = [np.full((5, 2), c, np.float32) for c in range(3)]  # witness pool of class c+1 holds the value c
    rng = np.random.default_rng(0)
    plain = F.FAMILIES["digits4"]._witnesses(rng, pools, 2, 400)
    assert (plain == 1).all()
    skew = F.FAMILIES["witness_skew"]
    mixed = skew._witnesses(rng, pools, 2, 4000)[:, 0]
    assert skew.confusion > 0
    assert abs((mixed != 1).mean() - skew.confusion) < 0.03 and set(np.unique(mixed)) == {0, 1, 2}


def test_bracs_lesion_is_a_small_share_of_the_slide(tmp_path: Path) -> None:
    _bracs_pool(tmp_path)
    cohort = F.FAMILIES["bracs"].make(0, scale=0.05, out=tmp_path)
    lo, hi = cohort.meta["background"]
    lesion = np.array(cohort.meta["lesion_tiles"])
    assert lesion.min() >= 1 and lesion.max() <= round(bracs.LESION[1] * hi) + 1
    assert sum(bracs.MIXTURE.values()) == pytest.approx(1.0)


def test_default_grid_is_small_and_full_is_the_issues_grid() -> None:
    import mil_benchmark as mb

    small, full = mb.parse_args([]), mb.parse_args(["--full"])
    assert (small.models, small.objectives, small.seeds, small.draws) == (["abmil"], ["ce", "ce_lr", "ncmi"],
                                                                           [0, 1], [0])
    assert full.models == ["abmil", "aem", "asmil"] and full.seeds == [0, 1, 2, 3, 4] and full.draws == [0, 1, 2, 3, 4]
    assert mb.parse_args(["--held-out"]).draws is None  # the guard picks the held-out draws
    assert set(mb.CPU_RUN_S) == set(F.FAMILIES)  # every family has a measured cost
    jobs = [{"family": f, "objective": o, "epochs": F.FAMILIES[f].epochs, "scale": F.FAMILIES[f].cpu_scale,
             "slides": F.FAMILIES[f].cpu_slides} for f in F.FAMILIES for o in small.objectives for _ in small.seeds]
    line = mb.expected_duration(jobs, 2)
    minutes = sum(mb.CPU_RUN_S.values()) * 2 * (2 + mb.NCMI_COST) / 60 / 2  # CE, CE @ NCMI lr, NCMI × 2 seeds
    assert f"≈ {minutes:.0f} min on 2 quiet cores" in line and minutes <= 30
    doubled = mb.expected_duration([{**j, "epochs": 2 * j["epochs"]} for j in jobs], 2)
    assert f"≈ {2 * minutes:.0f} min" in doubled


def test_the_default_run_trains_c17_on_a_stratified_half(tmp_path: Path) -> None:
    import mil_benchmark as mb

    _c17_pool(tmp_path / "families")
    jobs = mb.prepare(mb.parse_args(["--families", "c17"]), [("c17", "official")], [0], tmp_path)
    assert len(jobs) == 6 and {j["slides"] for j in jobs} == {camelyon.Camelyon17Family.cpu_slides} == {0.5}
    half, full = pd.read_csv(jobs[0]["split"]), pd.read_csv(ROOT / "splits" / "camelyon17" / "seed0.csv")
    assert len(half) == pytest.approx(250, abs=5) and set(half["split"]) == set(full["split"])
    every = mb.prepare(mb.parse_args(["--families", "c17", "--slides", "1"]), [("c17", "official")], [0], tmp_path)
    assert len(pd.read_csv(every[0]["split"])) == 500


def test_slower_aggregators_get_more_epochs_in_the_cpu_run_only(tmp_path: Path) -> None:
    import mil_benchmark as mb

    _c17_pool(tmp_path / "families")
    fam = F.FAMILIES["c17"]
    args = mb.parse_args(["--families", "c17", "--models", "abmil", "aem", "asmil", "--objectives", "ce", "ncmi"])
    jobs = mb.prepare(args, [("c17", "official")], [0], tmp_path)
    epochs = {(j["model"], j["objective"]): j["epochs"] for j in jobs}
    for m in ("abmil", "aem", "asmil"):  # the factor applies to every objective alike
        assert epochs[(m, "ce")] == epochs[(m, "ncmi")] == fam.epochs * mb.EPOCH_FACTOR[m]
    assert mb.EPOCH_FACTOR["abmil"] == 1 and mb.EPOCH_FACTOR["aem"] > 1 and mb.EPOCH_FACTOR["asmil"] > 1
    e = {m: fam.epochs * mb.EPOCH_FACTOR[m] for m in ("aem", "asmil")}
    assert mb.sizes_line(jobs).startswith(f"c17:official: {fam.epochs} epochs (aem {e['aem']}, asmil {e['asmil']})")
    named = mb.prepare(mb.parse_args(["--families", "c17", "--models", "aem", "--epochs", "4"]), [("c17", "official")],
                       [0], tmp_path)
    assert {j["epochs"] for j in named if j["objective"] != "ncmi"} == {4}  # --epochs is taken as given
    assert {j["epochs"] for j in named if j["objective"] == "ncmi"} == {mb.ncmi_epochs(4, mb.NCMI_EPOCH_RATIO)}
    full = mb.prepare(mb.parse_args(["--families", "c17", "--models", "asmil", "--full", "--seeds", "0", "--slides",
                                     "0.5"]), [("c17", "official")], [0], tmp_path)
    assert {j["epochs"] for j in full if j["objective"] != "ncmi"} == {fam.full_epochs}
    assert {j["epochs"] for j in full if j["objective"] == "ncmi"} == {mb.ncmi_epochs(fam.full_epochs,
                                                                                      mb.NCMI_EPOCH_RATIO)}
    aem = [j for j in jobs if (j["model"], j["objective"]) == ("aem", "ce")][:1] * 60  # 60 AEM CE runs
    minutes = 60 * mb.CPU_RUN_S["c17"] * mb.MODEL_COST["aem"] * mb.EPOCH_FACTOR["aem"] / 60
    assert f"expected ~{minutes:.0f} CPU-min" in mb.expected_duration(aem, 1)  # × epochs and × cost per epoch


def test_a_tuning_candidate_overrides_the_ncmi_leaf_and_never_runs_held_out(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    import mil_benchmark as mb

    _c17_pool(tmp_path / "families")
    args = mb.parse_args(["--families", "c17", "--models", "aem", "--objectives", "ce", "ncmi",
                          "--ncmi-set", "model.centroid_optimizer=group", "--ncmi-set", "model.centroid_lr=3e-3"])
    jobs = mb.prepare(args, [("c17", "official")], [0], tmp_path)
    extra = {j["objective"]: j["fit_extra"] for j in jobs}
    assert extra == {"ce": [], "ncmi": ["--model.centroid_optimizer", "group", "--model.centroid_lr", "3e-3"]}
    shipped = mb.prepare(mb.parse_args(["--families", "c17", "--models", "aem", "--objectives", "ncmi"]),
                         [("c17", "official")], [0], tmp_path)
    ncmi_dirs = {j["run_dir"] for j in jobs if j["objective"] == "ncmi"}
    assert ncmi_dirs.isdisjoint(j["run_dir"] for j in shipped)  # a candidate never overwrites the shipped runs
    assert all("_aem_ncmi-" in d for d in ncmi_dirs)
    for bad in ("model.centroid_lr", "=1", "model.lr="):
        with pytest.raises(SystemExit):
            mb.parse_args(["--ncmi-set", bad])
        assert "--ncmi-set wants KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # parse time: main() would quieten this process's loggers
        mb.parse_args(["--held-out", "--draws", "103", "--ncmi-set", "model.centroid_lr=1.0"])
    assert "a held-out run uses the frozen recipe as committed" in capsys.readouterr().err


def test_an_ncmi_epoch_ratio_candidate_shortens_ncmi_runs_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import mil_benchmark as mb

    _c17_pool(tmp_path / "families")
    fam = mb.FAMILIES["c17"]
    args = mb.parse_args(["--families", "c17", "--models", "abmil", "asmil", "--objectives", "ce", "ncmi",
                          "--ncmi-epoch-ratio", "0.25"])
    jobs = mb.prepare(args, [("c17", "official")], [0], tmp_path)
    epochs = {(j["model"], j["objective"]): j["epochs"] for j in jobs}
    for m in ("abmil", "asmil"):
        ce = fam.epochs * mb.EPOCH_FACTOR[m]
        assert epochs[(m, "ce")] == ce and epochs[(m, "ncmi")] == -(-ce // 4)
    assert f"(NCMI: abmil {-(-fam.epochs // 4)}, asmil " in mb.sizes_line(jobs)
    shipped = mb.prepare(mb.parse_args(["--families", "c17", "--models", "abmil", "--objectives", "ce", "ncmi"]),
                         [("c17", "official")], [0], tmp_path)
    assert {(j["objective"], j["epochs"]) for j in shipped} == {  # the shipped ratio
        ("ce", fam.epochs), ("ncmi", mb.ncmi_epochs(fam.epochs, mb.NCMI_EPOCH_RATIO))}
    ncmi_dirs = {j["run_dir"] for j in jobs if j["objective"] == "ncmi"}
    assert ncmi_dirs.isdisjoint(j["run_dir"] for j in shipped)  # the candidate never overwrites shipped runs
    assert {j["run_dir"] for j in jobs if j["objective"] == "ce"} >= {j["run_dir"] for j in shipped
                                                                       if j["objective"] == "ce"}
    assert mb.ncmi_epochs(3, 0.5) == 2 and mb.ncmi_epochs(1, 0.1) == 1 and mb.ncmi_epochs(10, 0.3) == 3
    for bad in ("0", "-1", "5"):
        with pytest.raises(SystemExit):
            mb.parse_args(["--ncmi-epoch-ratio", bad])
        assert "--ncmi-epoch-ratio wants a ratio in (0, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mb.parse_args(["--held-out", "--draws", "103", "--ncmi-epoch-ratio", "0.5"])
    assert "a held-out run uses the frozen recipe as committed" in capsys.readouterr().err
