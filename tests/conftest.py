"""Suite-wide settings: nothing the suite checks may depend on which CPU it runs on, so
`parallel.precision: auto` resolves as on a CPU without native bf16 (fp32) in every test and in every
process a test starts (launcher/precision.py reads MDIFF_NATIVE_BF16)."""
import os

os.environ["MDIFF_NATIVE_BF16"] = "0"

# under pytest-xdist every worker runs its own jobs at the same time: a worker's share of the cores, for the
# worker itself (set before torch is imported) and for the ranks its tests start (launcher/train.py reads it)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# verified shard digests (data_pipeline.manifest.ShardDigests) go to a folder of this session, not ~/.cache
import tempfile  # noqa: E402

import pytest  # noqa: E402

os.environ.setdefault("MDIFF_VERIFY_CACHE_DIR", tempfile.mkdtemp(prefix="mdiff-verify-"))


# the files that take longest (`make test` prints the slowest tests), started first so that no long file is
# left for the end while the other worker idles; the SLURM group (636 s on 2026-12-07, much of it waiting on
# SLURM) first, test_train_layouts.py (762 s) on the other worker
_LONG_FIRST = ("slurm", "tests/test_train_layouts.py", "tests/test_known_entropy.py", "tests/test_export_eval.py",
               "tests/test_faults_cli.py", "tests/test_checkpoint.py", "tests/test_train_e2e.py",
               "tests/test_out_of_the_box.py")


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which reads the xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs 2 workers, --dist loadgroup): a file's tests run on one worker, in
    order (its module fixtures, e.g. the single-process references of test_train_layouts.py, are built once),
    and every test that uses the loopback SLURM cluster runs on the same worker, one job at a time (the
    cluster's one node has 2 CPUs and a job takes both). The groups are handed out in `_LONG_FIRST` order,
    then as collected."""
    def group(item):
        return "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    if getattr(config.option, "loadgroup", False):   # set on the workers, which collect
        rank = {g: i for i, g in enumerate(_LONG_FIRST)}
        items.sort(key=lambda item: rank.get(group(item), len(rank)))   # stable: collection order otherwise
