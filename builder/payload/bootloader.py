"""Boot loaders for the removable path: GRUB built with grub-mkimage, Debian's signed GRUB,
and the grub.cfg that tells either of them where the kernel and initramfs are.

Inputs are extracted Debian package trees (directories), outputs are files and text.
The GRUB chain on the ESP (spec.py's published layout):

    \\EFI\\BOOT\\BOOTAA64.EFI or BOOTARM.EFI   the loader
    \\EFI\\BOOT\\grub.cfg                       read by both loaders (see below)
    \\vmlinuz, \\initrd.img                     kernel and initramfs

A grub-mkimage loader built with ``-p /EFI/BOOT`` (a prefix without a device) takes the
device it was loaded from as ``$root`` and reads ``$prefix/grub.cfg``.  Debian's signed
monolithic GRUB has the prefix ``/EFI/debian`` and also no device; it reads
``$cmdpath/grub.cfg`` (the directory it was started from, \\EFI\\BOOT) first.  Both
therefore resolve ``/vmlinuz`` on the ESP they were loaded from, with no ``search``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from builder import spec
from builder.errors import ArmvmError, MissingToolError

# What our grub.cfg needs: GPT + FAT to read the ESP, normal mode to run grub.cfg,
# linux (pulls in boot and fdt) to load the kernel and initramfs, configfile/echo for
# user templates.  grub-mkimage adds each module's dependencies from moddep.lst.
GRUB_MODULES = ("configfile", "echo", "fat", "linux", "normal", "part_gpt")
GRUB_PREFIX = "/" + spec.REMOVABLE_DIR
SIGNED_GRUB_NAMES = {"aarch64": "grubaa64.efi.signed"}
# Debian package names (GRUB's armhf packages are named after GRUB's "arm" target)
GRUB_BIN_PACKAGES = {"aarch64": "grub-efi-arm64-bin", "armv7": "grub-efi-arm-bin"}
GRUB_SIGNED_PACKAGES = {"aarch64": "grub-efi-arm64-signed"}
GRUB_MKIMAGE = "grub-mkimage"
GRUB_TEMPLATE = Path(__file__).with_name("templates") / "grub.cfg.j2"
MAX_GRUB_CFG_BYTES = 64 * 1024       # rendered grub.cfg cap (templates are user input)
MAX_CMDLINE = 2048                   # COMMAND_LINE_SIZE of arm64 (armhf: 1024)
_GRUB_BARE = re.compile(r"^[A-Za-z0-9_.,:=/+@%^-]+$")    # needs no quoting in GRUB
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_ESP_PATH = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True)
class LoaderResult:
    efi: Path                   # goes to \EFI\BOOT\BOOTAA64.EFI or BOOTARM.EFI
    grub_cfg: str | None        # text for /EFI/BOOT/grub.cfg, None for a UKI/prebuilt
    kind: str                   # 'grub' | 'grub-signed' | 'uki' | 'prebuilt'


def _arch(arch) -> spec.Arch:
    """Accept a spec.Arch or its recipe name."""
    if isinstance(arch, spec.Arch):
        return arch
    try:
        return spec.ARCHES[str(arch)]
    except KeyError:
        raise ArmvmError(f"unknown architecture '{arch}' (allowed: "
                         f"{', '.join(sorted(spec.ARCHES))})") from None


def grub_package(arch, *, signed: bool = False) -> str:
    """The Debian package that holds GRUB for `arch` (modules, or the signed image)."""
    a = _arch(arch)
    if signed:
        if a.name not in GRUB_SIGNED_PACKAGES:
            raise ArmvmError(f"Debian ships no signed GRUB for {a.name} ({a.debian_arch}): "
                             f"use the 'grub' loader (grub-mkimage) or a UKI instead")
        return GRUB_SIGNED_PACKAGES[a.name]
    return GRUB_BIN_PACKAGES[a.name]


def grub_modules_dir(grub_tree: Path, arch) -> Path:
    """<tree>/usr/lib/grub/<target>, the directory grub-mkimage's -d wants."""
    a = _arch(arch)
    d = Path(grub_tree) / "usr" / "lib" / "grub" / a.grub_target
    if not (d / "moddep.lst").is_file():
        raise ArmvmError(f"{grub_tree}: no GRUB modules for {a.name} at "
                         f"usr/lib/grub/{a.grub_target}/ (moddep.lst missing); expected an "
                         f"extracted '{grub_package(a)}' package")
    return d


def build_grub(*, arch, grub_tree: Path, out: Path, extra_modules: Sequence[str] = ()) -> Path:
    """Build a removable-path GRUB EFI application with the host's grub-mkimage.

    Deterministic: modules are sorted, and grub-mkimage writes a fixed PE TimeDateStamp
    and no paths, so equal inputs give identical bytes (checked by the tests).
    """
    a = _arch(arch)
    moddir = grub_modules_dir(grub_tree, a)
    tool = shutil.which(GRUB_MKIMAGE)
    if tool is None:
        raise MissingToolError(GRUB_MKIMAGE, "grub-common", "to build the GRUB loader")
    modules = set(GRUB_MODULES)
    for m in extra_modules:
        if not _MODULE_NAME.match(m):
            raise ArmvmError(f"GRUB module name '{m}' is not valid (letters, digits, '_')")
        if not (moddir / f"{m}.mod").is_file():
            raise ArmvmError(f"GRUB module '{m}' is not in {moddir}")
        modules.add(m)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [tool, "-O", a.grub_target, "-d", str(moddir), "-p", GRUB_PREFIX,
           "-o", str(out), *sorted(modules)]
    env = dict(os.environ, LC_ALL="C.UTF-8")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
        raise ArmvmError(f"grub-mkimage failed (exit {proc.returncode}): {msg}\n"
                         f"command: {' '.join(cmd)}")
    if not out.is_file() or out.stat().st_size == 0:
        raise ArmvmError(f"grub-mkimage wrote no output at {out}")
    return out


def find_signed_grub(tree: Path, arch) -> Path:
    """Debian's signed monolithic GRUB inside an extracted grub-efi-<arch>-signed tree."""
    a = _arch(arch)
    package = grub_package(a, signed=True)
    name = SIGNED_GRUB_NAMES[a.name]
    tree = Path(tree)
    preferred = tree / "usr" / "lib" / "grub" / f"{a.grub_target}-signed" / name
    if preferred.is_file():
        return preferred
    found = sorted(p for p in _walk_files(tree, limit=100_000) if p.name == name)
    if not found:
        raise ArmvmError(f"{tree}: '{name}' not found; expected an extracted "
                         f"'{package}' package")
    return found[0]


# Debian's shim chain (AArch64 only: Debian builds no shim for armhf)
SHIM_PACKAGES = {"aarch64": "shim-signed"}
SHIM_HELPERS_PACKAGES = {"aarch64": "shim-helpers-arm64-signed"}     # mmaa64 (and fbaa64)
SHIM_NAMES = {"aarch64": "shimaa64.efi.signed"}
MOKMANAGER_NAMES = {"aarch64": "mmaa64.efi.signed"}
# Beside shim at \EFI\BOOT: the second stage shim starts and MokManager. Never the fallback
# (fbaa64.efi): it writes boot entries and resets the machine.
SHIM_SECOND_STAGE = {"aarch64": "grubaa64.efi"}
SHIM_MOKMANAGER = {"aarch64": "mmaa64.efi"}


def shim_packages(arch) -> tuple:
    """(shim package, helpers package) for `arch`; a clear error where Debian has none."""
    a = _arch(arch)
    if a.name not in SHIM_PACKAGES:
        raise ArmvmError(f"Debian ships no shim for {a.name} ({a.debian_arch}): Secure Boot with "
                         f"Debian's signed chain is AArch64 only; use a UKI signed with your own "
                         f"key (bootloader: {{type: uki, sign: ...}}) or drop shim")
    return SHIM_PACKAGES[a.name], SHIM_HELPERS_PACKAGES[a.name]


def find_in_tree(tree: Path, name: str, package: str) -> Path:
    """The file `name` inside an extracted package tree (preferring usr/lib/shim/)."""
    tree = Path(tree)
    preferred = tree / "usr" / "lib" / "shim" / name
    if preferred.is_file():
        return preferred
    found = sorted(p for p in _walk_files(tree, limit=100_000) if p.name == name)
    if not found:
        raise ArmvmError(f"{tree}: '{name}' not found; expected an extracted '{package}' package")
    return found[0]


def _walk_files(root: Path, *, limit: int):
    """Files under root (no symlinks followed), at most `limit` entries visited."""
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            seen += 1
            if seen > limit:
                raise ArmvmError(f"{root}: more than {limit} files; not a package tree?")
            yield Path(dirpath) / f


# --- grub.cfg ----------------------------------------------------------------------------

# Variables a grub.cfg template sees (README "Template variables" is generated from this).
GRUB_TEMPLATE_VARS = {
    "kernel_path": "Absolute path of the kernel on the ESP, e.g. /vmlinuz.",
    "initrd_path": "Absolute path of the initramfs on the ESP, e.g. /initrd.img; empty without one.",
    "cmdline": "The kernel command line as written in the recipe (kernel.cmdline).",
    "cmdline_grub": "The same, each word quoted for GRUB's parser (use this after `linux`).",
    "timeout": "GRUB menu timeout in seconds (0).",
}
GRUB_TEMPLATE_FILTERS = {"grub_quote": "Quote one word for GRUB (single quotes stop $ expansion)."}


def grub_quote(word: str) -> str:
    """Quote one word for GRUB's shell-like parser (single quotes stop $ expansion)."""
    if word and _GRUB_BARE.match(word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


def _grub_cmdline(cmdline: str) -> str:
    # Each whitespace-separated word passes to the kernel literally; GRUB joins the words
    # with one space, so the kernel sees the command line exactly (runs of blanks -> one).
    return " ".join(grub_quote(w) for w in cmdline.split())


def _check_esp_path(what: str, value: str) -> str:
    v = value.lstrip("/")
    if not _ESP_PATH.match(v) or any(part in (".", "..") for part in v.split("/")):
        raise ArmvmError(f"{what} '{value}' is not a plain path on the ESP "
                         f"(allowed: letters, digits, '.', '_', '-', '/')")
    return v


def render_grub_cfg(*, kernel_path: str = spec.ESP_KERNEL_PATH,
                    initrd_path: str | None = spec.ESP_INITRD_PATH, cmdline: str,
                    template: str | None = None, timeout: int = 0,
                    template_file=None) -> str:
    """Render grub.cfg (default: templates/grub.cfg.j2) in a bounded Jinja2 sandbox.

    Template variables: GRUB_TEMPLATE_VARS; filter grub_quote. Rendering is bounded in
    memory and time (builder.recipe.templating); any template error is a RecipeError naming
    `template_file` and the line.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in cmdline):
        raise ArmvmError("kernel command line contains a control character (newline, tab, "
                         "...); only printable text is allowed")
    bad = sorted(set(cmdline) & set("\"'\\"))
    if bad:
        raise ArmvmError(f"kernel command line contains {' '.join(bad)}: GRUB's 'linux' "
                         f"command escapes quotes and backslashes with a backslash, so the "
                         f"kernel would see different text; drop them or use the 'uki' loader")
    if len(cmdline.encode()) >= MAX_CMDLINE:
        raise ArmvmError(f"kernel command line is {len(cmdline.encode())} bytes; the "
                         f"kernel accepts at most {MAX_CMDLINE - 1}")
    if not isinstance(timeout, int) or not 0 <= timeout <= 3600:
        raise ArmvmError(f"GRUB timeout {timeout!r} is not allowed (allowed: 0..3600 seconds)")
    kernel = "/" + _check_esp_path("kernel path", kernel_path)
    initrd = "/" + _check_esp_path("initrd path", initrd_path) if initrd_path else ""
    source = template if template is not None else GRUB_TEMPLATE.read_text(encoding="utf-8")
    from builder.recipe import templating
    tspec = templating.TemplateSpec(what="grub.cfg template", max_bytes=MAX_GRUB_CFG_BYTES,
                                    filters={"grub_quote": grub_quote},
                                    allowed_names=sorted(GRUB_TEMPLATE_VARS),
                                    field="bootloader.config" if template is not None else None)
    values = dict(kernel_path=kernel, initrd_path=initrd, cmdline=cmdline,
                  cmdline_grub=_grub_cmdline(cmdline), timeout=timeout)
    assert set(values) == set(GRUB_TEMPLATE_VARS)
    file = template_file or (GRUB_TEMPLATE if template is None else "(grub.cfg template)")
    return templating.render(source, values, tspec, file=file).text
