"""Atomic, verifiable, resumable checkpoints around DeepSpeed's sharded save.

Layout:  <run_dir>/checkpoints/step_00000100/
             <DeepSpeed model/optimizer shards>       (engine.save_checkpoint, tag=step_00000100)
             extra_rank{R}.pt                          (data-loader position + RNG states of rank R)
             COMPLETE.json                             (sha256 of every file; written last, by rank 0)
         <run_dir>/checkpoints/latest                  (tag name; replaced atomically after COMPLETE.json)

A checkpoint without COMPLETE.json, or whose files no longer match it, is never loaded: the loader
falls back to the newest earlier good one with a warning naming the bad one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # only tensors and plain containers, so it loads with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_complete(ckpt_root: Path) -> list[str]:
    """Tags that have a COMPLETE.json, oldest first."""
    if not ckpt_root.is_dir():
        return []
    tags = [p.name for p in ckpt_root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def verify(tag_dir: Path) -> str | None:
    """None if every file listed in COMPLETE.json is present with its checksum, else the reason."""
    try:
        meta = json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        return f"{tag_dir / COMPLETE}: unreadable ({e})"
    for rel, digest in meta["files"].items():
        p = tag_dir / rel
        if not p.is_file():
            return f"{p}: missing"
        if _sha256(p) != digest:
            return f"{p}: checksum mismatch (corrupt or partially written)"
    return None


def _rank_extra_path(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"extra_rank{rank}.pt"


def save(engine, ckpt_root: Path, step: int, client_state: dict, rank_state: dict,
         keep_last: int, rank: int) -> Path:
    """Collective: every rank calls it. Returns the tag directory."""
    ckpt_root = Path(ckpt_root)
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if rank == 0:
        if tag_dir.exists():  # a torn earlier attempt at the same step
            shutil.rmtree(tag_dir)
        ckpt_root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rank_state, _rank_extra_path(tag_dir, rank))
    dist.barrier()  # every rank has finished writing
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): _sha256(p)
                 for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}
        _atomic_write(tag_dir / COMPLETE, json.dumps({"step": step, "files": files}, indent=1))
        _atomic_write(ckpt_root / "latest", tag + "\n")
        for old in list_complete(ckpt_root)[:-keep_last]:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)
    dist.barrier()
    return tag_dir


def find_resumable(ckpt_root: Path, rank: int) -> str | None:
    """Newest verified tag (same answer on every rank), warning about each bad one skipped."""
    choice = None
    if rank == 0:
        for tag in reversed(list_complete(Path(ckpt_root))):
            problem = verify(Path(ckpt_root) / tag)
            if problem is None:
                choice = tag
                break
            warnings.warn(f"skipping checkpoint {Path(ckpt_root) / tag}: {problem}")
            print(f"WARNING: skipping checkpoint {Path(ckpt_root) / tag}: {problem}", flush=True)
    box = [choice]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load(engine, ckpt_root: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Load model/optimizer/scheduler through DeepSpeed; returns (client_state, this rank's extra state)."""
    path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_root) / tag}")
    extra_path = _rank_extra_path(Path(ckpt_root) / tag, rank)
    if not extra_path.is_file():
        raise RuntimeError(f"{extra_path} is missing: the checkpoint was written by a different world size")
    extra = torch.load(extra_path, map_location="cpu", weights_only=True)
    return client_state or {}, extra
