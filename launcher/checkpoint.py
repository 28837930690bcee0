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


# What DeepSpeed's checkpoint files hold besides tensors and plain containers (deepspeed 0.19.8): the
# only classes the loader may construct. Nothing else is unpickled: no code runs on load.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine with loading under torch.load(weights_only=True) and an explicit
    allowlist (DeepSpeed's own engine loads with weights_only=False, i.e. it would run pickled code)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeTorchCheckpointEngine


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True and DeepSpeed's data classes allowed; a file that would need
    anything else is refused with an error naming it."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"{path}: refused to load: it is not a weights-only checkpoint file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from e


def install_safe_loading(engine) -> None:
    """Make a DeepSpeed engine load its checkpoints through `safe_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = safe_checkpoint_engine()(engine._config)   # same save settings


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    from data_pipeline.manifest import file_sha256

    return file_sha256(path)


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
         keep_last: int, rank: int, keep_every: int = 0, files: dict[str, str] | None = None) -> Path:
    """Collective: every rank calls it. Returns the tag directory.

    `files` ({name: text}, rank 0's) are written into the checkpoint too (the resolved config and the code
    version), so that a checkpoint copied elsewhere still says what produced it; they are checksummed
    with the rest."""
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
    if rank == 0:
        for name, text in (files or {}).items():
            _atomic_write(tag_dir / name, text)
    dist.barrier()  # every rank has finished writing
    if rank == 0:
        digests = {str(p.relative_to(tag_dir)): _sha256(p)
                   for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != COMPLETE}
        _atomic_write(tag_dir / COMPLETE, json.dumps({"step": step, "files": digests}, indent=1))
        _atomic_write(ckpt_root / "latest", tag + "\n")
        prune(ckpt_root, keep_last, keep_every)
    dist.barrier()
    return tag_dir


def prune(ckpt_root: Path, keep_last: int, keep_every: int = 0) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints and those whose step is a multiple of
    `keep_every` (0: none), and every torn directory (no COMPLETE.json: a save that died) older than the
    newest complete one. Returns the deleted tags. Run by rank 0 after a save completed."""
    ckpt_root = Path(ckpt_root)
    complete = list_complete(ckpt_root)
    if not complete:
        return []
    keep = set(complete[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        keep |= {t for t in complete if int(TAG_RE.match(t).group(1)) % keep_every == 0}
    newest = complete[-1]
    doomed = [t for t in complete if t not in keep]
    doomed += sorted(p.name for p in ckpt_root.iterdir()
                     if p.is_dir() and TAG_RE.match(p.name) and p.name not in complete and p.name < newest)
    for t in doomed:
        shutil.rmtree(ckpt_root / t, ignore_errors=True)
    return doomed


def newest_verified(ckpt_root: Path) -> tuple[str | None, list[str]]:
    """The newest tag that verifies against its COMPLETE.json, and why each newer one was skipped: a
    step folder without COMPLETE.json (a save that did not finish) or one whose files do not match it.
    Pure (no collectives): training, export and submit.py all pick the checkpoint with it."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return None, []
    tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and TAG_RE.match(p.name))
    skipped = []
    for tag in reversed(tags):
        if not (ckpt_root / tag / COMPLETE).is_file():
            skipped.append(f"{ckpt_root / tag}: no {COMPLETE} (a save that did not finish)")
            continue
        problem = verify(ckpt_root / tag)
        if problem is None:
            return tag, skipped
        skipped.append(f"{ckpt_root / tag}: {problem}")
    return None, skipped


def layout_mismatch(tag_dir: Path, parallel, world_size: int) -> str | None:
    """None when the checkpoint at tag_dir was written at this layout (parallel: launcher.config.ParallelConfig,
    on world_size ranks); else 'TP=.., PP=.., VPP=.., ZeRO-.. on N ranks; this job runs ...'. A checkpoint
    resumes only at its own layout (DeepSpeed's model and ZeRO shards are per model- and data-parallel rank);
    submit.py asks before the run directory is touched, the job again before it loads."""
    import yaml

    tag_dir = Path(tag_dir)
    saved = {}
    if (tag_dir / "config.yaml").is_file():
        saved = (yaml.safe_load((tag_dir / "config.yaml").read_text()) or {}).get("parallel", {}) or {}
    p = parallel
    ranks = len(list(tag_dir.glob("extra_rank*.pt"))) or world_size
    then = (saved.get("tensor_parallel", p.tensor_parallel), saved.get("pipeline_parallel", p.pipeline_parallel),
            saved.get("virtual_pipeline", 1), saved.get("zero_stage", p.zero_stage), ranks)
    now = (p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline, p.zero_stage, world_size)
    if then == now:
        return None
    fmt = "TP={}, PP={}, VPP={}, ZeRO-{} on {} ranks"
    return f"{fmt.format(*then)}; this job runs {fmt.format(*now)}"


def export_route(tag_dir: Path) -> str:
    """How to continue a checkpoint at another layout."""
    return (f"A checkpoint resumes only at its own layout. To continue at another layout: python launcher/export.py "
            f"{tag_dir} --out EXPORT, then start a new run.name with checkpoint.init_from=EXPORT (weights and EMA "
            "carry over; the optimizer state, step counter and data position start afresh)")


def check_layout(tag_dir: Path, parallel, world_size: int) -> None:
    """Refuse a checkpoint written at another layout, saying how to change the layout instead of failing inside
    DeepSpeed."""
    mismatch = layout_mismatch(tag_dir, parallel, world_size)
    if mismatch is not None:
        raise RuntimeError(f"{tag_dir} was written at {mismatch}. {export_route(tag_dir)}")


# {pipeline rank: {parameter name: megatron's TP split dimension or None}} (launcher.parallelize.split_dims_by_stage),
# written into every checkpoint; export consolidates tensor-parallel shards along these dimensions
SPLIT_FILE = "tp_split.json"


def provenance(run_dir: Path) -> dict[str, str]:
    """The resolved config and the code version of a run directory, copied into every checkpoint."""
    return {name: (Path(run_dir) / name).read_text() for name in ("config.yaml", "code_version.txt")
            if (Path(run_dir) / name).is_file()}


class Checkpointer:
    """When to save and what to keep (as torchtitan's CheckpointManager): checkpoint.interval, the last step,
    keep_last / keep_every; the resolved config and code version (`files`) are copied into each checkpoint."""

    def __init__(self, root: Path, cfg_checkpoint, train_steps: int, rank: int, files: dict[str, str]):
        self.root, self.c, self.train_steps, self.rank, self.files = Path(root), cfg_checkpoint, train_steps, rank, files

    def due(self, step: int) -> bool:
        return step % self.c.interval == 0 or step == self.train_steps

    def save(self, engine, step: int, client_state: dict, rank_state: dict) -> Path:
        return save(engine, self.root, step, client_state, rank_state, keep_last=self.c.keep_last,
                    keep_every=self.c.keep_every, rank=self.rank, files=self.files)

    def restore(self, engine, parallel, world_size: int) -> tuple[str | None, dict, dict, list[str]]:
        """Collective: load the newest verified checkpoint into `engine` after checking it was written at this
        layout. Returns (tag or None, client state, this rank's extra state, warnings about newer checkpoints
        skipped)."""
        tag, skipped = find_resumable(self.root, self.rank)
        if tag is None:
            return None, {}, {}, skipped
        check_layout(self.root / tag, parallel, world_size)
        client, extra = load(engine, self.root, tag, self.rank)
        return tag, client, extra, skipped


def find_resumable(ckpt_root: Path, rank: int) -> tuple[str | None, list[str]]:
    """Collective: the newest verified tag (the same answer on every rank) and the warnings about each
    newer checkpoint skipped (printed by rank 0 here; launcher/train.py also writes them to TensorBoard)."""
    box: list = [None, []]
    if rank == 0:
        choice, skipped = newest_verified(Path(ckpt_root))
        box = [choice, [f"skipping checkpoint {why}" for why in skipped]]
        for w in box[1]:
            warnings.warn(w)
            print(f"WARNING: {w}", flush=True)
    dist.broadcast_object_list(box, src=0)
    return box[0], box[1]


def load(engine, ckpt_root: Path, tag: str, rank: int) -> tuple[dict, dict]:
    """Load model/optimizer/scheduler through DeepSpeed; returns (client_state, this rank's extra state)."""
    path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {Path(ckpt_root) / tag}")
    extra_path = _rank_extra_path(Path(ckpt_root) / tag, rank)
    if not extra_path.is_file():
        raise RuntimeError(f"{extra_path} is missing: the checkpoint was written by a different world size")
    extra = safe_load(extra_path)
    return client_state or {}, extra
