"""The denoiser: bidirectional, exactly V output classes, log V at zero init, and the same numbers at
TP=2 and PP=2 (2 gloo processes) as at TP=PP=1 given the same weights."""
from __future__ import annotations

import math
import re

import pytest
import torch

from launcher.config import ModelConfig
from launcher.megatron_cpu import init_single_process_megatron
from launcher.parallelize import init_model_parallel, sum_sequence_parallel_grads, tp_split_dims
from model.objectives import network_parts
from model.denoiser import build_denoiser, gather_logits
from dist_utils import run_distributed, run_schedule

VOCAB = 101        # odd: at TP=2 the output has one padded class
SEQ = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # megatron builds on the GPU where there is one
gloo_only = pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks on CPU; GPU runs use NCCL")


def tiny_config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_len=SEQ, vocab_size=VOCAB,
                dropout=0.0, zero_init_output=False, make_vocab_size_divisible_by=128)
    base.update(overrides)
    return ModelConfig(**base)


def batch(seed: int, b: int = 2, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (b, SEQ), generator=g)
    masked = torch.rand(b, SEQ, generator=g) < 0.5
    inputs = torch.where(masked, torch.full_like(labels, VOCAB), labels)   # mask id = VOCAB
    return inputs.to(device), labels.to(device)


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    init_single_process_megatron(seed=1234)


# ----- helpers shared with the spawned ranks ---------------------------------------------------------

def load_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int,
                      layer_offset: int = 0) -> None:
    """Copy TP=1/PP=1 weights into a TP/PP shard: slice tensor-parallel params along their partition dim
    (zero-padding vocab rows past the real ones), shift layer numbers by this stage's first layer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = full[global_name(name, layer_offset)]
            if getattr(p, "tensor_model_parallel", False):
                dim, local = p.partition_dim, p.shape[p.partition_dim]
                start = tp_rank * local
                piece = src.narrow(dim, min(start, src.shape[dim]), max(0, min(local, src.shape[dim] - start)))
                p.zero_()
                p.narrow(dim, 0, piece.shape[dim]).copy_(piece)
            else:
                p.copy_(src)


def global_name(name: str, layer_offset: int) -> str:
    return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + layer_offset}.", name)


def grads_by_name(model: torch.nn.Module, layer_offset: int = 0) -> dict[str, torch.Tensor]:
    return {global_name(n, layer_offset): p.grad.detach().clone() for n, p in model.named_parameters()}


def perturb_adaln(model: torch.nn.Module) -> None:
    """adaLN-zero's maps start at zero: give them weights so that they matter."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ada_ln" in n:
                p.normal_(0, 0.02)


def reference(cfg: ModelConfig, batches, diffusion_cfg=None, bf16: bool = False) -> tuple[dict, list[torch.Tensor], dict]:
    """TP=PP=1 in this process: full weights, per-token NLL of each batch, gradients of sum of mean NLLs
    (bf16: the forward under bf16 autocast)."""
    torch.manual_seed(7)
    model = build_denoiser(cfg, **network_parts(diffusion_cfg, cfg.vocab_size))
    perturb_adaln(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        nlls = [model(b[0], b[1], t=b[2] if len(b) > 2 else None) for b in batches]
    sum(n.mean() for n in nlls).backward()
    return weights, [n.detach() for n in nlls], grads_by_name(model)


# ----- single process ----------------------------------------------------------------------------------

def test_attention_is_bidirectional_last_token_changes_first_position():
    model = build_denoiser(tiny_config())
    x, _ = batch(0, b=1, device=DEVICE)
    x2 = x.clone()
    x2[0, -1] = (x[0, -1] + 1) % VOCAB
    with torch.no_grad():
        first, second = model(x)[0, 0, :VOCAB], model(x2)[0, 0, :VOCAB]
    assert (first - second).abs().max() > 1e-4


@pytest.mark.parametrize("position_embedding", ["rope", "learned"])
def test_output_has_exactly_vocab_size_classes(position_embedding):
    model = build_denoiser(tiny_config(position_embedding=position_embedding))
    x, _ = batch(1, device=DEVICE)
    logits = gather_logits(model(x))
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()
    assert torch.equal(model.gather_logits(model(x)), logits)
    assert model.input_vocab_size == 128 and model.mask_id == VOCAB


def test_zero_initialised_output_gives_log_v_at_init():
    model = build_denoiser(tiny_config(zero_init_output=True))
    assert model.output_layer.weight.abs().max() == 0
    x, y = batch(2, device=DEVICE)
    nll = model(x, y)
    assert nll.dtype == torch.float32 and nll.shape == (2, SEQ)
    torch.testing.assert_close(nll, torch.full_like(nll, math.log(VOCAB)), atol=1e-6, rtol=0)


def test_fp32_params_train_under_bf16_autocast():
    model = build_denoiser(tiny_config())
    x, y = batch(3, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        nll = model(x, y)
    assert nll.dtype == torch.float32
    nll.mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(nll.mean().item() - model(x, y).mean().item()) < 0.05


# ----- tensor parallel: TP=2 vs TP=1 -------------------------------------------------------------------

def _tp2_worker(rank, world_size, weights, batches, sequence_parallel=False):
    init_model_parallel(tensor_parallel=2, pipeline_parallel=1, seed=1234)
    model = build_denoiser(tiny_config(), sequence_parallel=sequence_parallel)
    if sequence_parallel:
        sum_sequence_parallel_grads(model)
    load_full_weights(model, weights, tp_rank=rank)
    nlls = [model(x, y) for x, y in batches]
    sum(n.mean() for n in nlls).backward()
    local_logits = model(batches[0][0]).detach()
    full_logits = gather_logits(local_logits, VOCAB)
    assert torch.equal(gather_logits(local_logits), full_logits)   # padded classes found without V
    return {"nll": [n.detach() for n in nlls], "grads": grads_by_name(model), "local_logits": local_logits,
            "full_logits": full_logits, "output_grad": model.output_layer.weight.grad.clone()}


@gloo_only
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_matches_tp1_nll_and_gradients(sequence_parallel):
    """Also with sequence parallelism: norms and row-parallel biases see half the sequence on each rank, and
    their gradients, summed over TP by the hooks, equal the TP=1 ones."""
    cfg = tiny_config()
    batches = [batch(10), batch(11)]
    weights, ref_nll, ref_grads = reference(cfg, batches)
    ranks = run_distributed(_tp2_worker, world_size=2, args=(weights, batches, sequence_parallel))

    for r in ranks:
        for got, want in zip(r["nll"], ref_nll):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # padded output classes (ids 101..127, on rank 1; the padding does not depend on TP): -inf, never
    # win, no gradient
    assert ranks[0]["local_logits"].shape[-1] == 64 and ranks[1]["local_logits"].shape[-1] == 64
    assert torch.isneginf(ranks[1]["local_logits"][..., VOCAB - 64:]).all()
    assert torch.isfinite(ranks[1]["local_logits"][..., :VOCAB - 64]).all()
    assert ranks[1]["output_grad"][VOCAB - 64:].abs().max() == 0
    assert ranks[0]["full_logits"].shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(ranks[0]["full_logits"], ranks[1]["full_logits"])

    assert_tp_grads_match(cfg, None, ranks, ref_grads)


def _close_fp32(got, want, name):
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}")


def assert_tp_grads_match(cfg, diffusion_cfg, ranks, ref_grads, close=_close_fp32) -> None:
    """TP shards concatenated along their partition dim (replicated parameters: every rank's) == TP=1."""
    probe = build_denoiser(cfg, **network_parts(diffusion_cfg, cfg.vocab_size))   # only for the split dims
    for name, dim in tp_split_dims(probe).items():
        want = ref_grads[name]
        if dim is not None:
            got = torch.cat([r["grads"][name] for r in ranks], dim=dim)
            close(got.narrow(dim, 0, want.shape[dim]), want, name)
        else:
            for r in ranks:
                close(r["grads"][name], want, name)


def _tp2_sp_variant_worker(rank, world_size, weights, batches, cfg, diffusion_cfg, bf16=False):
    init_model_parallel(tensor_parallel=2, pipeline_parallel=1, seed=1234)
    model = build_denoiser(cfg, **network_parts(diffusion_cfg, cfg.vocab_size), sequence_parallel=True)
    sum_sequence_parallel_grads(model)
    load_full_weights(model, weights, tp_rank=rank)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        nlls = [model(b[0], b[1], t=b[2] if len(b) > 2 else None) for b in batches]
    sum(n.mean() for n in nlls).backward()
    return {"nll": [n.detach() for n in nlls], "grads": grads_by_name(model)}


@gloo_only
def test_sequence_parallel_trains_under_bf16_autocast():
    """fp32 master weights under bf16 autocast (this engine's bf16): megatron's sequence-parallel backward
    reduce-scatters bf16 gradients into a buffer of the linear's input dtype, so the column-parallel inputs
    are cast first (AutocastInputColumnParallelLinear). Same NLL and gradients as TP=1 to bf16 precision."""
    cfg = tiny_config(time_conditioning="adaln")
    g = torch.Generator().manual_seed(14)
    batches = [(*batch(15 + k), torch.rand(2, dtype=torch.float64, generator=g)) for k in range(2)]
    weights, nlls, ref_grads = reference(cfg, batches, bf16=True)
    ranks = run_distributed(_tp2_sp_variant_worker, world_size=2, args=(weights, batches, cfg, None, True))
    for r in ranks:
        for got, want in zip(r["nll"], nlls):
            torch.testing.assert_close(got.mean(), want.mean(), atol=0.02, rtol=0)

    def close_bf16(got, want, name):
        assert (got - want).norm() <= 0.05 * want.norm() + 1e-6, name
    assert_tp_grads_match(cfg, None, ranks, ref_grads, close=close_bf16)


@gloo_only
@pytest.mark.parametrize("variant", ["image", "prime", "adaln"])
def test_sequence_parallel_image_and_prime_inputs_match_tp1(variant):
    """The inputs the embedding cannot scatter by itself (pixel positions added to the whole sequence;
    Prime's replicated sub-token table) are scattered after they are formed; adaLN's modulation meets one
    sequence slice per rank: same NLL and gradients."""
    from launcher.config import DiffusionConfig
    from model.diffusion.prime import prime_base

    g = torch.Generator().manual_seed(12)
    if variant == "image":
        cfg, dcfg = tiny_config(vocab_size=256, image_shape=[2, 4, 2]), None
        batches = [(torch.randint(0, 257, (2, SEQ), generator=g), torch.randint(0, 256, (2, SEQ), generator=g))
                   for _ in range(2)]
    elif variant == "adaln":
        cfg, dcfg = tiny_config(time_conditioning="adaln"), None
        batches = [(*batch(13 + k), torch.rand(2, dtype=torch.float64, generator=g)) for k in range(2)]
    else:
        cfg, dcfg = tiny_config(), DiffusionConfig(kind="prime", prime_l=2)
        b = prime_base(VOCAB, 2)
        batches = [(torch.randint(0, b + 1, (2, SEQ, 2), generator=g), torch.randint(0, VOCAB, (2, SEQ), generator=g))
                   for _ in range(2)]
    weights, ref_nll, ref_grads = reference(cfg, batches, dcfg)
    ranks = run_distributed(_tp2_sp_variant_worker, world_size=2, args=(weights, batches, cfg, dcfg))
    for r in ranks:
        for got, want in zip(r["nll"], ref_nll):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_tp_grads_match(cfg, dcfg, ranks, ref_grads)


# ----- pipeline parallel: PP=2 vs PP=1 through megatron's schedules ------------------------------------

def _pp2_worker(rank, world_size, weights, batches):
    from megatron.core import parallel_state as ps

    init_model_parallel(tensor_parallel=1, pipeline_parallel=2, seed=1234)
    cfg = tiny_config()
    model = build_denoiser(cfg, pre_process=ps.is_pipeline_first_stage(),
                           post_process=ps.is_pipeline_last_stage())
    offset = rank * (cfg.num_layers // 2)
    load_full_weights(model, weights, tp_rank=0, layer_offset=offset)
    losses = run_schedule(model, batches)
    return {"losses": losses, "grads": grads_by_name(model, offset)}


@gloo_only
def test_pp2_matches_pp1_through_megatron_schedules():
    cfg = tiny_config()
    batches = [batch(20), batch(21), batch(22)]
    torch.manual_seed(7)
    model = build_denoiser(cfg)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_losses = run_schedule(model, batches)            # PP=1: forward_backward_no_pipelining
    ref_grads = grads_by_name(model)

    ranks = run_distributed(_pp2_worker, world_size=2, args=(weights, batches))
    assert ranks[0]["losses"] == []                       # losses live on the last stage
    torch.testing.assert_close(torch.stack(ranks[1]["losses"]), torch.stack(ref_losses), atol=1e-6, rtol=0)
    stage_grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert stage_grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(stage_grads[name], want, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")


def _pp2_vpp2_worker(rank, world_size, weights, batches):
    """Interleaved PP: 4 layers on 2 ranks x 2 model chunks, built by build_pipeline_stage (the whole model's
    CPU initialisation, sliced), compared with the PP=1 weights through global_parameter_name."""
    from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

    from launcher.parallelize import ModelChunks, build_pipeline_stage, global_parameter_name, model_chunks

    init_model_parallel(tensor_parallel=1, pipeline_parallel=2, seed=1234, virtual_pipeline=2)
    assert get_forward_backward_func() is schedules.forward_backward_pipelining_with_interleaving
    cfg = tiny_config(num_layers=4)
    torch.manual_seed(7)
    stage = build_pipeline_stage(cfg)
    assert isinstance(stage, ModelChunks)
    layout = dict(num_layers=4, pipeline_parallel=2, virtual_pipeline=2, pp_rank=rank)
    to_global = {n: global_parameter_name(n, **layout) for n, _ in stage.named_parameters()}
    init_equal = all(torch.equal(p, weights[to_global[n]]) for n, p in stage.named_parameters())
    chunks = model_chunks(stage)
    facts = {"pre": [c.pre_process for c in chunks], "post": [c.post_process for c in chunks],
             "layers": [[layer.layer_number for layer in c.decoder.layers] for c in chunks],
             "init_equal": init_equal}
    losses = run_schedule(chunks, batches)
    grads = {to_global[n]: p.grad.detach().clone() for n, p in stage.named_parameters()}
    return {"losses": losses, "grads": grads, **facts}


@gloo_only
def test_interleaved_pp2_vpp2_matches_pp1_through_megatron_schedules():
    """Chunk c of pipeline rank p holds global layers (c * 2 + p) (megatron's interleaved assignment), starts
    from the PP=1 model's CPU initialisation, and the interleaved 1F1B schedule gives the PP=1 losses and
    gradients."""
    cfg = tiny_config(num_layers=4)
    batches = [batch(20), batch(21), batch(22), batch(23)]      # a multiple of PP micro-batches
    torch.manual_seed(7)
    model = build_denoiser(cfg)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_losses = run_schedule(model, batches)
    ref_grads = grads_by_name(model)

    ranks = run_distributed(_pp2_vpp2_worker, world_size=2, args=(weights, batches))
    assert [r["pre"] for r in ranks] == [[True, False], [False, False]]
    assert [r["post"] for r in ranks] == [[False, False], [False, True]]
    assert [r["layers"] for r in ranks] == [[[1], [3]], [[2], [4]]]     # megatron's 1-based global numbers
    assert all(r["init_equal"] for r in ranks)                          # the same weights as at PP=1
    assert ranks[0]["losses"] == []
    torch.testing.assert_close(torch.stack(ranks[1]["losses"]), torch.stack(ref_losses), atol=1e-6, rtol=0)
    grads = {**ranks[0]["grads"], **ranks[1]["grads"]}
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")


def test_loss_mask_computes_the_same_nll_and_gradients_at_masked_positions():
    torch.manual_seed(0)
    cfg = tiny_config(zero_init_output=False)
    model = build_denoiser(cfg)
    x, _ = batch(3)
    mask = torch.rand(x.shape) < 0.4
    full = model(x, labels=x)
    (full * mask).sum().backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    part = model(x, labels=x, loss_mask=mask)
    assert torch.equal(part[~mask], torch.zeros_like(part[~mask]))
    torch.testing.assert_close(part[mask], full[mask], rtol=1e-5, atol=1e-5)
    part.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_sdpa_attention_matches_megatron_dot_product_attention():
    """The default core attention (torch SDPA) computes what megatron's unfused DotProductAttention does."""
    torch.manual_seed(3)
    sdpa = build_denoiser(tiny_config(attention="sdpa"))
    torch.manual_seed(3)
    ref = build_denoiser(tiny_config(attention="megatron"))
    assert type(sdpa.decoder.layers[0].self_attention.core_attention).__name__ == "SDPACoreAttention"
    assert type(ref.decoder.layers[0].self_attention.core_attention).__name__ == "DotProductAttention"
    ref.load_state_dict(sdpa.state_dict())
    x, y = batch(5)
    a, b = sdpa(x, labels=y), ref(x, labels=y)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(sdpa.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("recompute,tc", [("selective", "none"), ("full", "none"), ("full", "adaln")])
def test_activation_recomputation_keeps_loss_and_gradients(recompute, tc):
    """(adaln: the time features travel through megatron's checkpointed block as the layers' `context`.)"""
    torch.manual_seed(4)
    plain = build_denoiser(tiny_config(time_conditioning=tc))
    perturb_adaln(plain)
    torch.manual_seed(4)
    again = build_denoiser(tiny_config(recompute=recompute, time_conditioning=tc))
    assert again.config.recompute_granularity == recompute
    again.load_state_dict(plain.state_dict())
    x, y = batch(6)
    t = torch.tensor([0.2, 0.7]) if tc == "adaln" else None
    a, b = plain(x, labels=y, t=t), again(x, labels=y, t=t)
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    for (n, p), q in zip(plain.named_parameters(), again.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_image_denoiser_knows_row_column_and_channel():
    """Pixel model: the same sub-pixel value at two places gets different logits at init (positions are
    embedded), and its NLL and gradients run through the same vocab-parallel machinery."""
    torch.manual_seed(8)
    model = build_denoiser(tiny_config(vocab_size=256, seq_len=SEQ, image_shape=[2, 4, 2], position_embedding="learned"))
    assert model.pixel_position.image_shape == (2, 4, 2)
    x = torch.full((1, SEQ), 256)             # all masked
    x[0, 0] = 7
    logits = model(x)
    assert not torch.allclose(logits[0, 1], logits[0, 2])
    nll = model(x, labels=torch.randint(0, 256, (1, SEQ)))
    nll.sum().backward()
    assert model.pixel_position.channel.weight.grad.abs().sum() > 0
