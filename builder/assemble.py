"""Write a Layout into a sparse raw image file (the only stage that touches the disk file)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from builder.disk.rawio import pwrite_all

from builder.errors import ArmvmError
from builder.layout import Layout


def write_image(layout: Layout, path: Path) -> None:
    """Create `path` as a sparse file of the disk's size and write GPT + FAT32 into it.

    Nothing but metadata and file data is written: every other block stays a hole.
    """
    from builder.disk.fat32 import FatFile, write_fat32
    from builder.disk.gpt import GptPartition, write_gpt

    ss = layout.sector_size
    try:
        f = open(path, "w+b")
    except OSError as exc:
        raise ArmvmError(f"cannot create {path}: {exc.strerror}")
    with f:
        try:
            f.truncate(layout.disk_bytes)
        except OSError as exc:
            raise ArmvmError(f"cannot size {path} to {layout.disk_bytes} bytes: {exc.strerror}")
        write_gpt(f, sector_size=ss, disk_sectors=layout.disk_sectors, disk_guid=layout.disk_guid,
                  partitions=[GptPartition(p.type_guid, p.unique_guid, p.first_lba, p.last_lba, p.name)
                              for p in layout.partitions])
        for p in layout.partitions:
            if p.content is not None:
                copy_sparse(f.fileno(), p.offset(ss), p.content, p.size(ss), f"partition {p.number} ({p.name})")
            if p.kind != "esp":
                continue
            write_fat32(f, offset=p.offset(ss), volume_bytes=p.size(ss), sector_size=ss,
                        files=[FatFile(x.dest, x.source, x.size) for x in p.files],
                        label=p.label, serial=p.serial, timestamp=layout.timestamp)
        f.flush()


def copy_sparse(fd: int, offset: int, source: Path, size: int, what: str) -> None:
    """Copy the data ranges of the sparse file `source` (exactly `size` bytes) into `fd` at
    `offset`; its holes stay holes in the image."""
    if source.stat().st_size != size:
        raise ArmvmError(f"{what}: {source} has {source.stat().st_size} bytes, the partition {size}")
    ranges = []
    src = os.open(source, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError:          # ENXIO: only a hole remains
                break
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            pos = end
    finally:
        os.close(src)
    for start, end in ranges:
        _copy_range(fd, offset, source, start, end, what)


def _copy_range(fd: int, offset: int, source: Path, start: int, end: int, what: str) -> None:
    src = os.open(source, os.O_RDONLY)
    try:
        done = start
        kernel = True
        while done < end:
            n = None
            if kernel:
                try:
                    n = os.copy_file_range(src, fd, min(end - done, 1 << 30), done, offset + done)
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    kernel = False
            if n is None:
                chunk = os.pread(src, min(end - done, 1 << 20), done)
                pwrite_all(fd, chunk, offset + done)
                n = len(chunk)
            if n == 0:
                raise ArmvmError(f"{what}: {source} shrank while being copied")
            done += n
    finally:
        os.close(src)
        # No fsync: publication is atomic by rename (an interrupted build leaves only a temp
        # file); durability across power loss is the caller's `sync`, as with genimage/mkfs.
