"""Build a Debian root tarball with mmdebstrap (Debian's own tool), foreign architectures
through qemu-user-static + binfmt_misc, and cache it by content.

The cache key is the package set with versions (the named packages resolved by the
recipe's archive), the variant, the architecture, the suite and components and the
timestamp: a warm rebuild never runs (nor needs) mmdebstrap.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from builder.errors import ArmvmError, MissingToolError

VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd",
            "important", "debootstrap", "standard")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_USER = {"arm64": "qemu-aarch64", "armhf": "qemu-arm", "armel": "qemu-arm"}
HOST_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf", "armv8l": "armhf"}
TIMEOUT = 4 * 3600


def host_arch() -> str:
    return HOST_DEBIAN_ARCH.get(platform.machine(), platform.machine())


def mmdebstrap_version() -> str:
    try:
        out = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise MissingToolError("mmdebstrap", "mmdebstrap", "to build a root from Debian packages") from None
    return out.stdout.strip() or "unknown"


def check_tools(debian_arch: str, variant: str) -> None:
    """Everything mmdebstrap needs for this architecture, or a clear error naming the package."""
    mmdebstrap_version()
    if debian_arch == host_arch() or variant == "extract":
        return
    if shutil.which("arch-test") is None:
        raise MissingToolError("arch-test", "arch-test", f"by mmdebstrap for a foreign ({debian_arch}) root")
    emulator = QEMU_USER.get(debian_arch)
    if emulator is None:
        raise ArmvmError(f"no qemu-user emulator known for Debian architecture {debian_arch}")
    if shutil.which(f"{emulator}-static") is None and not Path(f"/usr/bin/{emulator}").exists():
        raise MissingToolError(f"{emulator}-static", "qemu-user-static",
                               f"to run {debian_arch} maintainer scripts")
    ensure_binfmt(emulator)


def ensure_binfmt(emulator: str) -> None:
    """Mount binfmt_misc when it is empty and check the emulator is registered."""
    if not (BINFMT_DIR / "status").exists():
        proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ArmvmError(f"{BINFMT_DIR} is not mounted and mounting it failed "
                             f"({proc.stderr.strip() or 'exit ' + str(proc.returncode)}); as root run "
                             f"`mount -t binfmt_misc binfmt_misc {BINFMT_DIR}` "
                             "(Debian package binfmt-support registers the emulators)")
    if not (BINFMT_DIR / emulator).exists():
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", emulator], capture_output=True)
        if not (BINFMT_DIR / emulator).exists():
            raise ArmvmError(f"binfmt_misc has no {emulator} entry: install the Debian packages "
                             "'qemu-user-static' and 'binfmt-support' (then `update-binfmts --enable "
                             f"{emulator}` as root)")


def cache_key(*, suite: str, components: Sequence[str], arch: str, variant: str,
              packages: Sequence[tuple], timestamp: int) -> str:
    """The root's content key. The mmdebstrap version is recorded, not keyed: a warm build
    must work where mmdebstrap is not even installed (e.g. an offline rebuild)."""
    data = {"suite": suite, "components": list(components), "arch": arch, "variant": variant,
            "packages": sorted([list(p) for p in packages]), "timestamp": timestamp, "format": 1}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_mmdebstrap(*, out: Path, mirror: str, suite: str, components: Sequence[str], arch: str,
                   variant: str, packages: Sequence[str], timestamp: int,
                   keyring: Optional[Path] = None, progress: Optional[Callable[[str], None]] = None,
                   log: Optional[Path] = None, extra: Sequence[str] = ()) -> None:
    """mmdebstrap ... SUITE OUT.tar MIRROR; raises with the tail of its log on failure.
    MIRROR is a URL or a whole sources.list line (`deb [trusted=yes] file:DIR ./`)."""
    cmd = ["mmdebstrap", f"--variant={variant}", f"--architectures={arch}",
           f"--components={','.join(components)}", "--format=tar"]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    if keyring is not None:
        cmd.append(f"--keyring={keyring}")
    if os.geteuid() != 0:
        cmd.append("--mode=unshare")
    cmd += list(extra)
    cmd += [suite, str(out), mirror]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(timestamp), LC_ALL="C.UTF-8")
    tail: list[str] = []
    logf = open(log, "w", buffering=1) if log else None
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
    except FileNotFoundError:
        raise MissingToolError("mmdebstrap", "mmdebstrap", "to build a root from Debian packages") from None
    start = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        if logf:
            logf.write(line)
        tail = (tail + [line.rstrip()])[-20:]
        if progress and line.startswith("I: "):
            progress(line[3:].strip())
        if time.monotonic() - start > TIMEOUT:
            proc.kill()
            raise ArmvmError(f"mmdebstrap did not finish within {TIMEOUT} s")
    rc = proc.wait()
    if logf:
        logf.close()
    if rc != 0:
        errors = [x for x in tail if x.startswith("E:")] or tail[-8:]
        raise ArmvmError(f"mmdebstrap failed (exit {rc}): " + " | ".join(errors))
