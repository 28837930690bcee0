"""torch.distributed + megatron parallel state, initialised from the submitit / SLURM environment.

The one place where the process layout is decided: world -> (tensor, pipeline, data) groups.
gloo on CPU, NCCL on GPU. DeepSpeed gets an `mpu` that answers from megatron's parallel_state.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on the loopback interface (MASTER_PORT of a one-machine world)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def master_port() -> int:
    """The rendezvous port of a submitit job, the same on every task. Local executor: the free port the
    submitter chose (MDIFF_MASTER_PORT). SLURM: drawn from the job id (the same again after a requeue) in
    15000-29999, below Linux's ephemeral range (32768-60999) where other connections' ports live;
    submitit's own choice (20000-60000) can collide with them."""
    import zlib

    import submitit

    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and os.environ.get("MDIFF_MASTER_PORT"):
        return int(os.environ["MDIFF_MASTER_PORT"])
    job_id = submitit.JobEnvironment().job_id
    return 15000 + zlib.crc32(str(job_id).encode()) % 15000


def export_env_from_launcher() -> str:
    """Set MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from submitit (SLURM or local executor).

    In a submitit task (SUBMITIT_EXECUTOR is set by both executors) submitit's answer wins: sbatch
    exports the submitter's whole environment, so RANK/MASTER_* found there may be stale leftovers of
    the shell that submitted. Under SLURM, MASTER_ADDR is the first host of SLURM_JOB_NODELIST and
    MASTER_PORT is drawn from the job id (the same on every task, and again after a requeue); see
    `master_port`.
    Elsewhere (torchrun, tests using mp.spawn) variables that are already set are used as they are.
    Returns where the values came from.
    """
    under_submitit = "SUBMITIT_EXECUTOR" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ
    if not under_submitit and all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        os.environ.setdefault("LOCAL_RANK", "0")
        return "environment"
    import submitit

    for k in _DIST_VARS:
        os.environ.pop(k, None)
    os.environ["MASTER_PORT"] = str(master_port())   # read by submitit's constructor ...
    env = submitit.helpers.TorchDistributedEnvironment()
    del os.environ["MASTER_PORT"]                       # ... whose export() refuses to overwrite it
    env.export(set_cuda_visible_devices=False)
    return f"submitit ({os.environ.get('SUBMITIT_EXECUTOR', 'unknown')} executor)"


def init_distributed(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                     timeout_minutes: int = 30, virtual_pipeline: int = 1) -> DistInfo:
    """Initialise the default process group and megatron's model-parallel groups (virtual_pipeline > 1:
    that many model chunks per pipeline rank, megatron's interleaved schedule)."""
    from megatron.core import parallel_state

    from launcher import parallelize

    use_cuda = torch.cuda.is_available()
    source = export_env_from_launcher()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    import launcher

    print(f"[rank {rank}/{world}] torch.distributed {'nccl' if use_cuda else 'gloo'} env:// at "
          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (local rank {local_rank}, from {source}"
          f"{', SLURM job ' + os.environ['SLURM_JOB_ID'] if 'SLURM_JOB_ID' in os.environ else ''}"
          f"{', restart ' + os.environ['SLURM_RESTART_COUNT'] if 'SLURM_RESTART_COUNT' in os.environ else ''}); "
          f"code from {Path(launcher.__file__).resolve().parent.parent}", flush=True)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # Fail loudly instead of hanging forever on a dead peer; async error handling lets the
        # watchdog tear the job down so SLURM can requeue it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://",
                                rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    if world % (tensor_parallel * pipeline_parallel) != 0:
        raise ValueError(f"world size {world} is not divisible by tensor_parallel x pipeline_parallel = "
                         f"{tensor_parallel} x {pipeline_parallel}")
    # megatron's parallel state (and its CPU layer without CUDA); the same base seed on every rank, megatron
    # offsets the tensor-parallel RNG per TP rank
    parallelize.init_model_parallel(tensor_parallel, pipeline_parallel, seed, virtual_pipeline)
    return DistInfo(
        rank=rank, world_size=world, local_rank=local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class MegatronMPU:
    """The `mpu` interface DeepSpeed asks for, answered by megatron's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    # DeepSpeed's convention (Megatron-DeepSpeed's mpu): "model parallel" = tensor x pipeline. DeepSpeed
    # names checkpoint files by the rank in it and sums gradient norms over it; it counts a parameter
    # that is not tensor-parallel only where get_tensor_model_parallel_rank() == 0, i.e. once per stage.
    def get_model_parallel_rank(self):
        import torch.distributed as dist

        return dist.get_rank(group=self._ps.get_model_parallel_group())

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size() * self._ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

