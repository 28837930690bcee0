"""Data pipeline benchmark: preprocessing vs raw tiktoken, loader vs a raw numpy read, side by side.

Preprocessing: `prepare_text` (read tasks -> GPT-2 BPE in worker processes -> hashed split -> packing ->
MDS shards + sha256 manifest) against tiktoken's encode_ordinary_batch on the same documents, per worker
and for 1..N workers (N = the core count; tiktoken gets the same number of threads).
Loading: TrainLoader tokens/s in one process (num_workers=0, and with DataLoader workers) from local MDS
and webdataset shards, against np.fromfile of the same shard files (warm page cache for both).

Run: .venv/bin/python tests/benchmarks/bench_data.py [--source sotu|linux-doc|PATH] [--max-workers N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
from data_pipeline.loader import build_train_loader  # noqa: E402
from data_pipeline.prepare import chunk_documents, prepare_text  # noqa: E402
from data_pipeline.sources import DEFAULT_CACHE_DIR, load_source  # noqa: E402
from data_pipeline.tokenizer import gpt2_encoding  # noqa: E402


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="sotu")
    ap.add_argument("--cache-dir", default=os.environ.get("MDIFF_DATA_CACHE", DEFAULT_CACHE_DIR))
    ap.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loader-steps", type=int, default=400, help="micro-batches per loader timing")
    a = ap.parse_args()

    docs = load_source(a.source, a.cache_dir)
    chars = sum(map(len, docs))
    enc = gpt2_encoding()
    n_tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=a.max_workers)))
    print(f"corpus {a.source}: {len(docs)} documents, {chars / 1e6:.2f} M chars, {n_tokens / 1e6:.2f} M GPT-2 tokens; "
          f"{os.cpu_count()} cores")
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        print("\npreprocessing (tokens/s; prepare = read + tokenize + split + pack + MDS + sha256 manifest)")
        print(f"{'workers':>7} {'tiktoken raw':>14} {'prepare':>12} {'ratio':>7} {'per worker':>12} {'scaling':>8}")
        base = None
        for w in range(1, a.max_workers + 1):
            raw = best_of(lambda: enc.encode_ordinary_batch(docs, num_threads=w), a.repeat)
            prep = best_of(lambda: prepare_text(chunk_documents(docs), tmp / "mds", a.seq_len, 0.05, 0, w), a.repeat)
            raw_tps, prep_tps = n_tokens / raw, n_tokens / prep
            base = base or prep_tps
            print(f"{w:>7} {raw_tps:>14,.0f} {prep_tps:>12,.0f} {prep_tps / raw_tps:>7.2f} {prep_tps / w:>12,.0f} "
                  f"{prep_tps / base:>7.2f}x")
        prepare_text(chunk_documents(docs), tmp / "wds", a.seq_len, 0.05, 0, a.max_workers, writer="webdataset")

        print(f"\nloading the train split (tokens/s, one process, micro-batch {a.batch} x {a.seq_len})")
        print(f"{'shards':>10} {'reader':>22} {'tokens/s':>14} {'numpy fromfile':>15} {'ratio':>7}")
        for name in ("mds", "wds"):
            d = tmp / name
            files = sorted(p for p in (d / "train").iterdir() if p.suffix in (".mds", ".tar"))
            raw_bytes = sum(p.stat().st_size for p in files)
            itemsize = 2
            raw_t = best_of(lambda: [np.fromfile(p, dtype=np.uint16) for p in files], a.repeat + 1)
            raw_tps = raw_bytes / itemsize / raw_t
            for workers in (0, 2):
                def run():
                    l = build_train_loader(d, "train", a.batch, 0, 1, seed=0, num_workers=workers)
                    for _ in range(a.loader_steps):          # several epochs; worker start-up included
                        next(l)
                    l.close()
                toks = a.loader_steps * a.batch * a.seq_len
                t = best_of(run, a.repeat)
                label = "TrainLoader" + (f" ({workers} workers)" if workers else " (in process)")
                print(f"{name:>10} {label:>22} {toks / t:>14,.0f} {raw_tps:>15,.0f} {toks / t / raw_tps:>7.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
