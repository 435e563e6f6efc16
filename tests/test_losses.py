"""raybpo.losses: DPO / IPO, beta-DPO (ALGORITHMS.md section 1), MORE (section 2), calibration metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from raybpo.losses import (
    BetaDPO,
    MoreWeighting,
    beta_dpo_generator,
    bradley_terry_head_grads,
    bradley_terry_loss,
    dpo_logits,
    dpo_loss,
    expected_calibration_error,
    ipo_loss,
    min_norm_weights,
    more_loss,
    preference_accuracy,
)

# --------------------------------------------------------------------------------------------
# DPO / IPO by hand
# --------------------------------------------------------------------------------------------


def test_dpo_logits_by_hand():
    # (pc - rc) - (pr - rr) = (-10 - -11) - (-12 - -11.5) = 1 - (-0.5) = 1.5
    # (pc - rc) - (pr - rr) = (-3 - -1) - (-4 - -4) = -2 - 0 = -2
    h = dpo_logits(
        torch.tensor([-10.0, -3.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -1.0]),
        torch.tensor([-11.5, -4.0]),
    )
    torch.testing.assert_close(h, torch.tensor([1.5, -2.0]))


def test_dpo_loss_by_hand():
    h = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    # h=2, beta=0.1:  -log sigmoid(0.2)  = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    # h=-1, beta=0.1: -log sigmoid(-0.1) = log(1 + e^0.1)  = log(2.1051709181) = 0.7443966600
    # h=0:            -log sigmoid(0)    = log 2                               = 0.6931471806
    expected = torch.tensor([0.5981388694, 0.7443966600, 0.6931471806], dtype=torch.float64)
    torch.testing.assert_close(dpo_loss(h, 0.1), expected, atol=1e-9, rtol=0)
    # h=-1, beta=0.5: -log sigmoid(-0.5) = log(1 + e^0.5) = log(2.6487212707) = 0.9740769842
    torch.testing.assert_close(
        dpo_loss(torch.tensor([-1.0], dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)),
        torch.tensor([0.9740769842], dtype=torch.float64),
        atol=1e-9,
        rtol=0,
    )


def test_ipo_loss_by_hand():
    # beta=0.1:  1/(2*0.1)  = 5: h=2 -> (2-5)^2 = 9;  h=5 -> 0;  h=-1 -> (-6)^2 = 36
    torch.testing.assert_close(ipo_loss(torch.tensor([2.0, 5.0, -1.0]), 0.1), torch.tensor([9.0, 0.0, 36.0]))
    # beta=0.25: 1/(2*0.25) = 2: h=7 -> 25
    torch.testing.assert_close(ipo_loss(torch.tensor([7.0]), 0.25), torch.tensor([25.0]))


def test_bradley_terry_loss_by_hand():
    # r_w - r_l = 0.2 -> log(1 + e^-0.2) = 0.5981388694;  = -1 -> log(1 + e) = 1.3132616875
    loss = bradley_terry_loss(
        torch.tensor([1.2, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    torch.testing.assert_close(loss, torch.tensor([0.5981388694, 1.3132616875], dtype=torch.float64), atol=1e-9, rtol=0)


# --------------------------------------------------------------------------------------------
# beta-DPO
# --------------------------------------------------------------------------------------------


def _policy_logits(n: int = 16, d: int = 5, seed: int = 0, dtype=torch.float32):
    """h = X @ theta: a stand-in for the policy, so gradients w.r.t. theta can be compared."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    theta = (0.3 * torch.randn(d, generator=g, dtype=dtype)).requires_grad_(True)
    return x, theta


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_beta_dpo_alpha0_rho1_is_plain_dpo(loss_type):
    x, theta = _policy_logits()
    plain_fn = dpo_loss if loss_type == "dpo" else ipo_loss
    beta_dpo = BetaDPO(beta0=0.1, alpha=0.0, rho=1.0, loss_type=loss_type)
    for step in range(3):
        h = x @ theta + step
        out = beta_dpo(h)
        (grad_beta,) = torch.autograd.grad(out.loss, theta)
        plain = plain_fn(x @ theta + step, 0.1).mean()
        (grad_plain,) = torch.autograd.grad(plain, theta)
        assert out.beta == 0.1
        assert out.kept_mask.all() and out.kept_fraction == 1.0
        torch.testing.assert_close(out.loss, plain, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad_beta, grad_plain, atol=1e-6, rtol=1e-6)


def _transcribed_beta_dpo(batches, beta0, alpha, rho, m, eps, seed, loss_type):
    """ALGORITHMS.md section 1, line by line, in plain python / numpy (float64)."""
    m0, sigma = 0.0, 0.0
    records = []
    for step, h in enumerate(batches, start=1):  # step = number of training updates, this one included
        a = np.asarray(h, dtype=np.float64)  # 1. A = h detached (single worker: already "gathered")
        n = a.size
        m0 = m * m0 + (1 - m) * a.mean()  # 2. running statistics, updated BEFORE the loss
        sigma = m * sigma + (1 - m) * (a.std(ddof=1) if n > 1 else 0.0)
        w = np.exp(-0.5 * ((a - m0) / (sigma + eps)) ** 2)  # 3. filtering weights
        k = max(1, math.floor(n * rho + 1e-9))  # 4. k = floor(N * rho), drawn without replacement ~ w
        if k == n:
            kept = np.arange(n)
        else:
            assert (w > 0).sum() >= k, "the test batches must exercise the plain multinomial draw"
            g = beta_dpo_generator(seed, step)
            kept = np.sort(torch.multinomial(torch.from_numpy(w), k, replacement=False, generator=g).numpy())
        beta = max(1e-3, beta0 * (1 + alpha * (a[kept].mean() - m0)))  # 5. batch beta
        # 6. mean over the kept samples of -log sigmoid(beta h) = log(1 + e^(-beta h)), or of (h - 1/(2 beta))^2
        per_sample = np.logaddexp(0.0, -beta * a) if loss_type == "dpo" else (a - 1 / (2 * beta)) ** 2
        records.append(
            {"m0": m0, "sigma": sigma, "beta": beta, "kept": kept, "loss": per_sample[kept].mean(), "all": per_sample}
        )
    return records


def _margin_batches(n_batches=6, n=20, seed=1):
    rng = np.random.default_rng(seed)
    # drifting means and spreads, as the DPO logits of a training run do
    return [rng.normal(0.3 * t, 0.5 + 0.2 * t, size=n) for t in range(n_batches)]


@pytest.mark.parametrize(
    ("loss_type", "alpha", "rho", "seed"), [("dpo", 0.6, 0.8, 0), ("dpo", 1.0, 0.5, 7), ("ipo", 0.6, 0.8, 3)]
)
def test_beta_dpo_matches_transcription(loss_type, alpha, rho, seed):
    batches = _margin_batches()
    reference = _transcribed_beta_dpo(batches, 0.1, alpha, rho, 0.9, 1e-6, seed, loss_type)
    beta_dpo = BetaDPO(beta0=0.1, alpha=alpha, rho=rho, loss_type=loss_type, seed=seed)
    betas = []
    for t, (h, ref) in enumerate(zip(batches, reference, strict=True)):
        out = beta_dpo(torch.tensor(h, dtype=torch.float64))
        assert beta_dpo.steps == t + 1
        assert out.m0 == pytest.approx(ref["m0"], abs=1e-12)
        assert out.sigma == pytest.approx(ref["sigma"], abs=1e-12)
        assert out.beta == pytest.approx(ref["beta"], abs=1e-12)
        assert torch.nonzero(out.kept_mask).flatten().tolist() == ref["kept"].tolist()
        assert out.kept_fraction == len(ref["kept"]) / len(h)
        assert float(out.loss) == pytest.approx(ref["loss"], abs=1e-10)
        np.testing.assert_allclose(out.per_sample.numpy(), ref["all"], rtol=0, atol=1e-10)
        betas.append(out.beta)
    assert len(set(betas)) == len(betas) and all(b != 0.1 for b in betas)  # beta really is dynamic here


def test_beta_dpo_kept_count_and_floor():
    assert [BetaDPO(rho=r).num_kept(n) for r, n in [(0.8, 10), (0.29, 100), (0.5, 3), (0.1, 1), (1.0, 7)]] == [
        8,
        29,  # 100 * 0.29 = 28.999999999999996 in floats; the mathematical floor is 29
        1,
        1,
        7,
    ]
    # beta floor: beta0 * (1 + alpha * (mean - M0)) <= 0 is clamped to 1e-3
    assert BetaDPO(alpha=1.0).batch_beta(-50.0) == 1e-3


def _two_worker_gather(halves):
    def gather(local):
        assert any(torch.equal(local, half) for half in halves)
        return torch.cat(halves)

    return gather


def test_beta_dpo_two_workers_keep_the_same_subset():
    batches = _margin_batches(n=16)
    single = BetaDPO(seed=5)
    workers = [BetaDPO(seed=5), BetaDPO(seed=5)]
    for h in batches:
        h = torch.tensor(h, dtype=torch.float32)
        halves = [h[:8], h[8:]]
        ref = single(h)
        outs = [w(halves[r], gather=_two_worker_gather(halves), rank=r, world_size=2) for r, w in enumerate(workers)]
        assert torch.equal(torch.cat([o.kept_mask for o in outs]), ref.kept_mask)
        assert 0 < int(ref.kept_mask.sum()) < 16
        for o in outs:
            assert (o.m0, o.sigma, o.beta, o.kept_fraction) == (ref.m0, ref.sigma, ref.beta, ref.kept_fraction)
            assert o.kept_mask.shape == (8,)
    assert workers[0].state_dict() == workers[1].state_dict() == single.state_dict()


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_beta_dpo_global_normalization_equals_one_process(loss_type):
    x, theta = _policy_logits(n=16, seed=2)
    single = BetaDPO(seed=1, loss_type=loss_type, normalization="global")
    workers = [BetaDPO(seed=1, loss_type=loss_type, normalization="global") for _ in range(2)]
    per_worker = [BetaDPO(seed=1, loss_type=loss_type, normalization="worker") for _ in range(2)]
    counts_differed = False
    for step in range(5):
        # worker 1's logits sit apart from worker 0's, so the filter keeps fewer of them
        shift = 0.4 * step + torch.cat([torch.zeros(8), torch.full((8,), 1.5)])
        h_full = x @ theta + shift
        ref = single(h_full)
        (grad_ref,) = torch.autograd.grad(ref.loss, theta)
        halves = [(x[:8] @ theta + shift[:8]).detach(), (x[8:] @ theta + shift[8:]).detach()]
        grads, grads_worker_norm, counts = [], [], []
        for r in range(2):
            rows = slice(8 * r, 8 * (r + 1))
            out = workers[r](x[rows] @ theta + shift[rows], gather=_two_worker_gather(halves), rank=r, world_size=2)
            grads.append(torch.autograd.grad(out.loss, theta)[0])
            counts.append(int(out.kept_mask.sum()))
            out_w = per_worker[r](x[rows] @ theta + shift[rows], _two_worker_gather(halves), r, 2)
            grads_worker_norm.append(torch.autograd.grad(out_w.loss, theta)[0])
        # DDP averages the workers' gradients
        torch.testing.assert_close((grads[0] + grads[1]) / 2, grad_ref, atol=1e-6, rtol=1e-6)
        if counts[0] != counts[1]:
            counts_differed = True
            # the doc's per-worker normalisation weights the workers' samples differently: not the one-process gradient
            assert not torch.allclose((grads_worker_norm[0] + grads_worker_norm[1]) / 2, grad_ref, atol=1e-6)
    assert counts_differed


def test_beta_dpo_eval_does_not_update_state():
    beta_dpo = BetaDPO(seed=2)
    batches = _margin_batches()
    for h in batches[:3]:
        beta_dpo(torch.tensor(h))
    state = beta_dpo.state_dict()
    out = beta_dpo(torch.tensor(batches[4] * 10.0), training=False)
    assert beta_dpo.state_dict() == state
    assert (out.m0, out.sigma) == (state["m0"], state["sigma"])
    assert math.isfinite(float(out.loss))


def test_beta_dpo_state_dict_round_trip_continues_identically():
    batches = _margin_batches(n_batches=7)
    a = BetaDPO(seed=11, alpha=0.8, rho=0.6)
    for h in batches[:3]:
        a(torch.tensor(h))
    b = BetaDPO(seed=11, alpha=0.8, rho=0.6)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and a.state_dict()["steps"] == 3
    for h in batches[3:]:
        oa, ob = a(torch.tensor(h)), b(torch.tensor(h))
        assert torch.equal(oa.kept_mask, ob.kept_mask)
        assert (oa.beta, oa.m0, oa.sigma) == (ob.beta, ob.m0, ob.sigma)
        assert torch.equal(oa.loss, ob.loss)
    # a fresh object (state not loaded) is at a different point of the run
    c = BetaDPO(seed=11, alpha=0.8, rho=0.6)
    assert c(torch.tensor(batches[3])).m0 != pytest.approx(b.state_dict()["m0"])


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
def test_beta_dpo_a_batch_with_a_non_finite_logit_is_skipped_whole(bad):
    """The batch's loss is NaN (the loop skips the step) and M0, sigma and steps stay as they were: the run goes
    on exactly as one that never saw the batch. (Updated first, M0 became -inf and every later beta inf.)"""
    batches = _margin_batches(n_batches=5)
    broken = torch.tensor(batches[2])
    broken[3] = bad
    seen, never = BetaDPO(seed=3), BetaDPO(seed=3)
    for i, h in enumerate(batches):
        if i == 2:
            out = seen(broken.clone().requires_grad_())
            assert math.isnan(float(out.loss)) and not out.kept_mask.any()
            assert seen.state_dict() == never.state_dict()
            continue
        a, b = seen(torch.tensor(h)), never(torch.tensor(h))
        assert torch.equal(a.loss, b.loss) and (a.beta, a.m0, a.sigma) == (b.beta, b.m0, b.sigma)
        assert math.isfinite(a.beta) and math.isfinite(a.m0)


def test_beta_dpo_step0_pi_equals_ref_is_finite():
    beta_dpo = BetaDPO()
    h = torch.zeros(10, requires_grad=True)
    out = beta_dpo(h)
    # M0 = sigma = 0, so (A - M0) / (sigma + eps) = 0 / 1e-6 = 0: every weight is 1 (no 0 / 0)
    torch.testing.assert_close(beta_dpo.weights(h.detach()), torch.ones(10, dtype=torch.float64))
    # -log sigmoid(beta * 0) = log 2 for each kept sample, beta = beta0 * (1 + 0.6 * (0 - 0)) = 0.1
    assert out.beta == pytest.approx(0.1, abs=1e-15)
    assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    out.loss.backward()
    assert torch.isfinite(h.grad).all()
    assert int(out.kept_mask.sum()) == 8


def test_beta_dpo_single_sample_batch():
    # N = 1: the unbiased std is undefined; it counts as 0, so sigma stays 0 and nothing is NaN
    beta_dpo = BetaDPO()
    out = beta_dpo(torch.tensor([2.0]))
    assert out.sigma == 0.0 and out.m0 == pytest.approx(0.2)
    assert bool(out.kept_mask.all()) and out.kept_fraction == 1.0  # k = max(1, floor(0.8)) = 1
    # beta = 0.1 * (1 + 0.6 * (2 - 0.2)) = 0.208; loss = log(1 + e^(-0.416))
    assert out.beta == pytest.approx(0.208)
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.416)))


def test_beta_dpo_does_not_touch_the_global_rng():
    h = torch.tensor(_margin_batches()[0], dtype=torch.float32)
    torch.manual_seed(1)
    rng_state = torch.get_rng_state()
    kept_1 = BetaDPO(seed=4)(h).kept_mask
    assert torch.equal(torch.get_rng_state(), rng_state)
    torch.manual_seed(2)
    kept_2 = BetaDPO(seed=4)(h).kept_mask
    assert torch.equal(kept_1, kept_2)
    # the draw does depend on the beta-DPO seed: with near-uniform weights (sigma = 100) seeds differ
    subsets = set()
    for seed in range(10):
        beta_dpo = BetaDPO(seed=seed)
        beta_dpo.load_state_dict({"m0": 0.0, "sigma": 100.0, "steps": 3})
        subsets.add(tuple(beta_dpo(h, training=False).kept_mask.tolist()))
    assert len(subsets) > 1


def test_beta_dpo_zero_weight_fallbacks():
    beta_dpo = BetaDPO(rho=0.8, seed=0)  # N = 5 -> k = 4
    beta_dpo.load_state_dict({"m0": 0.0, "sigma": 1.0, "steps": 0})
    # w = exp(-0.5 A^2): positive for the first three, exp(-5e5) = 0 for the outliers: those three are kept and
    # one of the two outliers fills the fourth place
    out = beta_dpo(torch.tensor([0.0, 0.5, -0.5, 1e3, 2e3]), training=False)
    assert out.kept_mask[:3].all() and int(out.kept_mask[3:].sum()) == 1
    # every weight 0: uniform draw of 4
    out = beta_dpo(torch.tensor([1e3, 2e3, 3e3, 4e3, 5e3]), training=False)
    assert int(out.kept_mask.sum()) == 4 and math.isfinite(float(out.loss))


def test_beta_dpo_no_local_sample_kept_still_has_a_graph():
    beta_dpo = BetaDPO(rho=0.5, seed=0)
    beta_dpo.load_state_dict({"m0": 0.0, "sigma": 1.0, "steps": 0})
    # global batch [0, 0, 1e3, 1e3]: k = 2, only worker 0's two samples have positive weight
    halves = [torch.tensor([0.0, 0.0]), torch.tensor([1e3, 1e3])]
    h1 = halves[1].clone().requires_grad_(True)
    out = beta_dpo(h1, gather=_two_worker_gather(halves), rank=1, world_size=2, training=False)
    assert not out.kept_mask.any()
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and torch.equal(h1.grad, torch.zeros(2))


def test_beta_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError):
        BetaDPO(rho=0.0)
    with pytest.raises(ValueError):
        BetaDPO(loss_type="kto")
    with pytest.raises(ValueError):
        BetaDPO()(torch.zeros(4), gather=lambda t: t, rank=0, world_size=2)


# --------------------------------------------------------------------------------------------
# MORE: min-norm weights
# --------------------------------------------------------------------------------------------


def _qp_min_norm(vectors: np.ndarray) -> float:
    gram = vectors @ vectors.T
    k = len(gram)
    result = minimize(
        lambda lam: lam @ gram @ lam,
        np.full(k, 1.0 / k),
        jac=lambda lam: 2 * gram @ lam,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda lam: lam.sum() - 1.0}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert result.success
    return float(result.fun)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("normalise", [False, True])
def test_min_norm_weights_agrees_with_slsqp(k, normalise):
    for seed in range(6):
        rng = np.random.default_rng(100 * k + seed)
        v = rng.normal(size=(k, int(rng.integers(8, 51))))
        if seed % 2:
            v += rng.normal(size=v.shape[1])  # correlated sources, as gradients usually are
        if normalise:
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        lam = min_norm_weights(torch.from_numpy(v))
        assert lam.dtype == torch.float64 and lam.shape == (k,)
        assert float(lam.min()) >= 0.0 and float(lam.sum()) == pytest.approx(1.0, abs=1e-12)
        lam_np = lam.numpy()
        objective = float(lam_np @ (v @ v.T) @ lam_np)
        assert objective == pytest.approx(_qp_min_norm(v), abs=1e-4)
        # float32 input gives the same answer (computed in float64 inside)
        lam32 = min_norm_weights(torch.from_numpy(v).float())
        assert float(lam32.numpy() @ (v @ v.T) @ lam32.numpy()) == pytest.approx(objective, abs=1e-5)


def test_min_norm_weights_plain_mgda_step_is_on_the_simplex_and_not_better_than_pairwise():
    rng = np.random.default_rng(0)
    for _ in range(5):
        v = rng.normal(size=(5, 20))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        gram = v @ v.T
        plain = min_norm_weights(torch.from_numpy(v), algorithm="mgda").numpy()
        pairwise = min_norm_weights(torch.from_numpy(v)).numpy()
        assert plain.min() >= 0 and plain.sum() == pytest.approx(1.0, abs=1e-12)
        best = _qp_min_norm(v)
        assert plain @ gram @ plain >= pairwise @ gram @ pairwise - 1e-12
        assert plain @ gram @ plain == pytest.approx(best, abs=1e-2)


def test_min_norm_weights_scale_invariant():
    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.normal(size=(4, 12)))
    base, exact = min_norm_weights(v), min_norm_weights(v, tol=1e-13)
    for c in (1e-3, 7.5, 1e3):
        # lambda is resolved to the solver's tolerance (L1 change 1e-5); with a tight tolerance, to rounding
        torch.testing.assert_close(min_norm_weights(c * v), base, atol=1e-5, rtol=0)
        torch.testing.assert_close(min_norm_weights(c * v, tol=1e-13), exact, atol=1e-9, rtol=0)


def test_min_norm_weights_small_cases_by_hand():
    f64 = torch.float64
    torch.testing.assert_close(min_norm_weights(torch.tensor([[3.0, 4.0]])), torch.tensor([1.0], dtype=f64))
    # orthogonal unit vectors: the midpoint (0.5, 0.5) has norm^2 0.5, the minimum on the segment
    torch.testing.assert_close(
        min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), torch.tensor([0.5, 0.5], dtype=f64)
    )
    # v1 = [1,0], v2 = [2,0]: gamma = ((v2 - v1) . v2) / ||v1 - v2||^2 = 2 / 1 -> clamp 1: all weight on v1
    torch.testing.assert_close(
        min_norm_weights(torch.tensor([[1.0, 0.0], [2.0, 0.0]])), torch.tensor([1.0, 0.0], dtype=f64)
    )
    # v1 = [1,0], v2 = [-0.5,1]: gamma = ([-1.5,1] . [-0.5,1]) / (1.5^2 + 1) = 1.75 / 3.25 = 7/13
    torch.testing.assert_close(
        min_norm_weights(torch.tensor([[1.0, 0.0], [-0.5, 1.0]])), torch.tensor([7 / 13, 6 / 13], dtype=f64)
    )
    # v1 == v2: every point is optimal, the symmetric one is returned
    torch.testing.assert_close(
        min_norm_weights(torch.tensor([[1.0, 2.0], [1.0, 2.0]])), torch.tensor([0.5, 0.5], dtype=f64)
    )
    # K = 3, [1,0], [0,1], [1,1]: the min-norm point of the hull is (0.5, 0.5) = midpoint of the first two
    lam = min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(lam, torch.tensor([0.5, 0.5, 0.0], dtype=f64), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# MORE: momentum weighting and the loss
# --------------------------------------------------------------------------------------------


def test_more_weighting_momentum_follows_the_doc():
    rng = np.random.default_rng(0)
    g1, g2 = torch.from_numpy(rng.normal(size=(3, 6))), torch.from_numpy(rng.normal(size=(3, 6)))
    weighting = MoreWeighting(momentum=0.99)
    assert weighting.m is None
    weighting.update(g1)
    torch.testing.assert_close(weighting.state_dict()["m"], 0.99 * g1)  # m = (1 - a) * 0 + a * g1
    lam = weighting.update(g2)
    torch.testing.assert_close(weighting.state_dict()["m"], 0.01 * 0.99 * g1 + 0.99 * g2)
    m = 0.01 * 0.99 * g1 + 0.99 * g2
    torch.testing.assert_close(lam, min_norm_weights(m / m.norm(dim=1, keepdim=True)))


def test_more_weighting_is_invariant_to_rescaling_each_source():
    rng = np.random.default_rng(1)
    scales = torch.tensor([[0.01], [3.0], [250.0], [1.0]], dtype=torch.float64)
    a, b = MoreWeighting(), MoreWeighting()
    for _ in range(4):
        g = torch.from_numpy(rng.normal(size=(4, 10)))
        lam = a.update(g)
        torch.testing.assert_close(b.update(scales * g), lam, atol=1e-5, rtol=0)
        # without the normalisation the rescaled rows would give another lambda
        assert (min_norm_weights(scales * g) - lam).abs().max() > 0.1


def test_more_weighting_zero_gradient_counts_as_norm_one():
    # u = [[1,0], [0,1], [0,0]]: the zero vector is in the hull, so it gets (all but the solver's tolerance of)
    # the weight, and nothing is NaN
    lam = MoreWeighting().update(torch.tensor([[2.0, 0.0], [0.0, 5.0], [0.0, 0.0]]))
    assert torch.isfinite(lam).all() and float(lam.sum()) == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(lam, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_more_weighting_state_dict_round_trip():
    rng = np.random.default_rng(2)
    grads = [torch.from_numpy(rng.normal(size=(3, 5))) for _ in range(5)]
    a = MoreWeighting(momentum=0.5)
    for g in grads[:2]:
        a.update(g)
    b = MoreWeighting(momentum=0.5)
    b.load_state_dict(a.state_dict())
    for g in grads[2:]:
        torch.testing.assert_close(a.update(g), b.update(g), atol=0, rtol=0)
    fresh = MoreWeighting(momentum=0.5)
    assert not torch.allclose(fresh.update(grads[2]), MoreWeighting(momentum=0.5).update(grads[1]))


def test_more_loss_is_the_lambda_weighted_sum_of_bradley_terry_means():
    rng = np.random.default_rng(4)
    hidden, sizes = 6, [3, 5, 2]
    head = torch.from_numpy(rng.normal(size=hidden)).requires_grad_(True)
    z_w = [torch.from_numpy(rng.normal(size=(n, hidden))) for n in sizes]
    z_l = [torch.from_numpy(rng.normal(size=(n, hidden))) for n in sizes]

    # head gradients of each source's mean BT loss, in closed form, against autograd
    grads = bradley_terry_head_grads(z_w, z_l, head)
    for k in range(3):
        (auto,) = torch.autograd.grad(bradley_terry_loss(z_w[k] @ head, z_l[k] @ head).mean(), head)
        torch.testing.assert_close(grads[k], auto)

    lam = MoreWeighting().update(grads)
    r_w = [z @ head for z in z_w]
    r_l = [z @ head for z in z_l]
    loss = more_loss(r_w, r_l, lam)

    # by hand: sum_k lambda_k * mean_i log(1 + exp(-(r_w - r_l)))
    expected = 0.0
    for k in range(3):
        margins = (r_w[k] - r_l[k]).detach().tolist()
        expected += float(lam[k]) * sum(math.log1p(math.exp(-d)) for d in margins) / len(margins)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-12)

    # lambda is a constant: the head gradient of L is the lambda-weighted sum of the sources' head gradients
    (grad,) = torch.autograd.grad(loss, head)
    torch.testing.assert_close(grad, (lam.unsqueeze(1) * grads).sum(0))
    assert float(lam.min()) >= 0 and float(lam.sum()) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Calibration and accuracy
# --------------------------------------------------------------------------------------------


def _margins(probabilities):
    p = torch.tensor(probabilities, dtype=torch.float64)
    return torch.log(p / (1 - p))  # sigmoid(margin) = p


def test_ece_and_accuracy_by_hand():
    # p = sigmoid(margin)         0.95 0.93 0.15 0.85 0.65 0.35 0.55 0.45 0.50 0.75
    # confidence max(p, 1 - p)    0.95 0.93 0.85 0.85 0.65 0.65 0.55 0.55 0.50 0.75
    # correct (margin > 0)         1    1    0    1    1    0    1    0    0    1      accuracy 6/10
    # bins of width 0.1, (i/10, (i+1)/10]:
    #   (0.9, 1.0]: 0.95, 0.93  acc 1    conf 0.94  -> 2/10 * 0.06 = 0.012
    #   (0.8, 0.9]: 0.85, 0.85  acc 0.5  conf 0.85  -> 2/10 * 0.35 = 0.070
    #   (0.7, 0.8]: 0.75        acc 1    conf 0.75  -> 1/10 * 0.25 = 0.025
    #   (0.6, 0.7]: 0.65, 0.65  acc 0.5  conf 0.65  -> 2/10 * 0.15 = 0.030
    #   (0.5, 0.6]: 0.55, 0.55  acc 0.5  conf 0.55  -> 2/10 * 0.05 = 0.010
    #   (0.4, 0.5]: 0.50        acc 0    conf 0.50  -> 1/10 * 0.50 = 0.050
    # ECE = 0.012 + 0.070 + 0.025 + 0.030 + 0.010 + 0.050 = 0.197
    margins = _margins([0.95, 0.93, 0.15, 0.85, 0.65, 0.35, 0.55, 0.45, 0.50, 0.75])
    assert margins[8] == 0.0
    assert preference_accuracy(margins) == pytest.approx(0.6)
    assert expected_calibration_error(margins) == pytest.approx(0.197, abs=1e-9)
    # 2 bins, (0, 0.5] and (0.5, 1]: the tie alone in the first (1/10 * 0.5 = 0.05); the other nine
    # have acc 6/9, conf 6.73/9 -> 9/10 * 0.73/9 = 0.073; ECE = 0.123
    assert expected_calibration_error(margins, n_bins=2) == pytest.approx(0.123, abs=1e-9)


def test_ece_perfectly_calibrated_and_bin_edges():
    # all margins 0: confidence 0.5 (the right edge of bin (0.4, 0.5]), nobody correct: ECE = |0 - 0.5|
    assert expected_calibration_error(torch.zeros(4)) == pytest.approx(0.5)
    # confidence 0.75 for four pairs, three correct: acc 0.75 = conf, ECE 0
    assert expected_calibration_error(_margins([0.75, 0.75, 0.75, 0.25])) == pytest.approx(0.0, abs=1e-12)
    # a confidence exactly on an edge belongs to the bin it closes: c = 0.5 (margin 0, wrong) is in (0.4, 0.5],
    # not with c = 0.55 (correct) in (0.5, 0.6]: ECE = 1/2 * |0 - 0.5| + 1/2 * |1 - 0.55| = 0.475
    # (were they in one bin: acc 0.5, conf 0.525 -> 0.025)
    assert expected_calibration_error(_margins([0.5, 0.55])) == pytest.approx(0.475, abs=1e-9)
