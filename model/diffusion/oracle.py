"""Exact-conditional oracle denoisers for a small known joint distribution p(x), x in {0..V-1}^N.

Used by tests and benchmarks: with the exact conditionals every bound's mean must equal the true
entropy H(p) (up to the tiny eps endpoint terms) and every sampler must reproduce p.
All V^N states are enumerated, so keep V^N small (a few thousand at most).

The core is `posterior_marginals(lik)`: given, for every position n and value v, the likelihood
lik[b, n, v] = P(what is observed at position n | x0^n = v), it returns the exact posterior marginals
P(x0^n = v | observations) = sum_x p(x) prod_m lik[b, m, x^m] [x^n = v] / sum_x p(x) prod_m lik[b, m, x^m].
- MD4: lik = 1 at masked positions (masking does not depend on the value), one-hot where unmasked.
- GenMD4: masked: (1 - eps) t^{w_v} (value-dependent); unmasked with token u: one-hot at u.
- Prime: 1 for the values whose digits agree with every revealed digit of the position, else 0.
"""
from __future__ import annotations

import torch


class JointOracle:
    def __init__(self, probs: torch.Tensor, num_positions: int, vocab_size: int):
        probs = probs.reshape(-1).to(torch.float64)
        assert probs.numel() == vocab_size ** num_positions, "probs must have V^N entries"
        self.N, self.V = num_positions, vocab_size
        self.probs = probs / probs.sum()
        # states[s] = the sequence with index s (position 0 most significant)
        s = torch.arange(self.probs.numel())
        self.states = torch.stack([(s // vocab_size ** (num_positions - 1 - n)) % vocab_size
                                   for n in range(num_positions)], dim=1)            # [S, N]

    @staticmethod
    def random(num_positions: int, vocab_size: int, seed: int = 0, spread: float = 1.5) -> "JointOracle":
        """An arbitrary strictly positive, correlated joint: p(x) proportional to exp(spread * z_x), z ~ N(0, 1)."""
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(vocab_size ** num_positions, generator=g, dtype=torch.float64)
        return JointOracle(torch.exp(spread * z), num_positions, vocab_size)

    def entropy(self) -> float:
        p = self.probs
        return float(-(p * p.log()).sum())

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """State index of sequences x [..., N]."""
        weights = self.V ** torch.arange(self.N - 1, -1, -1, device=x.device)
        return (x.long() * weights).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return self.states[idx]

    def posterior_marginals(self, lik: torch.Tensor) -> torch.Tensor:
        """lik [B, N, V] >= 0 -> exact posterior marginals [B, N, V] (float64)."""
        lik = lik.to(torch.float64).cpu()
        B = lik.shape[0]
        onehot = torch.nn.functional.one_hot(self.states, self.V).to(torch.float64).reshape(-1, self.N * self.V)
        # log prod_n lik[b, n, x^n] for every state x, as one matmul (a zero likelihood -> weight ~1e-300 x ...)
        log_lik = torch.log(lik.reshape(B, -1).clamp_min(1e-300)) @ onehot.T                        # [B, S]
        log_w = log_lik + self.probs.log()[None, :]
        weight = torch.softmax(log_w, dim=1)
        return (weight @ onehot).reshape(B, self.N, self.V)

    # ----- denoisers ---------------------------------------------------------------------------------
    def md4_denoiser(self, mask_id: int):
        """ids [B, N] (mask_id = masked) -> exact log p(x0^n | unmasked tokens) [B, N, V]."""
        def denoiser(ids: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
            masked = ids == mask_id
            lik = torch.nn.functional.one_hot(ids.clamp(max=self.V - 1).long(), self.V).to(torch.float64)
            lik = torch.where(masked[..., None], torch.ones_like(lik), lik)
            return self.posterior_marginals(lik).log().to(ids.device)
        return denoiser

    def genmd4_denoiser(self, mask_id: int, w: torch.Tensor, eps: float):
        """(ids [B, N], t [B]) -> exact log p(x0^n | x_t) under GenMD4's value-dependent masking."""
        w = w.detach().to(torch.float64).cpu()

        def denoiser(ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ids, t = ids.cpu(), t.to(torch.float64).cpu()
            masked = ids == mask_id
            lik = torch.nn.functional.one_hot(ids.clamp(max=self.V - 1).long(), self.V).to(torch.float64)
            mask_prob = (1.0 - eps) * t[:, None] ** w[None, :]                                  # [B, V]
            lik = torch.where(masked[..., None], mask_prob[:, None, :].expand_as(lik), lik)
            return self.posterior_marginals(lik).log()
        return denoiser

    def prime_denoiser(self, l: int):
        """sub-token ids y [B, N, l] (digit mask id = b) -> exact log p(x0^n | revealed digits) [B, N, V]."""
        from .prime import prime_base, token_digits
        b = prime_base(self.V, l)
        digits = token_digits(torch.arange(self.V), b, l)                                        # [V, l]

        def denoiser(y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
            y = y.cpu()
            ok = torch.ones(*y.shape[:2], self.V, dtype=torch.bool)
            for j in range(l):
                yj = y[..., j, None]
                ok &= (yj == b) | (yj == digits[None, None, :, j])
            return self.posterior_marginals(ok.to(torch.float64)).log()
        return denoiser


def total_variation(samples: torch.Tensor, oracle: JointOracle) -> float:
    """TV distance between the empirical distribution of samples [M, N] and the oracle's p."""
    counts = torch.bincount(oracle.index(samples.cpu()), minlength=oracle.probs.numel()).to(torch.float64)
    return 0.5 * float((counts / counts.sum() - oracle.probs).abs().sum())

