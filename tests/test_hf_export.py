"""An export written with launcher/hf_export.py (export.py --hf) loads in transformers with no project code
importable: AutoModelForMaskedLM(trust_remote_code) gives model/plain.py's logits for MD4 with and without
adaLN, Prime, a pixel model and GenMD4 (so launcher/hf/modeling_mdiff.py cannot drift from model/plain.py)
and follows transformers' forward conventions, and AutoTokenizer encodes and decodes text as the project's
tokenizer does (GPT-2 BPE, text8)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from launcher.config import Config, DataConfig, DiffusionConfig, ModelConfig
from launcher.export import load_plain, read_export, write_export
from launcher.export import main as export_main
from launcher.hf_export import write_hf
from model.plain import PlainDenoiser

REPO = Path(__file__).resolve().parent.parent
SEQ = 12
SENTENCES = ["The kernel's  scheduler\n\tpreempts 1234 tasks: naïve café, ☃ and 🙂 — twice.",
             " leading space, trailing spaces   ", "one<|endoftext|>two [MASK] three"]
TEXT8 = "the quick brown fox jumps over the lazy dog"

# name: (diffusion kind, tokenizer, vocab, time_conditioning, position_embedding, image_shape)
CASES = {
    "md4_gpt2": ("md4", "gpt2", 50257, "none", "rope", None),
    "md4_adaln_text8": ("md4", "text8", 27, "adaln", "learned", None),
    "prime_adaln": ("prime", "ids", 101, "adaln", "rope", None),
    "prime": ("prime", "ids", 101, "none", "rope", None),
    "pixels_md4": ("md4", "pixels", 256, "none", "rope", [2, 2, 3]),
    "genmd4_text8": ("genmd4", "text8", 27, "none", "rope", None),
}


def build(name: str, tmp: Path) -> tuple[PlainDenoiser, Config]:
    kind, tokenizer, vocab, tc, pos, image_shape = CASES[name]
    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_len=SEQ,
                                   vocab_size=vocab, dropout=0.0, position_embedding=pos, time_conditioning=tc,
                                   image_shape=image_shape),
                 diffusion=DiffusionConfig(kind=kind, prime_l=2),
                 data=DataConfig(path=str(tmp / "no_data"), tokenizer=tokenizer))
    torch.manual_seed(len(name))
    model = PlainDenoiser.from_config(cfg.model, cfg.diffusion).eval()
    with torch.no_grad():
        for p in model.parameters():          # random everywhere: adaLN's zero-initialised maps matter too
            p.copy_(0.3 * torch.randn_like(p))
    return model, cfg


def model_inputs(name: str, model: PlainDenoiser):
    """(input_ids for the plain model, input_ids for the HF model, t or None)."""
    kind, _, vocab, tc, *_ = CASES[name]
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, vocab, (3, SEQ), generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.4, torch.full_like(x, vocab), x)
    t = torch.tensor([0.05, 0.5, 0.97]) if tc == "adaln" else None
    if kind == "prime":
        from model.diffusion.prime import prime_base, token_digits
        b = prime_base(vocab, 2)
        y = token_digits(x.clamp(max=vocab - 1), b, 2)
        y = torch.where(torch.rand(y.shape, generator=g) < 0.4, torch.full_like(y, b), y)   # partially masked digits
        return y, y, t
    return x, x, t


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    out = {}
    for name in CASES:
        model, cfg = build(name, tmp)
        tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        path = write_export(tmp / name, cfg, tensors, {"weights": "raw", "step": 0, "tokens_seen": 0})
        write_hf(path)
        plain_ids, hf_ids, t = model_inputs(name, model)
        with torch.no_grad():
            want = model(plain_ids, t=t)
        torch.save({"input_ids": hf_ids, "t": t}, tmp / f"{name}.inputs.pt")
        out[name] = {"path": path, "want": want}
    return tmp, out


LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    REPO = sys.argv[1]

    class Blocker(importlib.abc.MetaPathFinder):      # the editable install would still find the project
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("launcher", "model", "data_pipeline"):
                raise ImportError(f"project module {name} is blocked")
            return None

    def in_repo(p):     # the repository, not the virtual environment inside it
        return (p == REPO or p.startswith(REPO + "/")) and not p.startswith(sys.prefix)

    sys.meta_path.insert(0, Blocker())
    sys.path[:] = [p for p in sys.path if not in_repo(p)]
    for name in ("model", "launcher", "data_pipeline"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} is importable")

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tmp, names, sentences, text8 = sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    result = {}
    for name in names:
        model = AutoModelForMaskedLM.from_pretrained(f"{tmp}/{name}", trust_remote_code=True)
        inp = torch.load(f"{tmp}/{name}.inputs.pt")
        with torch.no_grad():
            out = model(inp["input_ids"], t=inp["t"])
        torch.save(out.logits, f"{tmp}/{name}.hf_logits.pt")
        r = {"class": type(model).__name__, "training": model.training, "logits_type": type(out).__name__}
        if inp["t"] is not None:
            try:
                model(inp["input_ids"])
            except ValueError as e:
                r["without_t"] = str(e)
        if name == "prime":       # token ids: the mask id is every digit masked
            ids = torch.tensor([[5, 100, 101, 0, 101, 7, 8, 9, 10, 11, 12, 13]])
            with torch.no_grad():
                torch.save(model(ids).logits, f"{tmp}/prime.token_logits.pt")
        result[name] = r
    # transformers' conventions: labels -> mean cross-entropy (-100 ignored), return_dict=False -> a tuple;
    # padding masks, segment ids and unknown arguments are refused
    model = AutoModelForMaskedLM.from_pretrained(f"{tmp}/md4_gpt2", trust_remote_code=True)
    x = torch.load(f"{tmp}/md4_gpt2.inputs.pt")["input_ids"].clamp(max=50256)
    labels = x.clone()
    labels[:, ::2] = -100
    with torch.no_grad():
        out = model(x, labels=labels)
        keep = labels != -100
        conv = {"loss": out.loss.item(), "loss_by_hand": torch.nn.functional.cross_entropy(out.logits[keep], x[keep]).item()}
        loss, logits = model(x, labels=labels, return_dict=False)
        conv["tuple"] = [loss.item(), bool(torch.equal(logits, out.logits))]
        for key, kwargs in (("attention_mask", {"attention_mask": torch.ones_like(x).index_fill(1, torch.tensor([3]), 0)}),
                            ("token_type_ids", {"token_type_ids": torch.ones_like(x)}),
                            ("timesteps", {"timesteps": torch.zeros(3)})):
            try:
                model(x, **kwargs)
            except (ValueError, TypeError) as e:
                conv[key] = f"{type(e).__name__}: {e}"
    # save_pretrained (e.g. after fine-tuning) writes a directory both transformers and the project read
    model.save_pretrained(f"{tmp}/resaved")
    again = AutoModelForMaskedLM.from_pretrained(f"{tmp}/resaved", trust_remote_code=True)
    with torch.no_grad():
        conv["resaved_equal"] = bool(torch.equal(again(x).logits, out.logits))
    result["conventions"] = conv
    for name, texts in (("md4_gpt2", sentences), ("md4_adaln_text8", [text8])):
        tok = AutoTokenizer.from_pretrained(f"{tmp}/{name}")
        ids = [tok(s)["input_ids"] for s in texts + [f"the fox {tok.mask_token}{tok.mask_token} the dog"]]
        result[name]["tokenizer"] = {"class": type(tok).__name__, "ids": ids,
                                     "decoded": [tok.decode(i) for i in ids], "mask_token_id": tok.mask_token_id,
                                     "mask_token": tok.mask_token, "len": len(tok)}
    leaked = sorted(m for m, mod in sys.modules.items() if in_repo(getattr(mod, "__file__", None) or ""))
    result["leaked"] = leaked
    print("RESULT " + json.dumps(result))
""")


def test_transformers_loads_the_export_without_project_code(exports):
    tmp, out = exports
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp / "hf_home"),
               HF_MODULES_CACHE=str(tmp / "hf_modules"), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(REPO), str(tmp), json.dumps(list(CASES)),
                           json.dumps(SENTENCES), TEXT8], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):])
    assert res.pop("leaked") == []
    conv = res.pop("conventions")
    assert conv["loss"] == pytest.approx(conv["loss_by_hand"], rel=1e-6) and conv["tuple"] == [conv["loss"], True]
    assert conv["attention_mask"].startswith("ValueError: attention_mask has zeros")
    assert conv["token_type_ids"].startswith("ValueError: token_type_ids other than 0")
    assert conv["timesteps"].startswith("TypeError: MDiffForMaskedLM.forward does not take ['timesteps']")
    assert conv["resaved_equal"]
    resaved, _, doc = load_plain(tmp / "resaved")      # no sha256 recorded by save_pretrained: read unverified
    assert "sha256" not in doc and doc["format"] == "mdiff-export"
    x = torch.load(tmp / "md4_gpt2.inputs.pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(resaved(x), out["md4_gpt2"]["want"], rtol=0, atol=1e-5)
    for name, r in res.items():
        assert r["class"] == "MDiffForMaskedLM" and r["logits_type"] == "MaskedLMOutput" and not r["training"], name
        got = torch.load(tmp / f"{name}.hf_logits.pt")
        want = out[name]["want"]
        assert got.shape == want.shape == (3, SEQ, CASES[name][2]), name
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
        if CASES[name][3] == "adaln":
            assert "time-conditioned" in r["without_t"], name
    # Prime from token ids: the mask id stands for every digit masked
    model, _ = build("prime", tmp)
    from model.diffusion.prime import prime_base, token_digits
    ids = torch.tensor([[5, 100, 101, 0, 101, 7, 8, 9, 10, 11, 12, 13]])
    b = prime_base(101, 2)
    digits = token_digits(ids.clamp(max=100), b, 2).masked_fill((ids == 101)[..., None], b)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp / "prime.token_logits.pt"), model(digits), rtol=0, atol=1e-5)

    from data_pipeline.tokenizer import get_encoding
    gpt2 = res["md4_gpt2"]["tokenizer"]
    assert gpt2["class"] == "GPT2TokenizerFast"
    assert (gpt2["mask_token"], gpt2["mask_token_id"], gpt2["len"]) == ("<|mask|>", 50257, 50258)
    enc = get_encoding("gpt2")
    *ids, masked = gpt2["ids"]
    assert ids == [enc.encode(s, allowed_special="all") for s in SENTENCES]
    assert gpt2["decoded"][:-1] == SENTENCES
    assert masked == enc.encode("the fox") + [50257, 50257] + enc.encode(" the dog")   # the mask takes the space
    t8 = res["md4_adaln_text8"]["tokenizer"]
    text8 = get_encoding("text8").encode_ordinary
    assert t8["ids"] == [text8(TEXT8).tolist(), text8("the fox ").tolist() + [27, 27] + text8(" the dog").tolist()]
    assert t8["decoded"] == [TEXT8, "the fox <|mask|><|mask|> the dog"] and (t8["mask_token"], t8["mask_token_id"], t8["len"]) == ("<|mask|>", 27, 28)


def test_hf_files_keep_the_export_readable_by_the_project(exports):
    tmp, out = exports
    for name, e in out.items():
        doc = json.loads((e["path"] / "config.json").read_text())
        assert doc["format"] == "mdiff-export" and doc["model_type"] == "mdiff"
        assert doc["auto_map"]["AutoModelForMaskedLM"] == "modeling_mdiff.MDiffForMaskedLM"
        for f in ("configuration_mdiff.py", "modeling_mdiff.py"):
            assert (e["path"] / f).read_text() == (REPO / "launcher" / "hf" / f).read_text()
        model, cfg, _ = load_plain(e["path"])          # sha256 of model.safetensors still verifies
        plain_ids, _, t = model_inputs(name, model)
        with torch.no_grad():
            torch.testing.assert_close(model(plain_ids, t=t), e["want"], rtol=0, atol=0)
        tokenizer = CASES[name][1]
        if tokenizer in ("gpt2", "text8"):
            assert doc["hf"]["mask_token_id"] == CASES[name][2] and "tokenizer.json" in doc["hf"]["files"]
        else:       # no tokenizer: say why, write none
            assert doc["hf"]["tokenizer"] is None and tokenizer in doc["hf"]["note"]
            assert not (e["path"] / "tokenizer_config.json").exists()


def test_old_export_gets_hf_files_in_place_through_the_cli(tmp_path, capsys):
    """An export whose safetensors metadata is not "pt" (as export.py wrote before --hf) is rewritten once,
    its sha256 in config.json updated; `export.py EXPORT --hf` (its main, in process) works in place."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, cfg = build("pixels_md4", tmp_path)
    path = write_export(tmp_path / "old", cfg, {n: p.detach() for n, p in model.named_parameters()},
                        {"weights": "raw"})
    weights = path / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "mdiff-export"})
    doc = json.loads((path / "config.json").read_text())
    from data_pipeline.manifest import file_sha256
    doc["sha256"]["model.safetensors"] = file_sha256(weights)
    del doc["architecture"]["image_shape"]         # older exports had it only in the training config
    (path / "config.json").write_text(json.dumps(doc))
    assert export_main([str(path), "--hf"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"export": str(path), "hf": True}
    with safe_open(str(weights), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    read_export(path)                               # the new sha256 verifies
    from launcher.hf.configuration_mdiff import MDiffConfig
    hf_cfg = MDiffConfig.from_pretrained(str(path))
    assert hf_cfg.image_shape == [2, 2, 3] and hf_cfg.vocab_size == 256 and hf_cfg.dtype is torch.float32
    # a checkpoint without --out, or --dtype on an export, is refused with the reason
    for argv, reason in (([str(tmp_path / "nothing")], "--out is required"),
                         ([str(path), "--hf", "--dtype", "bf16"], "is an export: --raw, --ema and --dtype apply")):
        with pytest.raises(SystemExit) as e:
            export_main(argv)
        assert e.value.code == 2 and reason in capsys.readouterr().err


def test_bad_tokenizer_vocab_is_refused_naming_the_file(tmp_path):
    from launcher.export import ExportError
    model, cfg = build("md4_adaln_text8", tmp_path)
    cfg.data.tokenizer = "gpt2"                    # 27 tokens, but gpt2 has 50257
    path = write_export(tmp_path / "e", cfg, {n: p.detach() for n, p in model.named_parameters()}, {"weights": "raw"})
    with pytest.raises(ExportError, match=r"config\.json: tokenizer 'gpt2' has 50257 tokens but model\.vocab_size is 27"):
        write_hf(path)



def test_export_cli_with_hf_from_a_checkpoint(tmp_path, capsys):
    """`export.py RUN --out E --hf` on a (synthetic, TP = PP = 1) checkpoint writes the export and its
    transformers files in one go."""
    import hashlib

    from launcher.config import save_config

    model, cfg = build("md4_adaln_text8", tmp_path)
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    torch.save({"module": {n: p.detach().clone() for n, p in model.named_parameters()}, "step": 2, "tokens_seen": 24},
               tag / "mp_rank_00_model_states.pt")
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in tag.iterdir()}
    (tag / "COMPLETE.json").write_text(json.dumps({"step": 2, "files": files}))
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--hf"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["hf"] is True and rec["step"] == 2 and rec["weights"] == "raw"
    doc = json.loads((out / "config.json").read_text())
    assert doc["auto_map"]["AutoConfig"] == "configuration_mdiff.MDiffConfig" and doc["step"] == 2
    assert doc["hf"]["files"] == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    loaded, *_ = load_plain(out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(dict(loaded.named_parameters())[n], p, rtol=0, atol=0)
