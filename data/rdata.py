"""A minimal reader of R's serialization format and of R's lazy-load databases (``.rdb``/``.rdx``).

Written from R's documented format (R Internals, Sec. 1.8 "Serialization formats"; the layout of a
lazy-load database is the one ``makeLazyLoadDB`` writes), so that packaged R data (CRAN's
``janeaustenr`` as Debian ships it) can be read without R. It reads what data files hold: vectors
(logical, integer, double, complex, character, raw, list), attributes, pairlists, symbols,
environments and the ALTREP compact sequences and wrappers. Byte code and external pointers are
not needed for data and raise :class:`RDataError`.

Format summary (XDR, big-endian):

- a stream starts with ``b"X\\n"``, then ints ``version`` (2 or 3), the writer's R version and the
  minimal reader version; version 3 adds an int length and the native encoding name;
- every item starts with an int of flags: ``type = flags & 0xFF``, ``is_object = bit 8``,
  ``has_attr = bit 9``, ``has_tag = bit 10``, ``levels = flags >> 12`` (for a CHARSXP, its encoding);
- vectors: an int length (-1 then two ints for a long vector), then the elements; a CHARSXP of
  length -1 is ``NA``; ``NA_integer_`` is -2^31;
- pairlists (and calls, closures, promises): attributes if ``has_attr``, tag if ``has_tag``, CAR,
  then CDR; other items read their attributes after their contents;
- symbols, environments and persistent names enter a reference table, and a REFSXP
  (``index = flags >> 8``, or a following int when 0) points back into it (1-based).

A lazy-load database: ``NAME.rdx`` is a gzip-compressed serialized list ``{variables, references,
compressed}`` where ``variables`` maps each object's name to an integer pair (byte offset, length)
into ``NAME.rdb``. Each blob there is a serialized object, compressed: for ``compressed`` 1 (TRUE),
a 4-byte big-endian uncompressed length then a zlib stream; for 2 and 3, the same 4 bytes, a type
byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none), then the stream. Environments inside blobs
are written as persistent names (``PERSISTSXP``); we return them as :class:`RPersistent` without
resolving them.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

NA_INTEGER = -(2**31)

# SEXP types (R Internals, Sec. 1.1.1) and the pseudo-types serialization adds
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

_PAIRLIST_TYPES = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}
_UTF8_MASK, _LATIN1_MASK = 1 << 3, 1 << 2


class RDataError(ValueError):
    """A stream that is not R serialization, or holds something this reader does not handle."""


class RVector(list):
    """An R vector as a Python list (``None`` for NA), with its R ``type`` and ``attributes``
    (a dict: ``names``, ``class``, ``dim``, ``row.names``, ...)."""

    def __init__(self, items=(), rtype: int = VECSXP, attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    @property
    def names(self) -> list | None:
        """The ``names`` attribute, or None."""
        return self.attributes.get("names")

    def as_dict(self) -> dict:
        """``{name: element}`` for a named vector.

        Raises:
            RDataError: the vector has no names.
        """
        if self.names is None:
            raise RDataError("the vector has no names")
        return dict(zip(self.names, self))


class RSymbol(str):
    """An R symbol (its name)."""


@dataclass
class RPairlist:
    """A pairlist, call or closure: ``items`` as (tag or None, value); ``rtype`` says which."""

    rtype: int
    items: list = field(default_factory=list)
    attributes: dict = field(default_factory=dict)


@dataclass
class REnvironment:
    """An environment: ``frame`` maps names to values; ``special`` names a global one."""

    frame: dict = field(default_factory=dict)
    enclos: object = None
    special: str = ""
    attributes: dict = field(default_factory=dict)


@dataclass
class RPersistent:
    """A persistent name written by a serialization hook (e.g. ``env::3`` in a lazy-load DB)."""

    names: list


_SPECIALS = {
    NILVALUE_SXP: None,
    GLOBALENV_SXP: REnvironment(special="global"),
    EMPTYENV_SXP: REnvironment(special="empty"),
    BASEENV_SXP: REnvironment(special="base"),
    BASENAMESPACE_SXP: REnvironment(special="base namespace"),
    UNBOUNDVALUE_SXP: RSymbol("<unbound>"),
    MISSINGARG_SXP: RSymbol(""),
}


class _Reader:
    def __init__(self, data: bytes):
        self.buf = memoryview(data)
        self.pos = 0
        self.refs: list = []

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise RDataError(f"truncated stream: wanted {n} bytes at offset {self.pos} of {len(self.buf)}")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.raw(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def header(self) -> int:
        fmt = self.raw(2)
        if fmt != b"X\n":
            raise RDataError(f"not R XDR serialization (starts with {fmt!r}; only the 'X' format is read)")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self.raw(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"serialization version {version} is not supported (2 or 3)")
        return version

    def string_vec(self) -> list:
        if self.int() != 0:
            raise RDataError("malformed persistent string vector")
        return [self.item() for _ in range(self.length())]

    def attributes(self) -> dict:
        attr = self.item()
        if not isinstance(attr, RPairlist):
            raise RDataError("attributes are not a pairlist")
        return {str(tag): value for tag, value in attr.items}

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in _SPECIALS:
            return _SPECIALS[t]
        if t == REFSXP:
            i = flags >> 8 or self.int()
            return self.refs[i - 1]
        if t == PERSISTSXP:
            out = RPersistent(self.string_vec())
            self.refs.append(out)
            return out
        if t in (NAMESPACESXP, PACKAGESXP):
            out = REnvironment(special=("namespace:" if t == NAMESPACESXP else "package:") + ",".join(map(str, self.string_vec())))
            self.refs.append(out)
            return out
        if t == SYMSXP:
            out = RSymbol(self.item() or "")
            self.refs.append(out)
            return out
        if t == ENVSXP:
            self.int()  # locked
            env = REnvironment()
            self.refs.append(env)
            env.enclos = self.item()
            frame, hashtab = self.item(), self.item()
            if isinstance(frame, RPairlist):
                env.frame.update({str(k): v for k, v in frame.items})
            if isinstance(hashtab, RVector):
                for bucket in hashtab:
                    if isinstance(bucket, RPairlist):
                        env.frame.update({str(k): v for k, v in bucket.items})
            attr = self.item()
            if isinstance(attr, RPairlist):
                env.attributes = {str(k): v for k, v in attr.items}
            return env
        if t in _PAIRLIST_TYPES:
            return self.pairlist(t, has_attr, has_tag)
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            b = self.raw(n)
            levels = flags >> 12
            if levels & _LATIN1_MASK and not levels & _UTF8_MASK:
                return b.decode("latin-1")
            return b.decode("utf-8", errors="replace")
        if t == ALTREP_SXP:
            return self.altrep()
        if t in (SPECIALSXP, BUILTINSXP):
            return RSymbol(self.raw(self.int()).decode())
        out = self.vector(t)
        if has_attr:
            out.attributes = self.attributes()
        return out

    def pairlist(self, t: int, has_attr: bool, has_tag: bool) -> RPairlist:
        out = RPairlist(LISTSXP if t == ATTRLISTSXP else LANGSXP if t == ATTRLANGSXP else t)
        first = True
        while True:  # follow the CDR chain iteratively: long pairlists would overflow recursion
            attr = self.attributes() if has_attr else {}
            if first:
                out.attributes, first = attr, False
            tag = self.item() if has_tag else None
            out.items.append((tag, self.item()))
            flags = self.int()
            nt = flags & 0xFF
            if nt not in (LISTSXP, ATTRLISTSXP) and nt != t:
                self.pos -= 4
                cdr = self.item()
                if cdr is not None:
                    out.items.append((None, cdr))  # a dotted pair's non-NULL tail
                return out
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def vector(self, t: int) -> RVector:
        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self.raw(4 * n))
            if t == LGLSXP:
                return RVector((None if v == NA_INTEGER else bool(v) for v in vals), t)
            return RVector((None if v == NA_INTEGER else v for v in vals), t)
        if t == REALSXP:
            n = self.length()
            return RVector(struct.unpack(f">{n}d", self.raw(8 * n)), t)
        if t == CPLXSXP:
            n = self.length()
            v = struct.unpack(f">{2 * n}d", self.raw(16 * n))
            return RVector((complex(v[2 * i], v[2 * i + 1]) for i in range(n)), t)
        if t == RAWSXP:
            return RVector(self.raw(self.length()), t)
        if t in (STRSXP, VECSXP, EXPRSXP):
            n = self.length()
            return RVector((self.item() for _ in range(n)), t)
        if t == S4SXP:
            return RVector((), t)
        raise RDataError(f"R type {t} is not supported by this reader (byte code, external pointers)")

    def altrep(self):
        info, state, attr = self.item(), self.item(), self.item()
        cls = str(info.items[0][1]) if isinstance(info, RPairlist) and info.items else "?"
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state
            vals = [start + i * step for i in range(int(n))]
            out = RVector((int(v) for v in vals) if cls == "compact_intseq" else vals, INTSXP if cls == "compact_intseq" else REALSXP)
        elif cls.startswith("wrap_"):
            out = RVector(state[0], getattr(state[0], "rtype", VECSXP))
        elif cls == "deferred_string":
            src = state.items[0][1] if isinstance(state, RPairlist) else state
            out = RVector((None if v is None else str(v) for v in src), STRSXP)
        else:
            raise RDataError(f"ALTREP class {cls!r} is not supported")
        if isinstance(attr, RPairlist):
            out.attributes = {str(k): v for k, v in attr.items}
        return out


def unserialize(data: bytes):
    """Read one R object from serialized bytes (what ``serialize(x, NULL)`` gives, XDR format).

    Returns:
        Python values: ``RVector`` (a list) for vectors, ``None`` for NULL, ``RPairlist``,
        ``RSymbol``, ``REnvironment`` or ``RPersistent``.

    Raises:
        RDataError: not the XDR format, an unsupported version or type, or a truncated stream.
    """
    r = _Reader(data)
    r.header()
    return r.item()


def _decompress_file(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(path: str | os.PathLike):
    """Read an ``.rds`` file (``saveRDS``; gzip, bzip2, xz or uncompressed).

    Raises:
        RDataError: see :func:`unserialize`.
    """
    return unserialize(_decompress_file(Path(path).read_bytes()))


class LazyLoadDB:
    """An R lazy-load database: ``NAME.rdb`` (the blobs) indexed by ``NAME.rdx``.

    Args:
        path: the database path with or without the ``.rdb``/``.rdx`` suffix.

    Raises:
        FileNotFoundError: either file is missing.
        RDataError: the index is not what ``makeLazyLoadDB`` writes.
    """

    def __init__(self, path: str | os.PathLike):
        base = str(path)
        for suffix in (".rdb", ".rdx"):
            base = base.removesuffix(suffix)
        self.rdb, self.rdx = Path(base + ".rdb"), Path(base + ".rdx")
        index = read_rds(self.rdx)
        if not isinstance(index, RVector) or index.names is None:
            raise RDataError(f"{self.rdx}: the index is not a named list")
        idx = index.as_dict()
        self.variables: dict[str, tuple[int, int]] = {
            name: (int(v[0]), int(v[1])) for name, v in idx["variables"].as_dict().items()
        }
        comp = idx.get("compressed", RVector([True]))
        comp = comp[0] if isinstance(comp, RVector) and len(comp) else comp
        self.compressed = int(comp) if comp is not None else 1

    def names(self) -> list[str]:
        """The objects in the database, in the index's order."""
        return list(self.variables)

    def blob(self, offset: int, length: int) -> bytes:
        """The decompressed serialized bytes at (offset, length) of the ``.rdb`` file.

        Raises:
            RDataError: an unknown compression type or a size mismatch.
        """
        with open(self.rdb, "rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise RDataError(f"{self.rdb}: blob at {offset} is truncated ({len(data)} of {length} bytes)")
        if self.compressed in (0,):
            return data
        size = struct.unpack(">I", data[:4])[0]
        if self.compressed == 1:
            out = zlib.decompress(data[4:])
        else:
            kind, body = data[4:5], data[5:]
            if kind == b"Z":
                out = zlib.decompress(body)
            elif kind == b"2":
                out = bz2.decompress(body)
            elif kind == b"X":
                out = lzma.decompress(body, format=lzma.FORMAT_XZ)
            elif kind == b"0":
                out = body
            else:
                raise RDataError(f"{self.rdb}: unknown compression type {kind!r}")
        if len(out) != size:
            raise RDataError(f"{self.rdb}: blob at {offset} decompressed to {len(out)} bytes, header says {size}")
        return out

    def __getitem__(self, name: str):
        """The object ``name``.

        Raises:
            KeyError: no such object.
        """
        return unserialize(self.blob(*self.variables[name]))
