"""How `armvm-build boot` shows a boot to a person: live progress on a terminal (rich), what
the guest reported as a compact table, and what to look at when it failed.

Printing only; builder.run.boot does the booting. Progress goes to stderr and only when stderr
is a terminal and neither -q nor --json was given; the rest is plain text for stdout.
"""
from __future__ import annotations

import sys
from typing import Optional

from builder import spec
from builder.verify.runtime import VIRTIO_NAMES

MILESTONES = {
    "firmware": "firmware running (AAVMF)",
    "loader": "firmware started the removable-path loader",
    "stub": "kernel EFI stub running",
    "kernel": "kernel booting",
    # the kernel's "Run /init" line; a `quiet` kernel does not print it, and the mark is then
    # /init's first runtime report line, after its module loading (later in the boot)
    "init": "init running (or, under a quiet kernel, its first report line)",
    "marker": "marker seen",
    "login": "login prompt",
    "powerdown": "power button pressed (QMP system_powerdown)",
    "powerdown-again": "power button pressed again (no power-off yet)",
    "grub-shell": "GRUB stopped at its grub> shell",
    "poweroff": "guest powered off",
}
# What the guest is busy with after each milestone (the live line's text).
NEXT = {None: "starting QEMU", "firmware": "firmware", "loader": "loader", "stub": "kernel",
        "kernel": "kernel", "init": "init", "marker": "powering off", "login": "login prompt",
        "powerdown": "waiting for power-off",
        "powerdown-again": "waiting for power-off", "grub-shell": "GRUB shell",
        "poweroff": "done"}
LAST_LINES = 20


class BootProgress:
    """Live progress for one or more boots: a spinner line per boot with its stage and
    elapsed time (refreshed several times a second, so the terminal never goes quiet),
    and one printed line per milestone and per runtime report line."""

    def __init__(self, enabled: Optional[bool] = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.progress = None

    def __enter__(self) -> "BootProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                     TimeElapsedColumn(), console=Console(stderr=True),
                                     transient=True, refresh_per_second=8)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def boot(self, label: str) -> "BootTask":
        return BootTask(self, label)

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)


class BootTask:
    """Callbacks for builder.run.boot.boot_image(on_event=..., on_line=...)."""

    def __init__(self, owner: BootProgress, label: str):
        self.owner, self.label = owner, label
        self.task = None
        if owner.progress is not None:
            self.task = owner.progress.add_task(f"{label}: reading the image", total=None)

    def _describe(self, stage: str) -> None:
        if self.task is not None:
            self.owner.progress.update(self.task, description=f"{self.label}: {stage}")

    def started(self) -> None:
        self._describe(NEXT[None])

    def on_event(self, name: str, t: float) -> None:
        self.owner.print(f"{self.label} {t:7.2f}s  {MILESTONES.get(name, name)}")
        self._describe(NEXT.get(name, name))

    def on_line(self, line: str) -> None:
        s = line.strip()
        if spec.REPORT_PREFIX in s or s == spec.BOOT_MARKER or "[FAILED]" in s:
            self.owner.print(f"{self.label}   {s}")

    def done(self) -> None:
        if self.task is not None:
            self.owner.progress.remove_task(self.task)


def facts_rows(facts) -> list:
    """(what, value) rows of what the guest reported (builder.verify.runtime facts)."""
    def yn(v, yes, no):
        return "?" if v is None else (yes if v else no)
    rows = [("kernel", f"{facts.kernel or '?'} ({facts.machine or '?'})"),
            ("EFI", yn(facts.efi, "yes (/sys/firmware/efi)", "no")),
            ("ACPI/DT", "ACPI" if facts.acpi else "device tree"
             if facts.devicetree or (facts.fdt and facts.acpi is False) else "?"),
            ("GIC", f"v{facts.gic}" if facts.gic in ("2", "3") else (facts.gic or "?")),
            ("RTC", ", ".join(facts.rtc) or "none"),
            ("console", ", ".join(f"{n} ({d})" for n, d in facts.consoles) or "?")]
    if facts.secureboot is not None or facts.lockdown is not None:
        rows.append(("secure boot", f"{yn(facts.secureboot, 'on', 'off')} (SecureBoot variable), "
                                    f"kernel lockdown {facts.lockdown or '?'}"))
    for d in facts.virtio:
        rows.append(("virtio", f"{d.name}: {VIRTIO_NAMES.get(d.id, d.id)} over {d.transport}, "
                               f"driver {d.driver}"))
    if not facts.virtio:
        rows.append(("virtio", "none"))
    return rows


def table(rows) -> str:
    w = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def success_text(res, facts) -> str:
    lines = [f"booted: {res.reason}"]
    if facts.report_lines:
        lines += ["what the guest saw:", table(facts_rows(facts))]
    lines.append("milestones: " + ", ".join(
        f"{k} {v:.1f}s" for k, v in sorted(res.events.items(), key=lambda kv: kv[1])))
    lines += _log_lines(res)
    return "\n".join(lines)


def failure_text(res, *, until_login: bool = False) -> str:
    lines = [f"boot FAILED: {res.reason}"]
    if res.events:
        lines.append("milestones: " + ", ".join(
            f"{k} {v:.1f}s" for k, v in sorted(res.events.items(), key=lambda kv: kv[1])))
    if until_login:
        lines.append("waited for: a login prompt (regex /" + _login_rx() + "/), then the "
                     "guest's power-off")
    else:
        lines.append(f"waited for: /{res.expect}/")
    if res.failed_units:
        lines.append("failed units: " + ", ".join(res.failed_units))
    last = res.last_lines(LAST_LINES)
    lines.append(f"last {len(last)} console lines:" if last else "no console output")
    lines += [f"  | {ln}" for ln in last]
    lines += _log_lines(res)
    return "\n".join(lines)


def _login_rx() -> str:
    from builder.console import LOGIN_PROMPT
    return LOGIN_PROMPT.pattern


def _log_lines(res) -> list:
    if res.log:
        return [f"console log: {res.log}"]
    if res.log_error:
        return [res.log_error]
    return []
