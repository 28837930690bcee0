"""Masked-diffusion math: pure torch, no megatron. One file per idea:
schedules (alpha(t)), md4 (bounds), genmd4 (learned per-value schedule), prime (sub-tokens),
noise (the one source of the loss's randomness, keyed by step and sample or by row), samplers, oracle (exact-conditional denoiser for tests and benchmarks), vocab (where the logit columns
live: the reductions a vocab-parallel loss needs, the identity by default; collectives only in model/vocab_parallel.py)."""
from .schedules import Schedule, make_schedule
from .vocab import LOCAL, VocabShard
from .md4 import (antithetic_times, corrupt, continuous_loss_from_nll, reconstruction_nats, bits_per_token,
                  token_nll_from_logits, discrete_steps, discrete_loss_from_nll, perplexity)
from .genmd4 import (GenMD4Schedule, genmd4_token_terms, genmd4_loss, genmd4_loss_from_logits,
                     genmd4_reconstruction_from_logits, reinforce_loo)
from .prime import (prime_base, token_digits, digits_to_tokens, corrupt_subtokens, SubTokenEmbedding,
                    carry_over_filter, digit_log_marginals, digit_nll, prime_loss_from_digit_nll)
from .noise import row_noise, step_noise
from .samplers import sample, sample_genmd4, sample_prime, sample_semi_ar, time_grid, top_p_filter, logits_to_probs
