"""Guest OS checks (os.*): drivers the specification asks the image's kernel to have.

A driver counts when its symbol is ``=y`` in the kernel config or it is listed in
modules.builtin, or when its module and the module's whole ``depends=`` closure are in
the initramfs (in armvm-build's layout also listed in etc/armvm/modules.load, dependencies
first; other tools' inits load modules on demand). The kernel config is the initramfs's
copy or the one given with ``--kernel-config``. Without any (and, for modular drivers,
modules.builtin) the checks report skip, never pass.
"""
from __future__ import annotations

from typing import Optional

from builder.verify.cpio import read_initramfs
from builder.verify.modinfo import KernelFacts, is_wanted, kernel_facts

YES, NO, UNKNOWN = "yes", "no", "unknown"
# check id -> groups (all required); a group is a list of alternatives (any one suffices);
# an alternative is (config symbol, module name or None, must be built in).
REQUIREMENTS = {
    "os.console.pl011": [[("SERIAL_AMBA_PL011", "amba_pl011", True)],
                         [("SERIAL_AMBA_PL011_CONSOLE", None, True)]],
    "os.gic": [[("ARM_GIC", None, True)], [("ARM_GIC_V3", None, True)]],
    "os.rtc-efi": [[("RTC_DRV_EFI", "rtc_efi", False)]],
    "os.console.virtio": [[("VIRTIO_CONSOLE", "virtio_console", False)],
                          [("VIRTIO_PCI", "virtio_pci", False),
                           ("VIRTIO_MMIO", "virtio_mmio", False)]],
    "os.console.xen": [[("HVC_XEN", None, True)], [("HVC_XEN_FRONTEND", None, True)]],
    "os.virtio": [[("VIRTIO_PCI", "virtio_pci", False)], [("VIRTIO_MMIO", "virtio_mmio", False)],
                  [("VIRTIO_BLK", "virtio_blk", False)], [("VIRTIO_NET", "virtio_net", False)],
                  [("VIRTIO_CONSOLE", "virtio_console", False)],
                  [("VIRTIO_BALLOON", "virtio_balloon", False)]],
    "os.xen-pv": [[("XEN_BLKDEV_FRONTEND", "xen_blkfront", False)],
                  [("XEN_NETDEV_FRONTEND", "xen_netfront", False)],
                  [("HVC_XEN", None, True)], [("XEN_BALLOON", None, True)]],
    "os.acpi": [[("ACPI", None, True)]],
    "os.psci": [[("ARM_PSCI_FW", None, True)]],
}
OS_IDS = tuple(REQUIREMENTS)


def module_loaded(mod: str, kf: KernelFacts) -> tuple:
    """(ok, why): module + dependency closure in the initramfs and loaded in order."""
    needed, seen, queue, parent = [], set(), [mod], {}
    while queue:
        m = queue.pop(0)
        if m in seen:
            continue
        seen.add(m)
        if kf.builtin is not None and m in kf.builtin:
            continue
        mm = kf.modules.get(m)
        if mm is None:
            via = f" (needed by {parent[m]})" if m in parent else ""
            return False, f"module {m}{via} is not in the initramfs"
        if mm.error:
            return False, mm.error
        needed.append(m)
        for d in mm.depends:
            parent.setdefault(d, m)
            queue.append(d)
    deps = f" with {', '.join(needed[1:])}" if len(needed) > 1 else ""
    if kf.load_order is None and not kf.own_layout:
        return True, f"module {mod}{deps} in the initramfs (its init loads it on demand)"
    if kf.load_order is None:
        return False, f"{mod} is a module but etc/armvm/modules.load is missing"
    pos = {}
    for i, name in enumerate(kf.load_order):
        pos.setdefault(name, i)
    for m in needed:
        if m not in pos:
            return False, f"module {m} is not listed in etc/armvm/modules.load"
    for m in needed:
        for d in kf.modules[m].depends:
            if d in pos and pos[d] > pos[m]:
                return False, f"modules.load loads {d} after {m}, which depends on it"
    return True, f"module {mod}{deps} loaded from the initramfs"


def have(sym: str, mod: Optional[str], builtin_only: bool, kf: KernelFacts) -> tuple:
    val = kf.config.get("CONFIG_" + sym) if kf.config is not None else None
    if val == "y":
        return YES, f"{sym}=y"
    if mod and kf.builtin is not None and mod in kf.builtin:
        return YES, f"{mod} built in (modules.builtin)"
    if builtin_only:
        if kf.config is None:
            return UNKNOWN, f"no kernel config to check {sym}"
        return NO, f"{sym}={val} (must be built in)" if val else f"{sym} is not set"
    if kf.config is not None and val != "m":
        return NO, f"{sym} is not set" if val is None else f"{sym}={val}"
    ok, why = module_loaded(mod, kf)
    if ok:
        return YES, f"{sym}=m, {why}" if val else why
    if kf.config is None and kf.builtin is None:
        return UNKNOWN, "no kernel config or modules.builtin"
    return NO, f"{sym}={val}: {why}" if val else f"{sym}: {why}"


def judge(cid: str, kf: KernelFacts) -> tuple:
    oks, bad, unknown = [], [], []
    for group in REQUIREMENTS[cid]:
        states = [have(s, m, b, kf) for s, m, b in group]
        hit = next((w for st, w in states if st == YES), None)
        if hit:
            oks.append(hit)
        elif any(st == UNKNOWN for st, _ in states):
            unknown.append(" / ".join(w for _, w in states))
        else:
            bad.append(" or ".join(w for _, w in states))
    if bad:
        return "fail", "; ".join(bad)
    if unknown:
        return "skip", "cannot judge: " + "; ".join(unknown) + (
            "; pass --kernel-config FILE" if kf.config is None else "")
    return "pass", ", ".join(oks)


def run(ctx) -> None:
    """Set the os.* results for the initramfs ``ctx.chain`` loads."""
    kf, why = _facts(ctx)
    for cid in OS_IDS:
        if cid == "os.acpi" and ctx.arch == "armv7":
            ctx.set(cid, "pass", "not applicable: ACPI is an AArch64 requirement (AArch32 "
                                 "boots from the device tree)")
        elif kf is None:
            ctx.set(cid, "skip", why)
        elif cid == "os.acpi" and ctx.arch is None:
            ctx.set(cid, "skip", "unknown architecture")
        else:
            res, detail = judge(cid, kf)
            ctx.set(cid, res, detail + (f" [{why}]" if why else ""))


def initramfs(ctx) -> tuple:
    """(Initramfs or None, note): the chain's initramfs, read once per image."""
    if ctx.initrd is None:
        ch = ctx.chain
        if ch is None:
            ctx.initrd = (None, "no boot chain to follow (see boot.chain)")
        elif ch.initrd is None:
            ctx.initrd = (None, f"no initramfs: {ch.initrd_note or 'the boot chain loads none'}")
        else:
            fs = read_initramfs(ch.initrd, is_wanted)
            problem = fs.unsupported or fs.error
            ctx.initrd = (fs, f"initramfs: {problem}" if problem else "")
    return ctx.initrd


def shared_module(ctx, m):
    """One Module object per path, so each module's .modinfo is parsed once per image."""
    return ctx.cache.setdefault(("module", m.path), m)


def facts_for(ctx, version: Optional[str]) -> Optional[KernelFacts]:
    """kernel_facts of the chain's initramfs for ``version``, computed once."""
    key = ("facts", version)
    if key not in ctx.cache:
        fs, _ = initramfs(ctx)
        kf = kernel_facts(fs, version) if fs is not None else None
        if kf is not None:
            kf.modules = {n: shared_module(ctx, m) for n, m in kf.modules.items()}
            if ctx.kernel_config is not None:
                kf.config = ctx.kernel_config[0]
                kf.notes.append(f"kernel config from {ctx.kernel_config[1]}")
        ctx.cache[key] = kf
    return ctx.cache[key]


def _facts(ctx) -> tuple:
    """(KernelFacts or None, note) from the chain's initramfs."""
    fs, note = initramfs(ctx)
    given = ctx.kernel_config
    if fs is None and given is not None:
        kf = KernelFacts(ctx.chain.uname if ctx.chain else "unknown", "", config=given[0])
        return kf, f"kernel config from {given[1]}; {note}"
    if fs is None:
        return None, note
    kf = facts_for(ctx, ctx.chain.uname)
    if kf is None and given is not None:
        kf = KernelFacts(ctx.chain.uname or "unknown", "", config=given[0])
        return kf, f"kernel config from {given[1]}; the initramfs has no module tree"
    if kf is None or (kf.config is None and kf.builtin is None):
        what = "no lib/modules/<version> tree" if kf is None else \
            f"no config or modules.builtin under {kf.version}"
        return None, f"the initramfs has {what} (not built by armvm-build?); pass " \
            "--kernel-config FILE (the kernel's /boot/config-<version>)" + \
            (f"; {note}" if note else "")
    notes = [n for n in kf.notes + [note] if n]
    return kf, "; ".join(notes)
