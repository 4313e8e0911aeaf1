"""`wsi-ncmi predict` and the OOD scores (issue #16): provenance recorded at fit time and checked on new bags,
calibration at 95 % TPR, OOD metrics, `evaluate --ood-bags`, `--slides-dir` preprocessing then predicting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as lightning
import numpy as np
import pandas as pd
import pytest
import torch
from _synthetic import make_witness_bags, witness_directions

from wsi_ncmi.data import MILDataModule
from wsi_ncmi.data.bags import list_bags, write_bag
from wsi_ncmi.data.provenance import CHECKPOINT_KEY
from wsi_ncmi.evaluation.ood import (
    OOD_SCORERS,
    Calibration,
    ScoreInputs,
    calibrate,
    compute_scores,
    ood_metrics,
    threshold_at_tpr,
)
from wsi_ncmi.training import MILModule

DIM, C = 16, 2
KW = {"inner_dim": 16, "attn_hidden": 16}


def _fit(bags_dir: Path, split: Path, root: Path, objective: str, epochs: int = 4, in_dim: int = DIM) -> Path:
    lightning.seed_everything(0, workers=True)
    dm = MILDataModule(str(bags_dir), str(split), num_workers=0, pin_memory=False, num_classes=C)
    module = MILModule(model="abmil", model_kwargs=KW, in_dim=in_dim, num_classes=C, objective=objective, lr=3e-3,
                       ncmi_kwargs={"center_momentum": 0.9} if objective == "ncmi" else None)
    trainer = lightning.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = root / "checkpoints" / "best.ckpt"
    trainer.save_checkpoint(str(ckpt))
    return ckpt


def _ood_bags(out: Path, n: int = 6, seed: int = 11) -> Path:
    """Bags whose instances come from a distribution training never saw: noise shifted along a direction
    orthogonal to every witness direction, plus a larger spread."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dirs = witness_directions(C, DIM, seed=3)  # the fixture's witness directions (seed 3)
    u = rng.standard_normal(DIM)
    u -= dirs.T @ (dirs @ u)
    u /= np.linalg.norm(u)
    for i in range(n):
        k = int(rng.integers(8, 24))
        x = (2.0 * rng.standard_normal((k, DIM)) + 6.0 * u).astype(np.float32)
        write_bag(out / f"ood_{i}.h5", x, np.zeros((k, 2), np.int64),
                  {"slide_id": f"ood_{i}", "encoder": "synthetic-witness", "patch_size": 256, "patch_level": 0})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    bags = root / "bags"
    split = make_witness_bags(bags, n_slides=40, num_classes=C, dim=DIM, n_instances=(8, 24), seed=3,
                              witness_strength=8.0, n_witnesses=(2, 5), fractions=(0.5, 0.2, 0.3))
    out = {"bags": bags, "split": split, "ood": _ood_bags(root / "ood")}
    for obj in ("ncmi", "head"):
        out[obj] = _fit(bags, split, root / obj, obj)
    return out


# ------------------------------------------------------------------------------------ scores / metrics
def test_ood_auroc_and_fpr_on_constructed_scores() -> None:
    m = ood_metrics(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.5, 4.0, 5.0]))
    assert m["auroc"] == pytest.approx(11 / 12)  # 2.5 beats 3 of 4 ID scores, 4 and 5 beat all 4
    assert m["threshold"] == 3.0 and m["fpr_at_95tpr"] == pytest.approx(1 / 3)  # only 2.5 is kept
    perfect = ood_metrics(np.arange(20.0), np.arange(20.0) + 100)
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95tpr"] == 0.0
    inverted = ood_metrics(np.arange(20.0) + 100, np.arange(20.0))
    assert inverted["auroc"] == 0.0 and inverted["fpr_at_95tpr"] == 1.0


def test_msp_energy_and_ncmi_scores() -> None:
    logits = np.array([[5.0, 0.0], [0.0, 0.0]])
    s = compute_scores(ScoreInputs(logits=logits))
    assert set(s) == {"msp", "energy"}
    np.testing.assert_allclose(s["msp"], [-1 / (1 + np.exp(-5.0)), -0.5])
    np.testing.assert_allclose(s["energy"], [-np.log(np.exp(5.0) + 1), -np.log(2.0)])
    kl = np.array([[0.3, 0.1], [2.0, 4.0]])
    s = compute_scores(ScoreInputs(logits=-kl, kl_xi=kl, kl_means=kl * 2))
    np.testing.assert_allclose(s["ncmi_xi"], [0.1, 2.0])
    np.testing.assert_allclose(s["ncmi_means"], [0.2, 4.0])
    assert set(OOD_SCORERS) >= {"ncmi_xi", "ncmi_means", "msp", "energy"}


@pytest.mark.parametrize("n", [1, 7, 19, 20, 21, 100])
def test_threshold_keeps_at_least_95_percent(n: int) -> None:
    s = np.random.default_rng(n).standard_normal(n)
    t = threshold_at_tpr(s)
    assert (s <= t).mean() >= 0.95
    assert (s < t).mean() < 0.95  # and it is the smallest such threshold


# -------------------------------------------------------------------------------------- fit → evaluate
def test_checkpoint_records_training_bags(trained) -> None:
    state = torch.load(str(trained["ncmi"]), map_location="cpu", weights_only=True)
    rec = state[CHECKPOINT_KEY]
    assert rec["values"]["encoder"] == ["synthetic-witness"] and rec["values"]["embed_dim"] == [DIM]
    assert rec["values"]["patch_size"] == [256] and rec["values"]["target_mpp"] == [None]
    assert rec["n_bags"] == 40 and rec["class_names"] == ["0", "1"]


@pytest.mark.parametrize("objective", ["ncmi", "head"])
def test_evaluate_writes_calibration_and_ood_section(trained, tmp_path: Path, objective: str, capsys) -> None:
    from wsi_ncmi.commands.evaluate_cli import main as evaluate_main

    out = tmp_path / "eval"
    rc = evaluate_main(["--ckpt", str(trained[objective]), "--data.bags_dir", str(trained["bags"]),
                        "--data.split_csv", str(trained["split"]), "--out", str(out), "--no-plots",
                        "--Cs", "1", "--ood-bags", str(trained["ood"])])
    assert rc == 0, capsys.readouterr().err
    cal = Calibration.read(out / "calibration.json")
    emb = np.load(out / "embeddings.npz")
    module = MILModule.load_from_checkpoint(str(trained[objective]), map_location="cpu", weights_only=True)
    from wsi_ncmi.evaluation.ood import score_inputs

    val = score_inputs(logits=emb["val_logits"] if objective == "head" else None,
                       log_probs=emb["val_log_probs"] if objective == "ncmi" else None,
                       ncmi_loss=module.ncmi_loss, class_means=cal.class_means_array(),
                       embeddings=emb["val_embeddings"], train_mean=cal.train_mean_array())
    scores = compute_scores(val)  # every score but input_z (embeddings.npz holds no input means)
    np.testing.assert_allclose(cal.train_mean_array(), emb["train_embeddings"].astype(np.float64).mean(0))
    expected = {"ncmi_xi", "ncmi_means", "msp", "energy", "radius"} if objective == "ncmi" else {"msp", "energy",
                                                                                                   "radius"}
    assert set(cal.thresholds) == set(scores) | {"input_z"} and set(scores) == expected
    assert len(cal.input_mean) == len(cal.input_std) == DIM  # the training bags' mean input feature and its std
    # the conformal rule at the default false-alarm rate 0.1: val (8) + out-of-fold train (20) slides for radius and
    # input_z, val alone (8 < 9: too few for 10 %, so the maximum, bound 1/9) for the others
    assert cal.rule == "conformal" and cal.target_false_alarm == 0.1
    for name, s in scores.items():
        n = cal.n_reference[name]
        assert n == (28 if name == "radius" else 8) and cal.n_reference["input_z"] == 28
        assert cal.false_alarm_bound[name] == pytest.approx(0.1 if n == 28 else 1 / 9)
        if n == 8:
            assert cal.thresholds[name] == pytest.approx(s.max())
    assert cal.n_val == 8 and cal.default_score == "input_z"
    if objective == "ncmi":
        assert set(cal.choice) == {"ncmi_xi", "ncmi_means"}
        assert np.asarray(cal.class_means).shape == (C, module.model.embed_dim)
    report = json.loads((out / "report.json").read_text())
    ood = report["ood"]
    assert ood["n_id"] == 12 and ood["n_ood"] == 6 and set(ood["scores"]) == expected | {"input_z"}
    for m in ood["scores"].values():
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["fpr_at_95tpr"] <= 1.0
    assert ood["score"] == cal.default_score and ood["threshold"] == pytest.approx(cal.thresholds[cal.default_score])
    assert set(ood["flagged_test"]) <= set(pd.read_csv(trained["split"]).query("split == 'test'")["slide_id"])
    assert len(ood["flagged_ood"]) == round(ood["flagged_ood_share"] * 6)
    assert "## Out-of-distribution flag" in (out / "report.md").read_text()
    assert "## Out-of-distribution detection" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()  # evaluate writes its page last, with the OOD block and provenance
    assert "Out-of-distribution detection" in page and report["provenance"]["checkpoint_sha256"] in page


# ---------------------------------------------------------------------------------------------- predict
def _evaluate(trained, objective: str, out: Path) -> Path:
    from wsi_ncmi.commands.evaluate_cli import main as evaluate_main

    assert evaluate_main(["--ckpt", str(trained[objective]), "--data.bags_dir", str(trained["bags"]),
                          "--data.split_csv", str(trained["split"]), "--out", str(out), "--no-plots",
                          "--Cs", "1"]) == 0
    return out / "calibration.json"


def test_predict_without_and_with_labels(trained, tmp_path: Path, capsys) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    cal = _evaluate(trained, "ncmi", trained["ncmi"].parent.parent / "eval")  # under the run folder
    split = pd.read_csv(trained["split"])
    test = split[split["split"] == "test"]
    new = tmp_path / "new_bags"  # "next month's slides": the test bags and the OOD bags, unlabelled
    new.mkdir()
    for sid in test["slide_id"]:
        shutil.copy(trained["bags"] / f"{sid}.h5", new)
    for p in trained["ood"].glob("*.h5"):
        shutil.copy(p, new)
    out = tmp_path / "pred"
    rc = predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(new), "--out", str(out),
                       "--calibration", str(cal)])
    assert rc == 0, capsys.readouterr().err
    df = pd.read_csv(out / "predictions.csv")
    assert list(df.columns[:7]) == ["slide_id", "prediction", "prob_0", "prob_1", "ood_score", "ood_flag", "kl_0"]
    assert "kl_1" in df.columns and "label" not in df.columns and len(df) == 12 + 6
    np.testing.assert_allclose(df[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(df["ood_score"], df["ood_input_z"], rtol=1e-6)  # the default score
    np.testing.assert_allclose(df["ood_ncmi_xi"], df[["kl_0", "kl_1"]].min(axis=1), rtol=1e-4)
    calib = Calibration.read(cal)
    assert (df["ood_flag"] == (df["ood_score"] > calib.thresholds[calib.default_score])).all()
    ood = df["slide_id"].str.startswith("ood_")
    assert df.loc[ood, "ood_score"].mean() > df.loc[~ood, "ood_score"].mean()  # far-away bags score higher
    summary = (out / "summary.md").read_text()
    assert "## Predicted classes" in summary and "Flagged slides" in summary
    meta = json.loads((out / "predict.json").read_text())
    assert meta["ood_score"] == calib.default_score and meta["mismatches"] == {}
    page = (out / "report.html").read_text()  # predict writes its page last: a row per slide
    assert page.count('<tr class="flag">') == int(df["ood_flag"].sum()) and all(s in page for s in df["slide_id"])

    # with labels (a slide list with a label column): the labels are kept and scored
    lst = tmp_path / "list.csv"
    test[["slide_id", "label"]].to_csv(lst, index=False)
    out2 = tmp_path / "pred_labelled"
    assert predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(trained["bags"]), "--slides", str(lst),
                         "--out", str(out2)]) == 0  # default calibration: the one made from this checkpoint
    df2 = pd.read_csv(out2 / "predictions.csv")
    assert list(df2["slide_id"]) == list(test["slide_id"]) and list(df2["label"]) == list(test["label"])
    meta2 = json.loads((out2 / "predict.json").read_text())
    assert meta2["calibration"] == str(cal) and meta2["threshold"] is not None
    assert meta2["metrics"]["accuracy"] == pytest.approx((df2["label"] == df2["prediction"]).mean())
    assert "## Against the given labels" in (out2 / "summary.md").read_text()


def test_predict_ce_run_without_calibration_warns_and_does_not_flag(trained, tmp_path: Path, caplog) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    ckpt = tmp_path / "never_evaluated" / "checkpoints" / "best.ckpt"  # a copy nobody ran `evaluate` on
    ckpt.parent.mkdir(parents=True)
    shutil.copy(trained["head"], ckpt)
    out = tmp_path / "pred"
    assert predict_main(["--ckpt", str(ckpt), "--bags", str(trained["ood"]), "--out", str(out)]) == 0
    df = pd.read_csv(out / "predictions.csv")
    assert df["ood_flag"].isna().all() and {"ood_msp", "ood_energy"} <= set(df.columns)
    assert not any(c.startswith("kl_") for c in df.columns)
    assert any("no calibration" in r.getMessage() for r in caplog.records)
    assert any("no classifier.json" in r.getMessage() for r in caplog.records)
    meta = json.loads((out / "predict.json").read_text())
    assert meta["classifier"] == "head" and meta["temperature"] == 1.0  # the run's own head, uncalibrated
    rc = predict_main(["--ckpt", str(ckpt), "--bags", str(trained["ood"]), "--out", str(out), "--classifier", "lp"])
    assert rc == 2  # the LP exists only in an evaluation folder


def test_predict_refuses_a_calibration_of_another_checkpoint(trained, tmp_path: Path, capsys) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    cal = _evaluate(trained, "head", tmp_path / "eval_head")
    rc = predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(trained["ood"]), "--out", str(tmp_path / "p"),
                       "--calibration", str(cal)])
    err = capsys.readouterr().err
    assert rc == 2 and "another checkpoint" in err and str(cal) in err


def test_predict_refuses_a_bag_from_another_encoder(trained, tmp_path: Path, capsys) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    new = tmp_path / "bags"
    x = np.random.default_rng(0).standard_normal((10, DIM)).astype(np.float32)
    write_bag(new / "other.h5", x, np.zeros((10, 2), np.int64),
              {"slide_id": "other", "encoder": "uni", "patch_size": 256})
    out = tmp_path / "pred"
    rc = predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(new), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "other.h5" in err and "uni" in err and "synthetic-witness" in err, err
    assert not out.exists()  # refused before anything ran

    rc = predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(new), "--out", str(out), "--allow-mismatch"])
    assert rc == 0
    meta = json.loads((out / "predict.json").read_text())
    assert meta["allow_mismatch"] and "encoder: bag has uni" in meta["mismatches"]["other"][0]
    assert "Provenance mismatches" in (out / "summary.md").read_text()


# ------------------------------------------------------------------------------- --slides-dir end to end
def test_slides_dir_preprocesses_with_recorded_settings_then_predicts(tmp_path: Path, capsys) -> None:
    from _images import preprocess_config

    from preprocessing import synthetic
    from preprocessing.extract import run
    from wsi_ncmi.commands.predict_cli import main as predict_main
    from wsi_ncmi.data.bags import read_bag

    tex = synthetic.package_textures()
    train_slides, new_slides = tmp_path / "train_slides", tmp_path / "new_slides"
    for i in range(6):
        rgb, _ = synthetic.synthetic_tissue(480, 640, seed=i, n_blobs=2, coverage=0.4, textures=tex)
        synthetic.write_svs((train_slides if i < 4 else new_slides) / f"s{i}.svs", rgb, mpp=0.5, downsamples=(1, 4))
    feats = tmp_path / "features"
    run(preprocess_config(train_slides, feats, min_tissue=0.3))
    bags = list_bags(feats / "bags")
    assert len(bags) == 4
    dim = read_bag(bags["s0"]).dim
    split = tmp_path / "split.csv"
    pd.DataFrame({"slide_id": ["s0", "s1", "s2", "s3"], "patient_id": ["p0", "p1", "p2", "p3"],
                  "label": [0, 1, 0, 1], "split": ["train", "train", "val", "test"]}).to_csv(split, index=False)
    ckpt = _fit(feats / "bags", split, tmp_path / "run", "ncmi", epochs=1, in_dim=dim)
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    settings = state[CHECKPOINT_KEY]["settings"]
    assert settings["encoder"] == "test_resnet" and settings["patch_size"] == 32

    out = tmp_path / "pred"
    args = ["--ckpt", str(ckpt), "--slides-dir", str(new_slides), "--weights", "random", "--out", str(out),
            "--heatmaps"]
    assert predict_main(args) == 0, capsys.readouterr().err
    df = pd.read_csv(out / "predictions.csv")
    assert sorted(df["slide_id"]) == ["s4", "s5"]
    new_bag = read_bag(out / "features" / "bags" / "s4.h5")
    assert json.loads(new_bag.attrs["settings_json"]) == settings  # exactly the recorded settings (CPU: fp32)
    assert (out / "heatmaps" / "s4.png").is_file()
    meta = json.loads((out / "predict.json").read_text())
    assert meta["preprocessed"]["statuses"] == {"s4": "ok", "s5": "ok"}

    # resumable: a second run skips the finished slides
    assert predict_main(args) == 0
    meta = json.loads((out / "predict.json").read_text())
    assert meta["preprocessed"]["statuses"] == {"s4": "skipped", "s5": "skipped"}

    # another weight file than the training bags' is refused before any slide work
    other = tmp_path / "w.safetensors"
    other.write_bytes(b"not the weights")
    rc = predict_main(["--ckpt", str(ckpt), "--slides-dir", str(new_slides), "--weights", str(other),
                       "--out", str(tmp_path / "pred2")])
    assert rc == 2 and "SHA-256" in capsys.readouterr().err
    assert not (tmp_path / "pred2").exists()


def test_calibrate_on_constructed_inputs_picks_the_better_centroids() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    good = np.where(np.eye(2)[y] == 1, 0.1, 2.0) + 0.05 * rng.random((40, 2))  # nearest = true class
    bad = rng.random((40, 2))  # unrelated to the class
    cal = calibrate(ScoreInputs(logits=-good, kl_xi=bad, kl_means=good), y)
    assert cal.default_score == "ncmi_means" and cal.choice["ncmi_means"] > cal.choice["ncmi_xi"]
    cal = calibrate(ScoreInputs(logits=-good, kl_xi=good, kl_means=bad), y)
    assert cal.default_score == "ncmi_xi"
    assert calibrate(ScoreInputs(logits=rng.random((40, 2))), y).default_score == "msp"


# ------------------------------------------------------------------- the report's classifier (issue #27)
@pytest.mark.parametrize("which", ["lp", "cc"])
def test_predict_reproduces_evaluate_test_predictions(trained, tmp_path: Path, which: str, capsys) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    ev = tmp_path / "eval"
    _evaluate(trained, "ncmi", ev)
    test = pd.read_csv(trained["split"]).query("split == 'test'")
    lst = tmp_path / "test.csv"
    test[["slide_id"]].to_csv(lst, index=False)
    out = tmp_path / "pred"
    rc = predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(trained["bags"]), "--slides", str(lst),
                       "--out", str(out), "--classifier", which, "--eval", str(ev)])
    assert rc == 0, capsys.readouterr().err
    got = pd.read_csv(out / "predictions.csv", dtype={"prediction": str})
    ref = pd.read_csv(ev / "predictions.csv").query(f"protocol == '{which}' and split == 'test'")
    assert list(got["slide_id"]) == list(ref["slide_id"])
    assert list(got["prediction"]) == [str(p) for p in ref["prediction"]]  # the same classes, slide by slide
    np.testing.assert_allclose(got[["prob_0", "prob_1"]], ref[["cal_prob_0", "cal_prob_1"]], rtol=1e-5, atol=1e-6)
    meta = json.loads((out / "predict.json").read_text())
    saved = json.loads((ev / "classifier.json").read_text())
    assert meta["classifier"] == which and meta["temperature"] == pytest.approx(saved["temperatures"][which])


def test_predict_defaults_to_the_reports_primary_classifier(trained, tmp_path: Path, capsys) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    for objective, primary in (("ncmi", "lp"), ("head", "head")):
        ev = tmp_path / f"eval_{objective}"
        _evaluate(trained, objective, ev)  # recorded in the run folder: predict finds it without --eval
        saved = json.loads((ev / "classifier.json").read_text())
        assert saved["primary"] == primary
        out = tmp_path / f"pred_{objective}"
        rc = predict_main(["--ckpt", str(trained[objective]), "--bags", str(trained["ood"]), "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        meta = json.loads((out / "predict.json").read_text())
        assert meta["classifier"] == primary and Path(meta["classifier_dir"]) == ev.resolve()
        assert Path(meta["calibration"]) == (ev / "calibration.json").resolve()  # the OOD flag is there by default
        assert pd.read_csv(out / "predictions.csv")["ood_flag"].notna().all()
        cal = json.loads((ev / "report.json").read_text())["calibration"]
        assert cal["classifier"] == primary and cal["temperature"] == pytest.approx(saved["temperatures"][primary])
        assert set(cal["test"]) == {"before", "after"} and "## Calibration" in (ev / "report.md").read_text()


def test_predict_refuses_a_classifier_of_another_run(trained, tmp_path: Path, capsys) -> None:
    from wsi_ncmi.commands.predict_cli import main as predict_main

    ev = tmp_path / "eval_head"
    _evaluate(trained, "head", ev)
    rc = predict_main(["--ckpt", str(trained["ncmi"]), "--bags", str(trained["ood"]), "--out", str(tmp_path / "p"),
                       "--eval", str(ev)])
    err = capsys.readouterr().err
    assert rc == 2 and "another checkpoint" in err and "classifier.json" in err and len(err.strip().splitlines()) == 1
