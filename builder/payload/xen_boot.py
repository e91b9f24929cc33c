"""What `boot --xen` boots from: the Dom0 kit (builder.payload.xen_dom0) and a helper disk, a
GPT disk with one FAT32 ESP holding Debian's xen.efi as \\EFI\\BOOT\\BOOTAA64.EFI, its
BOOTAA64.cfg, the Dom0 kernel and the Dom0 initramfs with a per-boot cpio appended (the
DomU's kernel, initramfs, xl config and the Dom0 /init's settings).

These are writers; builder.run.xen, which runs QEMU, gets this module passed in by the CLI
(`stager=`) and imports no writer itself.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from builder import spec

HELPER_BYTES = 128 * 1024 * 1024
TIMESTAMP = 1700000000          # the kit's file times (a boot helper, not a published output)


def kit(*, suite: str, archive=None, cache=None, say=None):
    """The cached Dom0 kit for `suite` (built once from the host's Debian mirror)."""
    from builder.payload.xen_dom0 import dom0_kit
    if archive is None:
        from builder.inputs.cache import Cache, default_cache_root
        from builder.inputs.debian.archive import DebianArchive
        from builder.inputs.sources import Fetcher
        cache = cache or Cache(default_cache_root())
        archive = DebianArchive(Fetcher(cache=cache, progress=False), mirror=None, suite=suite,
                                components=["main"], arch="arm64")
    return dom0_kit(archive, cache or archive.cache, timestamp=TIMESTAMP, say=say)


def boot_disk(tmp: Path, kit, files, cfg: str, settings: str) -> Path:
    """Write tmp/xenboot.raw for one boot; the DomU's files in `tmp` are removed once copied."""
    from builder.payload.xen_dom0 import xen_cfg
    boot_cpio(tmp / "boot.cpio", files, cfg, settings)
    dom0_cpio = tmp / "dom0.cpio"
    with open(dom0_cpio, "wb") as w:
        for part in (kit.initramfs, tmp / "boot.cpio"):
            with open(part, "rb") as r:
                shutil.copyfileobj(r, w, 1 << 20)
    for p in (files.kernel, files.initrd, tmp / "boot.cpio"):
        if p is not None and tmp in p.parents:
            p.unlink()
    (tmp / "BOOTAA64.cfg").write_text(xen_cfg())
    helper_disk(tmp / "xenboot.raw", {"EFI/BOOT/BOOTAA64.EFI": kit.xen_efi,
                                      "EFI/BOOT/BOOTAA64.cfg": tmp / "BOOTAA64.cfg",
                                      "EFI/BOOT/vmlinuz": kit.kernel,
                                      "EFI/BOOT/dom0.cpio": dom0_cpio})
    dom0_cpio.unlink()
    return tmp / "xenboot.raw"


def boot_cpio(path: Path, files, cfg: str, settings: str) -> None:
    """The per-boot cpio appended to the cached Dom0 initramfs: /xen/{vmlinuz,initrd,
    domu.cfg,settings}."""
    from builder.payload.cpio import NewcArchive
    c = NewcArchive(TIMESTAMP)
    if files.kind == "firmware":
        c.add_file("xen/XEN_EFI.fd", files.kernel)
    else:
        c.add_file("xen/vmlinuz", files.kernel)
    if files.initrd is not None:
        c.add_file("xen/initrd", files.initrd)
    c.add_file("xen/domu.cfg", cfg.encode())
    c.add_file("xen/settings", settings.encode())
    with open(path, "wb") as f:
        c.write(f)


def helper_disk(path: Path, files: dict) -> None:
    """A GPT disk with one FAT32 ESP holding `files` ({ESP path: host file})."""
    import uuid
    from builder.disk.fat32 import FatFile, write_fat32
    from builder.disk.gpt import GptPartition, write_gpt
    ss = 512
    need = sum(Path(p).stat().st_size for p in files.values())
    size = max(HELPER_BYTES, (need * 5 // 4 + (64 << 20)) // (1 << 20) * (1 << 20))
    first, sectors = 2048, size // ss
    vol_sectors = sectors - first - 2048
    with open(path, "w+b") as f:
        f.truncate(size)
        write_gpt(f, sector_size=ss, disk_sectors=sectors,
                  disk_guid=uuid.UUID("a5a5a5a5-0000-4000-8000-00000000a5a5"),
                  partitions=[GptPartition(spec.ESP_TYPE_GUID,
                                           uuid.UUID("a5a5a5a5-0000-4000-8000-0000000000e5"),
                                           first, first + vol_sectors - 1, "XENBOOT")])
        write_fat32(f, offset=first * ss, volume_bytes=vol_sectors * ss, sector_size=ss,
                    files=[FatFile(dest, Path(src), Path(src).stat().st_size)
                           for dest, src in sorted(files.items())],
                    label="XENBOOT", serial=0xA5A5E5E5, timestamp=TIMESTAMP)
