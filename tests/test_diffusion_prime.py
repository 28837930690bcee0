"""Prime: digit coding, sub-embeddings, carry-over filter, the VALID sub-token ELBO (exact oracle) and the
failure of the joint-token weighting, and the vocab-parallel (TP = 2) filter / digit marginals."""
import itertools
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.distributed import free_port
from model.diffusion import (SubTokenEmbedding, carry_over_filter, digit_log_marginals, digit_nll, digits_to_tokens,
                             make_schedule, prime_base, prime_loss_from_digit_nll, token_digits)
from model.diffusion.oracle import JointOracle
from model.objectives import PrimeObjective
from model.vocab_parallel import TensorParallelVocab
from oracle_mc import mc_bound


@pytest.mark.parametrize("V,l", [(50257, 2), (50257, 3), (50257, 6), (5, 2), (7, 3), (16, 2), (2, 1), (100, 4)])
def test_encode_decode_roundtrip(V, l):
    b = prime_base(V, l)
    assert b ** l >= V and (b - 1) ** l < V
    x = torch.arange(V) if V < 5000 else torch.randint(0, V, (5000,))
    y = token_digits(x, b, l)
    assert y.shape == (*x.shape, l) and int(y.max()) < b
    torch.testing.assert_close(digits_to_tokens(y, b), x)


def test_subtoken_embedding_concatenates_one_shared_table():
    emb = SubTokenEmbedding(b=4, l=3, hidden_size=12)
    assert emb.table.weight.shape == (5, 4)
    y = torch.tensor([[[0, 4, 2]]])
    out = emb(y)
    assert out.shape == (1, 1, 12)
    torch.testing.assert_close(out[0, 0], torch.cat([emb.table.weight[0], emb.table.weight[4], emb.table.weight[2]]))
    with pytest.raises(ValueError):
        SubTokenEmbedding(b=4, l=5, hidden_size=12)


def test_carry_over_filter_zeroes_inconsistent_tokens():
    V, l = 10, 2
    b = prime_base(V, l)                                           # 4: tokens 0..9 -> digits (x // 4, x % 4)
    logits = torch.randn(1, 2, V)
    y_t = torch.tensor([[[1, b], [b, b]]])                        # position 0: first digit revealed = 1
    log_p = carry_over_filter(logits, y_t, b, V)
    allowed = torch.tensor([x // 4 == 1 for x in range(V)])
    assert torch.all(torch.isinf(log_p[0, 0, ~allowed]))
    torch.testing.assert_close(log_p[0, 0, allowed], torch.log_softmax(logits[0, 0, allowed], -1))
    torch.testing.assert_close(log_p[0, 1], torch.log_softmax(logits[0, 1], -1))
    marg = digit_log_marginals(log_p, b, l).exp()
    torch.testing.assert_close(marg.sum(-1), torch.ones(1, 2, l))
    assert abs(float(marg[0, 0, 0, 1]) - 1.0) < 1e-6               # the revealed digit is certain


# ----- exact oracle ---------------------------------------------------------------------------------

def gauss_legendre(a, b, panels=20, order=20):
    x, w = np.polynomial.legendre.leggauss(order)
    e = np.linspace(a, b, panels + 1)
    return (torch.tensor(np.concatenate([(e1 - e0) / 2 * x + (e1 + e0) / 2 for e0, e1 in zip(e[:-1], e[1:])])),
            torch.tensor(np.concatenate([(e1 - e0) / 2 * w for e0, e1 in zip(e[:-1], e[1:])])))


def exact_prime_means(oracle: JointOracle, l: int, schedule):
    """Exact means over x0, all 2^(N l) digit masks and t (quadrature) of (VALID bound, joint-token weighting)."""
    N, V = oracle.N, oracle.V
    b = prime_base(V, l)
    masks = torch.tensor(list(itertools.product([False, True], repeat=N * l))).view(-1, N, l)
    S, M = oracle.states.shape[0], masks.shape[0]
    x0 = oracle.states.repeat_interleave(M, 0)
    masked = masks.repeat(S, 1, 1)
    px = oracle.probs.repeat_interleave(M)
    y0 = token_digits(x0, b, l)
    y_t = torch.where(masked, torch.full_like(y0, b), y0)
    logits = oracle.prime_denoiser(l)(y_t).float()
    dn = digit_nll(logits, y_t, y0, b, V).double()                                      # [R, N, l]
    tok_nll = -carry_over_filter(logits, y_t, b, V).double().gather(-1, x0[..., None]).squeeze(-1)   # [R, N]
    t, wq = gauss_legendre(0.0, 1.0)
    R, Q = len(px), len(t)
    tt = t.repeat_interleave(R)
    valid = prime_loss_from_digit_nll(dn.repeat(Q, 1, 1), masked.repeat(Q, 1, 1), tt, schedule, b).double().view(Q, R)
    joint = (schedule.weight(tt) * (tok_nll * masked.any(-1)).sum(1).repeat(Q)).view(Q, R)   # the pitfall
    k = masked.flatten(1).sum(1).double()
    a = schedule.alpha(t)[:, None]
    pm = (1 - a) ** k * a ** (N * l - k) * px[None]
    return float((wq * (pm * valid).sum(1)).sum()), float((wq * (pm * joint).sum(1)).sum())


@pytest.mark.parametrize("N,V,l", [(3, 5, 2), (2, 7, 3)])
def test_valid_subtoken_elbo_equals_entropy_and_joint_weighting_does_not(N, V, l):
    oracle = JointOracle.random(N, V, seed=11)
    H = oracle.entropy()
    for name in ("linear", "cosine"):
        sched = make_schedule(name, eps=1e-6)
        valid, joint = exact_prime_means(oracle, l, sched)
        assert abs(valid - H) < 1e-4, (name, valid, H)
        assert joint < H - 0.01, (name, joint, H)           # undercounts: not an upper bound on the NLL
        assert not abs(joint - H) < 1e-4                    # i.e. it fails the same check


def test_monte_carlo_prime_elbo_matches_entropy():
    oracle = JointOracle.random(3, 5, seed=11)
    mean, se = mc_bound(oracle, PrimeObjective(5, make_schedule("linear"), 2), oracle.prime_denoiser(2),
                        draws=4, reps=32)
    assert abs(mean - oracle.entropy()) < 4 * se + 2e-3, (mean, oracle.entropy(), se)


# ----- vocab-parallel: TP = 2 against TP = 1 (2 gloo processes) --------------------------------------

V_TP, L_TP, V_PAD = 11, 2, 12          # 11 real tokens padded to 12 columns, 6 per rank


def tp_case():
    g = torch.Generator().manual_seed(5)
    b = prime_base(V_TP, L_TP)
    logits = torch.randn(2, 3, V_PAD, generator=g) * 3
    x0 = torch.randint(0, V_TP, (2, 3), generator=g)
    y0 = token_digits(x0, b, L_TP)
    y_t = torch.where(torch.rand(2, 3, L_TP, generator=g) < 0.5, torch.full_like(y0, b), y0)
    return logits, y_t, y0, b


def tp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, y_t, y0, b = tp_case()
        per = V_PAD // world
        local = logits[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
        shard = TensorParallelVocab(dist.new_group([0, 1]), rank)
        log_p = carry_over_filter(local, y_t, b, V_TP, shard)
        marg = digit_log_marginals(log_p, b, L_TP, shard)
        nll = digit_nll(local, y_t, y0, b, V_TP, shard)
        nll.sum().backward()
        torch.save({"log_p": log_p.detach(), "marg": marg.detach(), "nll": nll.detach(), "grad": local.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_filter_and_digit_marginals_tp2_match_tp1():
    logits, y_t, y0, b = tp_case()
    ref_logits = logits.clone().requires_grad_(True)
    ref_log_p = carry_over_filter(ref_logits, y_t, b, V_TP)
    ref_marg = digit_log_marginals(ref_log_p, b, L_TP)
    ref_nll = digit_nll(ref_logits, y_t, y0, b, V_TP)
    ref_nll.sum().backward()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(tp_worker, args=(2, free_port(), d), nprocs=2, join=True)
        parts = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["log_p"] for p in parts], -1), ref_log_p.detach())
    for p in parts:
        torch.testing.assert_close(p["marg"], ref_marg.detach())
        torch.testing.assert_close(p["nll"], ref_nll.detach())
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts], -1), ref_logits.grad)
    assert torch.all(torch.isinf(ref_log_p[..., V_TP:]))       # the padded column is excluded
