"""Suite-wide settings: nothing the suite checks may depend on which CPU it runs on, so
`parallel.precision: auto` resolves as on a CPU without native bf16 (fp32) in every test and in every
process a test starts (launcher/precision.py reads MDIFF_NATIVE_BF16)."""
import os

os.environ["MDIFF_NATIVE_BF16"] = "0"

# verified shard digests (data_pipeline.manifest.ShardDigests) go to a folder of this session, not ~/.cache
import tempfile  # noqa: E402

os.environ.setdefault("MDIFF_VERIFY_CACHE_DIR", tempfile.mkdtemp(prefix="mdiff-verify-"))
