"""The text corpora's sources turned into train / validation / test JSON-lines files: Wikipedia articles
from a MediaWiki dump, the Lee news stories, Jane Austen's chapters from an R lazy-load database. Where the
sources come from and the cache layout are in :mod:`zqat_peft.data.assets`."""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Sequence

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
AUSTEN_BOOKS = {  # janeaustenr's object names, in publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


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


def write_splits(records: list[dict], keys: list[str], out: Path) -> dict:
    """``records`` into ``out/{train,validation,test}.jsonl`` by ``split_documents`` of ``keys``; per-split counts."""
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


def build_wiki(bz2_path: Path, out: Path) -> dict:
    articles = extract_wiki_articles(bz2_path)
    if not articles:
        raise RuntimeError(f"no articles found in {bz2_path.name}")
    stats = write_splits(articles, [a["title"] for a in articles], out)
    return {"documents": len(articles), "chars": sum(len(a["text"]) for a in articles), "splits": stats}


def build_lee(cor_path: Path, out: Path) -> dict:
    lines = cor_path.read_text(encoding="utf-8", errors="replace").splitlines()
    docs = [{"id": i, "text": t} for i, t in enumerate(ln.strip() for ln in lines if ln.strip())]
    stats = write_splits(docs, [d["text"] for d in docs], out)
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


def build_austen(data_dir: Path, out: Path) -> dict:
    books = read_r_lazyload(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    records = []
    for book in sorted(books, key=lambda b: list(AUSTEN_BOOKS).index(b) if b in AUSTEN_BOOKS else 99):
        for rec in _austen_chapters(book, books[book]):
            records.append({"id": len(records), **rec})
    if not records:
        raise RuntimeError("janeaustenr data held no text")
    stats = write_splits(records, [f"{r['book']}/{r['chapter']}" for r in records], out)
    return {"documents": len(records), "books": len(books), "chars": sum(len(r["text"]) for r in records),
            "splits": stats}
