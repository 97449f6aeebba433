"""Reading the files a job depends on, with one clear error per bad file.

Every reader here takes ``fix``, what the user should do about a bad file (``"train the adapter again"``), and
raises before any expensive work starts: a missing file is a ``FileNotFoundError``, a file that exists but
cannot be read as what it should be (truncated, corrupted, another format) a ``CorruptFileError``; both name
the file and say what to do, in one line. A check reads a file's header or index, not its payload, so it is
cheap enough to run before loading a model.

Formats: JSON, YAML, safetensors (whose header must describe exactly the bytes that follow, so truncation is
caught) and torch archives (``torch.save``'s zip, whose central directory sits at the end of the file).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


class CorruptFileError(ValueError):
    """A file that exists but cannot be read as what it should be: truncated, corrupted or of another format."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {' '.join(problem.split())}; {fix}")


def require_file(path: str | os.PathLike, fix: str) -> Path:
    """``path`` as a Path; a ``FileNotFoundError`` naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        missing = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{path} {missing}; {fix}")
    return path


def read_text(path: str | os.PathLike, fix: str) -> str:
    path = require_file(path, fix)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorruptFileError(path, f"is not UTF-8 text (byte {e.start})", fix) from e


def read_json(path: str | os.PathLike, fix: str) -> Any:
    text = read_text(path, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(path, f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})", fix) from e


def read_yaml(path: str | os.PathLike, fix: str) -> Any:
    text = read_text(path, fix)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise CorruptFileError(path, f"is not valid YAML ({problem}{where})", fix) from e


def read_mapping(path: str | os.PathLike, fix: str) -> dict:
    """A JSON (``.json``) or YAML (any other suffix) file whose top level is a mapping."""
    data = read_json(path, fix) if Path(path).suffix == ".json" else read_yaml(path, fix)
    if not isinstance(data, dict):
        raise CorruptFileError(path, f"holds a {type(data).__name__}, not a mapping of keys to values", fix)
    return data


def check_safetensors(path: str | os.PathLike, fix: str) -> dict[str, str]:
    """Check that ``path`` is a whole safetensors file (its header covers exactly the bytes that follow);
    returns its metadata. Reads the header only."""
    path = require_file(path, fix)
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError as e:
        raise CorruptFileError(path, f"is not a whole safetensors file ({e}): it was truncated or corrupted", fix) from e


def load_safetensors(path: str | os.PathLike, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file, after ``check_safetensors``."""
    metadata = check_safetensors(path, fix)
    return load_file(str(path)), metadata


def check_torch_archive(path: str | os.PathLike, fix: str) -> None:
    """Check that ``path`` is a whole ``torch.save`` archive (a zip whose index, at the end, is intact)."""
    path = require_file(path, fix)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, EOFError) as e:
        raise CorruptFileError(path, f"is not a whole torch.save archive ({e}): it was truncated or corrupted",
                               fix) from e


def check_file(path: str | os.PathLike, fix: str) -> None:
    """The check that fits the file's suffix (JSON, YAML, safetensors, torch archive); other files must exist."""
    suffix = Path(path).suffix
    if suffix == ".json":
        read_json(path, fix)
    elif suffix in (".yaml", ".yml"):
        read_yaml(path, fix)
    elif suffix == ".safetensors":
        check_safetensors(path, fix)
    elif suffix in (".pt", ".pth", ".bin"):
        check_torch_archive(path, fix)
    else:
        require_file(path, fix)


def check_adapter(folder: str | os.PathLike, peft_type: str, fix: str) -> dict:
    """Check a saved peft adapter folder before a model is built for it: its ``adapter_config.json`` is a
    mapping of ``peft_type``, and its weights file is whole. Returns the config mapping."""
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not an adapter folder ({'a file' if folder.exists() else 'no such folder'});"
                                f" {fix}")
    config = read_mapping(folder / CONFIG_NAME, fix)
    if config.get("peft_type") != peft_type:
        raise CorruptFileError(folder / CONFIG_NAME, f"is a {config.get('peft_type')!r} adapter, not a {peft_type!r} "
                               "one", fix)
    if (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        check_safetensors(folder / SAFETENSORS_WEIGHTS_NAME, fix)
    elif (folder / WEIGHTS_NAME).is_file():
        check_torch_archive(folder / WEIGHTS_NAME, fix)
    else:
        raise FileNotFoundError(f"{folder} has no adapter weights ({SAFETENSORS_WEIGHTS_NAME}); {fix}")
    return config
