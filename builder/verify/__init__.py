"""``armvm-build verify``: check any raw disk image against the ARM VM System Specification.

The readers here (GPT, FAT, ext2/3/4, PE/COFF, kernel headers, cpio, grub.cfg, module
.modinfo) are written independently of the image writers: they share only builder/spec.py
constants, so a writer bug cannot hide behind a reader with the same bug.

    report = verify_image("disk.raw")               # arch from the loader, vmspec-2.0
    print(report.format_table()); sys.exit(report.exit_code(strict=False))
"""
from __future__ import annotations

import os
import stat

from builder import spec
from builder.errors import EXIT_USAGE, ArmvmError, NotAnImageError
from builder.verify import checks_image, checks_os, checks_root, checks_sb
from builder.verify.blob import FileBlob, read_option_file
from builder.verify.modinfo import parse_config
from builder.verify.container import NotRawDiskError, check_raw
from builder.verify.catalog import (CHECKS, DEFAULT_PROFILE, PROFILES, STATIC_IDS,
                                    check_profile, make_check)
from builder.verify.report import Check, Report
from builder.verify.runtime import (RuntimeFacts, merge_runtime, parse_runtime_report,
                                     runtime_checks)

__all__ = ["verify_image", "NotRawDiskError", "Check", "Report", "PROFILES", "CHECKS", "STATIC_IDS",
           "RuntimeFacts", "parse_runtime_report", "runtime_checks", "merge_runtime"]

ARCH_CHOICES = ("auto",) + tuple(spec.ARCHES)
# Tests set this to surface verifier bugs as exceptions instead of failed checks.
_RAISE_INTERNAL = False


def _guard(ctx, ids, fn) -> None:
    try:
        fn()
    except NotAnImageError:
        raise
    except Exception as e:  # a verifier bug must not become a traceback for the user
        if _RAISE_INTERNAL:
            raise
        for cid in ids:
            ctx.set(cid, "fail", f"verifier error ({type(e).__name__}: {e}); the image could "
                                 "not be judged, please report this")


def _open_image(path: str):
    try:
        st = os.stat(path)
    except OSError as e:
        raise NotAnImageError(f"{path}: cannot read it ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise NotAnImageError(f"{path}: is a directory, not a disk image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise NotAnImageError(f"{path}: not a regular file or block device")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise NotAnImageError(f"{path}: cannot open it ({e.strerror or e})") from None
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        f.close()
        raise NotAnImageError(f"{path}: empty file, not a disk image")
    return f, size


MAX_KERNEL_CONFIG = 16 << 20


def read_kernel_config(path) -> tuple:
    """(CONFIG_X -> value, name) from a kernel .config file (bounded; exit 2 when unreadable,
    3 when it is not a kernel config)."""
    name = os.fspath(path)
    raw = read_option_file(name, "--kernel-config", MAX_KERNEL_CONFIG, "a kernel config")
    cfg = parse_config(raw.decode("utf-8", "replace"))
    if not cfg:
        raise NotAnImageError(f"--kernel-config {name}: no CONFIG_<NAME>=<value> lines; "
                              "not a kernel config (want e.g. /boot/config-<version>)")
    return cfg, name


def verify_image(path, *, arch: str = "auto", profile: str = DEFAULT_PROFILE,
                 kernel_config=None, secure_boot: bool = False, db=(),
                 vars_file=None) -> Report:
    """Run every static check on the image at ``path``.

    Raises NotAnImageError (exit 3) when ``path`` is not a readable disk image at all
    (NotRawDiskError when it is a qcow2/VMDK/VHD/VHDX/VDI container or compressed), and
    ArmvmError (exit 2) for an unknown ``arch`` or ``profile``. ``kernel_config``: a kernel
    .config file that judges the os.* checks when the initramfs has no copy of its own.
    ``secure_boot``: require signatures (sb.*; they run anyway when the loader is signed);
    ``db``: trusted certificate files, ``vars_file``: a UEFI VARS file whose db is trusted
    (either implies ``secure_boot``; default trust: Microsoft's UEFI CAs, for shim).
    """
    check_profile(profile)
    if arch not in ARCH_CHOICES:
        raise ArmvmError(f"verify: arch '{arch}' is not known (allowed: "
                         f"{', '.join(ARCH_CHOICES)})", exit_code=EXIT_USAGE)
    name = os.fspath(path)
    given = read_kernel_config(kernel_config) if kernel_config is not None else None
    trust = checks_sb.load_trust(db, vars_file)
    secure_boot = secure_boot or trust.given
    f, size = _open_image(name)
    with f:
        blob = FileBlob(f, 0, None, size)
        check_raw(blob, name)
        ctx = checks_image.Context(profile, blob)
        ctx.kernel_config = given
        checks_image.run(ctx, arch, _guard)
        _guard(ctx, checks_os.OS_IDS, lambda: checks_os.run(ctx))
        checks_root.run(ctx, _guard)
        _guard(ctx, checks_sb.SB_IDS, lambda: checks_sb.run(ctx, trust, secure_boot))
        release = None
        try:
            release = checks_root.kernel_version(ctx)[0]
        except Exception:       # a verifier bug here must not hide the report
            if _RAISE_INTERNAL:
                raise
    ids = STATIC_IDS + (checks_sb.SB_IDS if "sb.signed" in ctx.results else ())
    checks = tuple(make_check(cid, profile, *ctx.results.get(cid, ("skip", "not evaluated")))
                   for cid in ids)
    return Report(name, ctx.arch, profile, checks, release)
