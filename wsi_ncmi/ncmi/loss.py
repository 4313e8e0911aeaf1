"""NCMI loss: CMI / Γ on the normalized-sigmoid simplex, in matmul form (NCMI.md §2).

Notation (per batch of B samples, labels y_i ∈ {0..C-1}, K centroids per class, M = C·K):

* p_i = NSF(z'_i) with z'_i = (f_i - c) / ‖f_i - c‖₂ / τ           [B, D]
* q_m = NSF(ξ_m), centroid m = v·K + k is the k-th centroid of class v    [M, D]   (class-major rows)
* KL(p_i‖q_m) = Σ_d p_i ln p_i − (p @ ln qᵀ)[i, m]                      [B, M]
* KL(q_m‖p_i) = Σ_d q_m ln q_m − (ln p @ qᵀ)[i, m]                      [B, M]

No [B, C, D] tensor is ever formed: both KL tables are one matrix product each.

Per sample:
* a_i = min_k KL(p_i ‖ q_{y_i,k})    (nearest centroid of the true class; K=1: KL(p_i‖q^{y_i}))
* R_i^v = (1/K) Σ_k KL(q_{v,k} ‖ p_i) (mean over the K centroids of class v; K=1: KL(q^v‖p_i))

``variant="paper"`` (ratio of batch means, Eq. 5–10 with s → q):
    CMI = (1/B) Σ_i a_i,  Γ = (1/B²) Σ_i Σ_v n_v·1[v≠y_i]·R_i^v,  loss = CMI / Γ
    where n_v is the count of class v in the batch. A batch holding one class only has no pair of
    different-class samples, so the n_v-weighted Γ is 0; it then falls back to
    Γ = (1/B) Σ_i (1/(C-1)) Σ_{v≠y_i} R_i^v (every non-target class weighted equally).
``variant="harmonic"`` (per-sample; our MIL adaptation, docs/ncmi_mil.md):
    loss = (1/B) Σ_i a_i · (1/(C-1)) Σ_{v≠y_i} 1 / R_i^v,
    i.e. a_i over the *harmonic* mean of the separations R_i^v. The arithmetic Γ above is dominated by the
    farthest class, so a sample sitting on a wrong class's centroid still gets a small loss when a third class
    is far away; the harmonic mean is dominated by the nearest other class, so every confusion costs. For
    C = 2 it equals the per-sample ratio a_i / R_i. Reported: ``cmi`` = mean_i a_i, ``gamma`` = mean_i of the
    harmonic separation. No batch-level pair counting: one bag per step is as well defined as a large batch.
``variant="official"`` (per-sample ratio, as the public CIFAR-100 code):
    g_i = (1/C) Σ_{v≠y_i} R_i^v,  r_i = (a_i + 1e-10) / g_i,  loss = mean_i r_i;
    the reported ``cmi`` / ``gamma`` are mean_i a_i and mean_i g_i.
Denominators (and each R_i^v of ``harmonic``) are clamped at 1e-12 (only reachable if every other-class centroid equals p_i).

Centroid modes (``centroid_update``):
* ``"sgd"`` (default, paper Alg. 1): ξ is a trainable Parameter receiving the gradient of this loss;
  give it its own optimizer / param group.
* ``"frozen"``: ξ keeps its init (``requires_grad=False``); what the public code effectively does.
* ``"ema"``: ξ has no gradient; after the loss of a training forward is computed, each centroid that
  received samples moves toward the mean of their logit-space points z'_i (detached):
  ξ_m ← μ·ξ_m + (1−μ)·mean_{i→m} z'_i, μ = ``ema_momentum``. Sample i is assigned to the nearest
  (min KL(p_i‖q)) centroid of its own class (K=1: the class centroid). Other centroids are unchanged,
  and nothing moves in eval mode. The batch therefore uses the centroids from before its own update.

Init of ξ [C·K, D]:
* D ≥ C: ξ_{v,0} = 10·e_v + 1e-6 (the public code's 10·[I_C | 0] + 1e-6); for K > 1 the extra
  centroids ξ_{v,k≥1} = 10·e_v + 1e-6 + ε, ε ~ N(0, I) (torch's global RNG), so they start near
  their class direction but distinct.
* D < C: every row is an independent Gaussian direction scaled to norm 10 (torch's global RNG).
* Data-driven, after construction: :meth:`NCMILoss.init_centroids_from_means` puts each row in the direction
  of its class mean of the training features (MILModule's ``centroid_init="class_means"``).

``use_nsf=False`` replaces NSF by softmax for p and q (ablation, paper Table V);
``use_centering=False`` skips the feature center. Computation runs in float32 (or float64 when the
module / features are float64) with autocast disabled.
"""

from __future__ import annotations

import logging
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsi_ncmi.choices import check_choices

from .simplex import FeatureCenter, NCMIError, log_nsf

__all__ = ["NCMILoss", "VARIANTS", "CENTROID_UPDATES", "CentroidUpdate", "Variant", "init_centroids"]

logger = logging.getLogger(__name__)

Variant = Literal["paper", "official", "harmonic"]
CentroidUpdate = Literal["sgd", "frozen", "ema"]
VARIANTS: tuple[str, ...] = typing.get_args(Variant)
CENTROID_UPDATES: tuple[str, ...] = typing.get_args(CentroidUpdate)
_OFFICIAL_EPS = 1e-10
_DENOM_MIN = 1e-12


def init_centroids(num_classes: int, embed_dim: int, centroids_per_class: int = 1) -> Tensor:
    """The initial ξ [C·K, D] as documented in the module docstring (uses torch's global RNG)."""
    c, d, k = num_classes, embed_dim, centroids_per_class
    if d >= c:
        base = torch.full((c, d), 1e-6)
        base[:, :c] += 10.0 * torch.eye(c)
        xi = base.repeat_interleave(k, dim=0)  # [C*K, D], rows v*K + k
        if k > 1:
            extra = torch.randn(c, k - 1, d)
            xi.view(c, k, d)[:, 1:] += extra
        return xi
    rows = torch.randn(c * k, d)
    return 10.0 * F.normalize(rows, dim=1)


class NCMILoss(nn.Module):
    """Normalized conditional mutual information loss on slide / image embeddings.

    ``forward(features [B, D], target [B]) -> {"loss", "cmi", "gamma"}``; see the module docstring for
    the exact formulas, centroid modes and init.

    Input checks: shapes, dtypes and the feature dim are always checked. ``check_finite=True`` adds a
    NaN/inf check of the features, and on accelerators the label-range check; both need a host sync, so
    they are opt-in there (on CPU labels are always range-checked).
    """

    input_kind = "embedding"

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        tau: float = 0.5,
        center_momentum: float = 0.9999,
        variant: Variant = "paper",
        centroid_update: CentroidUpdate = "sgd",
        centroids_per_class: int = 1,
        use_nsf: bool = True,
        use_centering: bool = True,
        ema_momentum: float = 0.99,
        check_finite: bool = False,
    ) -> None:
        check_choices(NCMILoss, locals(), "NCMILoss", NCMIError)
        super().__init__()
        #: detached ln p [B, D] of the last ``forward`` (lets a trainer keep running class means of p
        #: without computing the simplex twice); None before the first call
        self.last_log_probs: Tensor | None = None
        if num_classes < 2:
            raise NCMIError(f"NCMILoss: num_classes must be >= 2, got {num_classes}")
        if embed_dim < 1:
            raise NCMIError(f"NCMILoss: embed_dim must be >= 1, got {embed_dim}")
        if centroids_per_class < 1:
            raise NCMIError(f"NCMILoss: centroids_per_class must be >= 1, got {centroids_per_class}")
        if not tau > 0:
            raise NCMIError(f"NCMILoss: tau must be > 0, got {tau}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise NCMIError(f"NCMILoss: ema_momentum must be in [0, 1], got {ema_momentum}")
        self.num_classes = int(num_classes)
        self.embed_dim = int(embed_dim)
        self.tau = float(tau)
        self.variant = variant
        self.centroid_update = centroid_update
        self.centroids_per_class = int(centroids_per_class)
        self.use_nsf = bool(use_nsf)
        self.use_centering = bool(use_centering)
        self.ema_momentum = float(ema_momentum)
        self.check_finite = bool(check_finite)
        self.xi = nn.Parameter(
            init_centroids(num_classes, embed_dim, centroids_per_class),
            requires_grad=centroid_update == "sgd",
        )  # [C*K, D]
        self.center = FeatureCenter(embed_dim, center_momentum)
        logger.info("NCMILoss: %s", self.extra_repr())

    def _log_simplex(self, z: Tensor) -> Tensor:
        """ln NSF(z) row-wise, or ln softmax(z) when ``use_nsf=False`` (ablation)."""
        return log_nsf(z, dim=-1) if self.use_nsf else torch.log_softmax(z, dim=-1)

    @property
    def num_centroids(self) -> int:
        return self.num_classes * self.centroids_per_class

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, tau={self.tau}, "
            f"variant={self.variant!r}, centroid_update={self.centroid_update!r}, "
            f"centroids_per_class={self.centroids_per_class}, use_nsf={self.use_nsf}, "
            f"use_centering={self.use_centering}"
        )

    # ----------------------------------------------------------------- input checks
    def _check_features(self, features: Tensor) -> None:
        if not isinstance(features, Tensor):
            raise NCMIError(f"NCMILoss: features must be a torch.Tensor, got {type(features).__name__}")
        if features.ndim != 2:
            raise NCMIError(
                f"NCMILoss: features must be 2-D [B, {self.embed_dim}], got ndim={features.ndim} "
                f"shape {tuple(features.shape)}"
            )
        if features.shape[1] != self.embed_dim:
            raise NCMIError(
                f"NCMILoss: feature dim {features.shape[1]} does not match embed_dim={self.embed_dim}"
            )
        if not features.is_floating_point():
            raise NCMIError(f"NCMILoss: features must be floating point, got {features.dtype}")
        if self.check_finite and not bool(torch.isfinite(features).all()):
            raise NCMIError("NCMILoss: features contain NaN or inf (check_finite=True)")

    def _check_target(self, target: Tensor, batch: int) -> None:
        if not isinstance(target, Tensor):
            raise NCMIError(f"NCMILoss: target must be a torch.Tensor, got {type(target).__name__}")
        if target.ndim != 1:
            raise NCMIError(f"NCMILoss: target must be 1-D [B], got shape {tuple(target.shape)}")
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise NCMIError(f"NCMILoss: target must hold integer class labels, got {target.dtype}")
        if target.shape[0] != batch:
            raise NCMIError(f"NCMILoss: target has {target.shape[0]} labels for {batch} features")
        if batch == 0:
            raise NCMIError("NCMILoss: empty batch")
        if target.device.type != "cpu" and not self.check_finite:
            return  # the range check needs a host sync; on accelerators it runs with check_finite=True
        lo, hi = (int(v) for v in torch.aminmax(target))  # one host sync for both bounds
        if lo < 0 or hi >= self.num_classes:
            raise NCMIError(
                f"NCMILoss: labels must be in [0, {self.num_classes - 1}], got range [{lo}, {hi}]"
            )

    # ----------------------------------------------------------------- simplex maps
    def _compute_dtype(self, features: Tensor) -> torch.dtype:
        if features.dtype == torch.float64 or self.xi.dtype == torch.float64:
            return torch.float64
        return torch.float32

    def _scaled(self, features: Tensor, update_center: bool) -> Tensor:
        """z' = (f - c) / ‖f - c‖ / τ  [B, D] (the center is updated first when asked)."""
        f = features.to(self._compute_dtype(features))
        if self.use_centering:
            z = self.center(f) if update_center else self.center.subtract(f)
        else:
            z = f
        return F.normalize(z, dim=1) / self.tau

    def normalized(self, features: Tensor) -> Tensor:
        """Centred, L2-normalised features [B, D] (no center update); the linear-probing input."""
        self._check_features(features)
        f = features.to(self._compute_dtype(features))
        z = self.center.subtract(f) if self.use_centering else f
        return F.normalize(z, dim=1)

    def log_probs(self, features: Tensor) -> Tensor:
        """ln p [B, D]: log of each feature's point on the simplex (uses the center, never updates it)."""
        self._check_features(features)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._log_simplex(self._scaled(features, update_center=False))

    @torch.no_grad()
    def init_centroids_from_means(self, means: Tensor, present: Tensor, scale: float = 10.0) -> None:
        """Set ξ from class means of the training features, instead of the data-blind axis init.

        ``means`` [C, D]: per class, the mean of :meth:`normalized` (centred, L2-normalised) training features;
        ``present`` [C] bool: classes that had samples. Row v becomes ``scale · (m_v − m̄) / ‖m_v − m̄‖``
        (m̄ = mean over present classes): each centroid starts in the direction that already separates its
        class, at the public init's magnitude. Extra centroids (K > 1) add Gaussian noise of about half the
        longest direction's length before normalising, so they are distinct. Absent classes keep their current rows. Uses torch's global RNG.
        """
        c, k, d = self.num_classes, self.centroids_per_class, self.embed_dim
        if tuple(means.shape) != (c, d) or tuple(present.shape) != (c,):
            raise NCMIError(f"init_centroids_from_means: expected means [{c}, {d}] and present [{c}], "
                            f"got {tuple(means.shape)} and {tuple(present.shape)}")
        if int(present.sum()) < 2:
            raise NCMIError("init_centroids_from_means: needs the means of at least two classes")
        means = means.to(self.xi.device, self.xi.dtype)
        present = present.to(self.xi.device)
        direction = means - means[present].mean(dim=0, keepdim=True)  # [C, D]
        rows = direction.repeat_interleave(k, dim=0)  # [C*K, D]
        if k > 1:
            noise = torch.randn(c, k - 1, d).to(rows) * (direction.norm(dim=1).max() / (2 * d**0.5))
            rows.view(c, k, d)[:, 1:] += noise
        new = scale * F.normalize(rows, dim=1)
        keep = present.repeat_interleave(k)[:, None]  # [C*K, 1]
        self.xi.copy_(torch.where(keep, new, self.xi))

    def centroid_log_probs(self) -> Tensor:
        """ln q [C·K, D]: log of each centroid's point on the simplex (rows class-major, v·K + k)."""
        with torch.autocast(device_type=self.xi.device.type, enabled=False):
            return self._log_simplex(self.xi)

    def centroid_kl(self, log_probs: Tensor) -> Tensor:
        """KL(p ‖ q_v) [B, C] to the nearest of the K learned centroids q = NSF(ξ) of each class.

        ``log_probs`` = ln p [B, D] (e.g. :meth:`log_probs`, or stored rows); computed in its dtype and
        on its device (ξ is moved there), in the matmul form of the module docstring.
        """
        log_q = self.centroid_log_probs().to(log_probs.device, log_probs.dtype)  # [C*K, D]
        p = log_probs.exp()
        plogp = torch.where(p > 0, p * log_probs, torch.zeros_like(p))  # 0·ln 0 = 0
        kl = plogp.sum(1, keepdim=True) - p @ log_q.T  # [B, C*K]
        return kl.view(kl.shape[0], self.num_classes, self.centroids_per_class).min(dim=2).values  # [B, C]

    def class_scores(self, features: Tensor) -> Tensor:
        """Class scores [B, C] = −min_k KL(p ‖ q_{v,k}) of features [B, D] (argmax = nearest learned centroid).

        Uses the center, never updates it; softmax of these scores is the NCMI runs' class probability.
        """
        return -self.centroid_kl(self.log_probs(features))

    # ----------------------------------------------------------------- the loss
    def forward(self, features: Tensor, target: Tensor) -> dict[str, Tensor]:
        """features [B, D], target [B] int -> {"loss", "cmi", "gamma"} (0-d tensors)."""
        self._check_features(features)
        self._check_target(target, features.shape[0])
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._forward(features, target)

    def _forward(self, features: Tensor, target: Tensor) -> dict[str, Tensor]:
        b, c, k = features.shape[0], self.num_classes, self.centroids_per_class
        dtype = self._compute_dtype(features)
        zs = self._scaled(features, update_center=self.training)  # [B, D]
        log_p = self._log_simplex(zs)  # [B, D]
        p = log_p.exp()
        xi = self.xi.to(dtype)
        log_q = self._log_simplex(xi)  # [M, D]
        q = log_q.exp()

        neg_ent_p = (p * log_p).sum(dim=1)  # [B]   Σ p ln p
        neg_ent_q = (q * log_q).sum(dim=1)  # [M]   Σ q ln q
        kl_pq = neg_ent_p[:, None] - p @ log_q.T  # [B, M]  KL(p_i ‖ q_m)
        kl_qp = neg_ent_q[None, :] - log_p @ q.T  # [B, M]  KL(q_m ‖ p_i)

        target = target.to(device=features.device, dtype=torch.long)
        rows = torch.arange(b, device=features.device)
        own = kl_pq.view(b, c, k)[rows, target]  # [B, K]
        a, nearest = own.min(dim=1)  # [B], [B]
        r_class = kl_qp.view(b, c, k).mean(dim=2)  # [B, C]  R_i^v
        other = 1.0 - F.one_hot(target, c).to(dtype)  # [B, C]  1[v ≠ y_i]

        if self.variant == "paper":
            cmi = a.mean()
            counts = torch.bincount(target, minlength=c).to(dtype)  # [C]  n_v
            weights = other * counts[None, :]  # [B, C]
            gamma_pairs = (weights * r_class).sum() / (b * b)
            gamma_uniform = (other * r_class).sum() / (b * (c - 1))
            gamma = torch.where(weights.sum() > 0, gamma_pairs, gamma_uniform)
            loss = cmi / gamma.clamp_min(_DENOM_MIN)
        elif self.variant == "harmonic":
            inv = other / r_class.clamp_min(_DENOM_MIN)  # [B, C]  1 / R_i^v for v ≠ y_i, 0 for v = y_i
            h = inv.sum(dim=1) / (c - 1)  # [B]  1 / (harmonic mean of R_i^v over v ≠ y_i)
            loss = (a * h).mean()
            cmi, gamma = a.mean(), (1.0 / h).mean()
        else:
            g = (other * r_class).sum(dim=1) / c  # [B]
            loss = ((a + _OFFICIAL_EPS) / g.clamp_min(_DENOM_MIN)).mean()
            cmi, gamma = a.mean(), g.mean()

        if self.centroid_update == "ema" and self.training:
            self._ema_step(zs.detach(), target * k + nearest.detach())
        self.last_log_probs = log_p.detach()  # [B, D] for callers' running statistics (no extra work)
        return {"loss": loss, "cmi": cmi, "gamma": gamma}

    @torch.no_grad()
    def _ema_step(self, zs: Tensor, assign: Tensor) -> None:
        """ξ_m ← μ ξ_m + (1-μ) mean_{i→m} z'_i for every centroid m with assigned samples."""
        m = self.num_centroids
        sums = torch.zeros(m, zs.shape[1], dtype=zs.dtype, device=zs.device)
        sums.index_add_(0, assign, zs)  # [M, D]
        counts = torch.bincount(assign, minlength=m).to(zs.dtype)  # [M]
        means = sums / counts.clamp_min(1.0)[:, None]
        moved = self.xi.data * self.ema_momentum + means.to(self.xi.dtype) * (1.0 - self.ema_momentum)
        self.xi.data.copy_(torch.where((counts > 0)[:, None], moved, self.xi.data))
