"""boot.chain and boot.kernel: what the loader starts, and whether it is all there.

A loader carrying UKI sections is a UKI (.linux, .initrd, .cmdline must be present). Else
GRUB: its grub.cfg is read where the binary looks for it (``/EFI/BOOT/grub.cfg``, then
Debian's signed GRUB's ``/EFI/debian/grub.cfg``) and every kernel/initrd it names must exist.
A loader that is itself an EFI-stub kernel needs nothing else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from builder import spec
from builder.verify import ext4, grubcfg, kernelimg
from builder.verify.blob import Blob, ConcatBlob
from builder.verify.fat import FatError
from builder.verify.pe import section_blob

# Where grub-install's configuration lives on a Linux file system (root or a /boot partition).
LINUX_GRUB_CFGS = ("/boot/grub/grub.cfg", "/grub/grub.cfg", "/boot/grub2/grub.cfg",
                   "/grub2/grub.cfg")
GRUB_CFGS = (("/" + spec.ESP_GRUB_CFG, "/" + spec.REMOVABLE_DIR), ("/EFI/debian/grub.cfg",
                                                                   "/EFI/debian"))
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
    names = {s.name for s in pe.sections}
    if names & set(spec.UKI_SECTIONS):
        _uki(ctx, pe)
    elif ".sdmagic" in names:
        why = "systemd-boot loader: its /loader entries are not checked by this verifier"
        ctx.set("boot.chain", "skip", why)
        ctx.set("boot.kernel", "skip", why)
        return
    else:
        cfg = None
        for path, prefix in GRUB_CFGS:
            try:
                if vol.lookup(path) is not None:
                    cfg = (path, prefix)
                    break
            except FatError as e:
                ctx.fat_problems.append(str(e))
        if cfg is not None:
            _grub(ctx, *cfg)
        elif kernelimg.describe(ctx.loader)[1] is not None:
            ctx.chain = Chain("stub", ctx.loader, ctx.loader_path,
                              initrd_note="the loader is a kernel started without an initrd")
            ctx.set("boot.chain", "pass", "the loader is an EFI-stub kernel started directly")
        else:
            ctx.set("boot.chain", "fail", "no grub.cfg at " + " or ".join(
                p for p, _ in GRUB_CFGS) + ", and the loader is neither a UKI (.linux "
                "section) nor an EFI-stub kernel")
    ch = ctx.chain
    if ch is None or ch.kernel is None:
        ctx.set("boot.kernel", "skip", "the boot chain names no readable kernel (see "
                                       "boot.chain)")
        return
    ok, detail = kernelimg.judge(ch.kernel, ctx.arch, ch.kind)
    ctx.set("boot.kernel", "pass" if ok else "fail", f"{ch.kernel_name}: {detail}")


def _uki(ctx, pe) -> None:
    missing = [s for s in UKI_REQUIRED if pe.section(s) is None]
    ch = ctx.chain = Chain("uki")
    if pe.section(".linux") is not None:
        ch.kernel, ch.kernel_name = section_blob(ctx.loader, pe.section(".linux")), "UKI .linux"
    if pe.section(".initrd") is not None:
        ch.initrd = section_blob(ctx.loader, pe.section(".initrd"))
    else:
        ch.initrd_note = "the UKI has no .initrd section"
    if pe.section(".uname") is not None:
        raw = section_blob(ctx.loader, pe.section(".uname")).read_at(0, 256)
        ch.uname = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip() or None
    if missing:
        ctx.set("boot.chain", "fail", f"the loader is a UKI without {', '.join(missing)} "
                                      f"section(s)")
        return
    cut = [p for p in pe.problems]
    if cut:
        ctx.set("boot.chain", "fail", "; ".join(cut))
        return
    cmdline = section_blob(ctx.loader, pe.section(".cmdline")).read_at(0, MAX_CMDLINE)
    cmdline = cmdline.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    ch.cmdline, ch.cmdline_from = cmdline, "UKI .cmdline"
    osrel = "" if pe.section(".osrel") else "; no .osrel section"
    ctx.set("boot.chain", "pass", f"UKI: .linux {ch.kernel.size} bytes, .initrd "
                                  f"{ch.initrd.size} bytes, .cmdline '{cmdline[:80]}'{osrel}")


def _open(ctx, path: str):
    """(blob, error) for a file on the ESP."""
    try:
        e = ctx.vol.lookup(path)
        if e is None:
            return None, f"{path} does not exist on the ESP"
        return ctx.vol.open(e, path), ""
    except FatError as err:
        ctx.fat_problems.append(str(err))
        return None, f"{path} cannot be read: {err}"


def _grub(ctx, cfg_path: str, prefix: str) -> None:
    vol = ctx.vol
    blob, err = _open(ctx, cfg_path)
    text = "" if blob is None else blob.read_at(0, MAX_CFG_FILE).decode("utf-8", "replace")

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
        ctx.set("boot.chain", "fail", f"{cfg_path}: " + "; ".join(missing[:4]))
    elif gb.kernel is None and gb.elsewhere and _grub_on_linux_fs(ctx, cfg_path, gb):
        pass
    elif gb.kernel is None and gb.elsewhere:
        ctx.set("boot.chain", "skip", f"{cfg_path} continues with "
                                      f"{'; '.join(gb.elsewhere[:2])}, outside the ESP; "
                                      "not checked")
    elif gb.kernel is None:
        ctx.set("boot.chain", "fail", f"{cfg_path}: the default entry '{gb.entry_title}' has "
                                      f"no linux command" + (f" ({probs})" if probs else ""))
    elif not gb.kernel.on_esp:
        ctx.set("boot.chain", "skip", f"{cfg_path}: the kernel {gb.kernel.raw} is on another "
                                      f"device ({gb.kernel.device}); not checked")
    else:
        names = ", ".join(r.path for r in gb.initrds) or "no initrd"
        note = f"; not checked (other devices): {', '.join(elsewhere[:3])}" if elsewhere else ""
        ctx.set("boot.chain", "pass", f"GRUB reads {cfg_path}; entry '{gb.entry_title}': "
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
