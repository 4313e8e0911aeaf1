"""bench/ncmi_spread.py (issue #23 part 4): the spread diagnosis of NCMI runs reads what a run really holds.

A tiny NCMI ABMIL run is fitted through `wsi-ncmi fit` (the shipped leaf, tiny widths, 2 epochs) and evaluated;
its diagnosis must agree with the evaluation report (CC recomputed = the report's CC), read the validation curve
from the run's metrics.csv, and report two classes as sharing a centroid once their ξ rows are made identical in
a copy of the checkpoint (and not before). The pure statistics are checked on arrays with known answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _synthetic import make_witness_bags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import ncmi_spread as ns  # noqa: E402

XI_KEY = "ncmi_training.loss.xi"


@pytest.fixture(scope="module")
def ncmi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mil_benchmark import shipped_fit_args

    from wsi_ncmi.evaluation.run import EvaluateOptions, evaluate_checkpoint
    from wsi_ncmi.training.cli import run_cli

    tmp = tmp_path_factory.mktemp("spread")
    split = make_witness_bags(tmp / "bags", n_slides=45, num_classes=3, dim=16, n_instances=(6, 20))
    run = tmp / "run"
    args = shipped_fit_args("abmil", "ncmi", str(tmp / "bags"), str(split), 3, 2, run)
    args += ["--model.model_kwargs", '{"inner_dim": 8, "attn_hidden": 8}', "--data.num_workers", "0",
             "--data.pin_memory", "false", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
             "--seed_everything", "0"]
    run_cli("fit", args)
    evaluate_checkpoint(run / "checkpoints" / "best.ckpt", run / "eval", EvaluateOptions(plots=False))
    return run


def test_diagnosis_agrees_with_the_report_and_the_log(ncmi_run: Path) -> None:
    d = ns.diagnose_run(ncmi_run, "both")
    report = json.loads((ncmi_run / "eval" / "report.json").read_text())
    best, last = d["checkpoints"]["best"], d["checkpoints"]["last"]
    for split in ("val", "test"):  # the recomputed CC is evaluate's CC, the LP is the report's
        assert best["metrics"][split]["cc"]["macro_f1"] == pytest.approx(report["metrics"]["cc"][split]["macro_f1"])
        assert best["metrics"][split]["cc"]["confusion"] == report["metrics"]["cc"][split]["confusion"]
        assert best["metrics"][split]["lp"]["per_class_f1"] == report["metrics"]["lp"][split]["per_class_f1"]
    assert (best["lp_source"], last["lp_source"]) == ("report.json", "refitted")  # the report is best.ckpt's
    refit = ns.diagnose_checkpoint(ncmi_run / "checkpoints" / "best.ckpt")  # no report: the probe is refitted
    assert refit["lp_source"] == "refitted" and refit["metrics"]["val"]["lp"] == best["metrics"]["val"]["lp"]
    assert d["curve"]["epochs"] == 2 and len(d["curve"]["val_f1_curve"]) == 2
    assert d["curve"]["val_f1_max"] >= d["curve"]["val_f1_best"]
    # the ξ classifier is the one behind training's val metrics: its val F1 is the logged one of the best epoch
    assert best["metrics"]["val"]["xi"]["macro_f1"] == pytest.approx(d["curve"]["val_f1_best"])
    r = best["run"]
    assert r["shared_xi_pairs"] == []  # class-means init: the three directions are far apart
    assert np.allclose(np.diag(r["xi_cos_matrix"]), 1) and np.allclose(np.diag(r["xi_kl_matrix"]), 0, atol=1e-9)
    assert r["separation_train"] > 0 and r["center_norm"] > 0
    assert [c["xi_norm"] for c in best["classes"]] == pytest.approx(
        torch.linalg.norm(ns_checkpoint_xi(ncmi_run / "checkpoints" / "best.ckpt"), dim=1).tolist())
    assert r["lp_minus_cc_val_f1"] == pytest.approx(best["metrics"]["val"]["lp"]["macro_f1"]
                                                    - best["metrics"]["val"]["cc"]["macro_f1"])


def ns_checkpoint_xi(path: Path) -> torch.Tensor:
    from wsi_ncmi.training.checkpoint import read_checkpoint

    return read_checkpoint(path)["state_dict"][XI_KEY].double()


def test_identical_centroids_are_reported_as_shared(ncmi_run: Path, tmp_path: Path) -> None:
    from wsi_ncmi.training.checkpoint import read_checkpoint

    state = read_checkpoint(ncmi_run / "checkpoints" / "best.ckpt")
    xi = state["state_dict"][XI_KEY]
    xi[2] = xi[1]  # classes 1 and 2 now have one centroid
    xi *= 2.0 / xi.norm(dim=1, keepdim=True)  # at the bags' radius 1/τ (τ 0.5): xi_dir must equal xi
    edited = tmp_path / "checkpoints" / "best.ckpt"
    edited.parent.mkdir()
    torch.save(state, edited)
    c = ns.diagnose_checkpoint(edited)
    assert c["run"]["shared_xi_pairs"] == [(1, 2)]
    assert c["run"]["closest_xi_pair"] == [1, 2] and c["run"]["closest_xi_cos"] == pytest.approx(1.0)
    assert [c["classes"][k]["xi_nearest_cos"] for k in (1, 2)] == [2, 1]
    assert [c["classes"][k]["xi_nearest_kl"] for k in (1, 2)] == [2, 1]
    assert c["run"]["xi_kl_matrix"][1][2] == pytest.approx(0, abs=1e-9)
    assert [cl["xi_norm"] for cl in c["classes"]] == pytest.approx([2.0] * 3)
    for split in ("val", "test"):
        xi_m, dir_m = c["metrics"][split]["xi"], c["metrics"][split]["xi_dir"]
        assert xi_m["confusion"] == dir_m["confusion"] and xi_m["macro_auc"] == pytest.approx(dir_m["macro_auc"])


def test_compare_mode_writes_both_groups(ncmi_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert ns.main([str(ncmi_run), "--compare", str(ncmi_run), "--ckpt", "best", "--labels", "good", "bad",
                    "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| val cc macro-F1 |" in out and "good (1 runs) vs bad (1 runs)" in out
    data = json.loads((tmp_path / "spread.json").read_text())
    assert len(data["groups"]) == 2 and (tmp_path / "spread.md").read_text().startswith("# NCMI spread")
    rows = [line for line in out.splitlines() if line.startswith("| val ") and "macro-F1" in line]
    assert rows and all(line.rstrip().endswith("+0.000 |") for line in rows)  # the same run on both sides


def test_pure_statistics_on_known_arrays() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    apart = np.eye(3)[y] * 10 + rng.standard_normal((90, 3)) * 0.5
    mixed = rng.standard_normal((90, 3))
    assert ns.separation_ratio(apart, y, 3) > 10 > 1 > ns.separation_ratio(mixed, y, 3)
    assert (ns.nearest_mean_scores(apart, ns.class_means(apart, y, 3)).argmax(1) == y).all()
    cos = ns.cosine_matrix(np.array([[1.0, 0, 0], [0, 1, 0], [0, 0.999, 0.02], [-1, 0, 0]]))
    assert ns.shared_pairs(cos) == [(1, 2)] and ns.nearest_other(1 - cos) == [1, 2, 1, 1]
    assert ns.closest_pair(1 - cos)[:2] == (1, 2)
    cm = np.array([[5, 0, 1], [4, 2, 0], [0, 1, 6]])
    assert ns.largest_confusion(cm) == {"true": 1, "pred": 0, "count": 4, "share_of_true": pytest.approx(4 / 6)}
    assert ns.majority_target(np.array([0, 0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 2, 2]), 3) == [0, 1, 0]
    log_q = np.log(np.array([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1]]))
    kl = ns.simplex_kl_matrix(log_q)
    assert kl[0, 1] == pytest.approx(0) and kl[0, 2] == pytest.approx(0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(5))
    rows = [{"epoch": "0", "val/macro_f1": "0.5", "val/f1_plus_auc": "1.2", "val/cc_macro_f1": "0.25"},
            {"epoch": "0", "train/loss_epoch": "0.9"},
            {"epoch": "1", "val/macro_f1": "0.7", "val/f1_plus_auc": "1.1"}]
    cv = ns.curve_summary(rows)
    assert (cv["best_epoch"], cv["val_f1_best"], cv["val_f1_last"], cv["val_f1_max"]) == (0, 0.5, 0.7, 0.7)
    assert cv["val_f1_mean_abs_step"] == pytest.approx(0.2) and cv["train_loss_curve"] == [0.9]
    assert cv["val_cc_f1_curve"][0] == 0.25 and np.isnan(cv["val_cc_f1_curve"][1])  # runs before it was logged
    assert ns.curve_summary([{"epoch": "0", "train/loss_epoch": "1"}]) is None


def test_bad_runs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match=r"ncmi_spread: .*nowhere: no checkpoints/best\|last.ckpt"):
        ns.main([str(tmp_path / "nowhere")])
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    (tmp_path / "bad" / "checkpoints" / "best.ckpt").write_bytes(b"not a checkpoint")
    assert ns.main([str(tmp_path / "bad"), "--ckpt", "best"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ncmi_spread: ") and "best.ckpt" in err and len(err.splitlines()) == 1
