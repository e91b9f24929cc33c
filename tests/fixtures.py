"""Tiny generated inputs for build tests: minimal but valid PE/COFF EFI applications and
kernel image headers (real Debian binaries belong to the end-to-end tests)."""
from __future__ import annotations

import struct
import textwrap
from pathlib import Path

AA64, ARM, ARMNT, AMD64 = 0xAA64, 0x01C2, 0x01C4, 0x8664


def pe_image(machine: int = AA64, *, subsystem: int = 10, payload: bytes = b"", prefix: bytes = b"") -> bytes:
    """A PE/COFF image with one .text section: MZ header (optionally `prefix` bytes inside
    the DOS header area, e.g. a kernel header), PE signature, COFF header, optional header
    (PE32+ for AArch64/x86-64, PE32 otherwise), section table."""
    plus = machine in (AA64, AMD64)
    e_lfanew = 0x80
    dos = bytearray(e_lfanew)
    dos[0:2] = b"MZ"
    dos[2:2 + len(prefix)] = prefix
    struct.pack_into("<I", dos, 0x3C, e_lfanew)
    opt_size = 240 if plus else 224
    coff = struct.pack("<HHIIIHH", machine, 1, 0, 0, 0, opt_size, 0x0206 if plus else 0x0306)
    text_raw = 0x200
    body = payload or b"\xc0\x03\x5f\xd6" * 16
    raw_size = -(-len(body) // 0x200) * 0x200
    if plus:
        opt = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", 0x20B, 0, 0, raw_size, 0, 0, 0x1000, 0x1000,
                          0, 0x1000, 0x200, 0, 0, 0, 0, 0, 0, 0, 0x1000 + -(-raw_size // 0x1000) * 0x1000,
                          0x200, 0, subsystem, 0, 0, 0, 0, 0, 0, 16)
    else:
        opt = struct.pack("<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII", 0x10B, 0, 0, raw_size, 0, 0, 0x1000, 0x1000,
                          0x1000, 0, 0x1000, 0x200, 0, 0, 0, 0, 0, 0, 0,
                          0x1000 + -(-raw_size // 0x1000) * 0x1000, 0x200, 0, subsystem, 0, 0, 0, 0, 0, 0, 16)
    opt += bytes(16 * 8)
    assert len(opt) == opt_size, len(opt)
    section = struct.pack("<8sIIIIIIHHI", b".text", raw_size, 0x1000, raw_size, text_raw, 0, 0, 0, 0, 0x60000020)
    head = bytes(dos) + b"PE\0\0" + coff + opt + section
    head += bytes(text_raw - len(head))
    return head + body + bytes(raw_size - len(body))


def arm64_kernel(size: int = 64 * 1024) -> bytes:
    """An AArch64 `Image` that is also an EFI stub: 'ARM\\x64' at 0x38, PE/COFF at 0x40."""
    img = bytearray(pe_image(AA64, payload=bytes(size)))
    img[0x38:0x3C] = b"ARM\x64"
    return bytes(img)


def arm_zimage(size: int = 64 * 1024) -> bytes:
    """An AArch32 zImage that is also an EFI stub: 0x016F2818 at 0x24, PE32 machine 0x01C2."""
    img = bytearray(pe_image(ARM, payload=bytes(size)))
    struct.pack_into("<I", img, 0x24, 0x016F2818)
    return bytes(img)


def write_efi_tree(root: Path, *, arch: str = "aarch64") -> dict:
    """Files for a prebuilt-loader recipe: loader.efi, vmlinuz, initrd.img, grub.cfg."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    machine = AA64 if arch == "aarch64" else ARM
    (files / "loader.efi").write_bytes(pe_image(machine))
    (files / "vmlinuz").write_bytes(arm64_kernel() if arch == "aarch64" else arm_zimage())
    (files / "initrd.img").write_bytes(b"070701" + bytes(200))
    (files / "grub.cfg").write_text("set timeout=0\nmenuentry x {\n  linux /vmlinuz console=ttyAMA0\n"
                                    "  initrd /initrd.img\n}\n")
    return {p.name: p for p in files.iterdir()}


def efi_recipe(root: Path, *, name: str = "demo", sector_size: int = 512, disk: str = "512MiB",
               esp: str = "256MiB", extra_files: str = "") -> Path:
    write_efi_tree(root)
    text = textwrap.dedent(f"""\
        name: {name}
        arch: aarch64
        bootloader: {{type: efi, file: files/loader.efi}}
        disk:
          size: {disk}
          sector_size: {sector_size}
          partitions:
            - type: esp
              size: {esp}
              label: ESP
              files:
                - {{file: files/grub.cfg, dest: EFI/BOOT/grub.cfg}}
                - {{file: files/vmlinuz, dest: vmlinuz}}
                - {{file: files/initrd.img, dest: initrd.img}}
        """) + extra_files
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def debian_tree(pytestconfig, suite: str, arch: str, package: str) -> Path:
    """A package of the real Debian archive, extracted through the project's own client and
    cached in pytest's cache dir; skips when offline tests are asked for or the keyring is
    missing."""
    import os
    import pytest
    if os.environ.get("ARMVM_OFFLINE_TESTS") == "1":
        pytest.skip("ARMVM_OFFLINE_TESTS=1")
    from builder.inputs.cache import Cache
    from builder.inputs.debian.archive import DEFAULT_KEYRING, DebianArchive
    from builder.inputs.sources import Fetcher
    if not DEFAULT_KEYRING.is_file():
        pytest.skip("debian-archive-keyring missing")
    fetcher = Fetcher(cache=Cache(Path(pytestconfig.cache.mkdir("armvm-debian"))),
                      progress=False)
    archive = DebianArchive(fetcher, mirror=None, suite=suite, components=["main"], arch=arch)
    return archive.extract(archive.resolve(package))
