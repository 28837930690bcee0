"""Export -> evaluate -> init_from through the real CLIs: a model trained at TP=2 (launcher/submit.py --local 2,
gloo, DeepSpeed ZeRO-1, EMA) and exported evaluates single-process (and under torchrun) to the held-out bound
the training run printed; the export loads back into training at TP=1 with the same loss; torn checkpoints
and exports, and data that does not fit the model, are refused naming the file; report.py draws the run."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_train_e2e import PY, REPO, data_dir, env, submit  # noqa: F401  (data_dir is a fixture)

FP32_TP2 = ["run.name=tp2", "optim.train_steps=3", "parallel.precision=fp32", "parallel.tensor_parallel=2",
            "model.num_layers=2", "logging.eval_batches=0", "optim.ema_decay=0.9", "checkpoint.interval=3",
            "model.time_conditioning=adaln"]   # adaLN-zero through export, evaluate, sample and init_from


def cli(*args, check=True):
    out = subprocess.run([PY, *map(str, args)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, data_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("tp2")
    submit(tmp, data_dir, *FP32_TP2, procs=2)
    run = tmp / "runs" / "tp2"
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_bits_per_token" in l]
    export = tmp / "export"
    cli(REPO / "launcher" / "export.py", run, "--out", export)
    return {"tmp": tmp, "run": run, "export": export, "val": val[-1]}


def test_tp2_export_evaluates_to_the_training_time_bound(tp2_run, data_dir):  # noqa: F811
    doc = json.loads((tp2_run["export"] / "config.json").read_text())
    assert doc["weights"] == "ema" and doc["step"] == 3 and doc["source"]["tensor_parallel"] == 2
    assert doc["architecture"]["vocab_size"] == 50257 and doc["diffusion"]["kind"] == "md4"
    assert doc["architecture"]["time_conditioning"] == "adaln"
    out = cli(REPO / "launcher" / "evaluate.py", tp2_run["export"], "--data", data_dir, "--batch-size", "7")
    res = last_json(out.stdout)
    want = tp2_run["val"]
    assert res["rows"] == want["val_rows"] and res["eval_draws"] == want["val_eval_draws"] == 1
    assert res["bits_per_token"] == pytest.approx(want["val_bits_per_token"], rel=1e-4)
    assert res["stderr_bits_per_token"] == pytest.approx(want["val_stderr_bits_per_token"], rel=1e-3)
    for key in ("ppl_bound", "tokens", "eval_draws", "stderr_bits_per_token"):
        assert key in res
    # the checkpoint itself (consolidated in memory) gives the same number as its export
    direct = last_json(cli(REPO / "launcher" / "evaluate.py", tp2_run["run"], "--data", data_dir,
                           "--limit-rows", "40", "--draws", "2").stdout)
    exported = last_json(cli(REPO / "launcher" / "evaluate.py", tp2_run["export"], "--data", data_dir,
                             "--limit-rows", "40", "--draws", "2", "--batch-size", "5").stdout)
    assert direct["bits_per_token"] == pytest.approx(exported["bits_per_token"], rel=1e-6)
    assert direct["rows"] == 40 and direct["eval_draws"] == 2


def test_distributed_evaluate_sums_rows_exactly(tp2_run, data_dir):  # noqa: F811
    single = last_json(cli(REPO / "launcher" / "evaluate.py", tp2_run["export"], "--data", data_dir,
                           "--limit-rows", "45", "--draws", "2", "--no-progress").stdout)
    from launcher.distributed import free_port

    out = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                          str(REPO / "launcher" / "evaluate.py"), str(tp2_run["export"]), "--data", str(data_dir),
                          "--limit-rows", "45", "--draws", "2", "--batch-size", "4", "--no-progress"],
                         cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dist = last_json(out.stdout)
    assert dist["ranks"] == 2 and dist["rows"] == single["rows"] == 45
    # every row counted once (one row is ~2% of the sum); float32 matmuls over batches of other shapes
    # (adaLN's per-row modulation) differ in the last bits
    assert dist["bits_per_token"] == pytest.approx(single["bits_per_token"], rel=1e-7)
    assert dist["stderr_bits_per_token"] == pytest.approx(single["stderr_bits_per_token"], rel=1e-6)


def test_init_from_export_at_tp1_gives_the_same_loss(tp2_run, data_dir):  # noqa: F811
    # one step at a negligible learning rate: the held-out bound after it is the export's
    submit(tp2_run["tmp"], data_dir, "run.name=init_tp1", "optim.train_steps=1", "parallel.precision=fp32",
           "model.num_layers=2", "logging.eval_batches=0", "optim.lr=1e-12", "optim.warmup_steps=0",
           "model.time_conditioning=adaln", f"checkpoint.init_from={tp2_run['export']}", procs=1)
    run = tp2_run["tmp"] / "runs" / "init_tp1"
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_bits_per_token" in l]
    assert val[-1]["val_bits_per_token"] == pytest.approx(tp2_run["val"]["val_bits_per_token"], rel=1e-4)
    log = "".join(p.read_text() for p in (run / "submitit").glob("*_0_log.out"))
    assert "initialised from" in log


def test_torn_checkpoint_and_export_are_refused_naming_the_file(tp2_run, tmp_path, data_dir):  # noqa: F811
    # a shard changed after COMPLETE.json was written
    run = tmp_path / "run"
    shutil.copytree(tp2_run["run"] / "checkpoints", run / "checkpoints")
    shutil.copy(tp2_run["run"] / "config.yaml", run / "config.yaml")
    tag = run / "checkpoints" / "step_00000003"
    shard = tag / "mp_rank_01_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    out = cli(REPO / "launcher" / "export.py", tag, "--out", tmp_path / "e", check=False)
    assert out.returncode == 2 and str(shard) in out.stderr, out.stderr
    # a shard missing from the checkpoint (COMPLETE.json rewritten to match, as a wrong layout would be)
    meta = json.loads((tag / "COMPLETE.json").read_text())
    shard.unlink()
    meta["files"].pop("mp_rank_01_model_states.pt")
    (tag / "COMPLETE.json").write_text(json.dumps(meta))
    out = cli(REPO / "launcher" / "export.py", tag, "--out", tmp_path / "e", check=False)
    assert out.returncode == 2 and "mp_rank_01_model_states.pt" in out.stderr and "missing" in out.stderr
    # a truncated export
    bad = tmp_path / "bad_export"
    shutil.copytree(tp2_run["export"], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = cli(REPO / "launcher" / "evaluate.py", bad, "--data", data_dir, check=False)
    assert out.returncode == 2 and str(weights) in out.stderr, out.stderr


def test_evaluate_refuses_data_that_does_not_fit_the_model(tp2_run, tmp_path):
    from data_pipeline.prepare import prepare_tokens

    docs = [[(i * 7 + j) % 8 for j in range(40)] for i in range(60)]
    other_tok = tmp_path / "markov8"
    prepare_tokens(docs, other_tok, 32, 0.2, tokenizer="markov8", vocab_size=8, eos_id=None)
    out = cli(REPO / "launcher" / "evaluate.py", tp2_run["export"], "--data", other_tok, check=False)
    assert out.returncode == 2
    assert str(other_tok / "manifest.json") in out.stderr and "tokenizer" in out.stderr
    assert "'markov8'" in out.stderr and "'gpt2'" in out.stderr
    other_len = tmp_path / "gpt2_16"
    prepare_tokens(docs, other_len, 16, 0.2, tokenizer="gpt2", vocab_size=50257, eos_id=50256)
    out = cli(REPO / "launcher" / "evaluate.py", tp2_run["export"], "--data", other_len, check=False)
    assert out.returncode == 2
    assert str(other_len / "manifest.json") in out.stderr and "seq_len=16" in out.stderr and "32" in out.stderr


def test_report_draws_the_loss_curve_and_summary(tp2_run, tmp_path):
    out = last_json(cli(REPO / "launcher" / "report.py", tp2_run["run"], "--out", tmp_path / "rep").stdout)
    png, md = Path(out["png"]), Path(out["markdown"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = md.read_text()
    assert "steps: 3" in text and "tokens seen: 768" in text
    assert f"{tp2_run['val']['val_bits_per_token']:.4f}" in text


def test_sample_cli_prints_text_and_network_calls(tp2_run):
    out = cli(REPO / "launcher" / "sample.py", tp2_run["export"], "--num", "2", "--steps", "8", "--prefix",
              "The President", "--length", "48", "--stride", "16")
    rec = last_json(out.stdout)
    assert rec["windows"] == 2 and rec["network_calls"] > 0 and "network calls:" in out.stderr
    assert all(s.startswith("The President") for s in rec["samples"])
    assert all(len(t) == 48 for t in rec["tokens"])


def megatron_split_dim(name: str) -> int | None:
    """The dimension megatron-core splits a parameter on over TP (None: replicated), written out for the synthetic
    checkpoint below; test_plain_model checks it against megatron's own `partition_dim` attributes."""
    import re

    if re.search(r"(embedding\.word_embeddings\.weight|linear_qkv\.(weight|bias)|linear_fc1\.(weight|bias)"
                 r"|output_layer\.weight)$", name):
        return 0
    return 1 if re.search(r"(linear_proj|linear_fc2)\.weight$", name) else None


@pytest.mark.parametrize("VPP", [1, 2])
def test_pipeline_stages_and_tensor_shards_consolidate(tmp_path, VPP):
    """Synthetic TP=2 x PP=2 (x VPP=2: model chunks `chunks.<c>.`, chunk c of stage p holding layer c * PP + p)
    model-states files (stage-local layer numbers, padded vocab shards, megatron's file naming mp_rank_TT_PPP)
    consolidate to the unsharded, unpadded weights, joined along the split dimensions the checkpoint records."""
    import hashlib
    import re

    from launcher.checkpoint import SPLIT_FILE
    from launcher.config import Config, ModelConfig, save_config
    from launcher.export import checkpoint_weights
    from model.plain import PlainDenoiser

    V, L, TP, PP, PAD = 50, 4, 2, 2, 64
    cfg = Config(model=ModelConfig(num_layers=L, hidden_size=32, num_attention_heads=4, seq_len=8, vocab_size=V,
                                   make_vocab_size_divisible_by=64))
    torch.manual_seed(0)
    full = {k: torch.randn_like(v) for k, v in PlainDenoiser.from_config(cfg.model).state_dict().items()}
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline = TP, PP, VPP
    per_chunk = L // (PP * VPP)
    split = {}
    for p in range(PP):
        for t in range(TP):
            module = {}
            for name, w in full.items():
                m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
                chunk, stage = divmod(int(m[1]) // per_chunk, PP) if m else (None, None)   # virtual stage c * PP + p
                if m and stage != p:
                    continue
                if name.startswith("embedding"):
                    chunk = 0
                    if p != 0:
                        continue
                if name.startswith(("output_layer", "decoder.final")):
                    chunk = VPP - 1
                    if p != PP - 1:
                        continue
                local = f"decoder.layers.{int(m[1]) - (chunk * PP + p) * per_chunk}.{m[2]}" if m else name
                if VPP > 1:
                    local = f"chunks.{chunk}.{local}"
                if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                    w = torch.cat([w, torch.randn(PAD - w.shape[0], w.shape[1])])   # padding rows
                d = megatron_split_dim(name)
                module[local] = w.chunk(TP, dim=d)[t].clone() if d is not None else w.clone()
                split.setdefault(str(p), {})[local] = d
            torch.save({"module": module, "step": 1, "tokens_seen": 8,
                        "checkpoint_parallel_dimensions": {"tp_degree": TP, "pp_degree": PP}},
                       tag / f"mp_rank_{t:02d}_{p:03d}_model_states.pt")
    (tag / SPLIT_FILE).write_text(json.dumps(split))
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in tag.iterdir()}
    (tag / "COMPLETE.json").write_text(json.dumps({"step": 1, "files": files}))
    _, tensors, meta = checkpoint_weights(tag, cfg=cfg)
    assert meta["weights"] == "raw" and meta["source"]["pipeline_parallel"] == PP and set(tensors) == set(full)
    assert meta["source"]["virtual_pipeline"] == VPP
    for k in full:
        torch.testing.assert_close(tensors[k], full[k], rtol=0, atol=0, msg=k)
    (tag / SPLIT_FILE).unlink()                 # a checkpoint without the recorded split dimensions is refused
    del files[SPLIT_FILE]
    (tag / "COMPLETE.json").write_text(json.dumps({"step": 1, "files": files}))
    from launcher.export import ExportError

    with pytest.raises(ExportError, match=f"{SPLIT_FILE}: missing"):
        checkpoint_weights(tag, cfg=cfg)


PIPELINE_LAYOUTS = {
    "tp2pp2": ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"],
    "pp2vpp2": ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("source,procs,target,target_procs", [
    ("tp2pp2", 4, "pp2vpp2", 2),     # export -> init_from into interleaved stages (model chunks)
    ("pp2vpp2", 2, None, 1),         # interleaved stages' checkpoint -> export -> TP=1, PP=1
], ids=["tp2pp2_to_pp2vpp2", "pp2vpp2_to_tp1pp1"])
def test_pipeline_checkpoint_exports_evaluates_and_loads_at_another_layout(tmp_path, data_dir, source, procs,
                                                                           target, target_procs):  # noqa: F811
    """A checkpoint saved at TP=2 x PP=2 (4 processes, megatron 1F1B + ZeRO-1) or at PP=2 x VPP=2 (interleaved
    1F1B over two model chunks per rank) exports to the TP=1, PP=1 names, evaluates single-process to the
    training-time held-out bound, and loads through checkpoint.init_from into another layout (PP=2 x VPP=2, or
    TP=1, PP=1) with the same bound."""
    layout = ["optim.train_steps=2", "parallel.precision=fp32", "model.num_layers=4", "logging.eval_batches=0",
              "optim.micro_batch_size=4", "optim.global_batch_size=8", "checkpoint.interval=2", "optim.ema_decay=0.9"]
    submit(tmp_path, data_dir, f"run.name={source}", *layout, *PIPELINE_LAYOUTS[source], procs=procs)
    run = tmp_path / "runs" / source
    want = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_bits_per_token" in l][-1]
    export = tmp_path / "export"
    cli(REPO / "launcher" / "export.py", run, "--out", export)
    doc = json.loads((export / "config.json").read_text())
    assert doc["weights"] == "ema"       # the bound was evaluated with the EMA of every stage's (chunk's) weights
    assert [doc["source"][k] for k in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline")] == \
        ([2, 2, 1] if source == "tp2pp2" else [1, 2, 2])
    res = last_json(cli(REPO / "launcher" / "evaluate.py", export, "--data", data_dir, "--no-progress").stdout)
    assert res["bits_per_token"] == pytest.approx(want["val_bits_per_token"], rel=1e-4)
    submit(tmp_path, data_dir, "run.name=back", "optim.train_steps=1", "parallel.precision=fp32",
           "model.num_layers=4", "logging.eval_batches=0", "optim.lr=1e-12", "optim.warmup_steps=0",
           f"checkpoint.init_from={export}", *PIPELINE_LAYOUTS.get(target, []), procs=target_procs)
    back = tmp_path / "runs" / "back"
    val = [json.loads(l) for l in (back / "metrics.jsonl").read_text().splitlines() if "val_bits_per_token" in l][-1]
    assert val["val_bits_per_token"] == pytest.approx(want["val_bits_per_token"], rel=1e-4)
    assert "initialised from" in "".join(p.read_text() for p in (back / "submitit").glob("*_0_log.out"))


def test_resuming_at_another_virtual_pipeline_size_is_refused_with_the_way_to_do_it(tmp_path):
    """The virtual pipeline size is part of a checkpoint's layout (its parameter names hold the chunk index)."""
    import yaml

    from launcher.checkpoint import check_layout
    from launcher.config import config_from_dict

    tag = tmp_path / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    for r in range(2):
        (tag / f"extra_rank{r}.pt").write_bytes(b"")
    saved = {"tensor_parallel": 1, "pipeline_parallel": 2, "virtual_pipeline": 2, "zero_stage": 1}
    (tag / "config.yaml").write_text(yaml.safe_dump({"parallel": saved}))

    def check(**parallel):   # what the job asks before it loads a checkpoint, on 2 ranks
        check_layout(tag, config_from_dict({"parallel": parallel, "model": {"num_layers": 4}}).parallel, 2)

    check(pipeline_parallel=2, virtual_pipeline=2)      # the same layout resumes
    with pytest.raises(RuntimeError) as e:
        check(pipeline_parallel=2)
    assert "was written at TP=1, PP=2, VPP=2, ZeRO-1 on 2 ranks; this job runs TP=1, PP=2, VPP=1, ZeRO-1 on 2 ranks" \
        in str(e.value) and "checkpoint.init_from=EXPORT" in str(e.value)
    del saved["virtual_pipeline"]                                            # written before the key existed
    (tag / "config.yaml").write_text(yaml.safe_dump({"parallel": saved}))
    check(pipeline_parallel=2)
    with pytest.raises(RuntimeError, match="this job runs TP=1, PP=2, VPP=2, ZeRO-1 on 2 ranks"):
        check(pipeline_parallel=2, virtual_pipeline=2)


def test_resuming_at_another_layout_is_refused_with_the_way_to_do_it(tp2_run, tmp_path, data_dir):  # noqa: F811
    shutil.copytree(tp2_run["run"], tmp_path / "runs" / "tp2")       # a copy: the fixture's run stays as it is
    out = submit(tmp_path, data_dir, *[o for o in FP32_TP2 if not o.startswith("parallel.tensor_parallel")],
                 "optim.train_steps=5", procs=1, check=False)
    # refused by submit.py before the run directory is touched (issue 15), with the export route
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-2000:])
    assert "was written at TP=2, PP=1, VPP=1, ZeRO-1 on 2 ranks" in out.stderr, out.stderr
    assert "checkpoint.init_from" in out.stderr and "launcher/export.py" in out.stderr
