"""Properties of `prepare`: identical bytes on re-run (any --workers, either writer), a held-out split that
does not move when documents are appended, and errors on bad input that name the file."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import open_rows
from data_pipeline.manifest import check_manifest
from data_pipeline.prepare import main
from tests.test_data_formats import make_cifar10, make_docs, make_owt_tar, write_idx_gz


def _all_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _parquet(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), path, row_group_size=10)


def run_prepare(*args) -> int:
    return main([*map(str, args), "--quiet"])


@pytest.mark.parametrize("writer", ["mds", "webdataset"])
def test_rerun_gives_identical_bytes(tmp_path, writer):
    d = tmp_path / "in"
    d.mkdir()
    _parquet(d / "train-00000-of-00001.parquet", make_docs(50, seed=7))
    outs = []
    for k, workers in enumerate((2, 1, 2)):
        out = tmp_path / ("o" if k == 2 else f"o{k}")           # the last run overwrites the first folder
        assert run_prepare("--format", "owt-parquet", "--input", d, "--out", out, "--seq-len", 32,
                           "--writer", writer, "--workers", workers, "--shard-bytes", 1 << 12) == 0
        outs.append(_all_files(out))
        if k == 0:
            (tmp_path / "o0").rename(tmp_path / "o")
    assert outs[0] == outs[1] == outs[2]
    m = json.loads(outs[0]["manifest.json"])
    assert m["writer"] == writer and len(m["splits"]["train"]["files"]) > 2     # several shards
    check_manifest(tmp_path / "o", verify_sha256=True)


def test_held_out_split_unchanged_when_documents_appended(tmp_path):
    docs = make_docs(80, seed=8)
    (tmp_path / "a").mkdir()
    _parquet(tmp_path / "a" / "train-00000.parquet", docs[:50])
    (tmp_path / "b").mkdir()
    _parquet(tmp_path / "b" / "train-00000.parquet", docs[:50])
    _parquet(tmp_path / "b" / "train-00001.parquet", docs[50:])          # the appended shard
    for name in ("a", "b"):
        assert run_prepare("--format", "owt-parquet", "--input", tmp_path / name, "--out", tmp_path / f"o{name}",
                           "--seq-len", 32, "--val-fraction", 0.2, "--split-seed", 3) == 0
    ma = json.loads((tmp_path / "oa" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "ob" / "manifest.json").read_text())
    assert mb["splits"]["val"]["documents"] > ma["splits"]["val"]["documents"] > 0
    ra, rb = open_rows(tmp_path / "oa", "val"), open_rows(tmp_path / "ob", "val")
    assert len(rb) > len(ra) > 0
    assert all(np.array_equal(ra.row(i), rb.row(i)) for i in range(len(ra) - 1))   # old rows (the last may
    # have been a tail cut short) are a prefix of the new held-out rows


def test_webdataset_writer_manifest_and_loader(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _parquet(d / "x.parquet", make_docs(30, seed=9))
    for writer in ("mds", "webdataset"):
        assert run_prepare("--format", "owt-parquet", "--input", d, "--out", tmp_path / writer, "--seq-len", 32,
                           "--writer", writer, "--shard-bytes", 1 << 12, "--val-fraction", 0.2) == 0
    m = check_manifest(tmp_path / "webdataset", tokenizer="gpt2", seq_len=32, verify_sha256=True)
    tars = [f["path"] for f in m["splits"]["train"]["files"] if f["path"].endswith(".tar")]
    assert len(tars) > 1 and sum(s["rows"] for s in m["splits"]["train"]["shards"]) == m["splits"]["train"]["rows"]
    # a plain webdataset pipeline reads the same shards
    import webdataset as wds

    first = next(iter(wds.WebDataset(str(tmp_path / "webdataset" / tars[0]), shardshuffle=False).decode()))
    for split in ("train", "val"):
        a, b = open_rows(tmp_path / "mds", split), open_rows(tmp_path / "webdataset", split)
        assert len(a) == len(b) and all(np.array_equal(a.row(i), b.row(i)) for i in range(len(a)))
    assert np.array_equal(first["tokens.npy"], open_rows(tmp_path / "mds", "train").row(0))


# ---- bad input: every message names the file ---------------------------------------------------
def _fails_naming(capsys, path: Path, *args) -> str:
    assert run_prepare(*args) == 2
    err = capsys.readouterr().err
    assert str(path) in err, err
    return err


def test_truncated_inputs_are_named(tmp_path, capsys):
    out = tmp_path / "o"
    # .xz: an OpenWebText tarball cut in half
    make_owt_tar(tmp_path / "openwebtext.tar.xz", make_docs(20))
    blob = (tmp_path / "openwebtext.tar.xz").read_bytes()
    (tmp_path / "cut.tar.xz").write_bytes(blob[:len(blob) // 2])
    err = _fails_naming(capsys, tmp_path / "cut.tar.xz", "--format", "owt-tar", "--input", tmp_path / "cut.tar.xz",
                        "--out", out, "--seq-len", 16)
    assert "truncated or corrupt" in err
    # an inner urlsf_subset .xz cut short (read in a worker process)
    import tarfile
    with tarfile.open(tmp_path / "openwebtext.tar.xz") as tf:
        tf.extractall(tmp_path / "x", filter="data")
    sub = sorted((tmp_path / "x").rglob("urlsf_subset*.xz"))[1]
    sub.write_bytes(sub.read_bytes()[:-40])
    _fails_naming(capsys, sub, "--format", "owt-tar", "--input", tmp_path / "x", "--out", out, "--seq-len", 16,
                  "--workers", 2)
    # .gz: Fashion-MNIST idx cut short
    fm = tmp_path / "fm"
    fm.mkdir()
    write_idx_gz(fm / "train-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.uint8))
    write_idx_gz(fm / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    g = fm / "t10k-images-idx3-ubyte.gz"
    g.write_bytes(g.read_bytes()[:-12])
    _fails_naming(capsys, g, "--format", "fashion-mnist", "--input", fm, "--out", out)
    # an idx file whose gzip stream is whole but whose pixels are missing
    with gzip.open(g, "wb") as f:
        f.write((0x803).to_bytes(4, "big") + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    assert "header says" in _fails_naming(capsys, g, "--format", "fashion-mnist", "--input", fm, "--out", out)
    # pickle: a CIFAR-10 batch cut short inside an intact tar.gz
    make_cifar10(tmp_path / "c.tar.gz")
    import io
    with tarfile.open(tmp_path / "c.tar.gz") as src, tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name.endswith("data_batch_3"):
                data = data[:len(data) // 2]
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    err = _fails_naming(capsys, tmp_path / "bad.tar.gz", "--format", "cifar10", "--input", tmp_path / "bad.tar.gz",
                        "--out", out)
    assert "data_batch_3" in err
    # the tar.gz itself cut short
    blob = (tmp_path / "c.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(blob[:len(blob) * 2 // 3])
    _fails_naming(capsys, tmp_path / "cut.tar.gz", "--format", "cifar10", "--input", tmp_path / "cut.tar.gz", "--out", out)
    # npz: a downsampled ImageNet batch cut short
    im = tmp_path / "im"
    im.mkdir()
    for name in ("train_data_batch_1", "val_data"):
        np.savez(im / f"{name}.npz", data=np.zeros((4, 3 * 8 * 8), np.uint8), labels=np.ones(4))
    z = im / "train_data_batch_1.npz"
    z.write_bytes(z.read_bytes()[:-30])
    _fails_naming(capsys, z, "--format", "imagenet", "--input", im, "--out", out)
    # raw .bin with a partial id
    (tmp_path / "t.bin").write_bytes(b"\x01\x00\x02")
    _fails_naming(capsys, tmp_path / "t.bin", "--format", "tokens", "--input", tmp_path / "t.bin", "--out", out,
                  "--seq-len", 2, "--tokenizer", "gpt2", "--dtype", "uint16")
    # a parquet file cut short
    _parquet(tmp_path / "p.parquet", make_docs(5))
    pb = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(pb[:len(pb) // 2])
    _fails_naming(capsys, tmp_path / "cut.parquet", "--format", "owt-parquet", "--input", tmp_path / "cut.parquet",
                  "--out", out, "--seq-len", 16)
    # a pickle that is not CIFAR (missing key)
    assert not out.exists() or not (out / "manifest.json").exists()


def test_empty_inputs_are_named(tmp_path, capsys):
    out = tmp_path / "o"
    (tmp_path / "empty").mkdir()
    _fails_naming(capsys, tmp_path / "empty", "--format", "text", "--input", tmp_path / "empty", "--out", out, "--seq-len", 8)
    (tmp_path / "e.jsonl").write_text("\n")
    _fails_naming(capsys, tmp_path / "e.jsonl", "--format", "jsonl", "--input", tmp_path / "e.jsonl", "--out", out, "--seq-len", 8)
    _parquet(tmp_path / "e.parquet", [])
    _fails_naming(capsys, tmp_path / "e.parquet", "--format", "owt-parquet", "--input", tmp_path / "e.parquet",
                  "--out", out, "--seq-len", 8)
    (tmp_path / "text8").write_bytes(b"")
    _fails_naming(capsys, tmp_path / "text8", "--format", "text8", "--input", tmp_path / "text8", "--out", out, "--seq-len", 8)
    _fails_naming(capsys, tmp_path / "nowhere", "--format", "wikitext", "--input", tmp_path / "nowhere", "--out", out, "--seq-len", 8)


def test_broken_shards_and_mismatched_config_are_named(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _parquet(d / "x.parquet", make_docs(30, seed=10))
    out = tmp_path / "wds"
    assert run_prepare("--format", "owt-parquet", "--input", d, "--out", out, "--seq-len", 32,
                       "--writer", "webdataset", "--shard-bytes", 1 << 12, "--val-fraction", 0.2) == 0
    for kw, key in ((dict(seq_len=64), "seq_len"), (dict(tokenizer="text8"), "tokenizer")):
        with pytest.raises(ValueError, match=f"manifest.json: {key} mismatch"):
            check_manifest(out, **kw)
    shard = out / "train" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 of shard .*train/shard-000001\.tar"):
        check_manifest(out, verify_sha256=True)
    shard.unlink()
    with pytest.raises(ValueError, match=r"missing shard .*train/shard-000001\.tar"):
        check_manifest(out)
    rows = open_rows(out, "train")
    with pytest.raises(ValueError, match=r"shard-000001\.tar"):
        rows.row(int(rows.offsets[1]))
