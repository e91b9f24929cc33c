"""`armvm-build boot IMAGE --xen`: boot an AArch64 image as a Xen DomU under QEMU (TCG) and
report what the DomU saw.

The chain: AAVMF (qemu-system-aarch64 -M virt,virtualization=on,gic-version=3,acpi=off;
Debian's Xen is built without ACPI, and GICv2 hung Dom0's disk I/O) starts Debian's xen.efi
from a helper disk (a GPT disk with one ESP: xen.efi as \\EFI\\BOOT\\BOOTAA64.EFI, its
BOOTAA64.cfg, the Dom0 kernel and initramfs); Xen starts Dom0 (builder.payload.xen_dom0),
whose /init starts the Xen daemons and `xl create`s the DomU: the kernel, initramfs and
command line read from the image's own boot chain (GRUB's grub.cfg or a UKI's sections, by
verify's readers), `console=hvc0`, and the image on a second virtio disk as `xvda`. The
DomU console (xenconsoled --log=guest) is copied to the Dom0 console as "[domu] " lines.

No Debian package ships Xen guest firmware for arm64 (no ArmVirtXen build), so the DomU
starts the image's kernel directly: the image's UEFI path is not exercised under Xen.

Timings (seconds since QEMU started): xen (Xen's banner), dom0 (Dom0's kernel starts),
dom0_ready (Dom0's /init has the Xen daemons up), domu (xl create done), goal (the DomU's
marker or login prompt), end (QEMU exited). Spans: Xen = dom0 - xen, Dom0 = dom0_ready -
dom0, DomU = goal - domu.

CPUs: QEMU gives Xen two CPUs. Dom0 gets one vCPU pinned to the first (Xen's
dom0_max_vcpus=1 dom0_vcpus_pin, in xen_dom0.xen_cfg), the DomU two unpinned vCPUs. Dom0 is
busy, not idle, while the DomU boots (xen-blkback, xenstored, its /init's wait loop), and
under TCG every fork and exec in Dom0 is dear. With the last session's Dom0 (two vCPUs, a
0.5 s wait loop with `date` and `xl domid`) the server image's systemd took 75 s from
switch_root to its generators and its login prompt came 222 s after xl create; with the
cheap loop (templates/xen-dom0-init.sh) and Dom0 still on two vCPUs, 14 s and 167 s (Dom0
142 CPU s); with one Dom0 vCPU as well, 13 s and 101-147 s (Dom0 56-89 CPU s), on the
same 2-core host at load 2-5 (one boot each, so the load differs).

--until-login (a real OS): the goal is the DomU's getty prompt on hvc0; Dom0 then asks the
DomU to power off (`xl shutdown`, the PV control/shutdown request that the DomU's kernel
hands to systemd) and reports how long it took, bounded by POWEROFF_WAIT: the Xen side of
`boot --until-login`'s power-button press. ok needs the root found on xvda, the power-off
and no failed systemd unit.

Network: the DomU has one vif with a fixed MAC and no bridge; Dom0's hotplug script only
tells xen-netback the interface is ready, so the DomU's xen-netfront connects and shows in
its report (nothing carries its traffic).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from builder import spec
from builder.errors import EXIT_USAGE, ArmvmError, NotAnImageError

DOMU_WAIT = 180                 # seconds Dom0 waits for the DomU's marker (the issue: <= 180)
DOMU_LOGIN_WAIT = DOMU_WAIT     # --until-login: the same bound for the DomU's login prompt
DEFAULT_TIMEOUT = 600           # the whole QEMU run: firmware, Xen, Dom0, DomU, power-off
DOMU_NAME = "armvm"
IMAGE_SERIAL = "armvm-image"
DOMU_PREFIX = "[domu] "
XEN_PREFIX = "ARMVM-XEN "
MEMORY_MB = 2048                # Xen + Dom0 (1024M) + the DomU
DOMU_MEMORY_MB = 512
DOMU_VCPUS = 2                  # unpinned: it uses the CPU Dom0 leaves idle
POWEROFF_WAIT = 120             # --until-login: xl shutdown -> the DomU gone (plain boot: 60 s
                                # from the power button; a DomU's systemd is ~2x slower)
VIF_MAC = "00:16:3e:a5:a5:01"   # Xen's OUI; fixed: the same every boot
VIF_SCRIPT = "armvm-vif"        # written by Dom0's /init into /etc/xen/scripts
MAX_DOMU_FILE = 1 << 30
DEFAULT_SUITE = "trixie"
NO_GUEST_UEFI = ("the DomU starts the image's kernel directly (xl kernel=/ramdisk=): no "
                 "Debian package ships Xen guest UEFI firmware for arm64 (edk2 ArmVirtXen), "
                 "so the image's removable-path loader is not exercised under Xen")
CONSOLE_ARG = re.compile(r"^(console|earlycon|earlyprintk)(=|$)")
EVENT_LINES = (("xen", re.compile(r"Xen version [0-9]|\(XEN\) Xen version|Xen [0-9]+\.[0-9]+")),
               ("dom0", re.compile(r"Booting Linux on physical CPU")),
               ("dom0_ready", re.compile(r"ARMVM-XEN dom0-ready")),
               ("domu", re.compile(r"ARMVM-XEN domu-created")),
               ("domu_kernel", re.compile(r"^\[domu\] .*Booting Linux on physical CPU")))


def check_arch(arch: str) -> None:
    """--xen boots AArch64 only: Debian (bookworm, trixie, sid) builds Xen for amd64 and
    arm64; there is no xen-hypervisor-*-armhf and no armhf xen-utils."""
    if arch != "aarch64":
        raise ArmvmError(f"--xen is not supported for {arch} images: Debian has no arm32 Xen "
                         "(trixie builds xen-hypervisor and xen-utils for amd64 and arm64 only); "
                         "boot armv7 images without --xen", exit_code=EXIT_USAGE)


# --- the DomU's boot files, read from the image with verify's readers ------------------

@dataclass(frozen=True)
class DomUFiles:
    kernel: Path
    initrd: Optional[Path]
    cmdline: str              # the image's own command line
    kind: str                 # 'grub' | 'uki' | 'stub'
    source: str               # where the files came from


def domu_files(image: Path, dest: Path) -> DomUFiles:
    """Copy the kernel and initramfs the image's loader would start into `dest`."""
    from builder.verify import _guard, _open_image, checks_image
    from builder.verify.blob import FileBlob
    from builder.verify.container import check_raw
    f, size = _open_image(str(image))
    with f:
        blob = FileBlob(f, 0, None, size)
        check_raw(blob, str(image))
        ctx = checks_image.Context("vmspec-2.0", blob)
        checks_image.run(ctx, "aarch64", _guard)
        ch = ctx.chain
        if ch is None or ch.kernel is None:
            why = ctx.results.get("boot.chain", ("", "no boot chain"))[1]
            raise NotAnImageError(f"{image}: no kernel to give the DomU: {why}")
        out = DomUFiles(dest / "vmlinuz", dest / "initrd" if ch.initrd is not None else None,
                        ch.cmdline or "", ch.kind, ch.cmdline_from or ch.kind)
        for blob_, path in ((ch.kernel, out.kernel), (ch.initrd, out.initrd)):
            if blob_ is None:
                continue
            if blob_.size > MAX_DOMU_FILE:
                raise NotAnImageError(f"{image}: {path.name} is larger than {MAX_DOMU_FILE} bytes")
            with open(path, "wb") as w:
                for chunk in blob_.chunks():
                    w.write(chunk)
    return out


def domu_cmdline(cmdline: str, *, slow_devices: bool = False) -> str:
    """The image's command line with its consoles replaced by the Xen PV console. With
    slow_devices (a real OS under --until-login), systemd waits 300 s instead of 90 s for
    devices such as /dev/hvc0 (serial-getty@hvc0 is skipped when it gives up). Earlier runs
    with overcommitted vCPUs hit the 90 s; with the CPU layout below, systemd-analyze blame
    in the DomU showed dev-xvda2.device 66 s after its job started (load 4.5), so the
    margin is kept for a more loaded host."""
    args = [a for a in cmdline.split() if not CONSOLE_ARG.match(a)]
    extra = ["systemd.default_device_timeout_sec=300"] if slow_devices else []
    return " ".join(args + extra + ["console=hvc0"])


def domu_cfg(*, kernel: str, ramdisk: Optional[str], extra: Optional[str], name: str = DOMU_NAME,
             memory_mb: int = DOMU_MEMORY_MB, vcpus: int = DOMU_VCPUS, disk: str = "@DISK@",
             vuart: bool = False, vif_mac: Optional[str] = VIF_MAC,
             cpus: Optional[str] = None) -> str:
    """The xl domain configuration (xl.cfg(5)); @DISK@ is replaced by Dom0's /init. A guest
    firmware boot: kernel = the firmware, no ramdisk or extra, vuart = an SBSA UART.
    vif_mac: one vif (xen-netfront in the DomU) with Dom0's bridge-less hotplug script;
    None: no network. cpus: the physical CPUs the DomU's vCPUs may run on ("1", "0-1")."""
    def q(v: str) -> str:
        if any(c in v for c in "\"\\\n\r"):
            raise ArmvmError(f"xl configuration: value {v!r} holds a quote, backslash or "
                             "line break")
        return f'"{v}"'
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", name):
        raise ArmvmError(f"xl configuration: domain name {name!r} is not allowed")
    if not 64 <= int(memory_mb) <= 4096 or not 1 <= int(vcpus) <= 8:
        raise ArmvmError("xl configuration: memory 64..4096 MiB and 1..8 vCPUs allowed")
    if vif_mac is not None and not re.fullmatch(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}", vif_mac):
        raise ArmvmError(f"xl configuration: vif MAC {vif_mac!r} is not aa:bb:cc:dd:ee:ff")
    if cpus is not None and not re.fullmatch(r"[0-9]{1,2}(?:-[0-9]{1,2})?", cpus):
        raise ArmvmError(f"xl configuration: cpus {cpus!r} is not N or N-M")
    lines = [f"name = {q(name)}", f"kernel = {q(kernel)}"]
    if ramdisk:
        lines.append(f"ramdisk = {q(ramdisk)}")
    if extra is not None:
        lines.append(f"extra = {q(extra)}")
    if vuart:
        lines.append('vuart = "sbsa_uart"')
    lines += [f"memory = {int(memory_mb)}", f"vcpus = {int(vcpus)}"]
    if cpus is not None:
        lines.append(f"cpus = {q(cpus)}")
    lines += [f"disk = [ {q(f'format=raw, vdev=xvda, access=rw, target={disk}')} ]"]
    if vif_mac is not None:
        lines.append(f"vif = [ {q(f'mac={vif_mac}, script={VIF_SCRIPT}')} ]")
    lines += [
              'on_poweroff = "destroy"', 'on_reboot = "destroy"', 'on_crash = "destroy"']
    return "\n".join(lines) + "\n"


def dom0_settings(*, goal: str, after: str, wait: int = DOMU_WAIT,
                  poweroff_wait: int = POWEROFF_WAIT) -> str:
    """/xen/settings, sourced by Dom0's /init. after: what Dom0 does once the goal is seen:
    wait (a marker image powers itself off) or shutdown (xl shutdown, a real OS)."""
    if not 10 <= int(wait) <= 3600:
        raise ArmvmError(f"DomU wait {wait} s is not allowed (10..3600)")
    if "'" in goal or "\n" in goal or not goal:
        raise ArmvmError(f"DomU goal {goal!r}: one line without quotes")
    if after not in ("wait", "shutdown"):
        raise ArmvmError(f"DomU after-goal action {after!r} (allowed: wait, shutdown)")
    if not 10 <= int(poweroff_wait) <= 600:
        raise ArmvmError(f"DomU power-off wait {poweroff_wait} s is not allowed (10..600)")
    return (f"DOMU_NAME={DOMU_NAME}\nIMAGE_SERIAL={IMAGE_SERIAL}\nDOMU_WAIT={int(wait)}\n"
            f"GOAL='{goal}'\nAFTER={after}\nPOWEROFF_WAIT={int(poweroff_wait)}\n")


def xen_qemu_command(*, qemu: str, firmware: tuple, helper: Path, image: Path,
                     memory_mb: int = MEMORY_MB, cpus: int = 2, qemu_args=()) -> list:
    """QEMU for Xen: EL2 (virtualization=on), GICv3, device tree; the helper disk boots
    first (bootindex 0), the image under test is read-write-safe (snapshot=on)."""
    from builder.run.qemu import _opt, qemu_command
    cmd = qemu_command(arch="aarch64", qemu=qemu, firmware=firmware, gic=3, acpi=False,
                       memory_mb=memory_mb, cpus=cpus)
    i = cmd.index("-M")
    cmd[i + 1] += ",virtualization=on"
    cmd += ["-drive", f"if=none,id=xenboot,format=raw,file={_opt(helper)},snapshot=on",
            "-device", "virtio-blk-pci,drive=xenboot,bootindex=0",
            "-drive", f"if=none,id=image,format=raw,file={_opt(image)},snapshot=on",
            "-device", f"virtio-blk-pci,drive=image,serial={IMAGE_SERIAL}"]
    return cmd + [str(a) for a in qemu_args]


# --- the result ----------------------------------------------------------------------

@dataclass
class XenResult:
    ok: bool
    reason: str
    console: str                          # the whole machine console (Xen, Dom0, [domu])
    domu_console: str                     # the DomU's lines, prefix removed
    events: dict = field(default_factory=dict)
    spans: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)     # Dom0's verdict: result, seconds
    backend: list = field(default_factory=list)  # Dom0's xenstore vbd back-end lines
    command: list = field(default_factory=list)
    kit: dict = field(default_factory=dict)
    domu_source: str = ""
    log: Optional[str] = None
    domu_log: Optional[str] = None
    exit_status: Optional[int] = None
    timed_out: bool = False
    dom0: dict = field(default_factory=dict)    # dom0_report(): power-off, CPU per domain
    failed_units: list = field(default_factory=list)

    def last_lines(self, n: int = 10) -> tuple:
        dom0 = [ln for ln in self.console.splitlines() if not ln.startswith(DOMU_PREFIX)]
        return self.domu_console.splitlines()[-n:], dom0[-n:]

    def to_json(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "events": self.events,
                "spans": self.spans, "dom0_end": self.end, "backend": self.backend,
                "command": self.command, "kit": self.kit, "domu_source": self.domu_source,
                "log": self.log, "domu_log": self.domu_log, "timed_out": self.timed_out,
                "exit_status": self.exit_status, "dom0": self.dom0,
                "failed_units": self.failed_units}


def split_console(text: str) -> tuple[str, dict, list]:
    """(the DomU's console, Dom0's end line as a dict, back-end lines) from the console."""
    domu, end, backend = [], {}, []
    for ln in text.splitlines():
        if ln.startswith(DOMU_PREFIX):
            domu.append(ln[len(DOMU_PREFIX):].rstrip("\r"))
            continue
        at = ln.find(XEN_PREFIX)
        if at < 0:
            continue
        rest = ln[at + len(XEN_PREFIX):].strip()
        if rest.startswith("dom0-end "):
            end = dict(kv.split("=", 1) for kv in rest.split()[1:] if "=" in kv)
            end["text"] = rest[len("dom0-end "):]
        elif rest.startswith("backend "):
            backend.append(rest[len("backend "):])
    return "\n".join(domu) + ("\n" if domu else ""), end, backend


def dom0_report(text: str) -> dict:
    """What Dom0 said besides its end line: {"poweroff": "poweroff"|"still-running",
    "poweroff_seconds": s (after xl shutdown), "cpu": {domain: {"vcpus": n, "seconds": s}},
    "netback": the vif's hotplug-status, "vif_state": its XenbusState (4 = Connected: the
    DomU's xen-netfront connected)} (keys only for what was said)."""
    out: dict = {}
    for ln in text.splitlines():
        at = ln.find(XEN_PREFIX)
        if at < 0 or ln.startswith(DOMU_PREFIX):
            continue
        rest = ln[at + len(XEN_PREFIX):].strip()
        m = re.fullmatch(r"domu-(poweroff|still-running)(?: after ([0-9]+) s)?", rest)
        if m:
            out["poweroff"] = m.group(1)
            if m.group(2) is not None:
                out["poweroff_seconds"] = int(m.group(2))
        m = re.fullmatch(r"cpu (\S+) vcpus=([0-9]+) seconds=([0-9.]+)", rest)
        if m:
            out.setdefault("cpu", {})[m.group(1)] = {"vcpus": int(m.group(2)),
                                                     "seconds": float(m.group(3))}
        m = re.fullmatch(r'backend \S*/backend/vif/\S+/(hotplug-status|state) = "(\S*)"', rest)
        if m:
            out["netback" if m.group(1) == "hotplug-status" else "vif_state"] = m.group(2)
    return out


def spans(events: dict) -> dict:
    def span(a, b):
        return round(events[b] - events[a], 2) if a in events and b in events else None
    return {"firmware": round(events["xen"], 2) if "xen" in events else None,
            "xen": span("xen", "dom0"), "dom0": span("dom0", "dom0_ready"),
            "domu": span("domu", "goal"), "total": round(events["end"], 2)
            if "end" in events else None}


def verdict(*, goal_name: str, events: dict, end: dict, facts, timed_out: bool,
            status: Optional[int], killed_for: Optional[str], until_login: bool,
            domu_console: str, dom0: Optional[dict] = None,
            failed_units: tuple = ()) -> tuple[bool, str]:
    if killed_for:
        return False, killed_for
    if timed_out:
        last = max(events, key=events.get) if events else "no console output"
        return False, f"timed out (last milestone: {last})"
    res = end.get("result")
    if res is None:
        return False, (f"QEMU exited (status {status}) before Dom0 finished "
                       f"(last milestone: {max(events, key=events.get) if events else 'none'})")
    if res != "goal":
        return False, f"Dom0 reports: {end.get('text', res)}" + (
            f"; the DomU did not reach its {goal_name}" if res in ("timeout", "gone") else "")
    if status not in (0, None):
        return False, f"QEMU exited with status {status} after the DomU's {goal_name}"
    if until_login:
        dom0 = dom0 or {}
        m = re.search(r"armvm-init: root (\S+) is (/dev/[^\s;]+)", domu_console)
        if not m or not m.group(2).startswith("/dev/xvda"):
            return False, ("login prompt seen, but the DomU did not report its root on xvda"
                           + (f" (root {m.group(1)} is {m.group(2)})" if m else ""))
        where = f"its root {m.group(1)} was found on {m.group(2)}"
        if dom0.get("poweroff") != "poweroff":
            return False, (f"DomU login prompt on hvc0 ({where}), but the DomU did not power "
                           f"off within {dom0.get('poweroff_seconds', '?')} s of xl shutdown")
        if failed_units:
            return False, f"systemd units failed in the DomU: {', '.join(failed_units)}"
        return True, (f"DomU login prompt on hvc0 after {events['goal'] - events['domu']:.1f} s"
                       if "goal" in events and "domu" in events else "DomU login prompt on hvc0") + \
            (f"; {where}; it powered off {dom0.get('poweroff_seconds', '?')} s after xl shutdown")
    bound = [d for d in facts.xen_devices if d[0].startswith("vbd") and d[1] not in ("", "none")]
    if not bound:
        return False, "the DomU reached its marker but reported no Xen block device bound " \
                      "to xen-blkfront"
    return True, (f"DomU marker seen; {bound[0][0]} bound to {bound[0][1]} (xen-blkfront); "
                  f"hypervisor={facts.hypervisor}")


def kit_info(kit) -> dict:
    import json
    debs = json.loads((kit.dir / "packages.json").read_text())
    return {"xen": kit.xen_version, "kernel": kit.kernel_version,
            "packages": [list(p) for p in kit.packages], "cache": str(kit.dir),
            "debs": len(debs), "debs_bytes": sum(d[3] for d in debs),
            "lock": str(kit.dir / "packages.json")}


def boot_xen(image: Path, *, arch: str = "auto", timeout: float = DEFAULT_TIMEOUT,
             until_login: bool = False, suite: str = DEFAULT_SUITE, domu_wait: Optional[int] = None,
             log_path: Optional[Path] = None, qemu_args=(),
             on_line: Optional[Callable[[str], None]] = None,
             on_event: Optional[Callable[[str, float], None]] = None,
             say: Optional[Callable[[str], None]] = None, archive=None, cache=None,
             cancel=None, guest_firmware: Optional[Path] = None, stager=None) -> XenResult:
    """Boot `image` as a Xen DomU (see the module docstring). guest_firmware: an edk2
    ArmVirtXen XEN_EFI.fd to start as the DomU's kernel instead of the image's kernel (the
    firmware then boots the image's removable-path loader from xvda; experimental). stager:
    what builds the Dom0 kit and the helper disk (builder.payload.xen_boot, passed in by the
    CLI so that run/ imports no writer)."""
    from builder.console import ConsoleWatcher
    from builder.run.boot import _run, boot_tempdir, save_log, signals_as_interrupt
    from builder.run.qemu import find_firmware, find_qemu, probe_image
    from builder.verify.runtime import parse_runtime_report
    if not timeout > 0:
        raise ArmvmError(f"boot timeout {timeout!r} must be a positive number of seconds")
    info = probe_image(Path(image))
    if arch == "auto":
        if info.arch is None:
            raise NotAnImageError(f"{image}: cannot tell the architecture (no \\EFI\\BOOT\\"
                                  "BOOTAA64.EFI or BOOTARM.EFI on its ESP); pass --arch aarch64")
        arch = info.arch
    check_arch(arch)
    if info.arch is not None and info.arch != arch:
        raise NotAnImageError(f"{image}: its loader is for {info.arch}, not {arch}")
    if info.sector_size != 512:
        raise ArmvmError(f"{image}: {info.sector_size}-byte sectors: --xen attaches the image "
                         "to the DomU as xvda with 512-byte sectors only")
    qemu = find_qemu("aarch64")
    code, vars_template = find_firmware("aarch64")
    if stager is None:
        raise ArmvmError("boot --xen needs a stager (builder.payload.xen_boot) to build its Dom0 kit and helper disk")
    kit = stager.kit(suite=suite, archive=archive, cache=cache, say=say)
    goal = "login:" if until_login else spec.BOOT_MARKER
    if domu_wait is None:
        domu_wait = DOMU_LOGIN_WAIT if until_login else DOMU_WAIT
    with signals_as_interrupt(), boot_tempdir() as tmp:
        if guest_firmware is not None:
            fw = Path(guest_firmware)
            if not fw.is_file() or not 0 < fw.stat().st_size <= 64 << 20:
                raise ArmvmError(f"--xen-firmware {fw}: not a file of at most 64 MiB")
            files = DomUFiles(fw, None, "", "firmware", f"guest firmware {fw.name} "
                              "(the image's own loader from xvda)")
            cfg = domu_cfg(kernel="/xen/XEN_EFI.fd", ramdisk=None, extra=None, vuart=True)
        else:
            files = domu_files(Path(image), tmp)
            cfg = domu_cfg(kernel="/xen/vmlinuz",
                           ramdisk="/xen/initrd" if files.initrd is not None else None,
                           extra=domu_cmdline(files.cmdline, slow_devices=until_login))
        helper = stager.boot_disk(tmp, kit, files, cfg,
                                  dom0_settings(goal=goal, after="shutdown" if until_login else "wait",
                                                wait=domu_wait))
        vars_copy = tmp / "VARS.fd"
        shutil.copyfile(vars_template, vars_copy)
        cmd = xen_qemu_command(qemu=qemu, firmware=(code, vars_copy), helper=helper,
                               image=Path(image), qemu_args=qemu_args)
        events: dict = {}
        t0 = time.monotonic()

        def line(ln: str) -> None:
            t = round(time.monotonic() - t0, 2)
            for name, rx in EVENT_LINES:
                if name not in events and rx.search(ln):
                    events[name] = t
                    if on_event:
                        on_event(name, t)
            # a login prompt has no newline: Dom0's "domu-goal" line times it then
            if "goal" not in events and (ln.startswith(DOMU_PREFIX) and goal in ln
                                         or "ARMVM-XEN domu-goal" in ln):
                events["goal"] = t
                if on_event:
                    on_event("goal", t)
            if on_line:
                on_line(ln)
        expect = re.escape(DOMU_PREFIX) + ".*" + re.escape(goal)
        watcher = ConsoleWatcher(expect, on_line=line, firmware=True, login=False)
        try:
            out = _run(cmd, watcher, float(timeout), cancel=cancel)
        finally:
            text = watcher.text()
            domu_text, end, backend = split_console(text)
            saved = domu_saved = None
            if log_path is not None:
                try:
                    save_log(log_path, text)
                    saved = str(log_path)
                    dpath = Path(str(log_path).removesuffix(".log") + ".domu.log")
                    save_log(dpath, domu_text)
                    domu_saved = str(dpath)
                except OSError:
                    pass
    events["end"] = round(time.monotonic() - t0, 2)
    facts = parse_runtime_report(domu_text)
    dom0 = dom0_report(text)
    failed = list(watcher.failed_units)
    ok, reason = verdict(goal_name="login prompt" if until_login else "marker", events=events,
                         end=end, facts=facts, timed_out=out.timed_out, status=out.status,
                         killed_for=out.killed_for, until_login=until_login,
                         domu_console=domu_text, dom0=dom0, failed_units=failed)
    return XenResult(ok, reason, text, domu_text, events, spans(events), end, backend, cmd,
                     kit_info(kit), files.source, saved, domu_saved, out.status, out.timed_out,
                     dom0, failed)
