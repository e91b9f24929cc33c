"""Reading a qcow2 image (QEMU's docs/interop/qcow2.txt) just enough to probe it before a
boot: its GPT sector size and its loader's architecture come from the guest bytes, read
cluster by cluster through the L1/L2 tables; QEMU itself then reads the file
(`-drive format=qcow2`).

Only self-contained images are accepted: no backing file, no external data file, no
encryption, no incompatible feature bits (dirty, corrupt, extended L2, zstd) and no
compressed clusters. qemu-img writes such images, and so does armvm-build
(builder/publish/formats.py). Anything else is refused with a convert hint (exit 3), so an
untrusted qcow2 can never make QEMU open another host file. The header is read with a
bounded read, the L1 table only up to L1_MAX bytes.
"""
from __future__ import annotations

import struct
from pathlib import Path

from builder.verify.blob import Blob
from builder.verify.container import NotRawDiskError

MAGIC = b"QFI\xfb"
HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")          # the version 3 header, 104 bytes
L1_MAX = 32 << 20                                       # 32 MiB of L1: 2^22 L2 tables
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COMPRESSED = 1 << 62
ZERO = 1


def is_qcow2(path) -> bool:
    """Whether the file starts with the qcow2 magic (False when it cannot be read: QEMU
    then says what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _refuse(path, why: str) -> NotRawDiskError:
    return NotRawDiskError(f"{path}: a qcow2 image {why}; boot takes self-contained qcow2 only: "
                           f"convert it first: qemu-img convert -O raw {path} <name>.raw")


class Qcow2Blob(Blob):
    """The guest view of an open qcow2 file (read-only)."""

    def __init__(self, f, name: str = "image"):
        self.f, self.name = f, name
        f.seek(0, 2)
        self.file_size = f.tell()
        f.seek(0)
        raw = f.read(HEADER.size)
        if len(raw) < 72 or raw[:4] != MAGIC:
            raise _refuse(name, "with a truncated header")
        raw = raw.ljust(HEADER.size, b"\0")
        (_, version, backing_off, _, cluster_bits, size, crypt, l1_size, l1_off,
         _, _, _, _, incompatible, _, _, _, _) = HEADER.unpack(raw)
        if version not in (2, 3):
            raise _refuse(name, f"of version {version} (known: 2, 3)")
        if version == 2:
            incompatible = 0
        if backing_off:
            raise _refuse(name, "with a backing file")
        if crypt:
            raise _refuse(name, "that is encrypted")
        if incompatible:
            raise _refuse(name, f"with incompatible features 0x{incompatible:x} (dirty, corrupt, "
                                "external data file, zstd or extended L2)")
        if not 9 <= cluster_bits <= 21:
            raise _refuse(name, f"with cluster_bits {cluster_bits} (allowed: 9..21)")
        self.cluster = 1 << cluster_bits
        self.l2_entries = self.cluster // 8
        need = -(-size // (self.cluster * self.l2_entries))
        if l1_size < need or l1_size * 8 > L1_MAX or l1_off + l1_size * 8 > self.file_size:
            raise _refuse(name, f"with an L1 table of {l1_size} entries at {l1_off} that does not fit")
        self.size = size
        f.seek(l1_off)
        self.l1 = struct.unpack(f">{need}Q", f.read(need * 8))
        self._l2_cache: dict = {}

    def _host(self, cluster: int):
        """The host offset of guest `cluster`, or None when it reads as zeros."""
        l2_off = self.l1[cluster // self.l2_entries] & OFFSET_MASK
        if not l2_off:
            return None
        table = self._l2_cache.get(l2_off)
        if table is None:
            if l2_off + self.cluster > self.file_size:
                raise _refuse(self.name, f"with an L2 table beyond the end of the file ({l2_off})")
            if len(self._l2_cache) >= 64:
                self._l2_cache.clear()
            self.f.seek(l2_off)
            table = self._l2_cache[l2_off] = self.f.read(self.cluster)
        entry, = struct.unpack_from(">Q", table, (cluster % self.l2_entries) * 8)
        if entry & COMPRESSED:
            raise _refuse(self.name, "with compressed clusters")
        off = entry & OFFSET_MASK
        if entry & ZERO or not off:
            return None
        return off

    def read_at(self, offset: int, length: int) -> bytes:
        n = self._clamp(offset, length)
        out = bytearray()
        while n > 0:
            cluster, within = divmod(offset, self.cluster)
            take = min(n, self.cluster - within)
            host = self._host(cluster)
            if host is None:
                out += bytes(take)
            else:
                self.f.seek(host + within)
                data = self.f.read(take)
                out += data.ljust(take, b"\0")
            offset += take
            n -= take
        return bytes(out)


def check_qcow2(path: Path) -> None:
    """Refuse (NotRawDiskError, exit 3) a qcow2 that boot must not hand to QEMU."""
    with open(path, "rb") as f:
        Qcow2Blob(f, str(path))
