"""The R serialization / lazy-load database reader, on a tiny database written here byte by byte
(R Internals, Sec. 1.8) and, when a corpus build has downloaded it, on janeaustenr's real one."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest

from saesteer.data.rdata import LazyLoadDB, RDataError, RVector, read_rds, unserialize

# --- a minimal XDR writer, enough for character/integer/double vectors and named lists ----------------


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _flags(t: int, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return _i(t | (attr << 9) | (tag << 10) | (levels << 12))


def _charsxp(s: str | None) -> bytes:
    if s is None:
        return _flags(9) + _i(-1)
    b = s.encode("utf-8")
    return _flags(9, levels=1 << 3) + _i(len(b)) + b  # UTF-8 flagged


def _sym(name: str) -> bytes:
    return _flags(1) + _charsxp(name)


def _attrs(**named) -> bytes:
    out = b""
    for key, value in named.items():
        out += _flags(2, tag=True) + _sym(key) + value
    return out + _i(254)  # NILVALUE ends the pairlist


def _vec(t: int, items: list, attrs: bytes = b"") -> bytes:
    head = _flags(t, attr=bool(attrs)) + _i(len(items))
    if t == 16:
        body = b"".join(_charsxp(s) for s in items)
    elif t in (10, 13):  # logical, integer
        body = b"".join(_i(-(2**31) if v is None else int(v)) for v in items)
    elif t == 14:
        body = b"".join(struct.pack(">d", v) for v in items)
    else:
        body = b"".join(items)
    return head + body + attrs


def _stream(item: bytes, version: int = 3) -> bytes:
    head = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + item


def _named_list(named: dict[str, bytes]) -> bytes:
    return _vec(19, list(named.values()), _attrs(names=_vec(16, list(named))))


def write_lazyload_db(base: Path, objects: dict[str, bytes]) -> None:
    """Write ``base.rdb``/``base.rdx`` as makeLazyLoadDB does (compressed = TRUE: 4-byte length + zlib)."""
    blobs, offsets = b"", {}
    for name, item in objects.items():
        data = _stream(item)
        blob = struct.pack(">I", len(data)) + zlib.compress(data)
        offsets[name] = (len(blobs), len(blob))
        blobs += blob
    base.with_suffix(".rdb").write_bytes(blobs)
    variables = _named_list({n: _vec(13, list(o)) for n, o in offsets.items()})
    index = _named_list({"variables": variables, "references": _vec(19, []), "compressed": _vec(10, [1])})
    base.with_suffix(".rdx").write_bytes(gzip.compress(_stream(index)))


# --- tests --------------------------------------------------------------------------------------------


def test_character_vector_with_na_and_unicode():
    v = unserialize(_stream(_vec(16, ["Emma Woodhouse", None, "naïve — café"])))
    assert isinstance(v, RVector) and v.rtype == 16
    assert list(v) == ["Emma Woodhouse", None, "naïve — café"]


@pytest.mark.parametrize("version", [2, 3])
def test_numbers_attributes_and_both_versions(version):
    ints = unserialize(_stream(_vec(13, [1, None, -7], _attrs(names=_vec(16, ["a", "b", "c"]))), version))
    assert list(ints) == [1, None, -7] and ints.as_dict() == {"a": 1, "b": None, "c": -7}
    reals = unserialize(_stream(_vec(14, [0.5, -2.25e10]), version))
    assert list(reals) == [0.5, -2.25e10]


def test_symbols_are_shared_through_the_reference_table():
    # a list whose two elements carry attributes tagged with the same symbol: the second tag is a REFSXP
    first = _vec(13, [1], _flags(2, tag=True) + _sym("class") + _vec(16, ["x"]) + _i(254))
    ref = _i(255 | (1 << 8))  # REFSXP to the first entry of the table ("class")
    second = _vec(13, [2], _flags(2, tag=True) + ref + _vec(16, ["y"]) + _i(254))
    v = unserialize(_stream(_vec(19, [first, second])))
    assert v[0].attributes == {"class": ["x"]} and v[1].attributes == {"class": ["y"]}


def test_compact_intseq_altrep():
    info = _flags(2) + _sym("compact_intseq") + _flags(2) + _sym("base") + _flags(2) + _vec(13, [13]) + _i(254)
    state = _vec(14, [4.0, 10.0, 1.0])
    v = unserialize(_stream(_i(238) + info + state + _i(254)))
    assert list(v) == [10, 11, 12, 13]


def test_lazyload_db_round_trip(tmp_path):
    novels = {"emma": ["EMMA", "", "By Jane Austen", None], "persuasion": ["Persuasion", "Chapter 1"]}
    write_lazyload_db(tmp_path / "Rdata", {k: _vec(16, v) for k, v in novels.items()})
    db = LazyLoadDB(tmp_path / "Rdata.rdb")
    assert db.names() == ["emma", "persuasion"] and db.compressed == 1
    assert {n: list(db[n]) for n in db.names()} == novels
    assert list(read_rds(tmp_path / "Rdata.rdx").names) == ["variables", "references", "compressed"]


def test_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(RDataError, match="XDR"):
        unserialize(b"A\n" + b"\0" * 20)
    with pytest.raises(RDataError, match="truncated"):
        unserialize(_stream(_vec(16, ["abc"]))[:-2])
    with pytest.raises(RDataError, match="type 21"):
        unserialize(_stream(_flags(21) + _i(0)))  # byte code


def _downloaded_janeaustenr() -> Path | None:
    for folder in (Path("runs/corpus/downloads"), Path(__file__).resolve().parents[2] / "runs/corpus/downloads"):
        hits = sorted(folder.glob("r-cran-janeaustenr_*.deb")) if folder.is_dir() else []
        if hits:
            return hits[-1]
    return None


def test_real_janeaustenr_database(tmp_path):
    deb = _downloaded_janeaustenr()
    if deb is None:
        pytest.skip("r-cran-janeaustenr not downloaded (run `saesteer corpus build --out runs/corpus`)")
    from saesteer.data.packages import read_austen

    novels = read_austen(deb, tmp_path)
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
    text = "\n".join(l or "" for l in novels["prideprejudice"])
    assert "It is a truth universally acknowledged" in text
    assert all(isinstance(l, str) for l in novels["emma"])
