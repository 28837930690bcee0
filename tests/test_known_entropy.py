"""Sources of known entropy -> data_pipeline.prepare.prepare_tokens -> a tiny model trained briefly on CPU
through launcher/submit.py (the real engine) -> launcher/export.py -> launcher/evaluate.py: the held-out bound is at or above the true
entropy (within 3 standard errors) and within 10% of it; samples from launcher/sample.py reproduce the chain's
transition statistics.

Sources: an 8-state Markov chain (rows of 16 tokens started from its uniform stationary distribution: the
row entropy per token is (log2 8 + 15 H_rate) / 16), with MD4; i.i.d. Zipf tokens over 16 values with Prime
l=2 (b=4)."""
import json
import math

import numpy as np
import pytest

from test_export_eval import REPO, cli, last_json

V_MARKOV, SEQ = 8, 16
P = np.full((V_MARKOV, V_MARKOV), 0.2 / 6)
for _i in range(V_MARKOV):
    P[_i, (_i + 1) % V_MARKOV], P[_i, _i] = 0.7, 0.1
H_RATE = float(-(P / V_MARKOV * np.log2(P)).sum())                    # bits per transition
H_MARKOV_ROW = (math.log2(V_MARKOV) + (SEQ - 1) * H_RATE) / SEQ      # bits per token of a row
V_IID = 16
Q = 1.0 / np.arange(1, V_IID + 1) ** 1.2
Q /= Q.sum()
H_IID = float(-(Q * np.log2(Q)).sum())


def markov_docs(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cdf = P.cumsum(1)
    x = np.zeros((n, SEQ), dtype=np.int64)
    x[:, 0] = rng.integers(0, V_MARKOV, n)
    for j in range(1, SEQ):
        x[:, j] = np.minimum((rng.random(n)[:, None] > cdf[x[:, j - 1]]).sum(1), V_MARKOV - 1)
    return x


def iid_docs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(V_IID, size=(n, SEQ), p=Q)


def train_and_export(tmp_path, docs: np.ndarray, vocab: int, kind: str, tokenizer: str, steps: int, lr: float,
                     batch: int):
    """prepare_tokens -> launcher/submit.py --local 1 (the real engine: megatron-core 2 x 64 denoiser, DeepSpeed
    ZeRO-1, the Objective) on the train rows -> launcher/export.py. Returns (data dir, export dir)."""
    import subprocess

    from data_pipeline.prepare import prepare_tokens
    from test_train_e2e import PY, env

    data = tmp_path / "data"
    prepare_tokens([list(map(int, d)) for d in docs], data, SEQ, 0.1, tokenizer=tokenizer, vocab_size=vocab,
                   eos_id=None)
    overrides = [f"data.path={data}", f"data.tokenizer={tokenizer}", f"run.output_dir={tmp_path / 'runs'}",
                 "run.name=known", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                 f"model.seq_len={SEQ}", f"model.vocab_size={vocab}", "model.make_vocab_size_divisible_by=8",
                 f"diffusion.kind={kind}", "diffusion.prime_l=2", f"optim.lr={lr}", "optim.beta2=0.99",
                 "optim.weight_decay=0.0", "optim.warmup_steps=20", f"optim.train_steps={steps}",
                 f"optim.micro_batch_size={batch}", f"optim.global_batch_size={batch}", "parallel.precision=fp32",
                 "logging.log_interval=100", f"logging.eval_interval={steps}", "logging.eval_draws=4",
                 "logging.sample_at_end=false", f"checkpoint.interval={steps}", "data.num_workers=0"]
    out = subprocess.run([PY, str(REPO / "launcher" / "submit.py"), "--local", "1", str(REPO / "configs" / "md4_tiny.yaml"),
                          *overrides], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    export = tmp_path / "export"
    cli(REPO / "launcher" / "export.py", tmp_path / "runs" / "known", "--out", export)
    return data, export


def assert_bound_near(res: dict, entropy: float):
    b, se = res["bits_per_token"], res["stderr_bits_per_token"]
    assert b >= entropy - 3 * se, (b, se, entropy)
    assert b <= 1.10 * entropy, (b, se, entropy)


def test_markov_chain_bound_and_samples_match_the_chain(tmp_path):
    data, export = train_and_export(tmp_path, markov_docs(8000, 0), V_MARKOV, "md4", "markov8",
                                    steps=500, lr=5e-3, batch=128)
    res = last_json(cli(REPO / "launcher" / "evaluate.py", export, "--data", data, "--draws", "4",
                        "--batch-size", "200").stdout)
    assert res["eval_draws"] == 4 and res["rows"] > 500
    print("markov", json.dumps(res), "entropy", H_MARKOV_ROW)
    assert_bound_near(res, H_MARKOV_ROW)

    rec = last_json(cli(REPO / "launcher" / "sample.py", export, "--num", "160", "--steps", "64",
                        "--grid", "uniform", "--seed", "1").stdout)
    x = np.array(rec["tokens"])
    counts = np.zeros((V_MARKOV, V_MARKOV))
    np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    emp = counts / counts.sum(1, keepdims=True)
    tv = 0.5 * np.abs(emp - P).sum(1)
    # sampling noise alone: ~0.06 per row at 300 transitions a row, plus the model's and the 64-step sampler's
    # errors (seen: mean 0.11 at 32 steps); independent tokens would be at ~0.57
    print("transition TV per row", tv.round(3), "calls", rec["network_calls"])
    assert tv.mean() < 0.15 and tv.max() < 0.25, tv


def test_iid_source_prime_l2_bound(tmp_path):
    data, export = train_and_export(tmp_path, iid_docs(4000, 1), V_IID, "prime", "zipf16",
                                    steps=250, lr=1e-2, batch=64)
    res = last_json(cli(REPO / "launcher" / "evaluate.py", export, "--data", data, "--draws", "4",
                        "--batch-size", "200").stdout)
    print("iid prime", json.dumps(res), "entropy", H_IID)
    assert res["diffusion"] == "prime"
    assert_bound_near(res, H_IID)
    rec = last_json(cli(REPO / "launcher" / "sample.py", export, "--num", "8", "--steps", "16").stdout)
    assert np.array(rec["tokens"]).max() < V_IID and rec["network_calls"] > 0


@pytest.mark.parametrize("kind", ["genmd4"])
def test_genmd4_export_evaluates_and_samples(tmp_path, kind):
    """GenMD4 through export -> evaluate -> sample (its learned w travels in the export); a short training."""
    data, export = train_and_export(tmp_path, markov_docs(1000, 2), V_MARKOV, kind, "markov8",
                                    steps=30, lr=5e-3, batch=32)
    res = last_json(cli(REPO / "launcher" / "evaluate.py", export, "--data", data, "--limit-rows", "50").stdout)
    assert res["diffusion"] == "genmd4" and res["bits_per_token"] > H_MARKOV_ROW - 3 * res["stderr_bits_per_token"]
    rec = last_json(cli(REPO / "launcher" / "sample.py", export, "--num", "4", "--steps", "8",
                        "--infill", "1 2 [MASK] 5", "--infill-len", "2").stdout)
    assert all(t[:2] == [1, 2] and t[4] == 5 for t in rec["tokens"])
