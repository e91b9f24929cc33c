"""boot.chain and boot.kernel: what the loader starts, and whether it is all there.

A loader with a ``.linux`` section is a UKI (.initrd and .cmdline must be present too).
One with ``.sdmagic`` is systemd-boot: its default entry (loader.conf, /loader/entries,
/EFI/Linux) is judged. Else GRUB: grub.cfg is read where the binary reads it (beside its
image, then ``$prefix/grub.cfg`` with the prefix, embedded config or memdisk taken from the
image's ``mods`` section) and every kernel/initrd it names must exist. A loader that is
itself an EFI-stub kernel needs nothing else. A loader with ``.vendor_cert`` is shim: it
starts grub<arch>.efi from its own directory, which is then judged as above.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from builder import spec
from builder.verify import ext4, grubcfg, grubimg, kernelimg, sdboot
from builder.verify.authenticode import find_section
from builder.verify.blob import Blob, ConcatBlob, SliceBlob
from builder.verify.fat import FatError, FatVolume
from builder.verify.pe import PeError, parse_pe, section_blob

# Where grub-install's configuration lives on a Linux file system (root or a /boot partition).
LINUX_GRUB_CFGS = ("/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub2/grub.cfg",
                   "/grub2/grub.cfg")
# grub.cfg files other tools leave on ESPs, named when the GRUB found would not read them.
ESP_GRUB_CFGS = ("/" + spec.ESP_GRUB_CFG, "/EFI/debian/grub.cfg", "/boot/grub/grub.cfg",
                 "/grub/grub.cfg")
UKI_REQUIRED = (".linux", ".initrd", ".cmdline")
MAX_CFG_FILE = 1 << 20
MAX_CMDLINE = 4096                     # COMMAND_LINE_SIZE on arm64 is 2048; be generous


@dataclass
class Chain:
    kind: str                          # 'uki' | 'grub' | 'stub'
    kernel: Optional[Blob] = None
    kernel_name: str = ""
    initrd: Optional[Blob] = None
    initrd_note: str = ""              # why there is no initrd
    uname: Optional[str] = None        # kernel version when the chain tells it
    cmdline: Optional[str] = None      # the kernel command line, when the chain tells it
    cmdline_from: str = ""             # where it came from (for details)


def find_chain(ctx) -> None:
    pe, vol = ctx.loader_pe, ctx.vol
    if ctx.loader is None or pe is None:
        why = "no usable loader (see boot.path / boot.pe)"
        ctx.set("boot.chain", "skip", why)
        ctx.set("boot.kernel", "skip", why)
        return
    blob, path = ctx.loader, ctx.loader_path
    if find_section(blob, pe, ".vendor_cert") is not None:
        nxt = _shim_next(ctx)
        if nxt is None:
            return
        path, blob, pe = nxt
    names = {s.name for s in pe.sections}
    if ".linux" in names:
        _uki(ctx, pe, blob, "the loader" if blob is ctx.loader else path)
    elif ".sdmagic" in names:
        _sdboot(ctx)
    else:
        _grub_image(ctx, pe, names, blob, path)
    ch = ctx.chain
    if ch is None or ch.kernel is None:
        if "boot.kernel" not in ctx.results:
            ctx.set("boot.kernel", "skip", "the boot chain names no readable kernel (see "
                                           "boot.chain)")
        return
    ok, detail = kernelimg.judge(ch.kernel, ctx.arch, ch.kind)
    ctx.set("boot.kernel", "pass" if ok else "fail", f"{ch.kernel_name}: {detail}")


def _shim_next(ctx):
    """shim (a loader with .vendor_cert) starts grub<arch>.efi from its own directory
    (shim's DEFAULT_LOADER): (path, blob, PE) of it, or None with boot.chain failed."""
    arch = ctx.loader_path.rsplit("/", 1)[-1].upper()
    name = "grub" + arch[len("BOOT"):-len(".EFI")].lower() + ".efi"
    path = ctx.loader_path.rsplit("/", 1)[0] + "/" + name
    blob, why = _open(ctx, path)
    if blob is None:
        ctx.set("boot.chain", "fail", f"the loader is shim, which starts {name} beside it: {why}")
        return None
    try:
        pe = parse_pe(blob)
    except PeError as e:
        ctx.set("boot.chain", "fail", f"the loader is shim; {path} is not a PE image ({e})")
        return None
    ctx.cache["shim.next"] = (path, blob, pe)
    return path, blob, pe


def _exists(ctx, path: str) -> bool:
    try:
        e = ctx.vol.lookup(path)
        return e is not None and not e.is_dir
    except FatError as err:
        ctx.fat_problems.append(str(err))
        return False


def _grub_image(ctx, pe, names: set, blob=None, path=None) -> None:
    """GRUB reads grub.cfg beside its own image first (Debian's fw_path), then
    ``$prefix/grub.cfg``; the prefix, an embedded config and a memdisk come from the image's
    ``mods`` section. A loader without one is judged as GRUB only when a grub.cfg sits
    beside it. ``blob``/``path``: the GRUB image when it is not the loader (shim's next)."""
    blob, path = blob or ctx.loader, path or ctx.loader_path
    gi = grubimg.read_mods(blob, pe)
    loader_dir = path.rsplit("/", 1)[0] or "/"
    beside = loader_dir.rstrip("/") + "/grub.cfg"
    if gi is None:
        if _exists(ctx, beside):
            _grub(ctx, beside, loader_dir, note="the loader has no GRUB 'mods' section; "
                  "judged as a GRUB reading the grub.cfg beside it")
        elif kernelimg.describe(blob)[1] is not None:
            ctx.chain = Chain("stub", blob, path,
                              initrd_note="the loader is a kernel started without an initrd")
            ctx.set("boot.chain", "pass", "the loader is an EFI-stub kernel started directly")
        else:
            uki_like = sorted(names & set(spec.UKI_SECTIONS))
            hint = (f"; it has {', '.join(uki_like)} but no .linux section, so it is not a "
                    "UKI") if uki_like else ""
            ctx.set("boot.chain", "fail", f"the loader is neither GRUB (no 'mods' section and "
                    f"no {beside}), a UKI (.linux section), systemd-boot (.sdmagic) nor an "
                    f"EFI-stub kernel{hint}")
        return
    prefix = gi.prefix or ""
    dev, pdir = grubimg.split_prefix(prefix)
    what = f"GRUB (prefix '{prefix}')" if prefix else "GRUB (no prefix embedded)"
    if gi.problems:
        what += f" [{'; '.join(gi.problems[:2])}]"
    pcfg = pdir.rstrip("/") + "/grub.cfg"
    if gi.config is not None:
        nxt = beside if _exists(ctx, beside) else "${prefix}/grub.cfg"
        text = gi.config + f"\nconfigfile {nxt}\n"
        _grub(ctx, "(embedded config)", pdir if not dev else loader_dir, text=text,
              note=f"{what} runs its embedded config, then {nxt}")
        return
    if _exists(ctx, beside):
        _grub(ctx, beside, pdir if prefix and not dev else loader_dir,
              note=f"{what} reads {beside} beside its image first")
        return
    if dev == "memdisk":
        raw = gi.memdisk_file(pcfg)
        if raw is not None:
            # GRUB starts with $root on the memdisk: files named without a device are read
            # there (not checked) unless the config searches for the ESP
            _grub(ctx, f"(memdisk){pcfg}", loader_dir, text="set root=memdisk\n" +
                  raw.decode("utf-8", "replace"), note=f"{what} reads grub.cfg from its memdisk")
            return
    elif dev:
        _grub(ctx, "(prefix)", loader_dir, text=f"configfile ({dev}){pcfg}\n",
              note=f"{what} reads ({dev}){pcfg}")
        return
    elif prefix and _exists(ctx, pcfg):
        _grub(ctx, pcfg, pdir, note=f"{what} reads $prefix/grub.cfg")
        return
    tried = [beside] + ([f"({dev}){pcfg}" if dev else pcfg] if prefix else [])
    others = [p for p in ESP_GRUB_CFGS if p not in tried and _exists(ctx, p)]
    extra = (f"; {', '.join(others)} exists but this GRUB never reads it" if others else "")
    ctx.set("boot.chain", "fail", f"{what} reads {' then '.join(dict.fromkeys(tried))}; none "
            f"exists, so it stops at the grub> prompt{extra}")


def _sdboot(ctx) -> None:
    """systemd-boot: loader.conf, Type #1 entries and Type #2 UKIs on the ESP; judge the
    entry it boots by default."""
    vol = ctx.vol
    conf = _read_text(ctx, sdboot.LOADER_CONF, sdboot.MAX_CONF)
    default = None
    for k, v in sdboot.parse_conf(conf or ""):
        if k == "default":
            default = v
    entries, bad = [], []
    arch_name = sdboot.ARCH_NAMES.get(ctx.arch or "", "")
    xvols, xnotes = _xbootldr(ctx)
    for (vol, where), d, ext in [(v, d, x) for v in [(ctx.vol, "the ESP")] + xvols
                                 for d, x in ((sdboot.ENTRIES_DIR, ".conf"),
                                              (sdboot.UKI_DIR, ".efi"))]:
        for name in _list(ctx, d, vol):
            if not name.lower().endswith(ext) or name.startswith(".") or \
                    len(entries) >= sdboot.MAX_ENTRIES:
                continue
            path = f"{d}/{name}"
            if ext == ".conf":
                e = sdboot.entry_from_conf(name, path, _read_text(ctx, path, sdboot.MAX_CONF,
                                                                  vol) or "")
                if e.architecture and arch_name and e.architecture.lower() != arch_name:
                    continue
                if not (e.linux or e.efi):
                    bad.append(f"{path} has neither 'linux' nor 'efi'")
                    continue
            else:
                blob, _ = _open(ctx, path, vol)
                try:
                    upe = parse_pe(blob) if blob is not None else None
                except PeError:
                    upe = None
                if upe is None or upe.section(".osrel") is None or upe.section(".linux") is None:
                    bad.append(f"{path} is not a UKI (.osrel and .linux); ignored")
                    continue
                osrel = section_blob(blob, upe.section(".osrel")).read_at(0, sdboot.MAX_CONF)
                e = sdboot.entry_from_osrel(name, path, osrel.decode("utf-8", "replace"))
            e.vol, e.where = vol, where
            entries.append(e)
    e, how = sdboot.default_entry(entries, default)
    found = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    if e is None:
        ctx.set("boot.chain", "fail", f"systemd-boot finds no entry in {sdboot.ENTRIES_DIR} "
                f"or {sdboot.UKI_DIR}" + (f" ({'; '.join(bad[:3])})" if bad else "") +
                ("" if conf is not None else f"; no {sdboot.LOADER_CONF}") +
                "".join(f"; {n}" for n in xnotes))
        return
    on = "" if e.vol is ctx.vol else f" on {e.where}"
    head = f"systemd-boot ({found}) boots '{e.id}'{on} ({how})"
    if e.type == 2 or (e.efi and not e.linux):
        path = e.path if e.type == 2 else "/" + e.efi.lstrip("/")
        blob, why = _open(ctx, path, e.vol, e.where)
        if blob is None:
            ctx.set("boot.chain", "fail", f"{head}: {why}")
            return
        try:
            upe = parse_pe(blob)
        except PeError as err:
            ctx.set("boot.chain", "fail", f"{head}: {path} is not a PE image ({err})")
            return
        if upe.section(".linux") is None:
            ctx.set("boot.chain", "skip", f"{head}: efi {path} is an EFI program, not a UKI; "
                                          "not checked")
            return
        _uki(ctx, upe, blob, f"{head}: {path}")
        return
    ch = ctx.chain = Chain("bls")
    missing, blobs = [], []
    for f in [e.linux] + e.initrds:
        p = "/" + f.replace("\\", "/").lstrip("/")
        b, why = _open(ctx, p, e.vol, e.where)
        if b is None:
            missing.append(why)
        blobs.append(b)
    ch.kernel, ch.kernel_name = blobs[0], e.linux
    if e.initrds and all(b is not None for b in blobs[1:]):
        ch.initrd = ConcatBlob(blobs[1:])
    else:
        ch.initrd_note = (f"the entry {e.path} loads no initrd" if not e.initrds else
                          "an initrd named by the entry is missing")
    base = e.linux.rsplit("/", 1)[-1]
    ch.uname = base[len("vmlinuz-"):] if base.startswith("vmlinuz-") else (e.version or None)
    ch.cmdline, ch.cmdline_from = e.cmdline, f"{e.path} options"
    if missing:
        ctx.set("boot.chain", "fail", f"{head}: " + "; ".join(missing[:4]))
        return
    ctx.set("boot.chain", "pass", f"{head}: linux {e.linux}, initrd "
                                  f"{', '.join(e.initrds) or 'none'}, options "
                                  f"'{e.cmdline[:80]}'")


def _list(ctx, path: str, vol=None) -> list:
    vol = vol or ctx.vol
    try:
        d = vol.lookup(path)
        if d is None or not d.is_dir:
            return []
        return sorted(x.name for x in vol.list_dir(d.first_cluster or None, path)
                      if not x.is_dir and x.name not in (".", ".."))
    except FatError as err:
        if vol is ctx.vol:
            ctx.fat_problems.append(str(err))
        return []


def _read_text(ctx, path: str, limit: int, vol=None):
    b, _ = _open(ctx, path, vol)
    return None if b is None else b.read_at(0, limit).decode("utf-8", "replace")


def _uki(ctx, pe, blob, where: str) -> None:
    missing = [s for s in UKI_REQUIRED if pe.section(s) is None]
    ch = ctx.chain = Chain("uki")
    ch.kernel, ch.kernel_name = section_blob(blob, pe.section(".linux")), "UKI .linux"
    if pe.section(".initrd") is not None:
        ch.initrd = section_blob(blob, pe.section(".initrd"))
    else:
        ch.initrd_note = "the UKI has no .initrd section"
    if pe.section(".uname") is not None:
        raw = section_blob(blob, pe.section(".uname")).read_at(0, 256)
        ch.uname = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip() or None
    if missing:
        ctx.set("boot.chain", "fail", f"{where} is a UKI without {', '.join(missing)} "
                                      f"section(s)")
        return
    cut = [p for p in pe.problems]
    if cut:
        ctx.set("boot.chain", "fail", "; ".join(cut))
        return
    cmdline = section_blob(blob, pe.section(".cmdline")).read_at(0, MAX_CMDLINE)
    cmdline = cmdline.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    ch.cmdline, ch.cmdline_from = cmdline, "UKI .cmdline"
    osrel = "" if pe.section(".osrel") else "; no .osrel section"
    pre = "UKI" if where == "the loader" else f"{where}: UKI"
    ctx.set("boot.chain", "pass", f"{pre}: .linux {ch.kernel.size} bytes, .initrd "
                                  f"{ch.initrd.size} bytes, .cmdline '{cmdline[:80]}'{osrel}")


def _open(ctx, path: str, vol=None, where: str = "the ESP"):
    """(blob, error) for a file on the ESP (or on ``vol``, e.g. an XBOOTLDR partition)."""
    vol = vol or ctx.vol
    try:
        e = vol.lookup(path)
        if e is None:
            return None, f"{path} does not exist on {where}"
        return vol.open(e, path), ""
    except FatError as err:
        if vol is ctx.vol:
            ctx.fat_problems.append(str(err))
        return None, f"{path} cannot be read: {err}"


def _xbootldr(ctx) -> tuple:
    """([(FatVolume, description)], notes) for XBOOTLDR partitions, where systemd-boot also
    looks for entries (Boot Loader Specification: the Extended Boot Loader partition)."""
    vols, notes = [], []
    g = ctx.gpt
    if g is None:
        return vols, notes
    bs = g.sector_size or 512
    for p in g.entries:
        if p.type_guid != spec.XBOOTLDR_TYPE_GUID:
            continue
        where = f"the XBOOTLDR partition {p.index}"
        try:
            vols.append((FatVolume(SliceBlob(ctx.blob, p.first_lba * bs,
                                             max(0, p.last_lba - p.first_lba + 1) * bs)),
                         where))
        except FatError as err:
            notes.append(f"{where} holds no FAT file system the firmware reads ({err}); "
                         "its entries are not read")
    return vols, notes


def _grub(ctx, cfg_path: str, prefix: str, *, text: Optional[str] = None,
          note: str = "") -> None:
    vol = ctx.vol
    err = ""
    if text is None:
        blob, err = _open(ctx, cfg_path)
        text = "" if blob is None else blob.read_at(0, MAX_CFG_FILE).decode("utf-8", "replace")
    lead = f"{note}; " if note else ""

    def exists(p):
        try:
            return vol.lookup(p) is not None
        except FatError:
            return False

    def read(p):
        b, _ = _open(ctx, p)
        return None if b is None else b.read_at(0, MAX_CFG_FILE).decode("utf-8", "replace")

    vid = vol.volume_id
    gb = grubcfg.read_grub_cfg(text, cfg_path, esp_part=ctx.esp.index,
                               fs_uuid=f"{vid >> 16:04X}-{vid & 0xFFFF:04X}",
                               label=vol.volume_label, exists=exists, read=read, prefix=prefix)
    ch = ctx.chain = Chain("grub")
    if err:
        ctx.set("boot.chain", "fail", err)
        return
    missing, elsewhere, opened = [], [], {}
    for r in gb.refs:
        if not r.absolute:
            missing.append(f"'{r.cmd} {r.raw}': GRUB needs an absolute path ('/...' or "
                           "'(device)/...')")
        elif not r.on_esp:
            elsewhere.append(f"{r.raw} ({r.device})")
        elif r.path not in opened and len(opened) < 256:
            b, why = opened[r.path] = _open(ctx, r.path)
            if b is None:
                missing.append(f"'{r.cmd} {r.raw}': {why}")
    if gb.kernel is not None and gb.kernel.on_esp:
        ch.kernel, ch.kernel_name = opened.get(gb.kernel.path, (None, ""))[0], gb.kernel.path
    initrds = [opened.get(r.path, (None, ""))[0] for r in gb.initrds if r.on_esp]
    if gb.initrds and all(b is not None for b in initrds) and len(initrds) == len(gb.initrds):
        ch.initrd = ConcatBlob(initrds)
    elif not gb.initrds:
        ch.initrd_note = f"the GRUB entry '{gb.entry_title}' loads no initrd"
    else:
        ch.initrd_note = "an initrd named by grub.cfg is missing or on another device"
    if gb.kernel is not None:
        ch.cmdline = gb.kernel.args
        ch.cmdline_from = f"{cfg_path} '{gb.entry_title}'"
    if gb.kernel is not None and gb.kernel.path.rsplit("/", 1)[-1].startswith("vmlinuz-"):
        ch.uname = gb.kernel.path.rsplit("/", 1)[-1][len("vmlinuz-"):]
    probs = "; ".join(gb.problems[:3])
    if missing:
        ctx.set("boot.chain", "fail", f"{lead}{cfg_path}: " + "; ".join(missing[:4]))
    elif gb.kernel is None and gb.elsewhere and _grub_on_linux_fs(ctx, cfg_path, gb):
        pass
    elif gb.kernel is None and gb.elsewhere:
        ctx.set("boot.chain", "skip", f"{lead}{cfg_path} continues with "
                                      f"{'; '.join(gb.elsewhere[:2])}, outside the ESP; "
                                      "not checked")
    elif gb.kernel is None:
        ctx.set("boot.chain", "fail", f"{lead}{cfg_path}: the default entry '{gb.entry_title}' has "
                                      f"no linux command" + (f" ({probs})" if probs else ""))
    elif not gb.kernel.on_esp:
        ctx.set("boot.chain", "skip", f"{lead}{cfg_path}: the kernel {gb.kernel.raw} is on another "
                                      f"device ({gb.kernel.device}); not checked")
    else:
        names = ", ".join(r.path for r in gb.initrds) or "no initrd"
        note = f"; not checked (other devices): {', '.join(elsewhere[:3])}" if elsewhere else ""
        ctx.set("boot.chain", "pass", f"{lead}GRUB reads {cfg_path}; entry '{gb.entry_title}': "
                                      f"linux {gb.kernel.path}, initrd {names}{note}"
                + (f"; notes: {probs}" if probs else ""))


def _grub_on_linux_fs(ctx, esp_cfg: str, esp_gb) -> bool:
    """The ESP's grub.cfg hands over to a config on another partition (grub-install's stub:
    ``search --fs-uuid ...; configfile ($root)/boot/grub/grub.cfg``): follow it when that
    partition holds ext2/3/4 with a grub.cfg where grub-install puts it. True when the
    boot.chain result was set."""
    from builder.verify.checks_root import probe_partitions
    text = " ".join(esp_gb.elsewhere)
    wanted = {int(n) for n in re.findall(r"gpt(\d+)", text)}
    uuids = {u.lower() for u in re.findall(r"[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}",
                                           text)}
    for p in probe_partitions(ctx):
        if p.fs is None or not (p.entry.index in wanted or p.fs_uuid.lower() in uuids):
            continue
        fs = p.fs
        for path in LINUX_GRUB_CFGS:
            try:
                node = fs.lookup(path)
                if node is None or not node.is_reg:
                    continue
                text = fs.read(node, MAX_CFG_FILE).decode("utf-8", "replace")
            except ext4.Ext4Error:
                continue
            _grub_linux(ctx, esp_cfg, p, path, text)
            return True
    return False


def _grub_linux(ctx, esp_cfg: str, part, cfg_path: str, text: str) -> None:
    fs, where = part.fs, f"partition {part.entry.index} ({part.fs_kind})"

    def lookup(path):
        try:
            node = fs.lookup(path)
            return node if node is not None and node.is_reg else None
        except ext4.Ext4Error:
            return None

    def read(path):
        node = lookup(path)
        try:
            return None if node is None else fs.read(node, MAX_CFG_FILE).decode("utf-8",
                                                                               "replace")
        except ext4.Ext4Error:
            return None

    gb = grubcfg.read_grub_cfg(text, cfg_path, esp_part=part.entry.index,
                               fs_uuid=part.fs_uuid, label=fs.label,
                               exists=lambda p: lookup(p) is not None, read=read,
                               prefix=cfg_path.rsplit("/", 1)[0])
    ch = ctx.chain = Chain("grub")
    head = f"{esp_cfg} continues on {where} with {cfg_path}"
    if gb.kernel is None or not gb.kernel.on_esp:
        what = "no linux command" if gb.kernel is None else f"the kernel {gb.kernel.raw} " \
            f"on yet another device ({gb.kernel.device})"
        ctx.set("boot.chain", "fail" if gb.kernel is None else "skip",
                f"{head}; entry '{gb.entry_title}': {what}")
        return
    missing, blobs = [], {}
    for r in [gb.kernel] + gb.initrds:
        node = lookup(r.path) if r.on_esp else None
        if node is None:
            missing.append(f"'{r.cmd} {r.raw}': {r.path} does not exist on {where}")
            continue
        try:
            blobs[r.path] = ext4.Ext4File(fs, node)
        except ext4.Ext4Error as e:
            missing.append(f"'{r.cmd} {r.raw}': {e}")
    ch.kernel, ch.kernel_name = blobs.get(gb.kernel.path), gb.kernel.path
    initrds = [blobs.get(r.path) for r in gb.initrds]
    if gb.initrds and all(b is not None for b in initrds):
        ch.initrd = ConcatBlob(initrds)
    else:
        ch.initrd_note = (f"the GRUB entry '{gb.entry_title}' loads no initrd" if not gb.initrds
                          else "an initrd named by grub.cfg is missing")
    base = gb.kernel.path.rsplit("/", 1)[-1]
    if base.startswith("vmlinuz-"):
        ch.uname = base[len("vmlinuz-"):]
    ch.cmdline, ch.cmdline_from = gb.kernel.args, f"{where} {cfg_path} " \
                                                          f"'{gb.entry_title}'"
    if missing:
        ctx.set("boot.chain", "fail", f"{head}: " + "; ".join(missing[:4]))
        return
    names = ", ".join(r.path for r in gb.initrds) or "no initrd"
    ctx.set("boot.chain", "pass", f"{head}; entry '{gb.entry_title}': linux "
                                  f"{gb.kernel.path}, initrd {names}")
