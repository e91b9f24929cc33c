"""Write a Layout into a sparse raw image file (the only stage that touches the disk file)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from builder.disk.rawio import copy_sparse_into, record

from builder.errors import ArmvmError
from builder.disk.layout import Layout

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def space_needed(layout: Layout) -> int:
    """About how many bytes the sparse image allocates: file data, both FATs, the GPTs."""
    ss = layout.sector_size
    total = 2 * 1024 * 1024                       # GPT copies, boot sectors, directories
    for p in layout.partitions:
        if p.kind == "esp":
            total += sum(f.size for f in p.files) + 2 * 4 * (p.size(ss) // 4096)
        if p.content is not None:
            total += os.stat(p.content).st_blocks * 512
    return total


def write_image(layout: Layout, path: Path) -> list:
    """Create `path` as a sparse file of the disk's size and write GPT + FAT32 into it;
    returns the (start, end) byte ranges written (sorted, merged): every byte outside
    them is a hole, so the block map needs no scan of the file.

    Nothing but metadata and file data is written: every other block stays a hole. A full
    disk (ENOSPC, quota, file size limit) is a clean error naming the folder and the space
    needed; the caller's staging removes the partial file.
    """
    from builder.disk.fat32 import FatFile, write_fat32
    from builder.disk.gpt import GptPartition, write_gpt

    ss = layout.sector_size
    try:
        # never through a symlink planted at the (temporary) name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ArmvmError(f"cannot create {path}: {exc.strerror}")
    with os.fdopen(fd, "w+b") as f:
        try:
            f.truncate(layout.disk_bytes)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise _full(path, layout, exc) from None
            raise ArmvmError(f"cannot size {path} to {layout.disk_bytes} bytes: {exc.strerror}")
        with record(f.fileno()) as extents:
            try:
                write_gpt(f, sector_size=ss, disk_sectors=layout.disk_sectors,
                          disk_guid=layout.disk_guid,
                          partitions=[GptPartition(p.type_guid, p.unique_guid, p.first_lba,
                                                   p.last_lba, p.name) for p in layout.partitions])
                for p in layout.partitions:
                    if p.content is not None:       # a file system image made beforehand (root)
                        copy_sparse_into(f.fileno(), p.offset(ss), p.content, p.size(ss),
                                         f"partition {p.number} ({p.name})")
                    if p.kind != "esp":
                        continue
                    write_fat32(f, offset=p.offset(ss), volume_bytes=p.size(ss), sector_size=ss,
                                files=[FatFile(x.dest, x.source, x.size) for x in p.files],
                                label=p.label, serial=p.serial, timestamp=layout.timestamp)
                f.flush()
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise _full(path, layout, exc) from None
                raise ArmvmError(f"cannot write {path}: {exc.strerror}") from None
        # No fsync: publication is atomic by rename (an interrupted build leaves only a temp
        # file); durability across power loss is the caller's `sync`, as with genimage/mkfs.
        return extents.merged()


def _full(path: Path, layout: Layout, exc: OSError) -> ArmvmError:
    why = ("the file size limit (ulimit -f) is smaller than the disk"
           if exc.errno == errno.EFBIG else exc.strerror or "no space left on device")
    return ArmvmError(f"{Path(path).parent}: {why} while writing the image; it needs about "
                      f"{space_needed(layout) / (1 << 20):.1f} MiB of free space there "
                      f"({layout.disk_bytes / (1 << 20):.0f} MiB sparse disk); nothing was "
                      "published")
