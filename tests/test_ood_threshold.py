"""The OOD flag's threshold rule (issue #27, part 3): a conformal quantile at a stated false-alarm rate."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ncmi.evaluation.ood import Calibration, OODError, ScoreInputs
from wsi_ncmi.evaluation.ood_threshold import (
    apply_rule,
    conformal_threshold,
    loo_input_z,
    ood_report_markdown,
    ood_rule_block,
    reference_scores,
)


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


def test_apply_rule_uses_out_of_fold_training_scores_and_the_block_lists_flags() -> None:
    class Split:
        def __init__(self, f: np.ndarray, y: np.ndarray) -> None:
            self.embeddings, self.labels, self.log_probs = f, y, None

        def __len__(self) -> int:
            return len(self.labels)

    rng = np.random.default_rng(1)
    train = Split(rng.standard_normal((30, 4)), np.arange(30) % 2)
    kl = rng.random((8, 2))
    m = train.embeddings.mean(0)
    radius = np.linalg.norm(rng.standard_normal((8, 4)) - m, axis=1, keepdims=True)
    ref = reference_scores(ScoreInputs(logits=-kl, kl_xi=kl, kl_means=kl, radius=radius), train, 2)
    assert ref["radius"].size == 8 + 30 and ref["ncmi_means"].size == 8 and ref["ncmi_xi"].size == 8
    np.testing.assert_allclose(ref["radius"][8:], [np.linalg.norm(train.embeddings[i] - np.delete(
        train.embeddings, i, 0).mean(0)) for i in range(30)])  # leave-one-out
    cal = Calibration(thresholds={}, default_score="radius")
    apply_rule(cal, ref, 0.1)
    assert cal.rule == "conformal" and cal.target_false_alarm == 0.1 and cal.n_reference["radius"] == 38
    assert cal.thresholds["radius"] == np.sort(ref["radius"])[int(np.ceil(39 * 0.9)) - 1]
    assert cal.false_alarm_bound["ncmi_xi"] == pytest.approx(1 / 9)  # 8 references cannot promise 10 %
    t = cal.thresholds["radius"]
    block = ood_rule_block(cal, ["a", "b", "c"], {"radius": np.array([t - 1, t + 1, t])},
                           ["o1", "o2"], {"radius": np.array([t + 2, t - 2])})
    assert block["flagged_test"] == ["b"] and block["flagged_ood"] == ["o1"] and block["threshold"] == t
    assert {"score", "threshold", "rule", "target_false_alarm", "flagged_test"} <= set(block)
    text = "\n".join(ood_report_markdown(block))
    assert "## Out-of-distribution flag" in text and "| OOD bags | 1 |" in text


def test_leave_one_out_input_z_matches_brute_force() -> None:
    x = np.random.default_rng(3).standard_normal((12, 5)) * [1, 2, 3, 4, 5]
    got = loo_input_z(x)
    for i in range(12):
        rest = np.delete(x, i, 0)
        z = (x[i] - rest.mean(0)) / rest.std(0)
        assert got[i] == pytest.approx(np.sqrt((z**2).mean()), rel=1e-9)


def test_input_z_is_the_rms_z_score_of_the_bag_mean_feature() -> None:
    from wsi_ncmi.evaluation.ood import compute_scores, score_inputs

    mean, std = np.array([0.0, 1.0, 2.0]), np.array([1.0, 2.0, 4.0])
    bags = np.array([[0.0, 1.0, 2.0], [1.0, 3.0, 6.0]])  # at the mean; one std off in every dimension
    s = compute_scores(score_inputs(logits=np.zeros((2, 2)), input_means=bags, input_stats=(mean, std)))
    np.testing.assert_allclose(s["input_z"], [0.0, 1.0])
