"""Evaluation protocols on embedded splits and :func:`evaluate_run`, which runs them into a report dict.

**Protocols** (a registry, :data:`PROTOCOLS`; each runs only where it applies):

* ``"lp"`` — linear probe (:class:`~.probe.LinearProbe`), every run, on the input chosen by ``lp_input``
  (:data:`LP_INPUTS`): ``"normalized"`` — the centred, L2-normalised embedding (NCMI.md §3); ``"raw"`` — the raw
  slide embedding f (the protocol's "also try raw f"); ``"auto"`` (default) — both, each with its own ``C``
  sweep, and the one with the higher best validation score is kept (ties keep ``"normalized"``). The report's
  ``protocol_info.lp`` records the input used and both inputs' best validation scores. Why both: on the
  benchmark's texture tasks the normalised input cost AEM's probe ~0.03 test macro-AUC against the raw one,
  and the raw input also won on validation (docs/ncmi_mil.md, part 4);
* ``"cc"`` — nearest class centroid on the NCMI simplex (Eq. 6 from train), runs with NCMI log-probabilities;
* ``"head"`` — the aggregator's own classification head (softmax of its logits), runs that have a head.

The report's keys are defined in :mod:`.report_schema`. ``"seed"`` is the *training* seed of the checkpoint when
it is known (``"seed_source": "training"``), else the linear probe's seed (``"seed_source": "probe"``); the
probe's seed is always in ``"probe_seed"``.

The ``"ncmi"`` block is the dataset-level NCMI metric of each split (closed-form centroids of the split
itself): for NCMI runs on the NCMI simplex probabilities p = NSF(z'); for runs with a head on
softmax(logits) (``"ncmi_source"`` says which). The two are not on the same simplex, so compare NCMI
values only between runs with the same source.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from wsi_ncmi.metrics import classification_metrics
from wsi_ncmi.ncmi import ncmi_metric

from .embed import EmbeddedSplit
from .probe import DEFAULT_CS, LinearProbe, fit_centroid_classifier
from .report_schema import RESERVED_KEYS, SPLITS, ReportError, json_safe, validate_report

__all__ = ["LP_INPUTS", "LP_INPUT_CHOICES", "PROTOCOLS", "ProtocolResult", "evaluate_run"]

logger = logging.getLogger(__name__)


@dataclass
class ProtocolResult:
    """Class probabilities [N, C] per split, plus what the report should say about the fit."""

    proba: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)  # the fitted arrays (evaluation.classifier_io)


@dataclass
class _Context:
    num_classes: int
    seed: int
    class_weight: str | None
    Cs: Sequence[float]
    refit: str
    solver: str
    lp_input: str = "auto"


# LP input name -> (description, rows [N, E] of one embedded split)
LP_INPUTS: dict[str, tuple[str, Callable[[EmbeddedSplit], np.ndarray | None]]] = {
    "normalized": ("centred, L2-normalised slide embedding", lambda s: s.normalized),
    "raw": ("raw slide embedding f", lambda s: s.embeddings),
}
LP_INPUT_CHOICES = (*LP_INPUTS, "auto")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _fit_lp(splits: Mapping[str, EmbeddedSplit], ctx: _Context, name: str) -> tuple[LinearProbe, float]:
    """The probe on input ``name`` and its best validation score (val macro-F1 + macro-AUC)."""
    rows = LP_INPUTS[name][1]
    tr, va = splits["train"], splits["val"]
    probe = LinearProbe(
        ctx.num_classes,
        Cs=ctx.Cs,
        class_weight=ctx.class_weight,
        seed=ctx.seed,
        refit=ctx.refit,
        solver=ctx.solver,
    )
    probe.fit(rows(tr), tr.labels, rows(va), va.labels)
    return probe, max(probe.val_scores_.values())


def _run_lp(splits: Mapping[str, EmbeddedSplit], ctx: _Context) -> ProtocolResult:
    names = list(LP_INPUTS) if ctx.lp_input == "auto" else [ctx.lp_input]
    fitted = {name: _fit_lp(splits, ctx, name) for name in names}
    chosen = names[0]
    for name in names[1:]:  # a later input must be strictly better on validation
        if fitted[name][1] > fitted[chosen][1] + 1e-12:
            chosen = name
    probe = fitted[chosen][0]
    rows = LP_INPUTS[chosen][1]
    proba = {name: probe.predict_proba(rows(s)) for name, s in splits.items()}
    info = {
        "C": probe.C_,
        "val_scores": {f"{c:g}": round(v, 6) for c, v in probe.val_scores_.items()},
        "selection": "val macro_f1 + macro_auc, ties -> smaller C",
        "refit": ctx.refit,
        "class_weight": ctx.class_weight,
        "input": LP_INPUTS[chosen][0],
        "kept_input": chosen,
        "lp_input": ctx.lp_input,
        "input_val_scores": {name: round(score, 6) for name, (_, score) in fitted.items()},
        "solver": probe.solver,
    }
    model = probe.model_
    state = {"coef": model.coef_, "intercept": model.intercept_, "classes": model.classes_.astype(np.int64)}
    if len(names) > 1:
        logger.info("linear probe input: %s (best val score per input: %s)", chosen,
                    ", ".join(f"{n} {fitted[n][1]:.4f}" for n in names))
    return ProtocolResult(proba, info, state)


def _run_cc(splits: Mapping[str, EmbeddedSplit], ctx: _Context) -> ProtocolResult:
    tr = splits["train"]
    clf = fit_centroid_classifier(tr.log_probs, tr.labels, ctx.num_classes)
    proba = {name: np.asarray(clf.predict_proba(s.probs()), dtype=np.float64) for name, s in splits.items()}
    return ProtocolResult(
        proba, {"centroids": "mean of train simplex points (Eq. 6)", "scores": "softmax(-KL)"},
        {"means": clf.centroids_.cpu().numpy()},
    )


def _run_head(splits: Mapping[str, EmbeddedSplit], ctx: _Context) -> ProtocolResult:
    return ProtocolResult({name: _softmax(s.logits.astype(np.float64)) for name, s in splits.items()})


# name -> (applies to these splits?, run)
PROTOCOLS: dict[str, tuple[Callable[[Mapping[str, EmbeddedSplit]], bool], Callable[..., ProtocolResult]]] = {
    "lp": (lambda s: all(x.normalized is not None for x in s.values()), _run_lp),
    "cc": (lambda s: all(x.log_probs is not None for x in s.values()), _run_cc),
    "head": (lambda s: all(x.logits is not None for x in s.values()), _run_head),
}


def _ncmi_block(splits: Mapping[str, EmbeddedSplit], num_classes: int) -> tuple[dict[str, Any], str | None]:
    """Dataset-level CMI / Γ / NCMI per split, on the simplex (NCMI runs) or softmax(logits)."""
    first = next(iter(splits.values()))
    if first.log_probs is not None:
        source, get = "ncmi_simplex", lambda s: s.probs()
    elif first.logits is not None:
        source, get = "softmax_logits", lambda s: _softmax(s.logits.astype(np.float64))
    else:
        return {}, None
    block = {}
    for name, s in splits.items():
        with warnings.catch_warnings():
            if len(np.unique(s.labels)) < 2:  # Γ = 0 by definition: ncmi is written as null, no warning
                warnings.simplefilter("ignore", RuntimeWarning)
            block[name] = ncmi_metric(np.asarray(get(s), dtype=np.float64), s.labels, num_classes=num_classes)
    return block, source


def _prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{name}" for name in class_names]


def evaluate_run(
    splits: Mapping[str, EmbeddedSplit],
    num_classes: int,
    *,
    dataset: str,
    split_csv: str,
    model: str,
    objective: str,
    seed: int = 0,
    train_seed: int | None = None,
    class_names: Sequence[str] | None = None,
    class_weight: str | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    refit: str = "train",
    solver: str = "lbfgs",
    lp_input: str = "auto",
    protocols: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    fitted: dict[str, dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run every applicable protocol on embedded ``splits`` (must hold train, val and test).

    ``lp_input``: the linear probe's input, one of :data:`LP_INPUT_CHOICES` (module docstring). ``seed`` seeds the linear probe; ``train_seed`` is the seed the checkpoint was trained with (reported as
    ``"seed"`` when given). ``protocols`` restricts the protocols (default: all that apply). Returns the report dict (module
    docstring) and the predictions table (``protocol, split, slide_id, label, prediction, prob_<class>...``).
    ``fitted``, when given, receives each protocol's fitted arrays (``lp``: coef, intercept, classes; ``cc``: means).
    """
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ReportError(f"evaluate_run: splits {missing} are missing (got {list(splits)})")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ReportError(f"evaluate_run: {len(names)} class names for {num_classes} classes")
    wanted = list(PROTOCOLS) if protocols is None else list(protocols)
    unknown = [p for p in wanted if p not in PROTOCOLS]
    if unknown:
        raise ReportError(f"evaluate_run: unknown protocols {unknown}; known: {list(PROTOCOLS)}")
    clash = sorted(set(extra or {}) & RESERVED_KEYS)
    if clash:
        raise ReportError(f"evaluate_run: extra keys {clash} would overwrite report fields")
    ordered = {s: splits[s] for s in SPLITS}
    if lp_input not in LP_INPUT_CHOICES:
        raise ReportError(f"evaluate_run: lp_input={lp_input!r} not in {list(LP_INPUT_CHOICES)}")
    ctx = _Context(num_classes, int(seed), class_weight, Cs, refit, solver, lp_input)

    metrics: dict[str, dict[str, Any]] = {}
    info: dict[str, Any] = {}
    frames = []
    for proto in wanted:
        applies, run = PROTOCOLS[proto]
        if not applies(ordered):
            logger.info("protocol %s does not apply to this run; skipped", proto)
            continue
        result = run(ordered, ctx)
        info[proto] = result.info
        if fitted is not None and result.state:
            fitted[proto] = result.state
        metrics[proto] = {}
        for split, s in ordered.items():
            proba = result.proba[split]  # [N, C]
            metrics[proto][split] = classification_metrics(s.labels, proba, num_classes)
            frame = pd.DataFrame(
                {
                    "protocol": proto,
                    "split": split,
                    "slide_id": s.slide_ids,
                    "label": s.labels,
                    "prediction": proba.argmax(axis=1),
                }
            )
            frames.append(pd.concat([frame, pd.DataFrame(proba, columns=_prob_columns(names))], axis=1))
    if not metrics:
        raise ReportError("evaluate_run: no protocol applies (no normalized embeddings, log-probs or logits)")
    ncmi, source = _ncmi_block(ordered, num_classes)
    report: dict[str, Any] = {
        "dataset": str(dataset),
        "split_csv": str(split_csv),
        "model": str(model),
        "objective": str(objective),
        "seed": int(seed if train_seed is None else train_seed),
        "seed_source": "probe" if train_seed is None else "training",
        "probe_seed": int(seed),
        "n_slides": {s: len(ordered[s]) for s in SPLITS},
        "metrics": metrics,
        "ncmi": ncmi,
        "ncmi_source": source,
        "num_classes": int(num_classes),
        "class_names": names,
        "protocol_info": info,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    report.update(extra or {})
    report = json_safe(report)
    validate_report(report)
    return report, pd.concat(frames, ignore_index=True)
