"""Independent initramfs reader: newc cpio ("070701"/"070702"), as the kernel unpacks it.

The input may be several archives back to back, each uncompressed or compressed (gzip,
zstd, xz, lzma, bzip2; lz4 only with the python module), separated by NUL padding -- for
example an uncompressed early cpio followed by a compressed main one. The whole thing is
streamed: only files ``want(path, size)`` accepts are kept, everything else is skipped,
and the total decompressed size is capped (decompression bombs stop with an error).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Callable, Optional

from builder.verify.blob import Blob
from builder.verify.decomp import (DecompressError, Reader, Unsupported, detect, open_stream,
                                   read_exact)

# newc header: c_magic then 13 eight-digit hex fields (110 bytes).
NEWC_FIELDS = ("c_ino", "c_mode", "c_uid", "c_gid", "c_nlink", "c_mtime", "c_filesize",
               "c_devmajor", "c_devminor", "c_rdevmajor", "c_rdevminor", "c_namesize", "c_check")
NEWC_MAGICS = (b"070701", b"070702")
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
MAX_NAME = 4096                  # PATH_MAX
MAX_MEMBERS = 200000             # distinct paths kept
MAX_ENTRIES = 500000             # headers read (a real initramfs has far fewer)
MAX_TOTAL = 1 << 30              # decompressed bytes across all segments
MAX_KEEP_FILE = 64 << 20         # one kept file
MAX_KEEP_TOTAL = 256 << 20       # all kept files
S_IFMT, S_IFDIR, S_IFLNK, S_IFREG = 0o170000, 0o040000, 0o120000, 0o100000


class CpioError(Exception):
    pass


@dataclass
class Member:
    path: str
    mode: int
    size: int
    data: Optional[bytes] = None     # kept content (files ``want`` asked for, symlink targets)

    @property
    def is_dir(self) -> bool:
        return self.mode & S_IFMT == S_IFDIR

    @property
    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK


@dataclass
class Initramfs:
    members: dict = field(default_factory=dict)
    segments: list = field(default_factory=list)   # e.g. ["cpio@0", "gzip@1024"]
    error: Optional[str] = None                     # parsing stopped here (contents so far kept)
    unsupported: Optional[str] = None               # a segment this verifier cannot read
    total: int = 0                                  # decompressed bytes read
    entries: int = 0                                # cpio headers read

    def canonical(self, path: str) -> Optional[str]:
        """``path`` with symlinks followed in every component (bounded); None on a loop."""
        parts = [p for p in path.strip("/").split("/") if p and p != "."]
        cur, hops = [], 0
        while parts:
            cur.append(parts.pop(0))
            if cur[-1] == "..":
                cur = cur[:-2]
                continue
            m = self.members.get("/".join(cur))
            if m is not None and m.is_symlink and m.data is not None:
                hops += 1
                if hops > 40:
                    return None
                target = m.data.decode("utf-8", "replace")
                base = [] if target.startswith("/") else cur[:-1]
                parts = [p for p in target.split("/") if p and p != "."] + parts
                cur = list(base)
        return "/".join(cur)

    def resolve(self, path: str) -> Optional[Member]:
        """The member at ``path``, following symlinks."""
        real = self.canonical(path)
        return self.members.get(real) if real else None

    def listdir(self, path: str) -> list:
        """Paths directly under the directory ``path`` (directories may be implied)."""
        real = self.canonical(path)
        if not real:
            return []
        prefix, out = real + "/", set()
        for p in self.members:
            if p.startswith(prefix) and len(p) > len(prefix):
                out.add(prefix + p[len(prefix):].split("/", 1)[0])
        return sorted(out)


def _norm(name: bytes) -> str:
    s = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    s = posixpath.normpath("/" + s).lstrip("/")
    return "" if s == "." else s


class _Counted:
    """Counts bytes read from a decompressed stream and stops past the cap."""

    def __init__(self, stream, fs: Initramfs, cap: int):
        self.stream, self.fs, self.cap = stream, fs, cap

    def read(self, n: int) -> bytes:
        d = self.stream.read(n)
        self.fs.total += len(d)
        if self.fs.total > self.cap:
            raise CpioError(f"the initramfs decompresses to more than {self.cap >> 20} MiB; "
                            "stopped (decompression bomb?)")
        return d


class _Stream:
    """Buffered exact reads (short only at the end), push-back and NUL skipping."""

    FILL = 64 << 10

    def __init__(self, raw):
        self.raw, self.buf, self.pos, self.consumed = raw, b"", 0, 0

    def read(self, n: int) -> bytes:
        avail = len(self.buf) - self.pos
        if avail >= n:
            out = self.buf[self.pos:self.pos + n]
            self.pos += n
        else:
            more = read_exact(self.raw, max(n - avail, self.FILL))
            data = self.buf[self.pos:] + more
            out, self.buf, self.pos = data[:n], data, min(n, len(data))
        self.consumed += len(out)
        return out

    def unread(self, data: bytes) -> None:
        if data:
            self.buf, self.pos = bytes(data) + self.buf[self.pos:], 0
            self.consumed -= len(data)

    def peek(self, n: int) -> bytes:
        data = self.read(n)
        self.unread(data)
        return data

    def skip_zeros(self) -> bool:
        """Skip NUL padding; False at the end of the stream."""
        while True:
            data = self.read(4096)
            if not data:
                return False
            rest = data.lstrip(b"\0")
            if rest:
                self.unread(rest)
                return True


def read_initramfs(blob: Blob, want: Callable[[str, int], bool] = lambda p, s: False,
                   max_total: int = MAX_TOTAL) -> Initramfs:
    fs = Initramfs()
    outer = _Stream(Reader(blob))
    budget = [MAX_KEEP_TOTAL]
    try:
        while outer.skip_zeros():
            start = outer.consumed
            head = outer.peek(8)
            if head[:6] in NEWC_MAGICS:
                fs.segments.append(f"cpio@{start}")
                _archive(outer, fs, want, budget)
                continue
            kind = detect(head)
            if kind is None:
                raise CpioError(f"invalid magic at start of compressed archive (byte {start}: "
                                f"{head.hex()})")
            fs.segments.append(f"{kind}@{start}")
            inner = _Stream(_Counted(open_stream(kind, outer), fs, max_total))
            while inner.skip_zeros():
                if inner.peek(6) not in NEWC_MAGICS:
                    raise CpioError(f"junk within the {kind} archive starting at byte {start}")
                _archive(inner, fs, want, budget)
    except Unsupported as e:
        fs.unsupported = str(e)
    except (CpioError, DecompressError) as e:
        fs.error = str(e)
    return fs


def _archive(stream: _Stream, fs: Initramfs, want, budget: list) -> None:
    rd = stream.read
    while True:
        fs.entries += 1
        if fs.entries > MAX_ENTRIES:
            raise CpioError(f"more than {MAX_ENTRIES} cpio entries; stopped")
        hdr = rd(HEADER_SIZE)
        if len(hdr) < HEADER_SIZE:
            raise CpioError(f"truncated cpio header after {len(fs.members)} entries")
        if hdr[:6] not in NEWC_MAGICS:
            raise CpioError(f"bad cpio magic {hdr[:6]!r} after {len(fs.members)} entries")
        try:
            f = {k: int(hdr[6 + 8 * i:14 + 8 * i], 16) for i, k in enumerate(NEWC_FIELDS)}
        except ValueError:
            raise CpioError("cpio header field is not hexadecimal") from None
        nsize, size = f["c_namesize"], f["c_filesize"]
        if not 1 <= nsize <= MAX_NAME:
            raise CpioError(f"cpio c_namesize {nsize} outside 1..{MAX_NAME}")
        raw = rd(nsize + (-(HEADER_SIZE + nsize)) % 4)
        if len(raw) < nsize:
            raise CpioError("truncated cpio file name")
        path = _norm(raw[:nsize])
        if raw[:nsize].split(b"\0", 1)[0] == TRAILER.encode():
            _skip(rd, size + (-size) % 4)
            return
        mode = f["c_mode"]
        budget[0] -= len(path)              # names are kept too
        if budget[0] < 0:
            raise CpioError(f"more than {MAX_KEEP_TOTAL >> 20} MiB of names and kept files")
        keep = mode & S_IFMT == S_IFLNK and size <= MAX_NAME
        keep = keep or (mode & S_IFMT == S_IFREG and size <= MAX_KEEP_FILE
                        and want(path, size))
        keep = keep and size <= budget[0]
        data = None
        if keep:
            data = rd(size)
            if len(data) < size:
                raise CpioError(f"{path}: cpio c_filesize {size} but the archive ends after "
                                f"{len(data)} bytes")
            budget[0] -= size
            _skip(rd, (-size) % 4)
        else:
            _skip(rd, size + (-size) % 4, path)
        if path:
            if len(fs.members) >= MAX_MEMBERS and path not in fs.members:
                raise CpioError(f"more than {MAX_MEMBERS} cpio entries")
            fs.members[path] = Member(path, mode, size, data)


def _skip(rd, n: int, path: str = "") -> None:
    while n > 0:
        d = rd(min(n, 1 << 20))
        if not d:
            raise CpioError(f"{path or 'cpio entry'}: data ends {n} bytes early (c_filesize "
                            "larger than the archive)")
        n -= len(d)
