"""Suite-wide settings: nothing the suite checks may depend on which CPU it runs on, so
`parallel.precision: auto` resolves as on a CPU without native bf16 (fp32) in every test and in every
process a test starts (launcher/precision.py reads MDIFF_NATIVE_BF16)."""
import os

os.environ["MDIFF_NATIVE_BF16"] = "0"

# verified shard digests (data_pipeline.manifest.ShardDigests) go to a folder of this session, not ~/.cache
import tempfile  # noqa: E402

os.environ.setdefault("MDIFF_VERIFY_CACHE_DIR", tempfile.mkdtemp(prefix="mdiff-verify-"))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs 2 workers, --dist loadgroup): a file's tests run on one worker, in
    order (its module fixtures, e.g. the single-process references of test_train_layouts.py, are built once),
    and every test that uses the loopback SLURM cluster runs on the same worker, one job at a time (the
    cluster's one node has 2 CPUs and a job takes both)."""
    import pytest

    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
