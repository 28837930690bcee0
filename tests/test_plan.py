"""The capacity plan (launcher/plan.py): parameters against the built megatron-core model at every layout
it splits, model states against DeepSpeed's own estimators, the out-of-memory warning, the CLI."""
import subprocess
import sys

import pytest

from dist_utils import run_distributed
from launcher.config import config_from_dict
from launcher.plan import count_params, main as plan_main, model_state_bytes, plan_for, render_plan

REPO_CONFIG = {"model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_len": 32,
                         "vocab_size": 300, "time_conditioning": "adaln"},
               "optim": {"micro_batch_size": 2, "global_batch_size": 4}}


def _count_worker(rank, world_size, cfg):
    from launcher.parallelize import build_pipeline_stage, init_model_parallel

    p = cfg.parallel
    init_model_parallel(tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel, seed=1)
    stage = build_pipeline_stage(cfg.model, diffusion_cfg=cfg.diffusion, sequence_parallel=p.sequence_parallel)
    return sum(t.numel() for t in stage.parameters())


@pytest.mark.parametrize("kind,tp,pp", [("md4", 1, 1), ("md4", 2, 1), ("md4", 1, 2), ("prime", 2, 1),
                                        ("genmd4", 1, 1)])
def test_parameter_count_is_the_built_models(kind, tp, pp):
    data = {**REPO_CONFIG, "diffusion": {"kind": kind},
            "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp}}
    cfg = config_from_dict(data)
    counts = run_distributed(_count_worker, tp * pp, (cfg,))
    pc = count_params(cfg)
    assert pc.per_device == max(counts)
    if tp == 1:
        assert pc.total == sum(counts)


@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 16)])
def test_model_states_with_2_byte_weights_are_deepspeeds_estimates(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest = 176_928_768, 38_633_472
    n = gpus * nodes
    z2 = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=False,
                                               cpu_offload_params=False)[1]
    assert sum(model_state_bytes(params, n, 2, 2, 2).values()) == pytest.approx(z2, abs=1)
    assert sum(model_state_bytes(params, n, 3, 2, 2, largest_layer=largest).values()) == pytest.approx(z3, abs=1)
    # this engine: fp32 weights and gradients (autocast computes in bf16), ZeRO-1 keeps whole gradients
    assert sum(model_state_bytes(params, n, 1).values()) == 8 * params + 16 * params / n


def test_recompute_and_sequence_parallelism_shrink_the_activations():
    base = {**REPO_CONFIG, "parallel": {"tensor_parallel": 2}}
    plan = plan_for(config_from_dict(base), 8, gpus_per_node=8)
    acts = plan.activations_by_recompute
    assert acts["full"] < acts["selective"] < acts["none"]
    sp = plan_for(config_from_dict({**base, "parallel": {"tensor_parallel": 2, "sequence_parallel": True}}), 8,
                  gpus_per_node=8)
    assert sp.activations_by_recompute["none"] < acts["none"]


def test_a_plan_beyond_the_devices_memory_warns_with_what_to_change():
    cfg = config_from_dict({**REPO_CONFIG, "model": {**REPO_CONFIG["model"], "hidden_size": 4096, "num_layers": 48,
                                                     "num_attention_heads": 32, "seq_len": 2048,
                                                     "vocab_size": 50257},
                            "optim": {"micro_batch_size": 16, "global_batch_size": 128}})
    plan = plan_for(cfg, 8, gpus_per_node=8, gpu="A10-24GB")
    text = render_plan(plan)
    assert "WARNING: the plan needs" in text and "A10-24GB has 22.0 GiB usable" in text
    assert "model.recompute=full" in text and "parallel.zero_stage=3" in text


def test_plan_cli(capsys):
    assert plan_main(["configs/md4_medium.yaml", "--nodes", "16"]) == 0
    out = capsys.readouterr().out
    assert "capacity plan: 128 device(s) of H100-80GB" in out and "tokens/day" in out
    assert "micro-batch 8 x gradient accumulation 1 x data-parallel 64" in out
    assert plan_main(["configs/md4_tiny.yaml", "--nodes", "16"]) == 2
    assert "it splits at 1, 2 nodes of 8 tasks each" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "launcher/plan.py", "configs/md4_tiny.yaml", "--gpu", "TPU"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown GPU" in r.stderr
