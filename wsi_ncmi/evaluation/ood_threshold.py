"""The OOD flag's threshold: a conformal quantile of in-distribution reference scores at a stated false-alarm rate.

The rule of :func:`wsi_ncmi.evaluation.ood.calibrate` (keep ≥ 95 % of the validation slides) is, with the ~10
validation slides of a small cohort, the *maximum* validation score: a handful of slides decides it, and a
slide has to be further out than every one of them to be flagged. Here:

* **reference scores** (:func:`reference_scores`): the validation slides (never used to fit anything) plus,
  where a score can be computed *out of fold* for the training slides (:data:`OOF_SCORES`), those too:
  ``input_z`` against the mean / std of the other training bags (:func:`loo_input_z`; the encoder was not
  trained on them, so they are fair references) and ``radius`` against the mean embedding of the others
  (:func:`loo_radius`; conservative: training slides' embeddings come out longer). Not ``ncmi_means``:
  leave-one-out class means of p are exact, but the aggregator itself was trained on those
  slides and pulls them towards their class, so they still score lower than new slides (bench/ood.py measured
  24-32 % of in-distribution test slides flagged at a 10 % target with them). ξ and the head's MSP / energy
  were fitted on the training slides too: validation slides only;
* **threshold** (:func:`conformal_threshold`, split conformal): with n reference scores and a target false-alarm
  rate α (:data:`DEFAULT_FALSE_ALARM`), t = the ⌈(n + 1)(1 − α)⌉-th smallest reference score. For a new
  in-distribution slide exchangeable with the references, P(score > t) ≤ α, and ≥ 1 − α − 1/(n + 1) on
  average. When n is too small for α (k > n) the largest reference score is used and the achievable rate,
  1/(n + 1), is recorded instead. The default α is 0.1: with the ~30 reference slides of a small cohort
  (validation + training), α = 0.05 gives back the maximum;
* **default score**: ``input_z`` for every run (:data:`DEFAULT_SCORE`): "does this tissue look like the
  cohort's", independent of what the model learnt; on the demo it separated the IHC-only slides with a wide
  margin where the model scores (radius, KL distances, MSP) ranked them well but not above every ordinary slide.

:func:`apply_rule` replaces a :class:`~.ood.Calibration`'s thresholds by the rule's; :func:`ood_rule_block` is
the report's ``ood`` fields (``score``, ``threshold``, ``rule``, ``target_false_alarm``, ``flagged_test``, …) and
:func:`ood_report_markdown` the ``report.md`` section (with the ``--ood-bags`` AUROC table when there is one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from wsi_ncmi.data.markdown import markdown_table

from .ood import DEFAULT_TPR, OOD_SCORERS, Calibration, OODError, ScoreInputs, compute_scores, score_inputs

__all__ = ["DEFAULT_FALSE_ALARM", "DEFAULT_SCORE", "OOF_SCORES", "RULE", "apply_rule", "conformal_threshold",
           "evaluate_rule", "loo_input_z", "loo_radius", "ood_markdown", "ood_report_markdown", "ood_rule_block",
           "reference_scores"]

logger = logging.getLogger(__name__)

DEFAULT_FALSE_ALARM = 0.1
RULE = "conformal"


def conformal_threshold(reference: Any, alpha: float = DEFAULT_FALSE_ALARM) -> tuple[float, float]:
    """(threshold, false-alarm rate it guarantees): the ⌈(n + 1)(1 − α)⌉-th smallest of the n reference scores;
    when that rank is above n, the largest score and 1/(n + 1)."""
    s = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    if s.size == 0 or not np.isfinite(s).all():
        raise OODError(f"conformal_threshold: need finite reference scores, got {s.size} value(s)")
    if not 0 < alpha < 1:
        raise OODError(f"conformal_threshold: the false-alarm rate must be in (0, 1), got {alpha}")
    k = math.ceil((s.size + 1) * (1 - alpha) - 1e-9)
    if k > s.size:
        return float(s[-1]), 1.0 / (s.size + 1)
    return float(s[k - 1]), float(alpha)


def loo_radius(embeddings: np.ndarray) -> np.ndarray:
    """‖f_i − m_{−i}‖ [N]: each training slide's distance to the mean of the *other* training slides
    (= n / (n − 1) · ‖f_i − m‖)."""
    f = np.asarray(embeddings, dtype=np.float64)
    n = f.shape[0]
    return np.linalg.norm(f - f.mean(axis=0), axis=1) * n / (n - 1)


def loo_input_z(input_means: np.ndarray) -> np.ndarray:
    """``input_z`` [N] of each training bag against the mean and std of the *other* training bags (exact)."""
    x = np.asarray(input_means, dtype=np.float64)  # [N, D]
    n = x.shape[0]
    mean = (x.sum(axis=0) - x) / (n - 1)  # [N, D] leave-one-out
    var = ((x**2).sum(axis=0) - x**2) / (n - 1) - mean**2
    return np.sqrt((((x - mean) / np.maximum(np.sqrt(np.maximum(var, 0.0)), 1e-6)) ** 2).mean(axis=1))


# score name -> out-of-fold scores [N] of the training split (train EmbeddedSplit, num_classes)
OOF_SCORES: dict[str, Callable[[Any, int], np.ndarray]] = {
    "radius": lambda train, c: loo_radius(train.embeddings),
    "input_z": lambda train, c: loo_input_z(train.input_means),
}
# the default score of every run: the input shift flagged the demo's IHC-only slides with a 2.6x margin, whatever
# the model; the model scores (radius, KL distances, MSP) missed some (bench/results/ood.md)
DEFAULT_SCORE = "input_z"


def reference_scores(val_inputs: ScoreInputs, train: Any = None, num_classes: int | None = None,
                     use_train: bool = True) -> dict[str, np.ndarray]:
    """``{score: in-distribution reference scores}``: validation, plus the out-of-fold training scores."""
    ref = compute_scores(val_inputs)
    if use_train and train is not None and num_classes is not None:
        for name, fn in OOF_SCORES.items():
            needs = {"radius": "embeddings", "input_z": "input_means"}[name]
            if name in ref and getattr(train, needs, None) is not None and len(train) > 2:
                ref[name] = np.r_[ref[name], fn(train, num_classes)]
    return ref


def apply_rule(cal: Calibration, reference: Mapping[str, np.ndarray],
               alpha: float = DEFAULT_FALSE_ALARM) -> Calibration:
    """``cal`` with every threshold replaced by :func:`conformal_threshold` over ``reference`` (in place)."""
    rates = {}
    for name, ref in reference.items():
        cal.thresholds[name], rates[name] = conformal_threshold(ref, alpha)
        cal.val_kept[name] = float((np.asarray(ref) <= cal.thresholds[name]).mean())
    cal.rule = RULE
    cal.target_false_alarm = float(alpha)
    cal.false_alarm_bound = rates
    cal.n_reference = {k: int(np.asarray(v).size) for k, v in reference.items()}
    logger.info("OOD thresholds (%s, false alarms ≤ %.3g): %s", RULE, alpha,
                {k: round(v, 6) for k, v in cal.thresholds.items()})
    return cal


def ood_rule_block(cal: Calibration, test_ids: Sequence[str], test_scores: Mapping[str, np.ndarray],
                   ood_ids: Sequence[str] = (), ood_scores: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The report's ``ood`` fields of the default score under the calibration's rule (flagged slides, shares)."""
    name, t = cal.default_score, float(cal.thresholds[cal.default_score])
    flag = np.asarray(test_scores[name]) > t
    block: dict[str, Any] = {
        "score": name, "threshold": t, "rule": f"{cal.rule}: the ⌈(n+1)(1−α)⌉-th smallest of n in-distribution "
        "reference scores (validation + out-of-fold training slides where the score allows)",
        "target_false_alarm": cal.target_false_alarm, "false_alarm_bound": cal.false_alarm_bound.get(name),
        "n_reference": cal.n_reference.get(name), "flagged_test": [s for s, f in zip(test_ids, flag) if f],
        "flagged_test_share": float(flag.mean()) if flag.size else None,
    }
    if ood_scores is not None:
        oflag = np.asarray(ood_scores[name]) > t
        block["flagged_ood"] = [s for s, f in zip(ood_ids, oflag) if f]
        block["flagged_ood_share"] = float(oflag.mean()) if oflag.size else None
    return block


def evaluate_rule(cal: Calibration, splits: Mapping[str, Any], ncmi_loss: Any, num_classes: int, ood: Any = None,
                  alpha: float = DEFAULT_FALSE_ALARM) -> dict[str, Any]:
    """Apply the rule to ``cal`` (from :func:`~.ood.evaluate_ood` on the same embedded ``splits``) and return the
    report's ``ood`` fields for the test split (and the embedded ``ood`` bags)."""
    means, center, stats = cal.class_means_array(), cal.train_mean_array(), cal.input_stats()

    def inputs(s: Any) -> ScoreInputs:
        return score_inputs(logits=s.logits, log_probs=s.log_probs, ncmi_loss=ncmi_loss, class_means=means,
                            embeddings=s.embeddings, train_mean=center, input_means=s.input_means, input_stats=stats)

    apply_rule(cal, reference_scores(inputs(splits["val"]), splits["train"], num_classes), alpha)
    if DEFAULT_SCORE in cal.thresholds:
        cal.default_score = DEFAULT_SCORE
    test = compute_scores(inputs(splits["test"]))
    if ood is None:
        return ood_rule_block(cal, splits["test"].slide_ids, test)
    return ood_rule_block(cal, splits["test"].slide_ids, test, ood.slide_ids, compute_scores(inputs(ood)))


def ood_report_markdown(block: Mapping[str, Any]) -> list[str]:
    """``report.md``'s OOD section: the flag rule on the test split (and OOD bags), then the AUROC table."""
    lines: list[str] = []
    if "threshold" in block:
        lines += ["", "## Out-of-distribution flag", "",
                  f"Score `{block['score']}`, threshold {block['threshold']:.4g} ({block['rule']}; n = "
                  f"{block.get('n_reference')}); target false-alarm rate {block['target_false_alarm']:.3g}"
                  + (f", guaranteed ≤ {block['false_alarm_bound']:.3g}" if block.get("false_alarm_bound") else "")
                  + ". A flagged slide scores above the threshold: look at it before trusting its prediction.", ""]
        rows = [["test (in distribution)", len(block["flagged_test"]), _share(block.get("flagged_test_share")),
                 ", ".join(block["flagged_test"][:8]) or "—"]]
        if "flagged_ood" in block:
            rows.append(["OOD bags", len(block["flagged_ood"]), _share(block.get("flagged_ood_share")),
                         ", ".join(block["flagged_ood"][:8]) or "—"])
        lines += markdown_table(["slides", "flagged", "share", "which"], rows)
    if "scores" in block:
        lines += ood_markdown(block)
    return lines


def ood_markdown(block: Mapping[str, Any]) -> list[str]:
    """Lines of the ``report.md`` section for an ``ood`` block."""
    fpr_key = f"fpr_at_{round(float(block.get('tpr', DEFAULT_TPR)) * 100)}tpr"
    lines = ["", "## Out-of-distribution detection", "",
             f"In-distribution: the {block['id_split']} split ({block['n_id']} slides); OOD: {block['n_ood']} bags "
             f"from `{block['ood_bags']}`. AUROC: OOD = positive, higher score = more OOD; FPR@95TPR: share of OOD "
             "slides kept at the threshold that keeps 95 % of in-distribution slides (lower is better)."
             + (f" Default score of this run: `{block['default_score']}`." if block.get("default_score") else ""),
             ""]
    rows = [
        [name, f"{m['auroc']:.3f}", f"{m[fpr_key]:.3f}", OOD_SCORERS[name].description if name in OOD_SCORERS else ""]
        for name, m in block["scores"].items()
    ]
    return lines + markdown_table(["score", "AUROC", "FPR@95TPR", "description"], rows)


def _share(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"
