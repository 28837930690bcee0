"""Readers for the distribution formats of the corpora mdiff trains and evaluates on.

Text readers return *tasks*: picklable zero-argument callables that each return a list of documents
(one parquet row group, one OpenWebText .xz subset, a group of .txt files, a slice of text8). The
prepare step runs them, in order, in its worker processes and tokenizes what they return, so reading,
decompression and tokenization all scale with --workers while the output order stays fixed.

    owt_parquet_tasks     OpenWebText as HF parquet shards (column `text`), a file or a folder
    owt_tar_tasks         the original openwebtext.tar.xz (urlsf_subset*.xz inside, each an .xz tar of
                          .txt documents), or a folder of urlsf_subset*.xz, or one of them
    text_tasks            a folder of .txt (one document per file) / .jsonl (field `text` per line)
    text8_split_tasks     text8: one file of ' ' and a-z; train/val/test = the first 90M / next 5M / last
                          5M characters of the 100M file (fractions 0.9/0.05/0.05 of any file length)
    lambada_tasks         LAMBADA jsonl (`text`) -> split test, SEDD's lambada detokenizer
    wikitext_split_tasks  WikiText-2/103 wiki.{train,valid,test}.{tokens,raw} -> train/val/test, one document
                          per article, wikitext detokenizer
    ptb_split_tasks       ptb.{train,valid,test}.txt -> train/val/test, one document per line, ptb detokenizer
    lm1b_split_tasks      One Billion Word news.en.heldout-000NN-of-00050 -> test, one document per line
    cifar10_splits        cifar-10-python.tar.gz: data_batch_1..5 -> train, test_batch -> val (CHW -> HWC)
    imagenet_splits       downsampled ImageNet 32/64: train_data_batch_N(.npz) -> train, val_data(.npz) -> val
    fashion_mnist_splits  Fashion-MNIST idx (optionally .gz): train-images -> train, t10k-images -> val
    token_documents       pre-tokenized .npy / raw .bin (uint16/uint32), documents separated by EOS

Every error about an input names the file (and the member inside an archive).
The detokenizers follow the ones SEDD and MDLM use for zero-shot perplexity (originally Megatron-LM's).
"""
from __future__ import annotations

import functools
import gzip
import io
import lzma
import pickle
import re
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

Task = Callable[[], list]
_DECODE_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error, tarfile.TarError, pickle.UnpicklingError,
                  zipfile.BadZipFile, UnicodeDecodeError, KeyError, ValueError)


def _corrupt(where, e: BaseException) -> ValueError:
    return ValueError(f"{where}: truncated or corrupt input ({type(e).__name__}: {e})")


def _files(path: str | Path, match: Callable[[Path], bool], what: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no such file or folder: {p}")
    files = sorted((f for f in p.rglob("*") if f.is_file() and match(f)), key=lambda f: f.relative_to(p).as_posix())
    if not files:
        raise ValueError(f"{p}: no {what} found")
    return files


# ---- detokenizers (SEDD / MDLM, after Megatron-LM's tasks/zeroshot_gpt/detokenizer.py) ----------
def wikitext_detokenize(s: str) -> str:
    s = s.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    s = s.replace(" 's", "'s")
    return s


def ptb_detokenize(s: str) -> str:
    s = s.replace(" '", "'")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" n't", "n't")
    s = s.replace(" N ", "1 ")
    s = s.replace("$ 1", "$1").replace("# 1", "#1")
    return s


def lm1b_detokenize(x: str) -> str:
    x = x.replace("http : / / ", "http://").replace("https : / / ", "https://")
    x = re.sub(r" \'(\w+)", r"'\1", x)
    x = re.sub(r" (\w+) \. ", r" \1. ", x)
    x = re.sub(r" (\w+) \.$", r" \1.", x)
    x = x.replace(" ? ", "? ")
    x = re.sub(r" \?$", "?", x)
    x = x.replace(" ! ", "! ")
    x = re.sub(r" \!$", "!", x)
    x = x.replace(" , ", ", ").replace(" : ", ": ").replace(" ; ", "; ").replace(" / ", "/")
    x = re.sub(r"\" ([^\"]+) \"", r'"\1"', x)
    x = re.sub(r"\' ([^\']+) \'", r"'\1'", x)
    x = re.sub(r"\( ([^\(\)]+) \)", r"(\1)", x)
    x = re.sub(r"\[ ([^\[\]]+) \]", r"[\1]", x)
    x = x.replace("$ ", "$").replace("£ ", "£")
    return x


def lambada_detokenize(text: str) -> str:
    text = text.replace("“", '"').replace("”", '"')
    return "\n" + text.strip()


# ---- OpenWebText -------------------------------------------------------------------------------
def _parquet_row_group(path: str, i: int) -> list[str]:
    import pyarrow.parquet as pq

    try:
        col = pq.ParquetFile(path).read_row_group(i, columns=["text"]).column("text").to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for damaged files
        raise _corrupt(f"{path} (row group {i})", e) from None
    return [t for t in col if t and t.strip()]


def owt_parquet_tasks(path: str | Path) -> Iterator[Task]:
    """One task per parquet row group, files in path order (HF openwebtext: plain_text/train-*.parquet)."""
    import pyarrow.parquet as pq

    for f in _files(path, lambda f: f.suffix == ".parquet", "*.parquet files"):
        try:
            pf = pq.ParquetFile(str(f))
        except Exception as e:
            raise _corrupt(f, e) from None
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{f}: no column 'text' (columns: {pf.schema_arrow.names})")
        for i in range(pf.num_row_groups):
            yield functools.partial(_parquet_row_group, str(f), i)


def _xz_tar_docs(data: bytes | None, name: str) -> list[str]:
    """The .txt documents of one urlsf_subset .xz tar (bytes, or read from the file `name`)."""
    try:
        if data is None:
            data = Path(name).read_bytes()
        docs = []
        raw = lzma.decompress(data)          # whole: a truncated stream fails here, not silently later
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".txt"):
                    text = tf.extractfile(m).read().decode("utf-8")
                    if text.strip():
                        docs.append(text)
        return docs
    except _DECODE_ERRORS as e:
        raise _corrupt(name, e) from None


def owt_tar_tasks(path: str | Path) -> Iterator[Task]:
    """openwebtext.tar.xz (read as a stream; one task per inner subset, its bytes passed to a worker),
    a folder of urlsf_subset*.xz, or one subset file. Documents in archive order."""
    p = Path(path)
    is_subset = lambda f: f.name.startswith("urlsf_subset") and f.suffix == ".xz"
    if p.is_file() and not is_subset(p):
        try:
            with tarfile.open(p, mode="r|xz") as tf:
                n = 0
                for m in tf:
                    if m.isfile() and m.name.endswith(".xz"):
                        n += 1
                        yield functools.partial(_xz_tar_docs, tf.extractfile(m).read(), f"{p}:{m.name}")
                while tf.fileobj.read(1 << 20):      # to the end: a truncated .xz fails here
                    pass
        except _DECODE_ERRORS as e:
            raise _corrupt(p, e) from None
        if n == 0:
            raise ValueError(f"{p}: no urlsf_subset*.xz members found")
        return
    for f in _files(p, is_subset, "urlsf_subset*.xz files"):
        yield functools.partial(_xz_tar_docs, None, str(f))


# ---- plain text / jsonl ------------------------------------------------------------------------
def _read_text_files(paths: list[str], transform: Callable[[str], str] | None = None) -> list[str]:
    from data_pipeline.sources import read_text_file

    docs = [d for f in paths for d in read_text_file(Path(f))]
    return [transform(d) for d in docs] if transform else docs


def text_tasks(path: str | Path, suffixes=(".txt", ".jsonl"), group_bytes: int = 1 << 20) -> Iterator[Task]:
    """Files in relative-path order, grouped into tasks of about group_bytes."""
    group, size = [], 0
    for f in _files(path, lambda f: f.suffix in suffixes, "/".join(suffixes) + " files"):
        group.append(str(f))
        size += f.stat().st_size
        if size >= group_bytes:
            yield functools.partial(_read_text_files, group)
            group, size = [], 0
    if group:
        yield functools.partial(_read_text_files, group)


# ---- text8 -------------------------------------------------------------------------------------
TEXT8_FRACTIONS = (0.9, 0.05, 0.05)      # of the 100M-character file: 90M / 5M / 5M


def _text8_slice(path: str, start: int, end: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise ValueError(f"{path}: truncated (wanted bytes {start}..{end})")
    try:
        return [data.decode("ascii")]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not text8 (non-ASCII byte at {start + e.start})") from None


def text8_split_tasks(path: str | Path, fractions=TEXT8_FRACTIONS, chunk: int = 1 << 20) -> dict[str, list[Task]]:
    """train/val/test = consecutive slices of the file of sizes round(n*f) for f in fractions (the last
    takes the rest); n excludes one trailing newline. For the real 100,000,000-character text8 this is
    exactly MD4's 90M/5M/5M split. Each slice is cut into chunk-character pieces (tasks); with no EOS in
    text8 the packed rows are the same as for one piece per split."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    n = p.stat().st_size
    if n:
        with open(p, "rb") as f:
            f.seek(n - 1)
            if f.read(1) == b"\n":
                n -= 1
    if n == 0:
        raise ValueError(f"{p}: empty")
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"text8 split fractions must be 3 numbers summing to 1, got {fractions}")
    b1 = round(n * fractions[0])
    b2 = b1 + round(n * fractions[1])
    bounds = {"train": (0, b1), "val": (b1, b2), "test": (b2, n)}
    return {s: [functools.partial(_text8_slice, str(p), a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
            for s, (lo, hi) in bounds.items()}


# ---- zero-shot evaluation sets ----------------------------------------------------------------
def _jsonl_texts(path: str, transform=None) -> list[str]:
    from data_pipeline.sources import read_text_file

    docs = read_text_file(Path(path))
    return [transform(d) for d in docs] if transform else docs


def lambada_tasks(path: str | Path) -> dict[str, list[Task]]:
    """LAMBADA jsonl (e.g. lambada_test.jsonl, one {"text": ...} per passage) -> split test."""
    files = _files(path, lambda f: f.suffix == ".jsonl", "*.jsonl files")
    return {"test": [functools.partial(_jsonl_texts, str(f), lambada_detokenize) for f in files]}


_WIKI_HEADING = re.compile(r"^ = [^=].* = $")


def _wikitext_articles(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    arts, cur = [], []
    for line in lines:
        if _WIKI_HEADING.match(line.rstrip("\n")) and any(l.strip() for l in cur):
            arts.append("".join(cur))
            cur = []
        cur.append(line)
    if any(l.strip() for l in cur):
        arts.append("".join(cur))
    return [wikitext_detokenize(a).strip() for a in arts]


def _standard_files(path: str | Path, names: dict[str, str], what: str) -> dict[str, list[Task]]:
    p = Path(path)
    if p.is_file():
        for pat, split in names.items():
            if re.fullmatch(pat, p.name):
                return {split: [p]}
        raise ValueError(f"{p}: file name is none of the standard {what} names ({', '.join(names)})")
    found: dict[str, list] = {}
    for f in _files(p, lambda f: any(re.fullmatch(pat, f.name) for pat in names), f"{what} files"):
        split = next(s for pat, s in names.items() if re.fullmatch(pat, f.name))
        found.setdefault(split, []).append(f)
    return {s: found[s] for s in ("train", "val", "test") if s in found}


def wikitext_split_tasks(path: str | Path) -> dict[str, list[Task]]:
    """wiki.test.tokens (or .raw; a file, or a folder with train/valid/test) -> test/val/train.
    One document per article (a top-level ' = Title = ' heading starts one)."""
    names = {r"wiki\.train\.(tokens|raw)": "train", r"wiki\.valid\.(tokens|raw)": "val",
             r"wiki\.test\.(tokens|raw)": "test"}
    return {s: [functools.partial(_wikitext_articles, str(f)) for f in fs]
            for s, fs in _standard_files(path, names, "WikiText").items()}


def _line_docs(path: str, kind: str) -> list[str]:
    detok = {"ptb": ptb_detokenize, "lm1b": lm1b_detokenize}[kind]
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    return [detok(l.strip()) for l in lines if l.strip()]


def ptb_split_tasks(path: str | Path) -> dict[str, list[Task]]:
    """ptb.{train,valid,test}.txt (Mikolov's PTB; a file or a folder) -> train/val/test, one sentence per
    document, ptb detokenizer (<unk> kept as is, as in SEDD/MDLM)."""
    names = {r"ptb\.train\.txt": "train", r"ptb\.valid\.txt": "val", r"ptb\.test\.txt": "test"}
    return {s: [functools.partial(_line_docs, str(f), "ptb") for f in fs]
            for s, fs in _standard_files(path, names, "PTB").items()}


def lm1b_split_tasks(path: str | Path) -> dict[str, list[Task]]:
    """One Billion Word held-out files news.en.heldout-000NN-of-00050 -> test (a folder: the standard
    test shard 00000 only; a file: that file), one sentence per document, lm1b detokenizer."""
    p = Path(path)
    pat = r"news\.en\.heldout-000\d\d-of-00050" if p.is_file() else r"news\.en\.heldout-00000-of-00050"
    return {s: [functools.partial(_line_docs, str(f), "lm1b") for f in fs]
            for s, fs in _standard_files(p, {pat: "test"}, "1BW held-out").items()}


# ---- images --------------------------------------------------------------------------------------
def chw_to_hwc_rows(data: np.ndarray, C: int, H: int, W: int) -> np.ndarray:
    """[n, C*H*W] in channel planes (CIFAR / downsampled ImageNet) -> [n, H*W*C] HWC-flattened uint8."""
    return np.ascontiguousarray(data.reshape(-1, C, H, W).transpose(0, 2, 3, 1)).reshape(len(data), H * W * C)


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"


def cifar10_splits(path: str | Path) -> tuple[dict[str, list[np.ndarray]], tuple[int, int, int]]:
    """cifar-10-python.tar.gz -> ({train: 5 batches, val: test batch}, (32, 32, 3))."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    found: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(p, "r:*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in CIFAR10_TRAIN + [CIFAR10_TEST]:
                    where = f"{p}:{m.name}"
                    try:
                        d = pickle.load(tf.extractfile(m), encoding="bytes")
                        data = np.asarray(d[b"data"], dtype=np.uint8)
                    except _DECODE_ERRORS as e:
                        raise _corrupt(where, e) from None
                    if data.ndim != 2 or data.shape[1] != 3072:
                        raise ValueError(f"{where}: data of shape {data.shape}, want (n, 3072)")
                    found[base] = chw_to_hwc_rows(data, 3, 32, 32)
    except _DECODE_ERRORS as e:
        if isinstance(e, ValueError) and str(e).startswith(str(p)):
            raise
        raise _corrupt(p, e) from None
    missing = [n for n in CIFAR10_TRAIN + [CIFAR10_TEST] if n not in found]
    if missing:
        raise ValueError(f"{p}: missing members {missing} (want cifar-10-batches-py/data_batch_1..5, test_batch)")
    return {"train": [found[n] for n in CIFAR10_TRAIN], "val": [found[CIFAR10_TEST]]}, (32, 32, 3)


def _load_npz_data(f: Path) -> np.ndarray:
    try:
        with np.load(f, allow_pickle=False) as z:
            return np.asarray(z["data"], dtype=np.uint8)
    except _DECODE_ERRORS as e:
        raise _corrupt(f, e) from None


def imagenet_splits(path: str | Path, image_size: int | None = None):
    """Downsampled ImageNet (Chrabaszcz et al. 2017) folder: train_data_batch_N[.npz] -> train (N in
    numeric order), val_data[.npz] -> val; key `data` [n, 3*S*S] in channel planes. S from image_size
    or the data width. Returns ({split: batch iterator}, (S, S, 3)); batches are loaded one at a time."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no such folder: {p}")
    num = lambda f: int(re.search(r"(\d+)", f.name.split("train_data_batch_")[1]).group(1))
    train = sorted((f for f in p.iterdir() if f.name.startswith("train_data_batch_")), key=num)
    val = [f for f in p.iterdir() if f.name in ("val_data", "val_data.npz")]
    if not train or not val:
        raise ValueError(f"{p}: want train_data_batch_N(.npz) and val_data(.npz) files "
                         f"(found {len(train)} train batches, {len(val)} val)")
    first = _load_npz_data(val[0])
    S = image_size or int(round((first.shape[1] / 3) ** 0.5))
    if first.ndim != 2 or first.shape[1] != 3 * S * S:
        raise ValueError(f"{val[0]}: data of shape {first.shape}, want (n, {3 * S * S}) for {S}x{S}x3 images")

    def batches(files):
        for f in files:
            d = first if f == val[0] else _load_npz_data(f)
            if d.ndim != 2 or d.shape[1] != 3 * S * S:
                raise ValueError(f"{f}: data of shape {d.shape}, want (n, {3 * S * S})")
            yield chw_to_hwc_rows(d, 3, S, S)

    return {"train": batches(train), "val": batches(val)}, (S, S, 3)


def read_idx_images(f: Path) -> np.ndarray:
    """An idx3-ubyte image file (optionally .gz) -> uint8 [n, rows, cols]."""
    try:
        raw = gzip.open(f, "rb").read() if f.suffix == ".gz" else f.read_bytes()
    except _DECODE_ERRORS as e:
        raise _corrupt(f, e) from None
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x803:
        raise ValueError(f"{f}: not an idx3-ubyte image file")
    n, r, c = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * r * c:
        raise ValueError(f"{f}: truncated or corrupt input: {len(raw) - 16} pixel bytes, header says "
                         f"{n} x {r} x {c} = {n * r * c}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, r, c)


def fashion_mnist_splits(path: str | Path):
    """Folder with train-images-idx3-ubyte[.gz] -> train and t10k-images-idx3-ubyte[.gz] -> val
    (test -> val, as for CIFAR-10). Returns ({split: [rows]}, (28, 28, 1))."""
    p = Path(path)
    out, shape = {}, None
    for split, stem in (("train", "train-images-idx3-ubyte"), ("val", "t10k-images-idx3-ubyte")):
        cands = [p / stem, p / (stem + ".gz")]
        f = next((c for c in cands if c.is_file()), None)
        if f is None:
            raise ValueError(f"{p}: missing {stem}(.gz)")
        imgs = read_idx_images(f)
        shape = (imgs.shape[1], imgs.shape[2], 1)
        out[split] = [imgs.reshape(len(imgs), -1)]
    return out, shape


# ---- pre-tokenized -------------------------------------------------------------------------------
def token_documents(path: str | Path, eos_id: int | None, dtype: str = "uint16") -> Iterator[np.ndarray]:
    """Documents from .npy / .bin files in path order. A 1-D array (or a raw .bin of `dtype`) is a
    stream of ids with eos_id after each document (a trailing piece without EOS is a document too);
    a 2-D .npy array holds one document per row. The EOS ids are removed (the packer puts them back)."""
    for f in _files(path, lambda f: f.suffix in (".npy", ".bin"), "*.npy/*.bin files"):
        if f.suffix == ".npy":
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except _DECODE_ERRORS as e:
                raise _corrupt(f, e) from None
        else:
            item = np.dtype(dtype).itemsize
            if f.stat().st_size % item:
                raise ValueError(f"{f}: truncated or corrupt input: {f.stat().st_size} bytes is not a "
                                 f"multiple of {dtype}'s {item}")
            a = np.memmap(f, dtype=dtype, mode="r") if f.stat().st_size else np.zeros(0, dtype)
        if a.ndim == 2:
            for row in a:
                yield np.asarray(row)
            continue
        if a.ndim != 1:
            raise ValueError(f"{f}: want a 1-D id stream or 2-D rows, got shape {a.shape}")
        if eos_id is None:
            raise ValueError(f"{f}: a 1-D id stream needs --eos-id (the document separator)")
        ends = np.flatnonzero(np.asarray(a) == eos_id)
        start = 0
        for e in ends:
            yield np.asarray(a[start:e])
            start = int(e) + 1
        if start < len(a):
            yield np.asarray(a[start:])
