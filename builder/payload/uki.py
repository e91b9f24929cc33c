"""Unified kernel images: systemd-boot's EFI stub plus the kernel, initramfs, command line,
os-release and uname as extra PE sections, assembled here with struct (no objcopy/ukify).

Layout follows systemd's ukify: the new sections go after the stub's last section, each at
the next SectionAlignment-aligned virtual address and FileAlignment-aligned file offset,
in the order .osrel .cmdline .uname .initrd .linux (.linux last, leaving room after it
for the kernel's decompression).  Data sections are initialized read-only data, .linux is
marked code, CheckSum is 0 (as ukify writes it; UEFI does not check it).  The output is a
function of the inputs alone.  The stub must have room in its headers for the new section
headers (the bookworm armhf stub has none).
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from builder import spec
from builder.errors import ArmvmError

# PE/COFF section flags (Microsoft PE format, "Section Flags")
IMAGE_SCN_CNT_CODE = 0x00000020
IMAGE_SCN_CNT_INITIALIZED_DATA = 0x00000040
IMAGE_SCN_MEM_READ = 0x40000000
SECTION_HEADER_SIZE = 40
CERTIFICATE_TABLE = 4                   # data directory index (file offset, not an RVA)
MAX_STUB_BYTES = 16 * 1024 * 1024
MAX_TEXT_BYTES = 1024 * 1024            # .osrel / .cmdline / .uname
UKI_ORDER = (".osrel", ".cmdline", ".uname", ".initrd", ".linux")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class _Section:
    name: bytes
    virtual_size: int
    virtual_address: int
    size_of_raw_data: int
    pointer_to_raw_data: int
    characteristics: int


@dataclass
class _Stub:
    data: bytearray
    opt: int                # file offset of the optional header
    magic: int
    table: int              # file offset of the section table
    sections: list


def _parse_stub(path: Path) -> _Stub:
    size = path.stat().st_size
    if size > MAX_STUB_BYTES:
        raise ArmvmError(f"{path}: {size} bytes is too large for an EFI stub")
    data = bytearray(path.read_bytes())

    def bad(why: str) -> ArmvmError:
        return ArmvmError(f"{path}: not a usable EFI stub: {why}")

    if len(data) < 0x40 or data[:2] != b"MZ":
        raise bad("no 'MZ' header")
    lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    if lfanew + 24 > len(data) or data[lfanew:lfanew + 4] != b"PE\0\0":
        raise bad("e_lfanew does not point at 'PE\\0\\0'")
    _machine, nsec, _ts, _sym, _nsym, opt_size, _ch = struct.unpack_from("<HHIIIHH", data,
                                                                          lfanew + 4)
    opt = lfanew + 24
    if opt + opt_size > len(data) or opt_size < 96:
        raise bad("optional header out of range")
    magic = struct.unpack_from("<H", data, opt)[0]
    if magic not in (spec.PE32_MAGIC, spec.PE32PLUS_MAGIC):
        raise bad(f"optional header magic {magic:#x} (allowed: 0x10b, 0x20b)")
    subsystem = struct.unpack_from("<H", data, opt + 68)[0]
    if subsystem != spec.PE_SUBSYSTEM_EFI_APPLICATION:
        raise bad(f"subsystem {subsystem} is not an EFI application (10)")
    table = opt + opt_size
    if table + nsec * SECTION_HEADER_SIZE > len(data):
        raise bad("section table out of range")
    sections = []
    for i in range(nsec):
        name, vs, va, raw, ptr, _r, _l, _nr, _nl, ch = struct.unpack_from(
            "<8sIIIIIIHHI", data, table + i * SECTION_HEADER_SIZE)
        if ptr + raw > len(data):
            raise bad(f"section {name.rstrip(bytes(1))!r} lies past the end of the file")
        sections.append(_Section(name, vs, va, raw, ptr, ch))
    return _Stub(data, opt, magic, table, sections)


def _dir_offset(stub: _Stub, index: int) -> int | None:
    """File offset of data directory `index`, None when the header has no such entry."""
    base = stub.opt + (92 if stub.magic == spec.PE32_MAGIC else 108)
    count = struct.unpack_from("<I", stub.data, base)[0]
    return base + 4 + 8 * index if index < count else None


def _strip_trailer(stub: _Stub, path: Path) -> int:
    """End of the stub's section data; a symbol table or signature after it is dropped
    (the UKI is a new, unsigned image).  Other trailing data is refused."""
    data = stub.data
    end = max([s.pointer_to_raw_data + s.size_of_raw_data for s in stub.sections] +
              [struct.unpack_from("<I", data, stub.opt + 60)[0]])     # SizeOfHeaders
    lfanew = stub.opt - 24
    symtab = struct.unpack_from("<I", data, lfanew + 12)[0]
    if symtab >= end:
        struct.pack_into("<II", data, lfanew + 12, 0, 0)      # PointerToSymbolTable, count
    cert = _dir_offset(stub, CERTIFICATE_TABLE)
    if cert is not None:
        off, size = struct.unpack_from("<II", data, cert)
        if size and off >= end:
            struct.pack_into("<II", data, cert, 0, 0)
    trailer = data[end:]
    known = [o for o in (symtab, off if cert is not None and size else 0) if o >= end]
    if trailer.strip(b"\0") and not known:
        raise ArmvmError(f"{path}: {len(trailer)} bytes follow the stub's last section and "
                         f"are neither a symbol table nor a signature; refusing to append")
    return end


def build_uki(*, stub: Path, kernel: Path, initrd: Path | None, cmdline: str, osrel: str,
              uname: str, out: Path) -> Path:
    """Write stub + .osrel .cmdline .uname .initrd .linux to `out` (empty text sections and
    a None initrd are left out).  Raises ArmvmError when the stub has no header room."""
    stub, kernel, out = Path(stub), Path(kernel), Path(out)
    st = _parse_stub(stub)
    texts = {".osrel": osrel, ".cmdline": cmdline, ".uname": uname}
    payload: dict[str, bytes | Path] = {}
    for name in UKI_ORDER:
        if name in texts:
            raw = (texts[name] or "").encode("utf-8")
            if len(raw) > MAX_TEXT_BYTES:
                raise ArmvmError(f"UKI {name} text is {len(raw)} bytes (at most "
                                 f"{MAX_TEXT_BYTES})")
            if raw:
                payload[name] = raw
        else:
            p = kernel if name == ".linux" else initrd
            if p is None:
                continue
            p = Path(p)
            if not p.is_file():
                raise ArmvmError(f"UKI {name}: '{p}' is not a file")
            if p.stat().st_size or name == ".linux":
                payload[name] = p
    present = {s.name.rstrip(b"\0").decode("latin-1") for s in st.sections}
    clash = sorted(present & set(payload))
    if clash:
        raise ArmvmError(f"{stub}: the stub already has section(s) {', '.join(clash)}")

    # header room: the new section headers must fit in zero bytes before the first section
    n_new = len(payload)
    table_end = st.table + len(st.sections) * SECTION_HEADER_SIZE
    size_of_headers = struct.unpack_from("<I", st.data, st.opt + 60)[0]
    first_raw = min([s.pointer_to_raw_data for s in st.sections if s.size_of_raw_data] +
                    [size_of_headers])
    room_end = table_end + n_new * SECTION_HEADER_SIZE
    if room_end > min(size_of_headers, first_raw) or st.data[table_end:room_end].strip(b"\0"):
        raise ArmvmError(f"{stub}: stub has no header room for {n_new} sections (its headers "
                         f"end at {table_end:#x}, the first section starts at "
                         f"{min(size_of_headers, first_raw):#x}); use a newer systemd-boot "
                         f"stub (e.g. trixie's) or the 'grub' loader")
    end = _strip_trailer(st, stub)

    section_alignment, file_alignment = struct.unpack_from("<II", st.data, st.opt + 32)
    if section_alignment == 0 or file_alignment == 0 or section_alignment & (section_alignment - 1) \
            or file_alignment & (file_alignment - 1):
        raise ArmvmError(f"{stub}: alignments {section_alignment:#x}/{file_alignment:#x} are "
                         f"not powers of two")
    va = _align(max(s.virtual_address + max(s.virtual_size, s.size_of_raw_data)
                    for s in st.sections), section_alignment)
    offset = _align(end, file_alignment)
    new: list[tuple[_Section, bytes | Path, int]] = []
    code_bytes = data_bytes = 0
    for name, content in payload.items():
        length = len(content) if isinstance(content, bytes) else content.stat().st_size
        raw = _align(length, file_alignment)
        if name == ".linux":
            flags, code_bytes = IMAGE_SCN_CNT_CODE | IMAGE_SCN_MEM_READ, code_bytes + raw
        else:
            flags, data_bytes = IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ, \
                data_bytes + raw
        new.append((_Section(name.encode(), length, va, raw, offset, flags), content, length))
        offset += raw
        va = _align(va + length, section_alignment)
    if va >= 1 << 32 or offset >= 1 << 32:
        raise ArmvmError(f"UKI would be {offset} bytes: too large for a PE image")

    hdr = st.data[:end]
    for i, (s, _c, _n) in enumerate(new):
        struct.pack_into("<8sIIIIIIHHI", hdr, table_end + i * SECTION_HEADER_SIZE, s.name,
                         s.virtual_size, s.virtual_address, s.size_of_raw_data,
                         s.pointer_to_raw_data, 0, 0, 0, 0, s.characteristics)
    lfanew = st.opt - 24
    struct.pack_into("<H", hdr, lfanew + 6, len(st.sections) + n_new)   # NumberOfSections
    size_of_code, size_of_data = struct.unpack_from("<II", hdr, st.opt + 4)
    struct.pack_into("<II", hdr, st.opt + 4, size_of_code + code_bytes, size_of_data + data_bytes)
    struct.pack_into("<I", hdr, st.opt + 56, va)                       # SizeOfImage
    struct.pack_into("<I", hdr, st.opt + 64, 0)                        # CheckSum

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(hdr)
        for s, content, length in new:
            f.write(bytes(s.pointer_to_raw_data - f.tell()))
            if isinstance(content, bytes):
                f.write(content)
            else:
                with open(content, "rb") as src:
                    shutil.copyfileobj(src, f, 1024 * 1024)
            if f.tell() != s.pointer_to_raw_data + length:
                raise ArmvmError(f"UKI {s.name.decode()}: '{content}' changed while copying")
        f.write(bytes(offset - f.tell()))
    os.replace(tmp, out)
    return out


def find_systemd_stub(tree: Path, arch) -> Path:
    """usr/lib/systemd/boot/efi/linuxaa64.efi.stub / linuxarm.efi.stub in an extracted
    systemd-boot-efi tree."""
    a = arch if isinstance(arch, spec.Arch) else spec.ARCHES.get(str(arch))
    if a is None:
        raise ArmvmError(f"unknown architecture '{arch}' (allowed: "
                         f"{', '.join(sorted(spec.ARCHES))})")
    p = Path(tree) / "usr" / "lib" / "systemd" / "boot" / "efi" / a.systemd_stub
    if not p.is_file():
        raise ArmvmError(f"{tree}: no systemd-boot stub at usr/lib/systemd/boot/efi/"
                         f"{a.systemd_stub}; expected an extracted '{a.debian_arch}' "
                         f"'systemd-boot-efi' package")
    return p
