#!/usr/bin/env python
"""Submit a training run: validate the config, prepare a self-contained run directory, launch.

    python launcher/submit.py --local 2 configs/md4_tiny.yaml                 # this machine, 2 processes
    python launcher/submit.py --nodes 16 configs/md4_medium.yaml              # SLURM, 8 GPUs per node
    python launcher/submit.py --cluster example_gpu --nodes 16 --dry-run configs/md4_medium.yaml optim.lr=2e-4
    python launcher/submit.py --cluster loopback --nodes 1 --tasks-per-node 2 --wait configs/md4_tiny.yaml

SLURM settings: built-in defaults < cluster profile (--cluster NAME = cluster/profiles/NAME.yaml) < flags.
One task per GPU; on CPU-only clusters (gpus_per_node 0) --tasks-per-node sets the tasks per node.
On SLURM the command prints the job id and returns (--wait: wait for the result, as --local does).

The run directory (<run.output_dir>/<run.name>) holds the resolved config, a snapshot of the code that
was submitted (a requeued job runs that code even if the checkout moved on), the code version, the
submitit logs, checkpoints and TensorBoard logs. Submitting the same command again resumes from the
newest verified checkpoint in that directory.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python launcher/submit.py` puts launcher/ first, not the repo root
    sys.path.insert(0, str(REPO))

from launcher.config import ConfigError, load_config, save_config, validate_world  # noqa: E402

CODE_DIRS = ("launcher", "model", "data_pipeline", "configs", "cluster")
# Sections that must not change when a run directory is resumed (they define the model and its loss).
FROZEN_SECTIONS = ("model", "diffusion")


def positive_int(text: str) -> int:
    """argparse type of --local / --nodes: a whole number >= 1 (bad values exit 2 with a message)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config under configs/")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", type=positive_int, metavar="N", help="run N processes on this machine (submitit local)")
    where.add_argument("--nodes", type=positive_int, help="SLURM nodes")
    p.add_argument("--gpu", default=None, help="the GPU model of the capacity plan (launcher/plan.py --gpu; "
                   "default H100-80GB on GPU clusters)")
    p.add_argument("--cluster", metavar="NAME", help="SLURM cluster profile cluster/profiles/NAME.yaml (or a path)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (= tasks) per node (default: the profile's, else 8); 0 = CPU only")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="tasks per node on CPU-only clusters (gpus per node 0); default: the profile's, else 1")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", type=int, default=None, help="time limit in minutes")
    p.add_argument("--constraint")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")
    wait = p.add_mutually_exclusive_group()
    wait.add_argument("--wait", action="store_true", help="SLURM: wait for the job's result (default for --local)")
    wait.add_argument("--no-wait", action="store_true", help="return after submission (default for SLURM)")
    return p.parse_args(argv)


def code_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def snapshot_code(run_dir: Path) -> Path:
    dest = run_dir / "code"
    tmp = run_dir / "code.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in CODE_DIRS:
        if (REPO / d).is_dir():
            shutil.copytree(REPO / d, tmp / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    (run_dir / "code_version.txt").write_text(code_version() + "\n")
    return dest


def check_resume(cfg, run_dir: Path, world: int | None, config_path: str) -> str | None:
    """Before the run directory is touched: say which checkpoint the job will resume from and which newer
    ones it will skip (a save that did not finish, a checksum mismatch), and refuse a resume at another
    layout than that checkpoint's (the job would refuse it too, but only after config.yaml was rewritten).
    Returns the tag."""
    from launcher.checkpoint import export_route, layout_mismatch, newest_verified

    root = run_dir / "checkpoints"
    tag, skipped = newest_verified(root)
    for why in skipped:
        print(f"WARNING: skipping checkpoint {why}", flush=True)
    if tag is None:
        if skipped:
            print(f"WARNING: no checkpoint in {root} verifies: the run starts again from step 0", flush=True)
        return None
    print(f"resuming from {root / tag}", flush=True)
    tag_dir = root / tag
    if world is None or not (tag_dir / "config.yaml").is_file():
        return tag
    mismatch = layout_mismatch(tag_dir, cfg.parallel, world)
    if mismatch is not None:
        raise ConfigError(f"{config_path}: run directory {run_dir}: its newest checkpoint {tag_dir} was written at "
                          f"{mismatch.replace('this job runs', 'this submission asks for')}. {export_route(tag_dir)}")
    return tag


def check_run_lock(cfg) -> None:
    """One job per run directory: refuse (exit 2) while another job holds RUN_DIR/run.lock, naming it."""
    from launcher.runlock import RunLocked, check_free

    try:
        check_free(cfg.run_dir.resolve())
    except RunLocked as e:
        raise ConfigError(str(e)) from None


def prepare_run_dir(cfg, config_path: str, world: int | None = None) -> Path:
    import yaml

    run_dir = cfg.run_dir.resolve()
    saved = run_dir / "config.yaml"
    check_resume(cfg, run_dir, world, config_path)
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        new = cfg.to_dict()
        changed = [s for s in FROZEN_SECTIONS if old.get(s) != new.get(s)]
        if changed:
            raise ConfigError(f"{config_path}: run directory {run_dir} already holds a run whose "
                              f"{', '.join(changed)} section(s) differ; choose another run.name to start a new run")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return run_dir


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.dry_run:
            check_run_lock(cfg)
        if args.local is not None:
            world, per_unit, unit, gpus = args.local, None, "processes (--local N)", 0
        else:
            from launcher.slurm import resolve_cluster

            try:
                settings = resolve_cluster(args)
            except (OSError, ValueError) as e:   # unknown/invalid profile, conflicting flags
                raise ConfigError(f"--cluster {args.cluster}: {e}" if args.cluster else str(e)) from None
            world = settings["nodes"] * settings["tasks_per_node"]
            per_unit, unit, gpus = settings["tasks_per_node"], "nodes", settings["gpus_per_node"]
        batch = validate_world(cfg, world, args.config, tasks_per_unit=per_unit, unit=unit)
        data = Path(cfg.data.path)
        from data_pipeline.loader import is_remote

        if not args.dry_run and not is_remote(cfg.data.path):   # remote data is fetched and checked by train
            if not (data / "manifest.json").is_file():
                raise ConfigError(f"{args.config}: data.path = {cfg.data.path!r} has no manifest.json; "
                                  f"prepare it with `python -m data_pipeline.prepare --out {cfg.data.path} ...`")
            from data_pipeline.manifest import check_manifest

            try:   # the data must fit the model and be intact before anything is queued
                m = check_manifest(data, tokenizer=cfg.data.tokenizer, seq_len=cfg.model.seq_len,
                                   vocab_size=cfg.model.vocab_size, image_shape=cfg.model.image_shape)
                if cfg.data.verify_sha256:   # remembered per shard: the job's own check then only stats them
                    check_manifest(data, verify_sha256=True, splits=tuple(
                        sp for sp in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)) if sp in m["splits"]))
            except ValueError as e:
                raise ConfigError(f"{args.config}: data.path: {e}") from None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    import yaml

    from launcher.plan import plan_for, render_plan

    plan = plan_for(cfg, world, gpus_per_node=gpus, gpu=args.gpu)
    if args.dry_run:
        print("# resolved config")
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(f"# batch: {batch.describe()}")
        print(f"# precision: {plan.precision}")
        print(render_plan(plan, prefix="# "))
        if args.local is None:
            from launcher.slurm import resolve_cluster, sbatch_script

            s = resolve_cluster(args)
            print(f"# SLURM: cluster profile {s['cluster']}: {s['nodes']} node(s) x {s['tasks_per_node']} task(s), "
                  f"{s['gpus_per_node']} GPU(s) per node, world size {world}")
            print("# sbatch script (not submitted)")
            print(sbatch_script(cfg, args))
        else:
            print(f"# local run: {args.local} processes through submitit's LocalExecutor")
        return 0

    try:
        run_dir = prepare_run_dir(cfg, args.config, world)
    except ConfigError as e:      # a resume with a changed model/diffusion section or layout: nothing touched
        print(f"config error: {e}", file=sys.stderr)
        return 2
    code = snapshot_code(run_dir)
    # the job imports the snapshot, not the checkout
    os.environ["PYTHONPATH"] = os.pathsep.join([str(code)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["PYTHONSAFEPATH"] = "1"   # `python -m` must not put the cwd (a checkout?) before the snapshot
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    from launcher.train import TrainJob

    if args.local is not None:
        from launcher.distributed import free_port

        # the rendezvous port of the local tasks: one that is free now (submitit would derive it from the
        # job id, which can land on a port some other socket of this machine holds)
        os.environ["MDIFF_MASTER_PORT"] = str(free_port())
        from launcher.local_controller import LocalExecutor

        executor = LocalExecutor(folder=str(run_dir / "submitit"))
        executor.update_parameters(tasks_per_node=args.local, nodes=1, timeout_min=args.time or 24 * 60,
                                   gpus_per_node=0)
    else:
        from launcher.slurm import slurm_executor

        executor = slurm_executor(cfg, args, run_dir)
    if args.local is not None:
        # Ctrl-C cancels a local job (interrupted()). A shell without job control starts background commands
        # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: take SIGINT back, so
        # that the controller and the ranks, which inherit the disposition, end on it as well.
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        # submitit's local controller writes to the submitter's stderr; on Ctrl-C (SIGINT to the whole
        # foreground process group) it would print its KeyboardInterrupt traceback there. It inherits this
        # file as its stderr instead; the ranks log to their own files under submitit/.
        (run_dir / "submitit").mkdir(parents=True, exist_ok=True)
        saved = os.dup(2)
        with open(run_dir / "submitit" / "controller.log", "ab") as log:
            os.dup2(log.fileno(), 2)
            try:
                job = executor.submit(TrainJob(str(run_dir)))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    else:
        job = executor.submit(TrainJob(str(run_dir)))
    print(f"submitted job {job.job_id}; run directory {run_dir}", flush=True)
    print(f"batch: {batch.describe()}; precision: {plan.precision}", flush=True)
    print(f"watch it: tensorboard --logdir {run_dir / 'tensorboard'} --host 127.0.0.1", flush=True)
    if args.no_wait or (args.local is None and not args.wait):
        return 0
    resume = " ".join(["python", "launcher/submit.py"] + [shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:])])
    procs: dict = {}
    try:
        results = wait_streaming(job, procs=procs if args.local is not None else None)
    except KeyboardInterrupt:
        return interrupted(job, run_dir, local=args.local is not None, resume=resume, procs=procs)
    except Exception as e:  # submitit re-raises the task's exception with its traceback
        for line in describe_failure(job, e):
            print(line, file=sys.stderr)
        print(f"logs: {run_dir / 'submitit'}; resume with the same command: {resume}", file=sys.stderr)
        return 1
    result = next((r for r in results if r is not None), None)
    print_result(result)
    return 0


# what rank 0 prints that the terminal shows while the job runs (its whole log is in run_dir/submitit)
PROGRESS_PREFIXES = ("[step ", "warning", "WARNING", "initialised from")


class LogFollower:
    """Reads the complete lines that were appended to a log file since the last call."""

    def __init__(self, path: Path):
        self.path, self.pos, self.partial = Path(path), 0, ""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "r", errors="replace") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        text = self.partial + chunk
        *done, self.partial = text.split("\n")
        return done


def job_processes(job, known: dict | None = None) -> dict:
    """pid -> psutil.Process of a local job's controller and everything under it (ranks, data workers),
    added to `known`: a rank that outlives its controller is no longer below it."""
    import psutil

    known = dict(known or {})
    proc = getattr(job, "_process", None)
    if proc is None:
        return known
    try:
        top = psutil.Process(proc.pid)
        for p in [top, *top.children(recursive=True)]:
            known.setdefault(p.pid, p)
    except psutil.Error:
        pass
    return known


def wait_streaming(job, poll_s: float = 0.5, procs: dict | None = None):
    """job.results(), echoing rank 0's progress lines (step, bits/token, tokens/s, ETA; evaluation and
    sampling progress) while the job runs. `procs` (local jobs) collects the job's processes."""
    follower = LogFollower(job.paths.stdout)   # task 0 = global rank 0

    def echo():
        for line in follower.lines():
            if line.startswith(PROGRESS_PREFIXES):
                print(line, flush=True)

    last = 0.0
    while not job.done():
        echo()
        if procs is not None and time.time() - last > 2:
            procs.update(job_processes(job))
            last = time.time()
        time.sleep(poll_s)
    echo()
    return job.results()


def interrupted(job, run_dir: Path, *, local: bool, resume: str, procs: dict | None = None) -> int:
    """Ctrl-C while waiting. A local job is cancelled: every rank ends (submitit's controller sends SIGINT,
    then SIGKILL, to its tasks); checkpoints are written atomically, so the newest complete one stays
    loadable. A SLURM job keeps running (it is the cluster's); the terminal says how to stop it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # a second Ctrl-C must not cut the clean-up short
    if not local:
        print(f"\nstopped waiting; SLURM job {job.job_id} keeps running (scancel {job.job_id} stops it; "
              f"submitting the same command again resumes it)", file=sys.stderr)
        return 130
    import psutil

    print(f"\ncancelling job {job.job_id} ...", file=sys.stderr, flush=True)
    procs = job_processes(job, procs)
    proc = getattr(job, "_process", None)
    if proc is not None:
        try:   # Ctrl-C in a terminal reached the controller too: it is already stopping the ranks
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            job.cancel()     # SIGINT to the controller, which sends SIGINT, then SIGKILL, to the ranks
    alive = list(procs.values())
    _, alive = psutil.wait_procs(alive, timeout=15)
    for p in alive:          # what neither the controller nor SIGINT ended
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    if proc is not None:
        proc.poll()
    from launcher.checkpoint import newest_verified

    root = Path(run_dir) / "checkpoints"
    good, _ = newest_verified(root)
    where = (f"the newest complete checkpoint is {root / good}" if good
             else "no checkpoint was complete yet, so the run will start from step 0")
    print(f"cancelled: every rank of job {job.job_id} has ended; {where}.\n"
          f"resume with the same command: {resume}", file=sys.stderr, flush=True)
    return 130


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure))(?:: (.*))?$")
_SRUN_LINE = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): (.+)$", re.M)


def last_error(text: str) -> str | None:
    """The innermost `ExceptionType: message` line of a log or traceback (a DataLoader worker's error is
    re-raised with the worker's traceback inside: its own line comes last)."""
    for line in reversed(text.splitlines()):
        line = re.sub(r"^\[rank\d+\]:\s*", "", line.strip())   # torch's per-rank prefix of an uncaught error
        m = _EXC_LINE.match(line)
        if m and m.group(1) not in ("UncompletedJobError", "FailedJobError"):
            return line
    return None


def describe_failure(job, error: BaseException) -> list[str]:
    """What a user needs from a failed job instead of submitit's traceback: which rank ended how (the local
    controller's record; on SLURM srun's own `task N: Killed` lines) and each rank's own error line."""
    from submitit.core.utils import JobPaths

    from launcher.local_controller import exits_path

    folder = job.paths.folder
    lines = [f"job {job.job_id} failed:"]
    exits = exits_path(folder, job.job_id)
    if exits.is_file():
        for e in json.loads(exits.read_text()):
            if e["returncode"] not in (0, None):
                lines.append(f"  rank {e['rank']} (pid {e['pid']}) {e['how']}")
    for k in range(job.num_tasks):
        paths = JobPaths(folder, job.job_id, task_id=k)
        text = ""
        for f in (paths.stdout, paths.stderr):
            try:
                text += f.read_text(errors="replace")
            except OSError:
                pass
        for m in _SRUN_LINE.finditer(text):
            lines.append(f"  SLURM: task(s) {m.group(2)} on {m.group(1)}: {m.group(3).strip()}")
        err = last_error(text)
        if err:
            lines.append(f"  rank {k}: {err}")
    if len(lines) == 1:
        lines.append(f"  {last_error(str(error)) or str(error).strip().splitlines()[0]}")
    return lines


def print_result(result: dict | None) -> None:
    if not result:
        print("the job returned no result")
        return
    val = result["heldout"]
    print()
    print(f"held-out bits/token      : {val['bits_per_token']:.4f} (+- {val['stderr_bits_per_token']:.4f}, "
          f"{val['tokens']} tokens, K={val['eval_draws']})")
    print(f"held-out perplexity bound: {val['ppl_bound']:.2f}")
    if "unigram_ppl" in result:
        print(f"unigram perplexity       : {result['unigram_ppl']:.2f} (add-one unigram fit on train, over the whole held-out split)")
    if "sample" in result:
        calls = result.get("sample_network_calls")
        print(f"sample ({calls} network calls):")
        print("-" * 72)
        print(result["sample"])
        print("-" * 72)
    print(json.dumps({k: v for k, v in result.items() if k != "sample"}))


if __name__ == "__main__":
    sys.exit(main())
