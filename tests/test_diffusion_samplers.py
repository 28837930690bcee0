"""Samplers with the exact oracle reproduce the known joint (total variation below a stated threshold);
given tokens never change; the cache gives identical samples with fewer network calls; top-p and
temperature behave on hand-made distributions."""
import math

import pytest
import torch

from model.diffusion import (GenMD4Schedule, logits_to_probs, make_schedule, sample, sample_genmd4, sample_prime,
                             sample_semi_ar, time_grid, top_p_filter)
from model.diffusion.samplers import semi_autoregressive
from model.diffusion.oracle import JointOracle, total_variation

N, V, MASK = 3, 5, 5
SAMPLES = 10000
# Sampling noise alone gives E[TV] ~ 0.5 sum_x sqrt(2 p(x) / (pi M)) ~ 0.02-0.033 for these joints and M = 10000,
# plus a small bias from 48 steps (two tokens can unmask in one step);
# the product of the marginals (what a one-step sampler draws) is at TV ~ 0.5.
torch.set_num_threads(1)
TV_THRESHOLD = 0.06


@pytest.fixture(scope="module")
def oracle():
    return JointOracle.random(N, V, seed=3)


def test_time_grids_run_from_one_to_zero():
    for grid in ("cosine", "uniform"):
        ts = time_grid(10, grid)
        assert ts[0] == 1.0 and ts[-1] == 0.0 and torch.all(ts[1:] < ts[:-1])
    torch.testing.assert_close(time_grid(4, "cosine")[1], torch.tensor(math.cos(math.pi / 8), dtype=torch.float64))


@pytest.mark.parametrize("grid", ["cosine", "uniform"])
def test_md4_sampler_reproduces_the_joint(oracle, grid):
    g = torch.Generator().manual_seed(0)
    x, stats = sample(oracle.md4_denoiser(MASK), SAMPLES, N, MASK, V, make_schedule("cosine"), steps=48, grid=grid,
                      generator=g)
    assert total_variation(x, oracle) < TV_THRESHOLD
    one_step, _ = sample(oracle.md4_denoiser(MASK), SAMPLES, N, MASK, V, make_schedule("cosine"), steps=1, generator=g)
    assert total_variation(one_step, oracle) > 3 * TV_THRESHOLD      # the check has power


@pytest.mark.parametrize("Np,Vp,l", [(3, 5, 2), (2, 7, 3)])
def test_prime_sampler_reproduces_the_joint(Np, Vp, l):
    oracle = JointOracle.random(Np, Vp, seed=4)
    g = torch.Generator().manual_seed(1)
    x, stats = sample_prime(oracle.prime_denoiser(l), SAMPLES, Np, Vp, l, make_schedule("linear"), steps=48,
                            generator=g)
    assert x.shape == (SAMPLES, Np) and int(x.max()) < Vp
    assert total_variation(x, oracle) < TV_THRESHOLD


def test_genmd4_sampler_reproduces_the_joint(oracle):
    sched = GenMD4Schedule(V, eps=1e-4).double()
    with torch.no_grad():
        sched.raw.copy_(torch.log(torch.expm1(torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0], dtype=torch.float64))))
    g = torch.Generator().manual_seed(2)
    x, _ = sample_genmd4(oracle.genmd4_denoiser(MASK, sched.w, sched.eps), SAMPLES, N, MASK, sched, steps=48,
                         generator=g)
    assert total_variation(x, oracle) < TV_THRESHOLD
    # an MD4 posterior (ignoring the value-dependent masking) with the GenMD4 step is visibly wrong
    g = torch.Generator().manual_seed(2)
    wrong, _ = sample_genmd4(lambda ids, t: oracle.md4_denoiser(MASK)(ids), SAMPLES, N, MASK, sched, steps=48,
                             generator=g)
    assert total_variation(wrong, oracle) > 2 * TV_THRESHOLD


def conditional_tv(samples, oracle, given):
    keep = torch.ones(len(oracle.probs), dtype=torch.bool)
    for n, v in enumerate(given.tolist()):
        if v >= 0:
            keep &= oracle.states[:, n] == v
    p = torch.where(keep, oracle.probs, 0.0)
    p = p / p.sum()
    counts = torch.bincount(oracle.index(samples), minlength=len(p)).double()
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize("given", [[2, -1, -1], [-1, -1, 4], [1, -1, 0]], ids=["prefix", "suffix", "infill"])
def test_conditioning_keeps_given_tokens_and_samples_the_conditional(oracle, given):
    given = torch.tensor(given)
    g = torch.Generator().manual_seed(5)
    x, _ = sample(oracle.md4_denoiser(MASK), 8000, N, MASK, V, make_schedule("cosine"), steps=48, given=given,
                  generator=g, top_p=None)
    fixed = given >= 0
    assert torch.all(x[:, fixed] == given[fixed])
    assert conditional_tv(x, oracle, given) < TV_THRESHOLD
    xp, _ = sample_prime(JointOracle.random(N, V, seed=3).prime_denoiser(2), 200, N, V, 2, make_schedule("linear"),
                         steps=16, given=given, generator=g)
    assert torch.all(xp[:, fixed] == given[fixed])
    sched = GenMD4Schedule(V)
    xg, _ = sample_genmd4(oracle.genmd4_denoiser(MASK, sched.w, sched.eps), 200, N, MASK, sched, steps=16,
                          given=given, generator=g)
    assert torch.all(xg[:, fixed] == given[fixed])


def test_cache_gives_identical_samples_with_fewer_calls():
    oracle = JointOracle.random(4, 3, seed=9)
    sched = make_schedule("cosine")
    out = {}
    for cache in (True, False):
        g = torch.Generator().manual_seed(7)
        out[cache] = sample(oracle.md4_denoiser(3), 2, 4, 3, 3, sched, steps=200, generator=g, use_cache=cache,
                            top_p=0.9, temperature=0.8)
    assert torch.equal(out[True][0], out[False][0])
    assert out[False][1]["network_calls"] >= 200 and out[True][1]["network_calls"] <= 2 * 4 + 1
    prime = {}
    for cache in (True, False):
        g = torch.Generator().manual_seed(7)
        prime[cache] = sample_prime(oracle.prime_denoiser(2), 2, 4, 3, 2, sched, steps=100, generator=g,
                                    use_cache=cache)
    assert torch.equal(prime[True][0], prime[False][0])
    assert prime[True][1]["network_calls"] < prime[False][1]["network_calls"]


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(top_p_filter(p, 0.7), torch.tensor([[0, 0.625, 0, 0.375]], dtype=torch.float64))
    torch.testing.assert_close(top_p_filter(p, 0.8), torch.tensor([[0, 0.625, 0, 0.375]], dtype=torch.float64))
    torch.testing.assert_close(top_p_filter(p, 0.4), torch.tensor([[0, 1.0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(top_p_filter(p, 0.81), torch.tensor([[0.15, 0.5, 0, 0.3]], dtype=torch.float64) / 0.95)
    torch.testing.assert_close(top_p_filter(p, None), p)


def test_temperature_rescales_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    torch.testing.assert_close(logits_to_probs(logits, 2.0), torch.softmax(logits.double() / 2, -1))
    assert float(logits_to_probs(logits, 1e-3)[0, 2]) > 1 - 1e-9
    # in the sampler: one position, fixed logits -> empirical frequencies match softmax(logits / T)
    den = lambda ids: logits.expand(ids.shape[0], 1, 3)              # noqa: E731
    for temp, top_p in ((2.0, None), (0.5, None), (1.0, 0.5)):
        g = torch.Generator().manual_seed(3)
        x, _ = sample(den, 20000, 1, 3, 3, make_schedule("linear"), steps=8, temperature=temp, top_p=top_p, generator=g)
        freq = torch.bincount(x[:, 0], minlength=3).double() / 20000
        expect = logits_to_probs(logits, temp, top_p)[0]
        assert float((freq - expect).abs().max()) < 0.015, (temp, top_p, freq, expect)


def test_semi_autoregressive_generation_beyond_the_context():
    """Markov-chain 'language': token n+1 = token n + 1 mod V, first token uniform. Windows must continue it."""
    Vm, ctx = 7, 6

    def den(ids):                                                 # exact conditional of that chain
        B, L = ids.shape
        logits = torch.full((B, L, Vm), -1e4)
        known = (ids < Vm).float()
        pos = torch.arange(L).float()
        anchor = torch.argmax(known * (L - pos), dim=1)          # first known position, if any
        has = known.any(1)
        start = torch.where(has, (ids.gather(1, anchor[:, None]).squeeze(1) - anchor) % Vm, torch.zeros(B).long())
        vals = (start[:, None] + torch.arange(L)) % Vm
        logits.scatter_(2, vals[..., None], 0.0)
        return torch.where(has[:, None, None], logits, torch.zeros_like(logits))

    g = torch.Generator().manual_seed(0)
    x, stats = sample_semi_ar(den, 3, 20, ctx, 2, Vm, Vm, make_schedule("cosine"), steps=16, generator=g)
    assert x.shape == (3, 20) and stats["windows"] == 1 + math.ceil((20 - ctx) / 2)
    assert torch.all((x[:, 1:] - x[:, :-1]) % Vm == 1)


def test_semi_autoregressive_windows_keep_the_overlap_and_the_given_tokens():
    """Generic window driver (any kind's sampler): each window's prefix is the previous tokens, and tokens
    fixed anywhere in the long sequence (prefix, infill) land at their positions in whichever window covers them."""
    ctx, stride, total = 8, 3, 20
    seen = []

    def window(given):                         # fills free positions with a running counter, records its input
        seen.append(given.clone())
        out = given.clone()
        free = out < 0
        out[free] = 100 + len(seen)
        return out, {"network_calls": 2}

    given = torch.full((1, total), -1)
    given[0, :3] = torch.tensor([1, 2, 3])     # prefix
    given[0, 15] = 7                          # an infill anchor in a later window
    x, stats = semi_autoregressive(window, 2, total, ctx, stride, given)
    assert x.shape == (2, total) and stats["windows"] == 1 + math.ceil((total - ctx) / stride)
    assert stats["network_calls"] == 2 * stats["windows"]
    assert x[0, :3].tolist() == [1, 2, 3] and x[0, 15] == 7 and x[1, 15] == 7
    for k in range(1, len(seen)):              # window k's first ctx - stride tokens are what was generated before
        start = ctx + (k - 1) * stride - (ctx - stride)
        assert torch.equal(seen[k][:, : ctx - stride], x[:, start: start + ctx - stride])
