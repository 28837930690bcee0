"""model/objectives.py: the engine's per-kind losses agree with model/diffusion's reference math, and
their vocab-parallel forms (TP=2, gloo) give the single-process losses and gradients."""
import math

import torch

from dist_utils import run_distributed
from model import vocab_parallel
from model.diffusion.genmd4 import (GenMD4Schedule, genmd4_loss_from_logits, genmd4_reconstruction_from_logits,
                                   reinforce_loo)
from model.diffusion.md4 import continuous_loss_from_nll, corrupt, token_nll_from_logits
from model.diffusion.prime import digit_nll, prime_base, prime_loss_from_digit_nll, token_digits
from model.diffusion.schedules import make_schedule
from model.diffusion.noise import row_noise
from model.objectives import GenMD4Objective, MD4Objective, PrimeObjective, bound_summary, heldout_nelbo

B, N, V = 3, 5, 11          # V odd: TP=2 pads one output column


def _logits_fn(seed=0, vocab=V):
    """A fixed 'denoiser': logits depend on the input ids through a random table (so masking matters)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(64, vocab, generator=g)

    def f(input_ids, labels=None, loss_mask=None):
        ids = input_ids if input_ids.dim() == 2 else input_ids.sum(-1)   # Prime: digits [B, N, l]
        logits = table[ids % 64] + 0.1 * table[(ids.roll(1, dims=1) * 7) % 64]
        if labels is None:
            return logits
        return token_nll_from_logits(logits, labels) * loss_mask.float()
    return f


def _case(seed=0, streams=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (B, N), generator=g)
    u = torch.rand(B, generator=g, dtype=torch.float64)
    noise = torch.rand(B, streams, N, generator=g, dtype=torch.float64)
    return x0, u, noise


def test_md4_objective_is_the_continuous_md4_loss():
    sched = make_schedule("cosine", eps=1e-4)
    obj = MD4Objective(V, sched)
    x0, u, noise = _case()
    f = _logits_fn()
    train, nelbo = obj.loss(f, x0, u, noise)
    xt, masked = corrupt(x0, u, noise[:, 0], sched, mask_id=V)
    ref = continuous_loss_from_nll(f(xt, x0, masked), masked, u, sched, V)
    torch.testing.assert_close(train, ref)
    torch.testing.assert_close(nelbo, ref)


def test_md4_discrete_bound_tends_to_continuous_and_is_larger_on_average():
    """E over t of the T-step bound >= continuous bound; both estimated with many rows of one sequence."""
    sched = make_schedule("linear", eps=1e-4)
    x0 = torch.randint(0, V, (1, N), generator=torch.Generator().manual_seed(3)).repeat(4000, 1)
    f = _logits_fn(1)
    cont = heldout_nelbo(f, MD4Objective(V, sched), x0[:1], draws=4000, seed=5)
    disc = heldout_nelbo(f, MD4Objective(V, sched, steps=4), x0[:1], draws=4000, seed=5)
    disc_fine = heldout_nelbo(f, MD4Objective(V, sched, steps=1000), x0[:1], draws=4000, seed=5)
    assert disc.item() > cont.item()
    assert abs(disc_fine.item() - cont.item()) < 0.02 * cont.item()


def test_prime_objective_matches_digit_level_reference():
    sched = make_schedule("linear", eps=1e-4)
    obj = PrimeObjective(V, sched, l=2)
    b = prime_base(V, 2)
    x0, u, noise = _case(streams=2)
    f = _logits_fn()
    train, _ = obj.loss(f, x0, u, noise)
    y0 = token_digits(x0, b, 2)
    masked = noise.transpose(1, 2) >= sched.alpha(u)[:, None, None]
    y_t = torch.where(masked, torch.full_like(y0, b), y0)
    ref = prime_loss_from_digit_nll(digit_nll(f(y_t), y_t, y0, b, V), masked, u, sched, b)
    torch.testing.assert_close(train, ref)


def test_genmd4_objective_matches_reference_draws():
    sched = GenMD4Schedule(V, eps=1e-4, t1=1e-3)
    with torch.no_grad():
        sched.raw.copy_(torch.linspace(-1.0, 1.5, V))
    obj = GenMD4Objective(V, lambda: sched)
    x0, u, noise = _case(streams=4)
    f = _logits_fn()
    train, nelbo = obj.loss(f, x0, u, noise)
    t = sched.times(u)
    t1 = torch.full_like(t, sched.t1)

    def draw(n_t, n_r):     # one draw by hand: its own forward at t and at t1
        xt, m = sched.corrupt(x0, t, n_t, V)
        xr, mr = sched.corrupt(x0, t1, n_r, V)
        L = (genmd4_loss_from_logits(f(xt), x0, m, t, sched.w, sched.t1)
             + genmd4_reconstruction_from_logits(f(xr), x0, mr))
        return L, sched.log_q(x0, m, t) + sched.log_q(x0, mr, t1)

    L1, q1 = draw(noise[:, 0], noise[:, 2])
    L2, q2 = draw(noise[:, 1], noise[:, 3])
    torch.testing.assert_close(train, reinforce_loo(L1, L2, q1, q2))
    torch.testing.assert_close(nelbo, 0.5 * (L1 + L2).detach())
    # evaluation: one draw with its reconstruction term
    _, ev = obj.loss(f, x0, u, noise[:, [0, 2]], train=False)
    torch.testing.assert_close(ev, L1.detach())


def _tp_worker(rank, world, kind):
    from launcher.parallelize import init_model_parallel
    init_model_parallel(tensor_parallel=2)
    return _run_kind(kind, rank, world)


def _run_kind(kind, rank, world):
    torch.manual_seed(0)
    V_pad = V + 1                # the same padded width in both runs (column V is padding)
    full = torch.randn(B * (4 if kind == "genmd4" else 1), N, V_pad)
    full[..., V:] = float("-inf")
    per = V_pad // world
    local = full[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
    x0, u, noise = _case(streams={"genmd4": 4, "prime": 2}[kind])
    if kind == "genmd4":
        sched = GenMD4Schedule(V)
        with torch.no_grad():
            sched.raw.copy_(torch.linspace(-1.0, 1.5, V))
        obj = GenMD4Objective(V, lambda: sched)
        params = [sched.raw]
    else:
        obj = PrimeObjective(V, make_schedule("linear"), l=2)
        params = []
    obj.vocab = vocab_parallel.from_parallel_state()      # LOCAL in the single-process reference
    inputs, ctx = obj.prepare(x0, u, noise)
    train, nelbo = obj.finish(local, ctx)
    train.sum().backward()
    return {"train": train.detach(), "nelbo": nelbo, "grad": local.grad,
            "param_grads": [p.grad.clone() for p in params]}


def test_vocab_parallel_genmd4_and_prime_match_single_process():
    for kind in ("genmd4", "prime"):
        ref = _run_kind(kind, 0, 1)
        parts = run_distributed(_tp_worker, 2, args=(kind,))
        for p in parts:
            torch.testing.assert_close(p["train"], ref["train"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(p["nelbo"], ref["nelbo"], rtol=1e-5, atol=1e-5)
            for g, rg in zip(p["param_grads"], ref["param_grads"]):   # replicated w: full, equal gradient
                torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
        grad = torch.cat([p["grad"] for p in parts], -1)[..., :V]
        torch.testing.assert_close(grad, ref["grad"][..., :V], rtol=1e-5, atol=1e-6)


def test_row_noise_and_bound_summary():
    rows = torch.randint(0, V, (4, N), generator=torch.Generator().manual_seed(0))
    u, n = row_noise(rows, 0, 2, seed=1, streams=3)
    u2, n2 = row_noise(rows.flip(0), 0, 2, seed=1, streams=3)
    torch.testing.assert_close(u, u2.flip(0))
    torch.testing.assert_close(n, n2.flip(0))
    assert n.shape == (4, 3, N)
    u_next, _ = row_noise(rows, 1, 2, seed=1)
    torch.testing.assert_close(torch.remainder(u + 0.5, 1.0), u_next)
    s = bound_summary(torch.tensor([2 * N * math.log(2.0) * 3, 0.0, 3.0], dtype=torch.float64), N, 1)
    assert abs(s["bits_per_token"] - 2.0) < 1e-12 and s["tokens"] == 3 * N
