"""The controller of a `submit.py --local N` job: submitit's own (submitit 1.5.4, submitit/local/local.py),
with what a SLURM job has and submitit's local one lacks:

- SIGUSR2 or SIGTERM to the job id that submit.py prints (the controller's pid) reaches every rank, as
  `scancel --signal=USR2` does on SLURM: the ranks finish the step, checkpoint, and exit with submitit's
  local requeue status, and the controller starts them again; they resume from that checkpoint. (Without
  this, USR2 killed the controller and left the ranks running as orphans.)
- A rank that dies (killed by a signal, or exits with an error) ends the job: the others get GRACE_S
  seconds to report their own error, then are stopped, as `srun --kill-on-bad-exit` does on SLURM.
- How each rank ended is written to `<folder>/<job id>_exits.json` (rank, pid, exit status, signal name),
  which submit.py reads to say which rank died and by which signal.

Started by `LocalExecutor` below in place of `python -m submitit.local._local`; written against submitit
1.5.4 (pinned in pyproject.toml); tests/test_faults_cli.py covers it through the real CLI.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import submitit
from submitit.local import local as _local

GRACE_S = 30.0
EXITS_SUFFIX = "_exits.json"


def exits_path(folder: str | Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}{EXITS_SUFFIX}"


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == _local.LOCAL_REQUEUE_RETURN_CODE:
        return "preempted (checkpointed, requeued)"
    return f"exited with status {code}"


class Controller(_local.Controller):
    def __init__(self, folder: Path):
        super().__init__(folder)
        signal.signal(signal.SIGUSR2, self._forward_signal)

    def wait(self, freq: int = 24) -> tp.Sequence[tp.Optional[int]]:
        """submitit's wait (all tasks end, or the time limit), ending the job when one rank failed."""
        timeout = freq * self.timeout_s
        almost_timeout = freq * (self.timeout_s - self.signal_delay_s)
        failed_at = None
        for step in range(timeout):
            codes = [t.poll() for t in self.tasks]
            if all(c is not None for c in codes):
                break
            bad = [(k, c) for k, c in enumerate(codes) if c not in (None, 0, _local.LOCAL_REQUEUE_RETURN_CODE)]
            if bad and failed_at is None:
                failed_at = time.monotonic()
                for k, c in bad:
                    print(f"rank {k} (pid {self.tasks[k].pid}) {describe_exit(c)}; stopping the other ranks in "
                          f"{GRACE_S:.0f}s", file=sys.stderr, flush=True)
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                self._forward_signal(signal.SIGKILL)
                for t in self.tasks:
                    t.wait()
                break
            if step == almost_timeout:
                self._forward_signal(_local.LocalJobEnvironment._usr_sig())
            time.sleep(1.0 / freq)
        codes = [t.poll() for t in self.tasks]
        self._record(codes)
        return codes

    def _record(self, codes) -> None:
        doc = [{"rank": k, "pid": t.pid, "returncode": c, "how": describe_exit(c)}
               for k, (t, c) in enumerate(zip(self.tasks, codes))]
        path = exits_path(self.folder, self.pid)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)


class LocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor whose controller is the one above."""

    def _submit_command(self, command: str):
        ntasks = self.parameters.get("tasks_per_node", 1)
        env = dict(os.environ)
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(ntasks),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES="",
            SUBMITIT_LOCAL_WITH_SHELL="",
            MDIFF_LOCAL_CONTROLLER="1",   # the ranks requeue through this controller (launcher/preemption.py)
        )
        process = subprocess.Popen([sys.executable, "-m", "launcher.local_controller", str(self.folder)], env=env)
        return _local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m launcher.local_controller SUBMITIT_FOLDER (got {shlex.join(sys.argv[1:])})")
    Controller(Path(sys.argv[1])).run()
