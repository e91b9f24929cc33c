"""GPT writer: protective MBR, primary and backup headers and partition entry arrays.

Follows the UEFI specification, chapter 5 ("GUID Partition Table (GPT) Disk Layout").

Precondition: ``f`` is a regular image file opened ``'r+b'`` whose size is already
``disk_sectors * sector_size`` (the caller creates it sparse with ``f.truncate(size)``).
Only LBA 0, the two headers and the two entry arrays are written; everything else is
left untouched, so the file stays sparse. Writes go through ``f.fileno()`` with
``os.pwrite`` (``f`` is flushed first), so the file position of ``f`` is not used.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Sequence
from uuid import UUID

from builder import spec
from builder.disk import rawio
from builder.errors import ArmvmError

# Legacy MBR (UEFI spec table 5-1): BootCode, UniqueMBRDiskSignature, Unknown,
# PartitionRecord[4], Signature.
MBR_FORMAT = "<440sIH64s2s"
# MBR partition record (UEFI table 5-4, protective form table 5-5): BootIndicator,
# StartingCHS, OSType, EndingCHS, StartingLBA, SizeInLBA.
MBR_PARTITION_RECORD_FORMAT = "<B3sB3sII"
# GPT header (UEFI table 5-5 "GPT Header"): Signature, Revision, HeaderSize,
# HeaderCRC32, Reserved, MyLBA, AlternateLBA, FirstUsableLBA, LastUsableLBA, DiskGUID,
# PartitionEntryLBA, NumberOfPartitionEntries, SizeOfPartitionEntry,
# PartitionEntryArrayCRC32.
GPT_HEADER_FORMAT = "<8sIIIIQQQQ16sQIII"
# GPT partition entry (UEFI table 5-6): PartitionTypeGUID, UniquePartitionGUID,
# StartingLBA, EndingLBA, Attributes, PartitionName (36 UTF-16LE code units).
GPT_ENTRY_FORMAT = "<16s16sQQQ72s"
PARTITION_NAME_UNITS = 36

assert struct.calcsize(MBR_FORMAT) == 512
assert struct.calcsize(MBR_PARTITION_RECORD_FORMAT) == 16
assert struct.calcsize(GPT_HEADER_FORMAT) == spec.GPT_HEADER_SIZE
assert struct.calcsize(GPT_ENTRY_FORMAT) == spec.GPT_ENTRY_SIZE

_CRC_OFFSET = 16                      # HeaderCRC32 offset inside the header
_PMBR_STARTING_CHS = b"\x00\x02\x00"  # head 0, sector 2, cylinder 0 = LBA 1
_CHS_HEADS, _CHS_SECTORS = 255, 63


@dataclass(frozen=True)
class GptPartition:
    type_guid: UUID
    unique_guid: UUID
    first_lba: int
    last_lba: int
    name: str
    attributes: int = 0


def _entry_array_sectors(sector_size: int) -> int:
    array_bytes = spec.GPT_ENTRY_COUNT * spec.GPT_ENTRY_SIZE
    return -(-array_bytes // sector_size)


def _check_sector_size(sector_size: int) -> None:
    if sector_size not in spec.SECTOR_SIZES:
        raise ArmvmError(f"GPT: sector size {sector_size} is not supported "
                         f"(allowed: {', '.join(map(str, spec.SECTOR_SIZES))})")


def usable_lbas(sector_size: int, disk_sectors: int) -> tuple[int, int]:
    """(FirstUsableLBA, LastUsableLBA) for a disk with 128 entries of 128 bytes."""
    _check_sector_size(sector_size)
    array = _entry_array_sectors(sector_size)
    first = 2 + array                       # LBA 0 PMBR, LBA 1 header, then the array
    last = disk_sectors - 2 - array         # backup array, then backup header at the end
    if last < first:
        raise ArmvmError(f"GPT: a disk of {disk_sectors} sectors of {sector_size} bytes "
                         f"is too small for a GPT (at least {2 * first} sectors needed)")
    return first, last


def _chs(lba: int) -> bytes:
    """CHS address of an LBA (255 heads, 63 sectors), 0xFFFFFF when not representable."""
    cylinder, rest = divmod(lba, _CHS_HEADS * _CHS_SECTORS)
    if cylinder > 1023:
        return b"\xff\xff\xff"
    head, sector = divmod(rest, _CHS_SECTORS)
    sector += 1
    return bytes((head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


def protective_mbr(sector_size: int, disk_sectors: int) -> bytes:
    """LBA 0: one protective record of type 0xEE covering the disk (UEFI 5.2.3)."""
    size_in_lba = min(disk_sectors - 1, 0xFFFFFFFF)
    record = struct.pack(MBR_PARTITION_RECORD_FORMAT, 0, _PMBR_STARTING_CHS,
                         spec.PMBR_OS_TYPE, _chs(disk_sectors - 1), 1, size_in_lba)
    mbr = struct.pack(MBR_FORMAT, b"", 0, 0, record + bytes(48), spec.MBR_SIGNATURE)
    return mbr + bytes(sector_size - len(mbr))


def _encode_name(name: str) -> bytes:
    try:
        raw = name.encode("utf-16-le")
    except UnicodeEncodeError:
        raise ArmvmError(f"GPT partition name {name!r} is not valid Unicode text") from None
    if len(raw) // 2 > PARTITION_NAME_UNITS:
        raise ArmvmError(f"GPT partition name {name!r} is {len(raw) // 2} UTF-16 code units "
                         f"long (allowed: at most {PARTITION_NAME_UNITS})")
    if "\x00" in name:
        raise ArmvmError(f"GPT partition name {name!r} contains a NUL character")
    return raw


def _check_partitions(partitions: Sequence[GptPartition], first: int, last: int) -> None:
    if len(partitions) > spec.GPT_ENTRY_COUNT:
        raise ArmvmError(f"GPT: {len(partitions)} partitions "
                         f"(allowed: at most {spec.GPT_ENTRY_COUNT})")
    seen = set()
    for p in partitions:
        label = f"GPT partition {p.name!r}"
        if p.type_guid.int == 0:
            raise ArmvmError(f"{label}: the all-zero type GUID marks an unused entry")
        if not (first <= p.first_lba <= p.last_lba <= last):
            raise ArmvmError(f"{label}: LBAs {p.first_lba}..{p.last_lba} are outside the "
                             f"usable range {first}..{last}")
        if not 0 <= p.attributes < 1 << 64:
            raise ArmvmError(f"{label}: attributes {p.attributes:#x} do not fit 64 bits")
        if p.unique_guid in seen:
            raise ArmvmError(f"{label}: partition GUID {p.unique_guid} is used twice")
        seen.add(p.unique_guid)
    ordered = sorted(partitions, key=lambda p: p.first_lba)
    for a, b in zip(ordered, ordered[1:]):
        if b.first_lba <= a.last_lba:
            raise ArmvmError(f"GPT partitions {a.name!r} ({a.first_lba}..{a.last_lba}) and "
                             f"{b.name!r} ({b.first_lba}..{b.last_lba}) overlap")


def entry_array(partitions: Sequence[GptPartition]) -> bytes:
    """The 128 x 128-byte entry array, partitions in the given order, rest zero."""
    entries = [struct.pack(GPT_ENTRY_FORMAT, p.type_guid.bytes_le, p.unique_guid.bytes_le,
                           p.first_lba, p.last_lba, p.attributes, _encode_name(p.name))
               for p in partitions]
    unused = spec.GPT_ENTRY_COUNT - len(entries)
    return b"".join(entries) + bytes(unused * spec.GPT_ENTRY_SIZE)


def gpt_header(*, my_lba: int, alternate_lba: int, first_usable: int, last_usable: int,
               disk_guid: UUID, entry_lba: int, array_crc: int, sector_size: int) -> bytes:
    """One header block: 92 header bytes with their CRC32, the rest of the block zero."""
    fields = dict(Signature=spec.GPT_SIGNATURE, Revision=spec.GPT_REVISION,
                  HeaderSize=spec.GPT_HEADER_SIZE, HeaderCRC32=0, Reserved=0,
                  MyLBA=my_lba, AlternateLBA=alternate_lba, FirstUsableLBA=first_usable,
                  LastUsableLBA=last_usable, DiskGUID=disk_guid.bytes_le,
                  PartitionEntryLBA=entry_lba,
                  NumberOfPartitionEntries=spec.GPT_ENTRY_COUNT,
                  SizeOfPartitionEntry=spec.GPT_ENTRY_SIZE,
                  PartitionEntryArrayCRC32=array_crc)
    header = bytearray(struct.pack(GPT_HEADER_FORMAT, *fields.values()))
    struct.pack_into("<I", header, _CRC_OFFSET, zlib.crc32(header))
    return bytes(header) + bytes(sector_size - len(header))


def write_gpt(f, *, sector_size: int, disk_sectors: int, disk_guid: UUID,
              partitions: Sequence[GptPartition]) -> None:
    """Write the protective MBR, both GPT headers and both entry arrays into ``f``."""
    first, last = usable_lbas(sector_size, disk_sectors)
    _check_partitions(partitions, first, last)
    array = entry_array(partitions)
    array_crc = zlib.crc32(array)
    last_lba = disk_sectors - 1
    backup_array_lba = last_lba - _entry_array_sectors(sector_size)
    common = dict(first_usable=first, last_usable=last, disk_guid=disk_guid,
                  array_crc=array_crc, sector_size=sector_size)
    primary = gpt_header(my_lba=1, alternate_lba=last_lba, entry_lba=2, **common)
    backup = gpt_header(my_lba=last_lba, alternate_lba=1, entry_lba=backup_array_lba,
                        **common)
    f.flush()
    fd = f.fileno()
    rawio.pwrite_all(fd, protective_mbr(sector_size, disk_sectors), 0)
    rawio.pwrite_all(fd, primary, sector_size)
    rawio.pwrite_all(fd, array, 2 * sector_size)
    rawio.pwrite_all(fd, array, backup_array_lba * sector_size)
    rawio.pwrite_all(fd, backup, last_lba * sector_size)
