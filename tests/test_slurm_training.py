"""Training on the real loopback SLURM cluster through launcher/submit.py --cluster loopback, preempted ten times
in a row; and a rank killed with SIGKILL, after which the same command resumes.

A 2-task job (one node, `--tasks-per-node 2`, gloo) trains a tiny MD4 model. While it runs it receives
`scancel --signal=USR2 JOBID` PREEMPTIONS = 10 times in a row (each time only after the run has logged a new step): every rank
finishes its step, the run checkpoints, rank 0 hands over to submitit which requeues the job
(`scontrol requeue`), and the requeued job resumes from that checkpoint. The per-step training losses in
metrics.jsonl must equal, exactly, those of an uninterrupted run of the same config (`--local 2`).

Run: .venv/bin/pytest -q -s -m slurm tests/test_slurm_training.py   (as root; ~2-3 minutes; the session
starts and stops the cluster unless one is already running).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_fixture import REPO, slurm_cluster  # noqa: F401  (the fixture, found by name)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PY = sys.executable
STEPS = 60
PREEMPTIONS = 10
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_len=32",
        "optim.micro_batch_size=4", "optim.global_batch_size=8", "optim.lr_schedule=constant",
        "optim.warmup_steps=2", "optim.lr=3e-3", "logging.log_interval=1", "logging.eval_batches=2",
        "logging.eval_interval=1000", "logging.sample_at_end=false", "checkpoint.interval=10",
        "checkpoint.keep_last=2", "data.num_workers=1", f"optim.train_steps={STEPS}"]


def _env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["TIKTOKEN_CACHE_DIR"] = ""
    return e


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sotu32"
    subprocess.run([PY, "-m", "data_pipeline.prepare", "--source", "sotu", "--out", str(out), "--seq-len", "32",
                    "--max-docs", "30", "--quiet", "--cache-dir", str(REPO / "data" / "cache")],
                   check=True, cwd=REPO, env=_env(), capture_output=True)
    return out


def _cmd(where: list[str], data_dir: Path, runs: Path, name: str) -> list[str]:
    return [PY, str(REPO / "launcher" / "submit.py"), *where, str(REPO / "configs" / "md4_tiny.yaml"),
            f"data.path={data_dir}", f"run.output_dir={runs}", f"run.name={name}", *TINY]


def _records(run_dir: Path) -> list[dict]:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]


def _train_steps(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train_bits_per_token"]) for r in _records(run_dir) if "train_bits_per_token" in r]


def _job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
    if out:
        return out
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else "UNKNOWN"


def _rank0_log(run_dir: Path, job_id: str) -> str:
    try:
        return (run_dir / "submitit" / job_id / f"{job_id}_0_log.out").read_text(errors="replace")
    except OSError:
        return ""


def test_preempted_ten_times_requeued_and_same_losses(slurm_cluster, tmp_path, data_dir):
    runs = tmp_path / "runs"
    env = _env()

    # ---- uninterrupted reference, same config and world size (2 processes, gloo) -----------------
    t0 = time.monotonic()
    ref = subprocess.run(_cmd(["--local", "2"], data_dir, runs, "ref"), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, f"reference run failed:\n{ref.stdout[-3000:]}\n{ref.stderr[-3000:]}"
    reference = dict(_train_steps(runs / "ref"))
    assert sorted(reference) == list(range(1, STEPS + 1))
    print(f"\nreference --local 2 run: {time.monotonic() - t0:.1f}s")

    # ---- the same config on SLURM; submit.py --wait stays to print the result across requeues ----
    run_dir = runs / "slurm"
    t_submit = time.monotonic()
    proc = subprocess.Popen(_cmd(["--cluster", "loopback", "--nodes", "1", "--tasks-per-node", "2",
                                  "--partition", slurm_cluster.partition, "--wait"], data_dir, runs, "slurm"),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = proc.stdout.readline()
    m = re.search(r"submitted job (\d+)", first)
    if not m:
        proc.kill()
        pytest.fail(f"submit.py printed no job id: {first}{proc.stdout.read()}", pytrace=False)
    job_id = m.group(1)
    # read the header here (communicate() with a timeout bypasses this buffer): batch/precision, tensorboard
    second = proc.stdout.readline() + proc.stdout.readline()

    def report() -> str:
        return (f"job {job_id} state {_job_state(job_id)}\n----- rank 0 log -----\n"
                f"{_rank0_log(run_dir, job_id)[-5000:]}\n{slurm_cluster.logs(lines=20)}")

    def wait(pred, timeout_s: float, what: str) -> float:
        t = time.monotonic()
        while not pred():
            if time.monotonic() - t > timeout_s:
                subprocess.run(["scancel", job_id], capture_output=True)
                proc.kill()
                pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}\n{report()}", pytrace=False)
            if proc.poll() is not None and proc.returncode != 0:
                pytest.fail(f"submit.py --wait exited with {proc.returncode} while waiting for {what}:\n"
                            f"{proc.stdout.read()}\n{report()}", pytrace=False)
            time.sleep(0.1)
        return time.monotonic() - t

    def last_step() -> int:
        steps = _train_steps(run_dir)
        return steps[-1][0] if steps else 0

    try:
        resumed_at, preempted_at, latencies = [0], [], []
        for n in range(1, PREEMPTIONS + 1):
            # running (again) and past the step it resumed from: a new metrics line of this run
            wait(lambda: last_step() > resumed_at[-1] and _job_state(job_id) == "RUNNING", 300,
                 f"run #{n} to log a new step")
            assert last_step() < STEPS - 5, f"the run nearly finished before preemption #{n}: raise STEPS"
            res = subprocess.run(["scancel", "--signal=USR2", job_id], capture_output=True, text=True)
            assert res.returncode == 0, f"scancel --signal=USR2 failed: {res.stderr}"
            t_sig = time.monotonic()
            wait(lambda: len(re.findall(r"resumed from \S+ at step \d+", _rank0_log(run_dir, job_id))) >= n,
                 300, f"the job to be requeued and resume after USR2 #{n}")
            log = _rank0_log(run_dir, job_id)
            saved = [int(s) for s in re.findall(r"\[step (\d+)\] preempted: checkpoint saved", log)]
            resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
            assert len(saved) == n and resumed[n - 1] == saved[n - 1], (saved, resumed)
            preempted_at.append(saved[-1])
            resumed_at.append(resumed[-1])
            wait(lambda: last_step() > resumed_at[-1], 120, f"the first step after resume #{n}")
            latencies.append(time.monotonic() - t_sig)
        print(f"preempted at steps {preempted_at}; USR2 -> first step of the requeued run logged: "
              + ", ".join(f"{s:.1f}s" for s in latencies))
        stamps = re.findall(r"submitit \w+ \((\S+ \S+)\) - (Requeued job|Starting with JobEnvironment)",
                            _rank0_log(run_dir, job_id))
        from datetime import datetime

        t = [(datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f"), what) for ts, what in stamps]
        gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(t, t[1:]) if a[1].startswith("Requeued")]
        print("of which scontrol requeue -> requeued task started (SLURM): " + ", ".join(f"{g:.1f}s" for g in gaps))

        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", job_id], capture_output=True)
            proc.kill()
            pytest.fail(f"submit.py --wait did not return\n{report()}", pytrace=False)
        print(f"SLURM run with {PREEMPTIONS} preemptions: {time.monotonic() - t_submit:.1f}s from submission")
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.returncode == 0:   # results are written before the tasks have exited: let SLURM finish it
            deadline = time.monotonic() + 60
            while _job_state(job_id) in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
                time.sleep(1)
        if _job_state(job_id) in ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD"):
            subprocess.run(["scancel", job_id], capture_output=True)

    assert proc.returncode == 0, f"submit.py --wait failed:\n{out}\n{report()}"
    assert "held-out bits/token" in out, out
    assert "tensorboard --logdir" in second, second

    # two preemptions, each resumed from the checkpoint written at the step it stopped at
    assert len(preempted_at) == PREEMPTIONS and 0 < preempted_at[0] and preempted_at[-1] < STEPS, preempted_at
    assert all(a < b for a, b in zip(preempted_at, preempted_at[1:])), preempted_at
    log = _rank0_log(run_dir, job_id)
    assert f"restart {PREEMPTIONS}" in log, f"the final run should be SLURM_RESTART_COUNT={PREEMPTIONS}"
    # the job ran the code snapshot in the run directory, not the checkout
    assert f"code from {run_dir.resolve() / 'code'}" in log
    assert re.search(r"env:// at \S+:\d+ \(local rank 0, from submitit \(slurm executor\)", log), log[-3000:]

    # every step logged once, and its loss equals the uninterrupted run's, bit for bit
    got = _train_steps(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), [s for s, _ in got]
    mismatches = [(s, loss, reference[s]) for s, loss in got if loss != reference[s]]
    assert not mismatches, f"losses differ from the uninterrupted run at (step, slurm, reference): {mismatches}"
    result = json.loads((run_dir / "result.json").read_text())
    ref_result = json.loads((runs / "ref" / "result.json").read_text())
    assert result["step"] == STEPS
    assert result["heldout"]["bits_per_token"] == ref_result["heldout"]["bits_per_token"]
    assert _job_state(job_id) == "COMPLETED"


def _slurm_rank(job_id: str, rank: int):
    """The process of one SLURM task of the job (this loopback cluster runs them on this machine)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        try:
            if "submitit.core._submit" not in " ".join(p.info["cmdline"] or []):
                continue
            e = p.environ()
            if e.get("SLURM_JOB_ID") == job_id and e.get("SLURM_PROCID") == str(rank):
                return p
        except psutil.Error:
            pass
    return None


def test_a_rank_killed_under_slurm_ends_the_job_within_2_minutes_then_the_same_command_resumes(
        slurm_cluster, tmp_path, data_dir):
    """srun --kill-on-bad-exit: the other rank does not wait in its next collective; submit.py --wait says
    which task died and how, and the same command resumes from the newest complete checkpoint."""
    import signal

    runs = tmp_path / "runs"
    run_dir = runs / "killed"
    cmd = _cmd(["--cluster", "loopback", "--nodes", "1", "--tasks-per-node", "2", "--partition",
                slurm_cluster.partition, "--wait"], data_dir, runs, "killed") + ["checkpoint.interval=3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = None
    try:
        first = proc.stdout.readline()
        job_id = re.search(r"submitted job (\d+)", first).group(1)
        t = time.monotonic()
        while not list((run_dir / "checkpoints").glob("step_*/COMPLETE.json")):
            assert time.monotonic() - t < 180, f"no checkpoint within 180s\n{_rank0_log(run_dir, job_id)[-3000:]}"
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        victim = _slurm_rank(job_id, 1)
        assert victim is not None, "rank 1's process not found"
        victim.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = proc.communicate(timeout=120)
        ended_s = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
        if job_id and _job_state(job_id) in ("PENDING", "RUNNING", "REQUEUED"):
            subprocess.run(["scancel", job_id], capture_output=True)
    print(f"\nSIGKILL of rank 1 under SLURM -> submit.py --wait returned: {ended_s:.1f}s")
    assert proc.returncode == 1, (proc.returncode, out[-2000:], err[-3000:])
    assert re.search(r"SLURM: task\(s\) 1 on \S+: Killed", err), err[-3000:]
    assert "resume with the same command" in err and "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 60
    while _job_state(job_id) in ("RUNNING", "COMPLETING") and time.monotonic() < deadline:
        time.sleep(1)
    assert _job_state(job_id) in ("FAILED", "CANCELLED", "NODE_FAIL"), _job_state(job_id)
    # the same command again: resumes and finishes
    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout[-2000:], again.stderr[-3000:])
    assert "resuming from" in again.stdout and "held-out bits/token" in again.stdout
    assert [s for s, _ in _train_steps(run_dir)] == list(range(1, STEPS + 1))
