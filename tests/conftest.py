"""Suite-wide settings: nothing the suite checks may depend on which CPU it runs on, so
`parallel.precision: auto` resolves as on a CPU without native bf16 (fp32) in every test and in every
process a test starts (launcher/precision.py reads MDIFF_NATIVE_BF16)."""
import os

os.environ["MDIFF_NATIVE_BF16"] = "0"
