"""Runtime checks (rt.*): judged from the guest's serial console after a QEMU boot.

The image's /init prints ``ARMVM-REPORT key=value ...`` lines and a final
``ARMVM-BOOT-COMPLETE`` marker (see builder/spec.py). The console also carries firmware,
GRUB and kernel output with ANSI escape sequences, so escapes are stripped and the prefix
is matched anywhere in a line. ``scenario`` describes the boot that produced the text:
{"gic": 2|3, "acpi": bool, "virtio_transports": ["pci", "mmio"], "reached_marker": bool,
 "powered_off": bool, "loader_seen": bool}; optionally "virtio_devices":
{"pci": [1, 2, 3, 5], "mmio": [1, 2]} (virtio device IDs expected per transport; default
block, network, console and balloon on every transport).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from builder import spec
from builder.verify.catalog import RUNTIME_IDS, XEN_IDS, make_check

ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[()][0-9A-Za-z]"
                     r"|[@-Z\\-_=>78])")
CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
KERNEL_START = ("Booting Linux on physical CPU", "Linux version ")
VIRTIO_NAMES = {1: "net", 2: "block", 3: "console", 4: "entropy", 5: "balloon"}   # virtio device IDs
DEFAULT_VIRTIO_IDS = (1, 2, 3, 5)
PL011_DRIVERS = ("uart-pl011", "sbsa-uart")
MAX_LINE = 1 << 16            # longer lines are cut (a console line is never this long)


@dataclass
class VirtioDevice:
    name: str
    id: Optional[int]
    driver: str
    transport: str


@dataclass
class RuntimeFacts:
    kernel: Optional[str] = None
    machine: Optional[str] = None
    efi: Optional[bool] = None
    acpi: Optional[bool] = None
    fdt: Optional[bool] = None
    devicetree: Optional[bool] = None                # /proc/device-tree: booted from a DT
    rtc: list = field(default_factory=list)
    consoles: list = field(default_factory=list)     # (name, driver)
    gic: Optional[str] = None                        # '2' | '3' | 'unknown'
    virtio: list = field(default_factory=list)       # VirtioDevice
    modules: list = field(default_factory=list)
    secureboot: Optional[bool] = None                # the SecureBoot EFI variable (efivarfs)
    lockdown: Optional[str] = None                   # none | integrity | confidentiality
    marker: bool = False
    kernel_started: bool = False
    report_lines: int = 0
    # Xen (boot --xen): /sys/hypervisor/type, and xenbus devices with their drivers
    hypervisor: Optional[str] = None                 # 'xen' | 'none' | other, None: unreported
    xen_devices: list = field(default_factory=list)  # (name, driver): ('vbd-51712', 'vbd')


def strip_ansi(line: str) -> str:
    return CTRL_RE.sub("", ANSI_RE.sub("", line))


def _flag(v: str) -> Optional[bool]:
    return {"1": True, "0": False}.get(v)


def parse_runtime_report(console_text: str) -> RuntimeFacts:
    facts = RuntimeFacts()
    for raw in console_text.splitlines():
        line = strip_ansi(raw[:MAX_LINE])
        if spec.BOOT_MARKER in line:
            facts.marker = True
        if any(k in line for k in KERNEL_START):
            facts.kernel_started = True
        at = line.find(spec.REPORT_PREFIX)
        if at < 0:
            continue
        facts.report_lines += 1
        kv = {}
        for tok in line[at + len(spec.REPORT_PREFIX):].split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                kv.setdefault(k, v)
        if "hypervisor" in kv:                        # Xen report lines (boot --xen)
            facts.hypervisor = kv["hypervisor"]
            continue
        if "xen-device" in kv:
            facts.xen_devices.append((kv["xen-device"], kv.get("driver", "none")))
            continue
        if "virtio" in kv:
            dev_id = kv.get("id", "")
            facts.virtio.append(VirtioDevice(kv["virtio"], int(dev_id) if re.fullmatch(
                                             "[0-9]{1,5}", dev_id) else None,
                                             kv.get("driver", "none"),
                                             kv.get("transport", "unknown")))
        elif "console" in kv:
            facts.consoles.append((kv["console"], kv.get("driver", "")))
        elif "rtc" in kv:
            facts.rtc.append(kv["rtc"])
        elif "module" in kv:
            facts.modules.append(kv["module"])
        else:
            for k in ("efi", "acpi", "fdt", "devicetree"):
                if k in kv:
                    setattr(facts, k, _flag(kv[k]))
            if "secureboot" in kv:
                facts.secureboot = _flag(kv["secureboot"])
            if "lockdown" in kv and re.fullmatch(r"[a-z]{1,32}", kv["lockdown"]):
                facts.lockdown = kv["lockdown"]
            if "gic" in kv:
                facts.gic = kv["gic"] if kv["gic"] in ("2", "3") else "unknown"
            if "kernel" in kv:
                facts.kernel = kv["kernel"]
            if "machine" in kv:
                facts.machine = kv["machine"]
    return facts


def runtime_checks(facts: RuntimeFacts, *, arch: str, scenario: dict,
                   profile: str = "vmspec-2.0") -> list:
    """rt.* checks for one boot. Checks that do not apply to this boot's scenario (e.g.
    rt.acpi on an acpi=off boot) are 'skip' with a detail starting 'n/a:'. rt.secureboot
    is judged only when scenario["secure_boot"] names the variable store booted."""
    r = {}
    ids = [c for c in RUNTIME_IDS if c != "rt.secureboot" or scenario.get("secure_boot")]
    loader = bool(scenario.get("loader_seen"))
    kernel = facts.kernel_started or facts.kernel is not None
    if loader and kernel:
        r["rt.removable-boot"] = ("pass", "the firmware started the removable-path loader and "
                                          "the kernel ran")
    else:
        r["rt.removable-boot"] = ("fail", "no sign of the " + ("kernel" if loader else
                                  "removable-path loader") + " on the console")
    marker = facts.marker or bool(scenario.get("reached_marker"))
    off = bool(scenario.get("powered_off"))
    mach = f" (kernel {facts.kernel}, machine {facts.machine})" if facts.kernel else ""
    if marker and off:
        r["rt.userspace"] = ("pass", f"init reported {spec.BOOT_MARKER} and the VM powered "
                                     f"off{mach}")
    else:
        r["rt.userspace"] = ("fail", ("no " + spec.BOOT_MARKER + " marker" if not marker else
                                      "the VM did not power off by itself") + mach)
    if facts.report_lines == 0:
        why = f"no {spec.REPORT_PREFIX} lines on the console (see rt.userspace)"
        for cid in ids:
            r.setdefault(cid, ("skip", why))
        if arch == "armv7":
            r["rt.acpi"] = ("pass", "not applicable: AArch32 boots from the device tree")
        return [make_check(cid, profile, *r[cid]) for cid in ids]
    want = scenario.get("gic")
    if want is None:
        r["rt.gic"] = ("skip", "n/a: the scenario names no GIC version")
    else:
        ok = facts.gic == str(want)
        r["rt.gic"] = ("pass" if ok else "fail", f"gic-version={want}: the guest saw "
                       f"GICv{facts.gic}" if facts.gic in ("2", "3") else
                       f"gic-version={want}: the guest's GIC is {facts.gic or 'not reported'}")
    r["rt.efi"] = _bool(facts.efi, "/sys/firmware/efi exists", "/sys/firmware/efi is missing")
    acpi_boot = bool(scenario.get("acpi")) and arch == "aarch64"
    if arch == "armv7":
        r["rt.acpi"] = ("pass", "not applicable: AArch32 boots from the device tree")
    elif not acpi_boot:
        r["rt.acpi"] = ("skip", "n/a: this boot ran without ACPI (acpi=off)")
    else:
        r["rt.acpi"] = _bool(facts.acpi, "booted with ACPI (/sys/firmware/acpi/tables)",
                             "no ACPI tables although the firmware provides them")
    if acpi_boot:
        r["rt.dt"] = ("skip", "n/a: this boot used ACPI")
    elif facts.fdt and not facts.acpi:
        r["rt.dt"] = ("pass", "booted from the device tree (/sys/firmware/fdt, no ACPI)")
    else:
        r["rt.dt"] = ("fail", f"fdt={_show(facts.fdt)} acpi={_show(facts.acpi)}; expected a "
                              "device-tree boot")
    r["rt.rtc"] = ("pass", "rtc-efi registered") if "rtc-efi" in facts.rtc else \
        ("fail", f"rtc-efi not registered (rtc: {', '.join(facts.rtc) or 'none'})")
    amba = [(n, d) for n, d in facts.consoles if n.startswith("ttyAMA")
            and (d in PL011_DRIVERS or "pl011" in d or "sbsa" in d)]
    r["rt.console"] = ("pass", f"{amba[0][0]} driven by {amba[0][1]}") if amba else \
        ("fail", "no ttyAMA console on a PL011/SBSA driver (consoles: " +
         (", ".join(f"{n}:{d}" for n, d in facts.consoles) or "none") + ")")
    r["rt.virtio"] = _virtio(facts, scenario)
    if scenario.get("secure_boot"):
        r["rt.secureboot"] = _secureboot(facts, scenario["secure_boot"])
    return [make_check(cid, profile, *r[cid]) for cid in ids]


def _secureboot(facts: RuntimeFacts, store: str) -> tuple:
    lock = f", kernel lockdown {facts.lockdown}" if facts.lockdown else ""
    if facts.secureboot is None:
        return "fail", f"secure boot with {store}: the guest did not report its SecureBoot variable"
    if not facts.secureboot:
        return "fail", f"secure boot with {store}: the guest reports SecureBoot=0{lock}"
    return "pass", f"SecureBoot=1 with {store}{lock}"


def _show(v: Optional[bool]) -> str:
    return "?" if v is None else str(int(v))


def _bool(v: Optional[bool], yes: str, no: str) -> tuple:
    if v is None:
        return "fail", "not reported by init"
    return ("pass", yes) if v else ("fail", no)


def _virtio(facts: RuntimeFacts, scenario: dict) -> tuple:
    transports = list(scenario.get("virtio_transports") or [])
    if not transports:
        return "skip", "n/a: no virtio transport in this scenario"
    wanted = scenario.get("virtio_devices") or {}
    missing, seen = [], []
    for t in transports:
        for dev_id in wanted.get(t, DEFAULT_VIRTIO_IDS):
            bound = [d for d in facts.virtio if d.transport == t and d.id == dev_id
                     and d.driver not in ("", "none")]
            label = f"{VIRTIO_NAMES.get(dev_id, dev_id)} over virtio-{t}"
            if bound:
                seen.append(f"{label} ({bound[0].driver})")
            else:
                missing.append(label)
    if missing:
        return "fail", "no bound driver for: " + ", ".join(missing)
    return "pass", "bound: " + ", ".join(seen)


# --- Xen (boot --xen) ------------------------------------------------------------------

XEN_BLOCK_DRIVERS = ("vbd",)         # xen-blkfront's xenbus driver name
XEN_NET_DRIVERS = ("vif",)           # xen-netfront's
NO_GUEST_UEFI = ("the DomU started the image's kernel and initramfs directly (xl kernel=/"
                 "ramdisk=): Debian ships no Xen guest UEFI firmware for arm64 (edk2 "
                 "ArmVirtXen), so the image's UEFI loader is not exercised under Xen")


def xen_checks(facts: RuntimeFacts, *, scenario: dict, profile: str = "vmspec-2.0") -> list:
    """rt.xen-* checks from the DomU's report. scenario: {"reached_goal": bool, "ok": bool,
    "reason": str}."""
    r = {}
    hv = facts.hypervisor
    reached = facts.marker or bool(scenario.get("reached_goal"))
    if hv == "xen" and reached:
        how = ("the DomU booted through guest UEFI firmware (efi=1): the image's own loader "
               "ran" if facts.efi else NO_GUEST_UEFI)
        r["rt.xen-boot"] = ("pass", f"hypervisor=xen, {spec.BOOT_MARKER} reached (kernel "
                                    f"{facts.kernel or '?'}); {how}")
    else:
        r["rt.xen-boot"] = ("fail", f"hypervisor={hv or 'not reported'}, marker "
                                    f"{'seen' if reached else 'not seen'}"
                            + (f": {scenario['reason']}" if scenario.get("reason") and
                               not scenario.get("ok") else ""))
    hvc = [(n, d) for n, d in facts.consoles if n.startswith("hvc")]
    if facts.report_lines == 0:
        for cid in ("rt.xen-console", "rt.xen-block", "rt.xen-net"):
            r[cid] = ("fail", f"no {spec.REPORT_PREFIX} lines from the DomU")
    else:
        r["rt.xen-console"] = ("pass", f"{hvc[0][0]} driven by {hvc[0][1]}") \
            if hvc and hvc[0][1] == "xen" else \
            ("fail", "no hvc console on the Xen PV driver (consoles: " +
             (", ".join(f"{n}:{d}" for n, d in facts.consoles) or "none") + ")")
        vbd = [(n, d) for n, d in facts.xen_devices if n.startswith("vbd")]
        bound = [(n, d) for n, d in vbd if d in XEN_BLOCK_DRIVERS]
        r["rt.xen-block"] = ("pass", f"{bound[0][0]} bound to xen-blkfront ({bound[0][1]})") \
            if bound else ("fail", "no Xen block device bound to xen-blkfront (xen devices: " +
                           (", ".join(f"{n}:{d}" for n, d in facts.xen_devices) or "none") + ")")
        net = [(n, d) for n, d in facts.xen_devices if n.startswith("vif") and d in XEN_NET_DRIVERS]
        r["rt.xen-net"] = ("pass", f"{net[0][0]} bound to xen-netfront ({net[0][1]})") \
            if net else ("fail", "no Xen network device bound to xen-netfront (xen devices: " +
                         (", ".join(f"{n}:{d}" for n, d in facts.xen_devices) or "none") + ")")
    return [make_check(cid, profile, *r[cid]) for cid in XEN_IDS]


def merge_runtime(runs: list) -> list:
    """Combine the rt.* checks of several boots: fail/warn wins, then pass, then skip."""
    merged = []
    for cid in RUNTIME_IDS:
        got = [c for checks in runs for c in checks if c.id == cid]
        if not got:
            continue
        rank = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}
        best = min(got, key=lambda c: rank[c.result])
        n = sum(1 for c in got if c.result == best.result)
        merged.append(type(best)(best.id, best.level, best.requirement, best.source,
                                 best.result, f"{best.detail} ({n} of {len(got)} boots)"))
    return merged

