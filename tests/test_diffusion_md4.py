"""MD4 bounds with the exact-conditional oracle: the mean of each estimator equals the entropy.

Small known joint: N = 3 positions, V = 5 values (125 sequences). Means over masks are computed exactly by
enumerating all 2^N masks, the integral over t by composite Gauss-Legendre quadrature through the code's
own estimator (continuous_loss_from_nll with the schedule's weight), so the checks are deterministic.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from model.diffusion import (continuous_loss_from_nll, discrete_loss_from_nll, make_schedule,
                             reconstruction_nats, token_nll_from_logits, bits_per_token, perplexity)
from model.diffusion.oracle import JointOracle
from model.objectives import MD4Objective
from oracle_mc import mc_bound

N, V = 3, 5
MASK = V
SCHEDULES = [("linear", {}), ("polynomial", {"k": 2.0}), ("cosine", {}), ("geometric", {"bmin": 1e-5, "bmax": 20.0})]


def gauss_legendre(a: float, b: float, panels: int = 40, order: int = 20):
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(a, b, panels + 1)
    nodes = np.concatenate([(e1 - e0) / 2 * x + (e1 + e0) / 2 for e0, e1 in zip(edges[:-1], edges[1:])])
    weights = np.concatenate([(e1 - e0) / 2 * w for e0, e1 in zip(edges[:-1], edges[1:])])
    return torch.tensor(nodes), torch.tensor(weights)


def all_rows(oracle: JointOracle):
    """Every (x0, mask) pair: x0 [R, N], masked [R, N], p(x0) [R], exact token NLL [R, N]."""
    masks = torch.tensor(list(itertools.product([False, True], repeat=N)))              # [2^N, N]
    S = oracle.states.shape[0]
    x0 = oracle.states.repeat_interleave(len(masks), 0)
    masked = masks.repeat(S, 1)
    px = oracle.probs.repeat_interleave(len(masks))
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    nll = token_nll_from_logits(oracle.md4_denoiser(MASK)(xt), x0).double()
    return x0, masked, px, nll


def mask_prob(masked: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """P(mask pattern | alpha): rows [R, N], alpha [Q] -> [Q, R]."""
    k = masked.sum(1).double()
    return (1 - alpha[:, None]) ** k * alpha[:, None] ** (N - k)


def exact_continuous_mean(oracle, schedule, weight_fn=None):
    x0, masked, px, nll = all_rows(oracle)
    t, wq = gauss_legendre(0.0, 1.0)
    R, Q = len(px), len(t)
    tt = t.repeat_interleave(R)
    if weight_fn is None:
        loss = continuous_loss_from_nll(nll.repeat(Q, 1), masked.repeat(Q, 1), tt, schedule, V).double()
    else:                                   # a deliberately different weighting, same structure
        loss = weight_fn(tt) * (nll.repeat(Q, 1) * masked.repeat(Q, 1)).sum(1) + reconstruction_nats(N, V, schedule)
    loss = loss.view(Q, R)
    per_t = (mask_prob(masked, schedule.alpha(t)) * px[None] * loss).sum(1)
    return float((wq * per_t).sum())


def alpha_space_reference(oracle, a_lo, a_hi, eps):
    """The same bound computed without the schedule's weight: int_{alpha(1)}^{alpha(0)} g(a)/(1-a) da + N eps log V,
    g(a) = E over masks at level a of the summed NLL (change of variables a = alpha(t))."""
    x0, masked, px, nll = all_rows(oracle)
    a, wq = gauss_legendre(a_lo, a_hi, panels=4)
    g = (mask_prob(masked, a) * px[None] * (nll * masked).sum(1)[None]).sum(1)
    return float((wq * g / (1 - a)).sum()) + N * eps * math.log(V)


@pytest.fixture(scope="module")
def oracle():
    return JointOracle.random(N, V, seed=3)


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_continuous_bound_mean_equals_entropy_for_every_schedule(oracle, name, params):
    H = oracle.entropy()
    for eps in (1e-6, 1e-4):
        sched = make_schedule(name, eps=eps, **params)
        a_lo, a_hi = (float(a) for a in sched.alpha(torch.tensor([1.0, 0.0], dtype=torch.float64)))
        mean = exact_continuous_mean(oracle, sched)
        assert abs(mean - alpha_space_reference(oracle, a_lo, a_hi, eps)) < 1e-7, (name, eps)
        # alpha(1) > 0 and alpha(0) < 1 (the eps shift) move the bound by at most N (alpha(1) + 1 - alpha(0)) log V
        assert abs(mean - H) < N * (a_lo + 1 - a_hi) * math.log(V) + 1e-7, (name, eps, mean, H)
        if eps == 1e-6 and name != "geometric":
            assert abs(mean - H) < 1e-5


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_dropping_the_weight_fails_the_entropy_check(oracle, name, params):
    sched = make_schedule(name, eps=1e-6, **params)
    wrong = exact_continuous_mean(oracle, sched, weight_fn=lambda t: torch.ones_like(t))
    assert abs(wrong - oracle.entropy()) > 0.05


def exact_discrete_mean(oracle, schedule, T):
    x0, masked, px, nll = all_rows(oracle)
    R = len(px)
    i = torch.arange(1, T + 1).repeat_interleave(R)
    loss = discrete_loss_from_nll(nll.repeat(T, 1), masked.repeat(T, 1), i, T, schedule, V).double().view(T, R)
    probs = mask_prob(masked, schedule.alpha(torch.arange(1, T + 1, dtype=torch.float64) / T))
    return float((probs * px[None] * loss).sum(1).mean())


@pytest.mark.parametrize("name,params", [SCHEDULES[0], SCHEDULES[2]])
def test_discrete_bound_is_above_continuous_and_converges(oracle, name, params):
    sched = make_schedule(name, eps=1e-6, **params)
    cont = exact_continuous_mean(oracle, sched)
    bounds = [exact_discrete_mean(oracle, sched, T) for T in (1, 2, 4, 16, 64, 256, 1024)]
    assert all(b >= cont - 1e-9 for b in bounds), bounds
    assert all(b1 >= b2 - 1e-9 for b1, b2 in zip(bounds, bounds[1:])), bounds   # nested grids: monotone
    assert bounds[0] - cont > 0.05                      # T = 1 is loose (all tokens at once)
    assert bounds[-1] - cont < 5e-3                     # T = 1024 is close


def test_monte_carlo_md4_elbo_matches_entropy(oracle):
    """The one ELBO loop (antithetic draws, K = 4) over every state of the joint; tolerance 4 standard errors."""
    sched = make_schedule("cosine")
    mean, se = mc_bound(oracle, MD4Objective(V, sched), oracle.md4_denoiser(MASK), draws=4, reps=32)
    assert abs(mean - oracle.entropy()) < 4 * se + 2 * N * 1e-4 * math.log(V), (mean, oracle.entropy(), se)
    # the discrete-time bound through the same loop
    mean_T, se_T = mc_bound(oracle, MD4Objective(V, sched, steps=8), oracle.md4_denoiser(MASK), draws=2, reps=32)
    assert abs(mean_T - exact_discrete_mean(oracle, sched, 8)) < 4 * se_T


def test_bits_and_perplexity():
    assert abs(bits_per_token(3 * math.log(2) * 10, 10) - 3.0) < 1e-12
    assert abs(perplexity(10 * math.log(7.0), 10) - 7.0) < 1e-9


def test_token_nll_ignores_padded_columns():
    logits = torch.randn(2, 4, 8)
    x0 = torch.randint(0, 6, (2, 4))
    padded = logits.clone()
    padded[..., 6:] = 50.0
    torch.testing.assert_close(token_nll_from_logits(padded, x0, 6), token_nll_from_logits(logits[..., :6], x0))
