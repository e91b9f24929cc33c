"""UKI assembly: generated PE32+/PE32 stubs, checked with pefile and an independent reader."""
from __future__ import annotations

import struct
from pathlib import Path

import pefile
import pytest

from builder import spec
from builder.errors import ArmvmError
from builder.payload.uki import build_uki, find_systemd_stub
from tests.fixtures import debian_tree

SA, FA = 0x1000, 0x200
OSREL = 'NAME="Test"\nID=test\n'


def make_stub(*, plus: bool = True, size_of_headers: int = 0x1000, trailer: bytes = b"",
              symtab: bool = False, sections=((b".text", 0x1234), (b".data", 0x10)),
              extra_header_bytes: bytes = b"") -> bytes:
    """A minimal EFI application stub: MZ, PE, COFF, optional header (16 data dirs),
    `sections` (name, size) at SectionAlignment VAs / FileAlignment file offsets."""
    e_lfanew = 0x40
    opt_size = 240 if plus else 224
    table = e_lfanew + 24 + opt_size
    raws, va, off = [], SA, size_of_headers
    for name, size in sections:
        raw = -(-size // FA) * FA
        raws.append((name, size, va, raw, off))
        va += -(-size // SA) * SA
        off += raw
    size_of_image = va
    machine = spec.PE_MACHINE_ARM64 if plus else spec.PE_MACHINE_ARM
    symptr = off if symtab else 0
    coff = struct.pack("<HHIIIHH", machine, len(sections), 0x12345678, symptr,
                       2 if symtab else 0, opt_size, 0x0206)
    code = sum(r[3] for r in raws if r[0] == b".text")
    data_size = sum(r[3] for r in raws if r[0] != b".text")
    if plus:
        opt = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", spec.PE32PLUS_MAGIC, 0, 0, code,
                          data_size, 0, SA, SA, 0x10000000, SA, FA, 0, 0, 0, 0, 0, 0, 0,
                          size_of_image, size_of_headers, 0xABCD, 10, 0x160, 0, 0, 0, 0, 0, 16)
    else:
        opt = struct.pack("<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII", spec.PE32_MAGIC, 0, 0, code,
                          data_size, 0, SA, SA, 0, 0x10000000, SA, FA, 0, 0, 0, 0, 0, 0, 0,
                          size_of_image, size_of_headers, 0xABCD, 10, 0x140, 0, 0, 0, 0, 0, 16)
    opt += bytes(16 * 8)
    assert len(opt) == opt_size
    out = bytearray(size_of_headers)
    out[0:2] = b"MZ"
    struct.pack_into("<I", out, 0x3C, e_lfanew)
    hdr = b"PE\0\0" + coff + opt
    out[e_lfanew:e_lfanew + len(hdr)] = hdr
    for i, (name, size, va, raw, off) in enumerate(raws):
        flags = 0x60000020 if name == b".text" else 0xC0000040
        struct.pack_into("<8sIIIIIIHHI", out, table + 40 * i, name, size, va, raw, off,
                         0, 0, 0, 0, flags)
    end = table + 40 * len(raws)
    out[end:end + len(extra_header_bytes)] = extra_header_bytes
    for name, size, va, raw, off in raws:
        out += (name * (raw // len(name) + 1))[:raw]
    if symtab:
        out += bytes(2 * 18) + struct.pack("<I", 4)     # 2 symbols, empty string table
    return bytes(out + trailer)


def read_sections(data: bytes) -> tuple[dict, list]:
    """Independent reader: header fields and section headers by spec field names."""
    e_lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    machine, nsec = struct.unpack_from("<HH", data, e_lfanew + 4)
    symptr, nsym, opt_size = struct.unpack_from("<IIH", data, e_lfanew + 12)
    opt = e_lfanew + 24
    size_of_code, size_of_init = struct.unpack_from("<II", data, opt + 4)
    sa, fa = struct.unpack_from("<II", data, opt + 32)
    size_of_image, size_of_headers, checksum = struct.unpack_from("<III", data, opt + 56)
    secs = []
    for i in range(nsec):
        name, vs, va, raw, ptr, _r, _l, _nr, _nl, ch = struct.unpack_from(
            "<8sIIIIIIHHI", data, opt + opt_size + 40 * i)
        secs.append(dict(Name=name.rstrip(b"\0").decode(), VirtualSize=vs, VirtualAddress=va,
                         SizeOfRawData=raw, PointerToRawData=ptr, Characteristics=ch))
    hdr = dict(Machine=machine, NumberOfSections=nsec, PointerToSymbolTable=symptr,
               NumberOfSymbols=nsym, SizeOfCode=size_of_code,
               SizeOfInitializedData=size_of_init, SectionAlignment=sa, FileAlignment=fa,
               SizeOfImage=size_of_image, SizeOfHeaders=size_of_headers, CheckSum=checksum)
    return hdr, secs


@pytest.fixture
def payloads(tmp_path):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bytes(range(256)) * 1000 + b"K" * 77)       # 256077 bytes
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701" + b"I" * 5000)
    return kernel, initrd


def build(tmp_path, stub_bytes, payloads, name="uki.efi", **kw):
    stub = tmp_path / f"stub-{name}"
    stub.write_bytes(stub_bytes)
    kernel, initrd = payloads
    args = dict(stub=stub, kernel=kernel, initrd=initrd, cmdline="console=ttyAMA0 x=\"a b\"",
                osrel=OSREL, uname="6.12.0-test-arm64", out=tmp_path / name)
    args.update(kw)
    return build_uki(**args)


@pytest.mark.parametrize("plus", [True, False], ids=["pe32plus-aa64", "pe32-arm"])
def test_uki_sections_layout_and_contents(tmp_path, payloads, plus):
    stub_bytes = make_stub(plus=plus)
    out = build(tmp_path, stub_bytes, payloads)
    data = out.read_bytes()
    old_hdr, old = read_sections(stub_bytes)
    hdr, secs = read_sections(data)
    names = [s["Name"] for s in secs]
    assert names == [s["Name"] for s in old] + [".osrel", ".cmdline", ".uname", ".initrd",
                                                ".linux"]
    assert hdr["NumberOfSections"] == len(old) + 5
    kernel, initrd = payloads
    expect = {".osrel": OSREL.encode(), ".cmdline": b'console=ttyAMA0 x="a b"',
              ".uname": b"6.12.0-test-arm64", ".initrd": initrd.read_bytes(),
              ".linux": kernel.read_bytes()}
    prev_end_va = max(s["VirtualAddress"] + s["VirtualSize"] for s in old)
    prev_end_raw = max(s["PointerToRawData"] + s["SizeOfRawData"] for s in old)
    for s in secs[len(old):]:
        body = expect[s["Name"]]
        assert s["VirtualAddress"] % SA == 0 and s["VirtualAddress"] >= prev_end_va
        assert s["PointerToRawData"] % FA == 0 and s["PointerToRawData"] >= prev_end_raw
        assert s["VirtualSize"] == len(body)
        assert s["SizeOfRawData"] == -(-len(body) // FA) * FA
        assert data[s["PointerToRawData"]:s["PointerToRawData"] + len(body)] == body
        assert not data[s["PointerToRawData"] + len(body):
                        s["PointerToRawData"] + s["SizeOfRawData"]].strip(b"\0")
        want = 0x40000020 if s["Name"] == ".linux" else 0x40000040
        assert s["Characteristics"] == want
        prev_end_va = s["VirtualAddress"] + s["VirtualSize"]
        prev_end_raw = s["PointerToRawData"] + s["SizeOfRawData"]
    last = secs[-1]
    assert hdr["SizeOfImage"] == -(-(last["VirtualAddress"] + last["VirtualSize"]) // SA) * SA
    assert len(data) == last["PointerToRawData"] + last["SizeOfRawData"]
    data_raw = sum(s["SizeOfRawData"] for s in secs[len(old):-1])
    assert hdr["SizeOfInitializedData"] == old_hdr["SizeOfInitializedData"] + data_raw
    assert hdr["SizeOfCode"] == old_hdr["SizeOfCode"] + last["SizeOfRawData"]
    assert hdr["CheckSum"] == 0
    assert data[:old[0]["PointerToRawData"]][:0x40] == stub_bytes[:0x40]   # DOS header kept
    # the stub's own sections are untouched
    for s in old:
        a, n = s["PointerToRawData"], s["SizeOfRawData"]
        assert data[a:a + n] == stub_bytes[a:a + n]

    # and pefile agrees
    pe = pefile.PE(data=data)
    assert [s.Name.rstrip(b"\0").decode() for s in pe.sections] == names
    got = {s.Name.rstrip(b"\0").decode(): s.get_data()[:s.Misc_VirtualSize] for s in pe.sections}
    for name, body in expect.items():
        assert got[name] == body
    assert pe.OPTIONAL_HEADER.SizeOfImage == hdr["SizeOfImage"]
    assert pe.FILE_HEADER.Machine == (spec.PE_MACHINE_ARM64 if plus else spec.PE_MACHINE_ARM)
    assert not [w for w in pe.get_warnings() if "section" in w.lower()], pe.get_warnings()


def test_uki_is_deterministic(tmp_path, payloads):
    stub = make_stub()
    one = build(tmp_path, stub, payloads, name="one.efi").read_bytes()
    two = build(tmp_path, stub, payloads, name="two.efi").read_bytes()
    assert one == two
    three = build(tmp_path, stub, payloads, name="three.efi", cmdline="other").read_bytes()
    assert three != one


def test_no_header_room(tmp_path, payloads):
    # PE32 section table at 0x40+24+224 = 0x128; 2 sections end at 0x178; the first
    # section starts at 0x200: room for 3 more headers, not 5
    stub = make_stub(plus=False, size_of_headers=0x200)
    with pytest.raises(ArmvmError, match="stub has no header room for 5 sections"):
        build(tmp_path, stub, payloads)
    # with only 3 sections to add it fits
    out = build(tmp_path, stub, payloads, initrd=None, osrel="")
    assert read_sections(out.read_bytes())[0]["NumberOfSections"] == 5


def test_header_room_must_be_zero(tmp_path, payloads):
    with pytest.raises(ArmvmError, match="no header room"):
        build(tmp_path, make_stub(extra_header_bytes=b"\x01" * 8), payloads)


def test_exactly_enough_room(tmp_path, payloads):
    # PE32+: table at 0x40+24+240 = 0x130, 2 sections -> 0x180; 5 more -> 0x248
    out = build(tmp_path, make_stub(size_of_headers=0x400), payloads)
    assert read_sections(out.read_bytes())[0]["NumberOfSections"] == 7


def test_symbol_table_is_stripped(tmp_path, payloads):
    out = build(tmp_path, make_stub(symtab=True), payloads)
    hdr, secs = read_sections(out.read_bytes())
    assert hdr["PointerToSymbolTable"] == 0 and hdr["NumberOfSymbols"] == 0
    stub_end = max(s["PointerToRawData"] + s["SizeOfRawData"] for s in secs[:2])
    assert secs[2]["PointerToRawData"] == stub_end


def test_unknown_trailer_is_refused(tmp_path, payloads):
    with pytest.raises(ArmvmError, match="follow the stub's last section"):
        build(tmp_path, make_stub(trailer=b"garbage!"), payloads)


def test_zero_trailer_is_dropped(tmp_path, payloads):
    out = build(tmp_path, make_stub(trailer=bytes(100)), payloads)
    secs = read_sections(out.read_bytes())[1]
    assert secs[2]["PointerToRawData"] == secs[1]["PointerToRawData"] + secs[1]["SizeOfRawData"]


def test_existing_section_clash(tmp_path, payloads):
    stub = make_stub(sections=((b".text", 0x100), (b".linux", 0x10)))
    with pytest.raises(ArmvmError, match="already has section"):
        build(tmp_path, stub, payloads)


def test_empty_parts_are_left_out(tmp_path, payloads):
    out = build(tmp_path, make_stub(), payloads, initrd=None, cmdline="", osrel="")
    names = [s["Name"] for s in read_sections(out.read_bytes())[1]]
    assert names == [".text", ".data", ".uname", ".linux"]


@pytest.mark.parametrize("bad, msg", [
    (b"not a pe file at all" * 10, "no 'MZ'"),
    (b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"XX\0\0" + bytes(300), "PE"),
])
def test_not_a_stub(tmp_path, payloads, bad, msg):
    with pytest.raises(ArmvmError, match=msg):
        build(tmp_path, bad, payloads)


def test_driver_subsystem_refused(tmp_path, payloads):
    stub = bytearray(make_stub())
    struct.pack_into("<H", stub, 0x40 + 24 + 68, 11)
    with pytest.raises(ArmvmError, match="subsystem 11"):
        build(tmp_path, bytes(stub), payloads)


def test_missing_kernel(tmp_path, payloads):
    with pytest.raises(ArmvmError, match="is not a file"):
        build(tmp_path, make_stub(), payloads, kernel=tmp_path / "nope")


def test_find_systemd_stub(tmp_path):
    d = tmp_path / "usr/lib/systemd/boot/efi"
    d.mkdir(parents=True)
    (d / "linuxaa64.efi.stub").write_bytes(b"MZ")
    assert find_systemd_stub(tmp_path, "aarch64") == d / "linuxaa64.efi.stub"
    assert find_systemd_stub(tmp_path, spec.ARCHES["aarch64"]) == d / "linuxaa64.efi.stub"
    with pytest.raises(ArmvmError, match="linuxarm.efi.stub.*systemd-boot-efi"):
        find_systemd_stub(tmp_path, "armv7")
    with pytest.raises(ArmvmError, match="unknown architecture"):
        find_systemd_stub(tmp_path, "riscv64")


# --- Debian's real stubs (network) --------------------------------------------------------

@pytest.mark.network
@pytest.mark.parametrize("arch", ["aarch64", "armv7"])
def test_trixie_stub(pytestconfig, tmp_path, payloads, arch):
    a = spec.ARCHES[arch]
    stub = find_systemd_stub(debian_tree(pytestconfig, "trixie", a.debian_arch,
                                         "systemd-boot-efi"), arch)
    out = build(tmp_path, stub.read_bytes(), payloads)
    pe = pefile.PE(str(out))
    names = [s.Name.rstrip(b"\0").decode() for s in pe.sections]
    assert names[-5:] == [".osrel", ".cmdline", ".uname", ".initrd", ".linux"]
    assert ".sbat" in names and ".text" in names                  # the stub's own
    assert pe.FILE_HEADER.Machine == a.pe_machine and pe.OPTIONAL_HEADER.Magic == a.pe_magic
    assert pe.OPTIONAL_HEADER.Subsystem == spec.PE_SUBSYSTEM_EFI_APPLICATION
    assert pe.sections[-1].get_data()[:pe.sections[-1].Misc_VirtualSize] == \
        payloads[0].read_bytes()
    for s in pe.sections:
        assert s.VirtualAddress % pe.OPTIONAL_HEADER.SectionAlignment == 0


@pytest.mark.network
def test_bookworm_armhf_stub_has_no_room(pytestconfig, tmp_path, payloads):
    stub = find_systemd_stub(debian_tree(pytestconfig, "bookworm", "armhf", "systemd-boot-efi"),
                             "armv7")
    with pytest.raises(ArmvmError, match="stub has no header room for 5 sections"):
        build(tmp_path, stub.read_bytes(), payloads)
