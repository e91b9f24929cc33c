"""Streaming decompression with bounded output, for initramfs segments and modules.

``open_stream(kind, reader)`` decompresses one member/frame read from ``reader`` and hands
back whatever input follows it (``reader.unread``), the way the kernel walks a
concatenated initramfs. No call ever returns more than it was asked for; zstd, which has
no output limit, is fed in small input pieces so one call cannot explode.
"""
from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Optional

from builder.verify.blob import Blob, BytesBlob

MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x02\x21\x4c\x18", "lz4-legacy"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)
IN_CHUNK = 64 << 10
OUT_CHUNK = 1 << 20
ZSTD_IN_CHUNK = 2 << 10        # zstd's worst ratio is ~32768:1 -> at most ~64 MiB per call


class DecompressError(Exception):
    pass


class Unsupported(DecompressError):
    """A format this verifier cannot read here (e.g. lz4 without the python lz4 module)."""


def detect(head: bytes) -> Optional[str]:
    for magic, kind in MAGICS:
        if head.startswith(magic):
            return kind
    return None


class Reader:
    """Sequential reads from a Blob, with push-back of unused input."""

    def __init__(self, blob: Blob, pos: int = 0):
        self.blob, self.pos, self.back = blob, pos, b""

    def read(self, n: int) -> bytes:
        if self.back:
            out, self.back = self.back[:n], self.back[n:]
            return out
        data = self.blob.read_at(self.pos, n)
        self.pos += len(data)
        return data

    def unread(self, data: bytes) -> None:
        if data:
            self.back = bytes(data) + self.back

    def peek(self, n: int) -> bytes:
        data = read_exact(self, n)
        self.unread(data)
        return data


def read_exact(stream, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n:
        d = stream.read(min(n - got, 1 << 20))
        if not d:
            break
        parts.append(d)
        got += len(d)
    return b"".join(parts)


class _Decoder:
    """Wraps a decompressor object with a decompress(data, max_length) API."""

    def __init__(self, kind: str, src: Reader):
        self.kind, self.src, self.done, self.pending, self.pos = kind, src, False, b"", 0
        if kind == "gzip":
            self.obj = zlib.decompressobj(31)
        elif kind in ("xz", "lzma"):
            self.obj = lzma.LZMADecompressor(lzma.FORMAT_XZ if kind == "xz"
                                             else lzma.FORMAT_ALONE)
        elif kind == "bzip2":
            self.obj = bz2.BZ2Decompressor()
        elif kind == "zstd":
            import zstandard
            self.obj = zstandard.ZstdDecompressor().decompressobj()
        elif kind == "lz4":
            try:
                import lz4.frame
            except ImportError:
                raise Unsupported("lz4-compressed data: the python 'lz4' module is not "
                                  "installed") from None
            self.obj = lz4.frame.LZ4FrameDecompressor()
        elif kind == "lz4-legacy":
            raise Unsupported("lz4 legacy-format data (kernel initramfs lz4) is not supported")
        else:
            raise Unsupported(f"{kind}-compressed data is not supported")

    def read(self, n: int) -> bytes:
        try:
            return self._read(n)
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as e:
            raise DecompressError(f"{self.kind} data is corrupt: {e}") from None
        except Exception as e:   # zstandard.ZstdError and friends
            if type(e).__module__.startswith(("zstandard", "lz4")):
                raise DecompressError(f"{self.kind} data is corrupt: {e}") from None
            raise

    def _read(self, n: int) -> bytes:
        if self.pos >= len(self.pending):
            self.pending, self.pos = self._fill(), 0
        out = self.pending[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def _fill(self) -> bytes:
        """The next piece of output (at most OUT_CHUNK, zstd aside); b"" at the end."""
        while not self.done:
            if self.kind == "gzip":
                data = self.obj.unconsumed_tail or self.src.read(IN_CHUNK)
                out = self.obj.decompress(data, OUT_CHUNK)
            elif self.kind == "zstd":
                data = self.src.read(ZSTD_IN_CHUNK)
                out = self.obj.decompress(data) if data else b""
            else:
                data = self.src.read(IN_CHUNK) if self.obj.needs_input else b""
                out = self.obj.decompress(data, OUT_CHUNK)
            if self.obj.eof:
                self.done = True
                self.src.unread(self.obj.unused_data)
            elif not data and not out:
                raise DecompressError(f"{self.kind} data ends before its end marker "
                                      "(truncated)")
            if out:
                return out
        return b""


def open_stream(kind: str, src: Reader) -> _Decoder:
    return _Decoder(kind, src)


def decompress_bounded(kind: str, data: bytes, limit: int) -> bytes:
    """Whole-buffer decompression that fails once the output passes ``limit`` bytes."""
    dec = _Decoder(kind, Reader(BytesBlob(data)))
    parts, total = [], 0
    while True:
        d = dec.read(1 << 20)
        if not d:
            return b"".join(parts)
        total += len(d)
        if total > limit:
            raise DecompressError(f"{kind} data decompresses to more than {limit} bytes")
        parts.append(d)
