"""Loss functions and their small solvers: DPO / IPO, beta-DPO, Bradley-Terry, MORE weights, calibration.

Pure tensor code: no Ray, no models, no I/O. The maths is docs/ALGORITHMS.md sections 1 (beta-DPO) and
2 (MORE); every **raybpo rule** of those sections is repeated in the docstring that implements it.

Notation as in the doc: for a pair (x, y_w, y_l) the DPO logit is

    h = [logp_pi(y_w) - logp_ref(y_w)] - [logp_pi(y_l) - logp_ref(y_l)]

where logp is the SUM of the response tokens' log-probabilities.

Kept whole: one thing, the maths of the papers' losses: each function stands alone with its equation, they share
only the notation above, and the train stages and the tests import them from this one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BETA_MIN",
    "BetaDPO",
    "BetaDPOOutput",
    "MoreWeighting",
    "beta_dpo_generator",
    "bradley_terry_head_grads",
    "bradley_terry_loss",
    "dpo_logits",
    "dpo_loss",
    "expected_calibration_error",
    "ipo_loss",
    "min_norm_weights",
    "more_loss",
    "preference_accuracy",
]

BETA_MIN = 1e-3
"""Floor of beta-DPO's batch beta: `beta_batch = max(BETA_MIN, ...)`."""


# --------------------------------------------------------------------------------------------
# DPO / IPO
# --------------------------------------------------------------------------------------------


def dpo_logits(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """Per-pair DPO logit `h = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l))`."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(h: Tensor, beta: float | Tensor) -> Tensor:
    """Per-sample DPO loss `-log sigmoid(beta * h)`."""
    return -F.logsigmoid(beta * h)


def ipo_loss(h: Tensor, beta: float | Tensor) -> Tensor:
    """Per-sample IPO loss `(h - 1 / (2 * beta))^2`."""
    return (h - 1.0 / (2.0 * beta)) ** 2


_PAIR_LOSSES: dict[str, Callable[[Tensor, float], Tensor]] = {"dpo": dpo_loss, "ipo": ipo_loss}


# --------------------------------------------------------------------------------------------
# beta-DPO (ALGORITHMS.md section 1)
# --------------------------------------------------------------------------------------------


def beta_dpo_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator that draws beta-DPO's kept subset at `step`: seeded with a fixed function of (seed, step).

    **raybpo rule**: every data-parallel worker draws the same subset because every worker builds this
    same generator from the same (seed, step); the global RNG streams are never used.
    """
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(step)) % (1 << 63)
    return torch.Generator(device="cpu").manual_seed(mixed)


@dataclass
class BetaDPOOutput:
    """What one beta-DPO call returns.

    loss: the scalar to backpropagate (kept samples on this worker only).
    beta: the batch beta used (a detached python float).
    kept_mask: bool mask over this worker's samples (the local slice of the global kept set).
    kept_fraction: k / N over the gathered batch.
    m0, sigma: the running statistics used for this call (after this call's update when training).
    per_sample: the unmasked per-sample loss at `beta`, detached.
    """

    loss: Tensor
    beta: float
    kept_mask: Tensor
    kept_fraction: float
    m0: float
    sigma: float
    per_sample: Tensor


class BetaDPO:
    """beta-DPO (Wu et al., NeurIPS 2024): batch-level dynamic beta plus a Gaussian filter on the DPO logits.

    Per call, over the N logits A gathered from all data-parallel workers (raw h, not times beta0):

        M0    <- m * M0    + (1 - m) * mean(A)            (training only)
        sigma <- m * sigma + (1 - m) * std(A)             (training only; unbiased std, 0 for N = 1)
        w_i    = exp(-0.5 * ((A_i - M0) / (sigma + eps))^2)
        kept   = k = floor(N * rho) indices drawn without replacement with probability proportional to w
        beta   = max(1e-3, beta0 * (1 + alpha * (mean(A[kept]) - M0)))          (detached)
        loss   = sum_{i kept, local} l(beta, h_i) / n_norm,  l = -log sigmoid(beta h) (DPO) or (h - 1/(2 beta))^2 (IPO)

    n_norm is the number kept on this worker (`normalization="worker"`, the doc's rule and the official code)
    or k / world_size (`normalization="global"`: under DDP's gradient averaging, W workers then give exactly
    the gradient of one process on the gathered batch).

    **raybpo rules**:
    - `eps` (default 1e-6) in the weight's denominator avoids 0/0 at step 0 when pi == ref.
    - the kept subset is drawn from `beta_dpo_generator(seed, steps)` (a CPU generator seeded identically on
      every worker, `steps` counted after this call's update), so every worker keeps the same subset;
      the global RNG is never used. Weights are computed in float64. If every weight is 0 or non-finite
      the draw uses uniform weights; if fewer than k weights are positive, all positive ones are kept and the
      rest are drawn uniformly among the zero-weight ones (the limit of equal tiny weights).
    - evaluation calls (`training=False`) do not update M0 / sigma / steps; they use the current values
      (and so draw from the generator of the last training step).
    - M0, sigma and steps are training state: `state_dict()` / `load_state_dict()` go into every checkpoint.
    - a gathered batch with a non-finite logit (an overflow, a broken reference log-prob) is broken as a whole:
      its loss is NaN, so the loop's NaN/inf guard skips the step, and M0, sigma and steps are not updated (the
      paper's statistics assume finite logits; one -inf would make M0 and beta infinite from then on).

    Ablations: `alpha=0` filtering only; `rho=1` dynamic beta only (no draw, every sample kept);
    `alpha=0, rho=1` is plain DPO (beta is beta0 exactly when alpha == 0, the 1e-3 floor included).
    k is floor(N * rho) up to a 1e-9 tolerance (so 100 * 0.29 keeps 29, not 28), and at least 1.
    """

    def __init__(
        self,
        beta0: float = 0.1,
        alpha: float = 0.6,
        rho: float = 0.8,
        momentum: float = 0.9,
        eps: float = 1e-6,
        loss_type: Literal["dpo", "ipo"] = "dpo",
        seed: int = 0,
        normalization: Literal["worker", "global"] = "worker",
    ):
        if beta0 <= 0:
            raise ValueError(f"beta0 must be > 0, got {beta0}")
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"rho (the kept fraction) must be in (0, 1], got {rho}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if loss_type not in _PAIR_LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(_PAIR_LOSSES)}, got {loss_type!r}")
        if normalization not in ("worker", "global"):
            raise ValueError(f"normalization must be 'worker' or 'global', got {normalization!r}")
        self.beta0 = float(beta0)
        self.alpha = float(alpha)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.loss_type = loss_type
        self.seed = int(seed)
        self.normalization = normalization
        self.m0 = 0.0
        self.sigma = 0.0
        self.steps = 0

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The training state: running mean `m0`, running std `sigma`, number of training updates `steps`."""
        return {"m0": float(self.m0), "sigma": float(self.sigma), "steps": int(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m0 = float(state["m0"])
        self.sigma = float(state["sigma"])
        self.steps = int(state["steps"])

    # -- pieces ------------------------------------------------------------------------------

    def num_kept(self, n: int) -> int:
        """k = floor(n * rho), at least 1 (a 1e-9 tolerance absorbs float error such as 100 * 0.29)."""
        if self.rho >= 1.0:
            return n
        return min(n, max(1, math.floor(n * self.rho + 1e-9)))

    def batch_beta(self, kept_mean: float) -> float:
        """`max(1e-3, beta0 * (1 + alpha * (mean(A[kept]) - M0)))`; exactly beta0 when alpha == 0."""
        if self.alpha == 0.0:
            return self.beta0
        return max(BETA_MIN, self.beta0 * (1.0 + self.alpha * (kept_mean - self.m0)))

    def weights(self, values: Tensor) -> Tensor:
        """Filtering weights `exp(-0.5 * ((A - M0) / (sigma + eps))^2)` in float64 with the current M0, sigma."""
        z = (values.to(torch.float64) - self.m0) / (self.sigma + self.eps)
        return torch.exp(-0.5 * z * z)

    def select(self, values: Tensor) -> Tensor:
        """Bool mask over the N gathered values: the kept subset for the current `steps` (see the class doc)."""
        n = values.numel()
        k = self.num_kept(n)
        kept = torch.zeros(n, dtype=torch.bool)
        if k >= n:
            kept[:] = True
            return kept
        w = self.weights(values.cpu())
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        positive = w > 0
        generator = beta_dpo_generator(self.seed, self.steps)
        n_positive = int(positive.sum())
        if n_positive == 0:
            idx = torch.multinomial(torch.ones(n, dtype=torch.float64), k, replacement=False, generator=generator)
            kept[idx] = True
        elif n_positive >= k:
            kept[torch.multinomial(w, k, replacement=False, generator=generator)] = True
        else:
            kept[positive] = True
            zeros = torch.nonzero(~positive).flatten()
            draw = torch.multinomial(
                torch.ones(zeros.numel(), dtype=torch.float64), k - n_positive, replacement=False, generator=generator
            )
            kept[zeros[draw]] = True
        return kept

    def _broken_batch(self, h_local: Tensor) -> BetaDPOOutput:
        """A gathered batch with a non-finite logit: a NaN loss (the loop's guard skips the step) and the statistics
        left as they were, so one broken batch cannot make M0 or beta infinite for every later step."""
        nan = float("nan")
        return BetaDPOOutput(
            loss=h_local.sum() * nan,
            beta=nan,
            kept_mask=torch.zeros(h_local.numel(), dtype=torch.bool, device=h_local.device),
            kept_fraction=0.0,
            m0=self.m0,
            sigma=self.sigma,
            per_sample=torch.full_like(h_local.detach(), nan),
        )

    # -- the loss ----------------------------------------------------------------------------

    def __call__(
        self,
        h_local: Tensor,
        gather: Callable[[Tensor], Tensor] | None = None,
        rank: int = 0,
        world_size: int = 1,
        training: bool = True,
    ) -> BetaDPOOutput:
        """beta-DPO loss of this worker's logits `h_local` (1-D, with gradient).

        `gather` all-gathers a 1-D detached tensor across the data-parallel workers in rank order (equal
        sizes per worker); None means a single process. Every worker must call with the same `steps` state.
        """
        if h_local.dim() != 1:
            raise ValueError(f"h_local must be 1-D, got shape {tuple(h_local.shape)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        n_local = h_local.numel()
        gathered = h_local.detach() if gather is None else gather(h_local.detach())
        values = gathered.detach().flatten().to("cpu", torch.float64)
        n = values.numel()
        if n == 0:
            raise ValueError("beta-DPO needs at least one sample")
        if n != n_local * world_size:
            raise ValueError(f"gather returned {n} values, expected {n_local} per worker x {world_size} workers")

        if not bool(torch.isfinite(values).all()):
            return self._broken_batch(h_local)
        if training:
            mean = float(values.mean())
            std = float(values.std(correction=1)) if n > 1 else 0.0
            m = self.momentum
            self.m0 = m * self.m0 + (1.0 - m) * mean
            self.sigma = m * self.sigma + (1.0 - m) * std
            self.steps += 1

        kept = self.select(values)
        k = int(kept.sum())
        beta = self.batch_beta(float(values[kept].mean()))

        local_kept = kept[rank * n_local : (rank + 1) * n_local].to(h_local.device)
        per_sample = _PAIR_LOSSES[self.loss_type](h_local, beta)
        n_kept_local = int(local_kept.sum())
        if n_kept_local == 0:
            loss = h_local.sum() * 0
        else:
            denom = float(n_kept_local) if self.normalization == "worker" else k / world_size
            loss = per_sample[local_kept].sum() / denom
        return BetaDPOOutput(
            loss=loss,
            beta=beta,
            kept_mask=local_kept,
            kept_fraction=k / n,
            m0=self.m0,
            sigma=self.sigma,
            per_sample=per_sample.detach(),
        )


# --------------------------------------------------------------------------------------------
# MORE reward modelling (ALGORITHMS.md section 2)
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(reward_chosen: Tensor, reward_rejected: Tensor) -> Tensor:
    """Per-pair Bradley-Terry loss `-log sigmoid(r_w - r_l)`."""
    return -F.logsigmoid(reward_chosen - reward_rejected)


def bradley_terry_head_grads(
    features_chosen: Sequence[Tensor], features_rejected: Sequence[Tensor], head_weight: Tensor
) -> Tensor:
    """MORE's head gradients `g_k = d mean_i L_BT / d w` for a bias-free linear head `r = w . z`, one row per source.

    With margin_i = w . (z_w,i - z_l,i): `g_k = -mean_i sigmoid(-margin_i) * (z_w,i - z_l,i)` over source k's
    pairs (features are detached; the result is K x hidden, float32 or the features' dtype).
    """
    if len(features_chosen) != len(features_rejected):
        raise ValueError("one chosen and one rejected feature block per source")
    w = head_weight.detach().flatten()
    rows = []
    for z_w, z_l in zip(features_chosen, features_rejected, strict=True):
        diff = (z_w.detach() - z_l.detach()).to(w.dtype)
        margin = diff @ w
        rows.append(-(torch.sigmoid(-margin).unsqueeze(1) * diff).mean(dim=0))
    return torch.stack(rows)


def more_loss(
    reward_chosen: Sequence[Tensor], reward_rejected: Sequence[Tensor], weights: Tensor | Sequence[float]
) -> Tensor:
    """MORE loss `L = sum_k lambda_k * mean_i BT(r_w,ki - r_l,ki)`; lambda is a constant (no gradient through it)."""
    lam = weights.detach().cpu().tolist() if isinstance(weights, Tensor) else [float(x) for x in weights]
    if not (len(reward_chosen) == len(reward_rejected) == len(lam)):
        raise ValueError("one chosen / rejected reward block and one weight per source")
    terms = [
        lam_k * bradley_terry_loss(r_w, r_l).mean()
        for lam_k, r_w, r_l in zip(lam, reward_chosen, reward_rejected, strict=True)
    ]
    return torch.stack(terms).sum()


def _min_norm_2(v1v1: float, v1v2: float, v2v2: float) -> float:
    """gamma in [0, 1] minimising ||gamma v1 + (1 - gamma) v2||^2 given the three inner products."""
    denom = v1v1 + v2v2 - 2.0 * v1v2
    if denom <= 1e-12 * max(v1v1, v2v2, 1e-300):
        return 1.0 if v1v1 <= v2v2 else 0.0
    return min(1.0, max(0.0, (v2v2 - v1v2) / denom))


def min_norm_weights(
    vectors: Tensor, max_iter: int = 1000, tol: float = 1e-5, algorithm: Literal["pairwise", "mgda"] = "pairwise"
) -> Tensor:
    """The min-norm point of the convex hull of K vectors (MGDA): `argmin_{lambda in simplex} ||sum_k lambda_k v_k||^2`.

    K == 1: [1]. K == 2: closed form `gamma = clamp(((v2 - v1) . v2) / ||v1 - v2||^2, 0, 1)`, lambda =
    [gamma, 1 - gamma] ([0.5, 0.5] when v1 == v2). K > 2: Frank-Wolfe on the Gram matrix M with exact line
    search, starting at the uniform point, at most `max_iter` iterations, stopping when the L1 change of lambda
    is below `tol`. Computed in float64; returns a float64 CPU tensor of shape (K,).

    `algorithm="mgda"` is Sener & Koltun's MGDA-UB step: go toward the vertex t minimising (M lambda)_t with the
    2-vector closed-form step between lambda and e_t. Plain Frank-Wolfe converges sublinearly and zig-zags when
    the optimum lies inside a face: after 1000 iterations it can still be ~1e-3 above the optimum, so it does
    NOT meet the doc's "agree with a generic QP solver to 1e-4". **raybpo rule**: the default
    `algorithm="pairwise"` is pairwise Frank-Wolfe (Lacoste-Julien & Jaggi 2015): the same vertex t, but mass
    moves from the support vertex s maximising (M lambda)_s to t, with the exact step clamp((M lambda)_s -
    (M lambda)_t) / ||v_s - v_t||^2, 0, lambda_s); it converges linearly (typically < 50 iterations). It stops
    when (M lambda)_s <= (M lambda)_t (optimality) or when an unclamped step changes lambda by less than `tol`
    in L1 (a step clamped at lambda_s drops s from the support and never stops the loop).
    """
    if vectors.dim() != 2:
        raise ValueError(f"vectors must be K x D, got shape {tuple(vectors.shape)}")
    if algorithm not in ("pairwise", "mgda"):
        raise ValueError(f"algorithm must be 'pairwise' or 'mgda', got {algorithm!r}")
    k = vectors.shape[0]
    if k == 0:
        raise ValueError("need at least one vector")
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    v = vectors.detach().to(torch.float64)
    gram = (v @ v.T).cpu()
    if k == 2:
        v11, v12, v22 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
        denom = v11 + v22 - 2.0 * v12  # ||v1 - v2||^2
        degenerate = denom <= 1e-12 * max(v11, v22, 1e-300)  # v1 == v2: every point is optimal
        gamma = 0.5 if degenerate else min(1.0, max(0.0, (v22 - v12) / denom))
        return torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64)

    lam = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(max_iter):
        grad = gram @ lam  # half the gradient of lambda^T M lambda
        t = int(torch.argmin(grad))
        if algorithm == "mgda":
            gamma = _min_norm_2(float(lam @ grad), float(grad[t]), float(gram[t, t]))
            new = gamma * lam
            new[t] += 1.0 - gamma
            change = float((new - lam).abs().sum())
            lam = new
            if change < tol:
                break
            continue
        support = torch.nonzero(lam > 0).flatten()
        s = int(support[torch.argmax(grad[support])])
        gap = float(grad[s] - grad[t])
        if s == t or gap <= 0.0:
            break
        curvature = float(gram[s, s] + gram[t, t] - 2.0 * gram[s, t])  # ||v_s - v_t||^2
        cap = float(lam[s])
        step = cap if curvature <= 0.0 else min(cap, gap / curvature)
        clamped = step >= cap
        new = lam.clone()
        new[t] += step
        new[s] = 0.0 if clamped else new[s] - step
        lam = new
        if not clamped and 2.0 * step < tol:
            break
    return lam


class MoreWeighting:
    """MORE's per-micro-batch source weights lambda from the reward head's gradients.

    update(g), g the K x D head gradients (one row per source, already all-reduced over workers):

        m_k <- (1 - a) * m_k + a * g_k      (a = momentum = 0.99, the weight on the NEW gradient; m_k starts at 0)
        u_k  = m_k / ||m_k||_2              (a zero norm counts as 1)
        lambda = min_norm_weights(u)        (float64 CPU, on the simplex; use it as a constant)

    **raybpo rule**: lambda is recomputed every micro-batch from all pairs of each source, and the head
    gradients are all-reduced across workers before `update` so every worker uses the same lambda.
    """

    def __init__(self, momentum: float = 0.99):
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.m: Tensor | None = None
        self.steps = 0

    def update(self, head_grads: Tensor) -> Tensor:
        """Fold in this micro-batch's head gradients (K x D) and return lambda (K,)."""
        if head_grads.dim() != 2:
            raise ValueError(f"head_grads must be K x D, got shape {tuple(head_grads.shape)}")
        g = head_grads.detach().to(torch.float64)
        if self.m is None:
            self.m = torch.zeros_like(g)
        elif self.m.shape != g.shape:
            raise ValueError(f"head_grads shape {tuple(g.shape)} differs from the momentum's {tuple(self.m.shape)}")
        a = self.momentum
        self.m = (1.0 - a) * self.m.to(g.device) + a * g
        self.steps += 1
        norms = self.m.norm(dim=1, keepdim=True)
        norms = torch.where(norms > 0, norms, torch.ones_like(norms))
        return min_norm_weights(self.m / norms)

    def state_dict(self) -> dict[str, Any]:
        return {"m": None if self.m is None else self.m.detach().cpu().clone(), "steps": int(self.steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m = state["m"]
        self.m = None if m is None else torch.as_tensor(m, dtype=torch.float64).clone()
        self.steps = int(state.get("steps", 0))


# --------------------------------------------------------------------------------------------
# Reward-model metrics
# --------------------------------------------------------------------------------------------


def preference_accuracy(reward_margin: Tensor) -> float:
    """Fraction of pairs with `r_w - r_l > 0` (ties count as wrong)."""
    margin = reward_margin.detach().flatten()
    if margin.numel() == 0:
        raise ValueError("no pairs")
    return float((margin > 0).to(torch.float64).mean())


def expected_calibration_error(reward_margin: Tensor, n_bins: int = 10) -> float:
    """Top-label ECE of the preference probability `p = sigmoid(r_w - r_l)` with `n_bins` equal-width bins.

    Per pair: confidence `c = max(p, 1 - p)`, correct = `margin > 0` (as in `preference_accuracy`).
    Bin b covers (b / n, (b + 1) / n] (c = 0 in the first). `ECE = sum_b |b| / N * |acc_b - conf_b|`.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    margin = reward_margin.detach().flatten().to("cpu", torch.float64)
    n = margin.numel()
    if n == 0:
        raise ValueError("no pairs")
    p = torch.sigmoid(margin)
    conf = torch.maximum(p, 1.0 - p)
    correct = (margin > 0).to(torch.float64)
    upper = torch.tensor([(b + 1) / n_bins for b in range(n_bins)], dtype=torch.float64)
    bins = torch.searchsorted(upper, conf, right=False).clamp_(max=n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count:
            ece += count / n * abs(float(correct[in_bin].mean()) - float(conf[in_bin].mean()))
    return ece
