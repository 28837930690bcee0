"""Logging beside TensorBoard: Weights & Biases in offline mode (logging.wandb) and a torch.profiler trace of
chosen steps (logging.profile_steps), through one short real training run (launcher/submit.py --local 1); the
offline wandb file is read back record by record and its scalars equal metrics.jsonl's and TensorBoard's."""
import json
import struct
import time
import zlib
from pathlib import Path

import pytest

from test_train_e2e import submit

VOCAB, SEQ = 64, 32


@pytest.fixture(scope="module")
def ids_data(tmp_path_factory):
    """Random ids over a 64-token vocabulary, prepared in this process (a small embedding keeps the run short)."""
    import numpy as np

    from data_pipeline.prepare import prepare_tokens

    out = tmp_path_factory.mktemp("data") / "ids64"
    docs = np.random.default_rng(0).integers(0, VOCAB, size=(120, SEQ))
    prepare_tokens([list(map(int, d)) for d in docs], out, SEQ, 0.2, tokenizer="ids64", vocab_size=VOCAB, eos_id=None)
    return out


def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: wandb's LevelDB-log framing (a 7-byte file header ':W&B', 0xBEE1,
    version 0; 32 KiB blocks of chunks, each with crc32, length and type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4).
    wandb 0.31 writes the file from its Go core and ships no Python reader of it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), path
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:             # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, (path, pos)
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def wandb_config(path: Path) -> dict:
    """The run's config: the run record's, updated by the config records that follow it."""
    out = {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for u in (r.run.config if kind == "run" else r.config).update:
                out[u.key] = json.loads(u.value_json)
    return out


def wandb_history(path: Path) -> list[dict]:
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


@pytest.mark.slow
def test_wandb_offline_and_profiler_trace_of_a_short_run(tmp_path, ids_data, wandb_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    submit(tmp_path, ids_data, "data.tokenizer=ids64", f"model.vocab_size={VOCAB}", "model.make_vocab_size_divisible_by=8",
           "run.name=wb", "optim.train_steps=3", "logging.wandb.project=mdiff-test",
           "logging.wandb.mode=offline", "logging.wandb.tags=[ci]", "logging.profile_steps=[2, 3]", procs=1)
    run = tmp_path / "runs" / "wb"
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_id}")        # wandb's files inside the run directory
    records = wandb_records(offline / f"run-{run_id}.wandb")
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.run_id == run_id and meta.project == "mdiff-test" and meta.display_name == "wb"
    config = wandb_config(offline / f"run-{run_id}.wandb")
    assert config["model"]["seq_len"] == 32 and config["logging"]["wandb"]["mode"] == "offline"
    assert config["resolved"]["precision"]["resolved"] == "fp32" and config["resolved"]["batch"]["global_batch_size"] == 8

    rows = {r["step"]: r for r in wandb_history(offline / f"run-{run_id}.wandb")}
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = {m["step"]: m for m in metrics if "train_bits_per_token" in m}
    val = {m["step"]: m for m in metrics if "val_bits_per_token" in m}
    assert sorted(rows) == sorted(train) == [1, 2, 3]
    for step, m in train.items():
        assert rows[step]["train/bits_per_token"] == m["train_bits_per_token"]
        assert rows[step]["train/lr"] == m["lr"] and rows[step]["perf/tokens_per_s"] == m["tokens_per_s"]
    assert rows[3]["val/bits_per_token"] == val[3]["val_bits_per_token"]
    # the same scalars as TensorBoard, at the same steps (TensorBoard stores float32)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb_tags = set(acc.Tags()["scalars"])
    assert tb_tags == {k for r in rows.values() for k in r if not k.startswith("_") and k != "step"}
    for tag in tb_tags:
        for e in acc.Scalars(tag):
            assert rows[e.step][tag] == pytest.approx(e.value, rel=1e-6), (tag, e.step)

    # the profiler trace of steps 2..3 (rank 0 of 1): Chrome trace JSON, one ProfilerStep per step
    (trace,) = (run / "profile").glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert len(events) > 100 and {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#1" not in names


def test_resuming_a_run_directory_continues_its_wandb_run_id(tmp_path, wandb_env):
    from launcher.config import config_from_dict
    from launcher.runlog import WANDB_ID_FILE, RunLogger

    data = {"run": {"name": "r"}, "logging": {"wandb": {"project": "p", "mode": "offline"}}}
    for steps, lr in (([1, 2], 1e-3), ([3], 5e-4)):      # a first job, then the resumed one with a new lr
        logger = RunLogger(tmp_path, config_from_dict({**data, "optim": {"lr": lr}}))
        for s in steps:
            logger.add_scalar("train/bits_per_token", 10.0 - s, s)
            logger.add_scalar("val/bits_per_token", 20.0 - s, s)
        logger.close()
        time.sleep(1.1)     # wandb names an offline run's folder by the second it started
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    jobs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(jobs) == 2 and all(j.name.endswith(f"-{run_id}") for j in jobs)
    rows = [wandb_history(j / f"run-{run_id}.wandb") for j in jobs]
    assert [[(r["step"], r["train/bits_per_token"], r["val/bits_per_token"]) for r in h] for h in rows] == \
        [[(1, 9.0, 19.0), (2, 8.0, 18.0)], [(3, 7.0, 17.0)]]
    assert [wandb_config(j / f"run-{run_id}.wandb")["optim"]["lr"] for j in jobs] == [1e-3, 5e-4]
    # with wandb disabled (the default) nothing of wandb is written
    RunLogger(tmp_path / "off", config_from_dict({})).close()
    assert not (tmp_path / "off" / "wandb").exists() and not (tmp_path / "off" / WANDB_ID_FILE).exists()
