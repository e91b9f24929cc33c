"""QEMU boot runner: console cleaning, milestones, verdicts, the QEMU command line, the
image probe; the runner itself against a fake QEMU (real boots are end-to-end tests)."""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder import console, spec
from builder.run import qemu
from builder.run.boot import boot_image
from builder.console import ConsoleWatcher, strip_ansi
from builder.errors import ArmvmError, MissingToolError, NotAnImageError
from builder.run.qemu import find_firmware, kvm_usable, probe_image, qemu_command

sys.path.insert(0, str(Path(__file__).parent))
import imagegen as g  # noqa: E402

# --- ANSI stripping -------------------------------------------------------------------------


@pytest.mark.parametrize("raw, clean", [
    ("\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading", "BdsDxe: loading"),
    ("\x1b[1;31mred\x1b[0m and \x1b[?25lhidden cursor\x1b[?25h", "red and hidden cursor"),
    ("\x1b]0;window title\x07text", "text"),
    ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),
    ("\x1b(Bplain\x1b7\x1b8\x1bc", "plain"),
    ("a\x00b\x08c\x7fd\te\r\nf", "abcd\te\nf"),
    ("\x9b1;2Hc1", "c1"),
    ("no escapes at all [    0.000000] ok", "no escapes at all [    0.000000] ok"),
])
def test_strip_ansi(raw, clean):
    assert strip_ansi(raw) == clean


# --- console watcher on a recorded-style transcript (trixie arm64, GRUB chain) -------------

TRANSCRIPT = [
    "UEFI firmware (version  built at 13:10:49 on Nov  5 2024)\r\n",
    "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 \"UEFI Misc Device\""
    " from PciRoot(0x0)/Pci(0x2,0x0)\r\n",
    "BdsDxe: starting Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)\r\n",
    "  Booting `Linux'\n",
    "\r\n",
    "\r\rEFI stub: Booting Linux Kernel...\r\n",
    "EFI stub: Exiting boot services...\r\n",
    "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x411fd070]\r\n",
    "[    0.000000] Linux version 6.12.117+deb13-cloud-arm64 \u2026 caf\u00e9\r\n",
    "[    3.397896] Run /init as init process\r\n",
    "ARMVM-REPORT efi=yes acpi=yes\r\n",
    "ARMVM-BOOT-COMPLETE\r\n",
    "[    3.946432] reboot: Power down\r\n",
]
EXPECTED_EVENTS = {"firmware": 0, "loader": 2, "stub": 5, "kernel": 7, "init": 9, "marker": 11}


def feed_lines(w: ConsoleWatcher, lines) -> None:
    for i, line in enumerate(lines):
        w.feed(line.encode(), float(i))
    w.finish(float(len(lines)))


def test_milestones_from_transcript():
    seen = []
    w = ConsoleWatcher(re.escape(spec.BOOT_MARKER), on_line=seen.append)
    feed_lines(w, TRANSCRIPT)
    assert w.events == EXPECTED_EVENTS
    assert w.failure is None and w.powered_off and not w.rebooted
    text = w.text()
    assert "\x1b" not in text and "\r" not in text
    assert "BdsDxe: loading Boot0001" in text.splitlines()[1]
    assert "EFI stub: Booting Linux Kernel..." in text.splitlines()
    assert "caf\u00e9" in text
    assert seen == text.splitlines()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=200))
def test_chunking_does_not_matter(cuts):
    """Bytes split anywhere (inside escapes, CRLF pairs, UTF-8 sequences) give the same
    console text and the same milestone order."""
    data = "".join(TRANSCRIPT).encode()
    w = ConsoleWatcher(re.escape(spec.BOOT_MARKER))
    pos, t = 0, 0.0
    for n in cuts * (len(data) // max(sum(cuts), 1) + 1):
        if pos >= len(data):
            break
        w.feed(data[pos:pos + n], t)
        pos, t = pos + n, t + 1
    w.finish(t)
    ref = ConsoleWatcher(re.escape(spec.BOOT_MARKER))
    feed_lines(ref, TRANSCRIPT)
    assert w.text() == ref.text()
    assert sorted(w.events, key=w.events.get) == sorted(ref.events, key=ref.events.get)


def test_custom_expect_and_bad_regex():
    w = ConsoleWatcher(r"efi=(yes|no) acpi=yes")
    feed_lines(w, TRANSCRIPT)
    assert w.events["marker"] == 10
    with pytest.raises(ArmvmError, match="not valid"):
        ConsoleWatcher("([")


@pytest.mark.parametrize("lines, reason", [
    (["[    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"],
     "kernel panic: [    1.0] Kernel panic - not syncing: VFS: Unable to mount root fs"),
    (["  Booting `Linux'\r\n", "\r\n", "error: file `/vmlinuz' not found.\r\n",
      "error: you need to load the kernel first.\r\n", "\r\n", "Press any key to continue..."],
     "GRUB failed to boot the entry: error: file `/vmlinuz' not found."),
    (["BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0): Not Found\r\n",
      "\r\n", ">>Start PXE over IPv4."],          # no newline until a 60 s DHCP timeout
     "the firmware found no bootable loader on the disk: BdsDxe: failed to load Boot0001"),
])
def test_fatal_lines(lines, reason):
    w = ConsoleWatcher("MARKER")
    for i, line in enumerate(lines):
        w.feed(line.encode(), float(i))
    assert w.failure is not None and w.failure.startswith(reason)
    assert w.failure_at == len(lines) - 1


def test_panic_text_is_whole_line_even_when_split():
    w = ConsoleWatcher("MARKER")
    w.feed(b"[    3.9] Kernel panic - not syncing: VFS:", 1.0)
    assert w.failure is None                       # not judged on half a line
    w.feed(b" Unable to mount root fs\r\n", 2.0)
    assert w.failure.endswith("VFS: Unable to mount root fs") and w.failure_at == 2.0


def test_long_unterminated_output_is_bounded():
    w = ConsoleWatcher("MARKER")
    w.feed(b"x" * (console.MAX_LINE_CHARS * 3 + 5), 0.0)
    assert all(len(ln) <= console.MAX_LINE_CHARS for ln in w.lines) and len(w.lines) == 3
    assert len(w.pending) == 5


# --- QEMU command line ------------------------------------------------------------------------

FW = (Path("/fw/CODE.fd"), Path("/tmp/x/VARS.fd"))


def cmd(**kw):
    args = dict(arch="aarch64", qemu="qemu-system-aarch64", image=Path("/img/disk.raw"),
                firmware=FW)
    args.update(kw)
    return qemu_command(**args)


def test_default_aarch64_command():
    assert cmd() == [
        "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-m", "1024", "-smp", "2",
        "-nographic", "-no-reboot",
        "-drive", "if=pflash,format=raw,readonly=on,file=/fw/CODE.fd",
        "-drive", "if=pflash,format=raw,file=/tmp/x/VARS.fd",
        "-boot", "menu=on,splash-time=0",
        "-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
        "-drive", "if=none,id=disk0,format=raw,file=/img/disk.raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=disk0"]


def test_armv7_command():
    c = cmd(arch="armv7", qemu="qemu-system-arm", gic=3)
    assert c[:5] == ["qemu-system-arm", "-M", "virt,gic-version=3", "-cpu", "cortex-a15"]


@pytest.mark.parametrize("kw, machine", [
    ({"gic": 2}, "virt,gic-version=2"),
    ({"gic": 3, "acpi": False}, "virt,gic-version=3,acpi=off"),
    ({"acpi": True}, "virt,acpi=on"),
    ({"arch": "armv7", "acpi": False}, "virt,acpi=off"),
])
def test_machine_options(kw, machine):
    assert cmd(**kw)[2] == machine


@pytest.mark.parametrize("kw, msg", [
    ({"gic": 4}, "GIC version 4"),
    ({"arch": "armv7", "acpi": True}, "only available for aarch64"),
    ({"direct": ("k", None, ""), "acpi": True}, "direct kernel boot"),
    ({"sector_size": 1024}, "sector size 1024"),
    ({"memory_mb": 16}, "memory 16 MiB"),
    ({"cpus": 0}, "cpus 0"),
    ({"firmware": None}, "nothing to boot"),
    ({"arch": "mips"}, "unknown architecture"),
])
def test_bad_options(kw, msg):
    with pytest.raises(ArmvmError, match=msg):
        cmd(**kw)


def test_4096_sectors():
    c = cmd(sector_size=4096)
    assert c[-1] == "virtio-blk-pci,drive=disk0,logical_block_size=4096,physical_block_size=4096"
    assert cmd(sector_size=512)[-1] == "virtio-blk-pci,drive=disk0"


def test_extra_virtio():
    c = cmd(extra_virtio=True)
    devices = [c[i + 1].split(",")[0] for i, a in enumerate(c) if a == "-device"]
    assert devices == ["virtio-net-pci", "virtio-rng-pci", "virtio-blk-pci", "virtio-balloon-pci",
                       "virtio-serial-pci", "virtconsole", "virtio-blk-device",
                       "virtio-net-device", "virtio-serial-device", "virtconsole"]
    c = cmd(extra_virtio="mmio")
    devices = [c[i + 1].split(",")[0] for i, a in enumerate(c) if a == "-device"]
    assert devices.count("virtio-balloon-device") == 1 and "virtio-balloon-pci" not in devices
    netdevs = [c[i + 1] for i, a in enumerate(c) if a == "-netdev"]
    assert netdevs and all("restrict=on" in n for n in netdevs)     # no way out of the VM
    # Every boot has exactly one PCI NIC with an empty romfile: no iPXE ROM needed.
    plain = cmd()
    nics = [plain[i + 1] for i, a in enumerate(plain) if a == "-device" and "net" in plain[i + 1]]
    assert nics == ["virtio-net-pci,netdev=net0,romfile="]
    assert all(",romfile=" in c[i + 1] for i, a in enumerate(c)
               if a == "-device" and c[i + 1].startswith("virtio-net-pci"))


def test_direct_boot_has_no_firmware():
    c = cmd(direct=(Path("/k/vmlinuz"), Path("/k/initrd"), "console=ttyAMA0 quiet"),
            firmware=None)
    assert "pflash" not in " ".join(c) and "-boot" not in c     # no firmware, no countdown
    i = c.index("-kernel")
    assert c[i:i + 6] == ["-kernel", "/k/vmlinuz", "-initrd", "/k/initrd", "-append",
                          "console=ttyAMA0 quiet"]
    c = cmd(direct=(Path("/k/vmlinuz"), None, ""), firmware=None, image=None)
    assert "-initrd" not in c and "disk0" not in " ".join(c)


def test_kvm_and_extra_args():
    c = cmd(kvm=True, qemu_args=["-s", "-d", "guest_errors"], memory_mb=2048, cpus=4)
    assert c[1] == "-enable-kvm" and c[c.index("-cpu") + 1] == "host"
    assert c[c.index("-m") + 1] == "2048" and c[c.index("-smp") + 1] == "4"
    assert c[-3:] == ["-s", "-d", "guest_errors"]


def test_commas_in_paths_are_escaped():
    c = cmd(image=Path("/a,b/disk.raw"))
    assert "if=none,id=disk0,format=raw,file=/a,,b/disk.raw,snapshot=on" in c


def test_kvm_detection(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    assert kvm_usable("aarch64", host_machine="aarch64", kvm_path=str(dev))
    assert kvm_usable("armv7", host_machine="armv7l", kvm_path=str(dev))
    assert not kvm_usable("aarch64", host_machine="x86_64", kvm_path=str(dev))
    assert not kvm_usable("armv7", host_machine="aarch64", kvm_path=str(dev))
    assert not kvm_usable("aarch64", host_machine="aarch64", kvm_path=str(tmp_path / "none"))


def test_find_firmware(tmp_path, monkeypatch):
    code, vars_ = tmp_path / "C.fd", tmp_path / "V.fd"
    code.write_bytes(b"c")
    vars_.write_bytes(b"v")
    monkeypatch.setenv("ARMVM_FIRMWARE_CODE", str(code))
    monkeypatch.setenv("ARMVM_FIRMWARE_VARS", str(vars_))
    assert find_firmware("aarch64") == (code, vars_)
    monkeypatch.setenv("ARMVM_FIRMWARE_CODE", str(tmp_path / "missing.fd"))
    with pytest.raises(MissingToolError, match="qemu-efi-arm'"):
        find_firmware("armv7")
    with pytest.raises(MissingToolError, match="qemu-efi-aarch64"):
        find_firmware("aarch64")


@pytest.mark.parametrize("arch", sorted(spec.ARCHES))
def test_debian_firmware_is_pflash_sized(arch):
    """QEMU's virt board maps two 64 MiB flash banks: Debian's files fit as they are. A
    missing firmware package is a visible skip naming it, never a silently dropped file."""
    a = spec.ARCHES[arch]
    missing = [p for p in (a.firmware_code, a.firmware_vars) if not Path(p).is_file()]
    if missing:
        pytest.skip(f"{a.firmware_package} not installed ({', '.join(map(str, missing))} "
                    "missing)")
    for p in (a.firmware_code, a.firmware_vars):
        assert Path(p).stat().st_size == 64 * 1024 * 1024, p


def test_missing_qemu(monkeypatch):
    monkeypatch.setattr(qemu.shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError, match="qemu-system-arm"):
        qemu.find_qemu("armv7")


# --- image probe (images made with sfdisk / mkfs.fat / mtools) -----------------------------

needs_tools = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mmd", "mcopy"),
                                 reason="fdisk/dosfstools/mtools missing")


@needs_tools
@pytest.mark.parametrize("spec_kw, expect", [
    (dict(arch="aarch64"), ("aarch64", 512)),
    (dict(arch="armv7"), ("armv7", 512)),
    (dict(arch="armv7", fat_bits=16, esp_mib=20, disk_mib=32), ("armv7", 512)),
    (dict(arch="aarch64", sector_size=4096, esp_mib=260, disk_mib=270), ("aarch64", 4096)),
    (dict(arch="aarch64", esp_files={"EFI/BOOT/BOOTAA64.EFI": None}), (None, 512)),
])
def test_probe_image(tmp_path, spec_kw, expect):
    img = g.build_image(tmp_path, g.ImageSpec(**spec_kw))
    info = probe_image(img)
    assert (info.arch, info.sector_size) == expect


def test_probe_not_an_image(tmp_path):
    f = tmp_path / "x.raw"
    f.write_bytes(bytes(8192))
    with pytest.raises(NotAnImageError, match="no GPT"):
        probe_image(f)
    with pytest.raises(NotAnImageError, match="cannot open"):
        probe_image(tmp_path / "missing.raw")


@needs_tools
def test_auto_arch_needs_a_loader(tmp_path):
    img = g.build_image(tmp_path, g.ImageSpec(esp_files={"EFI/BOOT/BOOTAA64.EFI": None}))
    with pytest.raises(ArmvmError, match="cannot tell the architecture"):
        boot_image(img, arch="auto")


# --- the runner against a fake QEMU --------------------------------------------------------

@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake qemu-system-* that records its arguments, prints `transcript` and then
    behaves per `tail` (shell code)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    code, vars_ = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"code")
    vars_.write_bytes(b"vars-template")
    monkeypatch.setenv("ARMVM_FIRMWARE_CODE", str(code))
    monkeypatch.setenv("ARMVM_FIRMWARE_VARS", str(vars_))
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")

    def make(transcript: str, tail: str = "exit 0"):
        (tmp_path / "transcript").write_bytes(transcript.encode())
        for a in spec.ARCHES.values():
            script = bindir / a.qemu
            script.write_text(
                "#!/bin/sh\n"
                f'printf "%s\\n" "$@" > "{tmp_path}/args"\n'
                # the variable store copy is fresh and writable, the template untouched
                f'for a in "$@"; do case "$a" in *VARS.fd) v="${{a##*file=}}";; esac; done\n'
                f'cat "$v" > "{tmp_path}/vars-seen"; echo x >> "$v"\n'
                f'cat "{tmp_path}/transcript"\n{tail}\n')
            script.chmod(0o755)
        return disk
    make.dir = tmp_path
    return make


def test_runner_ok(fake):
    disk = fake("".join(TRANSCRIPT))
    lines = []
    r = boot_image(disk, arch="aarch64", timeout=60, on_line=lines.append, kvm=False)
    assert r.ok and not r.timed_out and r.exit_status == 0, r.reason
    assert r.reason.startswith("marker seen, guest powered off")
    assert set(r.events) == {"firmware", "loader", "stub", "kernel", "init", "marker",
                             "poweroff"}
    order = sorted(r.events, key=r.events.get)
    assert order.index("loader") < order.index("kernel") < order.index("marker") \
        <= order.index("poweroff")
    assert r.command[0].endswith("qemu-system-aarch64")
    args = (fake.dir / "args").read_text().splitlines()
    assert args == r.command[1:]
    assert (fake.dir / "vars-seen").read_bytes() == b"vars-template"
    assert (fake.dir / "VARS.fd").read_bytes() == b"vars-template"      # template untouched
    assert lines[-1] == "[    3.946432] reboot: Power down"
    assert "ARMVM-BOOT-COMPLETE" in r.console.splitlines()


def test_runner_marker_missing(fake):
    disk = fake("".join(TRANSCRIPT[:-2]) + "[    3.9] reboot: Power down\r\n")
    r = boot_image(disk, arch="aarch64", timeout=60, kvm=False)
    assert not r.ok and r.exit_status == 0 and "marker was not seen" in r.reason
    assert "poweroff" in r.events and "marker" not in r.events


def test_runner_custom_expect(fake):
    disk = fake("".join(TRANSCRIPT))
    assert boot_image(disk, arch="armv7", timeout=60, expect=r"efi=yes", kvm=False).ok
    assert not boot_image(disk, arch="armv7", timeout=60, expect=r"NOT THERE", kvm=False).ok


def test_runner_qemu_error_status(fake):
    disk = fake("", tail="echo 'qemu: could not open disk image' >&2; exit 1")
    r = boot_image(disk, arch="aarch64", timeout=60, kvm=False)
    assert not r.ok and r.exit_status == 1
    assert "status 1" in r.reason and "could not open disk image" in r.reason


def test_runner_reboot_is_not_poweroff(fake):
    disk = fake("".join(TRANSCRIPT[:-1]) + "[    3.9] reboot: Restarting system\r\n")
    r = boot_image(disk, arch="aarch64", timeout=60, kvm=False)
    assert not r.ok and "rebooted instead of powering off" in r.reason


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"   # zombie: dead, not yet reaped
    except FileNotFoundError:
        return True


def test_runner_panic_fails_fast(fake):
    disk = fake("".join(TRANSCRIPT[:8]) +
                "[    3.9] Kernel panic - not syncing: Attempted to kill init!\r\n"
                "[    3.9] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\r\n",
                tail="sleep 300 & wait")
    r = boot_image(disk, arch="aarch64", timeout=300, kvm=False)
    assert not r.ok and not r.timed_out and r.exit_status is None
    assert r.reason == "kernel panic: [    3.9] Kernel panic - not syncing: Attempted to kill init!"
    assert "poweroff" not in r.events


def test_runner_timeout_kills_the_process_group(fake):
    disk = fake("".join(TRANSCRIPT[:4]),
                tail=f'sleep 300 & echo $! > "{fake.dir}/child"; wait')
    r = boot_image(disk, arch="aarch64", timeout=1.5, kvm=False)
    assert r.timed_out and not r.ok and r.exit_status is None
    assert r.reason.startswith("timed out after 1.5 s (marker not seen; last milestone: ")
    assert "poweroff" not in r.events and "loader" in r.events
    child = int((fake.dir / "child").read_text())
    for _ in range(100):                 # the child was signalled; wait for it to be reaped
        if _gone(child):
            break
        time.sleep(0.05)
    assert _gone(child)


def test_runner_direct_boot(fake, tmp_path):
    disk = fake("".join(TRANSCRIPT[7:]))
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"k")
    r = boot_image(disk, arch="aarch64", timeout=60, direct=(k, None, "console=ttyAMA0"),
                   kvm=False)
    assert r.ok, r.reason
    assert "firmware" not in r.events and "-kernel" in r.command
    assert "pflash" not in " ".join(r.command)


def test_runner_interactive(fake):
    disk = fake("", tail="exit 0")
    r = boot_image(disk, arch="aarch64", interactive=True, kvm=False)
    assert r.ok and r.exit_status == 0 and r.events == {}


def test_bad_timeout(fake):
    with pytest.raises(ArmvmError, match="timeout"):
        boot_image(fake(""), arch="aarch64", timeout=0)
