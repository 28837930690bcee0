"""GenMD4: with the exact posterior the bound's mean equals the entropy for a non-uniform w (and the MD4
weighting fails that check); the REINFORCE leave-one-out surrogate gradient w.r.t. w is unbiased."""
import itertools
import math

import numpy as np
import torch

from model.diffusion import (GenMD4Schedule, genmd4_loss_from_logits, genmd4_reconstruction_from_logits,
                             token_nll_from_logits)
from model.diffusion.oracle import JointOracle
from model.objectives import GenMD4Objective, logits_model
from oracle_mc import mc_bound

N, V = 3, 4
MASK = V


def make_schedule(eps=1e-6):
    s = GenMD4Schedule(V, eps=eps, t1=1e-3)
    with torch.no_grad():
        w = torch.tensor([0.8, 1.0, 1.6, 1.3], dtype=torch.float64)
        s.raw.copy_(torch.log(torch.expm1(w)))                         # softplus^-1
    return s.double()


def test_init_is_w_one_and_saved_with_the_module():
    s = GenMD4Schedule(7)
    torch.testing.assert_close(s.w, torch.ones(7))
    assert "raw" in s.state_dict()
    # with w = 1 the loss is MD4 linear: -(1/t) log mu_i on masked positions, times (1 - t1)
    logits, x0 = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    masked, t = torch.rand(2, 5) < 0.5, torch.tensor([0.3, 0.7])
    md4 = (token_nll_from_logits(logits, x0) * masked).sum(1) / t * (1 - s.t1)
    torch.testing.assert_close(genmd4_loss_from_logits(logits, x0, masked, t, s.w, s.t1), md4.float())


def rows(oracle):
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))
    S, M = oracle.states.shape[0], len(masks)
    return oracle.states.repeat_interleave(M, 0), masks.repeat(S, 1), oracle.probs.repeat_interleave(M)


def mask_probability(sched, x0, masked, t):
    """q(mask pattern | x0, t) for rows [R, N] at scalar t."""
    return torch.exp(sched.log_q(x0, masked, torch.full((len(x0),), t, dtype=torch.float64)))


def exact_bound(oracle, sched, md4_weighting=False):
    x0, masked, px = rows(oracle)
    den = oracle.genmd4_denoiser(MASK, sched.w, sched.eps)
    # t in [t1, 1]: log-spaced panels (the integrand behaves like t^(w-1) near t1)
    xg, wg = np.polynomial.legendre.leggauss(16)
    edges = np.geomspace(sched.t1, 1.0, 25)
    total = 0.0
    with torch.no_grad():
        for e0, e1 in zip(edges[:-1], edges[1:]):
            for xi, wi in zip((e1 - e0) / 2 * xg + (e1 + e0) / 2, (e1 - e0) / 2 * wg):
                t = torch.full((len(x0),), float(xi), dtype=torch.float64)
                xt = torch.where(masked, torch.full_like(x0, MASK), x0)
                logits = den(xt, t)
                if md4_weighting:   # wrong: MD4's -(1/t) log mu_i ignores the value-dependent rates
                    L = (token_nll_from_logits(logits, x0).double() * masked).sum(1) / t * (1 - sched.t1)
                else:
                    L = genmd4_loss_from_logits(logits, x0, masked, t, sched.w, sched.t1).double()
                # the estimator samples t uniformly on [t1, 1]: density 1 / (1 - t1)
                total += wi / (1 - sched.t1) * float((px * mask_probability(sched, x0, masked, float(xi)) * L).sum())
        t1 = torch.full((len(x0),), sched.t1, dtype=torch.float64)
        xr = torch.where(masked, torch.full_like(x0, MASK), x0)
        rec = genmd4_reconstruction_from_logits(den(xr, t1), x0, masked).double()
        total += float((px * mask_probability(sched, x0, masked, sched.t1) * rec).sum())
    return total


def test_genmd4_bound_with_exact_posterior_equals_entropy():
    oracle = JointOracle.random(N, V, seed=7)
    sched = make_schedule()
    H = oracle.entropy()
    bound = exact_bound(oracle, sched)
    assert abs(bound - H) < 2e-4, (bound, H)
    wrong = exact_bound(oracle, sched, md4_weighting=True)
    assert abs(wrong - H) > 0.02, (wrong, H)


def test_monte_carlo_genmd4_elbo_matches_entropy():
    """The one ELBO loop (model.objectives.heldout_nelbo) with GenMD4's objective and the exact posterior."""
    oracle = JointOracle.random(N, V, seed=7)
    sched = make_schedule()
    objective = GenMD4Objective(V, lambda: sched)
    objective.time_conditioned = True
    mean, se = mc_bound(oracle, objective, oracle.genmd4_denoiser(MASK, sched.w, sched.eps), draws=4, reps=32)
    assert abs(mean - oracle.entropy()) < 4 * se + 2e-3, (mean, oracle.entropy(), se)


def test_reinforce_loo_surrogate_gradient_is_unbiased():
    """The training objective's surrogate (two draws at t, each with its reconstruction draw at t1)."""
    torch.manual_seed(0)
    oracle = JointOracle.random(N, V, seed=7)
    sched = make_schedule(eps=1e-4)
    den = oracle.genmd4_denoiser(MASK, torch.ones(V), sched.eps)       # any fixed denoiser
    objective = GenMD4Objective(V, lambda: sched)
    objective.time_conditioned = True
    model = logits_model(den)
    x0 = torch.tensor([[0, 2, 3]])
    t = 0.4
    # exact: d/dw of sum over all 2^N masks of q(mask | x0, t; w) L(mask; w), plus the reconstruction at t1
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))
    X = x0.expand(len(masks), N)
    Xt = torch.where(masks, torch.full_like(X, MASK), X)
    tt, t1 = (torch.full((len(masks),), v, dtype=torch.float64) for v in (t, sched.t1))
    exact_obj = (torch.exp(sched.log_q(X, masks, tt))
                 * genmd4_loss_from_logits(den(Xt, tt).detach(), X, masks, tt, sched.w, sched.t1)).sum()
    exact_obj = exact_obj + (torch.exp(sched.log_q(X, masks, t1))
                             * genmd4_reconstruction_from_logits(den(Xt, t1).detach(), X, masks)).sum()
    (exact,) = torch.autograd.grad(exact_obj, sched.raw)

    def chunk_grad(B, pathwise_only=False):
        X = x0.expand(B, N)
        u = torch.full((B,), (t - sched.t1) / (1 - sched.t1), dtype=torch.float64)
        if pathwise_only:     # one draw, no score-function term: only d L / d w at fixed masks (biased)
            surrogate, _ = objective.loss(model, X, u, torch.rand(B, 2, N, dtype=torch.float64), train=False)
        else:
            surrogate, _ = objective.loss(model, X, u, torch.rand(B, 4, N, dtype=torch.float64))
        (g,) = torch.autograd.grad(surrogate.mean(), sched.raw)
        return g

    grads = torch.stack([chunk_grad(4000) for _ in range(25)])
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    assert torch.all((mean - exact).abs() < 4 * se + 1e-6), (mean, exact, se)
    biased = torch.stack([chunk_grad(4000, pathwise_only=True) for _ in range(5)]).mean(0)
    assert torch.any((biased - exact).abs() > 10 * se), (biased, exact)
