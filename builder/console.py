"""The guest's serial console as text: escape sequences stripped, lines split (a bare CR
starts a new one), milestones timed, the marker regex and prompts matched on unfinished
lines too, failures that end a boot recognised, failed systemd units collected.

Plain text in, facts out; builder.run.boot runs QEMU and feeds the bytes.
"""
from __future__ import annotations

import codecs
import re
from typing import Callable

from builder import spec
from builder.errors import ArmvmError

MAX_CONSOLE_CHARS = 16 * 1024 * 1024   # keep at most this much console text
MAX_LINE_CHARS = 64 * 1024             # an unterminated line is cut here

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
# Secure Boot refusals (checked before the others: GRUB's refusal is followed by its key
# prompt, the firmware's by its next boot option). Shim's dialog ends without a newline
# and waits for a key forever: matched on the unfinished line too.
SECURE_BOOT_FATAL = (
    (re.compile(r"Access Denied"), "Secure Boot: the firmware refused the loader (Access Denied)"),
    (re.compile(r"Security Violation"), "Secure Boot: shim refused the next stage (Security Violation)"),
    (re.compile(r"bad shim signature"), "Secure Boot: GRUB refused the kernel (bad shim signature)"),
)
FATAL = SECURE_BOOT_FATAL + FATAL
# Prompts that wait before ending their line (GRUB's key prompt, the firmware's network
# boot with its ~60 s DHCP timeout, shim's violation dialog): also matched on the
# unfinished line.
FATAL_UNFINISHED = (SECURE_BOOT_FATAL[1], FATAL[4], FATAL[5])
# GRUB's "error: ..." and the firmware's failed boot options explain a later failure.
_ERROR = re.compile(r"^error: |BdsDxe: failed to (load|start) ")
# A getty prompt ("debian login: ") ends without a newline.
LOGIN_PROMPT = re.compile(r"(?:^|\s)login: ?$")
# GRUB without a readable grub.cfg waits at its shell prompt (no newline).
GRUB_SHELL = re.compile(r"^grub> ?$")
GRUB_QUERY = b'echo "ARMVM-GRUB prefix=$prefix cmdpath=$cmdpath"\r'
GRUB_ANSWER = re.compile(r"^ARMVM-GRUB prefix=(\S*) cmdpath=(\S*)")
# systemd's status lines: "[FAILED] Failed to start foo.service - Foo." and the hint
# "See 'systemctl status foo.service' for details."
UNIT_SUFFIXES = (".service", ".socket", ".mount", ".automount", ".swap", ".target",
                 ".device", ".timer", ".path", ".slice", ".scope")
_FAILED = re.compile(r"\[\s*FAILED\s*\]\s+Failed to (?:start|mount|activate|listen on|"
                     r"set up|load|unmount|stop|reload)\s+(.+?)\.?\s*$")
_SYSTEMCTL_HINT = re.compile(r"See '?systemctl status (\S+?)'? for details")
MAX_FAILED_UNITS = 100


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences and control characters (keeps \\n and \\t)."""
    return _CONTROL.sub("", _ANSI.sub("", text.replace("\r\n", "\n")))


class ConsoleWatcher:
    """Feed raw serial bytes; collects clean lines, milestones, the marker, a login prompt,
    failed systemd units and failures. The marker regex and the prompts are also matched
    on the unfinished line (a prompt ends without a newline)."""

    def __init__(self, expect: str, *, on_line: Callable[[str], None] | None = None,
                 on_event: Callable[[str, float], None] | None = None,
                 firmware: bool = True, login: bool = False):
        try:
            self.expect = re.compile(expect)
        except re.error as e:
            raise ArmvmError(f"expected-output regex {expect!r} is not valid: {e}") from None
        self.on_line = on_line
        self.on_event = on_event
        self.firmware = firmware
        self.login = login
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = ""
        self.lines: list[str] = []
        self.size = 0
        self.truncated = False
        self.events: dict[str, float] = {}
        self.failure: str | None = None
        self.failure_at: float | None = None
        self.stop_now = False             # stop without the panic grace (GRUB's shell)
        self.errors: list[str] = []       # loader/firmware error lines, first few
        self.failed_units: list[str] = []
        self.grub_looked: tuple = ()
        self.rebooted = False
        self.powered_off = False

    def event(self, name: str, t: float) -> None:
        if name not in self.events:
            self.events[name] = t
            if self.on_event is not None:
                self.on_event(name, t)

    def feed(self, data: bytes, t: float) -> None:
        if data and self.firmware:
            self.event("firmware", t)
        self.pending += self.decoder.decode(data)
        while True:
            nl = self.pending.find("\n")
            if nl < 0:
                if len(self.pending) > MAX_LINE_CHARS:
                    self._raw_line(self.pending[:MAX_LINE_CHARS], t)
                    self.pending = self.pending[MAX_LINE_CHARS:]
                    continue
                if self.pending and data:
                    self._unfinished(strip_ansi(self.pending.rsplit("\r", 1)[-1]
                                                if self.pending.rstrip("\r") else ""), t)
                return
            self._raw_line(self.pending[:nl], t)
            self.pending = self.pending[nl + 1:]

    def _unfinished(self, line: str, t: float) -> None:
        """Prompts wait before ending their line: the marker regex, a login prompt, GRUB's
        shell and the fatal prompts are judged on the unfinished line too."""
        if not line:
            return
        if "marker" not in self.events and self.expect.search(line):
            self.event("marker", t)
        if self.login and LOGIN_PROMPT.search(line):
            self.event("login", t)
        if self.failure is None and GRUB_SHELL.search(line):
            self.event("grub-shell", t)
        if self.failure is None:
            # firmware prompts (">>Start PXE over IPv4.") end their line only
            # after a long network timeout: look at the unfinished line too
            self._check_fatal(line, t, FATAL_UNFINISHED)

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
                self.event(name, t)
        if "marker" not in self.events and self.expect.search(line):
            self.event("marker", t)
        if self.login and LOGIN_PROMPT.search(line):
            self.event("login", t)
        if "reboot: Restarting system" in line:
            self.rebooted = True
        if "reboot: Power down" in line:
            self.powered_off = True
        if _ERROR.search(line) and len(self.errors) < 5:
            self.errors.append(line.strip())
        self._units(line)
        m = GRUB_ANSWER.search(line)
        if m and self.failure is None:
            self.grub_looked = tuple(dict.fromkeys(
                f"{p}/grub.cfg" for p in (m.group(2), m.group(1)) if p))
            self.failure = ("GRUB found no grub.cfg it could read and stopped at its grub> "
                            "shell; it looked for " + " and ".join(self.grub_looked))
            self.failure_at, self.stop_now = t, True
        self._check_fatal(line, t)

    def _units(self, line: str) -> None:
        found = None
        m = _FAILED.search(line)
        if m:
            what = m.group(1)
            first = what.split(" - ", 1)[0].split()[0] if what.split() else what
            found = first if first.endswith(UNIT_SUFFIXES) else what.split(" - ", 1)[0]
        else:
            m = _SYSTEMCTL_HINT.search(line)
            if m and self.failed_units and not self.failed_units[-1].endswith(UNIT_SUFFIXES):
                # an older systemd names only the description: the hint names the unit
                self.failed_units[-1] = m.group(1)
            elif m:
                found = m.group(1)
        if found and found not in self.failed_units and \
                len(self.failed_units) < MAX_FAILED_UNITS:
            self.failed_units.append(found)

    def _check_fatal(self, line: str, t: float, patterns=None) -> None:
        if self.failure is None:
            for rx, what in (FATAL if patterns is None else patterns):
                if rx.search(line):
                    detail = self.errors[0] if self.errors else line.strip()
                    if what.startswith("Secure Boot:"):
                        detail = line.strip()
                        self.stop_now = True        # nothing follows a refusal: stop at once
                    self.failure, self.failure_at = f"{what}: {detail}", t
                    break

    def text(self) -> str:
        out = "\n".join(self.lines) + ("\n" if self.lines else "")
        if self.pending.strip():          # an unfinished prompt line
            out += strip_ansi(self.pending.replace("\r", "")) + "\n"
        return out + ("[console truncated]\n" if self.truncated else "")
