"""Disk files that are not raw disks: VM image containers and compressed images.

``identify(blob)`` looks at the magic numbers at the start (and VHD's footer at the end)
and returns (what it is, how to get a raw disk from it), or None for anything else. The
magics are those of each format's specification: qcow2 'QFI\\xfb' (QEMU docs/interop/
qcow2.txt), VMDK sparse extent 'KDMV' and text descriptors '# Disk DescriptorFile'
(VMware Virtual Disk Format 1.1), VHD 'conectix' footer (Microsoft VHD Image Format
Specification), VHDX 'vhdxfile' (MS-VHDX), VDI '<<< ' + 0xBEDA107F at 0x40, and the xz,
zstd, gzip and bzip2 stream headers.
"""
from __future__ import annotations

from typing import Optional

from builder.errors import NotAnImageError
from builder.verify.blob import Blob

QEMU_IMG = "qemu-img convert -O raw {name} {stem}.raw (qemu-img is in Debian's qemu-utils)"
MAGICS = (
    (0, b"QFI\xfb", "a qcow2 image (QEMU copy-on-write)", QEMU_IMG),
    (0, b"KDMV", "a VMDK sparse extent (VMware)", QEMU_IMG),
    (0, b"# Disk DescriptorFile", "a VMDK descriptor (VMware)", QEMU_IMG),
    (0, b"vhdxfile", "a VHDX image (Hyper-V)", QEMU_IMG),
    (0, b"conectix", "a dynamic VHD image (Virtual PC / Azure)", QEMU_IMG),
    (0x40, b"\x7f\x10\xda\xbe", "a VDI image (VirtualBox)", QEMU_IMG),
    (0, b"\xfd7zXZ\x00", "xz-compressed data", "xz -dk {name}"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed data", "zstd -d {name}"),
    (0, b"\x1f\x8b", "gzip-compressed data", "gunzip -k {name}"),
    (0, b"BZh", "bzip2-compressed data", "bunzip2 -k {name}"),
)
VHD_FOOTER = b"conectix"


class NotRawDiskError(NotAnImageError):
    """A container or compressed file where a raw disk was expected (exit 3)."""


def identify(blob: Blob) -> Optional[tuple]:
    """(description, conversion command template) when ``blob`` is not a raw disk."""
    if blob.read_at(0, 8) != VHD_FOOTER and blob.size >= 512 and blob.size % 512 == 0 and \
            blob.read_at(blob.size - 512, 8) == VHD_FOOTER:
        return ("a fixed VHD image (a raw disk followed by a 512-byte VHD footer, so the "
                "backup GPT header is not at the last sector)",
                "qemu-img convert -f vpc -O raw {name} {stem}.raw (qemu-utils)")
    if any(blob.read_at(bs, 8) == b"EFI PART" for bs in (512, 4096)):
        return None                     # a GPT disk, whatever its boot code starts with
    head = blob.read_at(0, 0x48)
    for off, magic, what, how in MAGICS:
        if head[off:off + len(magic)] == magic:
            return what, how
    return None


def check_raw(blob: Blob, name: str) -> None:
    """Raise NotRawDiskError naming the format and the conversion when ``blob`` is a
    container or compressed file."""
    hit = identify(blob)
    if hit is None:
        return
    what, how = hit
    stem = name
    for ext in (".qcow2", ".qcow", ".vmdk", ".vhdx", ".vhd", ".vdi", ".xz", ".zst", ".gz",
                ".bz2"):
        if stem.lower().endswith(ext) and len(stem) > len(ext):
            stem = stem[:-len(ext)]
            break
    raise NotRawDiskError(f"{name}: {what}, not a raw disk image; convert it first: "
                          + how.format(name=name, stem=stem))
