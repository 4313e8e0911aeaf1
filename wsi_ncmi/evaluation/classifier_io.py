"""The classifiers `wsi-ncmi evaluate` fitted, saved as plain arrays, and applied again by `wsi-ncmi predict`.

``classifier.npz`` (numpy arrays only, read with ``allow_pickle=False``) next to ``report.json``:

* ``lp_coef`` [K, E], ``lp_intercept`` [K], ``lp_classes`` [K] — the linear probe's decision function
  ``x @ coef.T + intercept`` for the K classes it saw in training (two-class probes are stored as K = 2 with
  a zero first row, so the softmax equals scikit-learn's sigmoid); other classes get probability 0;
* ``lp_center`` [E] — the centre of the LP input "normalized" (the NCMI loss's EMA centre, or the training
  mean embedding for runs without NCMI);
* ``cc_means`` [C, E] — the CC protocol's class means of the training simplex points (NCMI runs).

``classifier.json``: ``primary`` (the protocol the report's headline uses: ``lp`` for NCMI runs, ``head`` for
runs with a head), ``lp_input`` (``normalized`` | ``raw``), ``class_names``, ``embed_dim``, ``temperatures``
(per classifier, :mod:`.calibration`), ``calibration_method``, ``checkpoint_sha256``.

Classifiers (:data:`CLASSIFIERS`): ``lp``, ``cc`` (from the arrays), ``xi`` (softmax(−KL(p ‖ ξ)), the NCMI
run's learned centroids) and ``head`` (the aggregator's head), all as raw probabilities [N, C]
(:meth:`SavedClassifier.proba`); the temperature is applied by :func:`.calibration.apply_temperature`.

Finding the folder: ``evaluate`` records ``{checkpoint sha256: folders}`` in ``<run>/evaluations.json`` (the
checkpoint's run folder); :func:`find_evaluation` reads it (or takes ``--eval DIR``). Every file is untrusted:
a bad shape, dtype or value is one :class:`ClassifierError` line naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text
from wsi_ncmi.errors import UserError

from .embed import EmbeddedSplit, center_and_normalize

__all__ = ["CLASSIFIERS", "CLASSIFIER_JSON", "CLASSIFIER_NPZ", "EVALUATIONS_JSON", "ClassifierError",
           "EvaluationFolder", "SavedClassifier", "classify", "find_evaluation", "load_evaluation", "model_proba",
           "primary_protocol",
           "record_evaluation"]

logger = logging.getLogger(__name__)

CLASSIFIER_NPZ, CLASSIFIER_JSON, EVALUATIONS_JSON = "classifier.npz", "classifier.json", "evaluations.json"
CLASSIFIERS = ("lp", "cc", "xi", "head")
LP_KINDS = ("normalized", "raw")
ARRAYS = ("lp_coef", "lp_intercept", "lp_classes", "lp_center", "cc_means")
FORMAT = 1


class ClassifierError(UserError):
    """A saved classifier cannot be used (bad file, wrong shape, unknown classifier); names the file."""


def primary_protocol(objective: str) -> str:
    """The report's headline protocol: ``lp`` for NCMI runs, ``head`` for runs trained with a head."""
    return "lp" if objective == "ncmi" else "head"


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class SavedClassifier:
    """The arrays and settings of ``classifier.npz`` / ``classifier.json`` (module docstring)."""

    primary: str
    class_names: list[str]
    embed_dim: int
    lp_input: str | None = None
    temperatures: dict[str, float] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    calibration_method: str = "temperature"
    checkpoint_sha256: str = ""
    source: str = ""

    # ---------------------------------------------------------------------------------------- build
    @classmethod
    def from_fit(cls, fitted: Mapping[str, Mapping[str, np.ndarray]], objective: str, class_names: Sequence[str],
                 embed_dim: int, lp_center: np.ndarray | None, lp_input: str | None,
                 temperatures: Mapping[str, float], checkpoint_sha256: str = "") -> SavedClassifier:
        """From ``evaluate_run``'s fitted arrays (``{"lp": {coef, intercept, classes}, "cc": {means}}``)."""
        arrays: dict[str, np.ndarray] = {}
        if "lp" in fitted:
            coef = np.asarray(fitted["lp"]["coef"], dtype=np.float64)  # [1 or K, E]
            intercept = np.asarray(fitted["lp"]["intercept"], dtype=np.float64)  # [1 or K]
            classes = np.asarray(fitted["lp"]["classes"], dtype=np.int64)  # [K]
            if coef.shape[0] == 1 and classes.size == 2:  # sklearn's binary form: logit of classes[1] vs classes[0]
                coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
            arrays.update(lp_coef=coef, lp_intercept=intercept, lp_classes=classes)
            if lp_center is not None:
                arrays["lp_center"] = np.asarray(lp_center, dtype=np.float64)
        if "cc" in fitted:
            arrays["cc_means"] = np.asarray(fitted["cc"]["means"], dtype=np.float64)
        return cls(primary_protocol(objective), [str(c) for c in class_names], int(embed_dim), lp_input,
                   {k: float(v) for k, v in temperatures.items()}, arrays, checkpoint_sha256=checkpoint_sha256)

    # ------------------------------------------------------------------------------------- files
    def write(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        out = Path(folder)
        npz, js = out / CLASSIFIER_NPZ, out / CLASSIFIER_JSON
        with atomic_output(npz) as tmp, open(tmp, "wb") as fh:  # a file object: numpy would append ".npz"
            np.savez(fh, **self.arrays)
        doc = {"format": FORMAT, "primary": self.primary, "class_names": self.class_names,
               "embed_dim": self.embed_dim, "lp_input": self.lp_input, "temperatures": self.temperatures,
               "calibration_method": self.calibration_method, "checkpoint_sha256": self.checkpoint_sha256,
               "arrays": {k: list(v.shape) for k, v in self.arrays.items()},
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(js, json.dumps(doc, indent=2, allow_nan=False) + "\n")
        return npz, js

    @classmethod
    def read(cls, folder: str | os.PathLike) -> SavedClassifier:
        """Load and check ``classifier.json`` + ``classifier.npz`` of ``folder`` (no pickles)."""
        folder = Path(folder)
        js, npz = folder / CLASSIFIER_JSON, folder / CLASSIFIER_NPZ
        try:
            doc = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClassifierError(f"{js}: cannot read the classifier settings: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ClassifierError(f"{js}: not a classifier file of format {FORMAT}")
        primary, names, temps = doc.get("primary"), doc.get("class_names"), doc.get("temperatures")
        if primary not in CLASSIFIERS:
            raise ClassifierError(f"{js}: primary {primary!r} is not one of {list(CLASSIFIERS)}")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ClassifierError(f"{js}: class_names must be a non-empty list of strings")
        if not isinstance(temps, dict) or any(k not in CLASSIFIERS or isinstance(v, bool) or
                                              not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v))
                                              for k, v in temps.items()):
            raise ClassifierError(f"{js}: temperatures must map {list(CLASSIFIERS)} to positive numbers")
        if doc.get("lp_input") not in (*LP_KINDS, None):
            raise ClassifierError(f"{js}: lp_input {doc.get('lp_input')!r} is not one of {list(LP_KINDS)}")
        dim = doc.get("embed_dim")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ClassifierError(f"{js}: embed_dim must be a positive integer")
        arrays = _read_arrays(npz)
        saved = cls(primary, names, dim, doc.get("lp_input"), {k: float(v) for k, v in temps.items()}, arrays,
                    str(doc.get("calibration_method", "temperature")), str(doc.get("checkpoint_sha256", "")),
                    str(folder))
        saved.check(dim, len(names), where=str(npz))
        return saved

    def check(self, embed_dim: int, num_classes: int, class_names: Sequence[str] | None = None,
              where: str | None = None) -> None:
        """Raise :class:`ClassifierError` when the arrays do not fit a model with ``embed_dim`` / ``num_classes``."""
        src = where or str(Path(self.source) / CLASSIFIER_NPZ)
        e, c, a = int(embed_dim), int(num_classes), self.arrays
        if class_names is not None and list(class_names) != self.class_names:
            raise ClassifierError(f"{src}: class names {self.class_names} differ from the checkpoint's "
                                  f"{list(class_names)}: made from another run?")
        if len(self.class_names) != c:
            raise ClassifierError(f"{src}: {len(self.class_names)} class names for a {c}-class checkpoint")
        want = {"lp_coef": None, "lp_intercept": None, "lp_classes": None, "lp_center": (e,), "cc_means": (c, e)}
        if "lp_coef" in a:
            k = a["lp_coef"].shape[0] if a["lp_coef"].ndim == 2 else -1
            want.update(lp_coef=(k, e), lp_intercept=(k,), lp_classes=(k,))
            if k < 1 or any(n not in a for n in ("lp_intercept", "lp_classes")):
                raise ClassifierError(f"{src}: lp_coef must be [K, {e}] with lp_intercept [K] and lp_classes [K]")
        for name, shape in want.items():
            if name in a and shape is not None and a[name].shape != shape:
                raise ClassifierError(f"{src}: {name} has shape {list(a[name].shape)}, expected {list(shape)} "
                                      f"(embedding dim {e}, {c} classes)")
        if "lp_classes" in a:
            cl = a["lp_classes"]
            if cl.dtype.kind not in "iu" or cl.min() < 0 or cl.max() >= c or np.unique(cl).size != cl.size:
                raise ClassifierError(f"{src}: lp_classes must be distinct class indices in [0, {c - 1}]")

    # ------------------------------------------------------------------------------------ predict
    def available(self, ncmi: bool, head: bool) -> list[str]:
        """The classifiers this file (and a run with / without NCMI and a head) can apply."""
        have = {"lp": "lp_coef" in self.arrays, "cc": "cc_means" in self.arrays and ncmi, "xi": ncmi, "head": head}
        return [k for k in CLASSIFIERS if have[k]]

    def proba(self, which: str, emb: EmbeddedSplit, ncmi_loss: Any = None) -> np.ndarray:
        """Raw class probabilities [N, C] of classifier ``which`` on embedded slides ``emb``."""
        c = len(self.class_names)
        if which == "lp":
            if self.lp_input == "raw":
                x = np.asarray(emb.embeddings, dtype=np.float64)  # [N, E]
            elif emb.normalized is not None:  # NCMI runs: the loss's own centring, as evaluate embedded them
                x = np.asarray(emb.normalized, dtype=np.float64)
            else:
                x = center_and_normalize(emb.embeddings, self.arrays["lp_center"])
            logits = x @ self.arrays["lp_coef"].T + self.arrays["lp_intercept"]  # [N, K]
            out = np.zeros((x.shape[0], c), dtype=np.float64)
            out[:, self.arrays["lp_classes"]] = _softmax(logits)
            return out
        if which == "cc":
            from wsi_ncmi.ncmi import NearestCentroidClassifier

            clf = NearestCentroidClassifier(num_classes=c, allow_empty=True)
            clf.centroids_ = torch.as_tensor(self.arrays["cc_means"])  # [C, E], as fit_centroid_classifier
            return np.asarray(clf.predict_proba(emb.probs()), dtype=np.float64)
        if which in ("xi", "head"):
            return model_proba(which, emb, ncmi_loss)
        raise ClassifierError(f"unknown classifier {which!r}; choose from {list(CLASSIFIERS)}")

    def check_center(self, ncmi_loss: Any) -> None:
        """An NCMI run's LP centre must be the loss's centre (else the file was made from another checkpoint)."""
        if ncmi_loss is None or "lp_center" not in self.arrays or not getattr(ncmi_loss, "use_centering", True):
            return
        c = ncmi_loss.center.center.detach().cpu().double().numpy()
        if not np.allclose(c, self.arrays["lp_center"], rtol=1e-5, atol=1e-6):
            raise ClassifierError(f"{Path(self.source) / CLASSIFIER_NPZ}: lp_center is not the checkpoint's NCMI "
                                  "centre: the classifier was made from another checkpoint")


def model_proba(which: str, emb: EmbeddedSplit, ncmi_loss: Any = None) -> np.ndarray:
    """Raw probabilities [N, C] of the run's own classifiers: ``xi`` = softmax(−KL(p ‖ ξ)), ``head`` = softmax."""
    if which == "xi":
        from .ood import xi_kl

        return _softmax(-xi_kl(ncmi_loss, emb.log_probs))
    if which == "head":
        return _softmax(np.asarray(emb.logits, dtype=np.float64))
    raise ClassifierError(f"classifier {which!r} is not the run's own (xi, head)")


def classify(emb: EmbeddedSplit, saved: SavedClassifier | None, which: str | None = None,
             ncmi_loss: Any = None) -> tuple[np.ndarray, str, float]:
    """Calibrated probabilities [N, C] of classifier ``which`` (default: the saved report's primary; without a
    saved classifier: ``xi`` for NCMI runs, else ``head``, uncalibrated), the classifier's name and temperature."""
    from .calibration import apply_temperature

    ncmi, head = ncmi_loss is not None and emb.log_probs is not None, emb.logits is not None
    if saved is None:
        name = which or ("xi" if ncmi else "head")
        if name in ("lp", "cc"):
            raise ClassifierError(f"--classifier {name} needs the classifier saved by `wsi-ncmi evaluate` for this "
                                  "checkpoint: run evaluate first, or pass its folder with --eval DIR")
        available = [k for k, ok in (("xi", ncmi), ("head", head)) if ok]
        source = "this run (no evaluation folder)"
    else:
        name = which or saved.primary
        available = saved.available(ncmi, head)
        source = str(Path(saved.source) / CLASSIFIER_JSON)
    if name not in available:
        raise ClassifierError(f"--classifier {name}: not available for {source} (available: {available})")
    raw = saved.proba(name, emb, ncmi_loss) if saved is not None else model_proba(name, emb, ncmi_loss)
    t = saved.temperatures.get(name, 1.0) if saved is not None else 1.0
    return apply_temperature(raw, t), name, t


def _read_arrays(npz: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ClassifierError(f"{npz}: cannot read the classifier arrays: {str(exc).splitlines()[0]}") from None
    unknown = sorted(set(arrays) - set(ARRAYS))
    if unknown:
        raise ClassifierError(f"{npz}: unknown arrays {unknown} (known: {list(ARRAYS)})")
    for k, v in arrays.items():
        if v.dtype.kind not in "fiu":
            raise ClassifierError(f"{npz}: {k} has dtype {v.dtype}, expected numbers")
        if not np.isfinite(v).all():
            raise ClassifierError(f"{npz}: {k} contains NaN or inf")
    return arrays


# --------------------------------------------------------------------------------- finding the folder
@dataclass
class EvaluationFolder:
    """Where `wsi-ncmi evaluate` put a checkpoint's classifier and OOD calibration (None: not there)."""

    classifier_dir: Path | None
    calibration: Path | None


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def record_evaluation(ckpt: str | os.PathLike, sha256: str, eval_dir: str | os.PathLike,
                      classifier_dir: str | os.PathLike) -> Path | None:
    """Add ``{sha256: folders}`` to ``<run>/evaluations.json`` (atomic); None (and a warning) if it cannot."""
    path = _run_dir(Path(ckpt)) / EVALUATIONS_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        doc = doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        doc = {}
    doc[sha256] = {"checkpoint": str(Path(ckpt).resolve()), "eval_dir": str(Path(eval_dir).resolve()),
                   "classifier_dir": str(Path(classifier_dir).resolve()),
                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        logger.warning("cannot record the evaluation in %s (%s): pass --eval to predict", path, exc)
        return None


def _folder(eval_dir: Path) -> EvaluationFolder:
    from .ood import CALIBRATION_JSON

    cls_dir = eval_dir if (eval_dir / CLASSIFIER_JSON).is_file() else next(
        (p.parent for p in sorted(eval_dir.glob(f"seed*/{CLASSIFIER_JSON}"))), None)
    cal = eval_dir / CALIBRATION_JSON
    return EvaluationFolder(cls_dir, cal if cal.is_file() else None)


def find_evaluation(ckpt: str | os.PathLike, sha256: str, eval_dir: str | os.PathLike | None = None) -> EvaluationFolder:
    """The evaluation folder of ``ckpt``: ``eval_dir`` (``--eval``; must exist) or the one recorded in the run
    folder's ``evaluations.json`` for this checkpoint's ``sha256``; an empty :class:`EvaluationFolder` if none."""
    if eval_dir is not None:
        d = Path(eval_dir)
        if not d.is_dir():
            raise ClassifierError(f"--eval {d}: no such folder")
        return _folder(d)
    path = _run_dir(Path(ckpt)) / EVALUATIONS_JSON
    try:
        entry = json.loads(path.read_text(encoding="utf-8")).get(sha256) if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        logger.warning("%s: unreadable; ignored", path)
        entry = None
    if not isinstance(entry, dict) or not isinstance(entry.get("eval_dir"), str):
        return EvaluationFolder(None, None)
    found = _folder(Path(entry["eval_dir"])) if Path(entry["eval_dir"]).is_dir() else EvaluationFolder(None, None)
    cls_dir = entry.get("classifier_dir")
    if isinstance(cls_dir, str) and (Path(cls_dir) / CLASSIFIER_JSON).is_file():
        found.classifier_dir = Path(cls_dir)
    return found


def load_evaluation(ckpt: str | os.PathLike, sha256: str, embed_dim: int, num_classes: int,
                    class_names: Sequence[str] | None, ncmi_loss: Any = None, eval_dir: str | os.PathLike | None = None,
                    allow_mismatch: bool = False) -> tuple[SavedClassifier | None, EvaluationFolder]:
    """The checked :class:`SavedClassifier` of checkpoint ``ckpt`` (None, with a warning, when it was not evaluated)
    and its :class:`EvaluationFolder`. A classifier made from another checkpoint is refused unless
    ``allow_mismatch`` (then a warning)."""
    found = find_evaluation(ckpt, sha256, eval_dir)
    if found.classifier_dir is None:
        where = f"--eval {eval_dir}" if eval_dir else f"{_run_dir(Path(ckpt)) / EVALUATIONS_JSON}"
        logger.warning("no classifier.json for %s (%s): predicting with the run's own class scores, uncalibrated "
                       "(run `wsi-ncmi evaluate` on the checkpoint, or pass --eval DIR)", ckpt, where)
        return None, found
    saved = SavedClassifier.read(found.classifier_dir)
    if saved.checkpoint_sha256 and saved.checkpoint_sha256 != sha256:
        msg = f"{Path(saved.source) / CLASSIFIER_JSON} was made from another checkpoint, not {ckpt}"
        if not allow_mismatch:
            raise ClassifierError(msg + " (--allow-mismatch to use it anyway)")
        logger.warning("%s (--allow-mismatch)", msg)
    saved.check(embed_dim, num_classes, class_names)
    saved.check_center(ncmi_loss)
    return saved, found
