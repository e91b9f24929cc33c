"""Test helpers: tiny kernel module objects and fake extracted kernel package trees.

Modules are real ELF relocatable objects compiled by the host's ``gcc -c`` from a C file
whose strings live in a ``.modinfo`` section (as MODULE_INFO() puts them); e_machine is then
set to the target's so the scanner's architecture check sees an ARM module.
Kernel images are generated headers: MZ + PE with the target's machine type, plus the
"ARM\\x64" (AArch64 Image) or zImage magic.
"""
from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from builder import spec

EM = {"aarch64": 183, "armv7": 40}
_OBJECT_CACHE: dict[tuple, bytes] = {}


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def compile_modinfo_object(fields: list[tuple[str, str]], *, elf32: bool = False) -> bytes:
    """An ELF .o from ``gcc -c`` with ``key=value`` strings in its .modinfo section."""
    key = (tuple(fields), elf32)
    if key not in _OBJECT_CACHE:
        if shutil.which("gcc") is None:
            pytest.fail("gcc is needed to build test modules (apt-get install gcc)")
        lines = ["int armvm_test_function(void) { return 42; }"]
        for i, (k, v) in enumerate(fields):
            lines.append(f"static const char armvm_modinfo_{i}[] "
                         f"__attribute__((section(\".modinfo\"), used, aligned(1))) = "
                         f"{_c_string(f'{k}={v}')};")
        with tempfile.TemporaryDirectory() as tmp:
            src, obj = Path(tmp) / "mod.c", Path(tmp) / "mod.o"
            src.write_text("\n".join(lines) + "\n")
            cmd = ["gcc", "-c", "-O0"] + (["-m32"] if elf32 else []) + [str(src), "-o", str(obj)]
            subprocess.run(cmd, check=True, capture_output=True)
            _OBJECT_CACHE[key] = obj.read_bytes()
    return _OBJECT_CACHE[key]


def with_machine(obj: bytes, machine: int) -> bytes:
    """Set ELF e_machine (offset 0x12, in the file's byte order)."""
    order = "<" if obj[5] == 1 else ">"
    return obj[:0x12] + struct.pack(order + "H", machine) + obj[0x14:]


def make_ko(path: Path, fields: list[tuple[str, str]], *, arch: str = "aarch64",
            compress: str | None = None) -> Path:
    """Write a module file; ``compress`` in (None, 'xz', 'gz', 'zst') picks the suffix."""
    data = with_machine(compile_modinfo_object(fields, elf32=(arch == "armv7")), EM[arch])
    if compress == "xz":
        data = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif compress == "gz":
        data = gzip.compress(data, mtime=0)
    elif compress == "zst":
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    suffix = ".ko" + (f".{compress}" if compress else "")
    out = path.with_name(path.name + suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def kernel_image(arch: str = "aarch64", *, efi_stub: bool = True, pe_machine: int | None = None,
                 size: int = 8192) -> bytes:
    """A minimal kernel image header: AArch64 Image or AArch32 zImage, optionally PE."""
    img = bytearray(size)
    if arch == "aarch64":
        img[spec.ARM64_IMAGE_MAGIC_OFFSET:spec.ARM64_IMAGE_MAGIC_OFFSET + 4] = spec.ARM64_IMAGE_MAGIC
        machine, magic, opt_size = spec.PE_MACHINE_ARM64, spec.PE32PLUS_MAGIC, 0xF0
    else:
        struct.pack_into("<I", img, spec.ZIMAGE_MAGIC_OFFSET, spec.ZIMAGE_MAGIC)
        machine, magic, opt_size = spec.PE_MACHINE_ARM, spec.PE32_MAGIC, 0xE0
    if efi_stub:
        img[0:2] = b"MZ"
        struct.pack_into("<I", img, 0x3C, 0x40)                 # e_lfanew
        img[0x40:0x44] = b"PE\0\0"
        # COFF header: Machine, NumberOfSections, TimeDateStamp, PointerToSymbolTable,
        # NumberOfSymbols, SizeOfOptionalHeader, Characteristics
        struct.pack_into("<HHIIIHH", img, 0x44, pe_machine or machine, 0, 0, 0, 0, opt_size, 0x0206)
        struct.pack_into("<H", img, 0x58, magic)                # optional header Magic
        struct.pack_into("<H", img, 0x58 + 68, spec.PE_SUBSYSTEM_EFI_APPLICATION)
    return bytes(img)


# name in the file (dashes allowed), fields of .modinfo
DEFAULT_MODULES = {
    "kernel/drivers/net/virtio_net": [("alias", "virtio:d00000001v*"), ("depends", "net_failover"),
                                      ("name", "virtio_net"), ("license", "GPL")],
    "kernel/drivers/net/net_failover": [("depends", "failover"), ("name", "net_failover")],
    "kernel/net/core/failover": [("depends", ""), ("name", "failover")],
    "kernel/drivers/block/virtio_blk": [("alias", "virtio:d00000002v*"), ("depends", ""),
                                        ("name", "virtio_blk")],
    "kernel/drivers/virtio/virtio_mmio": [("alias", "of:N*T*Cvirtio,mmio"), ("depends", ""),
                                          ("name", "virtio_mmio")],
    "kernel/drivers/block/xen-blkfront": [("alias", "xen:vbd"), ("alias", "xenblk"),
                                          ("depends", ""), ("name", "xen_blkfront")],
}
BUILTIN = ("kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_pci.ko",
           "kernel/drivers/tty/serial/amba-pl011.ko")
CONFIG = {"CONFIG_VIRTIO": "y", "CONFIG_VIRTIO_PCI": "y", "CONFIG_VIRTIO_NET": "m",
          "CONFIG_VIRTIO_BLK": "m", "CONFIG_SERIAL_AMBA_PL011": "y", "CONFIG_RD_GZIP": "y",
          "CONFIG_RD_XZ": "y", "CONFIG_RD_ZSTD": "y", "CONFIG_LOCALVERSION": '"-test"'}


def make_kernel_tree(root: Path, *, version: str = "6.12.0-test-arm64", arch: str = "aarch64",
                     layout: str = "trixie", compress: str | None = "xz", efi_stub: bool = True,
                     modules: dict | None = None, config: dict | None = None,
                     pe_machine: int | None = None) -> Path:
    """A directory like ``dpkg-deb -x linux-image-<version>_*.deb root``."""
    modules = DEFAULT_MODULES if modules is None else modules
    config = CONFIG if config is None else config
    (root / "boot").mkdir(parents=True, exist_ok=True)
    (root / "boot" / f"vmlinuz-{version}").write_bytes(
        kernel_image(arch, efi_stub=efi_stub, pe_machine=pe_machine))
    (root / "boot" / f"config-{version}").write_text(
        "#\n# Linux/arm64 test kernel configuration\n#\n# CONFIG_XEN is not set\n"
        + "".join(f"{k}={v}\n" for k, v in config.items()))
    (root / "boot" / f"System.map-{version}").write_text("")
    mdir = root / ("usr/lib/modules" if layout == "trixie" else "lib/modules") / version
    mdir.mkdir(parents=True, exist_ok=True)
    for rel, fields in modules.items():
        make_ko(mdir / rel, fields, arch=arch, compress=compress)
    (mdir / "modules.order").write_text("".join(f"{rel}.ko\n" for rel in sorted(modules)))
    (mdir / "modules.builtin").write_text("".join(b + "\n" for b in BUILTIN))
    (mdir / "modules.builtin.modinfo").write_bytes(
        b"virtio_pci.file=drivers/virtio/virtio_pci\0virtio_pci.license=GPL\0"
        b"printk.parm=x:y\0crc32c_generic.file=crypto/crc32c_generic\0"
        b"crc32c_generic.alias=crc32c\0")
    return root


def fake_busybox(path: Path, *, arch: str = "aarch64", dynamic: bool = False) -> Path:
    """An ELF64 executable header (no code): static unless ``dynamic`` (a PT_INTERP)."""
    ehdr_size, phdr_size = 64, 56
    phnum = 1
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr = ident + struct.pack("<HHIQQQIHHHHHH", 2, EM[arch], 1, 0x400000, ehdr_size, 0, 0,
                               ehdr_size, phdr_size, phnum, 64, 0, 0)
    p_type = 3 if dynamic else 1          # PT_INTERP or PT_LOAD
    phdr = struct.pack("<IIQQQQQQ", p_type, 5, 0, 0x400000, 0x400000, 4096, 4096, 4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((ehdr + phdr).ljust(4096, b"\0") + b"busybox fake payload\n")
    return path
