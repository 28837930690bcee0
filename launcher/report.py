#!/usr/bin/env python
"""A run's TensorBoard logs -> loss-curve PNG + short markdown summary.

    python launcher/report.py runs/md4_tiny_demo                 # writes runs/md4_tiny_demo/report/
    python launcher/report.py runs/md4_tiny_demo --out /tmp/rep

loss_curve.png: train and held-out bits/token against the step (TensorBoard scalars train/bits_per_token,
val/bits_per_token, read with tensorboard's EventAccumulator). report.md: steps, tokens seen, final train
and held-out bounds (and the perplexity bound), the model and diffusion, where the numbers come from.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {}
        for e in acc.Scalars(tag):       # a resumed run may log a step twice: keep the last value
            by_step[e.step] = e.value
        out[tag] = sorted(by_step.items())
    return out


def plot(scalars: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for tag, label, style in (("train/bits_per_token", "train (bound estimate per step)", "-"),
                              ("val/bits_per_token", "held-out bound", "o-")):
        pts = scalars.get(tag) or []
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("bits / token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary(run_dir: Path, scalars: dict) -> str:
    def last(tag):
        pts = scalars.get(tag) or []
        return pts[-1] if pts else (None, None)

    cfg = {}
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        import yaml

        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    result = {}
    if (run_dir / "result.json").is_file():
        result = json.loads((run_dir / "result.json").read_text())
    tokens = result.get("tokens_seen")
    if tokens is None and (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            tokens = rec.get("tokens_seen", tokens)
    train_step, train = last("train/bits_per_token")
    val_step, val = last("val/bits_per_token")
    _, ppl = last("val/ppl_bound")
    steps = max([pts[-1][0] for pts in scalars.values() if pts] or [0])
    m, d = cfg.get("model", {}), cfg.get("diffusion", {})
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"    # noqa: E731
    lines = [f"# Run report: {run_dir.name}", "",
             f"- steps: {steps}",
             f"- tokens seen: {tokens if tokens is not None else 'n/a'}",
             f"- final train bits/token: {fmt(train)} (step {train_step})",
             f"- final held-out bound: {fmt(val)} bits/token (step {val_step})"
             + (f", perplexity bound {ppl:.2f}" if ppl is not None and math.isfinite(ppl) else ""),
             f"- model: {m.get('num_layers')} layers x {m.get('hidden_size')} hidden, seq_len {m.get('seq_len')}, "
             f"vocab {m.get('vocab_size')}",
             f"- diffusion: {d.get('kind')} ({d.get('schedule')} schedule)",
             f"- code version: {(run_dir / 'code_version.txt').read_text().strip() if (run_dir / 'code_version.txt').is_file() else 'unknown'}",
             "", "![loss curve](loss_curve.png)", "",
             "Numbers from the run's TensorBoard scalars train/bits_per_token and val/bits_per_token.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default <run_dir>/report)")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    tb = run_dir / "tensorboard"
    if not tb.is_dir() or not any(tb.glob("events.out.tfevents.*")):
        print(f"error: {tb}: no TensorBoard event files", file=sys.stderr)
        return 2
    scalars = read_scalars(tb)
    if not scalars.get("train/bits_per_token"):
        print(f"error: {tb}: no train/bits_per_token scalars", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    png = plot(scalars, out / "loss_curve.png", run_dir.name)
    md = out / "report.md"
    md.write_text(summary(run_dir, scalars))
    print(json.dumps({"png": str(png), "markdown": str(md)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
