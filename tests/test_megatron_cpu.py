"""launcher/megatron_cpu.py: each megatron-core 0.16.1 failure on a CPU-only machine, before and after the layer.

The "before" half runs in a fresh interpreter (the layer patches megatron's modules for the whole process).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import launcher.megatron_cpu as megatron_cpu
from launcher.config import ModelConfig
from launcher.megatron_cpu import init_single_process_megatron
from launcher.parallelize import init_model_parallel
from model.denoiser import build_denoiser
from dist_utils import run_distributed, run_schedule

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer only acts without CUDA")

NO_GPU = ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled")

_WITHOUT_LAYER = textwrap.dedent("""
    import json, os, warnings
    warnings.filterwarnings("ignore")
    import torch, torch.distributed as dist
    import launcher.megatron_cpu as mc

    def error(f):
        try:
            f()
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    out = {}
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True             # apply() must do nothing where CUDA exists
    mc.apply()
    torch.cuda.is_available = real
    import megatron.core.pipeline_parallel.schedules as schedules
    out["noop_with_cuda"] = schedules.torch is torch and not mc.is_applied()

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.utils import GlobalMemoryBuffer
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    out["model_parallel_cuda_manual_seed"] = error(lambda: tensor_parallel.model_parallel_cuda_manual_seed(0))
    out["get_global_memory_buffer"] = error(
        lambda: parallel_state.get_global_memory_buffer().get_tensor((2, 2), torch.float32, "x"))
    out["rotary_embedding"] = error(
        lambda: RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(8))

    from launcher.config import ModelConfig
    from model.denoiser import build_denoiser
    from dist_utils import run_schedule
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, seq_len=8, vocab_size=50,
                      zero_init_output=False)
    x = torch.randint(0, 50, (2, 8))
    model = build_denoiser(cfg)
    out["schedule"] = error(lambda: run_schedule(model, [(x, x)]))

    # everything but the autocast re-wrap: CPU bf16 autocast backward through megatron's linear layers
    mc._rewrap_autocast_cpu = lambda cls: None
    mc.apply()
    mc.seed_model_parallel(0)
    def autocast_backward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll = model(x, x)
        nll.mean().backward()
    out["autocast_backward"] = error(autocast_backward)
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def without_layer() -> dict:
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_LAYER], capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).parent)   # so the child imports dist_utils
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


@pytest.fixture(scope="module", autouse=True)
def megatron_tp1():
    init_single_process_megatron(seed=1234)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_len=16, vocab_size=100,
                zero_init_output=False)
    return ModelConfig(**{**base, **overrides})


# ----- the layer itself -----------------------------------------------------------------------------

def test_apply_is_a_noop_where_cuda_exists(without_layer):
    assert without_layer["noop_with_cuda"] is True


def test_apply_is_idempotent():
    from megatron.core.pipeline_parallel import schedules

    megatron_cpu.apply()
    patched = schedules.torch
    megatron_cpu.apply()
    assert megatron_cpu.is_applied() and schedules.torch is patched and patched is not torch


def test_other_megatron_core_version_is_a_clear_error(monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match=r"written for megatron-core 0\.16\.1, but 0\.17\.0 is installed"):
        megatron_cpu.check_megatron_version()


# ----- each failure, before and after ------------------------------------------------------------------

def test_model_parallel_cuda_manual_seed_seeds_cpu_rng_and_tracker(without_layer):
    assert without_layer["model_parallel_cuda_manual_seed"].startswith("RuntimeError")
    assert any(m in without_layer["model_parallel_cuda_manual_seed"] for m in NO_GPU)

    from megatron.core import tensor_parallel

    megatron_cpu.seed_model_parallel(5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert set(tracker.get_states()) >= {"data-parallel-rng", "model-parallel-rng"}
    outside_expected = torch.Generator().manual_seed(5)
    with tracker.fork():                                   # 'model-parallel-rng' = seed + 2718 + tp_rank
        inside = torch.randn(4)
    assert torch.equal(inside, torch.randn(4, generator=torch.Generator().manual_seed(5 + 2718)))
    assert torch.equal(torch.randn(4), torch.randn(4, generator=outside_expected))   # outer stream untouched
    with tracker.fork():                                   # the tracked stream continues
        assert torch.equal(torch.randn(4), torch.randn(8, generator=torch.Generator().manual_seed(2723))[4:])


def test_global_memory_buffer_allocates_on_cpu(without_layer):
    assert any(m in without_layer["get_global_memory_buffer"] for m in NO_GPU)
    from megatron.core import parallel_state

    t = parallel_state.get_global_memory_buffer().get_tensor((3, 4), torch.float32, "test")
    assert t.shape == (3, 4) and t.device.type == "cpu"


def test_rotary_embedding_runs_on_cpu(without_layer):
    assert any(m in without_layer["rotary_embedding"] for m in NO_GPU)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(8)
    assert emb.shape == (8, 1, 1, 16) and emb.device.type == "cpu"


def test_schedule_without_pipelining_runs_forward_backward(without_layer):
    assert any(m in without_layer["schedule"] for m in NO_GPU)
    model = build_denoiser(tiny_config())
    x = torch.randint(0, 100, (2, 16))
    losses = run_schedule(model, [(x, x), (x, x)])
    assert len(losses) == 2 and all(math.isfinite(loss.item()) for loss in losses)
    assert all(p.grad is not None for p in model.parameters())


def test_cpu_bf16_autocast_backward_through_parallel_linears(without_layer):
    assert "expected m1 and m2 to have the same dtype" in without_layer["autocast_backward"]
    model = build_denoiser(tiny_config())
    x = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = model(x, x)
    nll.mean().backward()
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.grad.dtype == torch.float32


# ----- pipeline parallel on gloo --------------------------------------------------------------------

def _pp2_1f1b_worker(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

    init_model_parallel(tensor_parallel=1, pipeline_parallel=2, seed=1234)
    assert get_forward_backward_func() is schedules.forward_backward_pipelining_without_interleaving
    model = build_denoiser(tiny_config(), pre_process=ps.is_pipeline_first_stage(),
                           post_process=ps.is_pipeline_last_stage())
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 101, (2, 16), generator=g), torch.randint(0, 100, (2, 16), generator=g))
               for _ in range(3)]
    losses = run_schedule(model, batches)
    return {"losses": [loss.item() for loss in losses], "layers": len(model.decoder.layers),
            "grad_norm": sum(p.grad.norm() ** 2 for p in model.parameters()).sqrt().item()}


def test_1f1b_pipeline_schedule_runs_at_pp2_on_gloo():
    first, last = run_distributed(_pp2_1f1b_worker, world_size=2)
    assert first["layers"] == last["layers"] == 1
    assert first["losses"] == [] and len(last["losses"]) == 3
    assert all(math.isfinite(v) for v in last["losses"])
    assert first["grad_norm"] > 0 and last["grad_norm"] > 0      # gradients reached the first stage
