"""Boot an image under QEMU + AAVMF and watch its serial console.

ok only when the expected marker (default spec.BOOT_MARKER) was seen AND QEMU exited by
itself (the guest powered off) before the timeout.  Milestones are seconds since QEMU
started: firmware (first output), loader (the firmware starts the removable-path loader),
stub (the kernel's EFI stub runs), kernel (first kernel log line), init (the kernel runs
/init, or the first ARMVM-REPORT line), marker, poweroff (QEMU exited by itself).
"""
from __future__ import annotations

import codecs
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import spec
from .errors import ArmvmError, NotAnImageError
from .qemu import arch_of, find_firmware, find_qemu, kvm_usable, probe_image, qemu_command

MAX_CONSOLE_CHARS = 16 * 1024 * 1024   # keep at most this much console text
MAX_LINE_CHARS = 64 * 1024             # an unterminated line is cut here
PANIC_GRACE = 2.0                      # seconds to collect the rest of a panic message
KILL_GRACE = 5.0

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), other ESC sequences (ESC [intermediates]
# final: charset selection, ESC 7/8, ESC c ...), single-byte C1 CSI, then stray controls.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]"
                   r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[ -/]*[0-~]|\x1b")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# (event, regex) in the order the milestones normally appear; each is recorded once.
MILESTONES = (
    ("loader", re.compile(r"BdsDxe: starting |Welcome to GRUB|Booting `|systemd-stub")),
    ("stub", re.compile(r"EFI stub: ")),
    ("kernel", re.compile(r"^\[\s*\d+\.\d+\]|Booting Linux on physical CPU")),
    ("init", re.compile(r"Run \S+ as init process|^" + re.escape(spec.REPORT_PREFIX))),
)
# Lines after which the boot cannot succeed: stop at once instead of waiting for the timeout.
FATAL = (
    (re.compile(r"Kernel panic - not syncing"), "kernel panic"),
    (re.compile(r"Press any key to continue\.\.\."), "GRUB failed to boot the entry"),
    (re.compile(r"UEFI Interactive Shell|No bootable option or device was found"
                r"|>>Start (PXE|HTTP Boot) over"),
     "the firmware found no bootable loader on the disk"),
    (re.compile(r"Synchronous Exception at|X64 Exception Type"), "firmware exception"),
)
# Prompts that wait before ending their line (GRUB's key prompt, the firmware's network
# boot with its ~60 s DHCP timeout): also matched on the unfinished line.
FATAL_UNFINISHED = (FATAL[1], FATAL[2])
# GRUB's "error: ..." and the firmware's failed boot options explain a later failure.
_ERROR = re.compile(r"^error: |BdsDxe: failed to (load|start) ")


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences and control characters (keeps \\n and \\t)."""
    return _CONTROL.sub("", _ANSI.sub("", text.replace("\r\n", "\n")))


@dataclass(frozen=True)
class BootResult:
    ok: bool
    reason: str
    console: str                       # ANSI-stripped full text
    events: dict = field(default_factory=dict)   # milestone -> seconds since QEMU start
    command: list = field(default_factory=list)
    exit_status: int | None = None
    timed_out: bool = False


class ConsoleWatcher:
    """Feed raw serial bytes; collects clean lines, milestones, the marker and failures."""

    def __init__(self, expect: str, *, on_line: Callable[[str], None] | None = None,
                 firmware: bool = True):
        try:
            self.expect = re.compile(expect)
        except re.error as e:
            raise ArmvmError(f"expected-output regex {expect!r} is not valid: {e}") from None
        self.on_line = on_line
        self.firmware = firmware
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""
        self.lines: list[str] = []
        self.size = 0
        self.truncated = False
        self.events: dict[str, float] = {}
        self.failure: str | None = None
        self.failure_at: float | None = None
        self.errors: list[str] = []       # loader/firmware error lines, first few
        self.rebooted = False
        self.powered_off = False

    def feed(self, data: bytes, t: float) -> None:
        if data and self.firmware and "firmware" not in self.events:
            self.events["firmware"] = t
        self.pending += self.decoder.decode(data)
        while True:
            nl = self.pending.find("\n")
            if nl < 0:
                if len(self.pending) > MAX_LINE_CHARS:
                    self._raw_line(self.pending[:MAX_LINE_CHARS], t)
                    self.pending = self.pending[MAX_LINE_CHARS:]
                    continue
                if self.pending and self.failure is None:
                    # firmware prompts (">>Start PXE over IPv4.") end their line only
                    # after a long network timeout: look at the unfinished line too
                    self._check_fatal(strip_ansi(self.pending.replace("\r", "")), t,
                                      FATAL_UNFINISHED)
                return
            self._raw_line(self.pending[:nl], t)
            self.pending = self.pending[nl + 1:]

    def finish(self, t: float) -> None:
        self.pending += self.decoder.decode(b"", final=True)
        if self.pending:
            self._raw_line(self.pending, t)
            self.pending = ""

    def _raw_line(self, raw: str, t: float) -> None:
        # a bare CR returns to column 0: treat each CR-separated piece as its own line
        pieces = raw.rstrip("\r").split("\r")
        for piece in pieces:
            clean = strip_ansi(piece)
            if clean or len(pieces) == 1:
                self._line(clean, t)

    def _line(self, line: str, t: float) -> None:
        if self.size + len(line) < MAX_CONSOLE_CHARS:
            self.lines.append(line)
            self.size += len(line) + 1
        else:
            self.truncated = True
        if self.on_line is not None:
            self.on_line(line)
        for i, (name, rx) in enumerate(MILESTONES):
            # a milestone seen only after a later one (a quiet kernel's first line is its
            # power-off) says nothing about when it happened: leave it out
            later = any(n in self.events for n, _ in MILESTONES[i + 1:])
            if name not in self.events and not later and rx.search(line):
                self.events[name] = t
        if "marker" not in self.events and self.expect.search(line):
            self.events["marker"] = t
        if "reboot: Restarting system" in line:
            self.rebooted = True
        if "reboot: Power down" in line:
            self.powered_off = True
        if _ERROR.search(line) and len(self.errors) < 5:
            self.errors.append(line.strip())
        self._check_fatal(line, t)

    def _check_fatal(self, line: str, t: float, patterns=None) -> None:
        if self.failure is None:
            for rx, what in (FATAL if patterns is None else patterns):
                if rx.search(line):
                    detail = self.errors[0] if self.errors else line.strip()
                    self.failure, self.failure_at = f"{what}: {detail}", t
                    break

    def text(self) -> str:
        out = "\n".join(self.lines) + ("\n" if self.lines else "")
        return out + ("[console truncated]\n" if self.truncated else "")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop QEMU and anything it started: its own process group (start_new_session)."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(cmd: list[str], watcher: ConsoleWatcher, timeout: float):
    """Run QEMU with piped output; returns (exit status or None, timed_out, killed_for,
    stderr text)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    sel = selectors.DefaultSelector()
    err = bytearray()
    timed_out, killed_for = False, None
    try:
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic() - start
            if now >= timeout:
                timed_out = True
                break
            if watcher.failure_at is not None and (
                    now - watcher.failure_at >= PANIC_GRACE
                    or any("end Kernel panic" in ln for ln in watcher.lines[-3:])):
                killed_for = watcher.failure
                break
            for key, _ in sel.select(timeout=min(0.25, timeout - now)):
                try:
                    data = os.read(key.fileobj.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    watcher.feed(data, time.monotonic() - start)
                elif len(err) < 65536:
                    err += data
        if not timed_out and killed_for is None:
            try:
                proc.wait(timeout=max(timeout - (time.monotonic() - start), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
        end = time.monotonic() - start
        watcher.finish(end)
        if timed_out or killed_for is not None:
            _kill_group(proc)
            return None, timed_out, killed_for, err.decode("utf-8", "replace")
        watcher.events["poweroff"] = end
        return proc.returncode, False, None, err.decode("utf-8", "replace")
    finally:
        sel.close()
        _kill_group(proc)
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def _verdict(w: ConsoleWatcher, status, timed_out, killed_for, stderr: str,
             timeout: float) -> tuple[bool, str]:
    seen = "marker seen" if "marker" in w.events else "marker not seen"
    last = max(w.events, key=w.events.get) if w.events else "no console output"
    if killed_for is not None:
        return False, killed_for
    if w.failure is not None and "marker" not in w.events:
        return False, w.failure          # e.g. a panic right before QEMU exited by itself
    if timed_out:
        return False, f"timed out after {timeout:g} s ({seen}; last milestone: {last})"
    if status != 0:
        tail = " ".join(stderr.strip().splitlines()[-3:])
        return False, f"QEMU exited with status {status} ({seen}){': ' + tail if tail else ''}"
    if w.rebooted:
        return False, f"the guest rebooted instead of powering off ({seen})"
    if "marker" not in w.events:
        return False, f"QEMU exited (guest powered off) but the marker was not seen " \
                      f"(last milestone: {last})"
    return True, f"marker seen, guest powered off after {w.events['poweroff']:.1f} s"


def boot_image(image: Path | None, *, arch: str = "auto", timeout: float = 120,
               gic: int | None = None, acpi: bool | None = None, expect: str | None = None,
               interactive: bool = False, qemu_args: Sequence[str] = (),
               extra_virtio: bool = False, direct: tuple | None = None,
               sector_size: int | None = None, memory_mb: int = 1024, cpus: int = 2,
               on_line: Callable[[str], None] | None = None,
               kvm: bool | None = None) -> BootResult:
    """Boot `image` (attached read-only-safe with snapshot=on) and report what happened.

    arch 'auto' reads the loader name (BOOTAA64.EFI / BOOTARM.EFI) from the image's ESP;
    sector_size None uses the image's own (4096 when its GPT is at byte 4096).
    direct=(kernel, initrd, cmdline) boots the kernel without firmware.  kvm None means
    detect.  Interactive: serial on this terminal, no timeout or marker (Ctrl-A x quits).
    """
    if not timeout > 0:
        raise ArmvmError(f"boot timeout {timeout!r} must be a positive number of seconds")
    info = None
    if image is not None and (arch == "auto" or sector_size is None):
        try:
            info = probe_image(Path(image))
        except NotAnImageError:
            if arch == "auto":
                raise
    if arch == "auto":
        if info is None or info.arch is None:
            raise ArmvmError(f"{image}: cannot tell the architecture (no \\EFI\\BOOT\\"
                             f"BOOTAA64.EFI or BOOTARM.EFI on its ESP); give the architecture")
        arch = info.arch
    a = arch_of(arch)
    if sector_size is None and info is not None:
        sector_size = info.sector_size
    use_kvm = kvm_usable(a) if kvm is None else kvm
    exe = find_qemu(a)
    with tempfile.TemporaryDirectory(prefix="armvm-boot-") as tmp:
        firmware = None
        if direct is None:
            code, vars_template = find_firmware(a)
            vars_copy = Path(tmp) / "VARS.fd"
            shutil.copyfile(vars_template, vars_copy)      # fresh, empty variable store
            firmware = (code, vars_copy)
        cmd = qemu_command(arch=a, qemu=exe, image=image, firmware=firmware, gic=gic,
                           acpi=acpi, kvm=use_kvm, extra_virtio=extra_virtio, direct=direct,
                           sector_size=sector_size, memory_mb=memory_mb, cpus=cpus,
                           qemu_args=qemu_args)
        if interactive:
            status = subprocess.call(cmd)
            return BootResult(status == 0, f"interactive session ended (QEMU status {status})",
                              "", {}, cmd, status, False)
        watcher = ConsoleWatcher(expect if expect is not None else re.escape(spec.BOOT_MARKER),
                                 on_line=on_line, firmware=direct is None)
        status, timed_out, killed_for, stderr = _run(cmd, watcher, float(timeout))
    ok, reason = _verdict(watcher, status, timed_out, killed_for, stderr, float(timeout))
    return BootResult(ok, reason, watcher.text(), dict(watcher.events), cmd, status, timed_out)
