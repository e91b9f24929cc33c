"""FAT32 on-disk records: boot sector, FSInfo, FAT entries, short directory entries.

Field names and layouts are those of Microsoft's FAT specification (fatgen103). Plain
values in, bytes out; fat32.py decides what goes where.
"""
from __future__ import annotations

import bisect
import struct
import sys
import time
from array import array

from builder import spec
from builder.disk import fatnames
from builder.errors import ArmvmError

# Boot sector and BPB, FAT32 layout: the first 90 bytes of sector 0.
BOOT_SECTOR_FIELDS = (
    "BS_jmpBoot 3s", "BS_OEMName 8s", "BPB_BytsPerSec H", "BPB_SecPerClus B",
    "BPB_RsvdSecCnt H", "BPB_NumFATs B", "BPB_RootEntCnt H", "BPB_TotSec16 H",
    "BPB_Media B", "BPB_FATSz16 H", "BPB_SecPerTrk H", "BPB_NumHeads H", "BPB_HiddSec I",
    "BPB_TotSec32 I", "BPB_FATSz32 I", "BPB_ExtFlags H", "BPB_FSVer H", "BPB_RootClus I",
    "BPB_FSInfo H", "BPB_BkBootSec H", "BPB_Reserved 12s", "BS_DrvNum B",
    "BS_Reserved1 B", "BS_BootSig B", "BS_VolID I", "BS_VolLab 11s", "BS_FilSysType 8s")
BOOT_SECTOR_FORMAT = "<" + "".join(f.split()[1] for f in BOOT_SECTOR_FIELDS)
# FSInfo sector: FSI_LeadSig, FSI_Reserved1, FSI_StrucSig, FSI_Free_Count,
# FSI_Nxt_Free, FSI_Reserved2, FSI_TrailSig.
FSINFO_FORMAT = "<I480sIII12sI"
# Short directory entry: DIR_Name, DIR_Attr, DIR_NTRes, DIR_CrtTimeTenth, DIR_CrtTime,
# DIR_CrtDate, DIR_LstAccDate, DIR_FstClusHI, DIR_WrtTime, DIR_WrtDate, DIR_FstClusLO,
# DIR_FileSize.
DIR_FORMAT = "<11sBBBHHHHHHHI"
assert struct.calcsize(BOOT_SECTOR_FORMAT) == 90
assert struct.calcsize(FSINFO_FORMAT) == 512 and struct.calcsize(DIR_FORMAT) == 32

JMP_BOOT = b"\xeb\x58\x90"          # jmp to offset 0x5A, nop
OEM_NAME = b"MSWIN4.1"              # the value fatgen103 recommends
BOOT_CODE = b"\xcd\x18\xf4\xeb\xfd"  # at 0x5A: int 18h (next boot device); hlt; jmp back
MEDIA = 0xF8
DRIVE_NUMBER = 0x80
EXTENDED_BOOT_SIGNATURE = 0x29
FILE_SYSTEM_TYPE = b"FAT32   "        # informational only
NO_LABEL = b"NO NAME    "
NUM_HEADS = 64
EOC_MARK = 0x0FFFFFFF                 # what we write to end a chain (>= spec.FAT32_EOC)
FAT_ENTRY_0 = 0x0FFFFF00 | MEDIA
FAT_ENTRY_1 = 0x0FFFFFFF              # end of chain, clean shutdown, no disk errors
_FIRST_TIME = 315532800               # 1980-01-01T00:00:00Z
_LAST_TIME = 4354819198               # 2107-12-31T23:59:58Z


def fat_datetime(timestamp: int) -> tuple[int, int]:
    """(date, time) in FAT encoding, UTC, 2-second resolution, clamped to 1980..2107."""
    t = time.gmtime(min(max(int(timestamp), _FIRST_TIME), _LAST_TIME))
    date = ((t.tm_year - spec.FAT_EPOCH_YEAR) << 9) | (t.tm_mon << 5) | t.tm_mday
    return date, (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)


def label_bytes(label: str) -> bytes:
    """The 11-byte volume label (upper-cased, space padded); all spaces means none."""
    text = fatnames.fold(label).rstrip(" ") if isinstance(label, str) else None
    if text is None or len(text) > 11 or text.startswith(" ") or any(
            ch != " " and fatnames.exact_short_name(ch) is None for ch in text):
        raise ArmvmError(f"FAT volume label {label!r} is not allowed (allowed: up to 11 "
                         f"characters A-Z 0-9 space {fatnames.SHORT_NAME_SPECIALS}, not "
                         f"starting with a space; lower case is upper-cased)")
    return text.ljust(11).encode("ascii")


def boot_sector(*, sector_size: int, sectors_per_cluster: int, reserved_sectors: int,
                num_fats: int, hidden_sectors: int, total_sectors: int, fat_sectors: int,
                root_cluster: int, serial: int, label: bytes) -> bytes:
    """Sector 0 (and its backup): BPB, boot signature 0x55AA at 510 and sector end."""
    # mtools refuses a volume whose sector count is not a multiple of BPB_SecPerTrk.
    per_track = next(s for s in (32, *range(63, 0, -1)) if total_sectors % s == 0)
    fields = dict(
        BS_jmpBoot=JMP_BOOT, BS_OEMName=OEM_NAME, BPB_BytsPerSec=sector_size,
        BPB_SecPerClus=sectors_per_cluster, BPB_RsvdSecCnt=reserved_sectors,
        BPB_NumFATs=num_fats, BPB_RootEntCnt=0, BPB_TotSec16=0, BPB_Media=MEDIA,
        BPB_FATSz16=0, BPB_SecPerTrk=per_track, BPB_NumHeads=NUM_HEADS,
        BPB_HiddSec=hidden_sectors, BPB_TotSec32=total_sectors, BPB_FATSz32=fat_sectors,
        BPB_ExtFlags=0, BPB_FSVer=0, BPB_RootClus=root_cluster,
        BPB_FSInfo=spec.FAT32_FSINFO_SECTOR, BPB_BkBootSec=spec.FAT32_BACKUP_BOOT_SECTOR,
        BPB_Reserved=b"", BS_DrvNum=DRIVE_NUMBER, BS_Reserved1=0,
        BS_BootSig=EXTENDED_BOOT_SIGNATURE, BS_VolID=serial, BS_VolLab=label,
        BS_FilSysType=FILE_SYSTEM_TYPE)
    assert list(fields) == [f.split()[0] for f in BOOT_SECTOR_FIELDS]
    sector = bytearray(sector_size)
    struct.pack_into(BOOT_SECTOR_FORMAT, sector, 0, *fields.values())
    sector[90:90 + len(BOOT_CODE)] = BOOT_CODE
    sector[510:512] = spec.MBR_SIGNATURE
    sector[-2:] = spec.MBR_SIGNATURE
    return bytes(sector)


def fsinfo_sector(*, sector_size: int, free_count: int, next_free: int) -> bytes:
    sector = bytearray(sector_size)
    struct.pack_into(FSINFO_FORMAT, sector, 0, spec.FSINFO_LEAD_SIG, b"",
                     spec.FSINFO_STRUC_SIG, free_count, next_free, b"",
                     spec.FSINFO_TRAIL_SIG)
    return bytes(sector)


def fat_entries(start: int, stop: int, chain_ends: list[int]) -> bytes:
    """FAT entries start..stop-1 (little-endian u32) for contiguous chains.

    Every cluster points to the next one except those in the sorted ``chain_ends``,
    which end their chain; entries 0 and 1 hold the media byte and EOC.
    """
    entries = array("I", range(start + 1, stop + 1))
    assert entries.itemsize == 4
    if start == 0:
        entries[0] = FAT_ENTRY_0
        if stop > 1:
            entries[1] = FAT_ENTRY_1
    low, high = bisect.bisect_left(chain_ends, start), bisect.bisect_left(chain_ends, stop)
    for last in chain_ends[low:high]:
        entries[last - start] = EOC_MARK
    if sys.byteorder == "big":
        entries.byteswap()
    return entries.tobytes()


def short_entry(name: bytes, attr: int, cluster: int, size: int,
                stamp: tuple[int, int]) -> bytes:
    """A 32-byte short directory entry; one timestamp for create, write and access."""
    date, tm = stamp
    return struct.pack(DIR_FORMAT, name, attr, 0, 0, tm, date, date, cluster >> 16, tm,
                       date, cluster & 0xFFFF, size)
