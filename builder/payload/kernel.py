"""Inspect an extracted Debian kernel package: image format, config, built-ins, module index.

Input is a directory as ``dpkg-deb -x`` leaves it. Debian ships no ``modules.dep``, so each
module's dependencies come from its ELF ``.modinfo`` section (``depends=``, ``alias=``).
File names use ``-`` where module names use ``_``; both spellings are accepted everywhere.
"""
from __future__ import annotations

import difflib
import hashlib
import heapq
import json
import lzma
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from builder import spec
from builder.errors import ArmvmError

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
MODULE_ROOTS = ("usr/lib/modules", "lib/modules")   # trixie (merged /usr), bookworm
MAX_MODULES = 100_000
MAX_MODULE_BYTES = 256 * 1024 * 1024      # decompressed size bound per module
MAX_TEXT_BYTES = 64 * 1024 * 1024         # config, modules.builtin*, modules.order
INDEX_FORMAT = 1
# ELF (System V ABI gABI): e_ident fields and e_machine values.
ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
EM_ARM, EM_AARCH64 = 40, 183
ARCH_ELF_MACHINE = {spec.PE_MACHINE_ARM64: EM_AARCH64, spec.PE_MACHINE_ARM: EM_ARM}
PE_MACHINE_NAMES = {spec.PE_MACHINE_ARM64: "ARM64 (0xAA64)", spec.PE_MACHINE_ARM: "ARM (0x01C2)",
                    spec.PE_MACHINE_ARMNT: "ARMNT (0x01C4)", spec.PE_MACHINE_AMD64: "AMD64 (0x8664)",
                    spec.PE_MACHINE_I386: "i386 (0x014C)"}


@dataclass(frozen=True)
class Module:
    name: str                      # module name, underscored
    path: str                      # relative to the modules dir
    depends: tuple[str, ...]       # underscored module names
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class KernelInfo:
    version: str
    image: Path
    image_format: str              # 'arm64-image' | 'efi-zboot' | 'zimage'
    efi_stub: bool
    pe_machine: int | None
    config: Mapping[str, str]      # 'CONFIG_X' -> value as written ('y', 'm', '"text"', '64')
    config_path: Path | None
    builtin: frozenset[str]        # underscored names of built-in modules
    modules_dir: Path
    modules: Mapping[str, Module]  # by underscored name


def norm(name: str) -> str:
    return name.strip().replace("-", "_")


def module_name_of(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return norm(base)


# --- kernel image ----------------------------------------------------------------------

def _image_format(head: bytes) -> str | None:
    magic_arm64 = head[spec.ARM64_IMAGE_MAGIC_OFFSET:spec.ARM64_IMAGE_MAGIC_OFFSET + 4]
    if head[:2] == b"MZ" and head[spec.ZBOOT_MAGIC_OFFSET:spec.ZBOOT_MAGIC_OFFSET + 4] == spec.ZBOOT_MAGIC:
        return "efi-zboot"
    if magic_arm64 == spec.ARM64_IMAGE_MAGIC:
        return "arm64-image"
    if len(head) >= spec.ZIMAGE_MAGIC_OFFSET + 4 and struct.unpack_from(
            "<I", head, spec.ZIMAGE_MAGIC_OFFSET)[0] == spec.ZIMAGE_MAGIC:
        return "zimage"
    return None


def _pe_machine(head: bytes) -> int | None:
    """The COFF header's Machine field when ``head`` starts a PE image, else None."""
    if head[:2] != b"MZ" or len(head) < 0x40:
        return None
    e_lfanew = struct.unpack_from("<I", head, 0x3C)[0]
    if e_lfanew + 6 > len(head) or head[e_lfanew:e_lfanew + 4] != b"PE\0\0":
        return None
    return struct.unpack_from("<H", head, e_lfanew + 4)[0]


def _check_image(image: Path, arch: spec.Arch) -> tuple[str, int | None]:
    with open(image, "rb") as f:
        head = f.read(4096)
    fmt = _image_format(head)
    machine = _pe_machine(head)
    expected = {spec.PE_MACHINE_ARM64: ("arm64-image", "efi-zboot"),
                spec.PE_MACHINE_ARM: ("zimage",)}[arch.pe_machine]
    if head[:4] == ELFMAG:
        raise ArmvmError(f"kernel {image}: kernel has no EFI stub (an ELF vmlinux, not a "
                         f"bootable {'/'.join(expected)} image)")
    if fmt is None:
        raise ArmvmError(f"kernel {image}: not a Linux kernel image for {arch.name} "
                         f"(expected {' or '.join(expected)})")
    if fmt not in expected:
        raise ArmvmError(f"kernel {image}: a {fmt} kernel cannot boot on {arch.name} "
                         f"(wrong architecture; expected {' or '.join(expected)})")
    if machine is None:
        raise ArmvmError(f"kernel {image}: kernel has no EFI stub (not a PE image; "
                         f"needs CONFIG_EFI_STUB)")
    if machine != arch.pe_machine:
        have = PE_MACHINE_NAMES.get(machine, hex(machine))
        raise ArmvmError(f"kernel {image}: kernel has no EFI stub for {arch.name}: PE machine "
                         f"{have}, wrong architecture (expected "
                         f"{PE_MACHINE_NAMES[arch.pe_machine]})")
    return fmt, machine


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _find_version(tree: Path) -> tuple[str, Path]:
    boot = tree / "boot"
    found: dict[str, Path] = {}
    for prefix in ("vmlinuz-", "vmlinux-"):
        for p in sorted(boot.glob(prefix + "*")) if boot.is_dir() else []:
            if _regular(p):
                found.setdefault(p.name[len(prefix):], p)
    if not found:
        for root in MODULE_ROOTS:
            for p in sorted((tree / root).glob("*/vmlinuz")) if (tree / root).is_dir() else []:
                if _regular(p):
                    found.setdefault(p.parent.name, p)
    if not found:
        raise ArmvmError(f"no kernel image in {tree} (looked for boot/vmlinuz-<version>, "
                         f"boot/vmlinux-<version>, usr/lib/modules/<version>/vmlinuz)")
    if len(found) > 1:
        raise ArmvmError(f"several kernels in {tree}: {', '.join(sorted(found))}; "
                         f"use a tree with exactly one kernel")
    return next(iter(found.items()))


# --- text files ------------------------------------------------------------------------

def _read_bounded(path: Path) -> bytes:
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise ArmvmError(f"{path}: larger than {MAX_TEXT_BYTES} bytes")
    return path.read_bytes()


def parse_config(text: str) -> dict[str, str]:
    config: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            config[key] = value
    return config


def _parse_builtin(modules_dir: Path) -> frozenset[str]:
    names: set[str] = set()
    listing = modules_dir / "modules.builtin"
    if _regular(listing):
        for line in _read_bounded(listing).decode("utf-8", "replace").splitlines():
            if line.strip():
                names.add(module_name_of(line.strip()))
    modinfo = modules_dir / "modules.builtin.modinfo"
    if _regular(modinfo):
        for record in _read_bounded(modinfo).split(b"\0"):
            key, sep, _ = record.decode("utf-8", "replace").partition("=")
            mod, dot, field = key.partition(".")
            if sep and dot and field == "file":     # "<name>.file=<path>": a built-in module
                names.add(norm(mod))
    return frozenset(names)


# --- modules ---------------------------------------------------------------------------

def decompress_module(data: bytes, rel: str) -> bytes:
    try:
        if rel.endswith(".ko.xz"):
            out = lzma.LZMADecompressor().decompress(data, max_length=MAX_MODULE_BYTES + 1)
        elif rel.endswith(".ko.gz"):
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, MAX_MODULE_BYTES + 1)
        elif rel.endswith(".ko.zst"):
            import zstandard
            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                out = reader.read(MAX_MODULE_BYTES + 1)
        else:
            out = data
    except (lzma.LZMAError, zlib.error, EOFError, OSError) as exc:
        raise ArmvmError(f"module {rel}: cannot decompress: {exc}") from None
    except Exception as exc:  # zstandard.ZstdError has no stable import path
        raise ArmvmError(f"module {rel}: cannot decompress: {exc}") from None
    if len(out) > MAX_MODULE_BYTES:
        raise ArmvmError(f"module {rel}: larger than {MAX_MODULE_BYTES} bytes decompressed")
    return out


def elf_section(data: bytes, wanted: str, where: str) -> tuple[int, bytes | None]:
    """(e_machine, contents of section ``wanted`` or None) of an ELF relocatable object."""
    if data[:4] != ELFMAG or len(data) < 0x34:
        raise ArmvmError(f"{where}: not an ELF file")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (ELFCLASS32, ELFCLASS64) or ei_data not in (ELFDATA2LSB, ELFDATA2MSB):
        raise ArmvmError(f"{where}: unsupported ELF class/data ({ei_class}/{ei_data})")
    e = "<" if ei_data == ELFDATA2LSB else ">"
    e_machine = struct.unpack_from(e + "H", data, 0x12)[0]
    if ei_class == ELFCLASS64:
        if len(data) < 0x40:
            raise ArmvmError(f"{where}: truncated ELF header")
        e_shoff, = struct.unpack_from(e + "Q", data, 0x28)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
        shdr, min_size = e + "IIQQQQ", 64      # sh_name sh_type sh_flags sh_addr sh_offset sh_size
    else:
        e_shoff, = struct.unpack_from(e + "I", data, 0x20)
        e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)
        shdr, min_size = e + "IIIIII", 40
    if e_shentsize < min_size or e_shoff + e_shnum * e_shentsize > len(data) \
            or e_shstrndx >= e_shnum:
        raise ArmvmError(f"{where}: section header table out of range")

    def header(i: int) -> tuple[int, int, int]:
        sh_name, _t, _f, _a, sh_offset, sh_size = struct.unpack_from(
            shdr, data, e_shoff + i * e_shentsize)
        if sh_offset + sh_size > len(data):
            raise ArmvmError(f"{where}: section {i} out of range")
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(e_shstrndx)
    strtab = data[str_off:str_off + str_size]
    key = wanted.encode() + b"\0"
    for i in range(e_shnum):
        sh_name, sh_offset, sh_size = header(i)
        if strtab[sh_name:sh_name + len(key)] == key:
            return e_machine, data[sh_offset:sh_offset + sh_size]
    return e_machine, None


def parse_modinfo(raw: bytes) -> list[tuple[str, str]]:
    fields = []
    for record in raw.split(b"\0"):
        key, sep, value = record.decode("utf-8", "replace").partition("=")
        if sep:
            fields.append((key, value))
    return fields


def _scan_one(modules_dir: Path, rel: str, elf_machine: int) -> Module:
    data = decompress_module((modules_dir / rel).read_bytes(), rel)
    machine, raw = elf_section(data, ".modinfo", f"module {rel}")
    if machine != elf_machine:
        raise ArmvmError(f"module {rel}: ELF machine {machine}, expected {elf_machine} "
                         f"(module of another architecture)")
    fields = parse_modinfo(raw or b"")
    name = next((norm(v) for k, v in fields if k == "name" and v), module_name_of(rel))
    depends = tuple(norm(d) for k, v in fields if k == "depends" for d in v.split(",") if d.strip())
    aliases = tuple(v for k, v in fields if k == "alias")
    return Module(name, rel, depends, aliases)


def _module_files(modules_dir: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every regular module file, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(modules_dir):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith(MODULE_SUFFIXES):
                st = os.lstat(os.path.join(dirpath, fn))
                if not (st.st_mode & 0o170000 == 0o100000):   # regular files only
                    continue
                rel = os.path.relpath(os.path.join(dirpath, fn), modules_dir).replace(os.sep, "/")
                found.append((rel, st.st_size, st.st_mtime_ns))
                if len(found) > MAX_MODULES:
                    raise ArmvmError(f"{modules_dir}: more than {MAX_MODULES} modules")
    found.sort()
    return found


def _load_index(cache_file: Path, fingerprint: str) -> list[Module] | None:
    try:
        doc = json.loads(cache_file.read_text(encoding="utf-8"))
        if doc.get("format") != INDEX_FORMAT or doc.get("fingerprint") != fingerprint:
            return None
        return [Module(str(m["name"]), str(m["path"]), tuple(map(str, m["depends"])),
                       tuple(map(str, m["aliases"]))) for m in doc["modules"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store_index(cache_file: Path, fingerprint: str, modules: list[Module]) -> None:
    doc = {"format": INDEX_FORMAT, "fingerprint": fingerprint,
           "modules": [{"name": m.name, "path": m.path, "depends": list(m.depends),
                        "aliases": list(m.aliases)} for m in modules]}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, sort_keys=True), encoding="utf-8")
    os.replace(tmp, cache_file)


def scan_modules(modules_dir: Path, arch: spec.Arch, *,
                 index_cache: Path | None = None) -> dict[str, Module]:
    files = _module_files(modules_dir)
    fingerprint = hashlib.sha256(json.dumps([modules_dir.name, files]).encode()).hexdigest()
    cache_file = index_cache / f"modules-{modules_dir.name}.json" if index_cache else None
    modules = _load_index(cache_file, fingerprint) if cache_file else None
    if modules is None:
        elf_machine = ARCH_ELF_MACHINE[arch.pe_machine]
        # lzma/zlib release the GIL while decompressing: threads overlap the expensive part.
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            modules = list(pool.map(lambda f: _scan_one(modules_dir, f[0], elf_machine), files))
        if cache_file:
            _store_index(cache_file, fingerprint, modules)
    index: dict[str, Module] = {}
    for m in modules:            # sorted by path: the first file of a name wins
        index.setdefault(m.name, m)
    return index


def inspect_kernel(tree: Path, arch: spec.Arch, *, index_cache: Path | None = None) -> KernelInfo:
    tree = Path(tree)
    if not tree.is_dir():
        raise ArmvmError(f"kernel package tree {tree} is not a directory")
    version, image = _find_version(tree)
    image_format, machine = _check_image(image, arch)
    modules_dir = next((tree / r / version for r in MODULE_ROOTS if (tree / r / version).is_dir()),
                       None)
    if modules_dir is None:
        raise ArmvmError(f"kernel {version}: no modules directory in {tree} (looked for "
                         f"{' and '.join(r + '/' + version for r in MODULE_ROOTS)})")
    config_path = next((p for p in (tree / "boot" / f"config-{version}", modules_dir / "config")
                        if _regular(p)), None)
    config = parse_config(_read_bounded(config_path).decode("utf-8", "replace")) \
        if config_path else {}
    return KernelInfo(version=version, image=image, image_format=image_format,
                      efi_stub=True, pe_machine=machine, config=config,
                      config_path=config_path, builtin=_parse_builtin(modules_dir),
                      modules_dir=modules_dir,
                      modules=scan_modules(modules_dir, arch, index_cache=index_cache))


# --- driver resolution -----------------------------------------------------------------

def builtin_names(kernel: KernelInfo) -> set[str]:
    return set(kernel.builtin)


def _config_symbol(driver: str) -> str | None:
    d = driver.strip()
    if d and d == d.upper() and d.replace("_", "").isalnum() and not d[0].isdigit():
        return d if d.startswith("CONFIG_") else "CONFIG_" + d
    return None


def _lookup(kernel: KernelInfo, driver: str) -> str | None:
    """Module name for ``driver``; None when built in. Raises for unknown names."""
    symbol = _config_symbol(driver)
    if symbol is not None:
        value = kernel.config.get(symbol)
        if value == "y":
            return None
        if value == "m":
            raise ArmvmError(f"driver '{driver}': {symbol} is a module; name the module "
                             f"instead (for example '{symbol[7:].lower()}')")
        state = "not set" if value is None else f"'{value}'"
        raise ArmvmError(f"driver '{driver}': {symbol} is {state} in kernel {kernel.version}")
    name = norm(driver)
    if name in kernel.modules:
        return name
    if name in kernel.builtin:
        return None
    by_alias = sorted(m.name for m in kernel.modules.values() if driver.strip() in m.aliases)
    if len(by_alias) == 1:
        return by_alias[0]
    if by_alias:
        raise ArmvmError(f"driver '{driver}' is an alias of several modules: "
                         f"{', '.join(by_alias)}; name one of them")
    close = difflib.get_close_matches(name, sorted(set(kernel.modules) | kernel.builtin),
                                      n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ArmvmError(f"driver '{driver}' is neither a module nor built into kernel "
                     f"{kernel.version}{hint}")


def resolve_drivers(kernel: KernelInfo, drivers: Sequence[str]) -> list[Module]:
    """Modules to load for ``drivers``: dependency closure, dependencies first."""
    wanted: set[str] = set()
    stack = [(name, None) for name in (_lookup(kernel, d) for d in drivers) if name]
    while stack:
        name, needed_by = stack.pop()
        if name in wanted:
            continue
        if name not in kernel.modules:
            if name in kernel.builtin:
                continue
            raise ArmvmError(f"module '{needed_by}' depends on '{name}', which is neither a "
                             f"module nor built into kernel {kernel.version}")
        wanted.add(name)
        stack.extend((dep, name) for dep in kernel.modules[name].depends)
    deps = {n: {d for d in kernel.modules[n].depends if d in wanted} for n in wanted}
    waiting = {n: len(d) for n, d in deps.items()}
    users: dict[str, list[str]] = {n: [] for n in wanted}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    ready = [n for n, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    order: list[Module] = []
    while ready:
        n = heapq.heappop(ready)
        order.append(kernel.modules[n])
        for user in users[n]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(wanted):
        stuck = sorted(n for n, count in waiting.items() if count > 0)
        raise ArmvmError(f"module dependency cycle among: {', '.join(stuck)}")
    return order
