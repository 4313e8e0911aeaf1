"""What a demo run is told (:class:`DemoConfig`, the run registry :data:`RUNS`) and what it reports
(:class:`DemoResult`, one :class:`StageResult` per stage); see :mod:`wsi_ncmi.demo.pipeline`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from wsi_ncmi.errors import UserError

__all__ = ["DEMO_DATASET", "QUICK_RUNS", "RUNS", "DemoConfig", "DemoError", "DemoResult", "StageResult"]


class DemoError(UserError):
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
    # AEM with NCMI needs the learning-rate warm-up of its shipped recipe (docs/ncmi_mil.md, part 5): at the demo's
    # 5e-4 from the first step its slide embedding collapsed (test LP 0.722 / 0.893; 0.932 / 1.000 with the warm-up)
    runs["aem_ncmi"]["model.warmup_epochs"] = 1.0
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
