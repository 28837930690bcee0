"""One job per run directory: an exclusive fcntl.flock on RUN_DIR/run.lock, held by global rank 0 for the
whole job and released by the kernel when that process ends (a SLURM requeue of the same job re-takes it).
The lock file records the holder (host, pid, job id) so a refused submission can name it.

A requeued incarnation of the same job (same job id) waits for its predecessor to let go: the lock is
released only when every process holding the file has ended, and the previous incarnation's rank 0 and
its forked data-loader workers can take a few seconds more than the requeue to exit."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"


class RunLocked(RuntimeError):
    pass


def holder(run_dir: Path) -> str:
    try:
        h = json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return f"pid {h.get('pid')} on {h.get('host')}{job} (since {h.get('since')})"


def _holder_job(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text() or "{}").get("job_id")
    except (OSError, ValueError):
        return None


def acquire(run_dir: Path, job_id: str | None = None, same_job_wait_s: float = 180.0):
    """Take the lock; returns the open file, which holds it until closed or the process ends. Raises
    RunLocked naming the holder. When the holder is an earlier incarnation of `job_id` (a requeue), wait
    up to `same_job_wait_s` for it to end instead."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a+")
    deadline = time.monotonic() + same_job_wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if job_id is not None and _holder_job(run_dir) == str(job_id) and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            f.close()
            raise RunLocked(f"run directory {run_dir} is in use by another job: {holder(run_dir)}. Wait for it "
                            f"to end (or cancel it), or choose another run.name") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                        "job_id": None if job_id is None else str(job_id),
                        "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
                        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    f.flush()
    return f


def check_free(run_dir: Path) -> None:
    """Raise RunLocked if a job holds the lock now (submit's check before touching the run directory)."""
    if not (Path(run_dir) / LOCK_NAME).is_file():
        return
    with open(Path(run_dir) / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"run directory {run_dir} is in use by another job: {holder(run_dir)}. Wait for it "
                            f"to end (or cancel it), or choose another run.name") from None
        fcntl.flock(f, fcntl.LOCK_UN)
