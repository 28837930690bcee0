#!/usr/bin/env python
"""Generative perplexity and unigram entropy of samples written by launcher/sample.py, judged by a local
causal language model (any transformers AutoModelForCausalLM directory; nothing is downloaded).

    python launcher/sample.py exports/md4_tiny --num 64 --out samples.jsonl
    python launcher/evaluate_samples.py samples.jsonl --judge /models/gpt2-large --batch-size 8

Samples files (what sample.py writes):
  *.jsonl / *.json  one JSON object per line: `sample.py --out X.jsonl` writes one per sample ({"text",
                    "tokens", "tokenizer", ...}); sample.py's stdout line ({"samples": [...], "tokens":
                    [[...]], "tokenizer", "model", ...}, e.g. `sample.py EXPORT --num 8 > samples.jsonl`)
                    holds many. Records with token ids and no text are decoded with the tokenizer the
                    record names (or the one in the config.json / config.yaml of the record's "model").
  anything else     the text file `sample.py --out X.txt` writes: samples separated by one blank line.
                    A sample that itself holds a blank line cannot be told apart from two samples, and the
                    entropy is over the text re-encoded with --tokenizer (default gpt2), which need not be
                    the sampler's ids; prefer .jsonl. PNG grids (pixel data) have no text and are refused.

Generative perplexity: every sample's text is retokenised with the judge's tokenizer (no special tokens
added) and cut into chunks of at most L - 1 tokens, L = --max-length or the judge's maximum context
(max_position_embeddings / n_positions), whichever is smaller. Each chunk is scored after the judge's BOS
token (its EOS where it has no BOS, as GPT-2's <|endoftext|>), so every token of a sample is predicted once,
the first token of a chunk conditioned on BOS alone. Chunks run batched, right-padded, with attention
masks. The number is exp(sum of token NLLs / number of tokens) over all samples (token-weighted). Unlike
MDLM's compute_generative_perplexity, which scores from the second token of each chunk and leaves out EOS
tokens after the first, here the first token is scored (given BOS) and every token counts, EOS included.

Entropy: per sample, the entropy in nats of the empirical unigram distribution of the sample's token ids
in the sampler's own vocabulary (-sum_v p_v ln p_v, p_v = count_v / length), averaged over samples. Low
values (repetitive samples) are what low-precision categorical sampling produces, often together with a
deceptively low generative perplexity (Zheng et al. 2024).

Prints a summary and a final JSON line on stdout, also written to --out (default SAMPLES.genppl.json).
Bad input exits 2 with a message naming the file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher.argtypes import POSITIVE, bounded  # noqa: E402


class InputError(ValueError):
    """A samples file or judge that cannot be used; the message names it."""


@dataclass
class Sample:
    text: str
    ids: list[int]            # the sampler's token ids (or the text re-encoded, for text files)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="samples file written by launcher/sample.py (.jsonl/.json, or its text file)")
    p.add_argument("--judge", required=True, help="local directory of a transformers causal LM (and its tokenizer)")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="judge chunks per forward pass")
    p.add_argument("--max-length", type=bounded(int, 2, what="an integer >= 2"), default=None,
                   help="judge tokens per chunk, BOS included (default and maximum: the judge's context)")
    p.add_argument("--tokenizer", default=None,
                   help="the sampler's tokenizer (gpt2, text8, ...) when the samples file does not name one")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="judge weights and activations")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON result (default: SAMPLES with suffix .genppl.json)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Reading samples
# ---------------------------------------------------------------------------------------------

def _tokenizer_of_model(model: str, base: Path) -> str | None:
    """data.tokenizer of the export (config.json) or run directory (config.yaml) a record names."""
    for root in (Path(model), base / model):
        try:
            if (root / "config.json").is_file():
                doc = json.loads((root / "config.json").read_text())
                return (doc.get("data") or {}).get("tokenizer") or doc["config"]["data"]["tokenizer"]
            if (root / "config.yaml").is_file():
                import yaml

                return yaml.safe_load((root / "config.yaml").read_text())["data"]["tokenizer"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _decode(ids: list[int], tokenizer: str) -> str:
    from data_pipeline.tokenizer import get_encoding

    try:
        enc = get_encoding(tokenizer)
    except ValueError:                # no text codec: sample.py shows such samples as space-separated ids
        return " ".join(map(str, ids))
    return enc.decode(ids)


def _encode(text: str, tokenizer: str) -> list[int]:
    from data_pipeline.tokenizer import get_encoding

    try:
        enc = get_encoding(tokenizer)
    except ValueError:
        return [int(t) for t in text.split()]
    if hasattr(enc, "encode"):
        return list(enc.encode(text, allowed_special="all"))
    return [int(i) for i in enc.encode_ordinary(text)]


def _ids(value, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise InputError(f"{where}: 'tokens' must be a list of non-negative integer token ids")
    return value


def read_samples(path: str | Path, tokenizer: str | None = None) -> tuple[list[Sample], dict]:
    """The samples of a file sample.py wrote, and how they were read ({"format", "tokenizer", "ids"})."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: samples file not found")
    if path.suffix.lower() == ".png":
        raise InputError(f"{path}: a PNG grid of pixel samples has no text for a language-model judge")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected the .jsonl or text "
                         "file launcher/sample.py writes") from None
    if not raw.strip():
        raise InputError(f"{path}: the samples file is empty")
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_json_lines(path, raw, tokenizer)
    name = tokenizer or "gpt2"
    texts = raw[:-1] if raw.endswith("\n") else raw
    samples = [Sample(t, _encode(t, name)) for t in texts.split("\n\n")]
    return samples, {"format": "text (samples separated by blank lines)", "tokenizer": name,
                     "ids": f"the text re-encoded with {name}"}


def _read_json_lines(path: Path, raw: str, tokenizer: str | None) -> tuple[list[Sample], dict]:
    samples: list[Sample] = []
    names: set[str] = set()
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise InputError(f"{where}: not a JSON object ({e}); expected the records launcher/sample.py writes") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: not a JSON object; expected the records launcher/sample.py writes")
        if "png" in rec and "tokens" not in rec:
            raise InputError(f"{where}: pixel samples ({rec['png']}) have no text for a language-model judge")
        if "tokens" not in rec:
            raise InputError(f"{where}: no 'tokens' (token ids) in the record; expected launcher/sample.py's output "
                             "(its stdout JSON line or --out X.jsonl)")
        name = tokenizer or rec.get("tokenizer") or (_tokenizer_of_model(str(rec["model"]), path.parent)
                                                      if rec.get("model") else None)
        if "samples" in rec:                 # sample.py's stdout record: many samples
            rows, texts = rec["tokens"], rec["samples"]
            if not isinstance(rows, list) or not isinstance(texts, list) or len(rows) != len(texts):
                raise InputError(f"{where}: 'samples' and 'tokens' must be lists of the same length")
            rows = [_ids(r, f"{where} tokens[{i}]") for i, r in enumerate(rows)]
        else:                                # sample.py --out X.jsonl: one sample
            rows, texts = [_ids(rec["tokens"], where)], [rec.get("text")]
        for ids, text in zip(rows, texts):
            if text is None:
                if name is None:
                    raise InputError(f"{where}: token ids without text and no tokenizer named (no 'tokenizer' in "
                                     "the record, no export config at its 'model'); pass --tokenizer")
                text = _decode(ids, name)
            elif not isinstance(text, str):
                raise InputError(f"{where}: sample text must be a string, got {type(text).__name__}")
            samples.append(Sample(text, ids))
        if name:
            names.add(name)
    if not samples:
        raise InputError(f"{path}: no samples in the file")
    return samples, {"format": "jsonl", "tokenizer": ",".join(sorted(names)) or None, "ids": "sampled"}


def unigram_entropy(ids: list[int]) -> float:
    """Entropy in nats of the empirical unigram distribution of one sample's token ids."""
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values()) if n else float("nan")


# ---------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------

def load_judge(path: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """(model, tokenizer, context length, BOS id) of a local causal LM directory; InputError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--judge {path}: not a directory (a local transformers causal LM is needed; nothing is "
                         "downloaded)")
    import torch
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise InputError("--judge needs the transformers package: pip install -e '.[eval]'") from None

    if not (path / "config.json").is_file():
        raise InputError(f"--judge {path}: no config.json (not a transformers model directory)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"--judge {path}: no loadable transformers config ({str(e).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"--judge {path}: model_type {config.model_type!r} is not a causal language model "
                         "(AutoModelForCausalLM has no class for it)")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"--judge {path}: cannot load ({str(e).splitlines()[0]})") from None
    n_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        bos = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if bos is None:
        raise InputError(f"--judge {path}: the tokenizer has neither a BOS nor an EOS token to condition the first "
                         "token of a sample on")
    return model.to(device).eval(), tok, n_ctx, int(bos)


def judge_chunks(tok, texts: list[str], bos: int, max_length: int) -> list[tuple[int, list[int]]]:
    """(sample index, [BOS] + up to max_length - 1 judge tokens) for every chunk of every sample."""
    out = []
    body = max_length - 1
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        for s in range(0, len(ids), body):
            out.append((i, [bos] + ids[s:s + body]))
    return out


def score_chunks(model, chunks: list[tuple[int, list[int]]], n_samples: int, pad_id: int, batch_size: int,
                 device: str = "cpu", progress: bool = True) -> tuple[list[float], list[int]]:
    """Per sample: summed NLL (nats) of its judge tokens after BOS, and how many tokens were scored."""
    import torch
    from tqdm import tqdm

    nll = [0.0] * n_samples
    count = [0] * n_samples
    order = sorted(range(len(chunks)), key=lambda k: -len(chunks[k][1]))   # less padding per batch
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc="judge", unit="batch", file=sys.stderr, disable=not progress):
            width = max(len(chunks[k][1]) for k in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, k in enumerate(batch):
                row = chunks[k][1]
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tok_logp = logp.gather(-1, ids[:, 1:, None].to(device))[..., 0].double().cpu()
            scored = mask[:, 1:].bool()
            for r, k in enumerate(batch):
                i = chunks[k][0]
                nll[i] -= float(tok_logp[r][scored[r]].sum())
                count[i] += int(scored[r].sum())
    return nll, count


def evaluate(samples: list[Sample], model, tok, bos: int, max_length: int, batch_size: int,
             device: str = "cpu", progress: bool = True) -> dict:
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    chunks = judge_chunks(tok, [s.text for s in samples], bos, max_length)
    nll, count = score_chunks(model, chunks, len(samples), pad, batch_size, device, progress)
    tokens = sum(count)
    ents = [unigram_entropy(s.ids) for s in samples if s.ids]
    nats = sum(nll) / tokens if tokens else float("nan")
    return {"gen_ppl": math.exp(nats) if tokens else float("nan"), "nll_per_token": nats, "judge_tokens": tokens,
            "samples": len(samples), "chunks": len(chunks), "max_length": max_length,
            "entropy": sum(ents) / len(ents) if ents else float("nan"),
            "entropy_min": min(ents) if ents else float("nan"),
            "sampler_tokens": sum(len(s.ids) for s in samples),
            "per_sample": [{"judge_tokens": c, "nll": v, "entropy": unigram_entropy(s.ids) if s.ids else None}
                           for s, v, c in zip(samples, nll, count)]}


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        samples, how = read_samples(a.samples, a.tokenizer)
        judge = Path(a.judge)
        if not judge.is_dir():        # before importing torch / transformers
            raise InputError(f"--judge {judge}: not a directory (a local transformers causal LM is needed; "
                             "nothing is downloaded)")
        import torch

        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, n_ctx, bos = load_judge(judge, a.dtype, device)
        if n_ctx is None and a.max_length is None:
            raise InputError(f"--judge {judge}: its config names no maximum context (max_position_embeddings); "
                             "pass --max-length")
        max_length = min(v for v in (a.max_length, n_ctx) if v is not None)
        if max_length < 2:
            raise InputError(f"--judge {judge}: a context of {max_length} token(s) leaves no room after BOS")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = evaluate(samples, model, tok, bos, max_length, a.batch_size, device, not a.no_progress)
    record = {"samples_file": str(a.samples), "judge": str(judge), "format": how["format"],
              "sampler_tokenizer": how["tokenizer"], "entropy_ids": how["ids"], "bos_id": bos, **res}
    if how["format"] != "jsonl":
        print(f"note: {a.samples} is a text file: samples are split at blank lines and the entropy is over "
              f"{how['ids']}; sample.py --out X.jsonl keeps the sampled ids", file=sys.stderr)
    print(f"samples              : {res['samples']} ({res['sampler_tokens']} sampler tokens, "
          f"{res['judge_tokens']} judge tokens in {res['chunks']} chunks of <= {max_length})", file=sys.stderr)
    print(f"generative perplexity: {res['gen_ppl']:.3f} (judge {judge}, {res['nll_per_token']:.4f} nats/token)",
          file=sys.stderr)
    print(f"unigram entropy      : {res['entropy']:.4f} nats per sample (mean; min {res['entropy_min']:.4f})",
          file=sys.stderr)
    out = Path(a.out) if a.out else Path(a.samples).with_suffix(".genppl.json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    record["out"] = str(out)
    print(json.dumps({k: v for k, v in record.items() if k != "per_sample"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
