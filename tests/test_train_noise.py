"""The training noise is a function of (seed, step, global sample index) only, so the loss does not
depend on the data-parallel layout; held-out noise is a function of the row's content."""
import pytest
import torch

from launcher.config import config_from_dict
from launcher.train import lr_lambda
from model.diffusion.noise import row_noise, step_noise


def test_step_noise_is_layout_invariant():
    seed, step, B, N = 7, 3, 8, 16
    t_all, n_all = step_noise(seed, step, list(range(B)), B, N)
    # 2 data-parallel ranks x 2 micro-batches of 2: rank r, micro m holds ids (m*2 + r)*2 ...
    for m in range(2):
        for r in range(2):
            base = (m * 2 + r) * 2
            t, n = step_noise(seed, step, [base, base + 1], B, N)
            assert torch.equal(t, t_all[base:base + 2]) and torch.equal(n, n_all[base:base + 2])


def test_step_noise_is_antithetic_and_changes_with_step():
    B = 8
    t, _ = step_noise(1, 0, list(range(B)), B, 4)
    gaps = torch.sort(t).values.diff()
    assert torch.allclose(gaps, torch.full_like(gaps, 1.0 / B), atol=1e-12)
    t2, n2 = step_noise(1, 1, list(range(B)), B, 4)
    assert not torch.equal(t, t2)


def test_row_noise_depends_on_row_content_only():
    rows = torch.randint(0, 100, (4, 10))
    t, n = row_noise(rows, draw=0, num_draws=2, seed=3)
    t_rev, n_rev = row_noise(rows.flip(0), draw=0, num_draws=2, seed=3)
    assert torch.equal(t, t_rev.flip(0)) and torch.equal(n, n_rev.flip(0))
    t1, _ = row_noise(rows, draw=1, num_draws=2, seed=3)
    assert torch.allclose(torch.remainder(t1 - t, 1.0), torch.full_like(t, 0.5))


def test_lr_warmup_then_cosine_to_floor():
    cfg = config_from_dict({"optim": {"warmup_steps": 10, "train_steps": 110, "min_lr_ratio": 0.1}})
    f = lr_lambda(cfg)
    assert abs(f(0) - 0.1) < 1e-12 and abs(f(9) - 1.0) < 1e-12
    assert abs(f(10) - 1.0) < 1e-12 and abs(f(60) - 0.55) < 1e-12 and abs(f(110) - 0.1) < 1e-12


def test_ema_update_swap_and_state():
    from launcher.train import EMA

    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    start = {k: v.detach().clone() for k, v in m.named_parameters()}
    ema = EMA(m, decay=0.75)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    for k, p in m.named_parameters():   # shadow = d * shadow + (1 - d) * param
        torch.testing.assert_close(ema.shadow[k], 0.75 * start[k] + 0.25 * p.detach())
    raw = {k: v.detach().clone() for k, v in m.named_parameters()}
    saved = ema.swap_in(m)
    for k, p in m.named_parameters():
        assert torch.equal(p, ema.shadow[k])
    ema.swap_out(m, saved)
    for k, p in m.named_parameters():
        assert torch.equal(p, raw[k])
    other = EMA(m, decay=0.75)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with pytest.raises(RuntimeError, match="EMA state lacks"):
        other.load_state_dict({"decay": 0.75, "shadow": {}})
