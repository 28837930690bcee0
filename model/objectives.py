"""What the engine optimises and evaluates, per diffusion kind: MD4, GenMD4 and Prime as `Objective`s.

An objective turns clean rows x0 [B, N] plus per-row randomness (u [B] in [0, 1), uniform noise
[B, S, N]) into the denoiser's inputs, and the denoiser's output back into per-sequence losses:

    inputs, ctx = objective.prepare(x0, u, noise, train=True)     # dict of model kwargs
    out = model(**inputs)
    train_loss, nelbo = objective.finish(out, ctx)                # [B] each, nats per sequence

`train_loss` is what is differentiated (GenMD4: the REINFORCE leave-one-out surrogate), `nelbo` the
negative-ELBO estimate (a valid upper bound on -log p(x0) in expectation). The split into prepare /
finish is what pipeline parallelism needs: prepare runs where the batch is, finish on the last stage.

The math lives in model/diffusion/. Vocab-parallel logits (Prime's carry-over filter and digit marginals,
GenMD4's sum_j w_j mu_j) reduce over the objective's `vocab` shard: model/diffusion/vocab.py's LOCAL (all
columns here) by default; the engine passes model.vocab_parallel.from_parallel_state() under TP > 1.

Noise (model/diffusion/noise.py: step_noise in training, row_noise for the held-out bound) comes as
S = objective.noise_streams(train) streams of [N] uniforms per row:
    md4:    1 (the token masks)
    prime:  l (one per sub-token position: noise[:, j, n] masks digit j of token n)
    genmd4: train 4 (masks of two draws at t, and two at t1 for the reconstruction), eval 2.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from model.diffusion.md4 import (continuous_loss_from_nll, corrupt, discrete_loss_from_nll, discrete_steps)
from model.diffusion.noise import row_noise
from model.diffusion.schedules import Schedule, make_schedule
from model.diffusion.vocab import LOCAL, VocabShard


class Objective:
    kind = "base"
    # the denoiser takes the diffusion time of each row (model.time_conditioning=adaln): `prepare` adds
    # t [rows] to the model kwargs, and the samplers call denoiser(ids, t)
    time_conditioned = False
    # where the logit columns live (model/diffusion/vocab.py): LOCAL, or the tensor-parallel shard
    vocab: VocabShard = LOCAL

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.mask_id = vocab_size

    def _inputs(self, inputs: dict, t: torch.Tensor) -> dict:
        return {**inputs, "t": t} if self.time_conditioned else inputs

    def noise_streams(self, train: bool) -> int:
        return 1

    def prepare(self, x0, u, noise, train: bool = True, maskable=None):
        """maskable [B, N] bool (None = every position): only these positions are ever masked, so the bound
        is one on -log p(x0[maskable] | x0[~maskable]) (a continuation given its context)."""
        raise NotImplementedError

    def finish(self, out, ctx):
        raise NotImplementedError

    def loss(self, forward: Callable, x0, u, noise, train: bool = True, maskable=None):
        inputs, ctx = self.prepare(x0, u, noise, train, maskable)
        return self.finish(forward(**inputs), ctx)

    def masked_inputs(self, x0, maskable):
        """Model kwargs for the logits [B, N, V] with every maskable position masked, at t = 1."""
        ids = torch.where(maskable.to(x0.device), torch.full_like(x0, self.mask_id), x0)
        return self._inputs({"input_ids": ids}, torch.ones(x0.shape[0], dtype=torch.float64))


class MD4Objective(Objective):
    """MD4 with a fixed schedule; the model returns per-token NLL at the masked positions only."""
    kind = "md4"

    def __init__(self, vocab_size: int, schedule: Schedule, steps: int | None = None):
        super().__init__(vocab_size)
        self.schedule, self.steps = schedule, steps

    def prepare(self, x0, u, noise, train=True, maskable=None):
        u = u.to(torch.float64)
        if self.steps is not None:     # discrete time: i ~ U{1..T}, t(i) = i / T
            i = discrete_steps(u, self.steps)
            t = i.to(torch.float64) / self.steps
        else:
            i, t = None, u
        xt, masked = corrupt(x0, t.to(x0.device), noise[:, 0].to(x0.device), self.schedule, mask_id=self.mask_id,
                             maskable=maskable)
        return self._inputs({"input_ids": xt, "labels": x0, "loss_mask": masked}, t), (masked, t, i, maskable)

    def finish(self, nll, ctx):
        masked, t, i, maskable = ctx
        masked = masked.to(nll.device)
        if self.steps is not None:
            loss = discrete_loss_from_nll(nll.float(), masked, i.to(nll.device), self.steps, self.schedule,
                                          self.vocab_size, maskable)
        else:
            loss = continuous_loss_from_nll(nll.float(), masked, t.to(nll.device), self.schedule, self.vocab_size,
                                            maskable)
        return loss, loss.detach()


class PrimeObjective(Objective):
    """Prime (l sub-tokens per token): the valid bound is MD4's on the sub-tokens, with the digit
    marginals of the carry-over-filtered token distribution as the sub-token denoiser."""
    kind = "prime"

    def __init__(self, vocab_size: int, schedule: Schedule, l: int):
        from model.diffusion.prime import prime_base
        super().__init__(vocab_size)
        self.schedule, self.l = schedule, l
        self.b = prime_base(vocab_size, l)

    def noise_streams(self, train: bool) -> int:
        return self.l

    def prepare(self, x0, u, noise, train=True, maskable=None):
        from model.diffusion.prime import corrupt_subtokens, token_digits
        y0 = token_digits(x0, self.b, self.l)                                  # [B, N, l]
        t = u.to(torch.float64)
        y_t, masked = corrupt_subtokens(y0, t.to(x0.device), noise.transpose(1, 2).to(x0.device), self.schedule,
                                        self.b, maskable)
        return self._inputs({"input_ids": y_t}, t), (y_t, y0, masked, t, maskable)

    def finish(self, logits, ctx):
        from model.diffusion.prime import digit_nll, prime_loss_from_digit_nll
        y_t, y0, masked, t, maskable = ctx
        dev = logits.device
        nll = digit_nll(logits, y_t.to(dev), y0.to(dev), self.b, self.vocab_size, self.vocab)
        loss = prime_loss_from_digit_nll(nll, masked.to(dev), t.to(dev), self.schedule, self.b, maskable)
        return loss, loss.detach()

    def masked_inputs(self, x0, maskable):
        from model.diffusion.prime import token_digits
        y = token_digits(x0, self.b, self.l)
        y = torch.where(maskable.to(x0.device)[..., None], torch.full_like(y, self.b), y)
        return self._inputs({"input_ids": y}, torch.ones(x0.shape[0], dtype=torch.float64))


class GenMD4Objective(Objective):
    """GenMD4: learned per-token-value schedule w (the model's `genmd4_schedule`), t in [t1, 1],
    reconstruction at t1, REINFORCE leave-one-out over two draws for the gradient w.r.t. w.
    Vocab-parallel: mu's normaliser and sum_j w_j mu_j are reduced over the tensor-parallel group."""
    kind = "genmd4"

    def __init__(self, vocab_size: int, schedule_module_fn: Callable):
        super().__init__(vocab_size)
        self.learned_schedule = schedule_module_fn     # () -> GenMD4Schedule (the model's, trained with it)

    def noise_streams(self, train: bool) -> int:
        return 4 if train else 2

    def prepare(self, x0, u, noise, train=True, maskable=None):
        sched = self.learned_schedule()
        B = x0.shape[0]
        t = sched.times(u.to(torch.float64)).to(x0.device)
        t1 = torch.full_like(t, sched.t1)
        draws = 2 if train else 1
        ids, masks, times = [], [], []
        for d in range(draws):
            for k, tt in ((d, t), (draws + d, t1)):
                xt, m = sched.corrupt(x0, tt, noise[:, k].to(x0.device), self.mask_id, maskable)
                ids.append(xt), masks.append(m), times.append(tt)
        # one forward over [2*draws*B, N]: per draw the rows at t, then at t1
        return (self._inputs({"input_ids": torch.cat(ids)}, torch.cat(times)),
                (x0, masks, times, draws, B, maskable))

    def finish(self, logits, ctx):
        from model.diffusion.genmd4 import genmd4_loss, genmd4_token_terms, reinforce_loo
        x0, masks, times, draws, B, maskable = ctx
        sched = self.learned_schedule()
        dev = logits.device
        x0 = x0.to(dev)
        # one pass over the [2 * draws * B] rows (per draw: at t, then at t1)
        nll, mean_w = genmd4_token_terms(logits, torch.cat([x0] * (2 * draws)), sched.w, self.vocab_size, self.vocab)
        per_draw = []
        for d in range(draws):
            rows_t, rows_r = slice(2 * d * B, (2 * d + 1) * B), slice((2 * d + 1) * B, (2 * d + 2) * B)
            m_t, m_r = masks[2 * d].to(dev), masks[2 * d + 1].to(dev)
            t, t1 = times[2 * d].to(dev), times[2 * d + 1].to(dev)
            L = genmd4_loss(nll[rows_t], mean_w[rows_t], x0, m_t, t, sched.w, sched.t1)
            L = L + (nll[rows_r] * m_r.to(nll.dtype)).sum(1)             # reconstruction at t1
            log_q = sched.log_q(x0, m_t, t, maskable) + sched.log_q(x0, m_r, t1, maskable)
            per_draw.append((L, log_q))
        if draws == 1:
            L = per_draw[0][0]
            return L, L.detach()
        (L1, q1), (L2, q2) = per_draw
        return reinforce_loo(L1, L2, q1, q2), (0.5 * (L1 + L2)).detach()


def network_parts(diffusion_cfg, vocab_size: int) -> dict:
    """What a diffusion kind adds to the network, as keyword arguments of model.denoiser.build_denoiser and
    model.plain.PlainDenoiser: `input_digits` (Prime: l sub-tokens per position; 0 = token ids) and
    `extra_modules` trained and saved with the network (GenMD4's learned schedule w; fresh modules per call).
    diffusion_cfg: launcher.config.DiffusionConfig, or None for MD4."""
    kind = getattr(diffusion_cfg, "kind", "md4")
    if kind == "prime":
        return {"input_digits": diffusion_cfg.prime_l}
    if kind == "genmd4":
        from model.diffusion.genmd4 import GenMD4Schedule
        return {"extra_modules": {"genmd4_schedule": GenMD4Schedule(vocab_size, eps=diffusion_cfg.eps,
                                                                    t1=diffusion_cfg.genmd4_t1)}}
    return {}


def logits_model(denoiser: Callable) -> Callable:
    """A logits denoiser `denoiser(ids, t=None) -> [B, N, >= V]` (an oracle, a sampler's callable) in the
    model convention the objectives call: forward(input_ids, labels=None, loss_mask=None, t=None) returns the
    logits, or with labels the per-token NLL (0 where loss_mask is False), as model/plain.py does."""
    from model.diffusion.md4 import token_nll_from_logits

    def forward(input_ids, labels=None, loss_mask=None, t=None):
        logits = denoiser(input_ids) if t is None else denoiser(input_ids, t)
        if labels is None:
            return logits
        nll = token_nll_from_logits(logits, labels.to(logits.device))
        return nll if loss_mask is None else nll * loss_mask.to(nll.device).to(nll.dtype)
    return forward


def make_objective(cfg, model=None, steps: int | None = None, vocab: VocabShard = LOCAL) -> Objective:
    """The objective of a resolved config (launcher.config.Config). GenMD4 needs the model, whose
    `genmd4_schedule` holds the learned w. steps=T: MD4's discrete-time bound (MD4 only). vocab: where the
    model's logit columns live (model.vocab_parallel.from_parallel_state() for a tensor-parallel model)."""
    d = cfg.diffusion
    V = cfg.model.vocab_size
    params = {}
    if d.schedule == "polynomial":
        params = {"k": d.poly_exponent}
    elif d.schedule == "geometric":
        params = {"bmin": d.geometric_bmin, "bmax": d.geometric_bmax}
    if steps is not None and d.kind != "md4":
        raise ValueError(f"the discrete-time bound (steps={steps}) exists for diffusion.kind md4 only, not {d.kind!r}")
    if d.kind == "md4":
        objective = MD4Objective(V, make_schedule(d.schedule, eps=d.eps, **params), steps)
    elif d.kind == "prime":
        objective = PrimeObjective(V, make_schedule(d.schedule, eps=d.eps, **params), d.prime_l)
    elif d.kind == "genmd4":
        if model is None:
            raise ValueError("GenMD4's objective needs the model (its genmd4_schedule holds w)")
        objective = GenMD4Objective(V, lambda: _find_genmd4(model))
    else:
        raise ValueError(f"diffusion.kind {d.kind!r} unknown")
    objective.time_conditioned = cfg.model.time_conditioning != "none"
    objective.vocab = vocab
    return objective


def _find_genmd4(model):
    m = model
    while not hasattr(m, "genmd4_schedule") and hasattr(m, "module"):
        m = m.module
    return m.genmd4_schedule


# ---------------------------------------------------------------------------------------------
# Held-out bound: noise keyed by each row's content (model/diffusion/noise.row_noise), so it does not
# depend on batch order, batch size or parallel layout. Training-time evaluation and launcher/evaluate.py
# both use it.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def heldout_nelbo(forward: Callable, objective: Objective, x0: torch.Tensor, draws: int, seed: int,
                  maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row negative ELBO in nats [B] float64, averaged over K = draws antithetic draws.
    maskable [B, N] (None = all): the bound on -log p(x0[maskable] | x0[~maskable]) (Objective.prepare)."""
    per_row = torch.zeros(x0.shape[0], dtype=torch.float64)
    streams = objective.noise_streams(train=False)
    for k in range(draws):
        u, noise = row_noise(x0, k, draws, seed, streams)
        _, nelbo = objective.loss(forward, x0, u, noise, train=False, maskable=maskable)
        per_row += nelbo.double().cpu()
    return per_row / draws


def bound_summary(sums: torch.Tensor, seq_len: int, draws: int) -> dict:
    """[sum of per-row nats, sum of squares, rows] -> bits/token, perplexity bound, standard error."""
    total, sq, rows = (float(v) for v in sums.tolist())
    rows = max(rows, 1.0)
    mean = total / rows
    var = max(sq / rows - mean ** 2, 0.0)
    ln2 = math.log(2.0)
    return {"bits_per_token": mean / (seq_len * ln2), "ppl_bound": math.exp(mean / seq_len),
            "stderr_bits_per_token": math.sqrt(var / rows) / (seq_len * ln2), "rows": int(rows),
            "tokens": int(rows) * seq_len, "eval_draws": draws}


# ---------------------------------------------------------------------------------------------
# Sampling: each kind's ancestral sampler (model/diffusion/samplers.py) from a full-logits denoiser.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def draw_samples(objective: Objective, denoiser: Callable, batch_size: int, seq_len: int, *, steps: int = 128,
                 grid: str = "cosine", top_p: float | None = None, temperature: float = 1.0,
                 use_cache: bool = True, given: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
    """denoiser(ids) -> full logits [B, N, V] (ids are digits [B, N, l] for Prime; denoiser(ids, t [B]) when the
    objective is time-conditioned). Returns (tokens [B, N],
    {'network_calls', 'steps'}). `given` [B, N] holds fixed tokens (prefix / infill), -1 at free positions (samplers._initial)."""
    from model.diffusion import samplers
    kw = dict(steps=steps, grid=grid, top_p=top_p, temperature=temperature, use_cache=use_cache,
              generator=generator, time_conditioned=objective.time_conditioned)
    if objective.kind == "md4":
        return samplers.sample(denoiser, batch_size, seq_len, objective.mask_id, objective.vocab_size,
                               objective.schedule, given=given, **kw)
    if objective.kind == "genmd4":
        return samplers.sample_genmd4(denoiser, batch_size, seq_len, objective.mask_id, objective.learned_schedule(),
                                      given=given, **kw)
    if objective.kind == "prime":
        return samplers.sample_prime(denoiser, batch_size, seq_len, objective.vocab_size, objective.l,
                                     objective.schedule, given=given, **kw)
    raise ValueError(f"no sampler for {objective.kind!r}")
