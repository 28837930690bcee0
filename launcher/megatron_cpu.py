"""megatron-core on machines without CUDA: the one place for the compatibility layer.

megatron-core 0.16.1 assumes a GPU in a handful of places. `apply()` patches exactly those places, and only
inside megatron's own modules (torch itself is never patched globally); on a machine with CUDA it does
nothing. Each patch below names the verbatim error it fixes (torch 2.14.1 CUDA build, no driver; a CPU-only
torch says "Torch not compiled with CUDA enabled" instead of "Found no NVIDIA driver ...").

  1. "the GPU RNG" is torch's CPU generator: megatron's RNG tracker (model_parallel_cuda_manual_seed,
     CudaRNGStatesTracker.add/fork/get_states/set_states, activation-checkpoint RNG save/restore) reads and
     writes torch.get_rng_state()/torch.set_rng_state(); torch.cuda.manual_seed(s) there means
     torch.manual_seed(s).
  2. `torch.cuda.current_device()` / `synchronize()` and `device="cuda"` literals inside the pipeline
     schedules, p2p communication, tensor-parallel mappings and layers (sequence parallelism's gather
     and reduce-scatter buffers) and rotary embedding modules mean the CPU.
  3. GlobalMemoryBuffer (get_global_memory_buffer) allocates on the CPU.
  4. Tensor-parallel linear layers honour CPU autocast in backward (megatron decorates their autograd
     functions with custom_fwd/custom_bwd(device_type="cuda"), so under torch.autocast("cpu") the backward
     ran without autocast and mixed bf16 grads with fp32 weights).

The engine calls `apply()` once per process before building a model (launcher.parallelize.init_model_parallel
does it).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any

import torch

MEGATRON_CORE_VERSION = "0.16.1"   # the version every patch below was read against

_applied = False


# ---------------------------------------------------------------------------------------------
# `torch` as seen from inside a patched megatron module: `torch.cuda` means the CPU
# ---------------------------------------------------------------------------------------------

def _cpu_device(device: Any) -> Any:
    """'cuda', 'cuda:0', torch.device('cuda') or a bare GPU index -> cpu; anything else unchanged."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CpuCuda:
    """Stands in for `torch.cuda` inside a patched megatron module; everything not listed is torch.cuda's."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _CpuTorch:
    """Stands in for the `torch` module inside a patched megatron module.

    Differences from torch: `.cuda` is `_CpuCuda`, tensor factories put `device="cuda"` tensors on the CPU,
    and `autocast("cuda", ...)` is CPU autocast. Everything else is looked up on torch itself."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def autocast(device_type: str = "cuda", *args: Any, **kwargs: Any):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _factory_on_cpu(fn):
    def wrapped(*args: Any, **kwargs: Any):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)
    wrapped.__name__ = fn.__name__
    return staticmethod(wrapped)


for _name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint"):
    setattr(_CpuTorch, _name, _factory_on_cpu(getattr(torch, _name)))

_CPU_TORCH = _CpuTorch()

# megatron modules whose `torch` is _CPU_TORCH, each with the verbatim error it raised without the layer
_MODULES_SEEING_CPU_TORCH = {
    # forward_backward_no_pipelining / _pipelining_without_interleaving / _with_interleaving:
    #   total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")
    #   -> RuntimeError: Found no NVIDIA driver on your system. ...
    "megatron.core.pipeline_parallel.schedules",
    # P2PCommunicator._communicate: torch.empty(..., device=torch.cuda.current_device()) receive buffers,
    # torch.cuda.synchronize() after batched p2p
    #   -> RuntimeError: Found no NVIDIA driver on your system. ...
    "megatron.core.pipeline_parallel.p2p_communication",
    # RotaryEmbedding.get_emb: self.inv_freq.to(device=torch.cuda.current_device())
    #   -> RuntimeError: Found no NVIDIA driver on your system. ...
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # _gather_along_last_dim / _gather_along_first_dim / _reduce_scatter_*: output buffers on
    # torch.cuda.current_device() (gather_from_tensor_model_parallel_region, i.e. gathering TP logits)
    #   -> RuntimeError: Found no NVIDIA driver on your system. ...
    "megatron.core.tensor_parallel.mappings",
    # LinearWithGradAccumulationAndAsyncCommunication.backward under sequence parallelism: the
    # reduce-scatter buffer torch.empty(..., device=torch.cuda.current_device())
    #   -> RuntimeError: Found no NVIDIA driver on your system. ...
    "megatron.core.tensor_parallel.layers",
    # CudaRNGStatesTracker.add: torch.cuda.get_rng_state()  (from model_parallel_cuda_manual_seed)
    #   -> RuntimeError: Found no NVIDIA driver on your system. ...
    # model_parallel_cuda_manual_seed: torch.cuda.manual_seed(seed) silently queues a lazy call that never
    #   runs (no error, no seeding); here it seeds the CPU generator, as it seeds the GPU one on a GPU.
    "megatron.core.tensor_parallel.random",
}


# ---------------------------------------------------------------------------------------------
# Replacements for megatron functions that cannot be fixed by the module-level `torch`
# ---------------------------------------------------------------------------------------------

def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Replaces tensor_parallel.random._get_cuda_rng_state, which calls torch.cuda.random.get_rng_state:
    RuntimeError: Found no NVIDIA driver on your system. ..."""
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    """Replaces tensor_parallel.random._set_cuda_rng_state, which queues the state change with
    torch.cuda._lazy_call: without CUDA the call never runs (no error; the state is silently not set)."""
    torch.set_rng_state(new_state)


@contextlib.contextmanager
def _fork_cpu(self, name: str = "model-parallel-rng"):
    """Replaces CudaRNGStatesTracker.fork: same bookkeeping on the CPU generator. The original also checks
    that the CPU RNG is untouched inside the fork, which is false by construction once the tracked state
    lives on the CPU generator; it logged "CPU RNG state changed within GPU RNG context" on every use."""
    if name not in self.states_:
        raise Exception("cuda rng state {} is not added".format(name))
    orig_state = torch.get_rng_state()
    orig_state_name = self._current_state_name
    if orig_state_name != "default-rng":
        self.states_[orig_state_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the same as the "
                            f"desired state name {name}.")
        self.states_[name] = torch.get_rng_state()
        if orig_state_name != "default-rng":
            orig_state = self.states_[orig_state_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_state_name


def _global_buffer_get_tensor_cpu(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """Replaces GlobalMemoryBuffer.get_tensor (tensor-parallel all-gather buffers, attention matmul buffer),
    which allocates on torch.cuda.current_device(): RuntimeError: Found no NVIDIA driver on your system."""
    required_len = 1
    for d in tensor_shape:
        required_len *= d
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required_len:
        buf = self.buffer[(name, dtype)] = torch.empty(required_len, dtype=dtype, device="cpu",
                                                       requires_grad=False)
    return buf[0:required_len].view(*tensor_shape)


def _rewrap_autocast_cpu(cls: type) -> None:
    """megatron wraps LinearWithGradAccumulationAndAsyncCommunication.forward/backward (and LinearWithFrozenWeight's)
    with torch.amp.custom_fwd/custom_bwd(device_type="cuda"). Under torch.autocast("cpu") the
    backward then runs with CPU autocast off and fails with
    "RuntimeError: expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float".
    Re-wrap the undecorated functions for device_type="cpu"."""
    fwd = cls.__dict__["forward"].__func__
    bwd = cls.__dict__["backward"].__func__
    fwd = getattr(fwd, "__wrapped__", fwd)
    bwd = getattr(bwd, "__wrapped__", bwd)
    cls.forward = staticmethod(torch.amp.custom_fwd(fwd, device_type="cpu"))
    cls.backward = staticmethod(torch.amp.custom_bwd(bwd, device_type="cpu"))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def check_megatron_version() -> None:
    """Raise if the installed megatron-core is not the version this layer was written for."""
    from megatron.core import package_info

    found = package_info.__version__
    if found != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"launcher/megatron_cpu.py was written for megatron-core {MEGATRON_CORE_VERSION}, but "
            f"{found} is installed: re-read the patched functions against the new version (or pin "
            f"megatron-core=={MEGATRON_CORE_VERSION}).")


def is_applied() -> bool:
    return _applied


def apply() -> None:
    """Patch megatron-core for CPU-only execution. No-op when CUDA is available; safe to call repeatedly."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    check_megatron_version()
    import importlib

    for mod_name in _MODULES_SEEING_CPU_TORCH:
        importlib.import_module(mod_name).torch = _CPU_TORCH

    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import layers as tp_layers
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _get_cpu_rng_state
    tp_random._set_cuda_rng_state = _set_cpu_rng_state
    tp_random.CudaRNGStatesTracker.fork = _fork_cpu
    mcore_utils.GlobalMemoryBuffer.get_tensor = _global_buffer_get_tensor_cpu
    _rewrap_autocast_cpu(tp_layers.LinearWithGradAccumulationAndAsyncCommunication)
    _rewrap_autocast_cpu(tp_layers.LinearWithFrozenWeight)
    _applied = True


def seed_model_parallel(seed: int) -> None:
    """Seed torch's generator and megatron's RNG tracker the way megatron's training does.

    All tensor-parallel ranks of a pipeline stage get the same CPU seed, so megatron's CPU initialisation
    (`use_cpu_initialization`: the full master weight is drawn, then split) gives the same master weights
    at any TP size; the tracker's 'model-parallel-rng' state differs per TP rank (seed + 2718 + tp_rank)."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_single_process_megatron(seed: int = 1234) -> None:
    """For tests and tools: a one-process gloo world with TP=PP=1, the CPU layer applied, seeded."""
    import torch.distributed as dist

    from launcher.distributed import free_port
    from launcher.parallelize import init_model_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    init_model_parallel(1, 1, seed)


def destroy_megatron() -> None:
    """Tear down parallel_state and the default process group (tests that re-initialise)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
