"""model/plain.py computes what the megatron denoiser computes: same logits, same per-token NLL and the same
objective losses for MD4, Prime and GenMD4, given the same (unpadded) weights; and launcher/export.py's
name-based tensor-parallel split rules are megatron's own."""
from __future__ import annotations

import pytest
import torch

from launcher.config import DiffusionConfig, ModelConfig
from launcher.export import strip_padding
from launcher.megatron_cpu import init_single_process_megatron
from launcher.parallelize import tp_split_dims
from model.denoiser import build_denoiser, gather_logits
from model.objectives import heldout_nelbo, make_objective, network_parts
from model.plain import PlainDenoiser

VOCAB, SEQ = 101, 16      # padded to 128 inside megatron


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    init_single_process_megatron(seed=1234)


def pair(kind: str, position_embedding: str = "rope", time_conditioning: str = "none"):
    mcfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_len=SEQ, vocab_size=VOCAB,
                       dropout=0.0, zero_init_output=False, position_embedding=position_embedding,
                       time_conditioning=time_conditioning)
    dcfg = DiffusionConfig(kind=kind, prime_l=2)
    torch.manual_seed(3)
    meg = build_denoiser(mcfg, **network_parts(dcfg, mcfg.vocab_size)).eval()
    with torch.no_grad():
        for n, p in meg.named_parameters():
            if "layernorm" in n or "ada_ln" in n or n.endswith("bias") or n == "genmd4_schedule.raw":
                p.add_(0.1 * torch.randn_like(p))       # make every parameter matter
    plain = PlainDenoiser.from_config(mcfg, dcfg).eval()
    full = strip_padding({n: p.detach() for n, p in meg.named_parameters()}, VOCAB)
    missing = plain.load_state_dict(full, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return meg, plain, mcfg, dcfg


def inputs(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, VOCAB, (3, SEQ), generator=g)
    if kind == "prime":
        from model.diffusion.prime import prime_base, token_digits
        b = prime_base(VOCAB, 2)
        y = token_digits(x0, b, 2)
        return x0, torch.where(torch.rand(y.shape, generator=g) < 0.5, torch.full_like(y, b), y)
    return x0, torch.where(torch.rand(x0.shape, generator=g) < 0.5, torch.full_like(x0, VOCAB), x0)


@pytest.mark.parametrize("kind,pos,tc", [("md4", "rope", "none"), ("md4", "learned", "none"), ("prime", "rope", "none"),
                                         ("genmd4", "rope", "none"), ("md4", "rope", "adaln"), ("prime", "rope", "adaln")])
def test_plain_forward_equals_megatron_forward(kind, pos, tc):
    meg, plain, mcfg, dcfg = pair(kind, pos, tc)
    x0, xt = inputs(kind)
    t = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64) if tc == "adaln" else None
    with torch.no_grad():
        want = gather_logits(meg(xt, t=t), VOCAB)
        got = plain(xt, t=t)
    assert got.shape == want.shape == (3, SEQ, VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if tc == "adaln":   # the time changes the output
        with torch.no_grad():
            assert (plain(xt, t=t.flip(0)) - got).abs().max() > 1e-3
    if kind != "prime":
        masked = xt == VOCAB
        with torch.no_grad():
            torch.testing.assert_close(plain(xt, x0, masked, t=t), meg(xt, x0, masked, t=t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,tc", [("md4", "none"), ("prime", "none"), ("genmd4", "none"), ("md4", "adaln"),
                                     ("genmd4", "adaln")])
def test_plain_model_gives_the_same_heldout_bound(kind, tc):
    from launcher.config import Config
    meg, plain, mcfg, dcfg = pair(kind, time_conditioning=tc)
    cfg = Config(model=mcfg, diffusion=dcfg)
    x0, _ = inputs(kind, seed=1)
    a = heldout_nelbo(meg, make_objective(cfg, meg), x0, draws=2, seed=5)
    b = heldout_nelbo(plain, make_objective(cfg, plain), x0, draws=2, seed=5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tc", ["none", "adaln"])
def test_split_rules_are_megatrons(tc):
    meg, *_ = pair("md4", time_conditioning=tc)
    from test_export_eval import megatron_split_dim

    for name, want in tp_split_dims(meg).items():      # megatron's own partition attributes
        assert megatron_split_dim(name) == want, name
