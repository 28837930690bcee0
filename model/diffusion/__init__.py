"""Masked-diffusion math: pure torch, no parallelism, no megatron."""
from .schedules import Schedule, make_schedule
from .md4 import antithetic_times, corrupt, continuous_loss_from_nll, reconstruction_nats, bits_per_token
