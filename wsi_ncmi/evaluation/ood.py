"""Out-of-distribution (OOD) scores of slides, their calibration on the validation split, and OOD metrics.

Every score is "higher = more out-of-distribution" and lives in the registry :data:`OOD_SCORERS`
(name -> :class:`OODScorer`). Each scorer reads one table of :class:`ScoreInputs`:

* ``ncmi_xi``    min_v KL(p ‖ q^v): distance of the slide's point p on the NCMI simplex to the nearest
  *learned* centroid q^v = NSF(ξ^v) (nearest of the K centroids of each class). NCMI runs.
* ``ncmi_means`` min_v KL(p ‖ s^v) with s^v the closed-form class means of p over the *training* split
  (NCMI.md §3, Eq. 6). NCMI runs; the means are stored in ``calibration.json`` so prediction needs no
  training bags.
* ``msp``        −max_c softmax(logits)_c (maximum softmax probability, Hendrycks & Gimpel).
* ``energy``     −logsumexp_c logits_c (energy score, Liu et al., temperature 1).
* ``radius``     ‖f − m‖₂ to the training mean embedding m (in the calibration): the length NCMI's NSF discards.
* ``input_z``    the bag's mean instance feature (the aggregator's *input*) as a root-mean-square z-score
  against the training bags' (per feature dimension; mean and std stored in the calibration): does the tissue
  look like the cohort's at all, whatever the model. The default of every run (:mod:`.ood_threshold`).

The logits are the head's for CE runs and −KL(p ‖ q^v) (the ξ class scores MILModule validates with) for
NCMI runs, so MSP and energy exist for both objectives and the comparison is like for like.

:func:`choose_default_score` ranks the two NCMI centroid sets as nearest-centroid classifiers on validation
(macro-F1 + macro-AUC; ties: the class means); :mod:`.ood_threshold` then makes ``input_z`` the default.

Calibration (:func:`calibrate`): per score, the ⌈0.95·n⌉-th smallest validation score (≥ 95 % kept); evaluate
replaces it by :mod:`.ood_threshold`'s rule. :class:`Calibration` is ``calibration.json`` (evaluate writes it,
predict reads it); a slide is flagged when its score > its threshold.

Metrics (:func:`ood_metrics`): AUROC of the score for "is OOD" (OOD = positive) and FPR@95TPR, the share
of OOD slides kept as in-distribution at the threshold calibrated on the in-distribution scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.errors import UserError
from wsi_ncmi.ncmi import NCMILoss
from wsi_ncmi.ncmi.centroids import class_centroids, kl_rows_to_centroids

__all__ = [
    "CALIBRATION_JSON",
    "Calibration",
    "OODError",
    "OODScorer",
    "OOD_SCORERS",
    "ScoreInputs",
    "calibrate",
    "choose_default_score",
    "compute_scores",
    "find_calibration",
    "ood_metrics",
    "ood_section",
    "register_scorer",
    "score_inputs",
    "sha256_of",
    "threshold_at_tpr",
    "xi_kl",
]

logger = logging.getLogger(__name__)

CALIBRATION_JSON = "calibration.json"
DEFAULT_TPR = 0.95
CE_DEFAULT = "msp"
NCMI_SCORES = ("ncmi_xi", "ncmi_means")


class OODError(UserError):
    """OOD scores cannot be computed / calibrated, or a calibration file is invalid (names the file)."""


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class ScoreInputs:
    """Per-slide tables the scorers read (rows = slides, columns = classes); None where not applicable."""

    logits: np.ndarray | None = None  # [N, C] head logits (CE) or −KL(p ‖ q^v) (NCMI)
    kl_xi: np.ndarray | None = None  # [N, C] KL(p ‖ nearest learned centroid of class v)
    kl_means: np.ndarray | None = None  # [N, C] KL(p ‖ training class mean s^v)
    radius: np.ndarray | None = None  # [N, 1] ‖f − m‖ to the training mean embedding m
    input_z: np.ndarray | None = None  # [N, 1] RMS z-score of the bag's mean input feature vs the training bags

    def __len__(self) -> int:
        for t in (self.logits, self.kl_xi, self.kl_means):
            if t is not None:
                return int(t.shape[0])
        return 0


@torch.no_grad()
def xi_kl(ncmi_loss: NCMILoss, log_probs: np.ndarray | torch.Tensor) -> np.ndarray:
    """KL(p ‖ q^v) [N, C] to the nearest of the K learned centroids of each class; ``log_probs`` = ln p [N, D]."""
    log_p = torch.as_tensor(np.asarray(log_probs), dtype=torch.float64)  # [N, D]
    return ncmi_loss.centroid_kl(log_p).numpy()  # [N, C]


def _means_kl(log_probs: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    p = torch.as_tensor(np.exp(np.asarray(log_probs, dtype=np.float64)))  # [N, D]
    return kl_rows_to_centroids(p, torch.as_tensor(np.asarray(class_means, dtype=np.float64))).numpy()  # [N, C]


def training_class_means(log_probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Closed-form class means s^v of p over a (training) split -> [C, D] float64 (Eq. 6)."""
    p = torch.as_tensor(np.exp(np.asarray(log_probs, dtype=np.float64)))
    return class_centroids(p, torch.as_tensor(np.asarray(labels, dtype=np.int64)), num_classes).numpy()


def score_inputs(
    logits: np.ndarray | None = None,
    log_probs: np.ndarray | None = None,
    ncmi_loss: NCMILoss | None = None,
    class_means: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    train_mean: np.ndarray | None = None,
    input_means: np.ndarray | None = None,
    input_stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> ScoreInputs:
    """Build :class:`ScoreInputs` from a split's head ``logits`` [N, C] (CE runs) or NCMI ``log_probs``
    [N, D] (with the run's ``ncmi_loss`` for ξ and, optionally, training ``class_means`` [C, D]); with the slide
    ``embeddings`` [N, E] and the ``train_mean`` [E], also the radius; with the bags' ``input_means`` [N, D] and
    the training bags' (mean [D], std [D]) ``input_stats``, also ``input_z``."""
    z = None
    if input_means is not None and input_stats is not None:
        dev = (np.asarray(input_means, dtype=np.float64) - input_stats[0]) / np.maximum(input_stats[1], 1e-6)
        z = np.sqrt((dev**2).mean(axis=1, keepdims=True))  # [N, 1]
    radius = None
    if embeddings is not None and train_mean is not None:
        diff = np.asarray(embeddings, dtype=np.float64) - np.asarray(train_mean, dtype=np.float64)[None, :]
        radius = np.linalg.norm(diff, axis=1, keepdims=True)  # [N, 1]
    if log_probs is not None and ncmi_loss is not None:
        kl = xi_kl(ncmi_loss, log_probs)
        means = None if class_means is None else _means_kl(log_probs, class_means)
        return ScoreInputs(logits=-kl, kl_xi=kl, kl_means=means, radius=radius, input_z=z)
    if logits is None:
        raise OODError("score_inputs: need head logits (CE run) or NCMI log-probs with the run's NCMI loss")
    return ScoreInputs(logits=np.asarray(logits, dtype=np.float64), radius=radius, input_z=z)


# ----------------------------------------------------------------------------------------- scorers
@dataclass(frozen=True)
class OODScorer:
    """One OOD score: ``fn(table [N, C]) -> [N]`` (higher = more OOD) on the ScoreInputs field ``needs``."""

    name: str
    needs: str
    fn: Callable[[np.ndarray], np.ndarray]
    description: str


OOD_SCORERS: dict[str, OODScorer] = {}


def register_scorer(name: str, needs: str, description: str) -> Callable[[Callable], Callable]:
    """Decorator adding ``fn`` to :data:`OOD_SCORERS` under ``name``."""
    if needs not in ScoreInputs.__dataclass_fields__:
        raise OODError(f"register_scorer: needs must be a ScoreInputs field, got {needs!r}")

    def deco(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        OOD_SCORERS[name] = OODScorer(name, needs, fn, description)
        return fn

    return deco


@register_scorer("ncmi_xi", "kl_xi", "min over classes of KL(p ‖ learned centroid ξ)")
def _min_kl_xi(kl: np.ndarray) -> np.ndarray:
    return kl.min(axis=1)


@register_scorer("ncmi_means", "kl_means", "min over classes of KL(p ‖ training class mean of p)")
def _min_kl_means(kl: np.ndarray) -> np.ndarray:
    return kl.min(axis=1)


@register_scorer("msp", "logits", "−max softmax probability")
def _msp(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return -(1.0 / np.exp(z).sum(axis=1))  # max softmax = exp(0) / Σ exp(z)


@register_scorer("energy", "logits", "−logsumexp(logits) (energy, T = 1)")
def _energy(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=1)
    return -(m + np.log(np.exp(logits - m[:, None]).sum(axis=1)))


@register_scorer("radius", "radius", "‖f − training mean embedding‖₂ (the radial part NCMI's simplex discards)")
def _radius(table: np.ndarray) -> np.ndarray:
    return table[:, 0]


@register_scorer("input_z", "input_z", "RMS z-score of the bag's mean input feature against the training bags")
def _input_z(table: np.ndarray) -> np.ndarray:
    return table[:, 0]


def available_scores(inputs: ScoreInputs) -> list[str]:
    """Registered scores whose input table is present, in registry order."""
    return [n for n, s in OOD_SCORERS.items() if getattr(inputs, s.needs) is not None]


def compute_scores(inputs: ScoreInputs, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{name: scores [N] float64}`` for ``names`` (default: every available score)."""
    names = list(names) if names is not None else available_scores(inputs)
    out = {}
    for name in names:
        if name not in OOD_SCORERS:
            raise OODError(f"unknown OOD score {name!r}; registered: {sorted(OOD_SCORERS)}")
        sc = OOD_SCORERS[name]
        table = getattr(inputs, sc.needs)
        if table is None:
            raise OODError(f"OOD score {name!r} needs {sc.needs}, which this run does not have "
                           f"(available: {available_scores(inputs)})")
        out[name] = np.asarray(sc.fn(np.asarray(table, dtype=np.float64)), dtype=np.float64)
    return out


# ------------------------------------------------------------------------------------- calibration
def threshold_at_tpr(id_scores: np.ndarray, tpr: float = DEFAULT_TPR) -> float:
    """The ⌈tpr·n⌉-th smallest in-distribution score: at least ``tpr`` of them are ≤ it (kept)."""
    s = np.sort(np.asarray(id_scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.isfinite(s).all():
        raise OODError(f"threshold_at_tpr: need finite in-distribution scores, got {s.size} value(s)")
    if not 0 < tpr <= 1:
        raise OODError(f"threshold_at_tpr: tpr must be in (0, 1], got {tpr}")
    k = max(1, math.ceil(tpr * s.size - 1e-9)) - 1
    return float(s[k])


def ood_metrics(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = DEFAULT_TPR) -> dict[str, Any]:
    """AUROC (OOD = positive, higher score = more OOD) and FPR at ``tpr`` (share of OOD slides whose score is
    ≤ the threshold that keeps ``tpr`` of the in-distribution slides)."""
    from sklearn.metrics import roc_auc_score

    a = np.asarray(id_scores, dtype=np.float64).ravel()
    b = np.asarray(ood_scores, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise OODError(f"ood_metrics: need in-distribution and OOD scores, got {a.size} and {b.size}")
    y = np.r_[np.zeros(a.size), np.ones(b.size)]
    thr = threshold_at_tpr(a, tpr)
    return {"auroc": float(roc_auc_score(y, np.r_[a, b])), f"fpr_at_{round(tpr * 100)}tpr": float((b <= thr).mean()),
            "threshold": thr, "n_id": int(a.size), "n_ood": int(b.size)}


def choose_default_score(inputs: ScoreInputs, labels: np.ndarray) -> tuple[str, dict[str, float]]:
    """The default score of a run and why: NCMI runs compare ξ with the class means as nearest-centroid
    classifiers on validation (macro-F1 + macro-AUC); CE runs use :data:`CE_DEFAULT`."""
    from wsi_ncmi.metrics import classification_metrics

    cands = {n: getattr(inputs, OOD_SCORERS[n].needs) for n in NCMI_SCORES}
    cands = {n: t for n, t in cands.items() if t is not None}
    if not cands:
        return CE_DEFAULT, {}
    if len(cands) == 1:
        return next(iter(cands)), {}
    y = np.asarray(labels, dtype=np.int64)
    why: dict[str, float] = {}
    for name, kl in cands.items():
        z = -kl - (-kl).max(axis=1, keepdims=True)
        proba = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        m = classification_metrics(y, proba, kl.shape[1])
        auc = m["macro_auc"] if m["macro_auc"] is not None and np.isfinite(m["macro_auc"]) else 0.0
        why[name] = float(m["macro_f1"] + auc)
    best = max(why.values())
    return ("ncmi_means" if why.get("ncmi_means") == best else "ncmi_xi"), why


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Calibration:
    """Thresholds of every score at ``tpr`` on the validation split, and what the scores need (module doc)."""

    thresholds: dict[str, float]
    default_score: str
    tpr: float = DEFAULT_TPR
    n_val: int = 0
    val_kept: dict[str, float] = field(default_factory=dict)  # share of validation slides ≤ threshold
    val_quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    choice: dict[str, float] = field(default_factory=dict)  # val macro-F1 + AUC per NCMI centroid set
    class_means: list[list[float]] | None = None  # [C, D] training class means of p (NCMI runs)
    train_mean: list[float] | None = None  # [E] training mean slide embedding (the radius score)
    input_mean: list[float] | None = None  # [D] training bags' mean input feature, and its std (input_z)
    input_std: list[float] | None = None
    class_names: list[str] = field(default_factory=list)
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    created: str = ""
    rule: str = "val_tpr"  # "conformal": thresholds of evaluation.ood_threshold.apply_rule
    target_false_alarm: float | None = None
    false_alarm_bound: dict[str, float] = field(default_factory=dict)
    n_reference: dict[str, int] = field(default_factory=dict)

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(asdict(self), indent=2, allow_nan=False) + "\n")

    @classmethod
    def read(cls, path: str | os.PathLike) -> Calibration:
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OODError(f"{p}: cannot read the calibration file: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("thresholds"), dict):
            raise OODError(f"{p}: not a calibration file (no 'thresholds' object)")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise OODError(f"{p}: unknown keys {unknown}")
        bad = sorted(k for k in data["thresholds"] if k not in OOD_SCORERS)
        if bad or data.get("default_score") not in data["thresholds"]:
            raise OODError(f"{p}: unknown score(s) {bad} or default_score {data.get('default_score')!r} "
                           f"without a threshold (registered: {sorted(OOD_SCORERS)})")
        return cls(**data)

    def class_means_array(self) -> np.ndarray | None:
        return None if self.class_means is None else np.asarray(self.class_means, dtype=np.float64)

    def train_mean_array(self) -> np.ndarray | None:
        return None if self.train_mean is None else np.asarray(self.train_mean, dtype=np.float64)

    def input_stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.input_mean is None else (np.asarray(self.input_mean), np.asarray(self.input_std))


def calibrate(
    val_inputs: ScoreInputs,
    val_labels: np.ndarray,
    tpr: float = DEFAULT_TPR,
    class_means: np.ndarray | None = None,
    class_names: Sequence[str] = (),
    checkpoint: str | os.PathLike | None = None,
) -> Calibration:
    """Thresholds at ``tpr`` of every available score over the validation slides (module docstring)."""
    scores = compute_scores(val_inputs)
    if not scores:
        raise OODError("calibrate: no OOD score is available for this run")
    thresholds, kept, quant = {}, {}, {}
    for name, s in scores.items():
        thresholds[name] = threshold_at_tpr(s, tpr)
        kept[name] = float((s <= thresholds[name]).mean())
        quant[name] = {f"q{q}": float(np.quantile(s, q / 100)) for q in (5, 50, 95)}
    default, why = choose_default_score(val_inputs, val_labels)
    ckpt = Path(checkpoint) if checkpoint else None
    return Calibration(
        thresholds=thresholds, default_score=default, tpr=float(tpr), n_val=len(val_inputs), val_kept=kept,
        val_quantiles=quant, choice=why,
        class_means=None if class_means is None else np.asarray(class_means, dtype=np.float64).tolist(),
        class_names=[str(c) for c in class_names],
        checkpoint=str(ckpt.resolve()) if ckpt else "",
        checkpoint_sha256=sha256_of(ckpt) if ckpt and ckpt.is_file() else "",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def find_calibration(ckpt: str | os.PathLike, search: Sequence[str | os.PathLike] = ()) -> Path | None:
    """The newest ``calibration.json`` made from ``ckpt`` (same SHA-256) in ``search`` folders and under the
    checkpoint's run folder (``<run>/checkpoints/x.ckpt`` -> ``<run>/``, searched recursively); None if none."""
    ckpt = Path(ckpt)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    roots = [Path(s) for s in search] + [run_dir]
    found: list[Path] = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob(CALIBRATION_JSON) if p.is_file()]
    if not found:
        return None
    digest = sha256_of(ckpt)
    ok = []
    for p in set(found):
        try:
            if json.loads(p.read_text(encoding="utf-8")).get("checkpoint_sha256") == digest:
                ok.append(p)
        except (OSError, ValueError):
            continue
    return max(ok, key=lambda p: p.stat().st_mtime) if ok else None


# ------------------------------------------------------------------------------------- report block
def ood_section(
    id_inputs: ScoreInputs, ood_inputs: ScoreInputs, ood_source: str, default_score: str | None = None,
    id_split: str = "test", tpr: float = DEFAULT_TPR,
) -> dict[str, Any]:
    """The ``ood`` block of ``report.json``: AUROC and FPR@95TPR of every available score, ID = ``id_split``."""
    id_scores, ood_scores = compute_scores(id_inputs), compute_scores(ood_inputs)
    per = {}
    for name in id_scores:
        m = ood_metrics(id_scores[name], ood_scores[name], tpr)
        per[name] = {k: v for k, v in m.items() if k not in ("n_id", "n_ood")}
    return {"id_split": id_split, "ood_bags": str(ood_source), "n_id": len(id_inputs), "n_ood": len(ood_inputs),
            "tpr": tpr, "default_score": default_score, "scores": per}


def evaluate_ood(
    splits: Mapping[str, Any],
    ncmi_loss: NCMILoss | None,
    num_classes: int,
    class_names: Sequence[str] = (),
    checkpoint: str | os.PathLike | None = None,
    ood: Any = None,
    ood_source: str = "",
    tpr: float = DEFAULT_TPR,
) -> tuple[Calibration, dict[str, Any] | None]:
    """``wsi-ncmi evaluate``'s OOD part on embedded splits (``EmbeddedSplit`` per name; train / val / test):
    the calibration on ``val`` (class means of p from ``train`` for NCMI runs) and, when ``ood`` (an embedded
    set of OOD bags) is given, the ``ood`` report block against ``test``."""
    for name in ("train", "val", "test") if ood is not None else ("train", "val"):
        if name not in splits:
            raise OODError(f"evaluate_ood: split {name!r} is missing (have {sorted(splits)})")
    means = None
    if ncmi_loss is not None:
        tr = splits["train"]
        means = training_class_means(tr.log_probs, tr.labels, num_classes)  # [C, D]
    center = splits["train"].embeddings.astype(np.float64).mean(axis=0)  # [E]
    tin = splits["train"].input_means
    stats = None if tin is None else (tin.astype(np.float64).mean(axis=0), tin.astype(np.float64).std(axis=0))

    def inputs(s: Any) -> ScoreInputs:
        return score_inputs(logits=s.logits, log_probs=s.log_probs, ncmi_loss=ncmi_loss, class_means=means,
                            embeddings=s.embeddings, train_mean=center, input_means=s.input_means, input_stats=stats)

    cal = calibrate(inputs(splits["val"]), splits["val"].labels, tpr, class_means=means, class_names=class_names,
                    checkpoint=checkpoint)
    cal.train_mean = center.tolist()
    if stats is not None:
        cal.input_mean, cal.input_std = stats[0].tolist(), stats[1].tolist()
    logger.info("OOD calibration on %d validation slides: default %s, thresholds %s", cal.n_val, cal.default_score,
                {k: round(v, 4) for k, v in cal.thresholds.items()})
    block = None
    if ood is not None:
        block = ood_section(inputs(splits["test"]), inputs(ood), ood_source, cal.default_score, "test", tpr)
    return cal, block
