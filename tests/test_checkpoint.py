"""Checkpoints survive what happens to real jobs: a rank killed (SIGKILL) in the middle of writing a
checkpoint, a corrupted shard, pruning; and the SLURM dry run (no cluster needed).

The training scenarios run the real training job (megatron-core denoiser, DeepSpeed ZeRO-1, gloo) in 2 rank
processes started by this file (`python tests/test_checkpoint.py RUN_DIR [--die-in-save STEP]`, with
RANK/WORLD_SIZE/MASTER_* in the environment, as torchrun would set them):

1. a run with checkpoint.interval=3 that is killed while saving step 6: rank 1 SIGKILLs itself halfway
   through writing its DeepSpeed ZeRO optimizer shard of step 6 (the driver wraps torch.save in that
   process only: the serialized bytes are cut in half, written, fsync'd, then `kill -9` of its own pid).
   That point is deterministic and is inside DeepSpeed's save: the shard on disk is torn, extra_rank1.pt
   and COMPLETE.json of step 6 were never written, `latest` still names step 3. Rank 0, stuck in the
   collective save, is then SIGKILLed by the test, as SLURM ends a job whose task died;
2. the same run started again: it must resume from step 3 (the torn step 6 never used; at most one
   interval lost), re-train steps 4-6 to the same losses, and finish at step 9 with keep_last=2;
3. one byte of a shard of the newest checkpoint flipped: the next start must warn naming that file,
   resume from the previous checkpoint and again reproduce the losses.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
INTERVAL, KEEP, STEPS = 3, 2, 9
TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_len=32",
        "optim.micro_batch_size=4", "optim.global_batch_size=8", "optim.lr_schedule=constant",
        "optim.warmup_steps=2", "optim.lr=3e-3", "logging.log_interval=1", "logging.eval_batches=1",
        "logging.eval_interval=1000", "logging.sample_at_end=false", f"checkpoint.interval={INTERVAL}",
        f"checkpoint.keep_last={KEEP}", "data.num_workers=0", f"optim.train_steps={STEPS}"]


# ------------------------------------------------------------------------------------ the driver
def _driver(run_dir: str, die_in_save: int | None) -> None:
    """One rank of a training run (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    import torch

    from launcher.checkpoint import tag_for
    from launcher.train import train_main

    rank = int(os.environ["RANK"])
    if die_in_save is not None and rank == 1:
        real_save = torch.save
        torn = f"{tag_for(die_in_save)}/zero_pp_rank_1_"

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and torn in str(f):
                import io

                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                data = buf.getvalue()
                with open(f, "wb") as out:
                    out.write(data[: len(data) // 2])
                    out.flush()
                    os.fsync(out.fileno())
                print(f"DRIVER: wrote {len(data) // 2} of {len(data)} bytes of {f}; kill -9 self", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    train_main(run_dir)


def _env(rank: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUBMITIT_", "SLURM_"))}
    env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO), TIKTOKEN_CACHE_DIR="")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def _start(run_dir: Path, die_in_save: int | None = None) -> list[subprocess.Popen]:
    from launcher.distributed import free_port

    port = free_port()
    extra = ["--die-in-save", str(die_in_save)] if die_in_save is not None else []
    procs = []
    for rank in (0, 1):
        log = open(run_dir / f"driver_rank{rank}.log", "a")
        procs.append(subprocess.Popen([PY, __file__, str(run_dir), *extra], env=_env(rank, port), cwd=run_dir,
                                      stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _log(run_dir: Path, rank: int = 0) -> str:
    return (run_dir / f"driver_rank{rank}.log").read_text(errors="replace")


def _finish(run_dir: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rcs = [p.returncode for p in procs]
    assert rcs == [0, 0], f"driver ranks exited {rcs}:\n{_log(run_dir, 0)[-4000:]}\n{_log(run_dir, 1)[-2000:]}"


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_bits_per_token"]) for r in recs if "train_bits_per_token" in r]


def _complete(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.glob("step_*") if (p / "COMPLETE.json").is_file())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run directory after phases 1 and 2 (killed mid-save at step 6, then restarted to step 9)."""
    from launcher.config import load_config, save_config

    base = tmp_path_factory.mktemp("ckpt")
    data = base / "sotu32"
    subprocess.run([PY, "-m", "data_pipeline.prepare", "--source", "sotu", "--out", str(data), "--seq-len", "32",
                    "--max-docs", "30", "--quiet", "--cache-dir", str(REPO / "data" / "cache")],
                   check=True, cwd=REPO, env=_env(0, 0), capture_output=True)
    cfg = load_config(REPO / "configs" / "md4_tiny.yaml",
                      [f"data.path={data}", f"run.output_dir={base}", "run.name=r", *TINY])
    run_dir = base / "r"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    ckpt = run_dir / "checkpoints"
    info = {"run_dir": run_dir, "ckpt": ckpt}

    # phase 1: rank 1 dies (SIGKILL) in the middle of writing its DeepSpeed shard of step 6
    t0 = time.monotonic()
    procs = _start(run_dir, die_in_save=6)
    try:
        procs[1].wait(timeout=300)
        # the job is torn down when a task dies (SLURM kills the others); rank 0 waits in the save's barrier
        deadline = time.monotonic() + 5
        while procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        info["rank0_still_in_save"] = procs[0].poll() is None
        if procs[0].poll() is None:
            procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    info["phase1_rc"] = [p.returncode for p in procs]
    info["phase1_losses"] = _losses(run_dir)
    info["torn_files"] = sorted(p.name for p in (ckpt / "step_00000006").iterdir()) \
        if (ckpt / "step_00000006").is_dir() else []
    info["latest_after_kill"] = (ckpt / "latest").read_text().strip()
    info["complete_after_kill"] = _complete(ckpt)
    info["phase1_s"] = time.monotonic() - t0

    # phase 2: the same run started again
    t0 = time.monotonic()
    _finish(run_dir, _start(run_dir))
    info["phase2_s"] = time.monotonic() - t0
    info["phase2_log"] = _log(run_dir)
    info["phase2_losses"] = _losses(run_dir)
    info["complete_after_phase2"] = _complete(ckpt)
    info["dirs_after_phase2"] = sorted(p.name for p in ckpt.glob("step_*"))
    return info


def test_kill9_mid_checkpoint_write_resumes_from_previous(run):
    ckpt = run["ckpt"]
    # phase 1 died where it should: rank 1 by SIGKILL inside DeepSpeed's save of step 6
    assert run["phase1_rc"][1] == -signal.SIGKILL, run["phase1_rc"]
    assert "DRIVER: wrote" in _log(run["run_dir"], 1) and "step_00000006/zero_pp_rank_1_" in _log(run["run_dir"], 1)
    # rank 0 never finished that save: it waited for rank 1 (killed by the test) or gloo failed it
    assert run["rank0_still_in_save"] or run["phase1_rc"][0] != 0, run["phase1_rc"]
    assert [s for s, _ in run["phase1_losses"]] == [1, 2, 3, 4, 5, 6]
    assert "COMPLETE.json" not in run["torn_files"] and "extra_rank1.pt" not in run["torn_files"], run["torn_files"]
    assert any(f.startswith("zero_pp_rank_1_") for f in run["torn_files"]), run["torn_files"]
    assert run["latest_after_kill"] == "step_00000003" and run["complete_after_kill"] == ["step_00000003"]

    # phase 2: resumed from step 3 (the previous complete checkpoint), never from the torn step 6
    log = run["phase2_log"]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(ckpt / "step_00000003"), "3")], resumed
    lost = 6 - int(resumed[0][1])
    assert lost <= INTERVAL, f"lost {lost} steps, more than one checkpoint interval ({INTERVAL})"
    # and it continued exactly: steps 4..6 are re-trained to the losses logged before the kill, and
    # metrics.jsonl holds each step once (the records past the resumed step were dropped on resume)
    losses = run["phase2_losses"]
    first, again = dict(run["phase1_losses"]), dict(losses)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), losses
    assert again[4] == first[4] and again[5] == first[5] and again[6] == first[6]
    print(f"\nphase 1 (killed in save) {run['phase1_s']:.1f}s, phase 2 (resume to {STEPS}) {run['phase2_s']:.1f}s")


def test_keep_last_prunes_to_k_complete_checkpoints(run):
    # steps 3, 6 (re-written over the torn attempt), 9 were saved; keep_last=2 keeps 6 and 9 only
    assert run["complete_after_phase2"] == ["step_00000006", "step_00000009"]
    assert run["dirs_after_phase2"] == ["step_00000006", "step_00000009"], "torn/pruned dirs left behind"
    assert (run["ckpt"] / "latest").read_text().strip() == "step_00000009"
    meta = json.loads((run["ckpt"] / "step_00000006" / "COMPLETE.json").read_text())
    assert "extra_rank1.pt" in meta["files"] and any(f.startswith("zero_pp_rank_1_") for f in meta["files"])
    # the resolved config travels with the checkpoint, checksummed with the rest
    assert "config.yaml" in meta["files"]
    assert (run["ckpt"] / "step_00000006" / "config.yaml").read_text() == (run["run_dir"] / "config.yaml").read_text()


def test_corrupted_shard_is_skipped_with_warning_and_previous_loads(run):
    run_dir, ckpt = run["run_dir"], run["ckpt"]
    newest = ckpt / "step_00000009"
    shard = max((p for p in newest.iterdir() if p.name.startswith("zero_pp_rank_")), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rank0_log_len = len(_log(run_dir))

    _finish(run_dir, _start(run_dir))
    log = _log(run_dir)[rank0_log_len:]
    assert re.search(rf"WARNING: skipping checkpoint {re.escape(str(newest))}: {re.escape(str(shard))}: "
                     r"checksum mismatch", log), log[-3000:]
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
    assert resumed == [(str(ckpt / "step_00000006"), "6")], resumed
    # steps 7..9 re-trained to the same losses; metrics.jsonl holds each step once (truncated on resume)
    losses = _losses(run_dir)
    assert [s for s, _ in losses] == list(range(1, 10)), losses
    again = losses[6:]
    before = dict(run["phase2_losses"][-3:])
    assert sorted(before) == [7, 8, 9] and all(before[s] == v for s, v in again), (again, before)
    # the corrupt checkpoint was replaced by a good one at the same step
    assert _complete(ckpt) == ["step_00000006", "step_00000009"]
    from launcher.checkpoint import verify

    assert verify(newest) is None


def test_find_resumable_warns_and_names_the_bad_file(tmp_path):
    """Unit level, no training: verify()/find_resumable() on hand-made checkpoint directories."""
    import hashlib

    import torch.distributed as dist

    from launcher import checkpoint
    from launcher.megatron_cpu import init_single_process_megatron

    for step in (3, 6):
        d = tmp_path / checkpoint.tag_for(step)
        d.mkdir()
        (d / "shard.pt").write_bytes(bytes(range(256)) * 4)
        files = {"shard.pt": hashlib.sha256((d / "shard.pt").read_bytes()).hexdigest()}
        (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "files": files}))
    (tmp_path / checkpoint.tag_for(9)).mkdir()          # torn: no COMPLETE.json
    (tmp_path / checkpoint.tag_for(9) / "shard.pt").write_bytes(b"x")
    bad = tmp_path / checkpoint.tag_for(6) / "shard.pt"
    raw = bytearray(bad.read_bytes())
    raw[100] ^= 0x01
    bad.write_bytes(bytes(raw))

    started = not dist.is_initialized()
    init_single_process_megatron()
    try:
        with pytest.warns(UserWarning) as caught:
            tag, skipped = checkpoint.find_resumable(tmp_path, rank=0)
    finally:
        if started:
            from launcher.megatron_cpu import destroy_megatron

            destroy_megatron()
    assert tag == checkpoint.tag_for(3)
    # both newer ones are named: the torn step 9 (no COMPLETE.json) and step 6's corrupt file
    torn = tmp_path / checkpoint.tag_for(9)
    assert skipped == [f"skipping checkpoint {torn}: no {checkpoint.COMPLETE} (a save that did not finish)",
                       f"skipping checkpoint {bad.parent}: {bad}: checksum mismatch (corrupt or partially written)"], skipped
    assert [str(w.message) for w in caught] == skipped
    assert checkpoint.newest_verified(tmp_path) == (tag, [w.split("skipping checkpoint ", 1)[1] for w in skipped])
    assert "checksum mismatch" in checkpoint.verify(tmp_path / checkpoint.tag_for(6))


def test_prune_keeps_last_k_every_mth_and_drops_torn_dirs(tmp_path):
    from launcher import checkpoint

    for step in range(10, 101, 10):
        d = tmp_path / checkpoint.tag_for(step)
        d.mkdir()
        (d / checkpoint.COMPLETE).write_text("{}")
    (tmp_path / checkpoint.tag_for(55)).mkdir()     # a save that died: older than the newest, deleted
    (tmp_path / checkpoint.tag_for(110)).mkdir()    # newer than every complete one: left alone
    deleted = checkpoint.prune(tmp_path, keep_last=2, keep_every=40)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [checkpoint.tag_for(s) for s in (40, 80, 90, 100, 110)], left
    assert checkpoint.tag_for(55) in deleted


def test_safe_load_refuses_pickled_code_and_names_the_file(tmp_path):
    """DeepSpeed's own loader would run this file's payload (torch.load(weights_only=False))."""
    import pickle

    import torch

    from launcher.checkpoint import safe_load

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "mp_rank_00_model_states.pt"
    with open(evil, "wb") as f:
        pickle.dump({"module": Payload()}, f)
    with pytest.raises(RuntimeError, match=re.escape(str(evil))):
        safe_load(evil)
    assert not marker.exists()
    good = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2), "step": 3}, good)
    assert safe_load(good)["step"] == 3


# ------------------------------------------------------------------------------- (d) dry run
def _dry(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}   # no cluster involved
    return subprocess.run([PY, str(REPO / "launcher" / "submit.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_16_nodes_prints_sbatch_script_and_config(tmp_path):
    out = _dry("--cluster", "example_gpu", "--nodes", "16", "--dry-run", "--partition", "big", "--time", "600",
               "configs/md4_tiny.yaml", "optim.global_batch_size=2048", f"run.output_dir={tmp_path}", "run.name=d")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for line in ("#SBATCH --nodes=16", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --signal=USR2@90", "#SBATCH --partition=big", "#SBATCH --time=600",
                 "#SBATCH --account=my-project", "#SBATCH --constraint=h100", "#SBATCH --cpus-per-task=12",
                 f"export PYTHONPATH={tmp_path / 'd' / 'code'}", "export PYTHONSAFEPATH=1",
                 "srun --unbuffered", "-m submitit.core._submit"):
        assert line in text, (line, text)
    assert "# resolved config" in text and "global_batch_size: 2048" in text and "world size 128" in text
    assert not (tmp_path / "d").exists(), "a dry run must not create the run directory"
    assert "submitted job" not in text

    # built-in defaults without a profile: 8 GPUs per node, USR2 two minutes before the limit
    out = _dry("--nodes", "16", "--dry-run", "configs/md4_tiny.yaml", "optim.global_batch_size=2048",
               f"run.output_dir={tmp_path}", "run.name=d")
    assert out.returncode == 0, out.stderr
    for line in ("#SBATCH --nodes=16", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=USR2@120"):
        assert line in out.stdout, (line, out.stdout)

    # CPU cluster: --tasks-per-node, no GPU flag
    out = _dry("--cluster", "loopback", "--nodes", "1", "--tasks-per-node", "2", "--dry-run", "configs/md4_tiny.yaml",
               f"run.output_dir={tmp_path}", "run.name=d")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --ntasks-per-node=2" in out.stdout and "--gpus-per-node" not in out.stdout
    assert "#SBATCH --partition=debug" in out.stdout and "#SBATCH --time=60" in out.stdout

    # one task per GPU: a different --tasks-per-node on a GPU cluster is refused
    out = _dry("--cluster", "example_gpu", "--nodes", "2", "--tasks-per-node", "4", "--dry-run",
               "configs/md4_tiny.yaml", f"run.output_dir={tmp_path}")
    assert out.returncode == 2 and "one task per GPU" in out.stderr, out.stderr
    out = _dry("--cluster", "no_such_cluster", "--nodes", "1", "--dry-run", "configs/md4_tiny.yaml")
    assert out.returncode == 2 and "no_such_cluster" in out.stderr, out.stderr


if __name__ == "__main__":
    _args = sys.argv[1:]
    _die = int(_args[_args.index("--die-in-save") + 1]) if "--die-in-save" in _args else None
    _driver(_args[0], _die)
