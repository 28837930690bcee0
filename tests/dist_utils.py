"""Run a function on N gloo processes (torch.multiprocessing spawn) and collect what each rank returns.

    results = run_distributed(worker, world_size=2, args=(...,))   # worker(rank, world_size, *args) -> obj

`worker` must be a module-level function (spawn pickles it by name). Each rank joins a fresh gloo group on
127.0.0.1 and a free port; its return value travels back through torch.save, so tensors are fine.
"""
from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.distributed import free_port


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: tuple = ()) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` spawned processes; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_schedule(model: torch.nn.Module | list[torch.nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]],
                 forward_only: bool = False) -> list[torch.Tensor]:
    """One megatron forward_backward_func call (the schedule parallel_state implies: no pipelining at PP=1,
    1F1B at PP>1, interleaved 1F1B over a list of model chunks under a virtual pipeline size) over microbatches
    (input_ids, labels) of a denoiser; loss = mean per-token NLL per microbatch. Returns the per-microbatch
    losses (on the last pipeline stage; [] elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        input_ids, labels = next(data_iterator)
        output = model(input_ids, labels)

        def loss_func(nll: torch.Tensor):
            loss = nll.mean()
            return loss, {"loss": loss.detach().clone()}
        return output, loss_func

    chunks = model if isinstance(model, list) else [model]
    b, s = batches[0][0].shape
    out = get_forward_backward_func()(
        forward_step_func=forward_step, model=chunks,
        data_iterator=iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
        num_microbatches=len(batches), seq_length=s, micro_batch_size=b, forward_only=forward_only)
    return [d["loss"] for d in out]
