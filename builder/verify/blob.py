"""Random-access byte sources: an image file, a window of it, a FAT file, a PE section.

Everything is read with seek/read on demand, so a 64 GiB sparse image never lands in
memory. ``read_at`` returns fewer bytes than asked at the end of the source, never more.
"""
from __future__ import annotations

import bisect
import io

from builder.errors import EXIT_USAGE, ArmvmError, NotAnImageError

CHUNK = 1 << 20


class Blob:
    size = 0

    def read_at(self, offset: int, length: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError

    def _clamp(self, offset: int, length: int) -> int:
        if offset < 0 or length <= 0 or offset >= self.size:
            return 0
        return min(length, self.size - offset)

    def chunks(self, start: int = 0, end: int | None = None, chunk: int = CHUNK):
        """Yield the bytes of [start, end) in pieces of at most ``chunk`` bytes."""
        end = self.size if end is None else min(end, self.size)
        pos = max(0, start)
        while pos < end:
            data = self.read_at(pos, min(chunk, end - pos))
            if not data:
                return
            yield data
            pos += len(data)


class FileBlob(Blob):
    """A region of an open binary file."""

    def __init__(self, f, base: int = 0, length: int | None = None, file_size: int | None = None):
        self.f = f
        if file_size is None:
            f.seek(0, io.SEEK_END)
            file_size = f.tell()
        self.base = max(0, base)
        avail = max(0, file_size - self.base)
        self.size = avail if length is None else max(0, min(length, avail))

    def read_at(self, offset: int, length: int) -> bytes:
        n = self._clamp(offset, length)
        if not n:
            return b""
        self.f.seek(self.base + offset)
        return self.f.read(n)


class BytesBlob(Blob):
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def read_at(self, offset: int, length: int) -> bytes:
        n = self._clamp(offset, length)
        return self.data[offset:offset + n] if n else b""


class SliceBlob(Blob):
    """``length`` bytes of ``parent`` from ``offset`` (clamped to the parent)."""

    def __init__(self, parent: Blob, offset: int, length: int):
        self.parent, self.offset = parent, max(0, offset)
        self.size = max(0, min(length, parent.size - self.offset))

    def read_at(self, offset: int, length: int) -> bytes:
        n = self._clamp(offset, length)
        return self.parent.read_at(self.offset + offset, n) if n else b""


class ConcatBlob(Blob):
    """Parts laid end to end, each padded with zeros to ``align`` bytes (GRUB's initrd list)."""

    def __init__(self, parts: list, align: int = 4):
        self.parts = []             # (start, part, start of the next part)
        pos = 0
        for p in parts:
            start = pos
            pos += p.size
            pos += (-pos) % align if align > 1 else 0
            self.parts.append((start, p, pos))
        self.starts = [s for s, _, _ in self.parts]
        self.size = pos

    def read_at(self, offset: int, length: int) -> bytes:
        n = self._clamp(offset, length)
        out = []
        pos, end = offset, offset + n
        first = max(0, bisect.bisect_right(self.starts, pos) - 1)
        for i in range(first, len(self.parts)):
            start, part, nxt = self.parts[i]
            if pos >= end:
                break
            if pos >= nxt:
                continue
            stop = start + part.size
            if pos < stop:
                take = min(end, stop) - pos
                data = part.read_at(pos - start, take)
                out.append(data + b"\0" * (take - len(data)))
                pos += take
            if pos < end and pos < nxt:    # alignment padding
                pad = min(end, nxt) - pos
                out.append(b"\0" * pad)
                pos += pad
        return b"".join(out)


def read_option_file(name: str, flag: str, limit: int, what: str) -> bytes:
    """The bytes of a small file named on the command line (``--db``, ``--kernel-config``),
    read with a cap before anything is kept: exit 2 when it cannot be read, 3 when it is
    larger than ``limit`` (so not ``what``)."""
    try:
        with open(name, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise ArmvmError(f"{flag} {name}: cannot read it ({e.strerror or e})",
                         exit_code=EXIT_USAGE) from None
    if len(raw) > limit:
        raise NotAnImageError(f"{flag} {name}: larger than {limit} bytes; not {what}")
    return raw
