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
