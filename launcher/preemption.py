"""Preemption: SLURM's signal becomes "finish this step, checkpoint on every rank, requeue".

submitit installs a USR2 handler that checkpoints the callable and requeues the job from inside the
signal handler, i.e. in the middle of whatever the rank was doing: fine for a single process, wrong for
a collective checkpoint of a sharded model. Here the signal (USR2 from submitit's `--signal`, or SIGTERM,
which some clusters send before a kill) only sets a flag. The training loop asks `should_stop()` once per
step (a MAX all-reduce, so every rank agrees on the same step), saves, and then rank 0 hands over to
submitit's own handler, which pickles the job and runs `scontrol requeue`. The requeued job resumes from
the checkpoint just written.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            print(f"received {signal.Signals(signum).name}: will checkpoint after this step and requeue",
                  file=sys.stderr, flush=True)
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank received a preemption signal."""
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)  # NCCL: on GPU
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def requeue_and_exit(self, rank: int) -> None:
        """After the checkpoint: rank 0 lets submitit requeue the job; the others wait to be stopped.

        Under submit.py --local every rank exits with submitit's local requeue status and the local
        controller restarts them. Elsewhere (torchrun) there is nothing to requeue: every rank raises
        SystemExit and the same command resumes the run.
        """
        usr2 = self._previous.get(signal.SIGUSR2)
        if os.environ.get("MDIFF_LOCAL_CONTROLLER") == "1":
            # submit.py --local: launcher/local_controller.py starts every rank again when they exit with
            # submitit's local requeue status, and they resume from the checkpoint just written
            from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

            signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # see below: no exception from the loader now
            _hard_exit(LOCAL_REQUEUE_RETURN_CODE)
        on_slurm = "SLURM_JOB_ID" in os.environ and callable(usr2)
        if not on_slurm:
            raise SystemExit(f"preempted by signal {self.received}: checkpoint saved; submit again to resume")
        # From here on this task only hands over and ends: SLURM requeues the job and SIGTERMs (later
        # SIGKILLs) every process of the step, data-loader workers included. Nothing may become an
        # Exception now: submitit writes a result pickle for any Exception escaping the task, and a
        # result -- even an error -- tells whoever waits on the job that it is over although it was
        # requeued. (Seen: a DataLoader worker killed by the requeue's SIGTERM made torch's SIGCHLD
        # handler raise "DataLoader worker ... is killed by signal" during the unwinding after
        # submitit's sys.exit; the waiting `submit.py --wait` reported the requeued job as failed.)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # the loader is not used any more
        # The requeue's SIGTERM ends this process at once instead of after KillWait (up to the
        # cluster's KillWait, 30 s by default): the requeued job starts only once every task is gone.
        signal.signal(signal.SIGTERM, lambda *_: _hard_exit(0))
        if rank == 0:
            _flush()
            try:
                usr2(signal.SIGUSR2, None)   # submitit: pickle the callable, scontrol requeue, sys.exit(-1)
            except SystemExit:
                _hard_exit(0)                # requeued; skip the unwinding (see above)
            # no SystemExit: submitit did not requeue (it raised before, e.g. too many timeouts)
            raise SystemExit("submitit returned from its USR2 handler without requeueing")
        deadline = time.time() + 600         # scontrol requeue ends this task; don't exit with a result
        while time.time() < deadline:
            time.sleep(1)
        raise SystemExit("requeue did not stop this task within 10 minutes")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _hard_exit(code: int) -> None:
    _flush()
    os._exit(code)
