"""Kernel facts read from an initramfs: config, modules.builtin, module .modinfo, load list.

Layout contract (builder/spec.py): lib/modules/<version>/{config, modules.builtin,
modules.builtin.modinfo, kernel/**.ko[.xz|.zst|.gz]} and etc/armvm/modules.load. Module
dependencies come from each module's ELF ``.modinfo`` section (``depends=``), read with
pyelftools; file names use '-', module names '_'.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Optional

from builder import spec
from builder.verify.cpio import Initramfs
from builder.verify.decomp import DecompressError, decompress_bounded

MODULE_SUFFIXES = {".ko": None, ".ko.xz": "xz", ".ko.zst": "zstd", ".ko.gz": "gzip"}
MAX_MODULE = 64 << 20
MODULE_ROOTS = (spec.INITRD_MODULES_ROOT, "usr/" + spec.INITRD_MODULES_ROOT)
CONFIG_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


def module_name(path: str) -> Optional[str]:
    base = path.rsplit("/", 1)[-1]
    for suf in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suf):
            return base[:-len(suf)].replace("-", "_")
    return None


def is_wanted(path: str, size: int) -> bool:
    """Which initramfs files the verifier keeps (for cpio.read_initramfs)."""
    if path == spec.INITRD_LOAD_LIST:
        return True
    if not any(path.startswith(r + "/") for r in MODULE_ROOTS):
        return False
    base = path.rsplit("/", 1)[-1]
    return (base in (spec.INITRD_KERNEL_CONFIG, "modules.builtin", "modules.builtin.modinfo")
            or module_name(path) is not None)


def modinfo_from_elf(data: bytes) -> dict:
    """key -> list of values from the ELF .modinfo section; ValueError when unreadable."""
    from elftools.elf.elffile import ELFFile
    try:
        elf = ELFFile(io.BytesIO(data))
        sec = elf.get_section_by_name(".modinfo")
        raw = sec.data() if sec is not None else None
    except Exception as e:     # pyelftools raises many types on malformed input
        raise ValueError(f"not a readable ELF file ({type(e).__name__}: {e})") from None
    if raw is None:
        raise ValueError("no .modinfo section")
    info = {}
    for item in raw[:MAX_MODULE].split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            info.setdefault(k.decode("ascii", "replace"), []).append(
                v.decode("utf-8", "replace"))
    return info


class Module:
    """A module file in the initramfs; its .modinfo is parsed on first use."""

    def __init__(self, name: str, path: str, depends=None, member=None):
        self.name, self.path, self.member = name, path, member
        self._depends, self._error, self._info = depends, None, None

    def _load(self) -> None:
        if self._depends is None:
            self._info, self._error = _read_modinfo(self.path, self.member)
            deps = ",".join((self._info or {}).get("depends", []))
            self._depends = [d.strip().replace("-", "_") for d in deps.split(",") if d.strip()]

    @property
    def depends(self) -> list:
        self._load()
        return self._depends

    @property
    def error(self):
        self._load()
        return self._error

    @property
    def vermagic(self) -> Optional[str]:
        """The kernel release the module was built for (first word of ``vermagic=``)."""
        self._load()
        vm = (self._info or {}).get("vermagic", [""])[-1].split()
        return vm[0] if vm else None


@dataclass
class KernelFacts:
    version: str
    root: str                                       # e.g. lib/modules/6.1.0-31-arm64
    config: Optional[dict] = None                   # CONFIG_X -> value
    builtin: Optional[set] = None                   # built-in module names
    modules: dict = field(default_factory=dict)     # name -> Module (files in the initramfs)
    load_order: Optional[list] = None               # etc/armvm/modules.load
    notes: list = field(default_factory=list)
    own_layout: bool = False                        # armvm-build's config copy is there


def _text(m) -> Optional[str]:
    return None if m is None or m.data is None else m.data.decode("utf-8", "replace")


def versions(fs: Initramfs) -> list:
    out = []
    for r in MODULE_ROOTS:
        for p in fs.listdir(r):
            v = p.rsplit("/", 1)[-1]
            if v not in out:
                out.append(v)
    return out


def parse_config(text: str) -> dict:
    """CONFIG_X -> value of a kernel .config (``# CONFIG_X is not set`` lines are absent)."""
    out = {}
    for line in text.splitlines():
        m = CONFIG_RE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip('"')
    return out


def kernel_facts(fs: Initramfs, prefer: Optional[str] = None) -> Optional[KernelFacts]:
    """Facts for the kernel version in the initramfs (``prefer`` when it is there)."""
    vers = versions(fs)
    if not vers:
        return None
    with_cfg = [v for v in vers if _find(fs, v, spec.INITRD_KERNEL_CONFIG) is not None]
    if prefer in vers:
        ver = prefer
    else:
        ver = sorted(with_cfg or vers)[-1]
    kf = KernelFacts(ver, "")
    if len(vers) > 1:
        kf.notes.append(f"module trees for {', '.join(sorted(vers))}; judged {ver}")
    cfg = _text(_find(fs, ver, spec.INITRD_KERNEL_CONFIG))
    if cfg is not None:
        kf.config, kf.own_layout = parse_config(cfg), True
    builtin = _text(_find(fs, ver, "modules.builtin"))
    bmodinfo = _text(_find(fs, ver, "modules.builtin.modinfo"))
    if builtin is not None or bmodinfo is not None:
        kf.builtin = set()
        for line in (builtin or "").splitlines():
            n = module_name(line.strip())
            if n:
                kf.builtin.add(n)
        for item in (bmodinfo or "").split("\0"):
            if "." in item and "=" in item:
                kf.builtin.add(item.split(".", 1)[0].replace("-", "_"))
    for root in MODULE_ROOTS:
        prefix = f"{root}/{ver}/"
        for path, m in fs.members.items():
            name = module_name(path)
            if name and path.startswith(prefix) and name not in kf.modules:
                kf.modules[name] = Module(name, path, member=m)
    load = _text(fs.resolve(spec.INITRD_LOAD_LIST))
    if load is not None:
        kf.load_order = []
        for line in load.splitlines():
            w = line.split("#", 1)[0].split()
            if w:
                kf.load_order.append(module_name(w[0]) or w[0].replace("-", "_"))
    return kf


def _find(fs: Initramfs, ver: str, name: str):
    for r in MODULE_ROOTS:
        m = fs.resolve(f"{r}/{ver}/{name}")
        if m is not None and not m.is_dir:
            return m
    return None


def _read_modinfo(path: str, m) -> tuple:
    """(.modinfo dict or None, error) from a module file."""
    if m is None or m.data is None:
        return None, f"{path} was not read (size {getattr(m, 'size', '?')})"
    data = m.data
    kind = next((k for s, k in MODULE_SUFFIXES.items() if s != ".ko" and path.endswith(s)), None)
    try:
        if kind:
            data = decompress_bounded(kind, data, MAX_MODULE)
        return modinfo_from_elf(data), None
    except (DecompressError, ValueError) as e:
        return None, f"{path}: {e}"
