"""Test fixtures for verify: disk images made with EXTERNAL tools, never with builder/.

GPT: sfdisk; ESP: mkfs.fat on a separate partition file, mtools (mmd/mcopy) for files,
dd to place it; a root partition: mke2fs -d from a generated tree. The payloads are
generated here: minimal PE/COFF EFI applications, fake kernels (AArch64 Image / AArch32
zImage headers that are also PE images), minimal ELF64 kernel modules with a .modinfo
section, and newc cpio archives.
"""
from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_ARM64_GUID = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
LINUX_DATA_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ROOT_FS_UUID = "5ee1d0c5-0a0b-4c0d-8e0f-123456789abc"
ROOT_PARTUUID = "6a6b6c6d-1111-4222-8333-444455556666"
MIB = 1 << 20
KVER = "6.1.0-99-test"
MACHINE = {"aarch64": 0xAA64, "armv7": 0x01C2}
MAGIC = {"aarch64": 0x20B, "armv7": 0x10B}
REMOVABLE = {"aarch64": "BOOTAA64.EFI", "armv7": "BOOTARM.EFI"}
GOOD_CONFIG = """# test kernel config
CONFIG_SERIAL_AMBA_PL011=y
CONFIG_SERIAL_AMBA_PL011_CONSOLE=y
CONFIG_ARM_GIC=y
CONFIG_ARM_GIC_V3=y
CONFIG_RTC_DRV_EFI=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_MMIO=m
CONFIG_VIRTIO_BLK=m
CONFIG_VIRTIO_NET=m
CONFIG_VIRTIO_CONSOLE=y
CONFIG_VIRTIO_BALLOON=m
CONFIG_HVC_XEN=y
CONFIG_HVC_XEN_FRONTEND=y
CONFIG_XEN_BLKDEV_FRONTEND=m
CONFIG_XEN_NETDEV_FRONTEND=m
CONFIG_XEN_BALLOON=y
CONFIG_ARM_PSCI_FW=y
CONFIG_ACPI=y
CONFIG_EXT4_FS=y
# CONFIG_DEBUG_INFO is not set
"""
# module name -> depends (file names use '-' where the kernel's do)
GOOD_MODULES = {
    "virtio_mmio": [], "virtio_blk": [], "failover": [], "net_failover": ["failover"],
    "virtio_net": ["net_failover"], "virtio_balloon": [], "xen-blkfront": [],
    "xen-netfront": [],
}
GOOD_LOAD = ["virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net",
             "virtio_balloon", "xen_blkfront", "xen_netfront"]


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, **kw)


# --- PE/COFF ---------------------------------------------------------------------------
def make_pe(machine: int, magic: int, subsystem: int = 10, sections=(), *,
            patch=None, text: bytes = b"\xc0\x03\x5f\xd6" * 64) -> bytes:
    """A minimal but well-formed PE image; ``sections`` = [(name, data)] after .text."""
    secs = [(".text", text)] + list(sections)
    opt_size = 240 if magic == 0x20B else 224
    lfanew = 0x40
    hdr_end = lfanew + 24 + opt_size + 40 * len(secs)
    falign, salign = 0x200, 0x1000
    raw_ptr = -(-hdr_end // falign) * falign
    table, body, rva = b"", b"", salign
    for name, data in secs:
        raw_size = -(-len(data) // falign) * falign
        table += struct.pack("<8sIIIIIIHHI", name.encode(), len(data), rva, raw_size,
                             raw_ptr + len(body), 0, 0, 0, 0, 0x40000040)
        body += data + b"\0" * (raw_size - len(data))
        rva += -(-max(len(data), 1) // salign) * salign
    dos = bytearray(64)
    dos[:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, lfanew)
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", machine, len(secs), 0, 0, 0, opt_size,
                       0x0206 if magic == 0x20B else 0x0102)
    opt = bytearray(opt_size)
    struct.pack_into("<HBB", opt, 0, magic, 2, 30)
    struct.pack_into("<I", opt, 16, salign)             # AddressOfEntryPoint
    if magic == 0x20B:
        struct.pack_into("<Q", opt, 24, 0)              # ImageBase
    else:
        struct.pack_into("<II", opt, 24, 0, 0)          # BaseOfData, ImageBase
    struct.pack_into("<II", opt, 32, salign, falign)
    struct.pack_into("<I", opt, 56, rva)                # SizeOfImage
    struct.pack_into("<I", opt, 60, raw_ptr)            # SizeOfHeaders
    struct.pack_into("<H", opt, 68, subsystem)
    struct.pack_into("<I", opt, 108 if magic == 0x20B else 92, 16)   # NumberOfRvaAndSizes
    head = bytes(dos) + coff + bytes(opt) + table
    img = bytearray(head + b"\0" * (raw_ptr - len(head)) + body)
    if patch:
        patch(img)
    return bytes(img)


def make_kernel(arch: str) -> bytes:
    """A fake EFI-stub kernel: PE image with the Image / zImage magic in its DOS header."""
    def put(img):
        if arch == "aarch64":
            img[0x38:0x3C] = b"ARM\x64"
        else:
            struct.pack_into("<I", img, 0x24, 0x016F2818)
    filler = bytes(range(256)) * 256          # 64 KiB: a multi-cluster chain on the ESP
    return make_pe(MACHINE[arch], MAGIC[arch], 10, [(".data", filler)], patch=put)


def grub_mods(prefix: Optional[str] = "/EFI/BOOT", config: Optional[str] = None) -> bytes:
    """A GRUB ``mods`` section as grub-mkimage lays it out (grub_module_info64, then
    grub_module_header objects: 3 = prefix, 2 = config), written from GRUB's kernel.h."""
    objs = b""
    for otype, text in ((3, prefix), (2, config)):
        if text is not None:
            data = text.encode() + b"\0"
            data += b"\0" * (-len(data) % 8)
            objs += struct.pack("<II", otype, 8 + len(data)) + data
    return struct.pack("<IIQQ", 0x676D696D, 0, 24, 24 + len(objs)) + objs


def make_loader(arch: str, machine: Optional[int] = None, subsystem: int = 10,
                sections=(), prefix: Optional[str] = "/EFI/BOOT",
                config: Optional[str] = None, mods: bool = True) -> bytes:
    """A GRUB-like loader: a PE image with a ``mods`` section carrying the prefix
    (``mods=False``: an unknown loader without one)."""
    secs = list(sections) + ([("mods", grub_mods(prefix, config))] if mods else [])
    return make_pe(MACHINE[arch] if machine is None else machine, MAGIC[arch], subsystem,
                   secs, text=b"GRUB test loader\0" * 16)


def make_uki(arch: str, initrd: bytes, *, drop=(), cmdline: str = "console=ttyAMA0 quiet"
             ) -> bytes:
    secs = [(".osrel", b"ID=test\n"), (".cmdline", cmdline.encode() + b"\0"),
            (".uname", KVER.encode()), (".initrd", initrd), (".linux", make_kernel(arch))]
    return make_pe(MACHINE[arch], MAGIC[arch], 10, [s for s in secs if s[0] not in drop],
                   text=b"systemd-stub test\0" * 16)


# --- ELF modules and cpio ----------------------------------------------------------------
def make_module(name: str, depends: list, vermagic: str = KVER) -> bytes:
    """A minimal ELF64 relocatable object with .modinfo (what the kernel's modpost emits)."""
    modinfo = (f"license=GPL\0depends={','.join(d.replace('-', '_') for d in depends)}\0"
               f"name={name.replace('-', '_')}\0vermagic={vermagic} SMP mod_unload aarch64\0"
               ).encode()
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shstr_off = data_off + len(modinfo)
    sh_off = -(-(shstr_off + len(shstr)) // 8) * 8
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       1, 0xB7, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2)
    sh = bytes(64)
    sh += struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, data_off, len(modinfo), 0, 0, 1, 0)
    sh += struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0)
    body = ehdr + modinfo + shstr
    return body + b"\0" * (sh_off - len(body)) + sh


def newc(files) -> bytes:
    """newc archive of [(path, mode, data)] ending with TRAILER!!!."""
    out = bytearray()
    for ino, (path, mode, data) in enumerate(list(files) + [("TRAILER!!!", 0, b"")], 1):
        name = path.encode() + b"\0"
        fields = [ino if path != "TRAILER!!!" else 0, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0,
                  len(name), 0]
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + name
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs_files(config: Optional[str] = GOOD_CONFIG, modules: Optional[dict] = None,
                    load: Optional[list] = None, builtin: Optional[str] = None,
                    ver: str = KVER, prefix: str = "lib/modules", init: bool = True,
                    vermagic: Optional[dict] = None) -> list:
    """``vermagic``: module name -> vermagic release for modules built for another kernel."""
    modules = GOOD_MODULES if modules is None else modules
    load = GOOD_LOAD if load is None else load
    root = f"{prefix}/{ver}"
    files = [(d, 0o40755, b"") for d in ("dev", "etc", "etc/armvm", "lib", "lib/modules", root,
                                          f"{root}/kernel")]
    if init:
        files.append(("init", 0o100755, b"#!/bin/sh\necho ARMVM-BOOT-COMPLETE\n"))
    if config is not None:
        files.append((f"{root}/config", 0o100644, config.encode()))
    files.append((f"{root}/modules.builtin", 0o100644, (builtin if builtin is not None else
                  "kernel/drivers/tty/serial/amba-pl011.ko\nkernel/drivers/rtc/rtc-efi.ko\n"
                  ).encode()))
    for name, deps in modules.items():
        files.append((f"{root}/kernel/drivers/{name}.ko", 0o100644,
                      make_module(name, deps, (vermagic or {}).get(name, ver))))
    files.append(("etc/armvm/modules.load", 0o100644, ("\n".join(load) + "\n").encode()))
    return files


def make_initramfs(files: Optional[list] = None, compress: str = "gzip") -> bytes:
    data = newc(initramfs_files() if files is None else files)
    if compress == "gzip":
        return gzip.compress(data, 6, mtime=0)
    return data


# --- disk images -------------------------------------------------------------------------
@dataclass
class ImageSpec:
    arch: str = "aarch64"
    esp_files: dict = field(default_factory=dict)   # path -> bytes; None value removes
    fat_bits: int = 32
    esp_mib: int = 36
    disk_mib: int = 48
    esp_type: str = ESP_GUID
    second_partition: bool = True
    sector_size: int = 512          # 4096: GPT written by the test-side writer below
    mkfs_args: tuple = ()           # replaces the -F/-s choice (e.g. a FAT32 BPB, few clusters)
    mkfs_blocks: Optional[int] = None    # mkfs.fat's BLOCK-COUNT (1 KiB): an exact size
    second_files: Optional[dict] = None  # the second partition as FAT (mkfs.fat) with files
    populate: bool = True           # False: an empty file system (mtools cannot write it)
    second_type: str = LINUX_DATA_GUID   # the blank second partition (no file system)
    root: Optional["RootSpec"] = None    # a real root file system as partition 2
    cmdline: str = "console=ttyAMA0"     # the grub.cfg linux line's arguments


@dataclass
class RootSpec:
    """Partition 2 as an ext4 root made by mke2fs -d. ``tree``: path -> bytes (a file,
    mode 0755 when it starts with '#!' or ELF), ('symlink', target), ('dir',) or None
    (removed from the default tree)."""
    tree: dict = field(default_factory=dict)
    type_guid: str = ROOT_ARM64_GUID
    fs_uuid: str = ROOT_FS_UUID
    part_uuid: str = ROOT_PARTUUID
    mkfs_args: tuple = ("-t", "ext4")
    size_mib: int = 8
    patch: object = None            # callable(path of the file system image)


def default_root(ver: str = KVER) -> dict:
    """A merged-/usr root like Debian's: /sbin -> usr/sbin, init -> systemd."""
    return {"bin": ("symlink", "usr/bin"), "sbin": ("symlink", "usr/sbin"),
            "lib": ("symlink", "usr/lib"), "usr/bin/sh": b"#!fake shell\n",
            "usr/sbin/init": ("symlink", "../lib/systemd/systemd"),
            "usr/lib/systemd/systemd": b"\x7fELF fake systemd\n",
            f"usr/lib/modules/{ver}/modules.order": b"", "etc/fstab": b"# empty\n",
            "etc/os-release": b"ID=test\n"}


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Bitwise CRC-32C (Castagnoli), no final inversion: what ext4 stores (test-side)."""
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def ext4_set_super(path: Path, offset: int, fmt: str, value) -> None:
    """Set a superblock field and re-sign the superblock (metadata_csum) -- test-side."""
    sb = bytearray(read_at(path, 1024, 1024))
    struct.pack_into("<" + fmt, sb, offset, value)
    if struct.unpack_from("<I", sb, 0x64)[0] & 0x400:
        struct.pack_into("<I", sb, 0x3FC, crc32c(bytes(sb[:0x3FC])))
    write_at(path, 1024, bytes(sb))


def root_cmdline(s: "RootSpec", extra: str = "") -> str:
    return f"console=ttyAMA0 root=UUID={s.fs_uuid} ro{extra}"


def make_root_fs(path: Path, r: RootSpec) -> Path:
    """``path``: an ext4 image of r.size_mib MiB made by mke2fs -d from the tree."""
    import os
    tree = Path(str(path) + ".tree")
    shutil.rmtree(tree, ignore_errors=True)
    files = default_root()
    files.update(r.tree)
    for rel, v in sorted(files.items()):
        if v is None:
            continue
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(v, tuple) and v[0] == "symlink":
            os.symlink(v[1], p)
        elif isinstance(v, tuple):
            p.mkdir(exist_ok=True)
        else:
            p.write_bytes(v)
            p.chmod(0o755 if v[:2] == b"#!" or v[:4] == b"\x7fELF" else 0o644)
    Path(path).unlink(missing_ok=True)
    run("mke2fs", "-q", "-F", *r.mkfs_args, "-U", r.fs_uuid, "-E", "root_owner=0:0",
        "-d", tree, path, f"{r.size_mib}M")
    shutil.rmtree(tree)
    if r.patch:
        r.patch(Path(path))
    return Path(path)


def default_esp(arch: str, cmdline: str = "console=ttyAMA0") -> dict:
    return {
        f"EFI/BOOT/{REMOVABLE[arch]}": make_loader(arch),
        "EFI/BOOT/grub.cfg": b"set timeout=0\nmenuentry 'test' {\n  linux /vmlinuz "
                             + cmdline.encode() + b"\n  initrd /initrd.img\n}\n",
        "vmlinuz": make_kernel(arch),
        "initrd.img": make_initramfs(),
    }


def build_image(dirpath: Path, s: ImageSpec, name: str = "disk.raw") -> Path:
    dirpath = Path(dirpath)
    disk, part = dirpath / name, dirpath / (name + ".esp")
    for p in (disk, part):
        p.unlink(missing_ok=True)
    run("truncate", "-s", f"{s.disk_mib}M", disk)
    if s.sector_size == 512:
        script = (f"label: gpt\nstart=2048, size={s.esp_mib * 2048}, type={s.esp_type}, "
                  "name=ESP\n")
        if s.root is not None:
            script += (f"size={s.root.size_mib}MiB, type={s.root.type_guid}, "
                       f"uuid={s.root.part_uuid}, name=root\n")
        elif s.second_partition:
            script += f"size=8MiB, type={s.second_type}, name=data\n"
        run("sfdisk", "--no-reread", "--no-tell-kernel", "-q", disk, input=script.encode())
    else:
        parts = [(1, s.esp_mib, s.esp_type)]
        if s.second_partition:
            parts.append((1 + s.esp_mib, 8, s.second_type))
        write_gpt(disk, parts, s.sector_size)
    run("truncate", "-s", f"{s.esp_mib}M", part)
    fat = ["-F", "32", "-s", "1"] if s.fat_bits == 32 else ["-F", "16"]
    fat = list(s.mkfs_args) or fat
    fat += ["-S", str(s.sector_size)]
    run("mkfs.fat", *fat, "-n", "ESP", "-i", "1234ABCD", "--invariant", part,
        *([str(s.mkfs_blocks)] if s.mkfs_blocks else []))
    files = default_esp(s.arch, s.cmdline) if s.populate else {}
    files.update(s.esp_files)
    _fill_fat(dirpath, part, files, name)
    run("dd", f"if={part}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse",
        "status=none")
    part.unlink()
    if s.second_files is not None and s.second_partition and s.root is None:
        run("truncate", "-s", "8M", part)
        run("mkfs.fat", "-n", "XBOOT", "-i", "5678ABCD", "--invariant", part)
        _fill_fat(dirpath, part, s.second_files, name)
        run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={1 + s.esp_mib}",
            "conv=notrunc,sparse", "status=none")
        part.unlink()
    if s.root is not None:
        rootfs = make_root_fs(dirpath / (name + ".root"), s.root)
        run("dd", f"if={rootfs}", f"of={disk}", "bs=1M", f"seek={1 + s.esp_mib}",
            "conv=notrunc,sparse", "status=none")
        rootfs.unlink()
    return disk


def _fill_fat(dirpath: Path, part: Path, files: dict, name: str) -> None:
    dirs = sorted({"/".join(p.split("/")[:i]) for p in files if files[p] is not None
                   for i in range(1, p.count("/") + 1)})
    for d in dirs:
        run("mmd", "-i", part, f"::/{d}")
    src = dirpath / (name + ".payload")
    for path, data in files.items():
        if data is not None:
            src.write_bytes(data)
            run("mcopy", "-i", part, src, f"::/{path}")
    src.unlink(missing_ok=True)


def write_gpt(disk: Path, parts: list, bs: int) -> None:
    """Test-side GPT writer for sector sizes sfdisk cannot do on a file (4096 bytes).
    ``parts`` = [(start MiB, size MiB, type GUID)]; GUIDs are fixed test values."""
    import uuid
    size = disk.stat().st_size
    last = size // bs - 1
    array = bytearray(128 * 128)
    for i, (start, mib, tguid) in enumerate(parts):
        first = start * MIB // bs
        struct.pack_into("<16s16sQQQ72s", array, 128 * i, uuid.UUID(tguid).bytes_le,
                         uuid.UUID(int=0x1000 + i).bytes_le, first, first + mib * MIB // bs - 1,
                         0, f"part{i + 1}".encode("utf-16-le"))
    blocks = len(array) // bs
    pmbr = bytearray(bs)
    struct.pack_into("<B3sB3sII", pmbr, 446, 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1,
                     min(last, 0xFFFFFFFF))
    pmbr[510:512] = b"\x55\xaa"
    write_at(disk, 0, bytes(pmbr))
    for my, alt, entries in ((1, last, 2), (last, 1, last - blocks)):
        hdr = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, my,
                                    alt, 2 + blocks, last - blocks - 1,
                                    uuid.UUID(int=0xD15C).bytes_le, entries, 128, 128,
                                    zlib.crc32(bytes(array)) & 0xFFFFFFFF))
        struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)) & 0xFFFFFFFF)
        write_at(disk, my * bs, bytes(hdr))
        write_at(disk, entries * bs, bytes(array))


# --- byte-level patches (test-side GPT rewriting; CRCs recomputed here) ------------------
def read_at(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def write_at(path: Path, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def gpt_rewrite(path: Path, edit_entries=None, edit_header=None, copies=("primary", "backup"),
                bs: int = 512) -> None:
    """Change GPT entries/header fields and recompute the CRCs of the chosen copies."""
    size = Path(path).stat().st_size
    for copy in copies:
        lba = 1 if copy == "primary" else size // bs - 1
        hdr = bytearray(read_at(path, lba * bs, 92))
        entry_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
        array = bytearray(read_at(path, entry_lba * bs, count * esize))
        if edit_entries:
            edit_entries(array, esize)
            write_at(path, entry_lba * bs, bytes(array))
        struct.pack_into("<I", hdr, 88, zlib.crc32(bytes(array)) & 0xFFFFFFFF)
        if edit_header:
            edit_header(hdr, copy)
        struct.pack_into("<I", hdr, 16, 0)
        struct.pack_into("<I", hdr, 16, zlib.crc32(bytes(hdr)) & 0xFFFFFFFF)
        write_at(path, lba * bs, bytes(hdr))


def copy_image(src: Path, dst: Path) -> Path:
    run("cp", "--sparse=always", src, dst)
    return dst


def have_tools(*names) -> bool:
    return all(shutil.which(n) for n in names)


def genimage_disk(tmp_path: Path, vfat_args: str) -> Path:
    """A GPT disk with a 36 MiB ESP holding default_esp("aarch64"), assembled by genimage
    (another tool's layout: FirstUsableLBA 2048); skips the test without genimage."""
    import pytest
    if not have_tools("genimage"):
        pytest.skip("genimage not installed")
    inp = tmp_path / "in"
    for path, data in default_esp("aarch64").items():
        (inp / path).parent.mkdir(parents=True, exist_ok=True)
        (inp / path).write_bytes(data)
    cfg = tmp_path / "genimage.cfg"
    extra = f'extraargs = "{vfat_args}"' if vfat_args else ""
    cfg.write_text(f"""
image esp.vfat {{
  vfat {{ {extra} }}
  size = 36M
}}
image disk.img {{
  hdimage {{ partition-table-type = "gpt" }}
  partition esp {{
    image = "esp.vfat"
    partition-type-uuid = "U"
    offset = 1M
  }}
}}
""")
    subprocess.run(["genimage", "--config", cfg, "--rootpath", inp, "--tmppath",
                    tmp_path / "tmp", "--inputpath", tmp_path, "--outputpath", tmp_path],
                   check=True, capture_output=True)
    return tmp_path / "disk.img"
