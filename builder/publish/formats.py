"""Other forms of the finished raw image: qcow2, zstd- and xz-compressed raw.

Each writer reads the sparse raw image (holes are fed from a zero buffer or skipped, never
read from disk) and writes one file the caller got from the staging area, so a failure
leaves nothing under a final name.

- qcow2: written here, in Python, from the raw image's data ranges (QEMU's
  docs/interop/qcow2.txt, version 3 = compat 1.1, 64 KiB clusters, 16-bit refcounts).
  Only clusters holding non-zero bytes are allocated; the data clusters come first in
  guest order, then the L2 tables, the L1 table, the refcount blocks and their table.
  Nothing depends on the clock or the host, so the bytes are reproducible.
  `qemu-img convert -O qcow2` is as deterministic (two runs compared) and allocates the
  same clusters; the bench (bench/outputs_bench.py) times both.
- raw.zst: python-zstandard with worker threads; zstd's multi-threaded format is the same
  for any number of workers >= 1, so the bytes do not depend on the machine.
- raw.xz: concatenated .xz streams of fixed 24 MiB pieces (xz's own block size at -6),
  compressed by Python's lzma in worker threads; a piece that is all hole reuses one
  compressed zero piece. Fixed pieces: the bytes do not depend on the thread count.
  `xz -T0 -6` (the bench's peer) compresses the zeros of every hole too.

The image's .bmap describes the uncompressed image; `bmaptool copy --bmap <name>.bmap
<name>.raw.zst DEV` decompresses on the fly and checks it block by block (tested).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from builder.errors import ArmvmError
from builder.publish.output import mapped_ranges

FORMATS = ("raw", "qcow2", "raw.zst", "raw.xz")
CHUNK = 1 << 20

# qcow2 (docs/interop/qcow2.txt)
QCOW_MAGIC = b"QFI\xfb"
CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
REFCOUNT_ORDER = 4                                  # 16-bit refcounts
L2_ENTRIES = CLUSTER // 8
REFS_PER_BLOCK = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
OFLAG_COPIED = 1 << 63                              # refcount is exactly one
HEADER_V3 = 104
ZSTD_LEVEL = 3
XZ_LEVEL = 6
XZ_PIECE = 24 << 20                                  # xz -T0's own block size at -6 (3 x 8 MiB)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def stream(path: Path) -> Iterator[bytes]:
    """The whole image in order, holes as zero chunks (never read from the disk)."""
    zeros = bytes(CHUNK)
    size, pos = path.stat().st_size, 0
    with open(path, "rb") as f:
        for start, end in list(mapped_ranges(path)) + [(size, size)]:
            while pos < start:
                n = min(start - pos, CHUNK)
                yield zeros if n == CHUNK else zeros[:n]
                pos += n
            f.seek(pos)
            while pos < end:
                chunk = f.read(min(end - pos, CHUNK))
                if not chunk:
                    raise ArmvmError(f"{path}: the image shrank while it was being read")
                yield chunk
                pos += len(chunk)


def _data_clusters(path: Path) -> Iterator[Tuple[int, bytes]]:
    """(guest cluster index, bytes) of every cluster holding a non-zero byte, in order."""
    size = path.stat().st_size
    zero = bytes(CLUSTER)
    seen = -1
    with open(path, "rb") as f:
        for start, end in mapped_ranges(path):
            first, last = start // CLUSTER, (end - 1) // CLUSTER
            for idx in range(max(first, seen + 1), last + 1):
                f.seek(idx * CLUSTER)
                data = f.read(min(CLUSTER, size - idx * CLUSTER))
                seen = idx
                if data != zero[:len(data)]:
                    yield idx, data.ljust(CLUSTER, b"\0")


def write_qcow2(raw: Path, dest: Path) -> None:
    """Write `raw` as a qcow2 v3 image at `dest` (an existing, empty staging file)."""
    size = raw.stat().st_size
    l1_size = _ceil(size, CLUSTER * L2_ENTRIES)
    mapping: Dict[int, int] = {}                      # guest cluster -> host cluster
    with open(dest, "r+b") as out:
        out.seek(CLUSTER)                              # cluster 0: the header, written last
        host = 1
        for idx, data in _data_clusters(raw):
            out.write(data)
            mapping[idx] = host
            host += 1
        l2_used = sorted({idx // L2_ENTRIES for idx in mapping})
        l2_at = {n: host + i for i, n in enumerate(l2_used)}
        host += len(l2_used)
        l1_at, l1_clusters = host, _ceil(l1_size * 8, CLUSTER)
        host += l1_clusters
        # refcount blocks cover every cluster including themselves and their table
        blocks = table_clusters = 1
        while True:
            total = host + table_clusters + blocks
            need_blocks = _ceil(total, REFS_PER_BLOCK)
            need_table = _ceil(need_blocks * 8, CLUSTER)
            if (need_blocks, need_table) == (blocks, table_clusters):
                break
            blocks, table_clusters = need_blocks, need_table
        rt_at = host
        rb_at = rt_at + table_clusters
        total = rb_at + blocks
        for n in l2_used:
            l2 = bytearray(CLUSTER)
            for i in range(L2_ENTRIES):
                h = mapping.get(n * L2_ENTRIES + i)
                if h is not None:
                    struct.pack_into(">Q", l2, i * 8, (h * CLUSTER) | OFLAG_COPIED)
            out.write(l2)
        l1 = bytearray(l1_clusters * CLUSTER)
        for n in l2_used:
            struct.pack_into(">Q", l1, n * 8, (l2_at[n] * CLUSTER) | OFLAG_COPIED)
        out.write(l1)
        table = bytearray(table_clusters * CLUSTER)
        for b in range(blocks):
            struct.pack_into(">Q", table, b * 8, (rb_at + b) * CLUSTER)
        out.write(table)
        refs = bytearray(blocks * CLUSTER)
        struct.pack_into(f">{total}H", refs, 0, *([1] * total))
        out.write(refs)
        header = struct.pack(
            ">4sIQIIQIIQQIIQQQQII",
            QCOW_MAGIC, 3, 0, 0,                       # magic, version, no backing file
            CLUSTER_BITS, size, 0,                     # cluster_bits, size, crypt_method
            l1_size, l1_at * CLUSTER,                  # l1_size, l1_table_offset
            rt_at * CLUSTER, table_clusters,           # refcount_table_offset, _clusters
            0, 0,                                      # nb_snapshots, snapshots_offset
            0, 0, 0,                                   # incompatible, compatible, autoclear
            REFCOUNT_ORDER, HEADER_V3)
        out.seek(0)
        out.write(header + bytes(8))                   # + the header extension end marker
        out.truncate(total * CLUSTER)


def convert_qcow2(raw: Path, dest: Path) -> None:
    """The same qcow2 v3 by `qemu-img convert` (the bench's peer)."""
    import subprocess
    res = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                          str(raw), str(dest)], capture_output=True, text=True)
    if res.returncode != 0:
        raise ArmvmError(f"qemu-img convert failed: {res.stderr.strip()[-300:]}")


def write_zstd(raw: Path, dest: Path, threads: int = -1) -> None:
    """zstd frame of the whole image, written with worker threads (-1: one per core)."""
    import zstandard
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=threads, write_content_size=True)
    with open(dest, "r+b") as out:
        with cctx.stream_writer(out, size=raw.stat().st_size, closefd=False) as w:
            for chunk in stream(raw):
                w.write(chunk)


def chunks(path: Path, size: int) -> Iterator[bytes | None]:
    """The image in pieces of `size` bytes (the last one shorter); None for a whole piece
    that lies in a hole (never read)."""
    total = path.stat().st_size
    ranges = list(mapped_ranges(path))
    i = 0
    with open(path, "rb") as f:
        for start in range(0, total, size):
            end = min(start + size, total)
            while i < len(ranges) and ranges[i][1] <= start:
                i += 1
            if (i >= len(ranges) or ranges[i][0] >= end) and end - start == size:
                yield None
                continue
            f.seek(start)
            data = f.read(end - start)
            if len(data) != end - start:
                raise ArmvmError(f"{path}: the image shrank while it was being read")
            yield data


def write_xz(raw: Path, dest: Path, threads: int = 0) -> None:
    """The image as concatenated .xz streams of XZ_PIECE bytes each (`xz -d` and Python's
    lzma read them as one file), compressed by Python's lzma in worker threads (it releases
    the GIL); a piece that is all hole reuses one compressed zero piece instead of
    compressing zeros again. Pieces are fixed, so the bytes do not depend on the threads."""
    import lzma
    from concurrent.futures import ThreadPoolExecutor
    workers = threads or os.cpu_count() or 1
    zero_piece = None

    def pack(data: bytes) -> bytes:
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_LEVEL)

    with open(dest, "r+b") as out, ThreadPoolExecutor(workers) as pool:
        window: List = []
        for data in chunks(raw, XZ_PIECE):
            if data is None or data == bytes(len(data)):
                if zero_piece is None:
                    zero_piece = pack(bytes(XZ_PIECE))
                window.append(zero_piece if data is None or len(data) == XZ_PIECE else pack(data))
            else:
                window.append(pool.submit(pack, data))
            while len(window) > workers:            # bounded: about 2 x workers pieces in memory
                head = window.pop(0)
                out.write(head if isinstance(head, bytes) else head.result())
        for head in window:
            out.write(head if isinstance(head, bytes) else head.result())


WRITERS = {"qcow2": write_qcow2, "raw.zst": write_zstd, "raw.xz": write_xz}


def sha256_of(path: Path) -> str:
    """sha256 of a whole (compact) file, read 1 MiB at a time."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_formats(staging, name: str, raw: Path, formats, checksum: bool = False) -> Dict[str, str]:
    """Write every requested non-raw format under a staging name; returns {final name:
    sha256 of its bytes}. With `checksum`, each also gets a `<final>.sha256` beside it
    (`sha256sum -c` format), like `<name>.raw.sha256`."""
    digests: Dict[str, str] = {}
    for fmt in formats:
        if fmt == "raw":
            continue
        final = f"{name}.{fmt}"
        tmp = staging.temp_path(final)
        WRITERS[fmt](raw, tmp)
        digests[final] = sha256_of(tmp)
        if checksum:
            staging.write_text(f"{final}.sha256", f"{digests[final]}  {final}\n")
    return digests


def output_names(name: str, formats, sboms) -> dict:
    """The files a build publishes beyond the manifest itself (for the manifest)."""
    from builder.publish.sbom import SBOM_FILES
    return {"images": [f"{name}.{f}" for f in formats],
            "sbom": [f"{name}.{SBOM_FILES[k][0]}" for k in sboms],
            "report": f"{name}.report.html"}
