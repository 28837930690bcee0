"""Capacity plan against measured memory, side by side in one run (launcher/plan.py's terms on CPU).

    .venv/bin/python tests/benchmarks/bench_memory.py                      # the built-in small configs
    .venv/bin/python tests/benchmarks/bench_memory.py --case vocab --steps 3

Each case runs launcher/train.py's setup and train_step in one process (world size 1, fp32 on CPU, whatever the CPU) in a
fresh subprocess and measures:
  - activations: the bytes autograd saves for backward during one micro-batch's forward and loss, counted
    with torch.autograd.graph.saved_tensors_hooks (each storage once, parameters excluded), at t close to 1
    so that every position is masked (the plan's worst micro-batch); plan: activations + vocabulary term,
  - model states: the growth of the process's resident memory over DeepSpeed's engine set-up and the first
    optimizer step (weights, gradients, master partition, Adam moments) minus the activations of that step;
    plan: the ZeRO model-state terms,
  - peak: the process's peak resident memory over its resident memory before the model was built, after
    a few steps; plan: the total.
Prints plan / measured for each (the target is within 25%), and DeepSpeed's own model-state estimators
(estimate_zero2/zero3_model_states_mem_needs) beside the plan's formulas evaluated with 2-byte weights,
which is what those estimators assume (this engine keeps fp32 weights under autocast: 4 bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE = ["model.num_layers=4", "model.num_attention_heads=4", "optim.train_steps=1000", "parallel.precision=fp32",
        "logging.sample_at_end=false", "data.num_workers=0", "optim.ema_decay=0.0", "model.dropout=0.0"]
# almost no model: what a training process holds beyond the plan's terms (libraries' allocations, gloo,
# the data loader, malloc arenas) is measured with it and taken off the resident-memory figures
MINIMAL = [*BASE, "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_len=32",
           "model.vocab_size=64", "optim.micro_batch_size=1", "optim.global_batch_size=1", "data.tokenizer=bytes"]
CASES = {
    "minimal": MINIMAL,
    # the vocabulary projection and the embedding dominate (GPT-2 vocabulary)
    "vocab": [*BASE, "model.hidden_size=256", "model.seq_len=128", "optim.micro_batch_size=8",
              "optim.global_batch_size=8"],
    # the layers' activations dominate (a byte-level vocabulary, longer sequences)
    "layers": [*BASE, "model.hidden_size=256", "model.seq_len=512", "model.vocab_size=256",
               "optim.micro_batch_size=8", "optim.global_batch_size=8", "data.tokenizer=bytes"],
    # the same under ZeRO-2 and with adaLN-zero time conditioning
    "adaln_zero2": [*BASE, "model.hidden_size=256", "model.seq_len=256", "model.vocab_size=256",
                    "optim.micro_batch_size=8", "optim.global_batch_size=8", "data.tokenizer=bytes",
                    "model.time_conditioning=adaln", "parallel.zero_stage=2"],
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(overrides: list[str], steps: int) -> dict:
    """In this process: the training job at world size 1 on random rows."""
    import torch

    from bench_step import synthetic_data
    from launcher.config import load_config, save_config
    from launcher.distributed import free_port

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    cfg = load_config(REPO / "configs" / "md4_tiny.yaml", [*overrides, f"run.output_dir={tmp}", "run.name=mem"])
    cfg.data.path = str(synthetic_data(cfg, (steps + 2) * cfg.optim.global_batch_size + 8, tmp / "data"))
    save_config(cfg, tmp / "config.yaml")
    from launcher.train import setup, train_step
    from model.diffusion.noise import step_noise

    import deepspeed  # noqa: F401  (the libraries' own memory is not the plan's: import them first)
    import megatron.core.pipeline_parallel  # noqa: F401
    import streaming  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401

    import data_pipeline.loader  # noqa: F401
    import model.denoiser  # noqa: F401

    base = rss_bytes()
    trainer = setup(cfg, tmp)
    after_setup = rss_bytes()
    batches = iter(trainer.train_loader)

    # activations of one micro-batch at t ~ 1: every position masked
    x0 = next(batches)
    n = cfg.model.seq_len
    _, noise = step_noise(cfg.run.seed, 0, list(range(x0.shape[0])), cfg.optim.global_batch_size, n,
                          streams=trainer.objective.noise_streams(train=True))
    u = torch.full((x0.shape[0],), 1.0 - 1e-7, dtype=torch.float64)
    params = {p.untyped_storage().data_ptr() for p in trainer.engine.module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = trainer.objective.loss(trainer.forward, x0, u, noise)
    saved = sum(seen.values())
    del loss
    for _ in range(steps):
        train_step(trainer, batches)
        trainer.step += 1
    after_steps = rss_bytes()
    return {"rss_base": base, "rss_after_setup": after_setup, "rss_after_steps": after_steps,
            "peak": peak_rss_bytes() - base, "saved": saved}


def plan_terms(overrides: list[str]) -> dict:
    from launcher.config import load_config
    from launcher.plan import activation_bytes_per_layer, count_params, model_state_bytes, vocab_projection_bytes

    cfg = load_config(REPO / "configs" / "md4_tiny.yaml", overrides)
    mb = cfg.optim.micro_batch_size
    pc = count_params(cfg)
    states = sum(model_state_bytes(pc.per_device, 1, cfg.parallel.zero_stage, 4, largest_layer=pc.largest_layer)
                 .values())
    act = cfg.model.num_layers * activation_bytes_per_layer(cfg, mb, 4)
    vocab = vocab_projection_bytes(cfg, mb, 4)
    saved = act + vocab_projection_bytes(cfg, mb, 4, transient=False)
    return {"states": states, "activations": saved, "total": states + act + vocab, "params": pc.total,
            "largest_layer": pc.largest_layer}


def deepspeed_estimators(params: int, largest: int) -> list[tuple[str, float, float]]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from launcher.plan import model_state_bytes

    rows = []
    for gpus, nodes in ((1, 1), (8, 1), (8, 16)):
        n = gpus * nodes
        _, z2 = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)
        z3 = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=False,
                                                      cpu_offload_params=False)[1]
        ours2 = sum(model_state_bytes(params, n, 2, 2, 2).values())
        ours3 = sum(model_state_bytes(params, n, 3, 2, 2, largest_layer=largest).values())
        rows += [(f"ZeRO-2 on {n} GPU(s)", ours2, z2), (f"ZeRO-3 on {n} GPU(s)", ours3, z3)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:       # one measurement in a fresh process (peak resident memory is per process)
        print("RESULT " + json.dumps(measure(CASES[args.child], args.steps)))
        return
    os.environ.setdefault("MDIFF_NATIVE_BF16", "0")
    MiB = 2 ** 20
    print(f"{'case':12s} {'term':14s} {'plan MiB':>10s} {'measured MiB':>13s} {'plan/measured':>14s}")
    ratios = []

    def run(case):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--steps", str(args.steps)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{case}: the measurement failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            sys.exit(1)
        return json.loads(line[len("RESULT "):])

    low, low_plan = run("minimal"), plan_terms(MINIMAL)
    grow0 = low["rss_after_steps"] - low["rss_base"] - low_plan["states"]
    peak0 = low["peak"] - low_plan["total"]
    print(f"(a process with almost no model holds {grow0 / MiB:.0f} MiB beyond its plan after set-up and steps, "
          f"{peak0 / MiB:.0f} MiB at its peak: taken off the resident figures below)")
    for case in args.case or sorted(k for k in CASES if k != "minimal"):
        got = run(case)
        plan = plan_terms(CASES[case])
        states_measured = got["rss_after_steps"] - got["rss_base"] - grow0
        for term, p, m in (("activations", plan["activations"], got["saved"]),
                           ("model states", plan["states"], states_measured),
                           ("peak total", plan["total"], got["peak"] - peak0)):
            ratios.append(p / m)
            print(f"{case:12s} {term:14s} {p / MiB:10.1f} {m / MiB:13.1f} {p / m:14.2f}")
        if case == "vocab":
            est = (plan["params"], plan["largest_layer"])
    print()
    print("DeepSpeed's estimators against the plan's model-state formulas with 2-byte weights and gradients")
    print(f"(the {est[0] / 1e6:.1f}M parameters of case 'vocab'):")
    print(f"{'':22s} {'plan MiB':>10s} {'DeepSpeed MiB':>14s} {'ratio':>7s}")
    for name, ours, theirs in deepspeed_estimators(*est):
        print(f"{name:22s} {ours / MiB:10.1f} {theirs / MiB:14.1f} {ours / theirs:7.3f}")
    print()
    print(f"plan / measured: min {min(ratios):.2f}, max {max(ratios):.2f} (target: within 0.75 .. 1.25)")


if __name__ == "__main__":
    main()
