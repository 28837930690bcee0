"""`parallel.precision`: which compute dtype a rank runs, decided on the device it runs on.

    auto  bf16 autocast where the device computes bf16 natively, fp32 otherwise
    bf16  bf16 autocast over fp32 master weights (a warning where bf16 is emulated: it runs, slowly)
    fp32  fp32 throughout

Native bf16: a CUDA device for which torch.cuda.is_bf16_supported() holds (Ampere and newer); a CPU for
which oneDNN reports bf16 kernels (AVX-512 BF16 or AMX; torch.ops.mkldnn._is_mkldnn_bf16_supported()).
On an AVX2-only CPU a bf16 matmul runs about 90x slower than fp32, so `auto` means fp32 there.

MDIFF_NATIVE_BF16=0|1 overrides the probe (the test suite sets 0, so that nothing it checks depends on
which CPU it runs on; a user can set it to force the decision of `auto`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENV = "MDIFF_NATIVE_BF16"


@dataclass(frozen=True)
class Precision:
    requested: str      # what the config says: auto | bf16 | fp32
    resolved: str       # what runs: bf16 | fp32
    native_bf16: bool   # whether the device computes bf16 natively
    device: str         # the device it was decided for, in words
    warning: str = ""   # set for an explicit bf16 on a device without native bf16

    def describe(self) -> str:
        why = "native bf16" if self.native_bf16 else "no native bf16"
        how = f"{self.requested} -> {self.resolved}" if self.requested == "auto" else self.resolved
        return f"{how} ({self.device}: {why})"


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, the device in words)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native = bool(torch.cuda.is_bf16_supported())
    else:
        name = f"CPU ({torch.backends.cpu.get_cpu_capability()})"
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):   # a torch build without oneDNN
            native = False
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        native = forced == "1"
        name += f", {ENV}={forced}"
    return native, name


def resolve_precision(requested: str, device: torch.device | str) -> Precision:
    native, name = native_bf16(device)
    if requested == "auto":
        return Precision("auto", "bf16" if native else "fp32", native, name)
    warning = ""
    if requested == "bf16" and not native:
        warning = (f"parallel.precision=bf16 on {name}, which has no native bf16 (oneDNN reports no AVX-512 BF16 "
                   "or AMX kernels / a CUDA device before Ampere): bf16 matmuls are emulated there, about 90x "
                   "slower than fp32 on an AVX2 CPU. Use parallel.precision=auto (fp32 here) unless you mean it")
    return Precision(requested, requested, native, name, warning)
