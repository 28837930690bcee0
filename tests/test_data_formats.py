"""Every reader on a small file built here in the dataset's real distribution format, through the
`python -m data_pipeline.prepare --format ...` command line, read back with the loader's row readers."""
from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import numpy as np

from data_pipeline import readers
from data_pipeline.loader import open_rows
from data_pipeline.manifest import check_manifest
from data_pipeline.prepare import is_val, main
from data_pipeline.tokenizer import EOS_ID, Text8Encoding, gpt2_encoding

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "café naïve 1790s — “quoted” ✓ Zürich").split()


def make_docs(n: int, seed: int = 0, words: tuple[int, int] = (20, 200)) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
        docs.append(f"Document {i}.\n{body}.\n\n{rng.choice(WORDS).title()} ends here.\n")
    return docs


def prep(*args: str) -> dict:
    assert main([*args, "--quiet"]) == 0
    out = Path(args[args.index("--out") + 1])
    return check_manifest(out, verify_sha256=True)


def stream(out: Path, split: str) -> np.ndarray:
    rows = open_rows(out, split)
    return np.concatenate([rows.row(i) for i in range(len(rows))]).astype(np.int64)


def assert_gpt2_roundtrip(out: Path, docs: list[str], split: str) -> None:
    """The split's rows are the documents' GPT-2 ids, each followed by EOS, in order (tail dropped),
    and every complete document in them decodes back to its text."""
    enc = gpt2_encoding()
    want = []
    for d in docs:
        want += enc.encode_ordinary(d) + [EOS_ID]
    got = stream(out, split)
    assert len(got) > 0 and got.tolist() == want[:len(got)]
    pieces = enc.decode(got.tolist()).split("<|endoftext|>")[:-1]     # complete documents
    assert pieces and pieces == docs[:len(pieces)]


def assert_hash_split(out: Path, docs: list[str], val_fraction: float = 0.2, seed: int = 0) -> None:
    for split, want_val in (("train", False), ("val", True)):
        assert_gpt2_roundtrip(out, [d for d in docs if is_val(d, seed, val_fraction) == want_val], split)


# ---- OpenWebText ---------------------------------------------------------------------------------
def test_owt_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(60)
    d = tmp_path / "plain_text"
    d.mkdir()
    for k, part in enumerate((docs[:35], docs[35:])):   # HF layout: train-0000k-of-00002.parquet, row groups
        pq.write_table(pa.table({"text": part}), d / f"train-{k:05d}-of-00002.parquet", row_group_size=8)
    out = tmp_path / "o"
    m = prep("--format", "owt-parquet", "--input", str(d), "--out", str(out), "--seq-len", "64",
             "--val-fraction", "0.2", "--workers", "2")
    assert m["documents"] == 60 and m["tokenizer"] == "gpt2"
    assert_hash_split(out, docs)


def _xz_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def make_owt_tar(path: Path, docs: list[str], per_subset: int = 7) -> None:
    """openwebtext.tar.xz: openwebtext/urlsf_subsetNN-K_data.xz, each an .xz tar of <hash>-<id>.txt."""
    subsets = {}
    for k in range(0, len(docs), per_subset):
        inner = {f"{k + j:07d}-{k}.txt": d.encode() for j, d in enumerate(docs[k:k + per_subset])}
        subsets[f"openwebtext/urlsf_subset00-{k // per_subset + 1}_data.xz"] = _xz_tar(inner)
    path.write_bytes(_xz_tar(subsets))


def test_owt_tar_roundtrip(tmp_path):
    docs = make_docs(40, seed=1)
    make_owt_tar(tmp_path / "openwebtext.tar.xz", docs)
    out = tmp_path / "o"
    prep("--format", "owt-tar", "--input", str(tmp_path / "openwebtext.tar.xz"), "--out", str(out),
         "--seq-len", "64", "--val-fraction", "0.2", "--workers", "2")
    assert_hash_split(out, docs)
    # the same documents from a folder of extracted urlsf_subset*.xz files give the same bytes
    with tarfile.open(tmp_path / "openwebtext.tar.xz") as tf:
        tf.extractall(tmp_path / "x", filter="data")
    out2 = tmp_path / "o2"
    prep("--format", "owt-tar", "--input", str(tmp_path / "x"), "--out", str(out2), "--seq-len", "64",
         "--val-fraction", "0.2", "--workers", "1")
    assert (out / "train" / "shard.00000.mds").read_bytes() == (out2 / "train" / "shard.00000.mds").read_bytes()


# ---- text / jsonl ------------------------------------------------------------------------------
def test_text_and_jsonl_folders(tmp_path):
    docs = make_docs(30, seed=2)
    (tmp_path / "t" / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (tmp_path / "t" / ("sub" if i % 2 else "") / f"{i:03d}.txt").write_text(d)
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "url": "x"}) + "\n")
    prep("--format", "jsonl", "--input", str(tmp_path / "j"), "--out", str(tmp_path / "oj"), "--seq-len", "32",
         "--val-fraction", "0.2")
    assert_hash_split(tmp_path / "oj", docs)
    prep("--format", "text", "--input", str(tmp_path / "t"), "--out", str(tmp_path / "ot"), "--seq-len", "32",
         "--val-fraction", "0.2")
    order = sorted(range(30), key=lambda i: (f"sub/{i:03d}.txt" if i % 2 else f"{i:03d}.txt"))
    assert_hash_split(tmp_path / "ot", [docs[i] for i in order])


# ---- text8 -------------------------------------------------------------------------------------
def test_text8_standard_split_and_decode(tmp_path):
    rng = random.Random(3)
    words = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "first", "used", "against", "early"]
    text = " " + " ".join(rng.choice(words) for _ in range(4000))
    n = len(text)
    (tmp_path / "text8").write_text(text)             # the real file: no newline, starts with a space
    out = tmp_path / "o"
    m = prep("--format", "text8", "--input", str(tmp_path / "text8"), "--out", str(out), "--seq-len", "256")
    assert (m["tokenizer"], m["vocab_size"], m["eos_id"], m["dtype"]) == ("text8", 27, None, "uint8")
    b1, b2 = round(0.9 * n), round(0.9 * n) + round(0.05 * n)
    enc = Text8Encoding()
    for split, (lo, hi) in {"train": (0, b1), "val": (b1, b2), "test": (b2, n)}.items():
        got = stream(out, split)
        assert len(got) == (hi - lo) // 256 * 256
        assert enc.decode(got) == text[lo:lo + len(got)]
    # the proportional boundaries give exactly 90M / 5M / 5M characters on the real 100M-character file
    big = tmp_path / "text8_100M"
    with open(big, "wb") as f:
        f.truncate(100_000_000)                      # sparse: only the size is used here
    tasks = readers.text8_split_tasks(big)
    spans = {s: (ts[0].args[1], ts[-1].args[2]) for s, ts in tasks.items()}
    assert spans == {"train": (0, 90_000_000), "val": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
    (tmp_path / "bad").write_text(" abc Def")
    assert main(["--format", "text8", "--input", str(tmp_path / "bad"), "--out", str(tmp_path / "ob"),
                 "--seq-len", "2", "--quiet"]) == 2


# ---- zero-shot sets ----------------------------------------------------------------------------
def test_zero_shot_sets_write_test_split(tmp_path):
    enc = gpt2_encoding()
    # LAMBADA
    passages = [d.replace("quoted", "“quoted”") for d in make_docs(12, seed=4)]
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    prep("--format", "lambada", "--input", str(tmp_path / "lambada_test.jsonl"), "--out", str(tmp_path / "ol"),
         "--seq-len", "32")
    assert_gpt2_roundtrip(tmp_path / "ol", [readers.lambada_detokenize(p) for p in passages], "test")
    # WikiText raw tokens: two articles, number separators and spaced punctuation
    wiki = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a 1 @,@ 000 @-@ "
            "year game ( 2011 ) . It 's \" good \" . \n \n = = Gameplay = = \n \n Speed was 3 @.@ 5 m . \n"
            " \n = Tower Building = \n \n The building , built in 1895 , stands . \n \n") * 6
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.tokens").write_text(wiki)
    m = prep("--format", "wikitext", "--input", str(tmp_path / "wikitext-2"), "--out", str(tmp_path / "ow"),
             "--seq-len", "16")
    assert list(m["splits"]) == ["test"] and m["splits"]["test"]["documents"] == 12
    arts = readers._wikitext_articles(str(tmp_path / "wikitext-2" / "wiki.test.tokens"))
    assert arts[0].startswith("= Valkyria Chronicles III =\n\nSenjō no Valkyria 3: Unrecorded")
    assert "Unrecorded Chronicles is a 1,000-year game (2011). It's \"good\"." in arts[0]
    assert "== Gameplay ==" in arts[0] and "Speed was 3.5 m." in arts[0]
    assert arts[1].startswith("= Tower Building =") and "The building, built in 1895, stands." in arts[1]
    assert_gpt2_roundtrip(tmp_path / "ow", arts, "test")
    from data_pipeline.loader import build_eval_loader          # what `evaluate --split test` reads
    assert sum(len(b) for b in build_eval_loader(tmp_path / "ow", "test", 4, 0, 1)) == m["splits"]["test"]["rows"]
    # PTB
    ptb = " no it was n't black monday \n the $ N billion fund 's <unk> rose N N \n" * 20
    (tmp_path / "ptb.test.txt").write_text(ptb)
    prep("--format", "ptb", "--input", str(tmp_path / "ptb.test.txt"), "--out", str(tmp_path / "op"), "--seq-len", "16")
    lines = readers._line_docs(str(tmp_path / "ptb.test.txt"), "ptb")
    # SEDD/MDLM's ptb detokenizer, quirks included (' N ' -> '1 ', '$ 1' -> '$1'; <unk> kept)
    assert lines[:2] == ["no it wasn't black monday", "the $1 billion fund's <unk> rose1 N"]
    assert_gpt2_roundtrip(tmp_path / "op", lines, "test")
    # One Billion Word held-out
    lm1b = 'He said , " it is ( not ) good . " See http : / / x.com / a ?\nShe paid $ 5 , ok !\n' * 15
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "news.en.heldout-00000-of-00050").write_text(lm1b)
    (tmp_path / "heldout" / "news.en.heldout-00001-of-00050").write_text("not the test shard\n")
    m = prep("--format", "lm1b", "--input", str(tmp_path / "heldout"), "--out", str(tmp_path / "ob"), "--seq-len", "16")
    lines = readers._line_docs(str(tmp_path / "heldout" / "news.en.heldout-00000-of-00050"), "lm1b")
    assert lines[:2] == ['He said, "it is (not) good." See http://x.com/a?', "She paid $5, ok!"]
    assert m["splits"]["test"]["documents"] == 30
    assert_gpt2_roundtrip(tmp_path / "ob", lines, "test")
    assert enc.decode(stream(tmp_path / "ob", "test")[:5].tolist()).startswith("He said,")


# ---- images ------------------------------------------------------------------------------------
def make_cifar10(path: Path, n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-10-python.tar.gz with cifar-10-batches-py/data_batch_1..5, test_batch (pickled dicts,
    data uint8 [n, 3072] as R, G, B planes of 32x32)."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as tf:
        for name in readers.CIFAR10_TRAIN + [readers.CIFAR10_TEST]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batches[name] = data
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": list(range(n)), b"data": data,
                                 b"filenames": [b"x.png"] * n}, protocol=2)
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            ti.size = len(blob)
            tf.addfile(ti, io.BytesIO(blob))
    return batches


def test_cifar10_hwc_rows(tmp_path):
    batches = make_cifar10(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "o"
    m = prep("--format", "cifar10", "--input", str(tmp_path / "cifar-10-python.tar.gz"), "--out", str(out))
    assert (m["tokenizer"], m["vocab_size"], m["seq_len"], m["image_shape"], m["eos_id"]) == ("pixels", 256, 3072, [32, 32, 3], None)
    train = np.concatenate([batches[n] for n in readers.CIFAR10_TRAIN])
    for split, data in (("train", train), ("val", batches["test_batch"])):
        rows = open_rows(out, split)
        assert len(rows) == len(data)
        for i in (0, len(data) - 1):
            img = data[i].reshape(3, 32, 32).transpose(1, 2, 0)          # CHW planes -> HWC
            assert np.array_equal(rows.row(i).reshape(32, 32, 3), img)
            assert rows.row(i)[:3].tolist() == [data[i][0], data[i][1024], data[i][2048]]   # pixel (0,0) RGB


def test_imagenet_npz_batches(tmp_path):
    rng = np.random.default_rng(1)
    S = 8
    d = tmp_path / "Imagenet8"
    d.mkdir()
    parts = {}
    for name in ("train_data_batch_1", "train_data_batch_2", "train_data_batch_10", "val_data"):
        parts[name] = rng.integers(0, 256, (5, 3 * S * S), dtype=np.uint8)
        np.savez(d / f"{name}.npz", data=parts[name], labels=np.arange(1, 6), mean=np.zeros(3 * S * S))
    out = tmp_path / "o"
    m = prep("--format", "imagenet", "--input", str(d), "--out", str(out), "--writer", "webdataset")
    assert m["image_shape"] == [S, S, 3] and m["writer"] == "webdataset"
    want = np.concatenate([parts[n] for n in ("train_data_batch_1", "train_data_batch_2", "train_data_batch_10")])
    rows = open_rows(out, "train")
    assert len(rows) == 15
    assert np.array_equal(rows.row(11).reshape(S, S, 3), want[11].reshape(3, S, S).transpose(1, 2, 0))
    assert np.array_equal(open_rows(out, "val").row(4).reshape(S, S, 3), parts["val_data"][4].reshape(3, S, S).transpose(1, 2, 0))


def write_idx_gz(path: Path, imgs: np.ndarray) -> None:
    n, r, c = imgs.shape
    with gzip.open(path, "wb") as f:
        f.write((0x803).to_bytes(4, "big") + n.to_bytes(4, "big") + r.to_bytes(4, "big") + c.to_bytes(4, "big"))
        f.write(imgs.tobytes())


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng(2)
    tr, te = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", tr)
    write_idx_gz(tmp_path / "t10k-images-idx3-ubyte.gz", te)
    out = tmp_path / "o"
    m = prep("--format", "fashion-mnist", "--input", str(tmp_path), "--out", str(out), "--seq-len", "784")
    assert m["image_shape"] == [28, 28, 1] and m["splits"]["train"]["rows"] == 9
    assert np.array_equal(open_rows(out, "val").row(3), te[3].reshape(-1))


# ---- pre-tokenized -------------------------------------------------------------------------------
def test_pretokenized_bin_and_npy(tmp_path):
    rng = np.random.default_rng(5)
    V, E = 70000, 69999                                      # uint32 ids
    docs = [rng.integers(0, E, rng.integers(5, 60)) for _ in range(50)]
    flat = np.concatenate([np.append(d, E) for d in docs]).astype(np.uint32)
    flat[:len(docs[0]) + 1].tofile(tmp_path / "a.bin")
    np.save(tmp_path / "b.npy", flat[len(docs[0]) + 1:])
    out = tmp_path / "o"
    m = prep("--format", "tokens", "--input", str(tmp_path), "--out", str(out), "--seq-len", "16",
             "--tokenizer", "mytok", "--vocab-size", str(V), "--eos-id", str(E), "--dtype", "uint32",
             "--val-fraction", "0.2")
    assert (m["tokenizer"], m["vocab_size"], m["eos_id"], m["dtype"], m["documents"]) == ("mytok", V, E, "uint32", 50)
    from data_pipeline.prepare import token_key
    for split, v in (("train", False), ("val", True)):
        want = np.concatenate([np.append(d, E) for d in docs if is_val(token_key(d), 0, 0.2) == v])
        got = stream(out, split)
        assert np.array_equal(got, want[:len(got)])
    assert main(["--format", "tokens", "--input", str(tmp_path), "--out", str(tmp_path / "x"), "--seq-len", "16",
                 "--tokenizer", "mytok", "--quiet"]) == 2                     # no --vocab-size


def test_real_fashion_mnist(tmp_path):
    """The real 70k images, fetched from Debian's dataset-fashion-mnist (apt-get download, no root)."""
    from data_pipeline.sources import fetch_fashion_mnist

    src = Path(os.environ.get("MDIFF_FASHION_MNIST") or fetch_fashion_mnist(REPO / "data" / "cache"))
    m = prep("--format", "fashion-mnist", "--input", str(src), "--out", str(tmp_path / "o"))
    assert (m["splits"]["train"]["rows"], m["splits"]["val"]["rows"], m["seq_len"]) == (60000, 10000, 784)
