"""Training and evaluation loaders over prepared MDS data, sharded over DATA-PARALLEL ranks only.

Rows are read with mosaicml-streaming's MDS shard readers (streaming.base.format), the same code a
StreamingDataset uses underneath. The sample order is computed here, not by StreamingDataset, because
the requirements are (a) exact mid-epoch resume with any number of DataLoader workers, (b) identical
batches on tensor/pipeline peers whatever the process layout, and (c) no shared-memory coordination
between processes (StreamingDataset registers /dev/shm prefixes that collide between concurrent
processes unless torch.distributed is initialized and every local rank builds the same datasets).

Order: for epoch e, perm_e = numpy PCG64([seed, e]).permutation(num_rows) (arange if not shuffle).
The global batch of step s in epoch e is perm_e[s*G:(s+1)*G] with G = micro_batch_size * dp_size;
DP rank r takes the r-th slice of B rows of it. Steps per epoch = num_rows // G (the rest of the
epoch's permutation is dropped; it differs every epoch). The order depends only on
(seed, epoch, dp_rank, dp_size, micro_batch_size, num_rows): tensor/pipeline peers, which pass the
same dp_rank, get identical batches, and a loader's position (epoch, step) fully defines what follows.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipeline.manifest import UNIGRAM_NAME, load_manifest

STATE_VERSION = 1


class MDSRows:
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

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_rows:
            raise IndexError(i)
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.readers[shard].get_item(i - int(self.offsets[shard]))["tokens"]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.row(int(i)).astype(np.int64))

    def __getitems__(self, idxs) -> torch.Tensor:
        if len(idxs) == 0:
            return torch.empty((0, self.seq_len or 0), dtype=torch.long)
        return torch.from_numpy(np.stack([self.row(int(i)) for i in idxs]).astype(np.int64))


def _identity(batch):
    return batch


class _BatchIndexSampler:
    """Infinite batch sampler from a position (epoch, step); runs in the main process."""

    def __init__(self, loader: "TrainLoader", epoch: int, step: int):
        self.loader, self.epoch, self.step = loader, epoch, step

    def __iter__(self) -> Iterator[list[int]]:
        epoch, step = self.epoch, self.step
        while True:
            yield self.loader.batch_indices(epoch, step).tolist()
            step += 1
            if step == self.loader.steps_per_epoch:
                epoch, step = epoch + 1, 0


class TrainLoader:
    """Endless iterator of LongTensor [micro_batch_size, seq_len] with exact state_dict/resume.

    The position (epoch, step_in_epoch) counts batches this loader has *returned* (prefetched ones in
    DataLoader workers do not count), and is the same on every DP rank at the same training step, so
    one rank's state_dict can be loaded by all ranks.
    """

    def __init__(self, rows: MDSRows, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
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
        self.steps_per_epoch = self.num_rows // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{rows.data_dir / rows.split}: {self.num_rows} rows is fewer than one global "
                             f"batch ({micro_batch_size} x {dp_size} data-parallel ranks)")
        self.epoch, self.step_in_epoch = 0, 0
        self._perm_cache: tuple[int, np.ndarray] | None = None
        self._dl: DataLoader | None = None
        self._it = None

    # -- order ---------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            if self.shuffle:
                perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_rows)
            else:
                perm = np.arange(self.num_rows)
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Row ids of this rank's micro-batch at (epoch, step)."""
        start = step * self.global_batch_size + self.dp_rank * self.micro_batch_size
        return self.epoch_order(epoch)[start:start + self.micro_batch_size]

    # -- iteration -----------------------------------------------------------------------------
    def _start(self) -> None:
        sampler = _BatchIndexSampler(self, self.epoch, self.step_in_epoch)
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
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
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
        return {"version": STATE_VERSION, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "seed": self.seed, "shuffle": self.shuffle, "dp_size": self.dp_size,
                "micro_batch_size": self.micro_batch_size, "num_rows": self.num_rows,
                "samples_seen": (self.epoch * self.steps_per_epoch + self.step_in_epoch)
                * self.global_batch_size}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue exactly where the saved loader was. The order-defining settings must match."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')!r} is not {STATE_VERSION}")
        for key in ("seed", "shuffle", "dp_size", "micro_batch_size", "num_rows"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"data loader state mismatch: {key}={sd[key]!r} in the checkpoint, "
                                 f"{getattr(self, key)!r} now; exact resume needs the same value")
        if not 0 <= sd["step_in_epoch"] < self.steps_per_epoch or sd["epoch"] < 0:
            raise ValueError(f"data loader state out of range: {sd}")
        self.close()
        self.epoch, self.step_in_epoch = int(sd["epoch"]), int(sd["step_in_epoch"])


def build_train_loader(data_dir: str | Path, split: str, micro_batch_size: int, dp_rank: int,
                       dp_size: int, seed: int, num_workers: int = 1, shuffle: bool = True) -> TrainLoader:
    """Endless loader of LongTensor [micro_batch_size, seq_len] for DP rank dp_rank of dp_size.

    Tensor/pipeline-parallel peers must pass the same dp_rank; they then get identical batches.
    Does not check the manifest: call data_pipeline.manifest.check_manifest first.
    """
    return TrainLoader(MDSRows(data_dir, split), micro_batch_size, dp_rank, dp_size, seed,
                       num_workers=num_workers, shuffle=shuffle)


class EvalLoader:
    """One deterministic pass over a split; each row goes to exactly one DP rank, exactly once.

    Rank r gets the r-th contiguous chunk of np.array_split(range(num_rows), dp_size) (chunk sizes
    differ by at most one), in order, in batches of micro_batch_size. Every rank yields the same
    number of batches (num_batches), so collective calls stay in step; the last batch may be short,
    and on a rank with one row fewer it can be empty (shape [0, seq_len]): weight losses by rows or
    tokens, and still join the collectives for an empty batch.
    """

    def __init__(self, rows: MDSRows, micro_batch_size: int, dp_rank: int, dp_size: int):
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad data-parallel rank/size: dp_rank={dp_rank}, dp_size={dp_size}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.rows, self.micro_batch_size = rows, micro_batch_size
        self.num_rows = rows.num_rows
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
                      dp_size: int) -> EvalLoader:
    return EvalLoader(MDSRows(data_dir, split), micro_batch_size, dp_rank, dp_size)


def unigram_perplexity(data_dir: str | Path, split: str = "val") -> float:
    """Perplexity on `split` rows of an add-one-smoothed unigram model fit on train token counts."""
    m = load_manifest(data_dir)
    V = int(m["vocab_size"])
    counts = np.load(Path(data_dir) / "train" / UNIGRAM_NAME, allow_pickle=False).astype(np.float64)
    if counts.shape != (V,):
        raise ValueError(f"{Path(data_dir) / 'train' / UNIGRAM_NAME}: shape {counts.shape}, want ({V},)")
    logp = np.log(counts + 1.0) - np.log(counts.sum() + V)
    rows = MDSRows(data_dir, split)
    nll, n = 0.0, 0
    for i in range(0, rows.num_rows, 1024):
        ids = rows.__getitems__(range(i, min(i + 1024, rows.num_rows))).numpy().reshape(-1)
        nll -= float(logp[ids].sum())
        n += ids.size
    return float(math.exp(nll / n))
