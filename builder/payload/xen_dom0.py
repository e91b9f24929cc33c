"""The Xen Dom0 kit of `armvm-build boot --xen`: Debian's xen.efi, Debian's cloud kernel as
the Dom0 kernel, and a Dom0 initramfs with Xen's tools, built once and cached by content.

The userspace is `mmdebstrap --variant=extract` of xen-utils-<X.Y>, xenstore-utils, bash
(Xen's block hotplug script), busybox-static, util-linux, kmod and the kernel: every .deb
comes from the recipe's archive (verified InRelease), is unpacked, and no foreign binary
runs. From that tree the kit keeps what Dom0 needs (no docs, locales, python, firmware),
the Xen back-end modules decompressed (no modules.dep is needed: /init loads them in
dependency order by path), busybox applet links, and templates/xen-dom0-init.sh as /init.

The cache key is the suite, the architecture, the resolved name=version of every named
package, the timestamp and this module's format: a warm run resolves (or reads from the
lock) and never runs mmdebstrap. The tree holds `packages.json` (every unpacked package
with its version: the kit's own lock) and `kit.json`.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from builder import spec
from builder.errors import ArmvmError

FORMAT = "xen-dom0-11"
DEBIAN_ARCH = "arm64"                   # Debian builds Xen for arm64 and amd64 only
# Named packages; {x} is the Xen ABI version (4.20 in trixie) read from xen-utils-common.
PACKAGES = ("xen-hypervisor-{x}-arm64", "xen-utils-{x}", "xen-utils-common", "xenstore-utils",
            "bash", "busybox-static", "util-linux", "kmod", "linux-image-cloud-arm64")
# Dom0 needs these (and their dependencies) when they are modules; built-ins are skipped.
DOM0_MODULES = ("xen_evtchn", "xen_gntdev", "xen_gntalloc", "xen_privcmd", "xenfs",
                "xen_blkback", "xen_netback", "virtio_blk")
DOM0_MEMORY = "1024M"
# One Dom0 vCPU, pinned to the first physical CPU. QEMU gives Xen two CPUs (two host threads
# under TCG); with two Dom0 vCPUs Dom0 used 142 CPU s during a server DomU's boot and its
# login prompt came 167 s after xl create, with one 56-89 CPU s and 101-147 s (see run/xen.py).
DOM0_VCPUS = 1
# What Dom0 does not need: left out of its initramfs (loaded under TCG, every MiB counts).
DROP = re.compile(r"^(usr/share/(doc|man|info|locale|i18n|lintian|zoneinfo|bash-completion|"
                  r"bug|perl5|python3|menu|pixmaps|gcc|gdb)(/|$)|usr/lib/python3|"
                  r"usr/bin/python3|usr/lib/firmware|usr/lib/linux-image-|usr/lib/modules/|"
                  r"boot/|usr/lib/systemd|usr/lib/udev|usr/lib/klibc|usr/lib/xen-[0-9.]+/"
                  r"(boot|lib/python)|usr/share/qemu|var/cache/|var/lib/apt|var/lib/dpkg/"
                  r"info|var/run|usr/lib/aarch64-linux-gnu/(gconv|perl|perl-base|perl5|systemd|security)/|"
                  r"usr/bin/(perl|systemd|systemctl|journalctl|udevadm|dpkg|busctl|"
                  r"loginctl|networkctl|resolvectl|hostnamectl|timedatectl|localectl)|"
                  r"usr/lib/xen-[0-9.]+/bin/oxenstored)")
# busybox applets Dom0's /init and Xen's hotplug scripts use; linked when the tree lacks them.
APPLETS = ("sh", "ash", "mount", "umount", "mkdir", "ln", "cat", "echo", "sleep", "grep", "sed",
           "tail", "head", "stat", "readlink", "basename", "dirname", "rm", "ls", "ps", "kill",
           "insmod", "poweroff", "awk", "cut", "tr", "id", "expr", "seq", "sort", "wc", "touch",
           "chmod", "mknod", "printf", "test", "[", "[[", "true", "false", "env", "date", "tee",
           "xargs", "find", "dd", "sync", "uname", "mv", "cp", "logger", "hostname", "pidof",
           "realpath", "mktemp")
# mmdebstrap's extract hook (a host shell command; $1 is the tree): list the .debs it unpacked
LIST_DEBS = ('cd "$1/var/cache/apt/archives" && for f in *.deb; do echo "$(sha256sum < "$f" | '
             'cut -d" " -f1) $(stat -c %s "$f") $f"; done >')
INIT_TEMPLATE = Path(__file__).parent / "templates" / "xen-dom0-init.sh"
MAX_TAR_MEMBER = 512 * 1024 * 1024
# Dom0's initramfs: these folders and files whole, plus the libraries they need.
KEEP_TREES = ("etc", "var", "usr/lib/xen-{x}", "usr/lib/xen-common", "usr/share/xen-utils-common")
KEEP_FILES = ("usr/bin/bash", "usr/bin/busybox", "usr/bin/flock", "usr/bin/logger",
              "usr/sbin/blockdev", "usr/sbin/losetup", "usr/sbin/xl", "usr/sbin/xenstored",
              "usr/lib/ld-linux-aarch64.so.1", "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
              # glibc dlopens it for pthread_cancel (xl aborts without it)
              "usr/lib/aarch64-linux-gnu/libgcc_s.so.1")


@dataclass(frozen=True)
class Dom0Kit:
    dir: Path                 # cache tree: xen.efi, vmlinuz, dom0.cpio, packages.json, kit.json
    xen_version: str          # "4.20"
    kernel_version: str
    packages: tuple           # (name, version) of the named packages
    key: str

    @property
    def xen_efi(self) -> Path:
        return self.dir / "xen.efi"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initramfs(self) -> Path:
        return self.dir / "dom0.cpio"


def xen_cfg(*, kernel: str = "vmlinuz", ramdisk: str = "dom0.cpio",
            dom0_memory: str = DOM0_MEMORY, dom0_vcpus: int = DOM0_VCPUS,
            xen_options: str = "", dom0_cmdline: str = "") -> str:
    """BOOTAA64.cfg, read by xen.efi from the folder it was started from (\\EFI\\BOOT)."""
    for what, value in (("kernel", kernel), ("ramdisk", ramdisk)):
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
            raise ArmvmError(f"Xen configuration: {what} file name {value!r} is not allowed "
                             "(letters, digits, '.', '_', '-')")
    if not re.fullmatch(r"[0-9]{2,6}M", dom0_memory):
        raise ArmvmError(f"Xen configuration: Dom0 memory {dom0_memory!r} is not allowed "
                         "(e.g. 1024M)")
    for what, value in (("options", xen_options), ("Dom0 command line", dom0_cmdline)):
        if "\n" in value or "\r" in value:
            raise ArmvmError(f"Xen configuration: the {what} must be one line")
    if not 1 <= int(dom0_vcpus) <= 8:
        raise ArmvmError(f"Xen configuration: {dom0_vcpus} Dom0 vCPUs (allowed: 1..8)")
    opts = (f"console=dtuart dom0_mem={dom0_memory},max:{dom0_memory} "
            f"dom0_max_vcpus={int(dom0_vcpus)} dom0_vcpus_pin {xen_options}").strip()
    args = f"console=hvc0 rdinit=/init {dom0_cmdline}".strip()
    return ("[global]\ndefault=xen\n\n[xen]\n"
            f"options={opts}\nkernel={kernel} {args}\nramdisk={ramdisk}\n")


def _resolve(archive, name: str):
    try:
        return archive.resolve(name, pin=False)
    except ArmvmError as exc:
        raise ArmvmError(f"--xen needs Debian's Xen for arm64, but {exc} (the Dom0 kit is "
                         f"{', '.join(p.format(x='X.Y') for p in PACKAGES)}; Debian ships Xen "
                         "from bookworm on)") from None


def resolve_packages(archive) -> tuple[str, list]:
    """(Xen ABI version, [(name, version)]) of the kit's named packages, from the archive."""
    common = _resolve(archive, "xen-utils-common")
    m = re.match(r"^(?:[0-9]+:)?([0-9]+\.[0-9]+)\.", common.version)
    if not m:
        raise ArmvmError(f"xen-utils-common {common.version}: cannot tell the Xen version "
                         "(want X.Y.Z...)")
    x = m.group(1)
    named = []
    for pattern in PACKAGES:
        pkg = common if pattern == "xen-utils-common" else _resolve(archive, pattern.format(x=x))
        named.append((pkg.name, pkg.version))
    return x, named


def kit_key(*, suite: str, components, named, timestamp: int) -> str:
    init = INIT_TEMPLATE.read_bytes()
    data = {"suite": suite, "components": list(components), "arch": DEBIAN_ARCH,
            "packages": sorted([list(p) for p in named]), "timestamp": int(timestamp),
            "init": hashlib.sha256(init).hexdigest(), "format": FORMAT}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def dom0_kit(archive, cache, *, timestamp: int, say: Optional[Callable[[str], None]] = None) -> Dom0Kit:
    """The Dom0 kit for `archive` (a DebianArchive for arm64), built on a cache miss only."""
    if archive.arch != DEBIAN_ARCH:
        raise ArmvmError(f"the Xen Dom0 kit is built for {DEBIAN_ARCH}, not {archive.arch}")
    x, named = resolve_packages(archive)
    key = kit_key(suite=archive.suite, components=archive.components, named=named,
                  timestamp=timestamp)

    def build(dest: Path) -> None:
        from builder.payload.rootfs import mmdebstrap as mm
        if archive.offline:
            raise ArmvmError("the Xen Dom0 kit is not in the cache and --offline forbids "
                             "running mmdebstrap; run `boot --xen` once online")
        mm.check_tools(DEBIAN_ARCH, "extract")
        work = Path(tempfile.mkdtemp(prefix="armvm-xen-dom0-"))
        try:
            if say:
                say(f"mmdebstrap extract {archive.suite} {DEBIAN_ARCH}: Xen {x} Dom0 "
                    f"({len(named)} packages and their dependencies)")
            mm.run_mmdebstrap(out=work / "dom0.tar", mirror=archive.mirror, suite=archive.suite,
                              components=archive.components, arch=DEBIAN_ARCH,
                              variant="extract", packages=[n for n, _ in named],
                              timestamp=timestamp,
                              keyring=archive.keyring if archive.keyring.is_file() else None,
                              progress=say, log=dest / "mmdebstrap.log",
                              extra=[f"--extract-hook={LIST_DEBS} {work / 'debs.txt'}"])
            debs = read_debs(work / "debs.txt")
            if not debs:
                raise ArmvmError("mmdebstrap left no .deb in the Dom0 tree's apt cache")
            (dest / "packages.json").write_text(json.dumps(debs))
            tree = work / "root"
            _unpack(work / "dom0.tar", tree)
            make_kit(tree, dest, xen_version=x, timestamp=timestamp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        (dest / "kit.json").write_text(json.dumps({"xen": x, "packages": named,
                                                   "suite": archive.suite, "key": key}))

    tree = cache.put_tree(f"xen-dom0-{key}", build)
    info = json.loads((tree / "kit.json").read_text())
    return Dom0Kit(tree, info["xen"], (tree / "kernel.version").read_text().strip(),
                   tuple(tuple(p) for p in info["packages"]), key)


def read_debs(listing: Path) -> list:
    """[name, version, arch, size, sha256] of every .deb mmdebstrap unpacked (listed by its
    extract hook, after apt checked each against the signed archive): the kit's own lock."""
    from urllib.parse import unquote
    out = []
    if listing.is_file():
        for ln in listing.read_text().splitlines():
            f = ln.split(" ")
            if len(f) != 3 or not re.fullmatch(r"[0-9a-f]{64}", f[0]) or not f[1].isdigit() \
                    or not f[2].endswith(".deb"):
                continue
            parts = unquote(f[2][:-4]).split("_")
            if len(parts) == 3:
                out.append([parts[0], parts[1], parts[2], int(f[1]), f[0]])
    return sorted(out)


def _unpack(tar: Path, dest: Path) -> None:
    """Unpack mmdebstrap's tarball (regular files, directories, symlinks, hard links only;
    nothing outside `dest`)."""
    dest.mkdir()
    with tarfile.open(tar) as tf:
        for m in tf:
            name = m.name.lstrip("./")
            if not name or name.startswith("/") or ".." in name.split("/"):
                continue
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk()) or m.size > MAX_TAR_MEMBER:
                continue
            m.name = name
            if m.islnk():
                m.linkname = m.linkname.lstrip("./")
            tf.extract(m, dest, set_attrs=False, **({"filter": "tar"} if hasattr(tarfile, "data_filter") else {}))
            if m.isreg():
                os.chmod(dest / name, m.mode & 0o755 | 0o600)


def needed(data: bytes, where: str) -> list:
    """DT_NEEDED names of a 64-bit little-endian ELF executable or library, read through
    its program headers (PT_DYNAMIC, and PT_LOAD to map DT_STRTAB to a file offset)."""
    import struct
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return []                                  # scripts, or not ELF64 LE
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    if phentsize < 56 or phoff + phnum * phentsize > len(data):
        raise ArmvmError(f"{where}: ELF program headers out of range")
    loads, dyn = [], None
    for k in range(phnum):
        p_type, _fl, off, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", data,
                                                                   phoff + k * phentsize)
        if p_type == 1:
            loads.append((vaddr, off, filesz))
        elif p_type == 2:
            dyn = (off, filesz)
    if dyn is None:
        return []                                  # static
    names, strtab = [], None
    end = min(dyn[0] + dyn[1], len(data))
    for off in range(dyn[0], end - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:
            names.append(val)
        elif tag == 5:                             # DT_STRTAB (a virtual address)
            strtab = next((val - va + fo for va, fo, sz in loads if va <= val < va + sz), None)
    if strtab is None:
        raise ArmvmError(f"{where}: ELF DT_STRTAB not in a loaded segment")
    out = []
    for n in names:
        at = strtab + n
        stop = data.find(b"\0", at, at + 256)
        if at >= len(data) or stop < 0:
            raise ArmvmError(f"{where}: ELF DT_NEEDED name out of range")
        out.append(data[at:stop].decode("ascii", "replace"))
    return out


def dom0_files(tree: Path, xen_version: str) -> list:
    """What Dom0 runs (KEEP_*), and the shared libraries they need (DT_NEEDED closure,
    looked up in usr/lib/aarch64-linux-gnu, with the symlinks that name them)."""
    rels: set = set()

    def add(rel: str) -> None:
        while rel and rel not in rels:
            rels.add(rel)
            rel = posixpath.dirname(rel)
    for top in KEEP_TREES:
        top = top.format(x=xen_version)
        for root, dirs, files in os.walk(tree / top):
            for name in dirs + files:
                rel = (Path(root) / name).relative_to(tree).as_posix()
                if not DROP.match(rel + "/" if (Path(root) / name).is_dir() else rel):
                    add(rel)
    for rel in KEEP_FILES:
        if (tree / rel).exists() or (tree / rel).is_symlink():
            add(rel)
    for p in sorted((tree / "usr/bin").glob("xenstore*")):
        add(p.relative_to(tree).as_posix())
    libdir = "usr/lib/aarch64-linux-gnu"
    todo = [r for r in sorted(rels) if (tree / r).is_file() and not (tree / r).is_symlink()]
    seen: set = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for lib in needed((tree / rel).read_bytes(), rel):
            cand = f"{libdir}/{lib}"
            if not (tree / cand).exists():
                continue                               # e.g. ld-linux (kept as a file)
            add(cand)
            real = (tree / cand).resolve().relative_to(tree.resolve()).as_posix()
            add(real)
            todo.append(real)
    return sorted(rels, key=lambda r: r.encode())


def make_kit(tree: Path, dest: Path, *, xen_version: str, timestamp: int) -> None:
    """xen.efi, vmlinuz, dom0.cpio and kernel.version into `dest` from an unpacked tree."""
    from builder.payload.cpio import NewcArchive
    from builder.payload.kernel import decompress_module, inspect_kernel
    efi = tree / "boot" / f"xen-{xen_version}-arm64.efi"
    if not efi.is_file():
        raise ArmvmError(f"xen-hypervisor-{xen_version}-arm64 has no /boot/{efi.name}")
    shutil.copyfile(efi, dest / "xen.efi")
    kinfo = inspect_kernel(tree, spec.ARCHES["aarch64"])
    shutil.copyfile(kinfo.image, dest / "vmlinuz")
    (dest / "kernel.version").write_text(kinfo.version + "\n")

    cpio = NewcArchive(timestamp)
    for rel in dom0_files(tree, xen_version):
        p = tree / rel
        if p.is_symlink():
            cpio.add_symlink(rel, os.readlink(p))
        elif p.is_dir():
            cpio.add_dir(rel)
        else:
            cpio.add_file(rel, p, 0o755 if p.stat().st_mode & 0o111 else 0o644)
    # merged /usr, as base-files would make it; /var/run is /run
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        cpio.add_symlink(link, target)
    cpio.add_symlink("var/run", "/run")
    for d in ("proc", "sys", "dev", "run", "tmp", "var/lib/xen", "var/lib/xenstored",
              "var/log/xen/console", "var/lock"):
        cpio.add_dir(d)
    cpio.add_char_device("dev/console", 5, 1)
    busybox = "usr/bin/busybox"
    if busybox not in cpio:
        raise ArmvmError("busybox-static has no /usr/bin/busybox")
    for applet in APPLETS:
        if not any(f"{d}/{applet}" in cpio for d in ("usr/bin", "usr/sbin")):
            cpio.add_symlink(f"usr/bin/{applet}", "busybox")
    # the back-end modules, decompressed, in load order
    order: list = []

    def need(name: str) -> None:
        if name in order or name in kinfo.builtin:
            return
        mod = kinfo.modules.get(name)
        if mod is None:
            raise ArmvmError(f"the Dom0 kernel {kinfo.version} has no module {name}")
        for d in mod.depends:
            need(d)
        order.append(name)
    for name in DOM0_MODULES:
        need(name)
    paths = []
    for name in order:
        mod = kinfo.modules[name]
        data = decompress_module((kinfo.modules_dir / mod.path).read_bytes(), mod.path)
        path = f"usr/lib/modules/{kinfo.version}/{name}.ko"
        cpio.add_file(path, data)
        paths.append("/" + path)
    cpio.add_file("init", INIT_TEMPLATE.read_bytes(), 0o755)
    cpio.add_file("etc/armvm-xen-dom0", (f"XEN_VERSION={xen_version}\n"
                                         f"MODULES='{' '.join(paths)}'\n").encode())
    with open(dest / "dom0.cpio", "wb") as f:
        cpio.write(f)
