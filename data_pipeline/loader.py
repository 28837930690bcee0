"""Training and evaluation loaders over prepared MDS or webdataset shards, sharded over DATA-PARALLEL ranks only.

Rows are read with mosaicml-streaming's MDS shard readers (streaming.base.format), the same code a
StreamingDataset uses underneath, or from the webdataset tars prepare writes (indexed once with tarfile,
then read by offset). The sample order is computed here, not by StreamingDataset / WebDataset, because
the requirements are (a) exact mid-epoch resume with any number of DataLoader workers, (b) identical
batches on tensor/pipeline peers whatever the process layout, (c) a global order that does not depend
on the data-parallel size, and (d) no shared-memory coordination between processes.

Order: the global sample stream is perm_0 ++ perm_1 ++ ... with perm_e = numpy PCG64([seed, e])
.permutation(num_rows) (arange if not shuffle): every epoch visits every row exactly once and nothing is
dropped. A loader's position is samples_seen, a count of global samples. The micro-batch it returns next
takes stream[samples_seen + r*B : samples_seen + (r+1)*B] on DP rank r of D (B = micro_batch_size), and
every step advances samples_seen by G = B*D on every rank. The stream depends only on (seed, shuffle,
num_rows): tensor/pipeline peers, which pass the same dp_rank, get identical batches; a checkpoint taken
with one (B, D) can be resumed with another and the global stream continues exactly where it stopped.

Remote data: `resolve_data_dir` copies a prepared folder from a remote location (s3://, gs://, oci://,
azure://, hf://, sftp://, dbfs:, a plain path through mosaicml-streaming's downloaders; http(s)://,
file:// and other URLs through webdataset's gopen) into a local cache, verifying every file's sha256
against the manifest, and returns the local folder.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipeline.manifest import MANIFEST_NAME, UNIGRAM_NAME, file_sha256, load_manifest

STATE_VERSION = 2
DEFAULT_DATA_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "mdiff", "data")


# ---- remote data ---------------------------------------------------------------------------------
def is_remote(path: str | os.PathLike) -> bool:
    s = str(path)
    return "://" in s or s.startswith("dbfs:")


def _fetch(remote: str, local: Path) -> None:
    """Copy one remote file to `local` (atomically) with the libraries' own remote support."""
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS, CloudDownloader

    tmp = local.with_name(f"{local.name}.part{os.getpid()}")
    tmp.unlink(missing_ok=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    scheme = urllib.parse.urlparse(remote).scheme
    if scheme == "file" or scheme in DOWNLOADER_MAPPINGS and scheme not in ("http", "https"):
        src = remote[len("file://"):] if scheme == "file" else remote
        CloudDownloader.direct_download(src, str(tmp))
    else:
        import shutil

        from webdataset.cache import download

        if scheme in ("http", "https") and shutil.which("curl") is None:
            raise RuntimeError(f"{remote}: webdataset fetches http(s) URLs with curl, which is not installed "
                               "(apt-get install curl)")
        download(remote, str(tmp))
    tmp.replace(local)


def resolve_data_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     splits: tuple[str, ...] | None = None) -> Path:
    """A local prepared folder as is; a remote one copied into cache_dir/<hash of the URL>/ (the
    manifest, then each listed file of `splits` (default: all) whose local copy is missing or of
    another size, each checked against the manifest's sha256). Returns the local folder."""
    if not is_remote(path) and Path(path).is_dir():
        return Path(path)
    remote = str(path).rstrip("/")
    cache = Path(cache_dir or os.environ.get("MDIFF_DATA_CACHE_DIR") or DEFAULT_DATA_CACHE)
    local = cache / hashlib.sha256(remote.encode()).hexdigest()[:16]
    try:
        _fetch(f"{remote}/{MANIFEST_NAME}", local / MANIFEST_NAME)
    except Exception as e:
        raise ValueError(f"{remote}/{MANIFEST_NAME}: cannot fetch the manifest ({type(e).__name__}: {e})") from None
    m = load_manifest(local)
    for split in (splits or tuple(m["splits"])):
        if split not in m["splits"]:
            raise ValueError(f"{remote}/{MANIFEST_NAME}: splits.{split} missing (has {sorted(m['splits'])})")
        for f in m["splits"][split]["files"]:
            dest = local / f["path"]
            if dest.is_file() and dest.stat().st_size == f["bytes"]:
                continue
            try:
                _fetch(f"{remote}/{f['path']}", dest)
            except Exception as e:
                raise ValueError(f"{remote}/{f['path']}: cannot fetch ({type(e).__name__}: {e})") from None
            digest = file_sha256(dest)
            if digest != f["sha256"]:
                dest.unlink()
                raise ValueError(f"{remote}/{f['path']}: sha256 {digest} differs from the manifest's "
                                 f"{f['sha256']} (corrupt)")
    return local


# ---- rows ----------------------------------------------------------------------------------------
def open_rows(data_dir: str | Path, split: str):
    """Random access to the rows of one split, whichever writer produced them. Every row read is checked
    to hold only token ids < the manifest's vocab_size (the mask id and padding ids included)."""
    m = load_manifest(data_dir)
    rows = WDSRows(data_dir, split, m) if m.get("writer", "mds") == "webdataset" else MDSRows(data_dir, split)
    rows.vocab_size = int(m["vocab_size"])
    return rows


class _RowsBase:
    num_rows: int
    seq_len: int | None
    vocab_size: int | None = None    # ids >= this are refused (open_rows sets it from the manifest)

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """The shard file and position of global row i (for error messages)."""
        raise NotImplementedError

    def _check(self, idxs, rows: np.ndarray) -> None:
        """Refuse a batch holding an id outside [0, vocab_size), naming the shard and row: such an id would
        be the mask id, vocabulary padding, or crash one rank's embedding lookup with an IndexError."""
        V = self.vocab_size
        if V is None or rows.size == 0 or (int(rows.max()) < V and int(rows.min()) >= 0):
            return
        for i, r in zip(idxs, rows.reshape(len(idxs), -1)):
            bad = np.flatnonzero((r >= V) | (r < 0))
            if len(bad):
                raise ValueError(f"{self.where(int(i))}: token id {int(r[bad[0]])} at position {int(bad[0])} "
                                 f"({len(bad)} such id(s) in this row) is outside the vocabulary [0, {V}) of "
                                 f"{self.data_dir / MANIFEST_NAME} (id {V} is the mask id): the shard is corrupt "
                                 "or was written for another vocabulary; re-run data_pipeline.prepare")

    def __getitem__(self, i: int) -> torch.Tensor:
        row = self.row(int(i))
        self._check([i], row[None])
        return torch.from_numpy(row.astype(np.int64))

    def __getitems__(self, idxs) -> torch.Tensor:
        if len(idxs) == 0:
            return torch.empty((0, self.seq_len or 0), dtype=torch.long)
        rows = np.stack([self.row(int(i)) for i in idxs])
        self._check(idxs, rows)
        return torch.from_numpy(rows.astype(np.int64))


class WDSRows(_RowsBase):
    """Rows of a split written as webdataset tars (samples NNNNNNNNNN.tokens.npy). Each shard is indexed
    with tarfile on first use (member offsets), then rows are read with os.pread (safe after fork)."""

    def __init__(self, data_dir: str | Path, split: str, manifest: dict | None = None):
        self.data_dir, self.split = Path(data_dir), split
        m = manifest or load_manifest(data_dir)
        if split not in m["splits"]:
            raise ValueError(f"{self.data_dir / MANIFEST_NAME}: split {split!r} not prepared "
                             f"(has {sorted(m['splits'])})")
        self.shards = m["splits"][split]["shards"]
        self.seq_len = int(m["seq_len"])
        sizes = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_rows = int(self.offsets[-1])
        if self.num_rows == 0:
            raise ValueError(f"{self.data_dir / split}: split {split!r} has no rows")
        self._index: dict[int, np.ndarray] = {}
        self._fds: dict[int, int] = {}

    def _shard(self, k: int) -> tuple[int, np.ndarray]:
        if k not in self._index:
            path = self.data_dir / self.shards[k]["path"]
            try:
                with tarfile.open(path, "r:") as tf:
                    idx = np.array([(m.offset_data, m.size) for m in tf if m.isfile()
                                    and m.name.endswith(".tokens.npy")], dtype=np.int64).reshape(-1, 2)
            except (OSError, tarfile.TarError) as e:
                raise ValueError(f"{path}: unreadable webdataset shard ({e})") from None
            if len(idx) != self.shards[k]["rows"]:
                raise ValueError(f"{path}: {len(idx)} samples, manifest says {self.shards[k]['rows']}")
            self._index[k] = idx
            self._fds[k] = os.open(path, os.O_RDONLY)
        return self._fds[k], self._index[k]

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_rows:
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        fd, idx = self._shard(k)
        off, size = idx[i - int(self.offsets[k])]
        return np.lib.format.read_array(io.BytesIO(os.pread(fd, int(size), int(off))), allow_pickle=False)

    def where(self, i: int) -> str:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return (f"{self.data_dir / self.shards[k]['path']}: sample {i - int(self.offsets[k])} "
                f"(row {i} of split {self.split!r})")

    def __getstate__(self):
        return {**self.__dict__, "_index": {}, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class MDSRows(_RowsBase):
    """Random access to the fixed-length token rows of one split (DIR/<split>/index.json + shards)."""

    def __init__(self, data_dir: str | Path, split: str):
        from streaming.base.format import reader_from_json

        self.data_dir, self.split = Path(data_dir), split
        index_path = self.data_dir / split / "index.json"
        if not index_path.is_file():
            raise ValueError(f"{index_path}: missing; split {split!r} not prepared in {data_dir}")
        index = json.loads(index_path.read_text())
        self.readers = []
        for obj in index["shards"]:
            r = reader_from_json(str(self.data_dir), split, obj)
            r.validate(allow_unsafe_types=False)
            self.readers.append(r)
        sizes = np.array([r.samples for r in self.readers], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_rows = int(self.offsets[-1])
        enc = index["shards"][0]["column_encodings"][0] if index["shards"] else ""
        self.seq_len = int(enc.split(":")[-1]) if enc.startswith("ndarray:") else None
        if self.num_rows == 0:
            raise ValueError(f"{index_path}: split {split!r} has no rows")

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_rows:
            raise IndexError(i)
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.readers[shard].get_item(i - int(self.offsets[shard]))["tokens"]

    def where(self, i: int) -> str:
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        name = self.readers[shard].raw_data.basename
        return (f"{self.data_dir / self.split / name}: sample {i - int(self.offsets[shard])} "
                f"(row {i} of split {self.split!r})")


def _identity(batch):
    return batch


class _BatchIndexSampler:
    """Infinite batch sampler from a global sample position; runs in the main process."""

    def __init__(self, loader: "TrainLoader", samples_seen: int):
        self.loader, self.samples_seen = loader, samples_seen

    def __iter__(self) -> Iterator[list[int]]:
        g = self.samples_seen
        while True:
            yield self.loader.batch_indices(g).tolist()
            g += self.loader.global_batch_size


class TrainLoader:
    """Endless iterator of LongTensor [micro_batch_size, seq_len] with exact state_dict/resume.

    The position samples_seen counts global samples of the batches this loader has *returned*
    (prefetched ones in DataLoader workers do not count); it is the same on every DP rank at the same
    training step, so one rank's state_dict can be loaded by all ranks, of this layout or another.
    """

    def __init__(self, rows, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 num_workers: int = 1, shuffle: bool = True):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel rank/size: dp_rank={dp_rank}, dp_size={dp_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.rows, self.micro_batch_size = rows, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers, self.shuffle = num_workers, shuffle
        self.num_rows = rows.num_rows
        self.global_batch_size = micro_batch_size * dp_size
        self.steps_per_epoch = self.num_rows // self.global_batch_size   # whole global batches per epoch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{rows.data_dir / rows.split}: {self.num_rows} rows is fewer than one global "
                             f"batch ({micro_batch_size} x {dp_size} data-parallel ranks)")
        self.samples_seen = 0
        self._perms: dict[int, np.ndarray] = {}
        self._dl: DataLoader | None = None
        self._it = None

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.num_rows

    # -- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_rows)
            else:
                perm = np.arange(self.num_rows)
            self._perms[epoch] = perm
        return self._perms[epoch]

    def sample_ids(self, start: int, stop: int) -> np.ndarray:
        """Row ids of global stream positions [start, stop)."""
        g = np.arange(start, stop, dtype=np.int64)
        out = np.empty(len(g), dtype=np.int64)
        ep = g // self.num_rows
        for e in np.unique(ep):
            sel = ep == e
            out[sel] = self.epoch_order(int(e))[g[sel] % self.num_rows]
        return out

    def batch_indices(self, samples_seen: int) -> np.ndarray:
        """Row ids of this rank's micro-batch for the global batch starting at stream position samples_seen."""
        start = samples_seen + self.dp_rank * self.micro_batch_size
        return self.sample_ids(start, start + self.micro_batch_size)

    # -- iteration -----------------------------------------------------------------------------
    def _start(self) -> None:
        sampler = _BatchIndexSampler(self, self.samples_seen)
        kw: dict[str, Any] = {}
        if self.num_workers > 0:
            # fork: the readers are plain objects; nothing here holds locks or shared memory.
            kw = dict(multiprocessing_context="fork", prefetch_factor=2)
        self._dl = DataLoader(self.rows, batch_sampler=sampler, num_workers=self.num_workers,
                              collate_fn=_identity, **kw)
        self._it = iter(self._dl)

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.samples_seen += self.global_batch_size
        return batch

    def close(self) -> None:
        """Stop worker processes (the next batch restarts them from the current position)."""
        it, self._it, self._dl = self._it, None, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain Python types only (JSON-safe)."""
        return {"version": STATE_VERSION, "samples_seen": int(self.samples_seen), "epoch": int(self.epoch),
                "seed": int(self.seed), "shuffle": bool(self.shuffle), "num_rows": int(self.num_rows),
                "dp_size": int(self.dp_size), "micro_batch_size": int(self.micro_batch_size)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue exactly where the saved loader was. seed, shuffle and num_rows define the global
        stream and must match; dp_size and micro_batch_size may differ (the stream continues)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')!r} is not {STATE_VERSION} "
                             "(a checkpoint from the older epoch/step loader cannot be resumed exactly)")
        for key in ("seed", "shuffle", "num_rows"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"data loader state mismatch: {key}={sd[key]!r} in the checkpoint, "
                                 f"{getattr(self, key)!r} now; exact resume needs the same value")
        if not isinstance(sd["samples_seen"], int) or sd["samples_seen"] < 0:
            raise ValueError(f"data loader state out of range: {sd}")
        self.close()
        self.samples_seen = int(sd["samples_seen"])


def build_train_loader(data_dir: str | Path, split: str, micro_batch_size: int, dp_rank: int,
                       dp_size: int, seed: int, num_workers: int = 1, shuffle: bool = True) -> TrainLoader:
    """Endless loader of LongTensor [micro_batch_size, seq_len] for DP rank dp_rank of dp_size.

    Tensor/pipeline-parallel peers must pass the same dp_rank; they then get identical batches.
    Does not check the manifest: call data_pipeline.manifest.check_manifest first. A remote data_dir
    is copied into the local cache first (`resolve_data_dir`).
    """
    return TrainLoader(open_rows(resolve_data_dir(data_dir), split), micro_batch_size, dp_rank, dp_size, seed,
                       num_workers=num_workers, shuffle=shuffle)


class EvalLoader:
    """One deterministic pass over a split (or its first `limit_rows` rows: the same rows at any DP size);
    each row goes to exactly one DP rank, exactly once.

    Rank r gets the r-th contiguous chunk of np.array_split(range(num_rows), dp_size) (chunk sizes
    differ by at most one), in order, in batches of micro_batch_size. Every rank yields the same
    number of batches (num_batches), so collective calls stay in step; the last batch may be short,
    and on a rank with one row fewer it can be empty (shape [0, seq_len]): weight losses by rows or
    tokens, and still join the collectives for an empty batch.
    """

    def __init__(self, rows, micro_batch_size: int, dp_rank: int, dp_size: int, limit_rows: int | None = None):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel rank/size: dp_rank={dp_rank}, dp_size={dp_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.rows, self.micro_batch_size = rows, micro_batch_size
        self.num_rows = rows.num_rows if not limit_rows else min(limit_rows, rows.num_rows)
        chunks = np.array_split(np.arange(self.num_rows), dp_size)
        self.indices = chunks[dp_rank]
        self.local_num_rows = len(self.indices)
        self.num_batches = math.ceil(max(len(c) for c in chunks) / micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        B = self.micro_batch_size
        for b in range(self.num_batches):
            yield self.rows.__getitems__(self.indices[b * B:(b + 1) * B])


def build_eval_loader(data_dir: str | Path, split: str, micro_batch_size: int, dp_rank: int,
                      dp_size: int, limit_rows: int | None = None) -> EvalLoader:
    return EvalLoader(open_rows(resolve_data_dir(data_dir), split), micro_batch_size, dp_rank, dp_size, limit_rows)


def unigram_perplexity(data_dir: str | Path, split: str = "val") -> float:
    """Perplexity on `split` rows of an add-one-smoothed unigram model fit on train token counts."""
    m = load_manifest(data_dir)
    V = int(m["vocab_size"])
    counts = np.load(Path(data_dir) / "train" / UNIGRAM_NAME, allow_pickle=False).astype(np.float64)
    if counts.shape != (V,):
        raise ValueError(f"{Path(data_dir) / 'train' / UNIGRAM_NAME}: shape {counts.shape}, want ({V},)")
    logp = np.log(counts + 1.0) - np.log(counts.sum() + V)
    rows = open_rows(data_dir, split)
    nll, n = 0.0, 0
    for i in range(0, rows.num_rows, 1024):
        ids = rows.__getitems__(range(i, min(i + 1024, rows.num_rows))).numpy().reshape(-1)
        nll -= float(logp[ids].sum())
        n += ids.size
    return float(math.exp(nll / n))
