"""Non-finite loss or gradients: the step is skipped (weights and LR schedule untouched) and counted;
after K consecutive ones the run saves a checkpoint and stops with a message naming the step.

The real training job (launcher/train.py's setup and train: megatron-core denoiser + DeepSpeed ZeRO-1) runs in a fresh 1-process gloo world; a
forward hook poisons the denoiser's output with NaN from a chosen step on."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, os, socket, sys, torch
    from pathlib import Path
    from launcher.config import config_from_dict, save_config
    import launcher.train as T
    from data_pipeline.prepare import prepare
    from data_pipeline.sources import sotu_documents

    out = Path(sys.argv[1])
    data = out / "data"
    prepare(sotu_documents(sys.argv[2])[:20], data, seq_len=32, val_fraction=0.2, split_seed=0, workers=1)
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = config_from_dict({
        "run": {"name": "nan", "output_dir": str(out / "runs")},
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_len": 32},
        "data": {"path": str(data), "num_workers": 0},
        "optim": {"train_steps": 10, "micro_batch_size": 4, "global_batch_size": 4, "warmup_steps": 0,
                  "lr_schedule": "constant", "max_consecutive_skips": 3},
        "logging": {"log_interval": 1, "eval_interval": 100, "eval_batches": 1, "sample_at_end": False},
        "checkpoint": {"interval": 100}})
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    tr = T.setup(cfg, run_dir)
    POISON_FROM = 3
    tr.engine.module.register_forward_hook(
        lambda mod, inp, out: out * float("nan") if tr.step + 1 >= POISON_FROM else out)
    snap = {}
    orig = T.train_step
    def spy(job, batches):
        before = {k: p.detach().clone() for k, p in job.engine.module.named_parameters()}
        lr_before = job.scheduler.get_last_lr()[0]
        res = orig(job, batches)
        changed = any(not torch.equal(before[k], p) for k, p in job.engine.module.named_parameters())
        snap[job.step + 1] = {"applied": res.applied, "changed": changed,
                              "lr_same": job.scheduler.get_last_lr()[0] == lr_before}
        return res
    T.train_step = spy        # what train() calls each step
    try:
        T.train(tr)
        msg = None
    except RuntimeError as e:
        msg = str(e)
    print("RESULT " + json.dumps({"msg": msg, "snap": snap, "skipped": tr.engine.skipped_steps,
                                  "latest": (run_dir / "checkpoints" / "latest").read_text().strip()
                                  if (run_dir / "checkpoints" / "latest").exists() else None}))
""")


def test_nonfinite_steps_are_skipped_then_the_run_stops_naming_the_step(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(REPO / "data" / "cache")],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-5000:]
    import json

    res = json.loads(line[len("RESULT "):])
    snap = {int(k): v for k, v in res["snap"].items()}
    assert snap[1]["applied"] and snap[1]["changed"] and snap[2]["applied"]
    for step in (3, 4, 5):                       # poisoned: skipped, weights and LR untouched
        assert not snap[step]["applied"] and not snap[step]["changed"] and snap[step]["lr_same"], snap
    assert res["skipped"] == 3
    assert res["msg"] and "3 consecutive steps" in res["msg"] and "step 5" in res["msg"]
    assert res["latest"] == "step_00000005"
