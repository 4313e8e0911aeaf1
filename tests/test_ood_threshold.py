"""The OOD flag's threshold rule (issue #27, part 3): a conformal quantile at a stated false-alarm rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ncmi.evaluation.ood import Calibration, OODError, ScoreInputs
from wsi_ncmi.evaluation.ood_threshold import (
    apply_rule,
    conformal_threshold,
    loo_means_kl,
    ood_report_markdown,
    ood_rule_block,
    reference_scores,
)
from wsi_ncmi.ncmi.centroids import class_centroids, kl_rows_to_centroids


@pytest.mark.parametrize("n, alpha", [(39, 0.1), (59, 0.05), (24, 0.2)])
def test_conformal_threshold_gives_the_stated_false_alarm_rate(n: int, alpha: float) -> None:
    rng = np.random.default_rng(n)
    rates = []
    for _ in range(3000):  # each time: n reference in-distribution scores, then 50 new in-distribution slides
        t, bound = conformal_threshold(rng.standard_normal(n), alpha)
        rates.append((rng.standard_normal(50) > t).mean())
        assert bound == alpha
    # exchangeable scores: P(new > k-th smallest of n) = (n + 1 - k) / (n + 1), which is ≤ α and > α - 1/(n+1)
    k = int(np.ceil((n + 1) * (1 - alpha) - 1e-9))
    assert np.mean(rates) == pytest.approx((n + 1 - k) / (n + 1), abs=0.006)
    assert alpha - 1 / (n + 1) - 0.006 < np.mean(rates) <= alpha + 0.006


def test_conformal_threshold_with_too_few_references_says_what_it_can_guarantee() -> None:
    s = np.arange(9.0)
    assert conformal_threshold(s, 0.05) == (8.0, 0.1)  # n = 9 cannot promise 5 %: the maximum, 1/(n+1)
    assert conformal_threshold(s, 0.2) == (7.0, 0.2)  # k = ⌈10 · 0.8⌉ = 8: the 8th smallest of 0..8
    with pytest.raises(OODError):
        conformal_threshold([], 0.05)
    with pytest.raises(OODError):
        conformal_threshold(s, 1.5)


def test_leave_one_out_class_means_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=12)  # [12, 5]
    y = np.arange(12) % 3
    got = loo_means_kl(np.log(p), y, 3)
    for i in range(12):
        keep = np.arange(12) != i
        means = class_centroids(torch.as_tensor(p[keep]), torch.as_tensor(y[keep]), 3).numpy()
        ref = kl_rows_to_centroids(torch.as_tensor(p[i : i + 1]), torch.as_tensor(means)).numpy()[0]
        np.testing.assert_allclose(got[i], ref, rtol=1e-10)


def test_apply_rule_uses_out_of_fold_training_scores_and_the_block_lists_flags() -> None:
    class Split:
        def __init__(self, lp: np.ndarray, y: np.ndarray) -> None:
            self.log_probs, self.labels = lp, y

        def __len__(self) -> int:
            return len(self.labels)

    rng = np.random.default_rng(1)
    train = Split(np.log(rng.dirichlet(np.ones(4) * 50, size=30)), np.arange(30) % 2)
    kl = rng.random((8, 2))
    ref = reference_scores(ScoreInputs(logits=-kl, kl_xi=kl, kl_means=kl), train, 2)
    assert ref["ncmi_means"].size == 8 + 30 and ref["ncmi_xi"].size == 8 and ref["msp"].size == 8
    cal = Calibration(thresholds={}, default_score="ncmi_means")
    apply_rule(cal, ref, 0.1)
    assert cal.rule == "conformal" and cal.target_false_alarm == 0.1 and cal.n_reference["ncmi_means"] == 38
    assert cal.thresholds["ncmi_means"] == np.sort(ref["ncmi_means"])[int(np.ceil(39 * 0.9)) - 1]
    assert cal.false_alarm_bound["ncmi_xi"] == pytest.approx(1 / 9)  # 8 references cannot promise 10 %
    t = cal.thresholds["ncmi_means"]
    block = ood_rule_block(cal, ["a", "b", "c"], {"ncmi_means": np.array([t - 1, t + 1, t])},
                           ["o1", "o2"], {"ncmi_means": np.array([t + 2, t - 2])})
    assert block["flagged_test"] == ["b"] and block["flagged_ood"] == ["o1"] and block["threshold"] == t
    assert {"score", "threshold", "rule", "target_false_alarm", "flagged_test"} <= set(block)
    text = "\n".join(ood_report_markdown(block))
    assert "## Out-of-distribution flag" in text and "| OOD bags | 1 |" in text
