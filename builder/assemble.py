"""Write a Layout into a sparse raw image file (the only stage that touches the disk file)."""
from __future__ import annotations

from pathlib import Path

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
            if p.kind != "esp":
                continue
            write_fat32(f, offset=p.offset(ss), volume_bytes=p.size(ss), sector_size=ss,
                        files=[FatFile(x.dest, x.source, x.size) for x in p.files],
                        label=p.label, serial=p.serial, timestamp=layout.timestamp)
        f.flush()
        # No fsync: publication is atomic by rename (an interrupted build leaves only a temp
        # file); durability across power loss is the caller's `sync`, as with genimage/mkfs.
