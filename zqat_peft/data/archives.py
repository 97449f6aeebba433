"""Files from package registries: ``pip download`` and ``apt-get download`` into a folder, and members
copied out of wheels, sdists and Debian packages. What each asset takes from them is in
:mod:`zqat_peft.data.assets`."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Sequence


def pip_download(spec: str, dest: Path, progress: bool = True, extra_args: Sequence[str] = ()) -> Path:
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
            "check that PyPI is reachable (proxy, PIP_INDEX_URL) and retry zqat_peft.data.fetch(); without network "
            "access, PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder of the wheels>"
        )
    if progress and proc.stderr:
        sys.stderr.write(proc.stderr)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download of {spec!r} left {len(files)} files in {dest}, expected one")
    return files[0]


def apt_download(package: str, dest: Path, progress: bool = True) -> Path:
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


class Downloads:
    """Downloads shared by the assets of one ``fetch`` call (the gensim wheel feeds wiki and lee)."""

    def __init__(self, root: Path, progress: bool):
        self.root = root
        self.progress = progress
        self._files: dict[str, Path] = {}

    def pip(self, spec: str, extra_args: Sequence[str] = ()) -> Path:
        if spec not in self._files:
            sub = self.root / re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)
            self._files[spec] = pip_download(spec, sub, self.progress, extra_args)
        return self._files[spec]

    def apt(self, package: str) -> Path:
        key = "apt:" + package
        if key not in self._files:
            self._files[key] = apt_download(package, self.root / ("apt_" + package), self.progress)
        return self._files[key]


def extract_member(archive: Path, member_suffix: str, dest: Path) -> Path:
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


def extract_tree(archive: Path, prefix: str, dest: Path) -> int:
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


def extract_deb(deb: Path, member_prefix: str, dest: Path) -> list[Path]:
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
