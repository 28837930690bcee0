"""Out of the box (issue 13): precision `auto`, the global batch as the contract at any node count, the
capacity plan in the dry-run, progress in the terminal, and Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import submit
from launcher.config import ConfigError, load_config, resolve_batch
from launcher.precision import resolve_precision

from test_train_e2e import PY, REPO, TINY, data_dir, env, submit as submit_tiny  # noqa: F401  (fixture)

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NODES = (1, 2, 4, 8, 16, 32)


# ----- precision ---------------------------------------------------------------------------------

@pytest.mark.parametrize("forced,want", [("0", "fp32"), ("1", "bf16")])
def test_auto_precision_follows_the_device(monkeypatch, forced, want):
    monkeypatch.setenv("MDIFF_NATIVE_BF16", forced)
    p = resolve_precision("auto", "cpu")
    assert (p.resolved, p.native_bf16, p.warning) == (want, forced == "1", "")
    assert f"auto -> {want}" in p.describe()
    assert resolve_precision("fp32", "cpu").resolved == "fp32"


def test_explicit_bf16_without_native_bf16_runs_with_a_warning(monkeypatch):
    monkeypatch.setenv("MDIFF_NATIVE_BF16", "0")
    p = resolve_precision("bf16", "cpu")
    assert p.resolved == "bf16" and "emulated" in p.warning and "parallel.precision=auto" in p.warning
    monkeypatch.setenv("MDIFF_NATIVE_BF16", "1")
    assert resolve_precision("bf16", "cpu").warning == ""


def test_the_reference_configs_default_to_auto():
    for path in CONFIGS:
        cfg = load_config(path)
        want = "fp32" if path.name == "md4_tiny.yaml" else "auto"   # the CPU demo: the same on every CPU
        assert cfg.parallel.precision == want, path


# ----- the global batch at every node count --------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_resolves_or_names_the_node_counts_that_work(config, capsys):
    """submit.py --dry-run at 1..32 nodes of 8 GPUs: each resolves (batch split and plan printed) or is
    refused with a message that lists the node counts that would work."""
    resolved = []
    for nodes in NODES:
        rc = submit.main(["--nodes", str(nodes), "--dry-run", str(config)])
        out, err = capsys.readouterr()
        if rc == 0:
            assert "# batch: global batch" in out and "capacity plan:" in out and "# precision: " in out, out
            assert "GiB  total of 80.0 GiB" in out and "tokens/day" in out
            resolved.append(nodes)
        else:
            assert rc == 2
            assert "optim.global_batch_size" in err and "do not split over" in err and "it splits at" in err, err
            assert "nodes of 8 tasks each" in err
    cfg = load_config(config)
    assert resolved, f"{config.name} resolves at none of {NODES} nodes"
    if config.stem in ("md4_small", "md4_medium"):
        assert 16 in resolved
    for nodes in resolved:     # the split the dry-run printed keeps the global batch
        b = resolve_batch(cfg, nodes * 8)
        assert b.micro_batch_size * b.grad_accum * b.data_parallel == cfg.optim.global_batch_size
        assert b.micro_batch_size <= cfg.optim.micro_batch_size


def test_md4_medium_at_16_nodes_resolves_with_a_plan(capsys):
    rc = submit.main(["--nodes", "16", "--dry-run", str(REPO / "configs" / "md4_medium.yaml")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "# batch: global batch 512 = micro-batch 8 x gradient accumulation 1 x data-parallel 64" in out
    assert "# precision: auto -> bf16 on H100-80GB" in out


@pytest.mark.parametrize("procs", [1, 2])
def test_the_cpu_demo_resolves_locally(procs, capsys):
    rc = submit.main(["--local", str(procs), "--dry-run", str(REPO / "configs" / "md4_tiny.yaml")])
    out = capsys.readouterr().out
    assert rc == 0 and "CPU processes of this machine" in out
    assert f"micro-batch {16 // procs} x gradient accumulation 1 x data-parallel {procs}" in out


@pytest.mark.parametrize("flag", [["--local", "0"], ["--local", "-1"], ["--nodes", "0"]])
def test_a_non_positive_process_or_node_count_is_refused(flag, capsys):
    with pytest.raises(SystemExit) as e:
        submit.main([*flag, "--dry-run", str(REPO / "configs" / "md4_tiny.yaml")])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


# ----- the terminal while a local job runs ---------------------------------------------------------

def test_submit_streams_progress_and_records_the_resolved_settings(tmp_path, data_dir):
    out = submit_tiny(tmp_path, data_dir, "run.name=stream", "optim.train_steps=4", "logging.log_interval=2",
                      "parallel.precision=auto", "optim.micro_batch_size=16")
    lines = out.stdout.splitlines()
    steps = [l for l in lines if l.startswith("[step ") and "bits/token" in l and "tok/s" in l and "ETA" in l]
    assert [l.split()[2] for l in steps] == ["2/4", "4/4"], out.stdout
    assert any("precision: auto -> fp32" in l for l in lines), out.stdout
    # micro_batch_size 16 is a maximum: the share of 4 per rank of the global batch 8 is what runs
    assert "batch: global batch 8 = micro-batch 4 x gradient accumulation 1 x data-parallel 2" in out.stdout
    doc = json.loads((tmp_path / "runs" / "stream" / "resolved.json").read_text())
    assert doc["precision"]["requested"] == "auto" and doc["precision"]["resolved"] == "fp32"
    assert (doc["batch"]["micro_batch_size"], doc["batch"]["grad_accum"], doc["batch"]["data_parallel"]) == (4, 1, 2)


def test_explicit_bf16_on_a_cpu_without_it_warns_in_the_terminal(tmp_path, data_dir):
    out = submit_tiny(tmp_path, data_dir, "run.name=bf16", "optim.train_steps=1", "parallel.precision=bf16",
                      procs=1)
    assert any(l.startswith("warning: parallel.precision=bf16") and "emulated" in l for l in out.stdout.splitlines())


def test_ctrl_c_cancels_every_rank_and_says_how_to_resume(tmp_path, data_dir):
    cmd = [PY, str(REPO / "launcher" / "submit.py"), "--local", "2", str(REPO / "configs" / "md4_tiny.yaml"),
           f"data.path={data_dir}", f"run.output_dir={tmp_path / 'runs'}", *TINY, "run.name=cc",
           "optim.train_steps=100000", "checkpoint.interval=2"]
    # a session of its own: SIGINT to its process group is what Ctrl-C in a terminal sends
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    ckpt = tmp_path / "runs" / "cc" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt.is_dir() and any(ckpt.glob("step_*/COMPLETE.json"))):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "cancelled: every rank of job" in err and "newest complete checkpoint is" in err, err
    assert "resume with the same command: python launcher/submit.py --local 2" in err
    assert "Traceback" not in err
    time.sleep(1.0)
    alive = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert alive == [], f"processes of the job still alive: {alive}"
    # the same command resumes from the newest complete checkpoint
    done = submit_tiny(tmp_path, data_dir, "run.name=cc", "checkpoint.interval=2",
                       f"optim.train_steps={_latest_step(ckpt) + 1}")
    assert "resumed from" in done.stdout and "held-out bits/token" in done.stdout


def _latest_step(ckpt: Path) -> int:
    from launcher.checkpoint import list_complete, verify

    tags = [t for t in list_complete(ckpt) if verify(ckpt / t) is None]
    return int(tags[-1].split("_")[1])
