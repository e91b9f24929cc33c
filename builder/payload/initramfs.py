"""Build the deterministic initramfs: busybox, the selected modules, the kernel's config and
built-in lists, and an /init (Jinja2 template) that prints the runtime report.

Layout (the project's published contract, see builder.spec):
  /init, /bin/busybox + applet symlinks, /dev/console (char 5:1), /dev /proc /sys /tmp /run,
  lib/modules/<version>/{<module paths as in the package>, modules.dep, modules.order,
  modules.builtin, modules.builtin.modinfo, config}, etc/armvm/modules.load,
  etc/armvm/payload (when given), extra files.
"""
from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shlex
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from builder import spec
from builder.payload.cpio import NewcArchive, clean_path, file_mode
from builder.errors import ArmvmError
from builder.payload.kernel import (ARCH_ELF_MACHINE, ELFMAG, KernelInfo, Module, decompress_module,
                            module_name_of)

COMPRESSIONS = ("gzip", "zstd", "xz", "none")
CONFIG_FOR_COMPRESSION = {"gzip": "CONFIG_RD_GZIP", "zstd": "CONFIG_RD_ZSTD", "xz": "CONFIG_RD_XZ"}
GZIP_LEVEL, ZSTD_LEVEL, XZ_PRESET = 9, 19, 6
BUSYBOX_PATHS = ("usr/bin/busybox", "bin/busybox")     # trixie (merged /usr), bookworm
# Applets /init uses, plus a few that payload scripts commonly need.
APPLETS = ("sh", "ash", "mount", "umount", "mkdir", "insmod", "rmmod", "lsmod", "modprobe",
           "cat", "echo", "printf", "ls", "readlink", "basename", "dirname", "grep", "sed",
           "tr", "head", "tail", "wc", "uname", "poweroff", "reboot", "halt", "sleep", "test",
           "[", "true", "false", "sync", "dmesg", "mknod", "ln", "rm", "cp", "mv", "chmod",
           "find", "xargs", "ps", "kill", "env", "date", "hostname", "switch_root", "findfs")
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "init.j2"
PAYLOAD_PATH = "etc/armvm/payload"
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1
MAX_INIT_BYTES = 1024 * 1024
MAX_EXTRA_FILES = 100_000
PT_INTERP = 3
ROOT_WAIT_SECONDS = 30     # /init waits this long for root=UUID= (rootdelay= overrides)


@dataclass(frozen=True)
class InitramfsInfo:
    path: Path
    size: int
    sha256: str
    entries: int
    compression: str
    uncompressed_size: int
    module_load_order: tuple[str, ...]


# --- busybox -----------------------------------------------------------------------------

def find_busybox(tree: Path, arch: spec.Arch | None = None) -> Path:
    """The static busybox binary in an extracted busybox-static package tree."""
    tree = Path(tree)
    for rel in BUSYBOX_PATHS:
        p = tree / rel
        if p.is_file():
            check_busybox(p, arch)
            return p
    raise ArmvmError(f"no busybox in {tree} (looked for {', '.join(BUSYBOX_PATHS)}); "
                     f"use the extracted 'busybox-static' package")


def check_busybox(path: Path, arch: spec.Arch | None = None) -> None:
    """Reject a busybox that cannot run as the initramfs's only program."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    if head[:4] != ELFMAG or head[4] not in (1, 2) or head[5] not in (1, 2):
        raise ArmvmError(f"busybox {path}: not an ELF executable")
    is64, e = head[4] == 2, "<" if head[5] == 1 else ">"
    e_machine = struct.unpack_from(e + "H", head, 0x12)[0]
    if arch is not None and e_machine != ARCH_ELF_MACHINE[arch.pe_machine]:
        raise ArmvmError(f"busybox {path}: ELF machine {e_machine} is not {arch.name} "
                         f"(busybox of another architecture)")
    if is64:
        e_phoff, = struct.unpack_from(e + "Q", head, 0x20)
        e_phentsize, e_phnum = struct.unpack_from(e + "HH", head, 0x36)
    else:
        e_phoff, = struct.unpack_from(e + "I", head, 0x1C)
        e_phentsize, e_phnum = struct.unpack_from(e + "HH", head, 0x2A)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + 4 > len(head):
            break
        if struct.unpack_from(e + "I", head, off)[0] == PT_INTERP:
            raise ArmvmError(f"busybox {path}: dynamically linked (has an ELF interpreter); "
                             f"use the 'busybox-static' package")


# --- /init ---------------------------------------------------------------------------------

# Variables an /init template sees (README "Template variables" is generated from this).
INIT_TEMPLATE_VARS = {
    "modules": "Paths of the modules in the initramfs, in load order (dependencies first).",
    "module_names": "Their names, in the same order.",
    "module_deps": "For each module, the positions (in `modules`) of the modules it depends on.",
    "module_aliases": "For each module, its device aliases (modalias patterns such as "
                      "`virtio:d00000002v*`); /init loads it when a device's modalias matches.",
    "module_boot": "Positions of the modules /init loads whatever the devices: those with no "
                   "device alias that no other module depends on (file systems, crypto).",
    "payload": "The recipe's initramfs.payload text, or none.",
    "payload_path": "Where the payload is stored in the initramfs (/etc/armvm/payload).",
    "kernel_version": "The kernel's version (uname -r).",
    "report_prefix": "Prefix of the runtime report lines (ARMVM-REPORT).",
    "boot_marker": "The line `armvm-build boot` waits for (ARMVM-BOOT-COMPLETE).",
    "load_list": "Path of the module load list in the initramfs (/etc/armvm/modules.load).",
    "root_fstype": "The root file system's type (ext4) when the image has a rootfs, else none: "
                   "/init then finds root= and hands over with switch_root.",
    "root_timeout": "Seconds /init waits for the root device to appear.",
}
INIT_TEMPLATE_FILTERS = {"shquote": "Quote a value for the POSIX shell.",
                         "alias_regex": "A modalias pattern (`virtio:d00000002v*`) as a POSIX "
                                        "extended regular expression for `grep -x -E`."}


def render_init(template: str, variables: dict, *, template_file=None) -> str:
    """Render /init in the bounded sandbox (builder.recipe.templating): trim_blocks and
    lstrip_blocks on; errors name `template_file` and the line."""
    from builder.recipe import templating
    tspec = templating.TemplateSpec(
        what="init template", max_bytes=MAX_INIT_BYTES,
        env_options=dict(trim_blocks=True, lstrip_blocks=True),
        filters={"shquote": lambda v: shlex.quote(str(v)), "alias_regex": alias_regex},
        allowed_names=sorted(INIT_TEMPLATE_VARS), field="initramfs.init" if template_file else None)
    text = templating.render(template, variables, tspec, file=template_file or "(init template)").text
    if not text.startswith("#!"):
        raise ArmvmError(f"{template_file or 'init template'}: the init template must render to a "
                         "script starting with '#!' (for example '#!/bin/sh')")
    return text


# --- modules -----------------------------------------------------------------------------

# Aliases that name no device on a bus (module auto-loading by device node or symbol).
_NOT_DEVICE_ALIAS = ("devname:", "symbol:")


def device_aliases(module: Module) -> list[str]:
    """The module's modalias patterns: ``bus:...`` aliases such as ``pci:v00001AF4d*``,
    ``virtio:d00000002v*``, ``of:N*T*Cvirtio,mmio``, ``xen:vbd``. Aliases without a colon
    (``fs-ext4``, ``crypto-crc32c``, ``char-major-10-62``) name no device."""
    return [a for a in module.aliases
            if ":" in a and not a.startswith(_NOT_DEVICE_ALIAS) and "\n" not in a]


_GLOB_CLASS = re.compile(r"\[!?[A-Za-z0-9_.,:-]+\]")


def alias_regex(pattern) -> str:
    """A modalias pattern (fnmatch rules, as modprobe matches them) as a POSIX extended
    regular expression for ``grep -x -E``: ``*`` -> ``.*``, ``?`` -> ``.``, simple ``[...]``
    classes kept (``[!x]`` -> ``[^x]``), every other character literal."""
    text, out, i = str(pattern), [], 0
    while i < len(text):
        ch = text[i]
        m = _GLOB_CLASS.match(text, i) if ch == "[" else None
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif m:
            body = m.group(0)[1:-1]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = m.end()
            continue
        elif ch in ".^$+(){}|\\[]":
            out.append("\\" + ch)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _dest_path(module: Module, decompress: bool) -> str:
    if decompress and not module.path.endswith(".ko"):
        return module.path[: module.path.rindex(".ko") + 3]
    return module.path


def _modules_dep(modules: Sequence[Module], dest: dict[str, str]) -> str:
    """busybox/kmod modules.dep: 'path: dep-path ...', deps transitive, loaded last-first."""
    position = {m.name: i for i, m in enumerate(modules)}
    aliases = [device_aliases(m) for m in modules]
    needed = {d for m in modules for d in m.depends}
    boot = [i for i, m in enumerate(modules) if not aliases[i] and m.name not in needed]
    by_name = {m.name: m for m in modules}
    lines = []
    for m in modules:
        closure: set[str] = set()
        stack = [d for d in m.depends if d in by_name]
        while stack:
            d = stack.pop()
            if d not in closure:
                closure.add(d)
                stack.extend(x for x in by_name[d].depends if x in by_name)
        deps = sorted(closure, key=lambda n: position[n], reverse=True)
        lines.append(f"{dest[m.name]}:" + "".join(f" {dest[d]}" for d in deps))
    return "".join(line + "\n" for line in lines)


def _modules_order(kernel: KernelInfo, modules: Sequence[Module]) -> str:
    included = {module_name_of(m.path) for m in modules}
    listing = kernel.modules_dir / "modules.order"
    lines: list[str] = []
    if listing.is_file():
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip() and module_name_of(line.strip()) in included:
                lines.append(line.strip())
    listed = {module_name_of(line) for line in lines}
    lines += [m.path for m in modules if module_name_of(m.path) not in listed]
    return "".join(line + "\n" for line in lines)


def _add_modules(arc: NewcArchive, kernel: KernelInfo, modules: Sequence[Module],
                 decompress: bool) -> None:
    root = f"{spec.INITRD_MODULES_ROOT}/{kernel.version}"
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ArmvmError(f"module list names a module twice: {names}")
    seen: set[str] = set()
    for m in modules:
        for d in m.depends:
            if d not in seen and d not in kernel.builtin:
                raise ArmvmError(f"module '{m.name}' needs '{d}' loaded before it, but '{d}' "
                                 f"is not earlier in the module list nor built in")
        seen.add(m.name)
    dest = {m.name: _dest_path(m, decompress) for m in modules}
    for m in modules:
        src = kernel.modules_dir / m.path
        if not src.is_file():
            raise ArmvmError(f"module '{m.name}': {src} does not exist")
        if dest[m.name] != m.path:
            arc.add_file(f"{root}/{dest[m.name]}", decompress_module(src.read_bytes(), m.path))
        else:
            arc.add_file(f"{root}/{m.path}", src)
    arc.add_file(f"{root}/modules.dep", _modules_dep(modules, dest).encode())
    arc.add_file(f"{root}/modules.order", _modules_order(kernel, modules).encode())
    for listing in ("modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules_dir / listing).is_file():
            arc.add_file(f"{root}/{listing}", kernel.modules_dir / listing)
    if kernel.config_path is not None:
        arc.add_file(f"{root}/{spec.INITRD_KERNEL_CONFIG}", kernel.config_path)
    arc.add_file(spec.INITRD_LOAD_LIST, "".join(n + "\n" for n in names).encode())


def _add_extra(arc: NewcArchive, dest: str, source: Path, budget: list[int]) -> None:
    dest = clean_path(dest)
    source = Path(source)
    try:
        if source.is_symlink():
            arc.add_symlink(dest, os.readlink(source))
        elif source.is_dir():
            arc.add_dir(dest)
            for child in sorted(os.listdir(source)):
                _add_extra(arc, f"{dest}/{child}", source / child, budget)
        elif source.is_file():
            arc.add_file(dest, source, file_mode(source))
        else:
            raise ArmvmError(f"extra file {source}: not a regular file, directory or symlink")
    except ArmvmError as exc:
        raise ArmvmError(f"extra file {source} -> /{dest}: {exc}") from None
    budget[0] -= 1
    if budget[0] < 0:
        raise ArmvmError(f"more than {MAX_EXTRA_FILES} extra files")


# --- writing ---------------------------------------------------------------------------------

class _HashingWriter:
    def __init__(self, raw):
        self.raw, self.size, self.sha = raw, 0, hashlib.sha256()

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()


def _write_compressed(arc: NewcArchive, out, compression: str) -> int:
    if compression == "gzip":
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=GZIP_LEVEL,
                           mtime=0) as z:
            return arc.write(z)
    if compression == "xz":
        comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                                   filters=[{"id": lzma.FILTER_LZMA2, "preset": XZ_PRESET}])
        size = arc.write(_Compressing(out, comp.compress))
        out.write(comp.flush())
        return size
    if compression == "zstd":
        import zstandard
        comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compressobj()
        size = arc.write(_Compressing(out, comp.compress))
        out.write(comp.flush())
        return size
    return arc.write(out)


class _Compressing:
    def __init__(self, out, compress):
        self.out, self.compress = out, compress

    def write(self, data) -> int:
        self.out.write(self.compress(data))
        return len(data)


def build_initramfs(*, out: Path, kernel: KernelInfo, modules: Sequence[Module], busybox: Path,
                    init_template: str | None = None, payload: str | None = None,
                    extra_files: Sequence[tuple[str, Path]] = (), compression: str = "gzip",
                    mtime: int, decompress_modules: bool = False,
                    init_template_file=None, root_fstype: str | None = None) -> InitramfsInfo:
    if compression not in COMPRESSIONS:
        raise ArmvmError(f"initramfs compression '{compression}' is not supported "
                         f"(allowed: {', '.join(COMPRESSIONS)})")
    symbol = CONFIG_FOR_COMPRESSION.get(compression)
    if symbol and kernel.config and kernel.config.get(symbol) != "y":
        raise ArmvmError(f"initramfs compression '{compression}': kernel {kernel.version} "
                         f"cannot unpack it ({symbol} is not =y)")
    busybox = Path(busybox)
    check_busybox(busybox)
    arc = NewcArchive(mtime)
    for d in ("dev", "proc", "sys", "run", "etc/armvm", "bin"):
        arc.add_dir(d)
    arc.add_dir("tmp", 0o1777)
    arc.add_dir("root", 0o700)
    arc.add_char_device("dev/console", CONSOLE_MAJOR, CONSOLE_MINOR, 0o600)
    arc.add_file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        arc.add_symlink(f"bin/{applet}", "busybox")
    modules = list(modules)
    _add_modules(arc, kernel, modules, decompress_modules)
    if payload is not None:
        arc.add_file(PAYLOAD_PATH, payload.encode(), 0o755)
    budget = [MAX_EXTRA_FILES]
    for dest, source in extra_files:
        _add_extra(arc, dest, source, budget)

    root = f"/{spec.INITRD_MODULES_ROOT}/{kernel.version}"
    position = {m.name: i for i, m in enumerate(modules)}
    aliases = [device_aliases(m) for m in modules]
    needed = {d for m in modules for d in m.depends}
    boot = [i for i, m in enumerate(modules) if not aliases[i] and m.name not in needed]
    variables = dict(
        modules=[f"{root}/{_dest_path(m, decompress_modules)}" for m in modules],
        module_names=[m.name for m in modules],
        module_deps=[[position[d] for d in m.depends if d in position] for m in modules],
        module_aliases=aliases, module_boot=boot, payload=payload,
        payload_path="/" + PAYLOAD_PATH, kernel_version=kernel.version,
        report_prefix=spec.REPORT_PREFIX, boot_marker=spec.BOOT_MARKER,
        load_list="/" + spec.INITRD_LOAD_LIST, root_fstype=root_fstype,
        root_timeout=ROOT_WAIT_SECONDS)
    if init_template is None:
        init_template = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
    assert set(variables) == set(INIT_TEMPLATE_VARS)
    arc.add_file("init", render_init(init_template, variables,
                                     template_file=init_template_file).encode(), 0o755)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw)
            uncompressed = _write_compressed(arc, hashing, compression)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return InitramfsInfo(path=out, size=hashing.size, sha256=hashing.sha.hexdigest(),
                         entries=len(arc), compression=compression,
                         uncompressed_size=uncompressed,
                         module_load_order=tuple(m.name for m in modules))
