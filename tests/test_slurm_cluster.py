"""submitit against the real loopback SLURM cluster (cluster/slurm_loopback.sh), with the loopback profile.

Run: .venv/bin/pytest -q -m slurm tests/test_slurm_cluster.py   (as root; the session starts and stops
the cluster itself unless one is already running).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from slurm_fixture import REPO, slurm_cluster  # noqa: F401  (the fixture, found by name)

# The job processes cannot import this test module by name (tests/ is not on their sys.path):
# ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slurm


def _load_profiles():
    spec = importlib.util.spec_from_file_location("cluster_profiles", REPO / "cluster" / "profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _executor(folder: Path, cluster, **overrides) -> submitit.AutoExecutor:
    profiles = _load_profiles()
    params = profiles.submitit_parameters(profiles.load_profile("loopback"))
    params["slurm_partition"] = cluster.partition
    params.update(overrides)
    ex = submitit.AutoExecutor(folder=folder)
    assert ex.cluster == "slurm", f"submitit picked {ex.cluster!r}: is srun on PATH?"
    ex.update_parameters(**params)
    return ex


def _job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    if out:
        return out
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else "UNKNOWN"


def _job_report(job: submitit.Job, cluster) -> str:
    parts = [f"job {job.job_id} state: {_job_state(job.job_id)}"]
    for p in (job.paths.stdout, job.paths.stderr):
        try:
            parts.append(f"----- {p} -----\n{Path(p).read_text(errors='replace')[-4000:]}")
        except OSError:
            parts.append(f"----- {p}: missing")
    parts.append(cluster.logs(lines=30))
    return "\n".join(parts)


def _wait(pred, timeout_s: float, what: str, job: submitit.Job, cluster) -> float:
    """Poll pred() until true; returns the seconds it took. On timeout: cancel the job and fail loudly."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            report = _job_report(job, cluster)
            subprocess.run(["scancel", job.job_id], capture_output=True)
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{report}", pytrace=False)
        time.sleep(0.2)
    return time.monotonic() - t0


def _result(job: submitit.Job, cluster, timeout_s: float):
    _wait(lambda: job.done(), timeout_s, f"job {job.job_id} to finish", job, cluster)
    try:
        return job.results()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"job {job.job_id} failed: {e}\n{_job_report(job, cluster)}", pytrace=False)


# ------------------------------------------------------------------------------------- (a) tasks
def whoami(x: int) -> dict:
    env = submitit.JobEnvironment()
    return {"x": x, "rank": env.global_rank, "num_tasks": env.num_tasks, "job_id": env.job_id,
            "host": socket.gethostname(), "partition": os.environ.get("SLURM_JOB_PARTITION")}


def test_two_tasks_return_results(slurm_cluster, tmp_path):
    ex = _executor(tmp_path / "%j", slurm_cluster, tasks_per_node=2, timeout_min=60)
    job = ex.submit(whoami, 21)
    results = _result(job, slurm_cluster, timeout_s=90)
    assert len(results) == 2, results
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["x"] == 21 and r["num_tasks"] == 2 and r["job_id"] == job.job_id
        assert r["partition"] == slurm_cluster.partition


# -------------------------------------------------------------------------------- (b) preemption
class CountSteps(submitit.helpers.Checkpointable):
    """Counts steps into <workdir>/progress, resuming from it; logs each (re)start to <workdir>/starts.

    checkpoint() is Checkpointable's default: resubmit the same call; the state lives in the file.
    """

    def __call__(self, workdir: str, total: int, step_s: float) -> dict:
        wd = Path(workdir)
        progress = wd / "progress"
        start = int(progress.read_text()) if progress.exists() else 0
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        with open(wd / "starts", "a") as f:
            f.write(f"{restart} {start}\n")
        for i in range(start, total):
            time.sleep(step_s)
            tmp = wd / "progress.tmp"
            tmp.write_text(str(i + 1))
            os.replace(tmp, progress)
        starts = [tuple(map(int, line.split())) for line in (wd / "starts").read_text().splitlines()]
        return {"restart_count": restart, "starts": starts, "progress": int(progress.read_text())}


def _read_int(p: Path) -> int:
    try:
        return int(p.read_text())
    except (OSError, ValueError):
        return 0


def _n_starts(p: Path) -> int:
    try:
        return len(p.read_text().splitlines())
    except OSError:
        return 0


def test_usr2_requeues_and_resumes(slurm_cluster, tmp_path):
    wd = tmp_path / "work"
    wd.mkdir()
    progress, starts = wd / "progress", wd / "starts"
    total, step_s = 40, 0.5
    ex = _executor(tmp_path / "%j", slurm_cluster, tasks_per_node=1, timeout_min=60)
    job = ex.submit(CountSteps(), str(wd), total, step_s)

    _wait(lambda: _n_starts(starts) >= 1 and _read_int(progress) >= 2, 90,
          "the job to start and make progress", job, slurm_cluster)
    requeue_s = []
    for n in (1, 2):
        before = _read_int(progress)
        assert before < total, f"job finished before preemption #{n}: make `total` larger"
        res = subprocess.run(["scancel", "--signal=USR2", job.job_id], capture_output=True, text=True)
        assert res.returncode == 0, f"scancel --signal=USR2 failed: {res.stderr}"
        requeue_s.append(_wait(lambda: _n_starts(starts) >= n + 1, 120,
                               f"the job to run again after USR2 #{n}", job, slurm_cluster))
        _wait(lambda: _read_int(progress) >= before + 2, 60,
              f"progress after requeue #{n}", job, slurm_cluster)
    print(f"requeue-to-running after USR2: {', '.join(f'{s:.1f}s' for s in requeue_s)}")

    (out,) = _result(job, slurm_cluster, timeout_s=total * step_s + 60)
    assert out["restart_count"] >= 2, out
    assert out["progress"] == total, out
    runs = out["starts"]
    assert [r for r, _ in runs] == [0, 1, 2], runs
    assert runs[0][1] == 0
    # Resumed from saved progress, not from 0: each run started where the previous one stopped.
    assert 0 < runs[1][1] <= runs[2][1] < total, runs
