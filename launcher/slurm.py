"""SLURM submission through submitit: one task per GPU, USR2 before the time limit, requeue on preemption."""
from __future__ import annotations

from pathlib import Path


def slurm_parameters(cfg, args) -> dict:
    gpus = args.gpus_per_node if args.gpus_per_node is not None else 8
    params = {
        "job_name": cfg.run.name,
        "nodes": args.nodes or 1,
        "ntasks_per_node": max(gpus, 1),     # one task per GPU
        "gpus_per_node": gpus or None,
        "cpus_per_task": 8 if gpus else 1,
        "time": args.time or 24 * 60,
        "signal_delay_s": 120,               # USR2 two minutes before the limit: finish the step, save
        "stderr_to_stdout": True,
    }
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(args, key, None)
        if value:
            params[key] = value
    return params


def sbatch_script(cfg, args) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(cfg, args)
    folder = Path(cfg.run_dir).resolve() / "submitit"
    command = "python -u -m submitit.core._submit " + str(folder)
    return _make_sbatch_string(command=command, folder=str(folder / "%j"), **params)


def slurm_executor(cfg, args, run_dir: Path):
    import submitit

    executor = submitit.SlurmExecutor(folder=str(run_dir / "submitit" / "%j"), max_num_timeout=1000)
    executor.update_parameters(**slurm_parameters(cfg, args))
    return executor
