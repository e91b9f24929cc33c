"""Independent GPT reader (UEFI 2.6 chapter 5): protective MBR, both headers, entry arrays.

``analyze(blob)`` never trusts a field before bounding it by the image size. Problems are
collected per requirement (pmbr / primary / backup / partitions / alignment) as text.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional
from uuid import UUID

from builder import spec
from builder.errors import NotAnImageError
from builder.verify.blob import Blob

# UEFI 2.6 Table 20 (GPT Header), field names as the spec spells them.
HEADER_FMT = "<8sIIIIQQQQ16sQIII"
HEADER_FIELDS = ("Signature", "Revision", "HeaderSize", "HeaderCRC32", "Reserved", "MyLBA",
                 "AlternateLBA", "FirstUsableLBA", "LastUsableLBA", "DiskGUID",
                 "PartitionEntryLBA", "NumberOfPartitionEntries", "SizeOfPartitionEntry",
                 "PartitionEntryArrayCRC32")
HEADER_CRC_OFFSET = 16
# UEFI 2.6 Table 21 (GPT Partition Entry).
ENTRY_FMT = "<16s16sQQQ72s"
# UEFI 2.6 Table 16/17 (legacy MBR partition record).
MBR_RECORD_FMT = "<B3sB3sII"   # BootIndicator StartingCHS OSType EndingCHS StartingLBA SizeInLBA
MBR_RECORDS_OFFSET = 446
MAX_ENTRY_ARRAY = 16 << 20      # no real disk has more than 16 MiB of partition entries
UNUSED = UUID(int=0)


def guid_from_disk(raw: bytes) -> UUID:
    """GPT GUIDs are mixed-endian on disk: first three fields little-endian."""
    return UUID(bytes_le=bytes(raw))


@dataclass
class Header:
    lba: int
    fields: dict
    crc_ok: bool = False
    array: Optional[bytes] = None   # the entry array bytes when they could be read
    array_crc_ok: bool = False
    sane: bool = True               # no structural problem (size, MyLBA, array bounds)

    def __getitem__(self, name):
        return self.fields[name]

    @property
    def valid(self) -> bool:
        return self.crc_ok and self.array_crc_ok and self.sane


@dataclass
class Entry:
    index: int
    type_guid: UUID
    unique_guid: UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str


@dataclass
class Gpt:
    sector_size: Optional[int]
    disk_sectors: int
    primary: Optional[Header] = None
    backup: Optional[Header] = None
    entries: list = field(default_factory=list)    # used entries of the chosen header
    entries_from: str = ""                           # 'primary' | 'backup' | ''
    problems: dict = field(default_factory=lambda: {k: [] for k in (
        "pmbr", "primary", "backup", "partitions", "alignment")})


def detect_sector_size(blob: Blob) -> Optional[int]:
    for bs in spec.SECTOR_SIZES:
        if blob.read_at(bs, 8) == spec.GPT_SIGNATURE:
            return bs
    for bs in spec.SECTOR_SIZES:      # primary gone: look for a backup at the end
        last = blob.size // bs - 1
        if last > 1 and blob.read_at(last * bs, 8) == spec.GPT_SIGNATURE:
            return bs
    return None


def analyze(blob: Blob) -> Gpt:
    if blob.size < 512:
        raise NotAnImageError(f"not a disk image: only {blob.size} bytes")
    lba0 = blob.read_at(0, 512)
    bs = detect_sector_size(blob)
    if bs is None and lba0[510:512] != spec.MBR_SIGNATURE:
        raise NotAnImageError("not a disk image: no MBR boot signature and no GPT header "
                              "(checked 512- and 4096-byte sectors)")
    g = Gpt(bs, blob.size // bs if bs else blob.size // 512)
    _check_pmbr(g, lba0)
    if bs is None:
        msg = "no GPT header at LBA 1 or at the last LBA (512- or 4096-byte sectors)"
        for k in ("primary", "backup", "partitions"):
            g.problems[k].append(msg)
        return g
    last = g.disk_sectors - 1
    g.primary = _read_header(blob, g, 1, last, "primary")
    g.backup = _read_header(blob, g, last, 1, "backup")
    _compare_backup(g)
    chosen = None
    for name in ("primary", "backup"):
        h = getattr(g, name)
        if h is not None and h.valid:
            chosen, g.entries_from = h, name
            break
    if chosen is None:
        for name in ("primary", "backup"):
            h = getattr(g, name)
            if h is not None and h.array is not None:
                chosen, g.entries_from = h, name
                g.problems["partitions"].append(f"no valid GPT copy; entries read from the "
                                                f"damaged {name} copy")
                break
    if chosen is None:
        g.problems["partitions"].append("no readable partition entry array")
        return g
    g.entries = _entries(chosen)
    _check_partitions(g, chosen)
    return g


def _check_pmbr(g: Gpt, lba0: bytes) -> None:
    p = g.problems["pmbr"]
    if lba0[510:512] != spec.MBR_SIGNATURE:
        p.append(f"no 0x55AA signature at byte 510 (found {lba0[510:512].hex()})")
    recs = [struct.unpack_from(MBR_RECORD_FMT, lba0, MBR_RECORDS_OFFSET + 16 * i)
            for i in range(4)]
    boot, _, os_type, _, start, size = recs[0]
    if os_type != spec.PMBR_OS_TYPE:
        p.append(f"partition record 0 OSType is 0x{os_type:02X}, expected 0xEE")
    else:
        if start != 1:
            p.append(f"protective record StartingLBA is {start}, expected 1")
        want = min(g.disk_sectors - 1, 0xFFFFFFFF)
        if size not in (want, 0xFFFFFFFF):
            p.append(f"protective record SizeInLBA is {size}, expected {want} "
                     f"(disk sectors - 1) or 0xFFFFFFFF")
    for i in (1, 2, 3):
        if lba0[MBR_RECORDS_OFFSET + 16 * i:MBR_RECORDS_OFFSET + 16 * (i + 1)] != bytes(16):
            p.append(f"partition record {i} is not zero (hybrid MBR?)")


def _read_header(blob: Blob, g: Gpt, lba: int, alt: int, name: str) -> Optional[Header]:
    bs, p = g.sector_size, g.problems[name]
    last = g.disk_sectors - 1
    block = blob.read_at(lba * bs, bs)
    if len(block) < 92 or block[:8] != spec.GPT_SIGNATURE:
        where = "LBA 1" if name == "primary" else f"the last LBA ({lba})"
        p.append(f"no 'EFI PART' signature at {where}")
        return None
    f = dict(zip(HEADER_FIELDS, struct.unpack_from(HEADER_FMT, block)))
    h = Header(lba, f)
    if f["Revision"] != spec.GPT_REVISION:
        p.append(f"Revision 0x{f['Revision']:08X}, expected 0x00010000")
    hsize = f["HeaderSize"]
    if not 92 <= hsize <= bs:
        p.append(f"HeaderSize {hsize} outside 92..{bs}")
        hsize, h.sane = 92, False
    elif any(block[hsize:]):
        p.append(f"bytes after HeaderSize ({hsize}) up to the end of the block are not zero")
    raw = bytearray(block[:hsize])
    raw[HEADER_CRC_OFFSET:HEADER_CRC_OFFSET + 4] = b"\0\0\0\0"
    crc = zlib.crc32(bytes(raw)) & 0xFFFFFFFF
    h.crc_ok = crc == f["HeaderCRC32"]
    if not h.crc_ok:
        p.append(f"HeaderCRC32 0x{f['HeaderCRC32']:08X} does not match 0x{crc:08X}")
    if f["MyLBA"] != lba:
        p.append(f"MyLBA is {f['MyLBA']}, expected {lba}")
        h.sane = False
    if f["AlternateLBA"] != alt:
        who = "the backup" if name == "primary" else "the primary"
        (g.problems["backup"] if name == "primary" else p).append(
            f"{name} AlternateLBA is {f['AlternateLBA']}, expected {alt} ({who} header)")
    esize, count = f["SizeOfPartitionEntry"], f["NumberOfPartitionEntries"]
    if esize < 128 or esize & (esize - 1):
        p.append(f"SizeOfPartitionEntry {esize} is not 128 x 2^n")
    nbytes = esize * count
    if nbytes < spec.GPT_ENTRY_ARRAY_MIN_BYTES:
        p.append(f"entry array is {count} x {esize} = {nbytes} bytes, less than 16 KiB")
    array_blocks = -(-nbytes // bs)
    min_first = 2 + -(-spec.GPT_ENTRY_ARRAY_MIN_BYTES // bs)
    if name == "primary":
        if f["FirstUsableLBA"] < min_first:
            p.append(f"FirstUsableLBA {f['FirstUsableLBA']} < {min_first}")
        if f["PartitionEntryLBA"] < 2:
            p.append(f"PartitionEntryLBA {f['PartitionEntryLBA']} < 2")
        elif f["PartitionEntryLBA"] + array_blocks > f["FirstUsableLBA"]:
            p.append("the entry array reaches into the usable area (FirstUsableLBA "
                     f"{f['FirstUsableLBA']})")
    elif f["PartitionEntryLBA"] != lba - array_blocks:
        p.append(f"backup PartitionEntryLBA is {f['PartitionEntryLBA']}, expected "
                 f"{lba - array_blocks} (just before the backup header)")
    if not f["FirstUsableLBA"] <= f["LastUsableLBA"] < last:
        p.append(f"usable range {f['FirstUsableLBA']}..{f['LastUsableLBA']} is not inside "
                 f"the disk (last LBA {last})")
    elif name == "primary" and f["LastUsableLBA"] >= last - array_blocks:
        p.append(f"LastUsableLBA {f['LastUsableLBA']} overlaps the backup GPT area")
    if esize < 128 or esize & (esize - 1) or nbytes > MAX_ENTRY_ARRAY or nbytes == 0:
        h.sane = False
        if nbytes > MAX_ENTRY_ARRAY:
            p.append(f"entry array of {nbytes} bytes is implausibly large (limit 16 MiB)")
        return h
    start = f["PartitionEntryLBA"] * bs
    if start + nbytes > blob.size:
        p.append(f"entry array at LBA {f['PartitionEntryLBA']} runs past the end of the image")
        return h
    h.array = b"".join(blob.chunks(start, start + nbytes))
    acrc = zlib.crc32(h.array) & 0xFFFFFFFF
    h.array_crc_ok = acrc == f["PartitionEntryArrayCRC32"]
    if not h.array_crc_ok:
        p.append(f"PartitionEntryArrayCRC32 0x{f['PartitionEntryArrayCRC32']:08X} does not "
                 f"match 0x{acrc:08X}")
    return h


def _compare_backup(g: Gpt) -> None:
    p, pri, bak = g.problems["backup"], g.primary, g.backup
    if pri is None or bak is None:
        return
    for k in ("FirstUsableLBA", "LastUsableLBA", "DiskGUID", "NumberOfPartitionEntries",
              "SizeOfPartitionEntry"):
        if pri[k] != bak[k]:
            p.append(f"backup {k} differs from the primary's")
    if pri.array is not None and pri.array_crc_ok and bak.array is not None \
            and pri.array != bak.array:
        p.append("backup entry array differs from the primary's")


def _entries(h: Header) -> list:
    out = []
    esize = h["SizeOfPartitionEntry"]
    for i in range(len(h.array) // esize):
        t, u, first, last, attrs, name = struct.unpack_from(ENTRY_FMT, h.array, i * esize)
        tg = guid_from_disk(t)
        if tg == UNUSED:
            continue
        nm = name.decode("utf-16-le", "replace").split("\0", 1)[0]
        out.append(Entry(i + 1, tg, guid_from_disk(u), first, last, attrs, nm))
    return out


class _Capped(list):
    """A problem list that stops growing after LIMIT entries (hostile entry arrays)."""
    LIMIT = 50

    def append(self, msg):
        if len(self) < self.LIMIT:
            super().append(msg)
        elif len(self) == self.LIMIT:
            super().append("(more problems not listed)")


def _check_partitions(g: Gpt, h: Header) -> None:
    g.problems["partitions"] = p = _Capped(g.problems["partitions"])
    g.problems["alignment"] = _Capped(g.problems["alignment"])
    bs = g.sector_size
    lo, hi = h["FirstUsableLBA"], h["LastUsableLBA"]
    seen = {}
    for e in g.entries:
        if e.first_lba > e.last_lba:
            p.append(f"partition {e.index}: StartingLBA {e.first_lba} > EndingLBA {e.last_lba}")
        elif e.first_lba < lo or e.last_lba > hi:
            p.append(f"partition {e.index}: LBA {e.first_lba}..{e.last_lba} outside the usable "
                     f"range {lo}..{hi}")
        if e.unique_guid == UNUSED:
            p.append(f"partition {e.index}: UniquePartitionGUID is zero")
        elif e.unique_guid in seen:
            p.append(f"partitions {seen[e.unique_guid]} and {e.index} share "
                     f"UniquePartitionGUID {e.unique_guid}")
        else:
            seen[e.unique_guid] = e.index
        if (e.first_lba * bs) % spec.ALIGNMENT_BYTES:
            g.problems["alignment"].append(
                f"partition {e.index} starts at byte {e.first_lba * bs}, not on a 1 MiB boundary")
    ordered = sorted((e for e in g.entries if e.first_lba <= e.last_lba),
                     key=lambda e: (e.first_lba, e.last_lba))
    reach = None
    for e in ordered:
        if reach is not None and e.first_lba <= reach.last_lba:
            p.append(f"partitions {reach.index} and {e.index} overlap "
                     f"(LBA {e.first_lba}..{min(e.last_lba, reach.last_lba)})")
        if reach is None or e.last_lba > reach.last_lba:
            reach = e
