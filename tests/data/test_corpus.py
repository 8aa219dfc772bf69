"""Corpus extractors on small built-in samples in each source's own format (no network)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from saesteer.data import corpus as C
from saesteer.data import packages as P

WORDNET_SAMPLE = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a member of the genus Canis (probably descended from the common wolf); "the dog barked all night"  
00002730 00 a 01 acroscopic 0 002 ;c 06066555 n 0000 ! 00002843 a 0101 | facing or on the side toward the apex  
01173405 00 s 01 beautiful(a) 0 001 & 01172889 a 0000 | delighting the senses  
"""


def test_wordnet_entries_parse_words_pos_and_gloss():
    rows = C.wordnet_entries(WORDNET_SAMPLE)
    assert [r[0] for r in rows] == ["dog", "acroscopic", "beautiful"]
    assert rows[0][1] == ('dog, domestic dog, Canis familiaris (noun): a member of the genus Canis (probably descended '
                          'from the common wolf); "the dog barked all night"')
    assert rows[1][1].startswith("acroscopic (adjective): facing")
    assert rows[2][1] == "beautiful (adjective): delighting the senses"  # the (a) marker is dropped


def test_wikipedia_and_recipe_entries():
    wiki = {"Cat": {"title": "Cat", "extract": "The cat is a small domesticated carnivorous mammal."},
            "Empty": {"title": "Empty", "extract": ""}}
    assert C.wikipedia_entries(wiki) == [("Cat", "The cat is a small domesticated carnivorous mammal.")]
    recipes = {"Cookbook:Tea": {"title": "Tea", "servings": "2", "time": "5 minutes", "ingredients": ["2 tea bags", " "],
                                "steps": ["Boil water.", "Steep the tea."]},
               "Cookbook:Nothing": {"title": "Nothing", "ingredients": [], "steps": []}}
    rows = C.recipe_entries(recipes)
    assert rows == [("Tea", "Serves 2. Time: 5 minutes.\n\nIngredients:\n- 2 tea bags\n\nSteps:\n1. Boil water.\n2. Steep the tea.")]


def test_chunk_text_keeps_every_word_and_respects_the_size():
    paras = [" ".join(f"w{p}_{i}." for i in range(40)) for p in range(30)]
    text = "\n\n".join(paras)
    chunks = C.chunk_text(text, size=500)
    assert len(chunks) > 1 and all(len(c) <= 500 for c in chunks)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())
    one_long = " ".join(f"Sentence {i} ends here." for i in range(200))  # no paragraph breaks (like SOTU)
    parts = C.chunk_text(one_long, size=300)
    assert all(len(p) <= 300 for p in parts) and " ".join(parts) == one_long
    assert C.chunk_text("  short  ") == ["short"] and C.chunk_text("") == []


def test_lines_to_paragraphs_handles_wrapped_lines_and_na():
    lines = ["CHAPTER I", "", "Emma Woodhouse, handsome, clever,", "and rich, with a comfortable home", None, "", "End."]
    assert C.lines_to_paragraphs(lines) == "CHAPTER I\n\nEmma Woodhouse, handsome, clever, and rich, with a comfortable home\n\nEnd."


def test_sotu_and_moby_dick_documents():
    speeches = [{"year": 1801, "name": "Thomas Jefferson", "party": "Democratic-Republican", "text": "Fellow citizens. " * 400},
                {"year": 1790, "name": "George Washington", "party": "None", "text": "Fellow-Citizens of the Senate."}]
    docs = list(C.sotu_documents(speeches))
    assert docs[0] == "State of the Union address, 1790, George Washington.\n\nFellow-Citizens of the Senate."
    assert docs[1].startswith("State of the Union address, 1801, Thomas Jefferson.") and len(docs) > 2
    assert not docs[2].startswith("State of the Union")
    chapters = [{"chapter": "2", "title": "The Carpet-Bag.", "text": "I stuffed a shirt or two."},
                {"chapter": "1", "title": "Loomings.", "text": "Call me Ishmael."}]
    assert list(C.moby_dick_documents(chapters)) == ["Chapter 1. Loomings.\n\nCall me Ishmael.",
                                                     "Chapter 2. The Carpet-Bag.\n\nI stuffed a shirt or two."]


def test_chat_rendering_uses_the_model_template(lm):
    _, tok = lm
    docs = C.chat_documents(tok, "wikipedia", [("Cat", "The cat is a small mammal.")])
    expected = tok.apply_chat_template(
        [{"role": "user", "content": C._ASK["wikipedia"][C._pick("Cat", len(C._ASK["wikipedia"]))].format(t="Cat")},
         {"role": "assistant", "content": "The cat is a small mammal."}], tokenize=False)
    assert docs == [expected]
    assert "<|im_start|>user\n" in docs[0] and "<|im_start|>assistant\nThe cat is a small mammal.<|im_end|>" in docs[0]
    share = sum(C.chat_share(f"title {i}", 0.5) for i in range(2000)) / 2000
    assert 0.45 < share < 0.55 and C.chat_share("x", 0.0) is False


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode() + body + (b"\n" if len(body) % 2 else b"")
    return out


def test_deb_members_reads_an_ar_archive_without_dpkg(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, body in {"./usr/share/wordnet/data.noun": WORDNET_SAMPLE.encode(), "./usr/share/doc/x": b"doc"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    deb = tmp_path / "wordnet-base_3.0_all.deb"
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"x", "data.tar.xz": buf.getvalue()}))
    got = P.deb_members(deb, lambda p: p.startswith("usr/share/wordnet/"))
    assert got == {"usr/share/wordnet/data.noun": WORDNET_SAMPLE.encode()}
    (tmp_path / "bad.deb").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="ar archive"):
        P.deb_members(tmp_path / "bad.deb", lambda p: True)


def test_build_from_cached_packages_is_deterministic(tmp_path):
    """A build from packages already in the cache (no network): the npm sources, made here."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for src, files in {
        "sotu": {"package/data/1790_george_washington_n.json": {"year": 1790, "name": "George Washington", "text": "Fellow-Citizens."},
                 "package/data/1791_george_washington_n.json": {"year": 1791, "name": "George Washington", "text": "Gentlemen."}},
        "moby_dick": {"package/data/chapter_1.json": {"chapter": "1", "title": "Loomings.", "text": "Call me Ishmael."}},
    }.items():
        with tarfile.open(cache / P.SOURCES[src].pattern, "w:gz") as tar:
            for name, obj in files.items():
                body = json.dumps(obj).encode()
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    shared = tmp_path / "shared"
    shared.mkdir()
    for split, text in {"train": "import this", "validation": "print(1)"}.items():
        with gzip.open(shared / f"{split}.jsonl.gz", "wt") as fh:
            fh.write(json.dumps({"source": "python3.11-doc/x", "text": text}) + "\n")
    m1 = C.build_corpus(tmp_path / "a", cache=cache, shared=shared, sources=["sotu", "moby_dick"], chat_fraction=0, log=lambda s: None)
    C.build_corpus(tmp_path / "b", cache=cache, shared=shared, sources=["sotu", "moby_dick"], chat_fraction=0, log=lambda s: None)
    for f in sorted((tmp_path / "a").glob("*.jsonl.gz")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    rows = [json.loads(l) for f in sorted((tmp_path / "a").glob("*.jsonl.gz")) for l in gzip.open(f, "rt")]
    assert {r["source"] for r in rows} == {"sotu", "moby_dick", "shared/python3.11-doc/x"}
    assert m1["sources"]["sotu"]["licence"] == "PDDL-1.0 AND CC0-1.0"
    assert abs(sum(s["share"] for s in m1["sources"].values()) - 1) < 1e-3
    assert m1["sources"]["shared"]["validation"]["characters"] == len("print(1)")  # shared keeps its split
    from saesteer.sae.activations import iter_texts

    val = [json.loads(l)["text"] for f in sorted((tmp_path / "a").glob("validation-*.jsonl.gz")) for l in gzip.open(f, "rt")]
    assert list(iter_texts(tmp_path / "a", "validation")) == val and "print(1)" in val
