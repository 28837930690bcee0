"""Cluster profiles: submission defaults for a SLURM cluster, kept in cluster/profiles/<name>.yaml.

A profile is a flat YAML mapping (all keys optional):

    partition      str   SLURM partition (sbatch --partition)
    account        str   account to charge (--account)
    qos            str   quality of service (--qos)
    constraint     str   node features (--constraint)
    gpus_per_node  int   GPUs per node (--gpus-per-node); 0 = CPU only (the flag is then left out)
    cpus_per_task  int   CPUs per task (--cpus-per-task)
    mem_gb         num   memory per node in GB (--mem); 0 = all memory of the node
    time_min       int   time limit in minutes (--time)
    signal         str   "USR2@<seconds>": submitit checkpoints and requeues on USR2, sent that
                         many seconds before the time limit (submitit only supports USR2)

`submitit_parameters()` turns a profile into submitit.AutoExecutor.update_parameters() keywords.
This module needs only PyYAML; load it by path (cluster/ is not an installed package), e.g.

    spec = importlib.util.spec_from_file_location("cluster_profiles", "cluster/profiles.py")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

_TYPES: dict[str, tuple[type, ...]] = {
    "partition": (str,),
    "account": (str,),
    "qos": (str,),
    "constraint": (str,),
    "gpus_per_node": (int,),
    "cpus_per_task": (int,),
    "mem_gb": (int, float),
    "time_min": (int,),
    "signal": (str,),
}


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load a profile by name (cluster/profiles/<name>.yaml) or by path, and validate it."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    with open(path, encoding="utf-8") as f:
        profile = yaml.safe_load(f) or {}
    if not isinstance(profile, dict):
        raise ValueError(f"{path}: a profile must be a mapping, got {type(profile).__name__}")
    for key, value in profile.items():
        if key not in _TYPES:
            raise ValueError(f"{path}: unknown key {key!r} (known: {', '.join(_TYPES)})")
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            raise ValueError(f"{path}: {key} must be {'/'.join(t.__name__ for t in _TYPES[key])}, got {value!r}")
    if "signal" in profile:
        _signal_delay_s(profile["signal"], path)
    return profile


def _signal_delay_s(signal: str, where: Any = "profile") -> int:
    m = re.fullmatch(r"(?:SIG)?USR2@(\d+)", signal.strip())
    if not m:
        raise ValueError(f"{where}: signal must look like 'USR2@90' (submitit only handles USR2), got {signal!r}")
    return int(m.group(1))


def submitit_parameters(profile: dict[str, Any]) -> dict[str, Any]:
    """Keywords for submitit.AutoExecutor.update_parameters() (slurm_ prefix where submitit needs it)."""
    params: dict[str, Any] = {}
    for key, target in (("partition", "slurm_partition"), ("account", "slurm_account"),
                        ("qos", "slurm_qos"), ("constraint", "slurm_constraint"),
                        ("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem_gb"),
                        ("time_min", "timeout_min")):
        if key in profile:
            params[target] = profile[key]
    if profile.get("gpus_per_node"):
        params["gpus_per_node"] = profile["gpus_per_node"]
    if "signal" in profile:
        params["slurm_signal_delay_s"] = _signal_delay_s(profile["signal"])
    return params
