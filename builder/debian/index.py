"""The Packages index: a Packages file (xz, gz or plain) parsed once with python-debian into
a small SQLite file (name -> newest entry, virtual name -> providers), cached by the
compressed file's sha256 so a warm lookup takes well under a millisecond.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from builder.errors import ArmvmError

INDEX_FORMAT = "debidx1"
INDEX_FIELDS = ("Package", "Version", "Architecture", "Filename", "SHA256", "Size", "Depends",
                "Provides")
MAX_LINE = 1024 * 1024


class Index:
    """A parsed Packages file: name -> the newest entry, and virtual name -> providers."""

    def __init__(self, path: Path):
        import sqlite3
        self.db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True)

    def get(self, name: str) -> tuple | None:
        return self.db.execute("SELECT name, version, architecture, filename, sha256, size, "
                               "depends FROM packages WHERE name = ?", (name,)).fetchone()

    def names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM packages")]

    def providers(self, name: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT provider FROM provides WHERE virtual = ? ORDER BY provider",
            (name,))]


_WANTED_RE = re.compile(rb"(?i)(" + b"|".join(f.encode() for f in INDEX_FIELDS) + rb")[ \t]*:")


def _wanted_lines(f, budget: int, what: str) -> Iterator[bytes]:
    """The lines of the fields the index keeps, read in 1 MiB chunks; at most ``budget``
    bytes in all and no line longer than MAX_LINE (parsing every field with python-debian
    would take most of the time)."""
    wanted, keep, rest = _WANTED_RE.match, False, b""
    while True:
        chunk = f.read(1024 * 1024)
        budget -= len(chunk)
        if budget < 0:
            raise ArmvmError(f"{what}: larger than its Release entry allows")
        if not chunk:
            lines = [rest] if rest else []
        else:
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE:
                raise ArmvmError(f"{what}: a line is longer than {MAX_LINE} bytes")
        for line in lines:
            first = line[:1]
            if first == b" " or first == b"\t":
                if keep:
                    yield line + b"\n"
            elif not line.strip():
                keep = False
                yield b"\n"
            else:
                keep = wanted(line) is not None
                if keep:
                    yield line + b"\n"
        if not chunk:
            return


def build_index(packages_file: Path, compression: str, dest: Path, max_bytes: int,
                what: str) -> None:
    """Parse a Packages file with python-debian into ``dest/packages.sqlite``."""
    from debian.deb822 import Packages
    from debian.debian_support import Version
    opener = {".xz": "lzma", ".gz": "gzip", "": None}[compression]
    if opener == "lzma":
        import lzma
        f = lzma.open(packages_file, "rb")
    elif opener == "gzip":
        import gzip
        f = gzip.open(packages_file, "rb")
    else:
        f = open(packages_file, "rb")
    best: dict[str, tuple] = {}
    provides: set[tuple[str, str]] = set()
    with f:
        lines = _wanted_lines(f, max_bytes, what)
        # the lines are already cut down to INDEX_FIELDS, so no ``fields=`` filter here
        for para in Packages.iter_paragraphs(lines, use_apt_pkg=False):
            fields = {k.lower(): v for k, v in para.items()}
            name = fields.get("package", "")
            if not name:
                continue
            try:
                size = int(fields.get("size", "-1"))
            except ValueError:
                size = -1
            row = (name, fields.get("version", ""), fields.get("architecture", ""),
                   fields.get("filename", ""), fields.get("sha256", ""), size,
                   " ".join(fields.get("depends", "").split()))
            old = best.get(name)
            if old is None or Version(row[1]) > Version(old[1]):
                best[name] = row
            for alt in fields.get("provides", "").split(","):
                virtual = alt.strip().split(" ", 1)[0].split("(", 1)[0].strip()
                if virtual:
                    provides.add((virtual, name))
    import sqlite3
    try:
        _write_sqlite(dest / "packages.sqlite", best, provides)
    except sqlite3.Error as e:
        full = "full" in str(e) or "disk I/O" in str(e)
        raise ArmvmError(f"{what}: cannot write its index in {dest}: {e}"
                         + ("; free space there, run `armvm-build cache prune`, or set "
                            "ARMVM_CACHE_DIR to a larger disk (the index takes about "
                            f"{len(best) * 300 / (1 << 20):.0f} MiB)" if full else "")) from None


def _write_sqlite(path: Path, best: dict, provides: set) -> None:
    import sqlite3
    db = sqlite3.connect(str(path))
    try:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("CREATE TABLE packages (name TEXT PRIMARY KEY, version TEXT, architecture "
                   "TEXT, filename TEXT, sha256 TEXT, size INTEGER, depends TEXT)")
        db.execute("CREATE TABLE provides (virtual TEXT, provider TEXT)")
        db.executemany("INSERT INTO packages VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (best[n] for n in sorted(best)))
        db.executemany("INSERT INTO provides VALUES (?, ?)", sorted(provides))
        db.execute("CREATE INDEX provides_virtual ON provides (virtual)")
        db.commit()
    finally:
        db.close()
