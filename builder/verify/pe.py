"""Independent PE/COFF header reader (Microsoft PE/COFF Specification), enough for UEFI.

Reads the MS-DOS stub's e_lfanew, the COFF file header, the optional header's Magic and
Subsystem, and the section table; every offset is checked against the file size.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from builder.verify.blob import Blob, SliceBlob

E_LFANEW_OFFSET = 0x3C
COFF_FMT = "<HHIIIHH"
COFF_FIELDS = ("Machine", "NumberOfSections", "TimeDateStamp", "PointerToSymbolTable",
               "NumberOfSymbols", "SizeOfOptionalHeader", "Characteristics")
SUBSYSTEM_OFFSET = 68        # same in PE32 and PE32+ optional headers
SECTION_FMT = "<8sIIIIIIHHI"
SECTION_FIELDS = ("Name", "VirtualSize", "VirtualAddress", "SizeOfRawData", "PointerToRawData",
                  "PointerToRelocations", "PointerToLinenumbers", "NumberOfRelocations",
                  "NumberOfLinenumbers", "Characteristics")
SECTION_SIZE = 40

MACHINE_NAMES = {0xAA64: "ARM64", 0x01C2: "ARM (Thumb mixed)", 0x01C4: "ARMNT", 0x8664: "AMD64",
                 0x014C: "I386", 0x5064: "RISCV64", 0x6264: "LOONGARCH64", 0x0200: "IA64"}
SUBSYSTEM_NAMES = {10: "EFI application", 11: "EFI boot service driver",
                   12: "EFI runtime driver", 13: "EFI ROM"}


class PeError(Exception):
    """Not a PE image, or headers that point outside the file."""


@dataclass
class Section:
    name: str
    VirtualSize: int
    VirtualAddress: int
    SizeOfRawData: int
    PointerToRawData: int
    Characteristics: int

    @property
    def data_size(self) -> int:
        """Bytes of meaningful content: VirtualSize unless raw data is shorter or it is 0."""
        if self.VirtualSize and self.VirtualSize <= self.SizeOfRawData:
            return self.VirtualSize
        return self.SizeOfRawData


@dataclass
class PeImage:
    machine: int
    magic: int
    subsystem: int
    sections: list
    problems: list = field(default_factory=list)   # non-fatal (e.g. section data cut off)

    def section(self, name: str):
        for s in self.sections:
            if s.name == name:
                return s
        return None


def machine_name(m: int) -> str:
    return f"0x{m:04X} ({MACHINE_NAMES.get(m, 'unknown')})"


def parse_pe(blob: Blob) -> PeImage:
    head = blob.read_at(0, 64)
    if head[:2] != b"MZ":
        raise PeError(f"no 'MZ' signature (starts with {head[:4].hex() or 'nothing'})")
    if len(head) < 64:
        raise PeError("file too short for an MS-DOS header")
    lfanew = struct.unpack_from("<I", head, E_LFANEW_OFFSET)[0]
    if lfanew + 24 > blob.size:
        raise PeError(f"e_lfanew 0x{lfanew:X} points outside the file ({blob.size} bytes)")
    pe = blob.read_at(lfanew, 24)
    if pe[:4] != b"PE\0\0":
        raise PeError(f"no 'PE\\0\\0' signature at e_lfanew 0x{lfanew:X}")
    coff = dict(zip(COFF_FIELDS, struct.unpack_from(COFF_FMT, pe, 4)))
    opt_off = lfanew + 24
    opt_size = coff["SizeOfOptionalHeader"]
    if opt_size < SUBSYSTEM_OFFSET + 2:
        raise PeError(f"SizeOfOptionalHeader {opt_size} is too small for an image")
    opt = blob.read_at(opt_off, SUBSYSTEM_OFFSET + 2)
    if len(opt) < SUBSYSTEM_OFFSET + 2:
        raise PeError("the optional header runs past the end of the file")
    magic = struct.unpack_from("<H", opt, 0)[0]
    subsystem = struct.unpack_from("<H", opt, SUBSYSTEM_OFFSET)[0]
    nsec = coff["NumberOfSections"]
    table = opt_off + opt_size
    img = PeImage(coff["Machine"], magic, subsystem, [])
    if table + nsec * SECTION_SIZE > blob.size:
        raise PeError(f"the section table ({nsec} sections at 0x{table:X}) runs past the end "
                      f"of the file ({blob.size} bytes)")
    raw = blob.read_at(table, nsec * SECTION_SIZE)
    for i in range(nsec):
        f = dict(zip(SECTION_FIELDS, struct.unpack_from(SECTION_FMT, raw, i * SECTION_SIZE)))
        name = f["Name"].split(b"\0", 1)[0].decode("ascii", "replace")
        s = Section(name, f["VirtualSize"], f["VirtualAddress"], f["SizeOfRawData"],
                    f["PointerToRawData"], f["Characteristics"])
        if s.SizeOfRawData and s.PointerToRawData + s.SizeOfRawData > blob.size:
            img.problems.append(f"section {name!r} data (0x{s.PointerToRawData:X} + "
                                f"0x{s.SizeOfRawData:X}) runs past the end of the file")
        img.sections.append(s)
    return img


def section_blob(blob: Blob, s: Section) -> Blob:
    """The section's content (clamped to the file)."""
    return SliceBlob(blob, s.PointerToRawData, s.data_size)
