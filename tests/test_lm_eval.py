"""lm-evaluation-harness through the ELBO (launcher/lm_eval_model.py, model `mdiff`), fully offline.

A tiny MD4 (2 x 32, GPT-2 BPE, seq_len 32) is trained for a few dozen steps in-process on real text (State of
the Union addresses, the suite's offline data) and written with launcher/export.write_export; task YAMLs
written here over local JSONL files (a LAMBADA-style last-word task, a multiple-choice task, a rolling
perplexity task over prepared rows, a generate_until task) run through lm-eval's own simple_evaluate and
through `python -m launcher.lm_eval`. The oracle check uses the exact-conditional denoiser of
model/diffusion/oracle.py on a small known joint."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # nothing may come from the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
SEQ = 32
TRAIN_STEPS = 30


def offline_env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TIKTOKEN_CACHE_DIR="")
    e.pop("PYTHONPATH", None)
    return e


# ----- fixtures: data, a briefly trained export, task files -----------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from data_pipeline.loader import open_rows
    from data_pipeline.prepare import prepare
    from data_pipeline.sources import sotu_documents
    from launcher.config import config_from_dict
    from launcher.export import write_export
    from model.objectives import make_objective
    from model.plain import PlainDenoiser

    tmp = tmp_path_factory.mktemp("lm_eval")
    docs = sotu_documents(REPO / "data" / "cache")
    data = tmp / "data"
    prepare(docs[:8], data, seq_len=SEQ, val_fraction=0.25, split_seed=0, workers=1, writer="webdataset")
    cfg = config_from_dict({
        "run": {"name": "lm_eval_tiny", "output_dir": str(tmp / "runs"), "seed": 1234},
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "seq_len": SEQ},
        "data": {"path": str(data)},
        "sampler": {"steps": 12, "top_p": 0.9}})
    torch.manual_seed(0)
    model = PlainDenoiser.from_config(cfg.model, cfg.diffusion)
    objective = make_objective(cfg, model)
    train = open_rows(data, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, train.num_rows, (8,), generator=g).tolist()
        x0 = train.__getitems__(idx)
        u = torch.remainder(torch.rand((), generator=g, dtype=torch.float64) + torch.arange(8) / 8, 1.0)
        noise = torch.rand(8, 1, SEQ, generator=g, dtype=torch.float64)
        loss, _ = objective.loss(model, x0, u, noise)
        opt.zero_grad()
        (loss.mean() / SEQ).backward()
        opt.step()
    export = write_export(tmp / "export", cfg, {k: v.detach() for k, v in model.named_parameters()},
                          {"weights": "raw", "step": TRAIN_STEPS})
    tasks = write_tasks(tmp, data)
    return {"tmp": tmp, "data": data, "export": export, "tasks": tasks}


def held_out_sentences(data, n: int) -> list[str]:
    """Real sentences of 8..40 words from the held-out rows (decoded)."""
    from data_pipeline.loader import open_rows
    from data_pipeline.tokenizer import get_encoding

    rows = open_rows(data, "val")
    text = get_encoding("gpt2").decode(rows.__getitems__(list(range(min(rows.num_rows, 200)))).reshape(-1).tolist())
    out = []
    for s in text.replace("\n", " ").split(". "):
        words = s.split()
        if 8 <= len(words) <= 40 and all(w.isascii() for w in words) and "<|endoftext|>" not in s:
            out.append(" ".join(words))
        if len(out) == n:
            break
    assert len(out) == n, f"only {len(out)} usable held-out sentences"
    return out


def rolling_text(data, rows: int) -> tuple[str, list[int]]:
    """The decoded text of the first `rows` held-out rows; its GPT-2 encoding is exactly those rows."""
    from data_pipeline.loader import open_rows
    from launcher.sample import Codec

    ids = open_rows(data, "val").__getitems__(list(range(rows))).reshape(-1).tolist()
    codec = Codec("gpt2")
    text = codec.decode(ids)
    assert codec.encode(text) == ids, "the held-out rows do not survive decode -> encode; pick other rows"
    return text, ids


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_tasks(tmp: Path, data: Path) -> Path:
    """Task YAMLs over local JSONL files (lm-eval's `json` dataset builder, no hub)."""
    tasks = tmp / "tasks"
    tasks.mkdir()
    cache = tmp / "hf_datasets"
    sents = held_out_sentences(data, 12)
    write_jsonl(tasks / "lambada.jsonl", [{"text": s} for s in sents[:8]])
    mc = []
    for k, s in enumerate(sents[:8]):
        words = s.split()
        wrong = [sents[(k + j) % len(sents)].split()[-1] for j in (3, 5, 7)]
        choices = [" " + words[-1]] + [" " + w for w in wrong]
        mc.append({"question": " ".join(words[:-1]), "choices": choices, "label": 0})
    write_jsonl(tasks / "mc.jsonl", mc)
    text, _ = rolling_text(data, 4)
    write_jsonl(tasks / "rolling.jsonl", [{"text": text}])
    write_jsonl(tasks / "gen.jsonl", [{"question": s.rsplit(" ", 3)[0], "answer": " " + s.rsplit(" ", 3)[1]}
                                      for s in sents[8:11]])

    def task(name, jsonl, body):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / jsonl}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")

    task("mdiff_lambada_mini", "lambada.jsonl", """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    task("mdiff_mc_mini", "mc.jsonl", """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    task("mdiff_rolling_mini", "rolling.jsonl", """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    task("mdiff_gen_mini", "gen.jsonl", """output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return tasks


@pytest.fixture(scope="module")
def lm(world):
    from launcher.lm_eval_model import MDiffLM

    return MDiffLM(path=str(world["export"]), draws=2, batch_size=8, seed=7)


def instance(kind: str, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# ----- the tasks through lm-eval's own evaluator -------------------------------------------------------------

def test_tasks_run_through_simple_evaluate_and_rolling_equals_evaluate_py(world, lm):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from launcher.evaluate import evaluate

    res = simple_evaluate(model=lm, tasks=["mdiff_lambada_mini", "mdiff_mc_mini", "mdiff_rolling_mini",
                                           "mdiff_gen_mini"],
                          task_manager=TaskManager(include_path=str(world["tasks"]), include_defaults=False), log_samples=True,
                          bootstrap_iters=0)
    r = res["results"]
    lam = r["mdiff_lambada_mini"]
    # perplexity of the last word from the bound: exp(mean bound) >= 1, finite; accuracy in [0, 1]
    assert math.isfinite(lam["perplexity,none"]) and lam["perplexity,none"] > 1.0, lam
    assert 0.0 <= lam["acc,none"] <= 1.0, lam
    mc = r["mdiff_mc_mini"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0, mc
    assert len(res["samples"]["mdiff_mc_mini"]) == 8 and len(res["samples"]["mdiff_lambada_mini"]) == 8
    for s in res["samples"]["mdiff_lambada_mini"] + res["samples"]["mdiff_mc_mini"]:
        for ll, greedy in s["resps"][0] if isinstance(s["resps"][0][0], (list, tuple)) else s["resps"]:
            assert math.isfinite(ll) and ll < 0.0 and isinstance(greedy, bool), s["resps"]
    gen = r["mdiff_gen_mini"]
    assert 0.0 <= gen["exact_match,none"] <= 1.0, gen
    for s in res["samples"]["mdiff_gen_mini"]:
        assert "." not in s["filtered_resps"][0], s["filtered_resps"]        # the stop string was honoured

    # rolling: the text is 4 prepared held-out rows, so its windows are those rows, and the bound per token
    # is evaluate.py's for the same rows, draws and seed
    roll = r["mdiff_rolling_mini"]
    assert all(math.isfinite(roll[k]) and roll[k] > 0 for k in
               ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")), roll
    (sample,) = res["samples"]["mdiff_rolling_mini"]
    ll = sample["resps"][0][0]
    ll = ll[0] if isinstance(ll, (list, tuple)) else ll
    model, cfg = lm.model, lm.cfg
    ref = evaluate(model, cfg, world["data"], "val", draws=2, limit_rows=4, seed=7, batch_size=8)
    assert ref["tokens"] == 4 * SEQ
    nats_per_token = ref["bits_per_token"] * math.log(2.0)
    assert -ll / (4 * SEQ) == pytest.approx(nats_per_token, rel=1e-6, abs=1e-9), (ll, ref)


def test_rolling_bound_equals_evaluate_py_at_another_seed_and_draws(world):
    from launcher.evaluate import evaluate
    from launcher.lm_eval_model import MDiffLM

    lm3 = MDiffLM(path=str(world["export"]), draws=3, seed=99)
    text, ids = rolling_text(world["data"], 3)
    (ll,) = lm3.loglikelihood_rolling([instance("loglikelihood_rolling", text)])
    ref = evaluate(lm3.model, lm3.cfg, world["data"], "val", draws=3, limit_rows=3, seed=99)
    assert -ll / len(ids) == pytest.approx(ref["bits_per_token"] * math.log(2.0), rel=1e-6)
    # the default seed is the run's, as in evaluate.py
    lm_default = MDiffLM(path=str(world["export"]))
    assert lm_default.seed == lm_default.cfg.run.seed == 1234 and lm_default.draws == 1


def test_cli_module_runs_lm_eval_with_mdiff(world):
    out = subprocess.run([PY, "-m", "launcher.lm_eval", "--model", "mdiff", "--model_args",
                          f"path={world['export']},draws=1,batch_size=4", "--tasks", "mdiff_lambada_mini",
                          "--include_path", str(world["tasks"]), "--limit", "3"],
                         cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"exit {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert "mdiff_lambada_mini" in out.stdout and "perplexity" in out.stdout, out.stdout[-3000:]


def test_launcher_lm_eval_file_does_not_shadow_the_package():
    # a process started as `python launcher/<x>.py` has launcher/ first on sys.path
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import lm_eval, lm_eval.api.registry; "
            "print(lm_eval.__file__)")
    out = subprocess.run([PY, "-c", code, str(REPO / "launcher")], cwd=REPO, env=offline_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "site-packages" in out.stdout and "launcher" not in out.stdout, out.stdout


# ----- loglikelihood details ----------------------------------------------------------------------------

def test_windows_keep_the_continuation_and_the_most_recent_context():
    from launcher.lm_eval_model import windows

    assert windows([1, 2, 3], [4, 5], 8) == [([1, 2, 3, 4, 5], 3)]
    assert windows(list(range(10)), [10, 11, 12], 5) == [([8, 9, 10, 11, 12], 2)]
    # a continuation longer than seq_len: pieces of seq_len, each given what fits before it
    assert windows([0], list(range(1, 8)), 3) == [([1, 2, 3], 0), ([4, 5, 6], 0), ([5, 6, 7], 2)]
    assert windows([], list(range(6)), 3) == [([0, 1, 2], 0), ([3, 4, 5], 0)]        # rolling: disjoint rows
    assert windows([], [5, 6], 4) == [([5, 6], 0)] and windows([1], [], 4) == []


def test_long_requests_are_left_truncated_and_context_is_never_masked(world, lm):
    from launcher.lm_eval_model import windows

    ctx = lm.tok_encode(" ".join(["the people of the United States"] * 12))
    assert len(ctx) > SEQ
    cont = lm.tok_encode(" and the Congress")
    (ll, _), = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    (ll_tail, _), = lm._loglikelihood_tokens([(("", ""), ctx[-(SEQ - len(cont)):], cont)])
    assert ll == ll_tail and ll < 0          # only the most recent context that fits is used
    # the bound does not depend on the context's noise: the context is given, never masked
    (tokens, given), = windows(ctx, cont, SEQ)
    assert given == SEQ - len(cont) and tokens[given:] == cont


def test_loglikelihood_is_independent_of_batching(world):
    from launcher.lm_eval_model import MDiffLM

    sents = held_out_sentences(world["data"], 6)
    reqs = [instance("loglikelihood", s.rsplit(" ", 1)[0], " " + s.rsplit(" ", 1)[1]) for s in sents]
    a = MDiffLM(path=str(world["export"]), draws=2, batch_size=1).loglikelihood(reqs, disable_tqdm=True)
    b = MDiffLM(path=str(world["export"]), draws=2, batch_size=16).loglikelihood(reqs[::-1], disable_tqdm=True)[::-1]
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == pytest.approx(lb, rel=1e-5) and ga == gb


# ----- the oracle: the bound against the exact conditional ------------------------------------------------

class OracleModel(torch.nn.Module):
    """The exact-conditional oracle behind the plain denoiser's contract (model/plain.py forward)."""

    def __init__(self, denoiser, time_conditioned: bool = False, genmd4_schedule=None):
        super().__init__()
        self.denoiser, self.time_conditioned = denoiser, time_conditioned
        self.anchor = torch.nn.Parameter(torch.zeros(()))       # a device for launcher/sample.generate
        if genmd4_schedule is not None:
            self.genmd4_schedule = genmd4_schedule

    def forward(self, input_ids, labels=None, loss_mask=None, t=None):
        logp = (self.denoiser(input_ids, t) if self.time_conditioned else self.denoiser(input_ids)).float()
        if labels is None:
            return logp
        nll = -logp.gather(-1, labels.long()[..., None]).squeeze(-1)
        return nll if loss_mask is None else nll * loss_mask


V_OR, N_OR, C_OR = 4, 3, 1          # the oracle's joint: 3 positions of 4 values; context = the first one


def oracle_setup(kind: str, eps: float = 1e-4):
    """(oracle, cfg, plain-contract model) for a kind, on JointOracle.random(3, 4)."""
    from launcher.config import config_from_dict
    from model.diffusion.genmd4 import GenMD4Schedule
    from model.diffusion.oracle import JointOracle

    oracle = JointOracle.random(N_OR, V_OR, seed=3, spread=1.0)
    cfg = config_from_dict({"model": {"vocab_size": V_OR, "seq_len": N_OR, "num_layers": 1, "hidden_size": 8,
                                      "num_attention_heads": 1,
                                      "time_conditioning": "adaln" if kind == "genmd4" else "none"},
                            "diffusion": {"kind": kind, "prime_l": 2, "eps": eps}, "data": {"tokenizer": "ids"}})
    if kind == "md4":
        return oracle, cfg, OracleModel(oracle.md4_denoiser(V_OR))
    if kind == "prime":
        return oracle, cfg, OracleModel(oracle.prime_denoiser(2))
    sched = GenMD4Schedule(V_OR, eps=cfg.diffusion.eps, t1=cfg.diffusion.genmd4_t1)
    with torch.no_grad():
        sched.raw.copy_(torch.tensor([0.3, 1.0, -0.4, 0.8]))          # a non-uniform w
    return oracle, cfg, OracleModel(oracle.genmd4_denoiser(V_OR, sched.w, sched.eps), True, sched)


def exact_conditional_nll(oracle) -> torch.Tensor:
    """-log p(x[C:] | x[:C]) for every state of the oracle."""
    p = oracle.probs
    p_ctx = p.reshape(V_OR ** C_OR, V_OR ** (N_OR - C_OR)).sum(1).repeat_interleave(V_OR ** (N_OR - C_OR))
    return -(p.log() - p_ctx.log())


def oracle_requests(oracle):
    return [instance("loglikelihood", " ".join(map(str, s[:C_OR].tolist())),
                     " " + " ".join(map(str, s[C_OR:].tolist()))) for s in oracle.states]


@pytest.mark.parametrize("kind", ["md4", "prime", "genmd4"])
def test_oracle_loglikelihood_is_the_continuation_only_bound(kind):
    """Through the lm-eval model with the exact conditionals of a known joint: each request's number is the
    held-out estimator with only the continuation maskable (model.objectives.heldout_nelbo, the code path the
    exact expectation below is computed for), its Monte Carlo average over the states is near H(cont | ctx)
    and far below the joint bound H(ctx, cont) (the context is never masked), and is_greedy is the exact
    argmax of every continuation position with the whole continuation masked."""
    from launcher.lm_eval_model import MDiffLM
    from model.objectives import heldout_nelbo

    oracle, cfg, model = oracle_setup(kind)
    draws = 8
    lm = MDiffLM.from_model(model, cfg, draws=draws, batch_size=256, seed=5)
    states = oracle.states
    out = lm.loglikelihood(oracle_requests(oracle), disable_tqdm=True)
    bound = -torch.tensor([ll for ll, _ in out], dtype=torch.float64)
    maskable = torch.arange(N_OR)[None, :].expand(len(states), N_OR) >= C_OR
    assert torch.allclose(bound, heldout_nelbo(model, lm.objective, states, draws, 5, maskable), rtol=1e-6)
    p = oracle.probs
    H_cond = float((p * exact_conditional_nll(oracle)).sum())
    assert abs(float((p * bound).sum()) - H_cond) < 0.5, (float((p * bound).sum()), H_cond)
    joint = heldout_nelbo(model, lm.objective, states, draws, 5)
    assert float((p * joint).sum()) > H_cond + 1.0 and oracle.entropy() > H_cond + 1.0
    lik = torch.ones(len(states), N_OR, V_OR, dtype=torch.float64)
    lik[:, :C_OR] = torch.nn.functional.one_hot(states[:, :C_OR], V_OR).double()
    want = (oracle.posterior_marginals(lik)[:, C_OR:].argmax(-1) == states[:, C_OR:]).all(-1)
    assert [g for _, g in out] == want.tolist()


@pytest.mark.parametrize("kind", ["md4", "prime"])
@pytest.mark.parametrize("eps", [1e-4, 1e-6])
def test_conditional_bound_mean_equals_the_conditional_entropy_up_to_eps(kind, eps):
    """The estimator behind loglikelihood (the objective with `maskable`: only the continuation is masked) in
    expectation, computed exactly: every state, every mask of the continuation's tokens (Prime: of their
    digits), Gauss-Legendre over t, MD4's linear schedule. With the oracle's exact conditionals it is
    H(cont | ctx), the exact conditional entropy, up to MD4's endpoint shift eps (alpha(1) = eps, alpha(0) = 1 -
    eps, the prior term taken as 0, the reconstruction term added), which moves it by at most
    2 eps log(V) per maskable unit, either way: within 1e-5 at eps = 1e-6. So the bound is >= the conditional
    entropy as eps -> 0 and a hair below it at eps = 1e-4 (seen: -2.3e-4 nats). A Monte Carlo average cannot
    show this: per draw the estimate is heavy-tailed (w(t) ~ 1/t), see the oracle test above."""
    oracle, cfg, model = oracle_setup(kind, eps)
    from model.objectives import make_objective

    obj = make_objective(cfg, model)
    l = 2 if kind == "prime" else 1
    L = (N_OR - C_OR) * l                                                   # maskable units per row
    pats = torch.tensor(list(itertools.product([False, True], repeat=L)))  # [2^L, L]
    S, M = len(oracle.states), len(pats)
    x0 = oracle.states.repeat_interleave(M, 0)
    maskable = torch.zeros(S * M, N_OR, dtype=torch.bool)
    maskable[:, C_OR:] = True
    # noise that realises each pattern at every t: 0 (kept) or just below 1 (masked) on the continuation
    noise = torch.zeros(S * M, l, N_OR, dtype=torch.float64)
    noise[:, :, C_OR:] = pats.repeat(S, 1).double().view(S * M, N_OR - C_OR, l).transpose(1, 2) * (1 - 1e-12)
    cache = {}

    def forward(input_ids, labels=None, loss_mask=None):          # inputs are the same at every t: one oracle call
        if "ids" not in cache:
            cache["ids"], cache["out"] = input_ids.clone(), model(input_ids, labels, loss_mask)
        assert torch.equal(input_ids, cache["ids"])
        return cache["out"]

    # linear schedule: w(t) (1 - alpha)^k alpha^(L - k) = (1 - 2 eps) (1 - alpha)^(k - 1) alpha^(L - k) is a polynomial
    # of degree < L in t (k >= 1; k = 0 leaves the reconstruction term only), so 8-point Gauss-Legendre is exact
    x, w = np.polynomial.legendre.leggauss(8)
    t, wq = (x + 1) / 2, w / 2
    k = pats.sum(1).double().repeat(S)
    px = oracle.probs.repeat_interleave(M)
    mean = 0.0
    for ti, wi in zip(t, wq):
        loss, _ = obj.loss(forward, x0, torch.full((S * M,), float(ti), dtype=torch.float64), noise, False, maskable)
        alpha = obj.schedule.alpha(torch.tensor([ti], dtype=torch.float64))
        mean += float(wi) * float((px * (1 - alpha) ** k * alpha ** (L - k) * loss.double()).sum())
    H_cond = float((oracle.probs * exact_conditional_nll(oracle)).sum())
    b = 2 if kind == "prime" else V_OR                                     # values per maskable unit
    assert abs(mean - H_cond) < L * 2 * eps * math.log(b) + 1e-7, (mean, H_cond)
    if eps == 1e-6:
        assert abs(mean - H_cond) < 1e-5, (mean, H_cond)
    assert oracle.entropy() > H_cond + 1.0                                  # the joint is far from it


# ----- generation -------------------------------------------------------------------------------------------

def test_generate_until_honours_stop_strings_and_max_gen_toks(world, lm):
    ctx = "The Congress of the United States"
    (full,) = lm.generate_until([instance("generate_until", ctx, {"until": [], "max_gen_toks": 12})])
    ids = lm.generate_tokens(lm.tok_encode(ctx), 12)
    assert len(ids) == 12
    eos = lm.eot_token_id
    assert full == lm.tok_decode(ids[:ids.index(eos)] if eos in ids else ids)
    k = next(k for k in range(1, len(full) - 2) if full.find(full[k:k + 3]) == k)   # first seen at k > 0
    stop = full[k:k + 3]
    (cut,) = lm.generate_until([instance("generate_until", ctx, {"until": [stop, "\u2603never"], "max_gen_toks": 12})])
    assert cut == full[:k] and stop not in cut, (full, stop, cut)
    # the same request gives the same text (the sampler is seeded by the seed and the context)
    assert lm.generate_until([instance("generate_until", ctx, {"until": [], "max_gen_toks": 12})]) == [full]
    # more new tokens than seq_len: the sampler's sliding window; an empty context
    assert len(lm.generate_tokens(lm.tok_encode(ctx), SEQ + 8)) == SEQ + 8
    assert len(lm.generate_tokens([], 5)) == 5


# ----- bad model_args --------------------------------------------------------------------------------------

def test_bad_model_args_name_the_argument(world, tmp_path):
    from lm_eval.api.registry import get_model

    cls = get_model("mdiff")
    with pytest.raises(ValueError, match="needs path=EXPORT"):
        cls.create_from_arg_string("draws=2")
    with pytest.raises(ValueError, match=r"draws=0.*integer >= 1"):
        cls.create_from_arg_string(f"path={world['export']},draws=0")
    with pytest.raises(ValueError, match=r"batch_size='x'"):
        cls.create_from_arg_obj({"path": str(world["export"]), "batch_size": "x"})
    (tmp_path / "notes.txt").write_text("not an export")
    with pytest.raises(ValueError, match=rf"path={tmp_path}: not a loadable export"):
        cls.create_from_arg_string(f"path={tmp_path}")
    with pytest.raises(ValueError, match=r"path=.*nowhere: no such file"):
        cls.create_from_arg_string(f"path={tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        cls.create_from_arg_string(f"path={world['export']},pretrained=gpt2")
    # lm-eval's own --batch_size (always passed, 1 by default) does not collide with model_args batch_size
    m = cls.create_from_arg_obj({"path": str(world["export"]), "batch_size": 4}, {"batch_size": 1, "device": None})
    assert m.batch_size == 4


def test_generate_until_conditions_on_the_context_with_the_oracle():
    """A joint in which the last two tokens copy the first two: greedy generation after a context must copy it."""
    from launcher.config import config_from_dict
    from launcher.lm_eval_model import MDiffLM
    from model.diffusion.oracle import JointOracle

    V, N = 4, 4
    s = torch.arange(V ** N)
    digits = torch.stack([(s // V ** (N - 1 - n)) % V for n in range(N)], 1)
    copy = (digits[:, 2] == digits[:, 0]) & (digits[:, 3] == digits[:, 1])
    oracle = JointOracle(torch.where(copy, 1.0, 1e-4).double(), N, V)
    cfg = config_from_dict({"model": {"vocab_size": V, "seq_len": N, "num_layers": 1, "hidden_size": 8,
                                      "num_attention_heads": 1}, "data": {"tokenizer": "ids"},
                            "sampler": {"steps": 8}})
    lm = MDiffLM.from_model(OracleModel(oracle.md4_denoiser(V)), cfg)
    reqs = [instance("generate_until", f"{a} {b}", {"until": [], "max_gen_toks": 2}) for a, b in ((1, 2), (3, 0), (2, 2))]
    assert lm.generate_until(reqs, disable_tqdm=True) == ["1 2", "3 0", "2 2"]
    # a stop string cuts the text at its first occurrence
    (cut,) = lm.generate_until([instance("generate_until", "1 2", {"until": [" 2"], "max_gen_toks": 2})])
    assert cut == "1"
