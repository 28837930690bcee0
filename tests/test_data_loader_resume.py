"""The training loader's order and resume: exact mid-epoch resume with 2 DataLoader workers and 2 DP
ranks, every row once per epoch, resume under another DP size, webdataset shards, remote data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.loader import build_train_loader, resolve_data_dir
from data_pipeline.prepare import write_splits

N, S = 50, 4          # rows, seq_len: row i holds ids i*S .. i*S+S-1, so a row names its own id


def _rows_dataset(out: Path, writer: str = "mds") -> Path:
    rows = np.arange(N * S, dtype=np.int64).reshape(N, S)
    write_splits([("train", rows[:30]), ("train", rows[30:])], out, S, splits=("train",), tokenizer="ids",
                 vocab_size=N * S, eos_id=None, split_info={"method": "test"}, rows_mode=True, writer=writer,
                 shard_bytes=1 << 8)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _rows_dataset(tmp_path_factory.mktemp("rows") / "d")


def _ids(batch) -> list[int]:
    b = batch.numpy()
    assert (b == b[:, :1] + np.arange(S)).all()
    return (b[:, 0] // S).tolist()


def _run(data, steps, B, dp, state=None, workers=2, seed=5):
    """Global batches (list of ids, rank 0 first) of `steps` steps on dp ranks, and rank 0's state after."""
    loaders = [build_train_loader(data, "train", B, r, dp, seed=seed, num_workers=workers) for r in range(dp)]
    if state is not None:
        for l in loaders:
            l.load_state_dict(state)
    out = [sum((_ids(next(l)) for l in loaders), []) for _ in range(steps)]
    sd = json.loads(json.dumps(loaders[0].state_dict()))           # plain types: survives JSON
    assert all(l.state_dict() == sd for l in loaders)
    for l in loaders:
        l.close()
    return out, sd


def test_resume_at_step_k_gives_the_uninterrupted_batches(data):
    B, dp, T = 3, 2, 26                                 # G = 6; 26 steps = 156 samples, > 3 epochs of 50
    ref, _ = _run(data, T, B, dp)
    stream = sum(ref, [])
    for e in range(3):                                  # every row exactly once per epoch, across ranks
        assert sorted(stream[e * N:(e + 1) * N]) == list(range(N))
    for k in (3, 8, 17):                                # mid-epoch, and across epoch boundaries
        head, sd = _run(data, k, B, dp)
        assert sd["samples_seen"] == k * B * dp and sd["epoch"] == k * B * dp // N
        tail, _ = _run(data, T - k, B, dp, state=sd)
        assert head + tail == ref, f"resume at step {k}"


def test_resume_with_another_dp_size_continues_the_global_stream(data):
    ref, _ = _run(data, 20, 3, 2, workers=0)            # 120 samples
    stream = sum(ref, [])
    head, sd = _run(data, 7, 3, 2, workers=0)           # 42 samples on 2 ranks
    for B, dp in ((2, 3), (4, 1), (1, 6)):
        steps = (len(stream) - 42) // (B * dp)
        tail, _ = _run(data, steps, B, dp, state=sd, workers=1)
        assert sum(head + tail, []) == stream[:42 + steps * B * dp], (B, dp)


def test_resume_refuses_another_stream_or_an_old_state(data):
    _, sd = _run(data, 2, 3, 2, workers=0)
    l = build_train_loader(data, "train", 3, 0, 2, seed=6, num_workers=0)
    with pytest.raises(ValueError, match="seed=5 in the checkpoint, 6 now"):
        l.load_state_dict(sd)
    with pytest.raises(ValueError, match="version 1 is not 2"):
        l.load_state_dict({"version": 1, "epoch": 0, "step_in_epoch": 3})


def test_webdataset_shards_and_remote_copy_give_the_same_batches(data, tmp_path):
    wds_dir = _rows_dataset(tmp_path / "remote" / "wds", writer="webdataset")
    ref, _ = _run(data, 12, 3, 2)
    got, _ = _run(wds_dir, 12, 3, 2)
    assert got == ref
    # "remote" folders: a file:// URL (mosaicml-streaming's downloader) for both writers
    cache = tmp_path / "cache"
    for remote in (wds_dir, _rows_dataset(tmp_path / "remote" / "mds")):
        local = resolve_data_dir(f"file://{remote}", cache)
        assert local != remote and local.parent == cache
        assert _run(f"file://{remote}", 12, 3, 2, state=None)[0] == ref
    # cached files are reused; a remote file that differs from the manifest is refused, naming it
    shard = sorted((wds_dir / "train").glob("*.tar"))[0]
    local = resolve_data_dir(f"file://{wds_dir}", cache)
    cached = local / "train" / shard.name
    mtime = cached.stat().st_mtime_ns
    assert resolve_data_dir(f"file://{wds_dir}", cache) == local and cached.stat().st_mtime_ns == mtime
    cached.unlink()
    blob = bytearray(shard.read_bytes())
    blob[600] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"{shard.name}: sha256 .* differs"):
        resolve_data_dir(f"file://{wds_dir}", cache)
    with pytest.raises(ValueError, match="nowhere/manifest.json: cannot fetch"):
        resolve_data_dir(f"file://{tmp_path}/nowhere", cache)


def test_http_remote_through_webdataset_gopen(data, tmp_path):
    """An https?:// data.path is fetched with webdataset's gopen (curl) into the cache."""
    import functools
    import http.server
    import threading

    root = tmp_path / "srv"
    _rows_dataset(root / "wds", writer="webdataset")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/wds"
        local = resolve_data_dir(url, tmp_path / "cache")
        assert (local / "manifest.json").is_file()
        assert _run(local, 6, 3, 2, workers=0)[0] == _run(data, 6, 3, 2, workers=0)[0]
    finally:
        srv.shutdown()
