"""End to end through the real CLIs: data_pipeline.prepare -> launcher/submit.py --local 2 (submitit,
gloo, megatron-core denoiser, DeepSpeed ZeRO-1) -> checkpoints -> resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

TINY = ["model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_len=32",
        "optim.micro_batch_size=4", "optim.global_batch_size=8", "optim.lr_schedule=constant",
        "optim.warmup_steps=2", "optim.lr=3e-3", "logging.log_interval=1", "logging.eval_batches=2",
        "logging.sample_at_end=false", "checkpoint.interval=3", "checkpoint.keep_last=2", "data.num_workers=1"]


def env():
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["TIKTOKEN_CACHE_DIR"] = ""
    return e


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "sotu32"
    subprocess.run([PY, "-m", "data_pipeline.prepare", "--source", "sotu", "--out", str(out), "--seq-len", "32",
                    "--max-docs", "30", "--quiet", "--cache-dir", str(REPO / "data" / "cache")],
                   check=True, cwd=REPO, env=env(), capture_output=True)
    return out


def submit(tmp_path, data_dir, *overrides, check=True, procs=2):
    cmd = [PY, str(REPO / "launcher" / "submit.py"), "--local", str(procs), str(REPO / "configs" / "md4_tiny.yaml"),
           f"data.path={data_dir}", f"run.output_dir={tmp_path / 'runs'}", *TINY, *overrides]
    out = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "runs").rglob("*_log.err"))
        raise AssertionError(f"submit failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{logs}")
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_bits_per_token"] for r in recs if "train_bits_per_token" in r}


@pytest.mark.slow
def test_resume_continues_step_counter_and_loss_curve(tmp_path, data_dir):
    # uninterrupted reference: 6 steps (with an EMA of the weights, which the held-out bound uses)
    ema = "optim.ema_decay=0.9"
    submit(tmp_path, data_dir, "run.name=full", "optim.train_steps=6", ema)
    full = train_losses(tmp_path / "runs" / "full")
    assert sorted(full) == [1, 2, 3, 4, 5, 6]

    # the same run stopped after 3 steps, then the same command with more steps: it resumes
    submit(tmp_path, data_dir, "run.name=split", "optim.train_steps=3", ema)
    out = submit(tmp_path, data_dir, "run.name=split", "optim.train_steps=6", ema)
    run = tmp_path / "runs" / "split"
    log = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.out"))
    assert "resumed from" in log and "step_00000003" in log
    split = train_losses(run)
    assert sorted(split) == [1, 2, 3, 4, 5, 6]            # the step counter continued at 4
    for step in range(1, 7):
        assert split[step] == pytest.approx(full[step], rel=1e-6, abs=1e-6), (step, split, full)
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == 6 and result["heldout"]["bits_per_token"] > 0
    # the EMA weights were checkpointed and restored: the held-out bound (EMA weights) is the same
    full_result = json.loads((tmp_path / "runs" / "full" / "result.json").read_text())
    assert result["heldout"]["bits_per_token"] == pytest.approx(full_result["heldout"]["bits_per_token"], rel=1e-6)
    assert "held-out bits/token" in out.stdout and "unigram perplexity" in out.stdout
    # the run directory is self-contained
    for name in ("config.yaml", "code_version.txt", "code/launcher/train.py", "tensorboard"):
        assert (run / name).exists(), name
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_training_scalars(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    submit(tmp_path, data_dir, "run.name=tb", "optim.train_steps=3", "logging.sample_interval=2",
           "logging.num_samples=2", "sampler.steps=4")
    acc = EventAccumulator(str(tmp_path / "runs" / "tb" / "tensorboard"))
    acc.Reload()
    # text samples at the configured interval, read back from the event file
    texts = acc.Tensors("samples/unconditional/text_summary")
    assert [e.step for e in texts] == [2]
    shown = texts[0].tensor_proto.string_val[0].decode()
    assert shown.count("---") == 1 and len(shown) > 20, shown
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/bits_per_token", "train/lr", "train/grad_norm", "perf/tokens_per_s",
                "perf/tflops_per_device", "perf/peak_memory_gb", "perf/data_wait_s", "time/checkpoint_s",
                "val/bits_per_token", "val/ppl_bound"):
        assert tag in tags, (tag, tags)
    assert [e.step for e in acc.Scalars("train/bits_per_token")] == [1, 2, 3]


def test_manifest_mismatch_is_refused_before_training(tmp_path, data_dir):
    out = submit(tmp_path, data_dir, "run.name=bad", "optim.train_steps=2", "model.seq_len=64", check=False)
    assert out.returncode == 2
    assert "seq_len" in out.stderr and "manifest.json" in out.stderr
    assert not (tmp_path / "runs" / "bad").exists()
