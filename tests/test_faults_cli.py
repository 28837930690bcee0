"""Faults and misuse through the real CLIs (submit.py --local, evaluate.py, sample.py, prepare): settings
that change on resume are applied and named, bad arguments exit 2 with a message."""
import json

import pytest

from tests.test_train_e2e import data_dir, submit  # noqa: F401  (fixture + helper)


@pytest.mark.slow
def test_resume_applies_changed_optim_settings_names_them_and_truncates_metrics(tmp_path, data_dir):  # noqa: F811
    submit(tmp_path, data_dir, "run.name=lr", "optim.train_steps=3", procs=1)
    # a job that crashed after step 4 (past its last checkpoint, step 3) left step 4 in metrics.jsonl
    with open(tmp_path / "runs" / "lr" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "train_bits_per_token": 9.0, "lr": 1.0}) + "\n" + '{"step": 5, "tr')
    submit(tmp_path, data_dir, "run.name=lr", "optim.train_steps=5", "optim.lr=1e-3", "optim.grad_clip=0.5",
           procs=1)
    run = tmp_path / "runs" / "lr"
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    train_steps = [r["step"] for r in recs if "train_bits_per_token" in r]
    assert train_steps == [1, 2, 3, 4, 5], train_steps      # item 6: no step twice after the resume
    assert lrs[3] == pytest.approx(3e-3) and lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(1e-3), lrs
    log = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.out"))
    assert "changed settings" in log and "optim.lr: 0.003 -> 0.001" in log and "optim.grad_clip: 1.0 -> 0.5" in log


BAD_ARGS = [
    ("launcher/evaluate.py", ["--limit-rows", "0"]), ("launcher/evaluate.py", ["--steps", "0"]),
    ("launcher/evaluate.py", ["--steps", "-2"]), ("launcher/evaluate.py", ["--batch-size", "0"]),
    ("launcher/sample.py", ["--steps", "0"]), ("launcher/sample.py", ["--length", "0"]),
    ("launcher/sample.py", ["--temperature", "0"]), ("launcher/sample.py", ["--top-p", "0"]),
    ("launcher/submit.py", ["--local", "0"]), ("launcher/submit.py", ["--local", "-1"]),
]


@pytest.mark.parametrize("script,args", BAD_ARGS, ids=[f"{s.split('/')[-1]} {' '.join(a)}" for s, a in BAD_ARGS])
def test_bad_arguments_exit_2_naming_the_flag(tmp_path, script, args):
    import subprocess
    import sys

    from tests.test_train_e2e import REPO, env

    if script.endswith("submit.py"):
        cmd = [sys.executable, str(REPO / script), *args, str(REPO / "configs" / "md4_tiny.yaml")]
    else:
        cmd = [sys.executable, str(REPO / script), str(tmp_path), *(["--data", str(tmp_path)]
                                                                     if script.endswith("evaluate.py") else []), *args]
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert args[0] in out.stderr and "must be" in out.stderr, out.stderr[-2000:]


def test_prepare_removes_partials_of_killed_runs(tmp_path):
    import subprocess
    import sys

    from tests.test_train_e2e import REPO, env

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                              # a PID that no longer runs
    stale = tmp_path / f".sotu32.partial-{dead.pid}"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard.00000.mds").write_bytes(b"half")
    out = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--source", "sotu", "--out",
                          str(tmp_path / "sotu32"), "--seq-len", "32", "--max-docs", "30",
                          "--cache-dir", str(REPO / "data" / "cache")],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not stale.exists()
    assert not list(tmp_path.glob(".sotu32.partial-*"))
    assert "interrupted prepare" in out.stdout + out.stderr


@pytest.mark.slow
def test_resume_with_changed_model_or_layout_exits_2_before_touching_the_run(tmp_path, data_dir):  # noqa: F811
    submit(tmp_path, data_dir, "run.name=frozen", "optim.train_steps=3", procs=1)
    run = tmp_path / "runs" / "frozen"
    before = (run / "config.yaml").read_text()
    out = submit(tmp_path, data_dir, "run.name=frozen", "optim.train_steps=5", "model.hidden_size=64", procs=1,
                 check=False)
    assert out.returncode == 2 and "model section" in out.stderr and "run.name" in out.stderr, out.stderr[-2000:]
    out = submit(tmp_path, data_dir, "run.name=frozen", "optim.train_steps=5", procs=2, check=False)
    assert out.returncode == 2 and "on 1 ranks" in out.stderr and "on 2 ranks" in out.stderr, out.stderr[-2000:]
    assert "init_from" in out.stderr
    assert (run / "config.yaml").read_text() == before      # nothing rewritten


def test_second_submission_of_a_locked_run_is_refused_naming_the_holder(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from tests.test_train_e2e import REPO, env

    run = tmp_path / "runs" / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from launcher.runlock import acquire; "
         f"l = acquire({str(run)!r}); print('held', flush=True); time.sleep(120)"],
        cwd=REPO, env={**env(), "SLURM_JOB_ID": "4242", "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = subprocess.run([sys.executable, str(REPO / "launcher" / "submit.py"), "--local", "1",
                              str(REPO / "configs" / "md4_tiny.yaml"), f"run.output_dir={tmp_path / 'runs'}",
                              "run.name=busy", f"data.path={tmp_path}"],
                             cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert f"pid {holder.pid}" in out.stderr and "SLURM job 4242" in out.stderr and "run.name" in out.stderr
    assert not (run / "config.yaml").exists()


@pytest.mark.slow
def test_evaluate_reads_both_writers_with_the_same_bound(tmp_path, data_dir):  # noqa: F811
    import subprocess
    import sys

    from tests.test_train_e2e import REPO, env

    submit(tmp_path, data_dir, "run.name=ev", "optim.train_steps=1", procs=1)
    wds = tmp_path / "wds"
    subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--source", "sotu", "--out", str(wds),
                    "--seq-len", "32", "--max-docs", "30", "--quiet", "--writer", "webdataset",
                    "--cache-dir", str(REPO / "data" / "cache")], check=True, cwd=REPO, env=env(),
                   capture_output=True)
    bounds = []
    for data in (data_dir, wds):
        out = subprocess.run([sys.executable, str(REPO / "launcher" / "evaluate.py"), str(tmp_path / "runs" / "ev"),
                              "--data", str(data), "--limit-rows", "8", "--no-progress"],
                             cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        bounds.append(json.loads(out.stdout.strip().splitlines()[-1])["bits_per_token"])
    assert bounds[0] == pytest.approx(bounds[1], rel=1e-6), bounds


# ---- item 3: corrupt data is refused naming the shard (and the row) ---------------------------------------------
def _copy_data(data_dir, dest):
    import shutil

    shutil.copytree(data_dir, dest)
    return dest


def _first_train_shard(data):
    m = json.loads((data / "manifest.json").read_text())
    return m, next(f for f in m["splits"]["train"]["files"] if f["path"].endswith(".mds"))


@pytest.mark.slow
def test_corrupt_shard_bytes_refused_by_submit_before_anything_is_queued(tmp_path, data_dir):  # noqa: F811
    data = _copy_data(data_dir, tmp_path / "data")
    _, f = _first_train_shard(data)
    shard = data / f["path"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01                       # same size: only the sha256 tells
    shard.write_bytes(bytes(raw))
    out = submit(tmp_path, data, "run.name=bad", procs=1, check=False)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "config error" in out.stderr and str(shard) in out.stderr and "sha256" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "bad" / "config.yaml").exists()   # nothing was submitted


@pytest.mark.slow
def test_out_of_vocabulary_ids_stop_training_naming_shard_and_row(tmp_path, data_dir):  # noqa: F811
    """A shard whose manifest checksums match (a buggy writer, not bit rot) but which holds the mask id:
    the job stops at the first batch that reads it, and the message names the shard file and the row."""
    import numpy as np

    from data_pipeline.loader import open_rows
    from data_pipeline.manifest import file_sha256

    data = _copy_data(data_dir, tmp_path / "data")
    m, f = _first_train_shard(data)
    rows = open_rows(data, "train")
    shard = data / f["path"]
    raw = bytearray(shard.read_bytes())
    row = rows.row(5).astype("<u2").tobytes()
    at = bytes(raw).find(row)
    assert at > 0 and bytes(raw).count(row) == 1
    raw[at + 2 * 7: at + 2 * 8] = np.array([50257], dtype="<u2").tobytes()   # position 7 of row 5: the mask id
    shard.write_bytes(bytes(raw))
    f["sha256"], f["bytes"] = file_sha256(shard), len(raw)
    (data / "manifest.json").write_text(json.dumps(m))
    out = submit(tmp_path, data, "run.name=oov", "optim.train_steps=200", "data.shuffle=false", procs=1,
                 check=False)
    assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
    assert f"{shard}: sample 5 (row 5 of split 'train'): token id 50257 at position 7" in out.stderr, out.stderr[-3000:]
    assert "mask id" in out.stderr and "Traceback" not in out.stderr
    assert "resume with the same command" in out.stderr


# ---- item 7 / "Also": signals to the printed job id, and a rank that dies --------------------------------------
def _popen_submit(tmp_path, data_dir, *overrides, procs=2):
    import subprocess

    from tests.test_train_e2e import PY, REPO, TINY, env

    cmd = [PY, str(REPO / "launcher" / "submit.py"), "--local", str(procs), str(REPO / "configs" / "md4_tiny.yaml"),
           f"data.path={data_dir}", f"run.output_dir={tmp_path / 'runs'}", *TINY, *overrides]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class _Lines:
    """submit.py's stdout read by a thread, line by line, so that a test can wait for a line while the
    process keeps printing."""

    def __init__(self, proc):
        import queue
        import threading

        self.proc, self.q, self.seen = proc, queue.Queue(), []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def until(self, pattern, timeout_s):
        import queue
        import re
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s}s:\n{''.join(self.seen)}\n"
                             f"{self.proc.stderr.read()[-3000:]}")

    def finish(self, timeout_s):
        """Wait for the process; returns (all of stdout, stderr)."""
        err = self.proc.stderr.read() if self.proc.wait(timeout=timeout_s) is not None else ""
        self.thread.join(timeout=10)
        while True:
            line = self.q.get()
            if line is None:
                break
            self.seen.append(line)
        return "".join(self.seen), err


def _rank_processes(controller_pid):
    import psutil

    ranks = {}
    for p in psutil.Process(controller_pid).children():
        try:
            if "submitit.core._submit" in " ".join(p.cmdline()):
                ranks[int(p.environ()["SUBMITIT_LOCAL_GLOBALID"])] = p
        except (psutil.Error, KeyError):
            pass
    return ranks


@pytest.mark.slow
def test_usr2_to_the_printed_job_id_checkpoints_and_the_local_job_resumes_itself(tmp_path, data_dir):  # noqa: F811
    import signal

    import psutil

    from tests.test_train_e2e import train_losses

    proc = _popen_submit(tmp_path, data_dir, "run.name=usr2", "optim.train_steps=10", "checkpoint.interval=100")
    lines = _Lines(proc)
    try:
        job = int(lines.until(r"submitted job (\d+)", 300).group(1))
        lines.until(r"^\[step 3\] 3/10 train", 600)
        ranks = _rank_processes(job)
        assert sorted(ranks) == [0, 1], ranks
        psutil.Process(job).send_signal(signal.SIGUSR2)          # what `kill -USR2 <job id>` does
        lines.until(r"preempted: checkpoint saved", 300)
        out, err = lines.finish(600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (proc.returncode, out, err[-3000:])
    assert "held-out bits/token" in out
    for p in ranks.values():                                     # the first incarnation's ranks all ended
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    run = tmp_path / "runs" / "usr2"
    log = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.out"))
    saved = [int(s) for s in __import__("re").findall(r"\[step (\d+)\] preempted: checkpoint saved", log)]
    assert len(saved) == 1 and f"resumed from {run / 'checkpoints' / f'step_{saved[0]:08d}'} at step {saved[0]}" in log
    assert sorted(train_losses(run)) == list(range(1, 11))       # every step once


@pytest.mark.slow
def test_a_killed_rank_ends_the_local_job_naming_rank_and_signal_then_the_same_command_resumes(tmp_path, data_dir):  # noqa: F811
    import signal
    import time

    from tests.test_train_e2e import train_losses

    overrides = ("run.name=kill", "optim.train_steps=10", "checkpoint.interval=2")
    proc = _popen_submit(tmp_path, data_dir, *overrides)
    lines = _Lines(proc)
    try:
        job = int(lines.until(r"submitted job (\d+)", 300).group(1))
        lines.until(r"^\[step 5\] 5/10 train", 600)
        victim = _rank_processes(job)[0]
        victim.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        out, err = lines.finish(120)
        ended_s = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (proc.returncode, err[-3000:])
    assert ended_s < 120
    assert f"rank 0 (pid {victim.pid}) killed by SIGKILL" in err, err[-3000:]
    assert "resume with the same command" in err and "Traceback" not in err
    print(f"SIGKILL of rank 0 -> submit.py returned: {ended_s:.1f}s")
    # the same command resumes from the newest complete checkpoint and finishes
    out = submit(tmp_path, data_dir, *overrides)
    assert "resuming from" in out.stdout and "held-out bits/token" in out.stdout
    run = tmp_path / "runs" / "kill"
    log = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.out"))
    assert "resumed from" in log
    assert sorted(train_losses(run)) == list(range(1, 11))


# ---- item 8: fallbacks are said where the user looks --------------------------------------------------------------
@pytest.mark.slow
def test_skipped_checkpoints_are_named_by_submit_and_in_tensorboard(tmp_path, data_dir):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    submit(tmp_path, data_dir, "run.name=skip", "optim.train_steps=6", "checkpoint.interval=2",
           "checkpoint.keep_last=3", procs=1)
    ckpt = tmp_path / "runs" / "skip" / "checkpoints"
    torn, corrupt = ckpt / "step_00000008", ckpt / "step_00000006"
    torn.mkdir()                                                 # a save that died: no COMPLETE.json
    victim = next(p for p in sorted(corrupt.rglob("*.pt")))
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    out = submit(tmp_path, data_dir, "run.name=skip", "optim.train_steps=7", "checkpoint.interval=2",
                 "checkpoint.keep_last=3", procs=1)
    lines = out.stdout.splitlines()
    assert f"WARNING: skipping checkpoint {torn}: no COMPLETE.json (a save that did not finish)" in lines, out.stdout
    assert any(l.startswith(f"WARNING: skipping checkpoint {corrupt}: {victim}: checksum mismatch") for l in lines), out.stdout
    assert f"resuming from {ckpt / 'step_00000004'}" in lines
    resolved = json.loads((tmp_path / "runs" / "skip" / "resolved.json").read_text())
    assert any("step_00000008" in w for w in resolved["warnings"]) and any(str(victim) in w for w in resolved["warnings"])
    acc = EventAccumulator(str(tmp_path / "runs" / "skip" / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = " ".join(e.tensor_proto.string_val[0].decode() for e in acc.Tensors("run/warnings/text_summary"))
    assert "no COMPLETE.json" in text and "checksum mismatch" in text
