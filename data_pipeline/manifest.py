"""manifest.json of a prepared data folder, and the checks the trainer runs before using it.

manifest.json (written by data_pipeline.prepare), keys:
    format_version, tokenizer ("gpt2" | "text8" | "pixels" | a pre-tokenized vocabulary's name),
    vocab_size (50257 | 27 | 256 | V), eos_id (50256 | null | E), seq_len, dtype ("uint8"/"uint16"/"uint32"),
    column ("tokens"), writer ("mds" | "webdataset"; absent = mds), source, documents,
    image_shape ([H, W, C], pixels only: one HWC-flattened image per row, seq_len = H*W*C),
    split: {seed, val_fraction, method} (hashed) or {method} (the dataset's standard splits),
    splits: {train|val|test: {documents, tokens_total, rows, tokens, dropped_tokens,
                              shards: [{path, rows}] (webdataset only),
                              files: [{path (relative to the data folder), bytes, sha256}]}}
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
UNIGRAM_NAME = "unigram_counts.npy"
FORMAT_VERSION = 1


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_cache_dir() -> Path:
    """Where verified shard digests are remembered: $MDIFF_VERIFY_CACHE_DIR, default ~/.cache/mdiff/verified."""
    return Path(os.environ.get("MDIFF_VERIFY_CACHE_DIR") or Path.home() / ".cache" / "mdiff" / "verified")


class ShardDigests:
    """sha256 of shard files, cached per shard: an entry holds (bytes, mtime_ns, sha256) of one file, so a
    shard is read again only when it was replaced or touched. One JSON file per data folder under
    `verify_cache_dir()`; written atomically; an unreadable cache is ignored (everything is re-read)."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).resolve()
        key = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
        self.path = verify_cache_dir() / f"{key}.json"
        try:
            doc = json.loads(self.path.read_text())
            self.entries = doc["files"] if doc.get("data_dir") == str(self.data_dir) else {}
        except (OSError, ValueError, KeyError, TypeError):
            self.entries = {}
        self.dirty = False

    def cached(self, rel: str) -> str | None:
        st = (self.data_dir / rel).stat()
        e = self.entries.get(rel)
        return e[2] if e and e[0] == st.st_size and e[1] == st.st_mtime_ns else None

    def compute(self, rel: str) -> str:
        fp = self.data_dir / rel
        st = fp.stat()
        digest = file_sha256(fp)
        self.entries[rel] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"data_dir": str(self.data_dir), "files": self.entries}))
            os.replace(tmp, self.path)
        except OSError:    # a read-only home: verification still happened, it is just not remembered
            pass
        self.dirty = False


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read DIR/manifest.json; ValueError naming the file when it is missing or unreadable."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: manifest missing; is {data_dir} a folder written by "
                         "`python -m data_pipeline.prepare`?")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    for key in ("format_version", "tokenizer", "vocab_size", "eos_id", "seq_len", "splits"):
        if key not in m:
            raise ValueError(f"{path}: manifest lacks key {key!r}")
    if m["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {m['format_version']} is not the supported {FORMAT_VERSION}")
    return m


def check_manifest(data_dir: str | Path, *, tokenizer: str | None = None, seq_len: int | None = None,
                   vocab_size: int | None = None, image_shape: list[int] | None = None,
                   splits: tuple[str, ...] | None = None,
                   verify_sha256: bool = False, progress: bool = True) -> dict[str, Any]:
    """Check that the prepared data fits the run and that its files are intact; return the manifest.

    Each ValueError names the manifest file and the key: tokenizer, seq_len, vocab_size, image_shape mismatches;
    a missing split; a missing shard or one of the wrong size (always checked, cheap); a shard whose
    sha256 differs (only with verify_sha256=True: reads every byte of a shard the first time, then only
    when its size or mtime changed (`ShardDigests`); a progress bar above 64 MiB).
    """
    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    path = data_dir / MANIFEST_NAME
    for key, want in (("tokenizer", tokenizer), ("seq_len", seq_len), ("vocab_size", vocab_size),
                      ("image_shape", list(image_shape) if image_shape is not None else None)):
        if want is not None and m.get(key) != want:
            raise ValueError(f"{path}: {key} mismatch: data has {key}={m[key]!r}, the run wants {want!r} "
                             "(re-run data_pipeline.prepare or change the config)")
    digests = ShardDigests(data_dir) if verify_sha256 else None
    unverified = []
    for split in (splits if splits is not None else tuple(m["splits"])):
        if split not in m["splits"]:
            raise ValueError(f"{path}: splits.{split} missing (has {sorted(m['splits'])})")
        for f in m["splits"][split]["files"]:
            fp = data_dir / f["path"]
            if not fp.is_file():
                raise ValueError(f"{path}: splits.{split}.files: missing shard {fp}")
            size = fp.stat().st_size
            if size != f["bytes"]:
                raise ValueError(f"{path}: splits.{split}.files: shard {fp} has {size} bytes, "
                                 f"manifest says {f['bytes']} (corrupt or replaced)")
            if digests is not None and digests.cached(f["path"]) != f["sha256"]:
                unverified.append((split, f))
    if unverified:
        total = sum(f["bytes"] for _, f in unverified)
        bar = None
        if progress and total > (64 << 20):
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {len(unverified)} shard(s)")
        try:
            for split, f in unverified:
                digest = digests.compute(f["path"])
                if bar is not None:
                    bar.update(f["bytes"])
                if digest != f["sha256"]:
                    raise ValueError(f"{path}: splits.{split}.files: sha256 of shard {data_dir / f['path']} is "
                                     f"{digest}, manifest says {f['sha256']} (corrupt)")
        finally:
            if bar is not None:
                bar.close()
            digests.save()   # what did verify is remembered even when a later shard did not
    return m
