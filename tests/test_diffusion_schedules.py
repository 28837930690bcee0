"""Schedules: alpha'(t) matches autograd, the weight matches the paper's table, eps shift is applied."""
import math

import pytest
import torch

from model.diffusion import make_schedule

SCHEDULES = [("linear", {}), ("polynomial", {"k": 2.5}), ("cosine", {}), ("geometric", {"bmin": 1e-5, "bmax": 20.0})]


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_dalpha_matches_autograd(name, params):
    sched = make_schedule(name, **params)
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sched.alpha(t).sum(), t)
    torch.testing.assert_close(sched.dalpha(t.detach()), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_weight_is_minus_dalpha_over_one_minus_alpha_and_matches_table(name, params):
    eps = 1e-4
    sched = make_schedule(name, eps=eps, **params)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    a, da = sched.alpha(t), sched.dalpha(t)
    torch.testing.assert_close(sched.weight(t), -da / (1 - a))
    # the table's w(t) is before the eps shift: recover alpha~ and compare
    a_tilde = (a - eps) / (1 - 2 * eps)
    w_tilde = (-da / (1 - 2 * eps)) / (1 - a_tilde)
    if name == "linear":
        expect = 1 / t
    elif name == "polynomial":
        expect = params["k"] / t
    elif name == "cosine":
        expect = (math.pi / 2) * torch.tan(math.pi / 2 * (1 - t))
    else:
        sig = params["bmin"] ** (1 - t) * params["bmax"] ** t
        expect = a_tilde / (1 - a_tilde) * sig * math.log(params["bmax"] / params["bmin"])
    torch.testing.assert_close(w_tilde, expect, rtol=1e-8, atol=1e-10)
    assert torch.all(sched.weight(t) > 0)


@pytest.mark.parametrize("name,params", SCHEDULES)
def test_eps_shift_endpoints(name, params):
    sched = make_schedule(name, eps=1e-4, **params)
    a = sched.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert abs(float(a[0]) - (1 - 1e-4)) < 2e-4 and abs(float(a[1]) - 1e-4) < 2e-4


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError):
        make_schedule("sigmoid")
