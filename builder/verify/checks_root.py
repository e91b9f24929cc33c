"""Can the chain start userspace, and is the root file system it names sound?

boot.init     the initramfs has an executable /init (or rdinit=), else root= on the command
              line names something on this disk the kernel can mount by itself
boot.modules  modules in the initramfs were built for this kernel (vermagic) and their
              depends= are in the initramfs or built in
root.type     the root partition carries the Discoverable Partitions root type of the arch
root.fs       its ext2/3/4 superblock is sane and uses only features the kernel supports
root.found    root=UUID=/PARTUUID= names a file system / partition on this disk
root.init     the root has /sbin/init and lib/modules/<kernel version>

The root partition is the one root= names, else the first with the arch's root type
GUID, else one with another architecture's root type, else a Linux-data partition that
holds an ext2/3/4 file system. Without one, root.* report skip.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from uuid import UUID

from builder import spec
from builder.verify import ext4, kernelimg
from builder.verify.blob import SliceBlob
from builder.verify.checks_os import facts_for, initramfs, module_loaded, shared_module
from builder.verify.fat import FatError, FatVolume
from builder.verify.modinfo import MODULE_ROOTS, Module, module_name

ROOT_IDS = ("root.type", "root.fs", "root.found", "root.init")
INIT_IDS = ("boot.init", "boot.modules")
MAX_PARTITIONS = 16                      # partitions probed for file systems
ROOT_TYPES = {spec.ROOT_AARCH64_TYPE_GUID: "root (AArch64)",
              spec.ROOT_ARM_TYPE_GUID: "root (32-bit ARM)",
              spec.ROOT_X86_64_TYPE_GUID: "root (x86-64)",
              spec.ROOT_X86_TYPE_GUID: "root (x86)"}
TYPE_NAMES = {**ROOT_TYPES, spec.LINUX_DATA_TYPE_GUID: "Linux filesystem data",
              spec.ESP_TYPE_GUID: "EFI System Partition", spec.XBOOTLDR_TYPE_GUID: "XBOOTLDR",
              spec.USR_AARCH64_TYPE_GUID: "/usr (AArch64)",
              spec.USR_ARM_TYPE_GUID: "/usr (32-bit ARM)"}
OTHER_FS = {(0x10040, b"_BHRfS_M"): "btrfs", (0, b"XFSB"): "xfs", (1024, b"\xe2\xe1\xf5\xe0"):
            "erofs", (0, b"hsqs"): "squashfs"}
MAX_MODULES = 4096


def _type_name(guid: UUID) -> str:
    return f"{guid} ({TYPE_NAMES[guid]})" if guid in TYPE_NAMES else str(guid)


# --- the kernel command line -----------------------------------------------------------
def cmdline_args(cmdline: str) -> list:
    """Words as the kernel splits them (double quotes group; no escapes); ``--`` ends the
    kernel's own parameters."""
    out, cur, quoted, inword = [], [], False, False
    for c in cmdline:
        if c == '"':
            quoted, inword = not quoted, True
        elif c.isspace() and not quoted:
            if inword:
                out.append("".join(cur))
            cur, inword = [], False
        else:
            cur.append(c)
            inword = True
    if inword:
        out.append("".join(cur))
    return out[:out.index("--")] if "--" in out else out


def param(cmdline: Optional[str], key: str) -> Optional[str]:
    """The last ``key=value`` on the command line (the kernel's rule), or None."""
    val = None
    for a in cmdline_args(cmdline or ""):
        if a.startswith(key + "="):
            val = a[len(key) + 1:]
    return val


# --- partitions and their file systems -------------------------------------------------
@dataclass
class Part:
    entry: object                 # gpt.Entry
    blob: object
    fs: Optional[ext4.Ext4] = None
    fs_error: str = ""
    fs_kind: str = ""             # ext2/ext3/ext4/vfat/btrfs/...
    fs_uuid: str = ""             # as root=UUID= writes it

    def describe(self) -> str:
        what = f"{self.fs_kind} {self.fs_uuid}".strip() or "no file system"
        return f"partition {self.entry.index} ({what}, PARTUUID {self.entry.unique_guid})"


def probe_partitions(ctx) -> list:
    """Every partition (up to 16) with the file system found on it, once per image."""
    if ctx.parts is not None:
        return ctx.parts
    parts = []
    bs = ctx.gpt.sector_size if ctx.gpt is not None else None
    for e in (ctx.gpt.entries if bs else [])[:MAX_PARTITIONS]:
        blob = SliceBlob(ctx.blob, e.first_lba * bs, max(0, e.last_lba - e.first_lba + 1) * bs)
        p = Part(e, blob)
        try:
            p.fs = ext4.Ext4(blob)
            p.fs_kind, p.fs_uuid = p.fs.kind, str(p.fs.uuid)
        except ext4.Ext4Error as err:
            p.fs_error = str(err)
            for (off, magic), name in OTHER_FS.items():
                if blob.read_at(off, len(magic)) == magic:
                    p.fs_kind = name
            if not p.fs_kind and (e.type_guid == spec.ESP_TYPE_GUID or
                                  blob.read_at(510, 2) == b"\x55\xaa"):
                try:
                    vid = FatVolume(blob).volume_id
                    p.fs_kind, p.fs_uuid = "vfat", f"{vid >> 16:04X}-{vid & 0xFFFF:04X}"
                except FatError:
                    pass
        parts.append(p)
    ctx.parts = parts
    return parts


def _resolve_root(arg: str, parts: list) -> tuple:
    """(Part or None, kind, value) for a root= value; kind in uuid/partuuid/device/label."""
    v = arg
    for prefix, kind in (("/dev/disk/by-uuid/", "uuid"), ("/dev/disk/by-partuuid/", "partuuid"),
                         ("UUID=", "uuid"), ("PARTUUID=", "partuuid"),
                         ("/dev/disk/by-label/", "label"), ("LABEL=", "label"),
                         ("PARTLABEL=", "label")):
        if v.startswith(prefix):
            val = v[len(prefix):]
            if kind == "uuid":
                hit = [p for p in parts if p.fs_uuid and p.fs_uuid.lower() == val.lower()]
            elif kind == "partuuid":
                val = val.split("/", 1)[0]       # PARTUUID=<uuid>/PARTNROFF=<n>
                hit = [p for p in parts if str(p.entry.unique_guid) == val.lower()]
            else:
                hit = []
            return (hit[0] if hit else None), kind, val
    return None, "device", v


def find_root(ctx) -> tuple:
    """(Part or None, how it was found)."""
    parts = probe_partitions(ctx)
    arg = param(_cmdline(ctx), "root")
    if arg:
        p, kind, _ = _resolve_root(arg, parts)
        if p is not None:
            return p, f"named by root={arg}"
    arch = spec.ARCHES.get(ctx.arch) if ctx.arch else None
    if arch is not None:
        for p in parts:
            if p.entry.type_guid == arch.root_type_guid:
                return p, "by its root type GUID"
    for p in parts:
        if p.entry.type_guid in ROOT_TYPES:
            return p, f"by its {ROOT_TYPES[p.entry.type_guid]} type GUID"
    for p in parts:
        if p.entry.type_guid == spec.LINUX_DATA_TYPE_GUID and p.fs is not None:
            return p, "a Linux data partition holding an ext2/3/4 file system"
    return None, ""


# --- what verify knows about the kernel ---------------------------------------------------
def _cmdline(ctx) -> Optional[str]:
    return ctx.chain.cmdline if ctx.chain is not None else None


def kernel_version(ctx) -> tuple:
    """(release or None, where it came from)."""
    if ctx.kver is not None:
        return ctx.kver
    ch, found = ctx.chain, (None, "")
    banner = None
    if ch is not None and ch.kernel is not None and not (ch.kind == "uki" and ch.uname):
        banner = kernelimg.banner_version(ch.kernel)
    if ch is not None and ch.kind == "uki" and ch.uname:
        found = (ch.uname, "UKI .uname")
    elif banner:
        found = (banner, f"the banner in {ch.kernel_name}")
    elif ch is not None and ch.uname and ch.kernel is not None:
        found = (ch.uname, f"the kernel's file name {ch.kernel_name}")
    else:
        fs, _ = initramfs(ctx)
        vers = _module_trees(fs) if fs is not None else []
        if len(vers) == 1:
            found = (vers[0], "the initramfs's only lib/modules/<version> tree")
    ctx.kver = found
    return found


def _module_trees(fs) -> list:
    out = []
    for r in MODULE_ROOTS:
        for p in fs.listdir(r):
            m = fs.resolve(p)
            if m is not None and m.is_dir and p.rsplit("/", 1)[-1] not in out:
                out.append(p.rsplit("/", 1)[-1])
    return out


# --- boot.init ---------------------------------------------------------------------------
def run_init(ctx) -> None:
    ch = ctx.chain
    if ch is None or (ch.kernel is None and ch.kind != "stub"):
        ctx.set("boot.init", "skip", "no kernel in the boot chain (see boot.chain)")
        return
    cmd = ch.cmdline
    fs, note = initramfs(ctx)
    rdinit = param(cmd, "rdinit") or "/init"
    if fs is not None:
        m = fs.resolve(rdinit)
        if m is not None and not m.is_dir and m.mode & 0o170000 == 0o100000 and m.mode & 0o111:
            ctx.set("boot.init", "pass", f"the initramfs has an executable {rdinit} "
                                         f"({m.size} bytes, mode {m.mode & 0o7777:04o})")
            return
        if m is None and note:
            ctx.set("boot.init", "skip", f"{rdinit} was not found before the initramfs reader "
                                         f"stopped ({note}); cannot judge")
            return
        why = (f"the initramfs has no {rdinit}" if m is None else
               f"{rdinit} in the initramfs is not an executable file (mode {m.mode:o})")
    else:
        why = note or "no initramfs"
    if cmd is None:
        ctx.set("boot.init", "skip", f"{why}, and the kernel command line is not known")
        return
    arg = param(cmd, "root")
    if not arg:
        ctx.set("boot.init", "fail", f"{why}, and the command line ({ch.cmdline_from}) has no "
                                     "root=: the kernel cannot start userspace")
        return
    p, kind, val = _resolve_root(arg, probe_partitions(ctx))
    if kind == "uuid":
        ctx.set("boot.init", "fail", f"{why}; root={arg} needs an initramfs (the kernel itself "
                                     "resolves only PARTUUID= and device names)")
    elif kind == "partuuid" and p is not None:
        ctx.set("boot.init", "pass", f"{why}; the kernel mounts root={arg}, "
                                     f"{p.describe()}")
    elif kind == "device" and _device_partition(val, ctx) is not None:
        ctx.set("boot.init", "pass", f"{why}; the kernel mounts root={arg} (partition "
                                     f"{_device_partition(val, ctx)} exists; see root.found)")
    else:
        ctx.set("boot.init", "fail", f"{why}, and root={arg} names nothing on this disk")


DEVICE_RE = re.compile(r"/dev/(?:[svx]d[a-z]|mmcblk\d+p|nvme\d+n\d+p)(\d+)")


def _device_partition(val: str, ctx) -> Optional[int]:
    m = DEVICE_RE.fullmatch(val)
    if not m or ctx.gpt is None:
        return None
    n = int(m.group(1))
    return n if any(e.index == n for e in ctx.gpt.entries) else None


# --- boot.modules --------------------------------------------------------------------------
def run_modules(ctx) -> None:
    fs, note = initramfs(ctx)
    if fs is None:
        ctx.set("boot.modules", "skip", note)
        return
    mods = {}
    for path, m in fs.members.items():
        name = module_name(path)
        if name and any(path.startswith(r + "/") for r in MODULE_ROOTS) and not m.is_dir:
            ver = path.split("/")[2 if path.startswith("lib/") else 3]
            mods.setdefault(name, (shared_module(ctx, Module(name, path, member=m)), ver))
            if len(mods) >= MAX_MODULES:
                break
    if not mods and note:
        ctx.set("boot.modules", "skip", f"no modules found before the initramfs reader stopped "
                                        f"({note}); cannot judge")
        return
    if not mods:
        ctx.set("boot.modules", "pass", "the initramfs carries no kernel modules")
        return
    kver, src = kernel_version(ctx)
    kf = facts_for(ctx, kver)
    builtin = kf.builtin if kf is not None else None
    bad, unread, deps_missing = [], [], []
    for name, (mod, tree) in sorted(mods.items()):
        if mod.error:
            unread.append(mod.error)
            continue
        vm = mod.vermagic
        if vm is None:
            bad.append(f"{mod.path} has no vermagic")
        elif kver and vm != kver:
            bad.append(f"{mod.path} has vermagic {vm}, the kernel is {kver} (from {src})")
        elif not kver and vm != tree:
            bad.append(f"{mod.path} has vermagic {vm} but sits in the tree for {tree}")
        for d in mod.depends:
            if d not in mods and (builtin is None or d not in builtin):
                where = ("not in the initramfs and not in modules.builtin" if builtin is not None
                         else "not in the initramfs (no modules.builtin to say it is built in)")
                deps_missing.append(f"{name} depends on {d}, {where}")
    if bad or deps_missing:
        ctx.set("boot.modules", "fail", "; ".join((bad + deps_missing)[:4]) +
                (f"; and {len(bad) + len(deps_missing) - 4} more"
                 if len(bad) + len(deps_missing) > 4 else ""))
    elif unread:
        ctx.set("boot.modules", "skip", f"{len(unread)} module(s) could not be read: "
                                        f"{unread[0]}")
    else:
        basis = f"kernel {kver} from {src}" if kver else \
            "the lib/modules/<version> tree each sits in (kernel version unknown)"
        ctx.set("boot.modules", "pass", f"{len(mods)} module(s), vermagic matches {basis}; "
                                        "every depends= is present" +
                ("" if builtin is None else " or built in"))


# --- root.* ---------------------------------------------------------------------------------
def run_root(ctx) -> None:
    if ctx.gpt is None or not ctx.gpt.entries:
        for cid in ROOT_IDS:
            ctx.set(cid, "skip", "no partition table to look for a root partition")
        return
    root, how = find_root(ctx)
    cmd = _cmdline(ctx)
    arg = param(cmd, "root")
    if root is None:
        why = "not applicable: no root partition (none with a root type GUID, none named " \
              "by root=, no Linux data partition holding ext2/3/4)"
        if arg:
            why += f"; root={arg} names nothing on this disk"
        for cid in ROOT_IDS:
            ctx.set(cid, "skip", why, applicable=False)
        return
    _root_type(ctx, root, how)
    _root_fs(ctx, root)
    if cmd is None:
        ctx.set("root.found", "skip", "the kernel command line is not known (see boot.chain)")
    elif not arg:
        ctx.set("root.found", "skip", f"the command line ({ctx.chain.cmdline_from}) has no "
                                      "root=; only a Discoverable Partitions aware initramfs "
                                      "(systemd-gpt-auto-generator) would find "
                                      f"partition {root.entry.index}")
    else:
        _root_found(ctx, arg, root)
    _root_init(ctx, root)


def _root_type(ctx, root: Part, how: str) -> None:
    arch = spec.ARCHES.get(ctx.arch) if ctx.arch else None
    got = root.entry.type_guid
    if arch is None:
        ctx.set("root.type", "skip", "unknown architecture (see boot.path)")
    elif got == arch.root_type_guid:
        ctx.set("root.type", "pass", f"partition {root.entry.index} ({how}) has type "
                                     f"{_type_name(got)}")
    else:
        ctx.set("root.type", "fail", f"partition {root.entry.index} ({how}) has type "
                                     f"{_type_name(got)}; {ctx.arch} needs "
                                     f"{_type_name(arch.root_type_guid)}")


def _root_fs(ctx, root: Part) -> None:
    n = root.entry.index
    if root.fs is None:
        if root.fs_kind in OTHER_FS.values():
            ctx.set("root.fs", "skip", f"partition {n} holds {root.fs_kind}, which this "
                                       "verifier does not read")
        else:
            ctx.set("root.fs", "fail", f"partition {n}: {root.fs_error}")
        return
    kver, _ = kernel_version(ctx)
    probs = ext4.sanity(root.fs) + ext4.feature_problems(root.fs, kver)
    driver, dnote = _driver(ctx, root.fs)
    if driver is not None:
        probs.append(driver)
    if probs:
        ctx.set("root.fs", "fail", f"partition {n}: " + "; ".join(probs[:4]))
    else:
        ctx.set("root.fs", "pass", f"partition {n}: {ext4.describe(root.fs)}; {dnote}")


def _driver(ctx, fs: ext4.Ext4) -> tuple:
    """(problem or None, note): does the kernel have a driver for this file system?"""
    kf = facts_for(ctx, kernel_version(ctx)[0])
    if kf is None or kf.config is None:
        return None, "kernel driver not checked (no kernel config)"
    syms = ["EXT4_FS"] + (["EXT2_FS", "EXT3_FS"] if fs.kind != "ext4" else [])
    vals = {s: kf.config.get("CONFIG_" + s) for s in syms}
    for s, v in vals.items():
        if v == "y":
            return None, f"{s}=y"
    for s, v in vals.items():
        mod = {"EXT4_FS": "ext4", "EXT2_FS": "ext2", "EXT3_FS": "ext3"}[s]
        if v == "m":
            ok, why = module_loaded(mod, kf)
            if not ok:
                return f"{s}=m but {why}", ""
            crc = _crc32c_module(fs, kf)
            return (crc, "") if crc else (None, f"{s}=m, {why}")
    return f"the kernel has no driver for {fs.kind} (CONFIG_EXT4_FS is not set)", ""


def _crc32c_module(fs: ext4.Ext4, kf) -> Optional[str]:
    """metadata_csum needs the crc32c crypto driver at mount. A modular ext4 asks for it by
    ``softdep``, which ``depends=`` does not list (seen on Debian's armmp-lpae kernel)."""
    if not fs.ro_compat & ext4.RO_COMPAT_METADATA_CSUM or \
            kf.config.get("CONFIG_CRYPTO_CRC32C") != "m":
        return None
    names = sorted(n for n in kf.modules if n.startswith("crc32c"))
    if not names:
        return ("metadata_csum needs crc32c: CONFIG_CRYPTO_CRC32C=m but no crc32c module is "
                "in the initramfs (a softdep of ext4, not in its depends=)")
    ok, why = module_loaded(names[0], kf)
    return None if ok else f"metadata_csum needs crc32c: {why}"


def _root_found(ctx, arg: str, root: Optional[Part]) -> None:
    parts = probe_partitions(ctx)
    p, kind, val = _resolve_root(arg, parts)
    found = "; ".join(x.describe() for x in parts[:6]) or "no partitions"
    if kind == "device":
        ctx.set("root.found", "fail", f"root={arg} names a device, not UUID=/PARTUUID= (device "
                                      "names change with the VM's disk bus and order)")
    elif kind == "label":
        ctx.set("root.found", "fail", f"root={arg} names a label, not UUID=/PARTUUID= (labels "
                                      "need not be unique)")
    elif p is None:
        what = "file system with UUID" if kind == "uuid" else "partition with PARTUUID"
        ctx.set("root.found", "fail", f"no {what} {val} on this disk (found: {found})")
    elif root is not None and p is not root:
        ctx.set("root.found", "fail", f"root={arg} is {p.describe()}, not the root partition "
                                      f"{root.entry.index}")
    else:
        ctx.set("root.found", "pass", f"root={arg} is {p.describe()}")


def _root_init(ctx, root: Part) -> None:
    fs = root.fs
    if fs is None:
        ctx.set("root.init", "skip", f"partition {root.entry.index} has no readable ext2/3/4 "
                                     "file system (see root.fs)")
        return
    problems, oks, kver = [], [], None
    try:
        node = fs.lookup("/sbin/init")
        if node is None:
            link = fs.lookup("/sbin/init", follow=False)
            problems.append("/sbin/init does not exist" if link is None else
                            f"/sbin/init -> {fs.readlink(link)} does not resolve"
                            if link.is_symlink else "/sbin/init cannot be reached")
        elif not node.is_reg or not node.mode & 0o111:
            problems.append(f"/sbin/init is not an executable file (mode {node.mode:o})")
        else:
            link = fs.lookup("/sbin/init", follow=False)
            via = f" -> {fs.readlink(link)}" if link is not None and link.is_symlink else ""
            oks.append(f"/sbin/init{via} ({node.size} bytes)")
        kver, src = kernel_version(ctx)
        if kver:
            d = fs.lookup(f"/lib/modules/{kver}")
            if d is None or not d.is_dir:
                have = fs.lookup("/lib/modules")
                names = ([e.name for e, _ in zip(fs.list_dir(have), range(6))]
                         if have is not None and have.is_dir else [])
                problems.append(f"no /lib/modules/{kver} (kernel from {src}; /lib/modules "
                                f"holds: {', '.join(names) or 'nothing'})")
            else:
                oks.append(f"/lib/modules/{kver}")
    except ext4.Ext4Error as e:
        problems.append(f"cannot read the root file system: {e}")
    if problems:
        ctx.set("root.init", "fail", f"partition {root.entry.index}: " + "; ".join(problems))
    elif not kver:
        ctx.set("root.init", "skip", f"{', '.join(oks)}; the kernel version is not known, so "
                                     "lib/modules/<version> was not checked")
    else:
        ctx.set("root.init", "pass", f"partition {root.entry.index}: {', '.join(oks)}")


def run(ctx, guard) -> None:
    guard(ctx, ("boot.init",), lambda: run_init(ctx))
    guard(ctx, ("boot.modules",), lambda: run_modules(ctx))
    guard(ctx, ROOT_IDS, lambda: run_root(ctx))
