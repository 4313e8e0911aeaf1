"""Report dict, schema validator, writer (json / md / csv) and the mean ± std summary over runs."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from wsi_ncmi.data.official import detect_dataset
from wsi_ncmi.evaluation.embed import EmbeddedSplit, center_and_normalize
from wsi_ncmi.evaluation.paper import PAPER_TABLE_III, paper_for_protocol
from wsi_ncmi.evaluation.protocols import PROTOCOLS, evaluate_run
from wsi_ncmi.evaluation.report import read_report, write_report
from wsi_ncmi.evaluation.report_schema import (
    REPORT_PROTOCOLS,
    ReportError,
    ReportSchemaError,
    validate_report,
)
from wsi_ncmi.evaluation.summary import aggregate_reports, find_reports
from wsi_ncmi.ncmi import NCMILoss

C = 4
NAMES = ["negative", "itc", "micro", "macro"]


def fake_splits(kind: str, seed: int = 0, dim: int = 8) -> dict[str, EmbeddedSplit]:
    """Embedded train/val/test splits of 4 well-separated classes; kind 'ncmi' or 'head'."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    loss = NCMILoss(C, dim, tau=0.5).eval()
    w = rng.standard_normal((dim, C))
    out = {}
    sizes = {"train": 8, "val": 4, "test": 5}
    for split, per_class in sizes.items():
        y = np.repeat(np.arange(C), per_class)
        emb = (3.0 * np.eye(dim)[y] + 0.7 * rng.standard_normal((y.size, dim))).astype(np.float32)
        s = EmbeddedSplit([f"{split}_{i}" for i in range(y.size)], y, emb)
        if kind == "ncmi":
            t = torch.from_numpy(emb)
            s.log_probs = loss.log_probs(t).numpy()
            s.normalized = loss.normalized(t).numpy()
        else:
            s.logits = emb @ w + 2.0 * np.eye(C)[y]
        out[split] = s
    if kind != "ncmi":
        center = out["train"].embeddings.mean(0)
        for s in out.values():
            s.normalized = center_and_normalize(s.embeddings, center)
    return out


def make_report(kind: str = "ncmi", dataset: str = "camelyon17", model: str = "abmil", seed: int = 0):
    """(report, predictions) for fake splits; cached, a fresh copy each call."""
    report, preds = _make_report(kind, dataset, model, seed)
    return copy.deepcopy(report), preds.copy()


@functools.cache
def _make_report(kind: str, dataset: str, model: str, seed: int):
    objective = "ncmi" if kind == "ncmi" else "head"
    return evaluate_run(
        fake_splits(kind, seed), C, dataset=dataset, split_csv=f"splits/{dataset}.csv", model=model,
        objective=objective, seed=seed, class_names=NAMES, Cs=(0.1, 1.0, 10.0),
    )


def test_ncmi_run_has_lp_and_cc_and_simplex_ncmi() -> None:
    report, preds = make_report("ncmi")
    validate_report(report)
    assert set(report["metrics"]) == {"lp", "cc"}
    assert report["n_slides"] == {"train": 32, "val": 16, "test": 20}
    assert report["ncmi_source"] == "ncmi_simplex"
    assert set(report["ncmi"]) == {"train", "val", "test"}
    assert report["ncmi"]["test"]["ncmi"] == pytest.approx(report["ncmi"]["test"]["cmi"] / report["ncmi"]["test"]["gamma"])
    for proto in ("lp", "cc"):
        m = report["metrics"][proto]["test"]
        assert m["macro_f1"] > 0.6 and len(m["per_class_f1"]) == C and np.array(m["confusion"]).sum() == 20
    assert report["protocol_info"]["lp"]["C"] in (0.1, 1.0, 10.0)
    assert list(preds.columns) == ["protocol", "split", "slide_id", "label", "prediction", *(f"prob_{n}" for n in NAMES)]
    assert len(preds) == 2 * (32 + 16 + 20)
    json.dumps(report, allow_nan=False)  # JSON-safe


def test_head_run_has_lp_and_head_and_softmax_ncmi() -> None:
    report, preds = make_report("head")
    assert set(report["metrics"]) == {"lp", "head"}
    assert report["ncmi_source"] == "softmax_logits"
    head = preds[(preds.protocol == "head") & (preds.split == "test")]
    np.testing.assert_allclose(head[[f"prob_{n}" for n in NAMES]].sum(1), 1.0, rtol=1e-6)


def test_evaluate_run_errors() -> None:
    splits = fake_splits("ncmi")
    with pytest.raises(ReportError, match="missing"):
        evaluate_run({"train": splits["train"]}, C, dataset="x", split_csv="s", model="m", objective="ncmi")
    with pytest.raises(ReportError, match="unknown protocols"):
        evaluate_run(splits, C, dataset="x", split_csv="s", model="m", objective="ncmi", protocols=["knn"])
    with pytest.raises(ReportError, match="overwrite"):
        evaluate_run(splits, C, dataset="x", split_csv="s", model="m", objective="ncmi", extra={"seed": 3})
    with pytest.raises(ReportError, match="lp_input"):
        evaluate_run(splits, C, dataset="x", split_csv="s", model="m", objective="ncmi", lp_input="pca")


def _two_input_splits(normalized: str, seed: int = 0, dim: int = 6) -> dict[str, EmbeddedSplit]:
    """3 separable classes in the raw embedding; the ``normalized`` rows are ``"noise"`` (carry no label) or
    ``"same"`` (a copy of the raw rows, so both inputs score exactly the same)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_class in {"train": 20, "val": 10, "test": 10}.items():
        y = np.repeat(np.arange(3), per_class)
        emb = (2.0 * np.eye(dim)[y] + 0.3 * rng.standard_normal((y.size, dim))).astype(np.float32)
        s = EmbeddedSplit([f"{split}_{i}" for i in range(y.size)], y, emb)
        s.normalized = emb.copy() if normalized == "same" else rng.standard_normal((y.size, dim)).astype(np.float32)
        out[split] = s
    return out


_LP_KW = dict(dataset="x", split_csv="s", model="m", objective="head", class_names=["a", "b", "c"],
              protocols=["lp"], Cs=(0.1, 1.0, 10.0))


def test_lp_input_selects_the_rows_the_probe_sees() -> None:
    splits = _two_input_splits("noise")
    runs = {name: evaluate_run(splits, 3, lp_input=name, **_LP_KW)[0] for name in ("normalized", "raw", "auto")}
    info = {name: r["protocol_info"]["lp"] for name, r in runs.items()}
    f1 = {name: r["metrics"]["lp"]["test"]["macro_f1"] for name, r in runs.items()}
    assert info["normalized"]["input"] == "centred, L2-normalised slide embedding"
    assert info["raw"]["input"] == "raw slide embedding f"
    assert f1["raw"] > 0.9 and f1["normalized"] < 0.7
    assert set(info["normalized"]["input_val_scores"]) == {"normalized"}
    from wsi_ncmi.evaluation.report import report_markdown

    assert "here raw slide embedding f, set by --lp-input" in report_markdown(runs["raw"])  # report.md says which
    assert "here raw slide embedding f, chosen on validation" in report_markdown(runs["auto"])
    # auto: both inputs fitted, the one with the better validation score kept
    assert info["auto"]["input"] == "raw slide embedding f" and f1["auto"] == f1["raw"]
    assert (info["auto"]["kept_input"], info["normalized"]["kept_input"]) == ("raw", "normalized")
    scores = info["auto"]["input_val_scores"]
    assert set(scores) == {"normalized", "raw"} and scores["raw"] > scores["normalized"]


def test_lp_input_auto_tie_keeps_normalized() -> None:
    report, _ = evaluate_run(_two_input_splits("same"), 3, lp_input="auto", **_LP_KW)
    info = report["protocol_info"]["lp"]
    assert info["input_val_scores"]["raw"] == info["input_val_scores"]["normalized"]
    assert info["input"] == "centred, L2-normalised slide embedding"


def _broken(report: dict, path: list, value) -> dict:
    bad = copy.deepcopy(report)
    node = bad
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return bad


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (["dataset"], KeyError, "missing key 'dataset'"),
        (["seed"], "0", "'seed' must be int"),
        (["n_slides", "test"], KeyError, "n_slides must have exactly"),
        (["metrics", "knn"], {}, "unknown protocol"),
        (["metrics", "lp", "test", "macro_auc"], 1.5, "macro_auc"),
        (["metrics", "lp", "test", "per_class_f1"], [0.5], "per_class_f1 has 1 entries"),
        (["metrics", "lp", "test", "confusion"], [[1, 2], [3]], "square"),
        (["metrics", "cc", "val"], KeyError, None),  # a protocol may miss a split: still valid
        (["ncmi", "test", "gamma"], KeyError, "exactly the keys"),
        (["ncmi", "test", "cmi"], -1.0, "non-negative"),
    ],
)
def test_validator_rejects_broken_reports(path: list, value, match: str | None) -> None:
    report, _ = make_report("ncmi")
    bad = _broken(report, path, value)
    if match is None:
        validate_report(bad)
        return
    with pytest.raises(ReportSchemaError, match=match):
        validate_report(bad)


def test_validator_rejects_non_dict() -> None:
    with pytest.raises(ReportSchemaError):
        validate_report([1, 2])


def test_write_report_files_and_paper_numbers(tmp_path: Path) -> None:
    report, preds = make_report("ncmi")
    paths = write_report(tmp_path / "run", report, preds)
    assert read_report(paths["json"]) == json.loads(paths["json"].read_text())
    md = paths["md"].read_text()
    assert "0.567" in md and "0.892" in md  # Table III, camelyon17 / ABMIL, +NCMI-LP row
    assert "0.522" in md and "0.853" in md  # the baseline row is listed for reference
    assert "| lp |" in md and "| cc |" in md and "macro" in md.lower()
    back = pd.read_csv(paths["predictions"])
    assert set(back["protocol"]) == {"lp", "cc"} and set(back["split"]) == {"train", "val", "test"}
    assert not list(tmp_path.joinpath("run").glob("*.tmp"))


def test_report_md_without_paper_entry(tmp_path: Path) -> None:
    report, preds = make_report("head", dataset="mydata", model="abmil")
    md = write_report(tmp_path, report, preds)["md"].read_text()
    assert "no entry" in md and "0.522" not in md


def test_write_report_refuses_invalid(tmp_path: Path) -> None:
    report, preds = make_report("ncmi")
    with pytest.raises(ReportSchemaError):
        write_report(tmp_path, _broken(report, ["metrics"], {}), preds)
    assert not (tmp_path / "report.json").exists()


def test_paper_lookup_and_dataset_detection() -> None:
    assert paper_for_protocol("camelyon17", "abmil", "ncmi", "lp") == PAPER_TABLE_III["camelyon17"]["abmil"]["ncmi_lp"]
    assert paper_for_protocol("bracs", "asmil", "head", "head") == {"macro_f1": 0.781, "macro_auc": 0.914}
    assert paper_for_protocol("bracs", "asmil", "ncmi", "cc") is None
    assert paper_for_protocol("bracs", "asmil", "head", "head", num_classes=7) is None  # 7-class task: no entry
    assert detect_dataset("/data/splits/camelyon17_centers.csv") == "camelyon17"
    assert detect_dataset("runs/BRACS/split.csv") == "bracs"
    assert detect_dataset("splits/bracs-3class.csv") == "bracs"
    assert detect_dataset("/tmp/other/split.csv") == "unknown"
    assert detect_dataset("splits/camelyon17/seed1.csv") == "camelyon17"
    assert detect_dataset("splits/camelyon17/loco_center3.csv") == "camelyon17_loco"  # not Table III's protocol
    assert paper_for_protocol("camelyon17_loco", "abmil", "ncmi", "lp", 4) is None


def _fake_run(root: Path, name: str, f1: float, objective: str = "ncmi", dataset: str = "camelyon17") -> Path:
    report, preds = make_report("ncmi" if objective == "ncmi" else "head", dataset=dataset)
    for split in report["metrics"]["lp"]:
        report["metrics"]["lp"][split]["macro_f1"] = f1
    write_report(root / name, report, preds)
    return root / name


def test_aggregate_three_runs_mean_std(tmp_path: Path) -> None:
    runs = [_fake_run(tmp_path, f"s{i}", f1) for i, f1 in enumerate([0.5, 0.6, 0.7])]
    other = _fake_run(tmp_path, "ce", 0.4, objective="head")
    summary = aggregate_reports([*runs, other], tmp_path / "summary")
    groups = {(g["dataset"], g["model"], g["objective"]): g for g in summary["groups"]}
    g = groups[("camelyon17", "abmil", "ncmi")]
    assert g["n_runs"] == 3
    st = g["metrics"]["lp"]["test"]["macro_f1"]
    assert st["mean"] == pytest.approx(0.6) and st["std"] == pytest.approx(0.1) and st["n"] == 3
    assert g["paper"]["lp"] == {"macro_f1": 0.567, "macro_auc": 0.892}
    single = groups[("camelyon17", "abmil", "head")]
    assert single["n_runs"] == 1 and single["metrics"]["lp"]["test"]["macro_f1"]["std"] is None
    out = tmp_path / "summary"
    assert json.loads((out / "summary.json").read_text()) == summary
    table = pd.read_csv(out / "summary.csv")
    row = table[(table.objective == "ncmi") & (table.protocol == "lp") & (table.split == "test") & (table.metric == "macro_f1")]
    assert row["mean"].item() == pytest.approx(0.6) and row["std"].item() == pytest.approx(0.1)
    assert row["paper"].item() == pytest.approx(0.567)
    md = (out / "summary.md").read_text()
    assert "0.600 ± 0.100" in md and "0.567" in md


def test_find_reports_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such"):
        find_reports([tmp_path / "nope"])
    with pytest.raises(ReportError, match="no report.json"):
        find_reports([tmp_path])
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="cannot read"):
        aggregate_reports([tmp_path], tmp_path / "out")


def test_tiny_ncmi_terms_keep_significant_digits() -> None:
    from wsi_ncmi.evaluation.report import format_number as _fmt
    from wsi_ncmi.evaluation.summary import _pm

    assert _fmt(2.5e-05, ".4g") == "2.5e-05" and _fmt(None, ".4g") == "n/a" and _fmt(float("inf"), ".4g") == "n/a"
    assert _pm({"mean": 2.5e-05, "std": None}, ".3g") == "2.5e-05 (n=1)"  # not "0.000"
    assert _pm({"mean": 0.5, "std": 0.25}) == "0.500 ± 0.250"


def test_markdown_table_is_the_one_table_writer() -> None:
    from wsi_ncmi.data.markdown import markdown_table

    assert markdown_table(["a", "b"], [[1, "x"], [2.5, None]]) == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]
    assert markdown_table(["only"], []) == ["| only |", "|---|"]


def test_report_schema_knows_every_registered_protocol() -> None:
    assert tuple(PROTOCOLS) == REPORT_PROTOCOLS
