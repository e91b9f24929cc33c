"""QEMU for ARM VM images: firmware lookup, KVM detection, the command line, and a small
probe that reads an image's sector size and removable-path loader name.

Plain data in, plain data out; boot.py runs the command and reads the console.
"""
from __future__ import annotations

import os
import platform
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from builder import spec
from builder.errors import ArmvmError, MissingToolError, NotAnImageError
from builder.run import qcow2

GIC_VERSIONS = (2, 3)
MMIO_BLK_BYTES = 1024 * 1024          # the blank virtio-mmio disk of extra_virtio
MAX_UNIX_PATH = 107                    # sun_path holds 108 bytes with the final NUL
KVM_HOSTS = {"aarch64": ("aarch64", "arm64"), "armv7": ("armv7l", "armv8l")}


def arch_of(name) -> spec.Arch:
    """A spec.Arch from a recipe name ('aarch64', 'armv7') or Debian name ('arm64', 'armhf')."""
    if isinstance(name, spec.Arch):
        return name
    for a in spec.ARCHES.values():
        if name in (a.name, a.debian_arch):
            return a
    raise ArmvmError(f"unknown architecture '{name}' (allowed: "
                     f"{', '.join(sorted(spec.ARCHES))}, or 'auto')")


def find_firmware(arch) -> tuple[Path, Path]:
    """AAVMF code and variable-store templates; env ARMVM_FIRMWARE_CODE/_VARS override."""
    a = arch_of(arch)
    code = Path(os.environ.get("ARMVM_FIRMWARE_CODE") or a.firmware_code)
    vars_ = Path(os.environ.get("ARMVM_FIRMWARE_VARS") or a.firmware_vars)
    for p in (code, vars_):
        if not p.is_file():
            raise MissingToolError(str(p), a.firmware_package, f"to boot {a.name} images")
    return code, vars_


# --secure-boot: Debian's variable stores with Secure Boot on (package qemu-efi-aarch64)
SECURE_BOOT_VARS = {
    "ms": "/usr/share/AAVMF/AAVMF_VARS.ms.fd",              # Microsoft's 2011 CAs in db
    "snakeoil": "/usr/share/AAVMF/AAVMF_VARS.snakeoil.fd",  # Debian's test key PkKek-1-snakeoil
}
SECURE_BOOT_CHOICES = tuple(SECURE_BOOT_VARS) + ("PATH.fd",)
MAX_VARS_BYTES = 128 * 1024 * 1024


def secure_boot_vars(arch, choice: str) -> Path:
    """The variable-store template for --secure-boot ms|snakeoil|PATH.fd (AArch64 only:
    Debian's AAVMF32 has no Secure Boot)."""
    a = arch_of(arch)
    if a.name != "aarch64":
        raise ArmvmError(f"--secure-boot is for aarch64 images: Debian's {a.name} firmware "
                         f"(AAVMF32) has no Secure Boot", exit_code=2)
    if choice in SECURE_BOOT_VARS:
        path = Path(SECURE_BOOT_VARS[choice])
        if not path.is_file():
            raise MissingToolError(str(path), a.firmware_package, f"for --secure-boot {choice}")
        return path
    path = Path(choice)
    if not path.is_file():
        raise ArmvmError(f"--secure-boot {choice}: no such file (allowed: "
                         f"{', '.join(SECURE_BOOT_CHOICES)}; `armvm-build keys DIR` writes DIR/VARS.fd)",
                         exit_code=2)
    code = Path(os.environ.get("ARMVM_FIRMWARE_CODE") or a.firmware_code)
    size = path.stat().st_size
    want = code.stat().st_size if code.is_file() else None
    if size > MAX_VARS_BYTES or (want is not None and size != want):
        raise NotAnImageError(f"{path}: {size} bytes; a variable store for {code.name} has "
                              f"{want if want is not None else 'at most ' + str(MAX_VARS_BYTES)} "
                              f"bytes (write one with `armvm-build keys DIR`)")
    return path


def find_qemu(arch) -> str:
    a = arch_of(arch)
    exe = shutil.which(a.qemu)
    if exe is None:
        raise MissingToolError(a.qemu, "qemu-system-arm", f"to boot {a.name} images")
    return exe


def kvm_usable(arch, *, host_machine: str | None = None, kvm_path: str = "/dev/kvm") -> bool:
    """KVM only when /dev/kvm is there and the host CPU runs the guest's architecture."""
    a = arch_of(arch)
    machine = (host_machine if host_machine is not None else platform.machine()).lower()
    return machine in KVM_HOSTS[a.name] and os.access(kvm_path, os.R_OK | os.W_OK)


def _opt(value) -> str:
    """Escape a value for QEMU's key=value option syntax (a comma is written twice)."""
    return str(value).replace(",", ",,")


def qemu_command(*, arch, qemu: str, image: Path | None = None,
                 firmware: tuple[Path, Path] | None = None, gic: int | None = None,
                 acpi: bool | None = None, kvm: bool = False, extra_virtio: bool = False,
                 direct: tuple | None = None, sector_size: int | None = None,
                 memory_mb: int = 1024, cpus: int = 2, qmp: Path | None = None,
                 qemu_args: Sequence[str] = (), image_format: str | None = None) -> list[str]:
    """The QEMU command line. `firmware` is (code, writable vars copy); `direct` is
    (kernel, initrd or None, cmdline) for a boot without firmware; `qmp` a Unix socket
    path QEMU listens on for QMP (the power-button request of --until-login);
    `image_format` raw or qcow2 (None: qcow2 when the file has its magic, then checked
    to be self-contained, else raw)."""
    a = arch_of(arch)
    machine = "virt"
    if gic is not None:
        if gic not in GIC_VERSIONS:
            raise ArmvmError(f"GIC version {gic!r} is not supported (allowed: 2, 3)")
        machine += f",gic-version={gic}"
    if acpi is not None:
        if a.name != "aarch64" and acpi:
            raise ArmvmError("ACPI is only available for aarch64 guests; armv7 boots from "
                             "the device tree")
        if direct is not None and acpi:
            raise ArmvmError("ACPI tables come from the firmware: a direct kernel boot "
                             "(no firmware) always uses the device tree")
        if a.name == "aarch64" or not acpi:
            machine += ",acpi=" + ("on" if acpi else "off")
    if not 128 <= int(memory_mb) <= 65536:
        raise ArmvmError(f"memory {memory_mb} MiB is not allowed (allowed: 128..65536)")
    if not 1 <= int(cpus) <= 64:
        raise ArmvmError(f"cpus {cpus} is not allowed (allowed: 1..64)")
    cpu = "host" if kvm else a.qemu_cpu
    cmd = [qemu, "-M", machine, "-cpu", cpu, "-m", str(int(memory_mb)), "-smp", str(int(cpus)),
           "-nographic", "-no-reboot"]
    if kvm:
        cmd.insert(1, "-enable-kvm")
    if direct is not None:
        kernel, initrd, cmdline = direct
        cmd += ["-kernel", str(kernel)]
        if initrd:
            cmd += ["-initrd", str(initrd)]
        cmd += ["-append", str(cmdline or "")]
    elif firmware is not None:
        code, vars_copy = firmware
        cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={_opt(code)}",
                "-drive", f"if=pflash,format=raw,file={_opt(vars_copy)}"]
        # No boot-manager countdown: AAVMF waits PcdPlatformBootTimeOut (5 s, idle, nobody at
        # the keyboard) before it boots, unless QEMU's fw_cfg says menu=on with a splash time,
        # which it rounds up to whole seconds: 0 here. The firmware still boots the image's
        # removable-path loader from an empty variable store, as before; only the wait is gone
        # (measured under TCG: 7.8 -> 3.5 s to GRUB for armv7, 9.0 -> 2.1 s for aarch64).
        # A later `--qemu-arg -boot --qemu-arg splash-time=5000` brings a wait back (QEMU
        # merges -boot options).
        cmd += ["-boot", "menu=on,splash-time=0"]
    else:
        raise ArmvmError("nothing to boot: give firmware or a direct kernel")
    # One NIC always (QEMU would add a default one), isolated, and with an empty romfile:
    # nothing boots from the network, and the iPXE ROM (package ipxe-qemu, only a Recommends
    # of qemu-system-arm) need not exist. The firmware starts faster without it too.
    cmd += ["-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0,romfile="]
    # An entropy source, as real hypervisors give: AAVMF passes its output to the kernel
    # (EFI RNG protocol), so a real OS does not wait ~30 s for entropy at first boot.
    cmd += ["-device", "virtio-rng-pci"]
    if image is not None:
        blk = "virtio-blk-pci,drive=disk0"
        if sector_size not in (None, 512, 4096):
            raise ArmvmError(f"sector size {sector_size} is not supported (allowed: 512, 4096)")
        if sector_size == 4096:
            blk += ",logical_block_size=4096,physical_block_size=4096"
        if image_format is None:
            image_format = "qcow2" if qcow2.is_qcow2(image) else "raw"
        if image_format not in ("raw", "qcow2"):
            raise ArmvmError(f"image format {image_format!r} is not supported (allowed: raw, qcow2)")
        if image_format == "qcow2":
            qcow2.check_qcow2(Path(image))    # no backing or data file: QEMU opens this file only
        cmd += ["-drive", f"if=none,id=disk0,format={image_format},file={_opt(image)},snapshot=on",
                "-device", blk]
    if extra_virtio:
        cmd += [
            # PCI: balloon, console (virtio-serial); the network is net0 above
            *(["-device", "virtio-balloon-pci"] if extra_virtio != "mmio" else []),
            "-device", "virtio-serial-pci", "-chardev", "null,id=vcon0",
            "-device", "virtconsole,chardev=vcon0",
            # MMIO: a blank block device, network, balloon and console (the spec's four)
            "-blockdev", f"driver=null-co,node-name=mmioblk0,size={MMIO_BLK_BYTES},"
                         "read-zeroes=on",
            "-device", "virtio-blk-device,drive=mmioblk0",
            "-netdev", "user,id=net1,restrict=on", "-device", "virtio-net-device,netdev=net1",
            # QEMU allows one balloon: on PCI by default, on MMIO with extra_virtio="mmio"
            *(["-device", "virtio-balloon-device"] if extra_virtio == "mmio" else []),
            "-device", "virtio-serial-device", "-chardev", "null,id=vcon1",
            "-device", "virtconsole,chardev=vcon1",
        ]
    if qmp is not None:
        if len(os.fsencode(str(qmp))) > MAX_UNIX_PATH:
            raise ArmvmError(f"QMP socket path {qmp} is longer than a Unix socket allows "
                             f"({MAX_UNIX_PATH} bytes): set TMPDIR to a shorter folder")
        cmd += ["-qmp", f"unix:{_opt(qmp)},server=on,wait=off"]
    cmd += [str(x) for x in qemu_args]
    return cmd


# --- QMP: ask the guest to power off (the ACPI power button / the GPIO power key) -------

def qmp_powerdown(path: Path, timeout: float = 10.0) -> None:
    """Connect to QEMU's QMP socket and send `system_powerdown`. Uses the QEMU project's
    own client (qemu.qmp); raises ArmvmError with what went wrong."""
    import asyncio
    from qemu.qmp import QMPClient, QMPError

    async def exchange():
        client = QMPClient("armvm-build")
        try:
            await asyncio.wait_for(client.connect(str(path)), timeout)
            await asyncio.wait_for(client.execute("system_powerdown"), timeout)
        finally:
            await client.disconnect()
    try:
        asyncio.run(exchange())
    except asyncio.TimeoutError:
        raise ArmvmError(f"QMP at {path} did not answer within {timeout:.0f} s") from None
    except (QMPError, OSError) as e:
        raise ArmvmError(f"QMP system_powerdown failed: {e}") from None


# --- the child side: QEMU dies with its parent -----------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent_hook():
    """A preexec_fn for subprocess.Popen: the kernel sends QEMU SIGKILL when the process
    that started it dies (Linux PR_SET_PDEATHSIG), whatever killed the parent; if the parent
    is already gone, exit at once. Everything is looked up before the fork."""
    import ctypes
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):        # not Linux: no parent-death signal
        return None
    parent, sigkill = os.getpid(), int(signal.SIGKILL)

    def hook():
        prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(125)
    return hook


# --- image probe: GPT -> ESP -> FAT \EFI\BOOT\BOOT*.EFI ----------------------------------

@dataclass(frozen=True)
class ImageInfo:
    arch: str | None          # spec.ARCHES key of the loader found, None if none
    sector_size: int
    format: str = "raw"       # raw | qcow2 (what QEMU's -drive is told)


def probe_image(path: Path) -> ImageInfo:
    """The GPT's sector size and the removable-path loader's architecture, read with
    verify's independent readers (the runner keeps no GPT/FAT parser of its own)."""
    from builder.verify import verify_image
    from builder.verify.blob import FileBlob
    from builder.verify.container import check_raw
    from builder.verify.gpt import detect_sector_size
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise NotAnImageError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        blob = FileBlob(f)
        fmt = "raw"
        if blob.read_at(0, 4) == qcow2.MAGIC:   # our qcow2 (or qemu-img's): read its guest bytes
            blob, fmt = qcow2.Qcow2Blob(f, str(path)), "qcow2"
        else:
            check_raw(blob, str(path))      # NotRawDiskError: VMDK, xz, zst ... (exit 3)
        ss = detect_sector_size(blob)
        mbr = blob.read_at(510, 2) == b"\x55\xaa"
        if fmt == "qcow2" and ss is not None:
            from builder.verify import _guard, checks_image
            ctx = checks_image.Context("armvm", blob)
            checks_image.run(ctx, "auto", _guard)
            return ImageInfo(ctx.arch, ss, fmt)
    if ss is None and mbr:
        raise NotAnImageError(f"{path}: an MBR disk, not GPT: the ARM VM spec asks for GPT "
                              "and verify will fail it; AAVMF still boots MBR disks, so pass "
                              "--arch aarch64 or --arch armv7 to boot it anyway")
    if ss is None:
        raise NotAnImageError(f"{path}: no GPT header at LBA 1 (512 or 4096-byte sectors) "
                              "and no MBR: not a disk image")
    return ImageInfo(verify_image(path, arch="auto").arch, ss)
