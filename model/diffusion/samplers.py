"""Ancestral samplers for MD4, GenMD4 and Prime, plus MDLM's semi-autoregressive sliding window.

A denoiser is any callable: ids [B, N] -> logits [B, N, >= V] (or (ids, t [B]) when time_conditioned;
for Prime, sub-token ids [B, N, l]). Columns >= V (vocab padding) are ignored. The model never predicts
the mask id; unmasked positions are carried over (never changed), so given tokens (prefix, suffix,
infill: `given` holds ids, -1 = free) are fixed for the whole run.

MD4 reverse step t -> s < t, at each masked position independently:
    unmask to j with prob (alpha_s - alpha_t) / (1 - alpha_t) * mu[j], stay masked otherwise.
The unmask decision does not depend on mu, so it is drawn first; the network is needed only when some
position unmasks. Cache (use_cache=True): without time conditioning mu only changes when x changed, so the
last logits are reused until then (MDLM); with time conditioning the network is still skipped at steps
where nothing unmasks. Both modes consume the same random numbers, so a fixed generator gives identical
samples with and without the cache. Categorical draws are done in float64 by inverse CDF.
Random numbers come from `generator` on its own device (CPU by default) and are moved to the state's device.
"""
from __future__ import annotations

import math

import torch

from .schedules import Schedule


# ----- building blocks -----------------------------------------------------------------------------

def time_grid(steps: int, grid: str = "cosine") -> torch.Tensor:
    """Times t_0 = 1 > t_1 > ... > t_steps = 0 (float64). cosine: t(i) = cos(pi/2 (1 - i/T)) for i = T..0."""
    i = torch.arange(steps, -1, -1, dtype=torch.float64)
    if grid == "uniform":
        return i / steps
    if grid == "cosine":
        return torch.cos(0.5 * math.pi * (1.0 - i / steps)).clamp(0.0, 1.0).index_fill(0, torch.tensor([steps]), 0.0)
    raise ValueError(f"unknown time grid {grid!r}; choose cosine or uniform")


def top_p_filter(probs: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Keep the smallest set of most likely values whose mass reaches top_p (always the top one); renormalise."""
    if top_p is None or top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float | None = None) -> torch.Tensor:
    """float64 softmax(logits / temperature), then top-p."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    return top_p_filter(probs, top_p)


def categorical(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, float64: probs [K, C] (rows sum to 1), u [K] uniform in [0, 1) -> ids [K]."""
    cdf = probs.to(torch.float64).cumsum(-1)
    cdf = cdf / cdf[..., -1:]
    idx = torch.searchsorted(cdf, u.to(torch.float64)[:, None].contiguous(), right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def _rand(shape, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def _initial(batch_size: int, seq_len: int, mask_id: int, given, device) -> torch.Tensor:
    x = torch.full((batch_size, seq_len), mask_id, dtype=torch.long, device=device)
    if given is not None:
        given = given.to(device).long().expand(batch_size, seq_len)
        x = torch.where(given >= 0, given, x)
    return x


class _Network:
    """Calls the denoiser and counts calls. The last output is reused while the input is unchanged (and, for a
    time-conditioned denoiser, t is unchanged); force=True always calls (the naive sampler, every step)."""

    def __init__(self, denoiser, vocab_size: int, time_conditioned: bool):
        self.denoiser, self.V, self.time_conditioned = denoiser, vocab_size, time_conditioned
        self.calls, self.logits, self.stale, self.t = 0, None, True, None

    def changed(self) -> None:
        self.stale = True

    def __call__(self, x: torch.Tensor, t: float, force: bool = False) -> torch.Tensor:
        if force or self.logits is None or self.stale or (self.time_conditioned and t != self.t):
            if self.time_conditioned:
                out = self.denoiser(x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device))
            else:
                out = self.denoiser(x)
            self.logits, self.stale, self.t = out[..., : self.V], False, t
            self.calls += 1
        return self.logits


# ----- MD4 -----------------------------------------------------------------------------------------

@torch.no_grad()
def sample(denoiser, batch_size: int, seq_len: int, mask_id: int, vocab_size: int, schedule: Schedule, *,
           steps: int = 128, grid: str = "cosine", top_p: float | None = None, temperature: float = 1.0,
           given: torch.Tensor | None = None, time_conditioned: bool = False,
           generator: torch.Generator | None = None, use_cache: bool = True,
           device: torch.device | str | None = None) -> tuple[torch.Tensor, dict]:
    """MD4 ancestral sampling. Returns (tokens [B, N] long, {'network_calls', 'steps'})."""
    device = torch.device(device) if device is not None else (given.device if given is not None else torch.device("cpu"))
    x = _initial(batch_size, seq_len, mask_id, given, device)
    net = _Network(denoiser, vocab_size, time_conditioned)
    ts = time_grid(steps, grid)
    alphas = schedule.alpha(ts)
    for i in range(steps):
        t, a_t, a_s = float(ts[i]), alphas[i], alphas[i + 1]
        u_unmask, u_cat = _rand((batch_size, seq_len), generator, device), _rand((batch_size, seq_len), generator, device)
        p_unmask = float((a_s - a_t) / (1.0 - a_t))
        unmask = (x == mask_id) & (u_unmask < p_unmask)
        if not use_cache:
            net(x, t, force=True)                    # the naive sampler calls the network every step
        if not unmask.any():
            continue
        logits = net(x, t)
        rows = logits[unmask.to(logits.device)].to(device)
        x[unmask] = categorical(logits_to_probs(rows, temperature, top_p), u_cat[unmask])
        net.changed()
    left = x == mask_id
    if left.any():                                   # final step: remaining masks -> argmax
        logits = net(x, float(ts[-1]))
        x[left] = logits[left.to(logits.device)].to(device).argmax(-1)
    return x, {"network_calls": net.calls, "steps": steps}


# ----- GenMD4 --------------------------------------------------------------------------------------

@torch.no_grad()
def sample_genmd4(denoiser, batch_size: int, seq_len: int, mask_id: int, schedule, *, steps: int = 128,
                  grid: str = "cosine", top_p: float | None = None, temperature: float = 1.0,
                  given: torch.Tensor | None = None, time_conditioned: bool = True,
                  generator: torch.Generator | None = None, use_cache: bool = True,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, dict]:
    """GenMD4 ancestral sampling with per-value unmask probabilities (schedule: a GenMD4Schedule).

    Derivation. Forward, per position with value x0 = j: masked at time t with prob 1 - alpha_{t,j}, and
    once masked it stays masked as t grows, so for s < t
        q(x_s = j | x_t = m, x0 = j) = (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j}),
        q(x_s = m | x_t = m, x0 = j) = (1 - alpha_{s,j}) / (1 - alpha_{t,j}).
    The reverse step replaces x0 by the model's posterior mu_j ~ p(x0^n = j | x_t) (the minimiser of the
    GenMD4 loss; it already includes the value-dependent masking likelihood, so masked positions lean
    towards values with large w) and marginalises it:
        p(x_s^n = j | x_t) = mu_j (alpha_{s,j} - alpha_{t,j}) / (1 - alpha_{t,j}),
        p(x_s^n = m | x_t) = sum_j mu_j (1 - alpha_{s,j}) / (1 - alpha_{t,j}).
    These V + 1 numbers sum to sum_j mu_j = 1: no further normalisation is needed once mu is a
    distribution (after temperature / top-p). With w = 1 this is MD4's step. At s = 0, alpha_{0,j} = 1:
    every remaining mask is revealed. Unlike MD4 the unmask decision depends on mu, so every step with a
    masked position needs mu (the cache still applies without time conditioning).
    """
    device = torch.device(device) if device is not None else (given.device if given is not None else torch.device("cpu"))
    x = _initial(batch_size, seq_len, mask_id, given, device)
    V = schedule.vocab_size
    net = _Network(denoiser, V, time_conditioned)
    ts = time_grid(steps, grid)
    w = schedule.w.detach().to(torch.float64).cpu()
    alpha = lambda t: 1.0 - (1.0 - schedule.eps) * t ** w                # noqa: E731  [V]
    for i in range(steps):
        t, s = float(ts[i]), float(ts[i + 1])
        u = _rand((batch_size, seq_len), generator, device)
        masked = x == mask_id
        if not masked.any():
            continue
        logits = net(x, t, force=not use_cache)
        mu = logits_to_probs(logits[masked.to(logits.device)].to(device), temperature, top_p)
        a_t, a_s = alpha(t).to(device), alpha(s).to(device)
        p_unmask = mu * (a_s - a_t) / (1.0 - a_t)                          # [K, V]
        p_stay = (mu * (1.0 - a_s) / (1.0 - a_t)).sum(-1, keepdim=True)    # [K, 1]
        out = categorical(torch.cat([p_unmask, p_stay], dim=-1), u[masked])
        new = torch.where(out < V, out, torch.full_like(out, mask_id))
        if (new != mask_id).any():
            x[masked] = new
            net.changed()
    left = x == mask_id
    if left.any():
        logits = net(x, float(ts[-1]))
        x[left] = logits[left.to(logits.device)].to(device).argmax(-1)
    return x, {"network_calls": net.calls, "steps": steps}


# ----- Prime ---------------------------------------------------------------------------------------

@torch.no_grad()
def sample_prime(denoiser, batch_size: int, seq_len: int, vocab_size: int, l: int, schedule: Schedule, *,
                 steps: int = 128, grid: str = "cosine", top_p: float | None = None, temperature: float = 1.0,
                 given: torch.Tensor | None = None, time_conditioned: bool = False,
                 generator: torch.Generator | None = None, use_cache: bool = True,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, dict]:
    """Prime sampling on sub-tokens y [B, N, l] (digit mask id b); returns decoded tokens [B, N].

    Each step: x ~ p_theta(. | y_t) (carry-over filtered) at positions where some digit unmasks, then each
    masked digit is revealed with MD4's probability (alpha_s - alpha_t)/(1 - alpha_t) to x's digit.
    Revealed digits never change, so a sampled x always agrees with them.
    """
    from .prime import carry_over_filter, digits_to_tokens, prime_base, token_digits
    b = prime_base(vocab_size, l)
    device = torch.device(device) if device is not None else (given.device if given is not None else torch.device("cpu"))
    y = torch.full((batch_size, seq_len, l), b, dtype=torch.long, device=device)
    if given is not None:
        g = given.to(device).long().expand(batch_size, seq_len)
        y = torch.where((g >= 0)[..., None], token_digits(g.clamp(min=0), b, l), y)
    net = _Network(denoiser, vocab_size, time_conditioned)
    ts = time_grid(steps, grid)
    alphas = schedule.alpha(ts)

    def filtered(rows: torch.Tensor) -> torch.Tensor:          # log p(x | y_t) at the selected positions
        logits = net(y, t)
        r = rows.to(logits.device)
        return carry_over_filter(logits[r], y[rows].to(logits.device), b, vocab_size).to(device)

    for i in range(steps):
        t, a_t, a_s = float(ts[i]), alphas[i], alphas[i + 1]
        u_unmask = _rand((batch_size, seq_len, l), generator, device)
        u_cat = _rand((batch_size, seq_len), generator, device)
        p_unmask = float((a_s - a_t) / (1.0 - a_t))
        unmask = (y == b) & (u_unmask < p_unmask)
        if not use_cache:
            net(y, t, force=True)                    # the naive sampler calls the network every step
        pos = unmask.any(-1)
        if not pos.any():
            continue
        x = categorical(logits_to_probs(filtered(pos), temperature, top_p), u_cat[pos])
        y[pos] = torch.where(unmask[pos], token_digits(x, b, l), y[pos])
        net.changed()
    t = float(ts[-1])
    left = (y == b).any(-1)
    if left.any():
        x = filtered(left).argmax(-1)
        y[left] = torch.where(y[left] == b, token_digits(x, b, l), y[left])
    return digits_to_tokens(y, b), {"network_calls": net.calls, "steps": steps}


# ----- semi-autoregressive generation beyond the context (MDLM) --------------------------------------

@torch.no_grad()
def semi_autoregressive(sample_window, batch_size: int, total_len: int, context_len: int, stride: int,
                        given: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Generate total_len > context_len tokens with any window sampler (MD4, GenMD4, Prime).

    sample_window(window_given [B, context_len], -1 = free) -> (tokens [B, context_len], {'network_calls', ...}).
    The first window covers positions [0, context_len); each next one keeps the last context_len - stride
    tokens generated so far as its fixed prefix and samples `stride` new ones. `given` [B or 1, total_len]
    (-1 = free) fixes tokens anywhere in the whole sequence (prefix, infill); each window sees the part of
    it that falls on its new positions. Returns (tokens [B, total_len], {'network_calls', 'windows'})."""
    if not 0 < stride <= context_len:
        raise ValueError("need 0 < stride <= context_len")
    if given is not None:
        given = given.long().expand(batch_size, total_len)
    first = None if given is None else given[:, :context_len].clone()
    tokens, stats = sample_window(first if first is not None else
                                  torch.full((batch_size, context_len), -1, dtype=torch.long))
    calls, windows = stats["network_calls"], 1
    keep = context_len - stride
    while tokens.shape[1] < total_len:
        start = tokens.shape[1] - keep                 # this window covers [start, start + context_len)
        window_given = torch.full((batch_size, context_len), -1, dtype=torch.long, device=tokens.device)
        if keep:
            window_given[:, :keep] = tokens[:, -keep:]
        if given is not None:
            seg = given[:, start + keep: start + context_len].to(tokens.device)
            window_given[:, keep: keep + seg.shape[1]] = seg
        window, st = sample_window(window_given)
        tokens = torch.cat([tokens, window[:, keep:]], dim=1)
        calls += st["network_calls"]
        windows += 1
    return tokens[:, :total_len], {"network_calls": calls, "windows": windows}


@torch.no_grad()
def sample_semi_ar(denoiser, batch_size: int, total_len: int, context_len: int, stride: int, mask_id: int,
                   vocab_size: int, schedule: Schedule, **kwargs) -> tuple[torch.Tensor, dict]:
    """Sliding window: sample a full context, then repeatedly keep its last context_len - stride tokens as a
    given prefix and sample `stride` new tokens, until total_len tokens exist. kwargs go to `sample`."""
    def window(given: torch.Tensor):
        return sample(denoiser, batch_size, context_len, mask_id, vocab_size, schedule, given=given,
                      **{k: v for k, v in kwargs.items() if k != "given"})

    tokens, stats = semi_autoregressive(window, batch_size, total_len, context_len, stride, kwargs.get("given"))
    return tokens, {**stats, "steps": kwargs.get("steps", 128)}
