"""Layouts and diffusion kinds through the real CLI (launcher/submit.py --local N): the loss curve and the
gradient norms of a few optimizer steps are the same function of the data whatever the layout, because
the noise of every sample is keyed by (seed, step, global sample index). fp32 so that only the reduction
order differs between layouts."""
import json

import pytest

from test_train_e2e import data_dir, submit  # noqa: F401  (data_dir is a fixture)

STEPS = ["optim.train_steps=4", "parallel.precision=fp32", "logging.eval_batches=0"]   # all held-out rows


def curves(run_dir):
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: (r["train_bits_per_token"], r["grad_norm"]) for r in recs if "train_bits_per_token" in r}
    val = [r["val_bits_per_token"] for r in recs if "val_bits_per_token" in r]
    return train, val


def assert_same(a, b, rtol=1e-4):
    (ta, va), (tb, vb) = a, b
    assert sorted(ta) == sorted(tb) == [1, 2, 3, 4]
    for s in ta:
        for x, y in zip(ta[s], tb[s]):
            assert abs(x - y) <= rtol * abs(y), (s, ta[s], tb[s])
    assert len(va) == len(vb) == 1 and abs(va[0] - vb[0]) <= rtol * abs(vb[0])


def run(tmp_path, data_dir, name, procs, *overrides):
    submit(tmp_path, data_dir, f"run.name={name}", *STEPS, *overrides, procs=procs)
    return curves(tmp_path / "runs" / name)


# one single-process reference per diffusion kind, shared by the layout tests of that kind: 4 layers (2 per
# pipeline stage, 1 per virtual chunk) and 2 micro-batches per step, so that every layout below splits it
GAS = ["model.num_layers=4", "optim.micro_batch_size=4", "optim.global_batch_size=8"]
SAMPLE = ["logging.sample_at_end=true", "logging.num_samples=3", "sampler.steps=4"]   # 3 rows: not a multiple of PP
PRIME = ["diffusion.kind=prime", "diffusion.prime_l=2", "model.num_layers=2", "optim.micro_batch_size=4",
         "optim.global_batch_size=8", "model.time_conditioning=adaln"]


@pytest.fixture(scope="module")
def md4_reference(tmp_path_factory, data_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("md4_ref")
    return {"tmp": tmp, "curves": run(tmp, data_dir, "single_gas", 1, *GAS, *SAMPLE)}


@pytest.fixture(scope="module")
def prime_reference(tmp_path_factory, data_dir):  # noqa: F811
    return run(tmp_path_factory.mktemp("prime_ref"), data_dir, "prime_single_gas", 1, *PRIME)


@pytest.mark.slow
def test_md4_layouts_match_single_process(tmp_path, data_dir, md4_reference):  # noqa: F811
    ref = md4_reference["curves"]
    assert_same(run(tmp_path, data_dir, "tp2", 2, *GAS, "parallel.tensor_parallel=2"), ref)
    assert_same(run(tmp_path, data_dir, "tp2_sp", 2, *GAS, "parallel.tensor_parallel=2",
                    "parallel.sequence_parallel=true"), ref)
    assert_same(run(tmp_path, data_dir, "dp2_zero1", 2, *GAS, "parallel.zero_stage=1"), ref)
    assert_same(run(tmp_path, data_dir, "dp2_zero2", 2, *GAS, "parallel.zero_stage=2"), ref)

    # ZeRO-3, stopped after 2 steps and resumed from its partitioned checkpoint: the same curve; its export
    # (DeepSpeed's zero_to_fp32 reassembling the partitions) evaluates to the training-time bound
    z3 = ["run.name=dp2_zero3", "parallel.zero_stage=3", "checkpoint.interval=2", *GAS]
    submit(tmp_path, data_dir, *STEPS, *z3, "optim.train_steps=2", procs=2)
    assert sorted(curves(tmp_path / "runs" / "dp2_zero3")[0]) == [1, 2]
    submit(tmp_path, data_dir, *STEPS, *z3, procs=2)
    train, val = curves(tmp_path / "runs" / "dp2_zero3")
    assert_same((train, val[-1:]), ref)
    from test_export_eval import cli, last_json
    from test_train_e2e import REPO

    cli(REPO / "launcher" / "export.py", tmp_path / "runs" / "dp2_zero3", "--out", tmp_path / "z3_export")
    res = last_json(cli(REPO / "launcher" / "evaluate.py", tmp_path / "z3_export", "--data", data_dir).stdout)
    assert res["bits_per_token"] == pytest.approx(val[-1], rel=1e-4)


@pytest.mark.slow
def test_prime_tp2_matches_single_process(tmp_path, data_dir, prime_reference):  # noqa: F811
    """Prime's sub-token embedding and digit logits split over TP (the vocab-parallel reductions), adaLN-zero."""
    assert_same(run(tmp_path, data_dir, "prime_tp2", 2, *PRIME, "parallel.tensor_parallel=2"), prime_reference)


@pytest.mark.slow
def test_genmd4_trains_its_schedule_data_parallel(tmp_path, data_dir):
    kind = ["diffusion.kind=genmd4", "optim.lr=1e-2"]
    dp2 = run(tmp_path, data_dir, "genmd4_dp2", 2, *kind)
    assert_same(run(tmp_path, data_dir, "genmd4_single", 1, *kind), dp2)
    recs = [json.loads(l) for l in (tmp_path / "runs" / "genmd4_dp2" / "metrics.jsonl").read_text().splitlines()]
    w = [(r["genmd4_w_min"], r["genmd4_w_max"]) for r in recs if "genmd4_w_min" in r]
    assert w and w[-1][0] < 1.0 < w[-1][1]      # w starts at 1 everywhere and is learned


@pytest.mark.slow
def test_md4_pipeline_layouts_match_single_process(tmp_path, data_dir, md4_reference):  # noqa: F811
    """PP=2 (megatron-core's 1F1B schedule under DeepSpeed ZeRO-1, two micro-batches per step), PP=2 x VPP=2
    (interleaved 1F1B over two model chunks per rank: layers 0 and 2 on rank 0, 1 and 3 on rank 1; its held-out
    bound and samples run forward-only through the same schedule) and TP=2 x PP=2 with sequence parallelism
    (stages exchange [s / TP, b, h]) against one process with the same weights (CPU initialisation is
    layout-independent). TP=2 x PP=2 without SP: test_export_eval."""
    ref = md4_reference["curves"]
    assert_same(run(tmp_path, data_dir, "pp2", 2, *GAS, "parallel.pipeline_parallel=2"), ref)
    assert_same(run(tmp_path, data_dir, "pp2_vpp2", 2, *GAS, *SAMPLE, "parallel.pipeline_parallel=2",
                    "parallel.virtual_pipeline=2"), ref)
    drawn = [json.loads((root / "runs" / name / "result.json").read_text())["sample"]
             for root, name in ((md4_reference["tmp"], "single_gas"), (tmp_path, "pp2_vpp2"))]
    assert drawn[0] == drawn[1] and drawn[0]       # the same logits, so the same draws
    assert_same(run(tmp_path, data_dir, "tp2_pp2_sp", 4, *GAS, "parallel.pipeline_parallel=2",
                    "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"), ref)


@pytest.mark.slow
def test_prime_pipeline_matches_single_process(tmp_path, data_dir, prime_reference):  # noqa: F811
    """Prime with adaLN-zero time conditioning: every stage gets t and its layers' modulation maps."""
    assert_same(run(tmp_path, data_dir, "prime_pp2", 2, *PRIME, "parallel.pipeline_parallel=2"), prime_reference)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
    """Real images: Fashion-MNIST from Debian's dataset-fashion-mnist (28x28x1, uint8 HWC rows)."""
    import subprocess

    from test_train_e2e import PY, REPO, env

    out = tmp_path_factory.mktemp("data") / "fmnist"
    subprocess.run([PY, "-m", "data_pipeline.prepare", "--format", "fashion-mnist", "--out", str(out), "--quiet",
                    "--cache-dir", str(REPO / "data" / "cache")], check=True, cwd=REPO, env=env(), capture_output=True)
    return out


IMAGE = ["model.seq_len=784", "model.vocab_size=256", "model.image_shape=[28, 28, 1]", "data.tokenizer=pixels",
         "logging.eval_batches=2", "diffusion.schedule=cosine"]


@pytest.mark.slow
def test_image_denoiser_tp2_matches_single_process_and_draws_a_grid(tmp_path, fmnist_dir):
    ref = run(tmp_path, fmnist_dir, "img_single", 1, *IMAGE)
    assert_same(run(tmp_path, fmnist_dir, "img_tp2", 2, *IMAGE, "parallel.tensor_parallel=2",
                    "logging.sample_at_end=true", "logging.num_samples=4", "sampler.steps=4"), ref)
    grid = tmp_path / "runs" / "img_tp2" / "samples" / "step_00000004.png"
    from PIL import Image

    with Image.open(grid) as im:
        assert im.size == (2 + 2 * 30, 2 + 2 * 30)    # 2 x 2 images of 28 px, 2 px gaps
    # the TP=2 run exported evaluates (bits/dim) single-process to the training-time number, and samples a grid
    from test_export_eval import cli, last_json
    from test_train_e2e import REPO

    run_dir = tmp_path / "runs" / "img_tp2"
    want = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_bits_per_token" in l][-1]
    cli(REPO / "launcher" / "export.py", run_dir, "--out", tmp_path / "img_export")
    res = last_json(cli(REPO / "launcher" / "evaluate.py", tmp_path / "img_export", "--data", fmnist_dir,
                        "--limit-rows", "8", "--no-progress").stdout)      # eval_batches=2 x micro-batch 4
    assert res["bits_per_dim"] == pytest.approx(want["val_bits_per_token"], rel=1e-4)
    rec = last_json(cli(REPO / "launcher" / "sample.py", tmp_path / "img_export", "--num", "4", "--steps", "4",
                        "--out", tmp_path / "s.png").stdout)
    with Image.open(rec["png"]) as im:
        assert im.size == (62, 62)
