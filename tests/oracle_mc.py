"""Monte Carlo means of the one ELBO loop (model.objectives.heldout_nelbo) over an oracle's known joint.

Every state x is evaluated with weight p(x), so the only randomness is the loop's own noise; `reps` seeds
give independent estimates of E_x[bound(x)], whence the mean and its standard error."""
import math

import torch

from model.objectives import heldout_nelbo, logits_model


def mc_bound(oracle, objective, denoiser, draws: int, reps: int) -> tuple[float, float]:
    """(mean over seeds of sum_x p(x) bound(x), its standard error), nats per sequence."""
    model = logits_model(denoiser)
    ests = torch.stack([(oracle.probs * heldout_nelbo(model, objective, oracle.states, draws, seed=r)).sum()
                        for r in range(reps)])
    return float(ests.mean()), float(ests.std() / math.sqrt(reps))
