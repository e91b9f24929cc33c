"""The Packages index: a Packages file (xz, gz or plain) scanned once into a small SQLite
file (name -> where its newest entry lies in ``packages.rows``, virtual name -> providers),
cached by the compressed file's sha256 so a warm lookup takes well under a millisecond.
The entries themselves are appended to ``packages.rows`` (one marshal record each) as they
come: SQLite's B-tree then holds 68,000 short keys instead of 30 MB of rows, which took
about a third of a cold index's CPU time.

The scan is a stream: compressed bytes go in as they arrive (from the network or the
cache), are decompressed in bounded pieces (the decoder releases the GIL) and handed to a
parser thread that keeps only the fields of INDEX_FIELDS. Nothing is written until the
caller says the compressed bytes matched their sha256 (``IndexStream.write``), so a bad
download never becomes an index.
"""
from __future__ import annotations

import errno
import lzma
import marshal
import os
import queue
import re
import threading
import zlib
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import quote

from builder.errors import ArmvmError

INDEX_FORMAT = "debidx2"
INDEX_FIELDS = ("Package", "Version", "Architecture", "Filename", "SHA256", "Size", "Depends",
                "Provides")
MAX_PARAGRAPH = 16 * 1024 * 1024  # one package's paragraph
ROWS_FILE = "packages.rows"       # the entries, beside packages.sqlite
PIECE = 1024 * 1024               # decompressed bytes handed to the parser at a time
XZ_MEMLIMIT = 256 * 1024 * 1024


class Index:
    """A parsed Packages file: name -> the newest entry, and virtual name -> providers."""

    def __init__(self, path: Path):
        import sqlite3
        self.db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True)
        self.db.text_factory = lambda b: b.decode("utf-8", "replace")
        self._rows = open(path.with_name(ROWS_FILE), "rb")

    def get(self, name: str) -> tuple | None:
        """(name, version, architecture, filename, sha256, size, depends) or None."""
        hit = self.db.execute("SELECT off, len FROM packages WHERE name = ?", (name,)).fetchone()
        if hit is None:
            return None
        record = os.pread(self._rows.fileno(), hit[1], hit[0])     # no shared file position
        pkg, version, arch, filename, sha, size, depends = marshal.loads(record)
        text = [f.strip(b" ").decode("utf-8", "replace")
                for f in (version, arch, filename, sha, depends)]
        return (pkg.decode("utf-8", "replace"), *text[:4], size, text[4])

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM packages")]

    def providers(self, name: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT provider FROM provides WHERE virtual = ? ORDER BY provider",
            (name,))]


# One match per wanted field with its continuation lines; every other line is skipped by
# the regex engine, not by Python. A paragraph ends at an empty line. Field names are
# case-insensitive: a paragraph whose `Package` is spelled otherwise than the archive spells
# it is read again with the (slower) case-insensitive pattern.
_FIELD_PATTERN = (rb"\n(" + b"|".join(f.encode() for f in INDEX_FIELDS) + rb")[ \t]*:[ \t]*"
                  rb"([^\n]*(?:\n[ \t][^\n]*)*)")
_FIELD_RE = re.compile(_FIELD_PATTERN)                   # the archive's spelling: fast
_FIELD_ANY_CASE_RE = re.compile(_FIELD_PATTERN, re.IGNORECASE)
_CANONICAL = {f.lower().encode(): f.encode() for f in INDEX_FIELDS}


class _Parser:
    """Paragraphs -> (best row per name, provides pairs). Text arrives in pieces cut
    anywhere; whole paragraphs are scanned, the unfinished last one waits for more."""

    def __init__(self, what: str, sink=None):
        self.what, self.sink = what, sink     # sink(rows, provides) gets what each scan found
        self.rest = b""
        self.best: dict[bytes, tuple] = {}
        self.provides: set[tuple[bytes, bytes]] = set()

    def feed(self, piece: bytes) -> None:
        buf = self.rest + piece if self.rest else piece
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.rest = buf
        else:
            self._scan(buf[:cut])
            self.rest = buf[cut + 2:]
        if len(self.rest) > MAX_PARAGRAPH:
            raise ArmvmError(f"{self.what}: a paragraph is longer than {MAX_PARAGRAPH} bytes")

    def finish(self) -> tuple[dict, set]:
        self._scan(self.rest)
        self.rest = b""
        return self.best, self.provides

    def _scan(self, text: bytes) -> None:
        findall, best, seen = _FIELD_RE.findall, self.best, self.provides
        rows: list[tuple] = []
        pairs: list[tuple[bytes, bytes]] = []
        for para in text.split(b"\n\n"):
            fields = dict(findall(b"\n" + para))
            if b"Package" not in fields:              # field names are case-insensitive
                fields = {_CANONICAL[k.lower()]: v
                          for k, v in _FIELD_ANY_CASE_RE.findall(b"\n" + para)}
            name = fields.get(b"Package", b"").strip()
            if not name:
                continue
            depends = fields.get(b"Depends", b"")
            if b"\n" in depends or b"\t" in depends or b"  " in depends:
                depends = b" ".join(depends.split())
            try:
                size = int(fields.get(b"Size", b"-1"))
            except ValueError:
                size = -1
            row = (name, fields.get(b"Version", b""), fields.get(b"Architecture", b""),
                   fields.get(b"Filename", b""), fields.get(b"SHA256", b""), size, depends)
            old = best.get(name)
            if old is None or (old[1].strip() != row[1].strip() and _newer(row[1], old[1])):
                best[name] = row
                rows.append(row)
            provides = fields.get(b"Provides")
            if provides:
                for alt in provides.split(b","):
                    virtual = alt.strip().split(None, 1)[0:1]
                    virtual = virtual[0].split(b"(", 1)[0] if virtual else b""
                    if virtual and (virtual, name) not in seen:
                        seen.add((virtual, name))
                        pairs.append((virtual, name))
        if self.sink is not None and (rows or pairs):
            self.sink(rows, pairs)


def _newer(a: bytes, b: bytes) -> bool:
    from debian.debian_support import Version
    try:
        return Version(a.decode("utf-8", "replace").strip()) > \
            Version(b.decode("utf-8", "replace").strip())
    except ValueError:
        return False


def _decompressor(compression: str):
    if compression == ".xz":
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    if compression == ".gz":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    return None


class IndexStream:
    """Compressed bytes in (``feed``/``tee``), decompressed here in pieces of PIECE bytes
    (at most ``max_bytes`` in all), parsed in one thread and written to
    ``dest/packages.sqlite`` in another as the rows come (SQLite and the decoder release
    the GIL, so the three overlap). ``dest`` is the cache's uncommitted work folder: the
    index becomes visible only when the caller commits it, after the sha256 check."""

    def __init__(self, compression: str, max_bytes: int, what: str, dest: Path):
        if compression not in (".xz", ".gz", ""):
            raise ArmvmError(f"{what}: unsupported compression {compression!r}")
        self.compression, self.what, self.budget, self.dest = compression, what, max_bytes, dest
        self._dec = _decompressor(compression)
        self._pieces: queue.Queue = queue.Queue(maxsize=8)
        self._batches: queue.Queue = queue.Queue(maxsize=8)
        self._parser = _Parser(what, lambda rows, pairs: self._batches.put((rows, pairs)))
        self._error: BaseException | None = None      # first error of either thread
        self._failed: ArmvmError | None = None        # a scan error seen by ``tee``
        self._rows = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._parse, name="packages-scan", daemon=True),
                         threading.Thread(target=self._write, name="packages-index", daemon=True)]
        for t in self._threads:
            t.start()

    # --- producer side (the caller's thread) --------------------------------------------
    def tee(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` unchanged, feeding each one to the scan first. A scan error
        stops the scan but not the transfer: it is raised by ``finish``, after the caller
        has checked the bytes' sha256 (a corrupt download is named as such)."""
        for chunk in chunks:
            if self._failed is None:
                try:
                    self.feed(chunk)
                except ArmvmError as e:
                    self._failed = e
            yield chunk

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            self._raise()
        dec = self._dec
        if dec is None:
            self._emit(data)
            return
        try:
            while True:
                if dec.eof:                        # a concatenated stream or gzip member
                    data = dec.unused_data + data
                    if not data:
                        return
                    dec = self._dec = _decompressor(self.compression)
                if self.compression == ".gz":
                    data = dec.unconsumed_tail + data
                elif not data and dec.needs_input:
                    return
                out = dec.decompress(data, PIECE)
                data = b""
                if not out:
                    return
                self._emit(out)
        except (lzma.LZMAError, zlib.error, EOFError, MemoryError) as e:
            raise ArmvmError(f"{self.what}: cannot decompress: {e}") from None

    def _emit(self, piece: bytes) -> None:
        self.budget -= len(piece)
        if self.budget < 0:
            raise ArmvmError(f"{self.what}: larger than its Release entry allows")
        self._pieces.put(piece)
        if self._error is not None:
            self._raise()

    def finish(self) -> None:
        """Wait until ``dest/packages.sqlite`` is complete; raise what went wrong."""
        if self._failed is not None:
            self.close()
            raise self._failed
        if self._dec is not None and not self._dec.eof:
            self.close()
            raise ArmvmError(f"{self.what}: the compressed data ends early")
        self.close()
        if self._error is not None:
            self._raise()

    def close(self) -> None:
        """Stop both threads (always call it, also on errors)."""
        if not self._closed:
            self._closed = True
            self._pieces.put(None)
            for t in self._threads:
                t.join()

    def _raise(self) -> None:
        err = self._error
        if isinstance(err, ArmvmError):
            raise ArmvmError(str(err)) from None
        raise ArmvmError(f"{self.what}: cannot be read: {type(err).__name__}: "
                         f"{str(err)[:200]}") from None

    # --- the two threads ---------------------------------------------------------------
    def _parse(self) -> None:
        parser = self._parser
        try:
            while True:
                piece = self._pieces.get()
                if piece is None:
                    break
                if self._error is None:       # else drain, so the producer never blocks
                    try:
                        parser.feed(piece)
                    except BaseException as e:
                        self._error = self._error or e
            if self._error is None:
                try:
                    parser.finish()
                except BaseException as e:
                    self._error = self._error or e
        finally:
            self._batches.put(None)

    def _write(self) -> None:
        import sqlite3
        db = rows_file = None
        where: dict[bytes, tuple[int, int]] = {}     # name -> (offset, length) in ROWS_FILE
        try:
            db = _create(self.dest / "packages.sqlite")
            rows_file = open(self.dest / ROWS_FILE, "wb")
            off = 0
            while True:
                batch = self._batches.get()
                if batch is None:
                    break
                if self._error is not None:
                    continue                    # drain, so the parser never blocks
                rows, pairs = batch
                self._rows += len(rows)
                records = [marshal.dumps(row) for row in rows]
                for row, rec in zip(rows, records):
                    where[row[0]] = (off, len(rec))   # a newer version of a name replaces it
                    off += len(rec)
                rows_file.write(b"".join(records))
                db.executemany(_INSERT_PROVIDES, pairs)
            if self._error is None:
                rows_file.close()
                db.executemany(_INSERT_PACKAGE, sorted((k, *v) for k, v in where.items()))
                db.execute("CREATE INDEX provides_virtual ON provides (virtual)")
                db.commit()
        except sqlite3.Error as e:
            self._error = self._error or _sqlite_error(e, self.dest, self._rows, self.what)
            while self._batches.get() is not None:
                pass
        except BaseException as e:
            if isinstance(e, OSError) and self._error is None:
                e = _sqlite_error(e, self.dest, self._rows, self.what)
            self._error = self._error or e
            while self._batches.get() is not None:
                pass
        finally:
            if rows_file is not None:
                rows_file.close()
            if db is not None:
                db.close()


def build_index(packages_file: Path, compression: str, dest: Path, max_bytes: int,
                what: str) -> None:
    """Scan a Packages file already on disk into ``dest/packages.sqlite``."""
    stream = IndexStream(compression, max_bytes, what, dest)
    try:
        with open(packages_file, "rb") as f:
            for chunk in iter(lambda: f.read(256 * 1024), b""):
                stream.feed(chunk)
        stream.finish()
    finally:
        stream.close()


def _sqlite_error(e: Exception, dest: Path, rows: int, what: str) -> ArmvmError:
    full = "full" in str(e) or "disk I/O" in str(e) or \
        getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return ArmvmError(f"{what}: cannot write its index in {dest}: {e}"
                      + ("; free space there, run `armvm-build cache prune`, or set "
                         "ARMVM_CACHE_DIR to a larger disk (the index takes about "
                         f"{max(rows, 70000) * 350 / (1 << 20):.0f} MiB)" if full else ""))


# Names are kept as bytes and made text by SQLite (CAST), without a Python call per name
# (the reader decodes with errors="replace"); they go in sorted, so the B-tree grows in order.
_INSERT_PACKAGE = "INSERT INTO packages VALUES (CAST(? AS TEXT), ?, ?)"
_INSERT_PROVIDES = "INSERT INTO provides VALUES (CAST(? AS TEXT), CAST(? AS TEXT))"


def _create(path: Path):
    import sqlite3
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("CREATE TABLE packages (name TEXT PRIMARY KEY, off INTEGER, len INTEGER) "
               "WITHOUT ROWID")
    db.execute("CREATE TABLE provides (virtual TEXT, provider TEXT)")
    return db
