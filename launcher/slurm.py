"""SLURM submission through submitit: one task per GPU, USR2 before the time limit, requeue on preemption.

Where the settings come from, later wins:
  1. built-in defaults (a GPU cluster: 8 GPUs per node, 24 h, USR2 120 s before the limit),
  2. the cluster profile `--cluster NAME` (cluster/profiles/NAME.yaml, see cluster/README.md),
  3. the command-line flags --partition --account --qos --time --constraint --gpus-per-node
     --tasks-per-node --cpus-per-task.

Tasks per node: one per GPU. On CPU-only clusters (gpus_per_node = 0, e.g. the loopback cluster) it is
--tasks-per-node, else the profile's `tasks_per_node`, else 1.

The job imports the code snapshot in <run_dir>/code, never the checkout: the sbatch script exports
PYTHONPATH=<run_dir>/code and PYTHONSAFEPATH=1 (Python >= 3.11), because `python -m submitit.core._submit`
would otherwise put the working directory first on sys.path, and a checkout there would shadow the
snapshot. The working directory itself stays the submitter's, so relative paths in the config resolve
as they did at submission.
"""
from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "gpus_per_node": 8,
    "time_min": 24 * 60,
    "signal": "USR2@120",      # finish the step, save, requeue: two minutes before the limit
}
CPUS_PER_TASK_GPU = 8          # when neither the profile nor the command line says


def _profiles_module():
    # cluster/ is not an installed package; in a job it is the snapshot's copy next to launcher/
    path = Path(__file__).resolve().parent.parent / "cluster" / "profiles.py"
    spec = importlib.util.spec_from_file_location("cluster_profiles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def resolve_cluster(args) -> dict[str, Any]:
    """The effective submission settings: defaults < profile (--cluster) < command-line flags."""
    profiles = _profiles_module()
    settings: dict[str, Any] = dict(DEFAULTS)
    name = getattr(args, "cluster", None)
    if name:
        settings.update(profiles.load_profile(name))
    flag_map = {"partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint",
                "gpus_per_node": "gpus_per_node", "time": "time_min", "tasks_per_node": "tasks_per_node",
                "cpus_per_task": "cpus_per_task"}
    for attr, key in flag_map.items():
        value = getattr(args, attr, None)
        if value is not None:
            settings[key] = value
    gpus = int(settings.get("gpus_per_node") or 0)
    settings["gpus_per_node"] = gpus
    if gpus > 0:
        if getattr(args, "tasks_per_node", None) not in (None, gpus):
            raise ValueError(f"--tasks-per-node {args.tasks_per_node} conflicts with {gpus} GPUs per node: "
                             "the launcher runs one task per GPU")
        settings["tasks_per_node"] = gpus
    else:
        settings["tasks_per_node"] = int(settings.get("tasks_per_node") or 1)
    if settings["tasks_per_node"] < 1:
        raise ValueError(f"tasks per node must be >= 1, got {settings['tasks_per_node']}")
    settings.setdefault("cpus_per_task", CPUS_PER_TASK_GPU if gpus else 1)
    settings["signal_delay_s"] = profiles._signal_delay_s(settings["signal"], "signal")
    settings["nodes"] = getattr(args, "nodes", None) or 1
    settings["cluster"] = name or "(built-in defaults)"
    return settings


def world_size(args) -> int:
    s = resolve_cluster(args)
    return s["nodes"] * s["tasks_per_node"]


def slurm_parameters(cfg, args, run_dir: Path | None = None) -> dict:
    """Keywords for submitit.SlurmExecutor.update_parameters (its sbatch names)."""
    s = resolve_cluster(args)
    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir).resolve()
    code = run_dir / "code"
    params: dict[str, Any] = {
        "job_name": cfg.run.name,
        "nodes": s["nodes"],
        "ntasks_per_node": s["tasks_per_node"],     # one task per GPU
        "cpus_per_task": s["cpus_per_task"],
        "time": s["time_min"],
        "signal_delay_s": s["signal_delay_s"],
        "stderr_to_stdout": True,
        # a task that dies (SIGKILL, OOM killer, segfault) ends the whole step at once: the other ranks would
        # otherwise wait in their next collective until its timeout
        "srun_args": ["--kill-on-bad-exit=1"],
        # The job imports the snapshot: PYTHONPATH first, and PYTHONSAFEPATH=1 so that `python -m` does
        # not put the working directory (often the checkout, with its own launcher/) before it.
        "setup": [f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}",
                  "export PYTHONSAFEPATH=1"],
    }
    if s["gpus_per_node"]:
        params["gpus_per_node"] = s["gpus_per_node"]
    if "mem_gb" in s:
        params["mem"] = "0" if not s["mem_gb"] else f"{int(s['mem_gb'])}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if s.get(key):
            params[key] = s[key]
    return params


def submit_command(run_dir: Path) -> str:
    """What submitit.SlurmExecutor runs on every task (same python as the submitter)."""
    folder = Path(run_dir).resolve() / "submitit" / "%j"
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg, args, run_dir: Path | None = None) -> str:
    """The sbatch script submitit would submit (for --dry-run; needs no cluster and creates nothing)."""
    from submitit.slurm.slurm import _make_sbatch_string

    run_dir = Path(run_dir if run_dir is not None else cfg.run_dir).resolve()
    return _make_sbatch_string(command=submit_command(run_dir), folder=str(run_dir / "submitit" / "%j"),
                               **slurm_parameters(cfg, args, run_dir))


def slurm_executor(cfg, args, run_dir: Path):
    import submitit

    # max_num_timeout: a USR2 late in the time limit counts as a timeout for submitit; keep requeueing
    executor = submitit.SlurmExecutor(folder=str(Path(run_dir).resolve() / "submitit" / "%j"),
                                      max_num_timeout=1000)
    executor.update_parameters(**slurm_parameters(cfg, args, run_dir))
    return executor
