"""torch.profiler over chosen optimizer steps (`logging.profile_steps: [first, last]`), on every rank.

Steps are counted as in metrics.jsonl (step k is the k-th optimizer step, 1-based); the trace covers the
whole of steps first..last (data loading, forward, backward, optimizer step; not the logging, held-out
evaluation or checkpoint that may follow a step) and is written when step `last` ends, or when training
ends before it: <run_dir>/profile/rank<R>.<ns>.pt.trace.json, in the Chrome trace format that TensorBoard's
profiler plugin reads from that folder (`tensorboard --logdir <run_dir>/profile`) and chrome://tracing or
https://ui.perfetto.dev open. Each step is marked `ProfilerStep#k`. CUDA kernels are traced when CUDA is
present. A run resumed inside the range traces the steps from the resumed one to `last`; one resumed past it
traces nothing.
"""
from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, run_dir: str | Path, steps: list[int], rank: int):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.dir = Path(run_dir) / "profile"
        self.rank = rank
        self.prof = None
        self._mark = None

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs."""
        if self.first is None or not (self.first <= step <= self.last):
            return
        if self.prof is None:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, on_trace_ready=tensorboard_trace_handler(
                str(self.dir), worker_name=f"rank{self.rank}"))
            self.prof.start()
        # the step's span, named as torch.profiler's schedule names them, with the training step's own number
        self._mark = torch.profiler.record_function(f"ProfilerStep#{step}")
        self._mark.__enter__()

    def after_step(self, step: int) -> None:
        """Called when optimizer step `step` has finished."""
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        if self.prof is not None and step >= self.last:
            self.stop()

    def stop(self) -> None:
        """Write the trace (idempotent); training ended or step `last` is done."""
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()
