"""Rank 0's logging sinks: TensorBoard always, Weights & Biases when `logging.wandb.mode` is online or offline.

The training job writes through one `RunLogger`, which has SummaryWriter's methods (add_scalar, add_text,
add_image, flush, close; anything else is SummaryWriter's own): every scalar goes to both sinks, text and
images to TensorBoard only. wandb gets one row per training step, holding the scalars TensorBoard got at
that step and `step` itself, the x axis of every metric (define_metric), so a resumed run that repeats the
steps a crashed job ran past its last checkpoint still plots against the training step.

wandb's files live in <run_dir>/wandb/ (wandb.init(dir=<run_dir>)); the run id is kept in
<run_dir>/wandb_run_id.txt, so resuming the run directory continues the same wandb run (resume="allow").
In offline mode each job writes its own <run_dir>/wandb/offline-run-*-<id>/ folder with that id; `wandb sync`
uploads them into the one run. The resolved config (config.yaml's sections plus what `auto` resolved to) is
the wandb run's config. wandb does not capture the console (the job's stdout is in submitit/ already).
"""
from __future__ import annotations

import secrets
import string
from pathlib import Path

WANDB_ID_FILE = "wandb_run_id.txt"


def start_wandb(run_dir: Path, cfg, extra_config: dict | None = None):
    """wandb.init for this run directory: the stored run id (a new one on the first start), files under run_dir."""
    wb = cfg.logging.wandb
    try:
        import wandb
    except ImportError:
        raise RuntimeError(f"logging.wandb.mode={wb.mode} needs the wandb package: pip install -e '.[eval]' "
                           "(or set logging.wandb.mode=disabled)") from None
    id_file = Path(run_dir) / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.write_text(run_id + "\n")
    try:
        run = wandb.init(project=wb.project, entity=wb.entity or None, name=wb.name or cfg.run.name,
                         group=wb.group or None, tags=list(wb.tags) or None, id=run_id, resume="allow",
                         dir=str(run_dir), mode=wb.mode, settings=wandb.Settings(console="off"))
        # a resumed run may change settings (optim.lr, ...): the config shows this job's values
        run.config.update({**cfg.to_dict(), **(extra_config or {})}, allow_val_change=True)
    except Exception as e:   # e.g. online without credentials: say which setting asked for wandb
        raise RuntimeError(f"logging.wandb.mode={wb.mode} (project {wb.project!r}): wandb.init failed: {e}; "
                           "log in (`wandb login`, WANDB_API_KEY) or use logging.wandb.mode=offline") from e
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


# metrics.jsonl key -> TensorBoard (and wandb) tag; keys without a tag go to metrics.jsonl only
SCALAR_TAGS = {
    "train_bits_per_token": "train/bits_per_token", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "skipped_steps": "train/skipped_steps", "tokens_per_s": "perf/tokens_per_s",
    "tflops_per_device": "perf/tflops_per_device", "peak_memory_gb": "perf/peak_memory_gb",
    "data_wait_s": "perf/data_wait_s", "mfu": "perf/mfu", "genmd4_w_min": "genmd4/w_min",
    "genmd4_w_max": "genmd4/w_max", "val_bits_per_token": "val/bits_per_token", "val_ppl_bound": "val/ppl_bound",
    "checkpoint_s": "time/checkpoint_s",
}


class Metrics:
    """The run's one way to report numbers: `log(step, record)` appends {"step": step, **record} to
    <run_dir>/metrics.jsonl and writes each key with a SCALAR_TAGS tag to TensorBoard (and wandb). Rank 0 writes;
    on other ranks (writer None, is_main False) it does nothing."""

    def __init__(self, run_dir: str | Path, writer, is_main: bool):
        self.path, self.writer, self.is_main = Path(run_dir) / "metrics.jsonl", writer, is_main

    def log(self, step: int, record: dict, to_file: bool = True) -> None:
        if not self.is_main:
            return
        if to_file:
            import json

            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key in SCALAR_TAGS:
                    self.writer.add_scalar(SCALAR_TAGS[key], value, step)


    def truncate(self, step: int) -> int:
        """Keep only the records up to `step` in metrics.jsonl (on resume: the steps a crashed job ran past its
        last checkpoint are run again and must not appear twice). Returns the number of records dropped."""
        if not self.is_main or not self.path.is_file():
            return 0
        import json
        import os

        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:        # a line torn by the crash
                dropped += 1
                continue
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, self.path)
        return dropped


class RunLogger:
    """TensorBoard SummaryWriter at <run_dir>/tensorboard, plus the wandb run when the config asks for one."""

    def __init__(self, run_dir: str | Path, cfg, extra_config: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = start_wandb(self.run_dir, cfg, extra_config) if cfg.logging.wandb.mode != "disabled" else None
        self._row: dict[str, float] = {}
        self._row_step: int | None = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            if self._row_step is not None and step != self._row_step:
                self._log_row()
            self._row_step = step
            self._row[tag] = float(value)

    def _log_row(self) -> None:
        if self._row:
            self.wandb.log({"step": self._row_step, **self._row})
        self._row, self._row_step = {}, None

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.tb.add_text(tag, text, step)

    def add_image(self, tag: str, image, step: int, **kwargs) -> None:
        self.tb.add_image(tag, image, step, **kwargs)

    def flush(self) -> None:
        self.tb.flush()
        if self.wandb is not None:
            self._log_row()

    def close(self) -> None:
        """Flush both sinks and end the wandb run (also before a preempted job exits)."""
        self.flush()
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __getattr__(self, name: str):
        if name == "tb":             # not set yet: SummaryWriter failed in __init__
            raise AttributeError(name)
        return getattr(self.tb, name)
