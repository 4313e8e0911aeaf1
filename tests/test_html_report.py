"""`report.html` (issue #24, part 3): one self-contained page per evaluate / predict / report folder.

The pages are parsed with a real HTML parser (BeautifulSoup); every embedded image must decode, every table of
predictions must hold the rows of its predictions.csv, nothing may point outside the folder, every string from a
file is escaped. With Debian's `chromium` installed the page is also loaded in a headless browser.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

bs4 = pytest.importorskip("bs4", reason="beautifulsoup4 (the dev extra) parses the pages")

from test_evaluation_report import C, fake_splits  # noqa: E402

from wsi_ncmi.evaluation.html_report import HtmlReportError, write_html_report  # noqa: E402
from wsi_ncmi.evaluation.plots import write_report_plots  # noqa: E402
from wsi_ncmi.evaluation.protocols import evaluate_run  # noqa: E402
from wsi_ncmi.evaluation.report import write_report  # noqa: E402
from wsi_ncmi.evaluation.summary import aggregate_reports  # noqa: E402

EVIL_ID = "<script>alert(1)</script>"
NAMES = ["<b>negative</b>", "itc & co", "micro", "macro"]


def _png(path: Path, size: tuple[int, int] = (600, 400), color: tuple[int, int, int] = (200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = color
    img[: size[1] // 2, : size[0] // 2] = (20, 90, 200)  # two colours: not a blank image
    Image.fromarray(img).save(path)
    return path


def _evaluate_folder(out: Path, seed: int = 0, plots: bool = True, **blocks) -> Path:
    """An evaluate folder of fake NCMI splits; ``blocks`` are put into report.json by hand (as the #27 blocks)."""
    splits = fake_splits("ncmi", seed)
    splits["test"].slide_ids[0] = EVIL_ID  # ids come from users' file names
    report, preds = evaluate_run(splits, C, dataset="camelyon17", split_csv="splits/x.csv", model="abmil",
                                 objective="ncmi", seed=seed, class_names=NAMES, Cs=(1.0,),
                                 extra={"checkpoint": "runs/x/best.ckpt"})
    write_report(out, report, preds)
    if blocks:
        (out / "report.json").write_text(json.dumps({**report, **blocks}))
    if plots:
        write_report_plots(out, report, preds)
    return out


def _soup(path: Path):
    return bs4.BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def _decode(src: str) -> Image.Image:
    m = re.fullmatch(r"data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)", src)
    assert m, f"not an embedded image: {src[:60]}"
    try:
        img = Image.open(io.BytesIO(base64.b64decode(m.group(2), validate=True)))
        img.load()
    except (binascii.Error, OSError) as err:
        pytest.fail(f"embedded image does not decode: {err}")
    return img


def _check_self_contained(page: Path) -> None:
    """Every image decodes; no script / style / link from elsewhere; links stay beside the page."""
    soup = _soup(page)
    for img in soup.find_all("img"):
        _decode(img["src"])
    assert all(not s.get("src") for s in soup.find_all("script")) and not soup.find_all(["link", "iframe"])
    for tag in soup.find_all(href=True):
        href = tag["href"]
        assert not re.match(r"^([a-z][a-z0-9+.-]*:|//)", href, re.I), f"external link {href}"
        if not href.startswith("#"):
            from urllib.parse import unquote

            target = (page.parent / unquote(href)).resolve()
            assert target.is_file(), f"link to a missing file {href}"
    text = page.read_text(encoding="utf-8")
    assert "http:" not in text and "https:" not in text and "url(" not in text
    csp = soup.find("meta", attrs={"http-equiv": "Content-Security-Policy"})["content"]
    assert "default-src 'none'" in csp and "img-src data:" in csp


def _rows(soup, table_id: str) -> list[list[str]]:
    t = soup.find("table", id=table_id)
    assert t is not None, f"no table #{table_id}"
    return [[td.get_text() for td in tr.find_all("td")] for tr in t.find("tbody").find_all("tr")]


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_page_embeds_figures_and_every_prediction(tmp_path: Path) -> None:
    folder = _evaluate_folder(tmp_path / "eval")
    _png(folder / "training_curves.png", (1600, 500))
    _png(folder / "heatmaps" / "slide_a.png", (1200, 900))
    page = write_html_report(folder)
    assert page == folder / "report.html" and not list(folder.glob(".*.tmp"))
    _check_self_contained(page)
    soup = _soup(page)
    srcs = [img["src"] for img in soup.find_all("img")]
    assert len(srcs) == 2 * 2 + 1 + 1  # ROC + confusion of lp and cc, the curves, one heatmap thumbnail
    sizes = [_decode(s).size for s in srcs]
    assert max(max(s) for s in sizes) <= 900  # figures downscaled to 900 px
    thumb = soup.find("a", class_="thumb")
    assert thumb["href"] == "heatmaps/slide_a.png" and max(_decode(thumb.img["src"]).size) <= 256
    preds = pd.read_csv(folder / "predictions.csv", dtype={"slide_id": str})
    rows = _rows(soup, "predictions")
    assert len(rows) == len(preds)
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(zip(preds["protocol"], preds["split"], preds["slide_id"]))
    wrong = sum(1 for tr in soup.find("table", id="predictions").find_all("tr", class_="wrong"))
    assert wrong == int((preds["label"] != preds["prediction"]).sum())
    test = _rows(soup, "test-table")
    rep = json.loads((folder / "report.json").read_text())
    assert [r[0] for r in test] == ["lp", "cc"]
    assert test[0][1] == f"{rep['metrics']['lp']['test']['macro_f1']:.3f}" and test[0][5] == "0.567"  # paper row
    assert "Calibration" not in soup.get_text() and "Out-of-distribution" not in soup.get_text()


def test_strings_from_files_are_escaped(tmp_path: Path) -> None:
    folder = _evaluate_folder(tmp_path / "eval", plots=False)
    page = write_html_report(folder)
    soup = _soup(page)
    assert len(soup.find_all("script")) == 1  # the page's own sorting script, nothing injected
    assert not soup.find_all("b")  # the class name "<b>negative</b>" is text
    cells = [td.get_text() for td in soup.find_all("td")]
    assert EVIL_ID in cells and "<b>negative</b>" in cells and "itc & co" in cells
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.read_text(encoding="utf-8")


def test_calibration_and_ood_blocks_when_present(tmp_path: Path) -> None:
    _png(tmp_path / "outside.png")
    calibration = {"classifier": "lp", "method": "temperature", "temperature": 1.8732,
                   "test": {"before": {"ece": 0.2114, "brier": 0.3312, "mean_max_prob": 0.91,
                                       "mean_max_prob_correct": 0.95},
                            "after": {"ece": 0.0523, "brier": 0.2901, "mean_max_prob": 0.74,
                                      "mean_max_prob_correct": 0.81}},
                   "reliability_png": "reliability.png"}
    ood = {"score": "ncmi_means", "threshold": 0.01234, "rule": "max val score x 1.1", "target_false_alarm": 0.05,
           "flagged_test": [EVIL_ID, "test_7"]}
    folder = _evaluate_folder(tmp_path / "eval", plots=False, calibration=calibration, ood=ood)
    _png(folder / "reliability.png")
    (folder / "calibration.json").write_text(json.dumps(
        {"thresholds": {"ncmi_xi": 0.5, "msp": -0.6}, "default_score": "ncmi_xi", "tpr": 0.95, "n_val": 16,
         "val_kept": {"ncmi_xi": 0.9375, "msp": 1.0}, "val_quantiles": {"msp": {"q5": -0.9, "q50": -0.8, "q95": -0.6}},
         "checkpoint_sha256": "ab" * 32}))
    page = write_html_report(folder)
    _check_self_contained(page)
    soup = _soup(page)
    text = soup.get_text(" ")
    assert "Probability calibration" in text and "1.873" in text and "temperature" in text
    assert "0.211" in text and "0.052" in text and "ECE" in text  # before / after
    assert len(soup.find_all("img")) == 1  # the reliability diagram
    assert "OOD thresholds (calibration.json)" in text and "0.938" in text
    assert "max val score x 1.1" in text and "0.0123" in text and "ncmi_means" in text
    assert [r[0] for r in _rows(soup, "ood-flagged")] == [EVIL_ID, "test_7"]
    assert "ab" * 32 in text  # checkpoint hash from calibration.json in the provenance
    # a figure name that leaves the folder is not read
    calibration["reliability_png"] = "../outside.png"
    report = json.loads((folder / "report.json").read_text())
    report["calibration"] = calibration
    (folder / "report.json").write_text(json.dumps(report))
    assert not _soup(write_html_report(folder)).find_all("img")


def test_current_ood_block_with_auroc_per_score(tmp_path: Path) -> None:
    ood = {"id_split": "test", "ood_bags": "ood/", "n_id": 20, "n_ood": 6, "tpr": 0.95, "default_score": "msp",
           "scores": {"msp": {"auroc": 0.8125, "fpr_at_95tpr": 0.5, "threshold": -0.55},
                      "energy": {"auroc": 0.75, "fpr_at_95tpr": 0.6667, "threshold": -2.1}}}
    page = write_html_report(_evaluate_folder(tmp_path / "eval", plots=False, ood=ood))
    soup = _soup(page)
    assert "threshold" not in [dt.get_text() for dt in soup.find_all("dt")]  # no rule threshold: not shown
    rows = _rows(soup, "ood-scores")
    assert rows == [["msp", "0.812", "0.500", "-0.550"], ["energy", "0.750", "0.667", "-2.100"]]


def test_several_seeds_give_mean_and_std(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    for seed in (0, 1):
        _evaluate_folder(out / f"seed{seed}", seed=seed, plots=False)
    page = write_html_report(out)
    soup = _soup(page)
    reps = [json.loads((out / f"seed{s}" / "report.json").read_text()) for s in (0, 1)]
    f1 = [r["metrics"]["lp"]["test"]["macro_f1"] for r in reps]
    lp = _rows(soup, "test-table")[0]
    assert lp[1] == f"{np.mean(f1):.3f} ± {np.std(f1, ddof=1):.3f}"
    for s in (0, 1):
        assert len(_rows(soup, f"predictions-seed{s}")) == len(pd.read_csv(out / f"seed{s}" / "predictions.csv"))


def test_unreadable_figure_is_a_note_and_empty_folder_an_error(tmp_path: Path) -> None:
    folder = _evaluate_folder(tmp_path / "eval", plots=False)
    (folder / "roc_lp_test.png").write_bytes(b"not a png")
    soup = _soup(write_html_report(folder))
    assert not soup.find_all("img") and "roc_lp_test.png could not be read" in soup.get_text()
    with pytest.raises(HtmlReportError, match="empty.*no predict.json, summary.json or report.json"):
        write_html_report(tmp_path / "empty")


# ------------------------------------------------------------------------------------ summary / predict
def test_summary_page_links_each_run(tmp_path: Path) -> None:
    runs = [_evaluate_folder(tmp_path / f"run{s}", seed=s, plots=False) for s in (0, 1)]
    for r in runs:
        write_html_report(r)
    aggregate_reports(runs, tmp_path / "summary")
    page = write_html_report(tmp_path / "summary", related=[runs[0] / "report.html"])
    _check_self_contained(page)
    soup = _soup(page)
    assert "±" in soup.find("table").get_text()
    links = {a["href"] for a in soup.find("table", id="runs").find_all("a")}
    assert links == {"../run0/report.html", "../run1/report.html"}
    assert len(_rows(soup, "runs")) == 2 * 2  # two runs x (lp, cc)


def test_predict_page_rows_flags_and_heatmaps(tmp_path: Path) -> None:
    folder = tmp_path / "pred"
    hm = _png(folder / "heatmaps" / "s1.png", (1000, 700))
    table = pd.DataFrame({"slide_id": ["s1", EVIL_ID, "NA"], "label": ["tumour", "normal", "normal"],
                          "prediction": ["tumour", "tumour", "normal"], "prob_normal": [0.1, 0.6, 0.9],
                          "prob_tumour": [0.9, 0.4, 0.1], "ood_score": [0.01, 0.5, 0.02],
                          "ood_flag": [False, True, False]})
    table.to_csv(folder / "predictions.csv", index=False)
    meta = {"checkpoint": "runs/x/best.ckpt", "checkpoint_sha256": "cd" * 32, "bags_dir": "bags/",
            "calibration": "eval/calibration.json", "ood_score": "ncmi_xi", "threshold": 0.1, "objective": "ncmi",
            "heatmaps": {"s1": str(hm), EVIL_ID: "skipped: slide file not found"},
            "training_bags": {"encoder": ["mobilenet_v2_tv"], "target_mpp": [1.0]},
            "metrics": {"macro_f1": 0.6667, "macro_auc": 0.5, "accuracy": 0.6667, "balanced_accuracy": 0.75}}
    (folder / "predict.json").write_text(json.dumps(meta))
    page = write_html_report(folder)
    _check_self_contained(page)
    soup = _soup(page)
    rows = _rows(soup, "predictions")
    assert [r[0] for r in rows] == ["s1", EVIL_ID, "NA"]  # "NA" stays a slide id
    trs = soup.find("table", id="predictions").find("tbody").find_all("tr")
    assert [tr.get("class") for tr in trs] == [None, ["flag"], None]
    assert rows[1][6] == "OOD" and rows[0][6] == "no"
    assert trs[0].find("a", class_="thumb")["href"] == "heatmaps/s1.png"
    assert max(_decode(trs[0].img["src"]).size) <= 256 and rows[1][7] == "skipped: slide file not found"
    text = soup.get_text(" ")
    assert "1 slide(s) flagged" in text and "mobilenet_v2_tv" in text and "cd" * 32 in text and "0.667" in text


def test_bad_predict_files_are_named_or_tolerated(tmp_path: Path) -> None:
    folder = tmp_path / "pred"
    folder.mkdir()
    (folder / "predict.json").write_text("{not json")
    pd.DataFrame({"slide_id": ["a"], "prediction": ["x"], "prob_x": [1.0]}).to_csv(folder / "predictions.csv",
                                                                                  index=False)
    with pytest.raises(HtmlReportError, match="predict.json: cannot read"):
        write_html_report(folder)
    # odd types from a hand-edited file are shown as text, never followed
    (folder / "predict.json").write_text(json.dumps({"ood_score": ["msp"], "threshold": "high", "heatmaps": "x",
                                                     "metrics": [1], "mismatches": {"a": ["encoder differs"]}}))
    soup = _soup(write_html_report(folder))
    assert _rows(soup, "predictions")[0][:2] == ["a", "x"] and "encoder differs" in soup.get_text()
    pd.DataFrame({"id": ["a"]}).to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(HtmlReportError, match="predictions.csv: no slide_id column"):
        write_html_report(folder)


def test_report_cli_and_demo_cli_end_naming_the_page(tmp_path: Path, capsys, monkeypatch) -> None:
    from wsi_ncmi.commands import demo_cli
    from wsi_ncmi.commands.evaluate_cli import main_report
    from wsi_ncmi.demo import pipeline
    from wsi_ncmi.demo.config import DemoConfig, DemoResult, StageResult

    runs = [_evaluate_folder(tmp_path / f"run{s}", seed=s, plots=False) for s in (0, 1)]
    assert main_report([str(r) for r in runs] + ["--out", str(tmp_path / "sum")]) == 0
    page = tmp_path / "sum" / "report.html"
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"report page → {page}" and page.is_file()

    res = DemoResult(DemoConfig(out=tmp_path / "demo"))
    res.stages.append(StageResult("report", "ok", 0.1, ""))
    res.paths["html"] = page
    monkeypatch.setattr(pipeline, "run_demo", lambda **_kw: res)
    assert demo_cli.main(["--out", str(tmp_path / "demo")]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == f"open the report page: {page}"


# ------------------------------------------------------------------------------------------- browser
def test_page_in_headless_chromium(tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no `chromium` on PATH (Debian: apt-get install chromium); the page is checked by parsing only")
    folder = _evaluate_folder(tmp_path / "eval")
    _png(folder / "heatmaps" / "slide_a.png", (800, 600))
    page = write_html_report(folder)
    shot = tmp_path / "shot.png"
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run([*common, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    console = [ln for ln in run.stderr.splitlines() if "CONSOLE" in ln or "Content Security Policy" in ln]
    assert not console, "\n".join(console)
    assert 'tabindex="0"' in run.stdout  # the sorting script ran (the CSP hash lets it run)
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,1600", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert px.std() > 10 and (px < 128).mean() > 0.005  # text and figures, not a blank page
