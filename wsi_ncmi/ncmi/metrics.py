"""Dataset-level NCMI metric (paper Eq. 5–8) and matrix-information diagnostics (Song et al.).

:func:`ncmi_metric` — for probabilities p_i on the simplex with labels y_i over a whole split, with
closed-form centroids s^v = mean_{i: y_i=v} p_i (Eq. 6) and class counts n_v:

    CMI  = (1/N)  Σ_i KL(p_i ‖ s^{y_i})                                        (Eq. 5)
    Γ    = (1/N²) Σ_i Σ_v n_v · 1[v ≠ y_i] · KL(s^v ‖ p_i)                     (Eq. 7)
    NCMI = CMI / Γ                                                              (Eq. 8)

Γ is the average over all ordered pairs (i, j) of samples (N² of them) of 1[y_j ≠ y_i]·KL(s^{y_j} ‖ p_i),
collapsed by class exactly like the batch loss (``NCMILoss(variant="paper")``). Everything is one
[N, C] matmul (no N×N or N×C×D tensor), computed in float64.

Γ = 0 (all probabilities identical, or a single class): ``ncmi`` is ``inf`` and a ``RuntimeWarning`` is
issued (0/0 is also reported as ``inf``, not NaN).

Matrix information metrics, after K. Song, Z. Tan, B. Zou, J. Chen, H. Ma, W. Huang, "Exploring
Information-Theoretic Metrics Associated with Neural Collapse in Supervised Training" (arXiv:2409.16767):

* matrix entropy of representations Z [N, d]: rows are L2-normalised, K = Z Zᵀ (so tr K = N) and
  H(K) = −tr((K/N) log(K/N)) = −Σ_j λ_j log λ_j with λ the eigenvalues of K/N (natural log;
  0 for collapsed identical rows, at most log min(N, d)).
* matrix mutual information I(K1; K2) = H(K1) + H(K2) − H(K1 ⊙ K2) (⊙ = Hadamard product, again a
  unit-diagonal Gram matrix) and the ratio MIR = I(K1; K2) / min(H(K1), H(K2)).
* HDR, the matrix entropy difference ratio, = |H(K1) − H(K2)| / max(H(K1), H(K2)).

In the paper K1 is built from sample representations and K2 from the classification-head vectors of the
same samples' classes. Here the functions take any two paired representations Z1 [N, d1], Z2 [N, d2]
(row i of both describes sample i); :func:`class_representations` builds the usual second argument
(the class centroid of each sample's class, or its one-hot vector). The N×N Gram is intrinsic to these
metrics: subsample large splits (a few thousand rows).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .centroids import CentroidAccumulator, _as_tensor, _check_pair, class_centroids
from .simplex import NCMIError

__all__ = [
    "NCMIMetricAccumulator",
    "ncmi_metric",
    "matrix_entropy",
    "matrix_mutual_information_ratio",
    "hdr",
    "class_representations",
]


def ncmi_metric(
    probs: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    num_classes: int | None = None,
    centroids: Tensor | None = None,
) -> dict[str, float]:
    """CMI, Γ and NCMI of a split (module docstring). ``probs`` [N, D] rows on the simplex, ``labels`` [N].

    ``centroids`` [C, D] may be given (e.g. from a :class:`CentroidAccumulator`); otherwise they are the
    class means of ``probs``. Classes with no sample contribute nothing (n_v = 0).
    """
    p = _as_tensor(probs, "probs")
    y = _as_tensor(labels, "labels").to(p.device)
    if p.ndim == 2 and p.shape[0] == 0:
        raise NCMIError("ncmi_metric: probs is empty")
    n_cls = num_classes if num_classes is not None else int(y.max()) + 1 if y.numel() else 0
    _check_pair(p, y, n_cls)
    p = p.to(torch.float64)
    y = y.long()
    if centroids is None:
        s = class_centroids(p, y, n_cls, allow_empty=True)  # [C, D]
    else:
        s = _as_tensor(centroids, "centroids").to(p.device, torch.float64)
        if s.shape != (n_cls, p.shape[1]):
            raise NCMIError(f"ncmi_metric: centroids must be [{n_cls}, {p.shape[1]}], got {tuple(s.shape)}")
    n = p.shape[0]
    counts = torch.bincount(y, minlength=n_cls).to(torch.float64)  # [C]
    present = counts > 0
    s = torch.where(present[:, None], s, torch.full_like(s, 1.0 / s.shape[1]))  # NaN rows -> unused
    tiny = torch.finfo(torch.float64).tiny
    log_p = p.clamp_min(tiny).log()  # [N, D]
    log_s = s.clamp_min(tiny).log()  # [C, D]
    neg_ent_p = torch.special.xlogy(p, p).sum(dim=1)  # [N]
    neg_ent_s = torch.special.xlogy(s, s).sum(dim=1)  # [C]

    rows = torch.arange(n, device=p.device)
    kl_ps_own = neg_ent_p - (p * log_s[y]).sum(dim=1)  # [N]  KL(p_i ‖ s^{y_i})
    cmi = kl_ps_own.mean()
    kl_sp = neg_ent_s[None, :] - log_p @ s.T  # [N, C]  KL(s^v ‖ p_i)
    weights = counts[None, :].expand(n, n_cls).clone()  # [N, C]
    weights[rows, y] = 0.0
    gamma = (weights * kl_sp).sum() / (n * n)

    cmi_f, gamma_f = max(float(cmi), 0.0), max(float(gamma), 0.0)
    if gamma_f <= 0.0:
        warnings.warn(
            "ncmi_metric: Γ = 0 (identical probabilities or a single class); reporting ncmi = inf",
            RuntimeWarning,
            stacklevel=2,
        )
        ncmi = math.inf
    else:
        ncmi = cmi_f / gamma_f
    return {"cmi": cmi_f, "gamma": gamma_f, "ncmi": ncmi}


# --------------------------------------------------------------------------- matrix information
class NCMIMetricAccumulator:
    """Streamed :func:`wsi_ncmi.ncmi.ncmi_metric`: ``update(probs [B, D], labels [B])`` per batch, ``compute()``.

    With n_v, S_v = Σ_{y_i=v} p_i, L_v = Σ_{y_i=v} ln p_i (per class) and s^v = S_v / n_v, the formula of
    :mod:`wsi_ncmi.ncmi.metrics` regroups exactly into these sums:

        N·CMI = Σ_i Σ_d p_id ln p_id − Σ_v S_v · ln s^v
        N²·Γ  = Σ_v n_v [ (N − n_v) Σ_d s^v_d ln s^v_d − s^v · (L − L_v) ],   L = Σ_v L_v

    Memory: three [C, D] float64 tensors on the device of the first batch; ``ln`` clamps at float64's
    smallest normal number exactly like ``ncmi_metric``. The per-class sums reuse
    :class:`~wsi_ncmi.ncmi.CentroidAccumulator`.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.centroids = CentroidAccumulator(num_classes, dim)  # n_v, S_v
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.log_sums: Tensor | None = None  # [C, D] float64: L_v
        self.neg_entropy: Tensor | None = None  # [] float64: Σ_i Σ_d p_id ln p_id

    @property
    def class_counts(self) -> Tensor:
        """n_v [C] (zeros before the first batch)."""
        c = self.centroids.counts
        return torch.zeros(self.num_classes, dtype=torch.long) if c is None else c

    def update(self, probs: Tensor, labels: Tensor) -> None:
        p = probs.detach().to(torch.float64)  # [B, D]
        self.centroids.update(p, labels)  # validates shapes / label range
        y = labels.to(p.device).long()
        if self.log_sums is None or self.neg_entropy is None:
            self.log_sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64, device=p.device)
            self.neg_entropy = torch.zeros((), dtype=torch.float64, device=p.device)
        dev = self.log_sums.device
        log_p = p.clamp_min(torch.finfo(torch.float64).tiny).log()  # [B, D]
        self.log_sums.index_add_(0, y.to(dev), log_p.to(dev))
        self.neg_entropy += torch.special.xlogy(p, p).sum().to(dev)  # no host sync per batch

    def reduce(self, sum_fn: Callable[[Tensor], Tensor]) -> None:
        """Replace every running sum by ``sum_fn(sum)`` (e.g. a sum over distributed ranks); every process
        must call it, including one that saw no batch (its sums count as zeros)."""
        c = self.centroids
        if c.sums is None or c.counts is None or self.log_sums is None or self.neg_entropy is None:
            raise NCMIError("NCMIMetricAccumulator.reduce: no batch was added on this process")
        c.sums, c.counts = sum_fn(c.sums), sum_fn(c.counts)
        self.log_sums, self.neg_entropy = sum_fn(self.log_sums), sum_fn(self.neg_entropy)

    def compute(self) -> dict[str, float]:
        """``{"cmi", "gamma", "ncmi"}`` as :func:`~wsi_ncmi.ncmi.ncmi_metric` would give on all rows seen."""
        sums, counts, log_sums = self.centroids.sums, self.centroids.counts, self.log_sums
        if sums is None or counts is None or log_sums is None or self.neg_entropy is None:
            raise NCMIError("NCMIMetricAccumulator.compute: no batch was added")
        present = counts > 0  # [C]
        n_v = counts[present].to(torch.float64)  # [C']
        n = float(n_v.sum())
        s_sum = sums[present]  # [C', D]
        s = s_sum / n_v[:, None]  # [C', D]
        tiny = torch.finfo(torch.float64).tiny
        log_s = s.clamp_min(tiny).log()
        neg_ent_s = torch.special.xlogy(s, s).sum(dim=1)  # [C']
        cmi = (float(self.neg_entropy) - float((s_sum * log_s).sum())) / n
        log_total = log_sums.sum(dim=0)  # [D]  L
        other = log_total[None, :] - log_sums[present]  # [C', D]  L − L_v
        gamma = float((n_v * ((n - n_v) * neg_ent_s - (s * other).sum(dim=1))).sum()) / (n * n)
        cmi_f, gamma_f = max(cmi, 0.0), max(gamma, 0.0)
        if gamma_f <= 0.0:
            warnings.warn(
                "NCMIMetricAccumulator: Γ = 0 (identical probabilities or a single class); reporting ncmi = inf",
                RuntimeWarning,
                stacklevel=2,
            )
            return {"cmi": cmi_f, "gamma": gamma_f, "ncmi": math.inf}
        return {"cmi": cmi_f, "gamma": gamma_f, "ncmi": cmi_f / gamma_f}


def _unit_rows(z: Tensor | np.ndarray, name: str) -> Tensor:
    t = _as_tensor(z, name)
    if t.ndim != 2 or t.shape[0] == 0:
        raise NCMIError(f"{name} must be a non-empty 2-D [N, d] array, got shape {tuple(t.shape)}")
    return F.normalize(t.to(torch.float64), dim=1)


def _entropy_of_spectrum(eig: Tensor) -> float:
    lam = eig.clamp_min(0.0)
    lam = lam / lam.sum()
    return float(-torch.special.xlogy(lam, lam).sum())


def _gram_entropy(gram: Tensor) -> float:
    """H of a unit-diagonal Gram matrix [N, N]: −Σ λ log λ, λ = eig(K / N)."""
    return _entropy_of_spectrum(torch.linalg.eigvalsh(gram / gram.shape[0]))


def matrix_entropy(z: Tensor | np.ndarray) -> float:
    """Matrix entropy of representations ``z`` [N, d] (rows L2-normalised; see module docstring).

    Uses the d×d matrix ZᵀZ / N when d < N (same non-zero spectrum as Z Zᵀ / N).
    """
    u = _unit_rows(z, "z")
    n, d = u.shape
    small = u.T @ u if d < n else u @ u.T  # [d, d] or [N, N]
    return _entropy_of_spectrum(torch.linalg.eigvalsh(small / n))


def _paired(z1: Tensor | np.ndarray, z2: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    u1, u2 = _unit_rows(z1, "z1"), _unit_rows(z2, "z2")
    if u1.shape[0] != u2.shape[0]:
        raise NCMIError(f"z1 and z2 must have the same number of rows, got {u1.shape[0]} and {u2.shape[0]}")
    return u1, u2.to(u1.device)


def matrix_mutual_information_ratio(z1: Tensor | np.ndarray, z2: Tensor | np.ndarray) -> float:
    """MIR = (H(K1) + H(K2) − H(K1 ⊙ K2)) / min(H(K1), H(K2)) for paired z1 [N, d1], z2 [N, d2].

    Returns 0.0 when min(H(K1), H(K2)) = 0 (one side fully collapsed carries no information).
    """
    u1, u2 = _paired(z1, z2)
    k1, k2 = u1 @ u1.T, u2 @ u2.T  # [N, N]
    h1, h2, h12 = _gram_entropy(k1), _gram_entropy(k2), _gram_entropy(k1 * k2)
    denom = min(h1, h2)
    return 0.0 if denom <= 0.0 else (h1 + h2 - h12) / denom


def hdr(z1: Tensor | np.ndarray, z2: Tensor | np.ndarray) -> float:
    """HDR = |H(K1) − H(K2)| / max(H(K1), H(K2)) for paired z1, z2 (0.0 when both entropies are 0)."""
    u1, u2 = _paired(z1, z2)
    h1, h2 = matrix_entropy(u1), matrix_entropy(u2)
    denom = max(h1, h2)
    return 0.0 if denom <= 0.0 else abs(h1 - h2) / denom


def class_representations(
    z: Tensor | np.ndarray, labels: Tensor | np.ndarray, num_classes: int, kind: str = "centroid"
) -> Tensor:
    """Per-sample class representation [N, ·] to pair with ``z`` [N, d] in MIR / HDR.

    ``kind="centroid"``: the mean of the L2-normalised rows of ``z`` over the sample's class [N, d];
    ``kind="onehot"``: the one-hot label [N, C].
    """
    y = _as_tensor(labels, "labels").long()
    if kind == "onehot":
        return F.one_hot(y, num_classes).to(torch.float64)
    if kind != "centroid":
        raise NCMIError(f"class_representations: kind must be 'centroid' or 'onehot', got {kind!r}")
    u = _unit_rows(z, "z")
    cent = class_centroids(u, y.to(u.device), num_classes, allow_empty=True)  # [C, d]
    return cent[y.to(u.device)]
