"""Boot an image under QEMU + AAVMF and watch its serial console.

ok only when the expected marker (default spec.BOOT_MARKER) was seen AND QEMU exited by
itself (the guest powered off) before the timeout.  With until_login, ok when a getty
`login:` prompt came, the guest powered off within POWEROFF_WAIT s of a QMP
`system_powerdown` (the ACPI power button / the GPIO power key) and no systemd unit failed.
Milestones are seconds since QEMU started: firmware (first output), loader (the firmware
starts the removable-path loader), stub (the kernel's EFI stub runs), kernel (first kernel
log line), init (the kernel runs /init, or the first ARMVM-REPORT line), marker, login,
powerdown (the request was sent), poweroff (QEMU exited by itself).

QEMU runs in its own session and dies with this process (PR_SET_PDEATHSIG); SIGTERM and
SIGHUP are handled like Ctrl-C; the per-boot temp folder (variable store copy, QMP socket)
is removed at the end and folders left by a killed earlier run are cleared.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from builder import spec
from builder.console import GRUB_QUERY, ConsoleWatcher
from builder.errors import ArmvmError, NotAnImageError
from builder.verify.container import NotRawDiskError
from builder.run.qemu import (arch_of, die_with_parent_hook, find_firmware, find_qemu, kvm_usable,
                   probe_image, qemu_command, qmp_powerdown, secure_boot_vars)

PANIC_GRACE = 2.0                      # seconds to collect the rest of a panic message
KILL_GRACE = 5.0
POWEROFF_WAIT = 60.0                   # --until-login: seconds from the request to QEMU's exit
POWERDOWN_REPEAT = 15.0                # press the button again this often until the guest powers off:
                                       # a press before logind watches the power key is lost
GRUB_ANSWER_WAIT = 3.0                 # seconds GRUB's shell gets to say where it looked
TMP_PREFIX = "armvm-boot-"
STALE_UNLOCKED_AGE = 3600.0            # a temp folder without a lock file (older versions)


@dataclass(frozen=True)
class BootResult:
    ok: bool
    reason: str
    console: str                       # ANSI-stripped full text
    events: dict = field(default_factory=dict)   # milestone -> seconds since QEMU start
    command: list = field(default_factory=list)
    exit_status: int | None = None
    timed_out: bool = False
    expect: str = ""                   # the regex the console was matched against
    login_seconds: float | None = None       # QEMU start -> login prompt (until_login)
    poweroff_seconds: float | None = None    # login prompt -> QEMU exit (until_login)
    failed_units: tuple = ()           # systemd units seen failing on the console
    grub_looked: tuple = ()            # where GRUB looked for grub.cfg, when it stopped
    log: str | None = None             # where the console log was saved
    log_error: str | None = None       # why it could not be saved
    secure_boot: str | None = None     # --secure-boot: ms, snakeoil or the VARS file booted

    def last_lines(self, n: int = 20) -> list:
        return self.console.splitlines()[-n:]

    def to_json(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "events": self.events,
                "command": self.command, "timed_out": self.timed_out,
                "expect": self.expect, "login_seconds": self.login_seconds,
                "poweroff_seconds": self.poweroff_seconds,
                "failed_units": list(self.failed_units), "log": self.log,
                "secure_boot": self.secure_boot}



# --- the QEMU process: its own session, dies with us, stopped as a group -----------------

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


class _Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C (SIGINT)."""


@contextlib.contextmanager
def signals_as_interrupt():
    """While booting, SIGTERM and SIGHUP raise KeyboardInterrupt like SIGINT does, so every
    `finally` runs: QEMU is stopped, the temp folder removed. Only the main thread can set
    handlers; elsewhere this does nothing (the main thread's handler covers it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Interrupted(f"signal {signum}")
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def boot_tempdir():
    """A private folder for one boot, locked (flock) while the boot runs. Folders of
    earlier runs whose lock is free (their process was killed) are removed first."""
    clear_stale_tempdirs()
    # Made and locked under a name the cleaner ignores, then renamed: a concurrent boot's
    # cleaner never sees it unlocked.
    new = tempfile.mkdtemp(prefix="." + TMP_PREFIX)
    fd = os.open(os.path.join(new, ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    path = new
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        target = os.path.join(os.path.dirname(new), os.path.basename(new)[1:])
        os.rename(new, target)
        path = target
        yield Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def clear_stale_tempdirs(root: str | None = None) -> list[str]:
    """Remove `armvm-boot-*` folders whose lock nobody holds; returns what was removed.
    A folder without a lock file (made by an older version) counts as stale once it is
    older than STALE_UNLOCKED_AGE; folders of other users and symlinks are left alone."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        try:
            if not e.name.startswith(TMP_PREFIX) or not e.is_dir(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
            if st.st_uid != os.getuid():
                continue
            try:
                fd = os.open(os.path.join(e.path, ".lock"),
                             os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                if time.time() - st.st_mtime < STALE_UNLOCKED_AGE:
                    continue
                fd = None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            finally:
                if fd is not None:
                    os.close(fd)
        except OSError:
            continue
    return removed


@dataclass
class _Outcome:
    status: int | None = None
    timed_out: bool = False
    killed_for: str | None = None
    stderr: str = ""
    powerdown_error: str | None = None


def _run(cmd: list[str], watcher: ConsoleWatcher, timeout: float, *,
         qmp: Path | None = None, poweroff_wait: float = POWEROFF_WAIT,
         cancel: threading.Event | None = None) -> _Outcome:
    """Run QEMU with piped console; with `qmp`, send system_powerdown once a login prompt
    was seen and give the guest `poweroff_wait` seconds to power off. `cancel` set (from
    another thread) stops the boot like Ctrl-C does.

    PR_SET_PDEATHSIG fires when the *thread* that started QEMU ends; QEMU never outlives
    this call, so a worker thread running several boots is fine."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=die_with_parent_hook())
    sel = selectors.DefaultSelector()
    err = bytearray()
    out = _Outcome()
    requested = asked_grub = pressed = None
    deadline = timeout
    try:
        for stream in (proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
            sel.register(stream, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic() - start
            if cancel is not None and cancel.is_set():
                raise _Interrupted("cancelled")
            if requested is not None and now - requested >= poweroff_wait:
                out.killed_for = (f"the guest did not power off within {poweroff_wait:g} s of "
                                  "the power-button request (QMP system_powerdown)")
                break
            if now >= deadline:
                out.timed_out = True
                break
            if watcher.failure_at is not None and (
                    watcher.stop_now or now - watcher.failure_at >= PANIC_GRACE
                    or any("end Kernel panic" in ln for ln in watcher.lines[-3:])):
                out.killed_for = watcher.failure
                break
            if "grub-shell" in watcher.events and asked_grub is None:
                asked_grub = now                  # ask GRUB itself where it looked
                _write(proc, GRUB_QUERY)
            if asked_grub is not None and watcher.failure is None and \
                    now - asked_grub >= GRUB_ANSWER_WAIT:
                out.killed_for = ("GRUB found no grub.cfg it could read and stopped at its "
                                  "grub> shell (it did not say where it looked)")
                break
            if requested is not None and now - pressed >= POWERDOWN_REPEAT:
                pressed = now                     # the first press may have come too early
                watcher.event("powerdown-again", now)
                try:
                    qmp_powerdown(qmp, timeout=min(5.0, poweroff_wait))
                except ArmvmError:
                    pass                          # QEMU may be shutting down right now
            if qmp is not None and requested is None and "login" in watcher.events:
                requested = pressed = now
                watcher.event("powerdown", now)
                deadline = max(deadline, now + poweroff_wait)
                try:
                    qmp_powerdown(qmp, timeout=min(10.0, poweroff_wait))
                except ArmvmError as e:
                    out.powerdown_error = str(e)
                    out.killed_for = f"could not press the power button: {e}"
                    break
            for key, _ in sel.select(timeout=min(0.25, max(deadline - now, 0.01))):
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
        if not out.timed_out and out.killed_for is None:
            try:
                proc.wait(timeout=max(deadline - (time.monotonic() - start), 0.1))
            except subprocess.TimeoutExpired:
                out.timed_out = True
        end = time.monotonic() - start
        watcher.finish(end)
        out.stderr = err.decode("utf-8", "replace")
        if out.timed_out or out.killed_for is not None:
            _kill_group(proc)
            return out
        watcher.event("poweroff", end)
        out.status = proc.returncode
        return out
    finally:
        sel.close()
        _kill_group(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


def _write(proc: subprocess.Popen, data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(proc.stdin.fileno(), data)


def _verdict(w: ConsoleWatcher, o: _Outcome, timeout: float,
             until_login: bool) -> tuple[bool, str]:
    goal = "login prompt" if until_login else "marker"
    got = "login" if until_login else "marker"
    seen = f"{goal} seen" if got in w.events else f"{goal} not seen"
    # the latest milestone; of several seen at once, the one recorded last
    last = max(enumerate(w.events), key=lambda ie: (w.events[ie[1]], ie[0]))[1] \
        if w.events else "no console output"
    units = f"; failed units: {', '.join(w.failed_units)}" if w.failed_units else ""
    if o.killed_for is not None:
        return False, o.killed_for + units
    if w.failure is not None and got not in w.events:
        return False, w.failure          # e.g. a panic right before QEMU exited by itself
    if o.timed_out:
        return False, f"timed out after {timeout:g} s ({seen}; last milestone: {last}){units}"
    if o.status != 0:
        tail = " ".join(o.stderr.strip().splitlines()[-3:])
        return False, f"QEMU exited with status {o.status} ({seen}){': ' + tail if tail else ''}"
    if w.rebooted:
        return False, f"the guest rebooted instead of powering off ({seen})"
    if got not in w.events:
        return False, f"QEMU exited (guest powered off) but the {goal} was not seen " \
                      f"(last milestone: {last}){units}"
    if w.failed_units:
        return False, f"systemd units failed: {', '.join(w.failed_units)}"
    if until_login:
        return True, (f"login prompt after {w.events['login']:.1f} s; the guest powered off "
                      f"{w.events['poweroff'] - w.events['login']:.1f} s after the "
                      f"power-button request")
    return True, f"marker seen, guest powered off after {w.events['poweroff']:.1f} s"


def save_log(path: Path, text: str) -> None:
    """Write the console log under a temporary name in the same folder, then rename: a
    symlink at the final name is replaced, never followed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def image_arch(image: Path) -> str | None:
    """The architecture of the image's removable-path loader (None when it has none)."""
    return probe_image(Path(image)).arch


def boot_image(image: Path | None, *, arch: str = "auto", timeout: float = 120,
               gic: int | None = None, acpi: bool | None = None, expect: str | None = None,
               interactive: bool = False, qemu_args: Sequence[str] = (),
               extra_virtio: bool = False, direct: tuple | None = None,
               sector_size: int | None = None, memory_mb: int = 1024, cpus: int = 2,
               on_line: Callable[[str], None] | None = None,
               on_event: Callable[[str, float], None] | None = None,
               kvm: bool | None = None, until_login: bool = False,
               poweroff_wait: float = POWEROFF_WAIT,
               log_path: Path | None = None,
               cancel: threading.Event | None = None,
               secure_boot: str | None = None) -> BootResult:
    """Boot `image` (attached read-only-safe with snapshot=on) and report what happened.

    arch 'auto' reads the loader name (BOOTAA64.EFI / BOOTARM.EFI) from the image's ESP;
    a given arch that contradicts the loader is an error before anything boots.
    sector_size None uses the image's own (4096 when its GPT is at byte 4096).
    direct=(kernel, initrd, cmdline) boots the kernel without firmware.  kvm None means
    detect.  Interactive: serial on this terminal, no timeout or marker (Ctrl-A x quits).
    until_login: wait for a getty prompt instead of the marker, then ask for power-off.
    log_path: the console log is always written there (also on failure or Ctrl-C).
    cancel: an Event another thread sets to stop this boot (raises KeyboardInterrupt).
    secure_boot: ms | snakeoil | a VARS file: boot with that variable store (Secure Boot
    enforced); a refusal (Access Denied, Security Violation, bad shim signature) ends the
    boot at once, and a guest that reports secureboot=0 fails it.
    """
    if not timeout > 0:
        raise ArmvmError(f"boot timeout {timeout!r} must be a positive number of seconds")
    info = None
    if image is not None and (arch == "auto" or sector_size is None):
        try:
            info = probe_image(Path(image))
        except NotRawDiskError:
            raise                   # VMDK, compressed, foreign qcow2 ...: raw or our qcow2 only
        except NotAnImageError:
            if arch == "auto":
                raise
    if arch == "auto":
        if info is None or info.arch is None:
            raise NotAnImageError(f"{image}: cannot tell the architecture (no \\EFI\\BOOT\\"
                                  f"BOOTAA64.EFI or BOOTARM.EFI on its ESP); pass --arch "
                                  f"aarch64 or --arch armv7")
        arch = info.arch
    a = arch_of(arch)
    if info is not None and info.arch is not None and info.arch != a.name and direct is None:
        loader = "\\EFI\\BOOT\\" + spec.ARCHES[info.arch].removable_name
        raise NotAnImageError(f"{image}: its loader is for {info.arch} ({loader}), not "
                              f"{a.name}: drop --arch or give --arch {info.arch}")
    if sector_size is None and info is not None:
        sector_size = info.sector_size
    if secure_boot is not None and direct is not None:
        raise ArmvmError("--secure-boot needs the firmware: it cannot go with a direct kernel boot",
                         exit_code=2)
    sb_vars = secure_boot_vars(a, secure_boot) if secure_boot is not None else None
    use_kvm = kvm_usable(a) if kvm is None else kvm
    exe = find_qemu(a)
    if expect is None:
        expect = re.escape(spec.BOOT_MARKER)
    with signals_as_interrupt(), boot_tempdir() as tmp:
        firmware = None
        if direct is None:
            code, vars_template = find_firmware(a)
            vars_copy = tmp / "VARS.fd"
            # fresh variable store: empty, or Secure Boot's (never written back)
            shutil.copyfile(sb_vars or vars_template, vars_copy)
            firmware = (code, vars_copy)
        qmp = tmp / "qmp.sock" if until_login else None
        cmd = qemu_command(arch=a, qemu=exe, image=image, firmware=firmware, gic=gic,
                           acpi=acpi, kvm=use_kvm, extra_virtio=extra_virtio, direct=direct,
                           sector_size=sector_size, memory_mb=memory_mb, cpus=cpus,
                           qmp=qmp, qemu_args=qemu_args, image_format=info.format if info else None)
        if interactive:
            status = subprocess.call(cmd, preexec_fn=die_with_parent_hook())
            return BootResult(status == 0, f"interactive session ended (QEMU status {status})",
                              "", {}, cmd, status, False)
        watcher = ConsoleWatcher(expect, on_line=on_line, on_event=on_event,
                                 firmware=direct is None, login=until_login)
        log_error = None
        try:
            out = _run(cmd, watcher, float(timeout), qmp=qmp, poweroff_wait=poweroff_wait,
                       cancel=cancel)
        finally:
            if log_path is not None:
                try:
                    save_log(log_path, watcher.text())
                except OSError as e:
                    log_error = f"could not save the console log to {log_path}: {e.strerror}"
    ok, reason = _verdict(watcher, out, float(timeout), until_login)
    if ok and secure_boot is not None:
        from builder.verify.runtime import parse_runtime_report
        sb = parse_runtime_report(watcher.text()).secureboot
        if sb is False:
            ok, reason = False, ("--secure-boot was given but the guest reports secureboot=0 "
                                 "(the firmware did not enforce Secure Boot)")
        elif sb:
            reason += "; Secure Boot enforced (secureboot=1)"
    ev = watcher.events
    login_s = ev.get("login") if until_login else None
    off_s = ev["poweroff"] - ev["login"] if until_login and "poweroff" in ev and \
        "login" in ev else None
    return BootResult(ok, reason, watcher.text(), dict(ev), cmd, out.status, out.timed_out,
                      expect=expect, login_seconds=login_s, poweroff_seconds=off_s,
                      failed_units=tuple(watcher.failed_units),
                      grub_looked=watcher.grub_looked,
                      log=str(log_path) if log_path is not None and log_error is None else None,
                      log_error=log_error, secure_boot=secure_boot)
