"""Plan the disk: pure data, decided before a byte is written (printable, testable).

One seed feeds every identifier: the disk GUID, each partition GUID and each FAT volume
serial are derived from it (UUIDv5 / sha256), so the same recipe gives the same bytes.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from builder import spec
from builder.errors import ArmvmError, RecipeError

# The namespace of every UUIDv5 we derive (itself a UUIDv5 of the project's name).
SEED_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "armvm-build")
MIB = 1024 * 1024


@dataclass(frozen=True)
class PlannedFile:
    dest: str              # path on the FAT volume, e.g. EFI/BOOT/BOOTAA64.EFI
    source: Path           # host file holding the bytes
    size: int
    sha256: str
    role: str              # loader, grub.cfg, kernel, initrd, file


@dataclass(frozen=True)
class PlannedPartition:
    number: int            # 1-based GPT entry number
    kind: str              # esp, root, usr, xbootldr, linux, custom
    name: str
    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    label: str = ""
    serial: int = 0
    files: Tuple[PlannedFile, ...] = ()
    fs_format: str = ""                # root: the file system written into it ("ext4")
    fs_uuid: Optional[uuid.UUID] = None
    content: Optional[Path] = None     # root: a file of the partition's size holding the file system
    root_info: Tuple[Tuple[str, object], ...] = ()   # root: manifest facts (source, packages)

    def offset(self, sector_size: int) -> int:
        return self.first_lba * sector_size

    def size(self, sector_size: int) -> int:
        return (self.last_lba - self.first_lba + 1) * sector_size


@dataclass(frozen=True)
class Layout:
    name: str
    arch: str
    sector_size: int
    disk_bytes: int
    disk_guid: uuid.UUID
    partitions: Tuple[PlannedPartition, ...]
    timestamp: int
    seed: str

    @property
    def disk_sectors(self) -> int:
        return self.disk_bytes // self.sector_size

    @property
    def esp(self) -> PlannedPartition:
        return next(p for p in self.partitions if p.kind == "esp")

    def to_json(self) -> dict:
        ss = self.sector_size
        return {
            "sector_size": ss, "disk_bytes": self.disk_bytes, "disk_guid": str(self.disk_guid).upper(),
            "partitions": [{
                "number": p.number, "name": p.name, "kind": p.kind,
                "type_guid": str(p.type_guid).upper(), "unique_guid": str(p.unique_guid).upper(),
                "first_lba": p.first_lba, "last_lba": p.last_lba,
                "offset": p.offset(ss), "size": p.size(ss),
                **({"filesystem": "fat32", "label": p.label, "serial": f"{p.serial:08X}",
                    "files": [{"dest": f.dest, "size": f.size, "sha256": f.sha256, "role": f.role}
                              for f in p.files]} if p.kind == "esp" else {}),
                **({"filesystem": p.fs_format, "fs_uuid": str(p.fs_uuid), **dict(p.root_info)}
                   if p.fs_format else {}),
            } for p in self.partitions],
        }


def derive_guid(seed: str, what: str) -> uuid.UUID:
    return uuid.uuid5(SEED_NAMESPACE, f"{seed}:{what}")


def derive_serial(seed: str, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{what}".encode()).digest()[:4], "little")


def root_fs_ids(seed: str, number: int) -> Tuple[uuid.UUID, uuid.UUID]:
    """(file system UUID, directory hash seed) of the root partition `number`, from the seed:
    known before anything is built, so the kernel command line can name root=UUID=."""
    return derive_guid(seed, f"fs-uuid:{number}"), derive_guid(seed, f"fs-hash-seed:{number}")


def root_partition_number(recipe) -> Optional[int]:
    """1-based number of the partition the rootfs: section fills, or None."""
    for i, p in enumerate(recipe.disk.partitions):
        if p.type == "root" and p.format:
            return i + 1
    return None


def type_guid_for(kind: str, arch: str) -> uuid.UUID:
    a = spec.ARCHES[arch]
    table = {"esp": spec.ESP_TYPE_GUID, "root": a.root_type_guid, "usr": a.usr_type_guid,
             "xbootldr": spec.XBOOTLDR_TYPE_GUID, "linux": spec.LINUX_DATA_TYPE_GUID}
    return table[kind] if kind in table else uuid.UUID(kind)


def plan_layout(recipe, esp_files: Sequence[PlannedFile], *, timestamp: int, seed: str) -> Layout:
    """Place the partitions on 1 MiB boundaries and attach the ESP's files."""
    from builder.disk.gpt import usable_lbas
    from builder.disk.fat32 import FatFile, plan_fat32

    file = recipe.path
    ss = recipe.disk.sector_size
    disk_bytes = recipe.disk.size
    if disk_bytes % ss:
        raise RecipeError(file, f"disk size {disk_bytes} is not a multiple of the {ss}-byte sector size",
                          field="disk.size", allowed=f"a multiple of {ss} bytes (e.g. whole MiB)")
    sectors = disk_bytes // ss
    align = spec.ALIGNMENT_BYTES // ss
    first_usable, last_usable = usable_lbas(ss, sectors) if sectors > 2 * align else (0, -1)
    if last_usable < align:
        raise RecipeError(file, f"disk size {disk_bytes} bytes leaves no room for partitions", field="disk.size",
                          allowed="at least a few MiB more than the partitions")
    esps = [i for i, p in enumerate(recipe.disk.partitions) if p.type == "esp"]
    if len(esps) != 1:
        raise RecipeError(file, f"the disk has {len(esps)} ESP partitions", field="disk.partitions",
                          allowed="exactly one partition with type: esp")

    parts, lba = [], max(align, first_usable)
    for i, p in enumerate(recipe.disk.partitions):
        fname = f"disk.partitions[{i}]"
        lba = -(-lba // align) * align
        if p.size is None:
            if i != len(recipe.disk.partitions) - 1:
                raise RecipeError(file, "only the last partition may omit its size", field=fname + ".size",
                                  allowed="a size such as 256MiB")
            last = last_usable
        else:
            if p.size % ss:
                raise RecipeError(file, f"size {p.size} is not a multiple of the {ss}-byte sector size",
                                  field=fname + ".size", allowed=f"a multiple of {ss} bytes")
            last = lba + p.size // ss - 1
        if last > last_usable or last < lba:
            need = (last + 1) * ss + (sectors - last_usable) * ss if last >= lba else None
            raise RecipeError(file, f"partition {i + 1} ({p.name}) does not fit the {disk_bytes}-byte disk"
                              + (f": the disk needs at least {-(-need // spec.ALIGNMENT_BYTES)} MiB" if need else ""),
                              field=fname + ".size", allowed="partitions that fit inside disk.size")
        kind = p.type if p.type in ("esp", "root", "usr", "xbootldr", "linux") else "custom"
        extra = {}
        if kind == "esp":
            extra = dict(label=p.label, serial=derive_serial(seed, f"fat-serial:{i + 1}"),
                         files=tuple(sorted(esp_files, key=lambda f: f.dest)))
            size = (last - lba + 1) * ss
            try:
                plan_fat32(size, ss, [FatFile(f.dest, f.source, f.size) for f in esp_files])
            except ArmvmError as exc:  # the FAT planner's verdict (size, names, duplicates)
                raise RecipeError(file, str(exc), field=fname) from None
        if kind == "root" and p.format:
            extra = dict(fs_format=p.format, fs_uuid=root_fs_ids(seed, i + 1)[0])
        parts.append(PlannedPartition(i + 1, kind, p.name, type_guid_for(p.type, recipe.arch),
                                      derive_guid(seed, f"partition:{i + 1}"), lba, last, **extra))
        lba = last + 1
    return Layout(recipe.name, recipe.arch, ss, disk_bytes, derive_guid(seed, "disk"), tuple(parts),
                  timestamp, seed)

