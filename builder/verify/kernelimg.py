"""Linux kernel image headers: AArch64 Image, EFI zboot, AArch32 zImage, EFI stub.

Sources: Documentation/arch/arm64/booting.rst (Image header, magic "ARM\\x64" at 0x38),
Documentation/arch/arm/booting.rst (zImage magic 0x016F2818 at 0x24), the EFI zboot
header (drivers/firmware/efi/libstub/zboot-header.S: "zimg" at offset 4). GRUB >= 2.06 and
systemd-stub start Linux through its EFI stub on both architectures, so the kernel must
also be a PE image ("MZ") for the target's machine.
"""
from __future__ import annotations

import re
import struct
import zlib
from typing import Optional

from builder import spec
from builder.verify.blob import Blob, BytesBlob
from builder.verify.pe import PeError, machine_name, parse_pe

GZIP_HEAD_LIMIT = 1 << 20


def describe(blob: Blob) -> tuple:
    """(description, arch) from the magic numbers; arch is 'aarch64', 'armv7', 'zboot'
    (EFI zboot, arch from its PE header), 'gzip' (compressed Image) or None."""
    head = blob.read_at(0, 0x40)
    if head[:2] == b"MZ" and head[spec.ZBOOT_MAGIC_OFFSET:spec.ZBOOT_MAGIC_OFFSET + 4] \
            == spec.ZBOOT_MAGIC:
        return "EFI zboot image", "zboot"
    off = spec.ARM64_IMAGE_MAGIC_OFFSET
    if head[off:off + 4] == spec.ARM64_IMAGE_MAGIC:
        return "AArch64 Image", "aarch64"
    off = spec.ZIMAGE_MAGIC_OFFSET
    if len(head) >= off + 4 and struct.unpack_from("<I", head, off)[0] == spec.ZIMAGE_MAGIC:
        return "AArch32 zImage", "armv7"
    if head[:2] == b"\x1f\x8b":
        return "gzip data", "gzip"
    return "unknown", None


def judge(blob: Blob, arch: str, via: str) -> tuple:
    """(ok, detail): is ``blob`` a kernel the ``via`` chain ('grub'/'uki'/'loader') can boot?"""
    kind, karch = describe(blob)
    note = ""
    if karch == "gzip":
        if via != "grub" or arch != "aarch64":
            return False, "the kernel is gzip data; only GRUB (with gzio) on AArch64 reads that"
        d = zlib.decompressobj(31)
        try:
            head = d.decompress(blob.read_at(0, GZIP_HEAD_LIMIT), GZIP_HEAD_LIMIT)
        except zlib.error as e:
            return False, f"the kernel is corrupt gzip data ({e})"
        blob, note = BytesBlob(head), " (gzip-compressed; GRUB needs its gzio module)"
        kind, karch = describe(blob)
    if karch == "zboot":
        karch = "aarch64"       # EFI zboot exists for arm64 (and non-ARM targets) only
    if karch is None:
        return False, ("no kernel magic: neither 'ARM\\x64' at 0x38, 'zimg' at 4, nor "
                       "0x016F2818 at 0x24")
    if karch != arch:
        return False, f"{kind}, which is not an {arch} kernel"
    want = spec.ARCHES[arch].pe_machine
    try:
        pe = parse_pe(blob)
    except PeError as e:
        return False, (f"{kind} without a usable EFI stub ({e}); GRUB >= 2.06 and systemd-stub "
                       "need CONFIG_EFI_STUB")
    if pe.machine != want:
        return False, f"{kind} whose EFI stub has machine {machine_name(pe.machine)}, " \
                      f"expected {machine_name(want)}"
    if pe.subsystem != spec.PE_SUBSYSTEM_EFI_APPLICATION:
        return False, f"{kind} whose EFI stub has subsystem {pe.subsystem}, expected 10"
    return True, f"{kind} with EFI stub (machine {machine_name(pe.machine)}){note}"


BANNER_RE = re.compile(rb"Linux version (\d+\.\d+[0-9A-Za-z.+_~-]*) \(")
BANNER_SCAN_LIMIT = 128 << 20
BANNER_CHUNK = 4 << 20
BANNER_PREFIX = b"Linux version "
BANNER_OVERLAP = 256


def banner_version(blob: Blob) -> Optional[str]:
    """The release from the kernel's ``linux_banner`` ("Linux version <release> (..."),
    found in an uncompressed Image; None for compressed kernels (zImage, zboot, gzip)."""
    kind, karch = describe(blob)
    if karch not in ("aarch64", None):
        return None
    # bytes.find (a C string search) finds the fixed prefix; the regex judges only there.
    # Consecutive reads overlap by BANNER_OVERLAP bytes so a banner cut by a chunk
    # boundary is read whole by the next chunk.
    pos, end = 0, min(blob.size, BANNER_SCAN_LIMIT)
    while pos < end:
        data = blob.read_at(pos, min(BANNER_CHUNK, end - pos))
        if not data:
            break
        last = pos + len(data) >= end
        i = data.find(BANNER_PREFIX)
        while i >= 0:
            m = BANNER_RE.match(data, i)
            if m and (last or m.end() < len(data)):
                return m.group(1).decode("ascii")
            if not last and i > len(data) - BANNER_OVERLAP:
                break               # maybe cut: judged again by the next, overlapping read
            i = data.find(BANNER_PREFIX, i + 1)
        if last or len(data) <= BANNER_OVERLAP:
            break
        pos += len(data) - BANNER_OVERLAP
    return None
