"""boot --xen without booting: the Xen and xl configuration, the helper disk (judged by
sfdisk, fsck.fat and mtools), the DomU's files read from an image, the Dom0 console split
and verdict, the Xen report lines and rt.xen-* checks, and bad input."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import spec
from builder.errors import EXIT_USAGE, ArmvmError
from builder.payload import xen_boot, xen_dom0
from builder.run import xen
from builder.verify.runtime import parse_runtime_report, xen_checks
from tests import imagegen

# What the Dom0 console carries for a good run (shortened from a real one).
CONSOLE = """\
(XEN) Xen version 4.20.5-pre (Debian 4.20.4+63-g7abfd2bce2-0+deb13u1)
[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x411fd070]
ARMVM-XEN dom0-init kernel=6.12.117+deb13-cloud-arm64 hypervisor=xen
ARMVM-XEN dom0-ready image=/dev/vdb
ARMVM-XEN domu-created domid=1
[domu] [    0.000000] Booting Linux on physical CPU 0x0000000000 [0x411fd070]\r
[domu] [   45.952307]  xvda: xvda1
[domu] ARMVM-REPORT kernel=6.12.117+deb13-cloud-arm64 machine=aarch64
[domu] ARMVM-REPORT efi=0
[domu] ARMVM-REPORT console=ttyAMA0 driver=none
[domu] ARMVM-REPORT gic=3
[domu] ARMVM-REPORT module=xen_blkfront
[domu] ARMVM-REPORT hypervisor=xen
[domu] ARMVM-REPORT console=hvc0 driver=xen
ARMVM-XEN domu-goal after 48 s
[domu] ARMVM-REPORT xen-device=vbd-51712 driver=vbd
[domu] ARMVM-REPORT xen-device=vif-0 driver=vif
[domu] ARMVM-BOOT-COMPLETE
ARMVM-XEN backend /local/domain/0/backend/vbd/1/51712/params = "/dev/vdb"
ARMVM-XEN backend /local/domain/0/backend/vbd/1/51712/state = "6"
ARMVM-XEN domu-poweroff
ARMVM-XEN dom0-end result=goal
[  251.861819] reboot: Power down
"""


def by_id(checks):
    return {c.id: c for c in checks}


# --- configuration files ------------------------------------------------------------

def test_xen_cfg_is_what_xen_efi_reads():
    cfg = xen_dom0.xen_cfg()
    lines = cfg.splitlines()
    assert lines[:2] == ["[global]", "default=xen"]
    assert "[xen]" in lines
    # one Dom0 vCPU pinned to the first CPU: the DomU's vCPUs are not overcommitted
    assert "options=console=dtuart dom0_mem=1024M,max:1024M dom0_max_vcpus=1 dom0_vcpus_pin" \
        in lines
    assert "kernel=vmlinuz console=hvc0 rdinit=/init" in lines
    assert "ramdisk=dom0.cpio" in lines


@pytest.mark.parametrize("kw", [{"kernel": "a b"}, {"ramdisk": "../x"}, {"dom0_memory": "1G;"},
                                {"xen_options": "x\nkernel=evil"}, {"dom0_vcpus": 0}])
def test_xen_cfg_refuses_bad_values(kw):
    with pytest.raises(ArmvmError):
        xen_dom0.xen_cfg(**kw)


def test_domu_cmdline_swaps_the_console():
    assert xen.domu_cmdline("console=ttyAMA0 panic=-1 root=UUID=abc earlycon") == \
        "panic=-1 root=UUID=abc console=hvc0"
    assert xen.domu_cmdline("") == "console=hvc0"
    assert xen.domu_cmdline("root=UUID=1 console=ttyAMA0", slow_devices=True) == \
        "root=UUID=1 systemd.default_device_timeout_sec=300 console=hvc0"


def test_domu_cfg():
    cfg = xen.domu_cfg(kernel="/xen/vmlinuz", ramdisk="/xen/initrd", extra="panic=-1 console=hvc0")
    assert 'kernel = "/xen/vmlinuz"' in cfg
    assert 'ramdisk = "/xen/initrd"' in cfg
    assert 'extra = "panic=-1 console=hvc0"' in cfg
    assert 'disk = [ "format=raw, vdev=xvda, access=rw, target=@DISK@" ]' in cfg
    assert 'on_poweroff = "destroy"' in cfg
    assert f'vif = [ "mac={xen.VIF_MAC}, script={xen.VIF_SCRIPT}" ]' in cfg
    assert f"vcpus = {xen.DOMU_VCPUS}" in cfg.splitlines() and "\ncpus =" not in cfg
    assert "vif" not in xen.domu_cfg(kernel="/k", ramdisk=None, extra="x", vif_mac=None)
    assert 'cpus = "1"' in xen.domu_cfg(kernel="/k", ramdisk=None, extra="x", cpus="1")
    for kw in ({"vif_mac": "00:16:3e:a5:a5"}, {"vif_mac": "bridge=x"}, {"cpus": "1,evil"}):
        with pytest.raises(ArmvmError):
            xen.domu_cfg(kernel="/k", ramdisk=None, extra="x", **kw)
    assert "ramdisk" not in xen.domu_cfg(kernel="/k", ramdisk=None, extra="x")
    for bad in ('a"b', "a\nb", "a\\b"):
        with pytest.raises(ArmvmError, match="quote, backslash or line break"):
            xen.domu_cfg(kernel="/k", ramdisk=None, extra=bad)
    with pytest.raises(ArmvmError):
        xen.domu_cfg(kernel="/k", ramdisk=None, extra="x", name="bad name")


def test_dom0_settings_are_bounded():
    s = xen.dom0_settings(goal=spec.BOOT_MARKER, after="wait")
    assert f"GOAL='{spec.BOOT_MARKER}'" in s and "DOMU_WAIT=180" in s
    assert f"IMAGE_SERIAL={xen.IMAGE_SERIAL}" in s and "AFTER=wait" in s
    s = xen.dom0_settings(goal="login:", after="shutdown")
    assert "AFTER=shutdown" in s and f"POWEROFF_WAIT={xen.POWEROFF_WAIT}" in s
    for kw in ({"wait": 5}, {"wait": 100000}, {"goal": "it's"}, {"after": "reboot"},
               {"after": "destroy"}, {"poweroff_wait": 0}, {"poweroff_wait": 10000}):
        with pytest.raises(ArmvmError):
            xen.dom0_settings(**{"goal": "x", "after": "wait", **kw})


def test_dom0_init_is_valid_sh_and_bounds_the_wait():
    text = xen_dom0.INIT_TEMPLATE.read_text()
    assert subprocess.run(["sh", "-n", str(xen_dom0.INIT_TEMPLATE)]).returncode == 0
    assert "ln -sf /proc/self/fd/0 /dev/stdin" in text and "ln -sf /proc/self/fd /dev/fd" in text
    assert '-lt "$DOMU_WAIT"' in text and '-lt "$POWEROFF_WAIT"' in text
    assert "xenconsoled --log=guest" in text
    assert 'xl shutdown "$DOMU_NAME"' in text


def test_dom0_vif_hotplug_script_tells_netback_it_is_ready(tmp_path):
    """The bridge-less vif hotplug script Dom0's /init writes, run by sh with a stand-in
    xenstore-write: `online` (libxl's action once xen-netback made the vif) writes
    hotplug-status = connected under the back end's xenstore path; `offline` writes nothing."""
    text = xen_dom0.INIT_TEMPLATE.read_text()
    assert f"/etc/xen/scripts/{xen.VIF_SCRIPT} <<'VIF'" in text
    script = text.split("<<'VIF'\n", 1)[1].split("\nVIF\n", 1)[0] + "\n"
    (tmp_path / "vif").write_text(script)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "xenstore-write").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/writes\n')
    (bin_ / "xenstore-write").chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "XENBUS_PATH": "backend/vif/1/0", "vif": "vif1.0"}
    for action in ("online", "offline"):
        r = subprocess.run(["sh", str(tmp_path / "vif"), action], env=env, capture_output=True)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "writes").read_text() == "backend/vif/1/0/hotplug-status connected\n"


def test_qemu_command_for_xen(tmp_path):
    cmd = xen.xen_qemu_command(qemu="qemu-system-aarch64", firmware=(tmp_path / "C", tmp_path / "V"),
                               helper=tmp_path / "h,1.raw", image=tmp_path / "img.raw")
    m = cmd[cmd.index("-M") + 1]
    assert m.split(",") == ["virt", "gic-version=3", "acpi=off", "virtualization=on"]
    joined = " ".join(cmd)
    assert "virtio-blk-pci,drive=xenboot,bootindex=0" in joined
    assert f"serial={xen.IMAGE_SERIAL}" in joined
    assert f"file={tmp_path}/h,,1.raw,snapshot=on" in joined       # comma escaped for QEMU
    assert cmd[cmd.index("-m") + 1] == str(xen.MEMORY_MB)


# --- the helper disk and the DomU's files -------------------------------------------

def test_helper_disk_judged_by_external_tools(tmp_path):
    files = {}
    for name, data in (("xen.efi", b"MZ" + b"x" * 5000), ("vmlinuz", os.urandom(70000)),
                       ("cfg", xen_dom0.xen_cfg().encode())):
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    disk = tmp_path / "helper.raw"
    xen_boot.helper_disk(disk, {"EFI/BOOT/BOOTAA64.EFI": files["xen.efi"],
                           "EFI/BOOT/BOOTAA64.cfg": files["cfg"],
                           "EFI/BOOT/vmlinuz": files["vmlinuz"]})
    dump = subprocess.run(["sfdisk", "--dump", str(disk)], capture_output=True, text=True,
                          check=True).stdout
    assert "label: gpt" in dump and "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" in dump
    start = int(dump.split("start=")[1].split(",")[0])
    esp = tmp_path / "esp.fat"
    with open(disk, "rb") as src, open(esp, "wb") as dst:
        src.seek(start * 512)
        dst.write(src.read(xen_boot.HELPER_BYTES))
    fsck = subprocess.run(["fsck.fat", "-n", str(esp)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    got = subprocess.run(["mtype", "-i", str(esp), "::/EFI/BOOT/BOOTAA64.cfg"], capture_output=True,
                         check=True).stdout
    assert got == files["cfg"].read_bytes()
    out = tmp_path / "vm"
    subprocess.run(["mcopy", "-i", str(esp), "::/EFI/BOOT/vmlinuz", str(out)], check=True)
    assert out.read_bytes() == files["vmlinuz"].read_bytes()


def test_domu_files_follow_the_images_grub_cfg(tmp_path):
    img = imagegen.build_image(tmp_path, imagegen.ImageSpec(cmdline="console=ttyAMA0 panic=-1"))
    dest = tmp_path / "out"
    dest.mkdir()
    files = xen.domu_files(img, dest)
    assert files.kind == "grub"
    assert files.kernel.read_bytes() == imagegen.make_kernel("aarch64")
    assert files.initrd is not None and files.initrd.read_bytes()[:2] == b"\x1f\x8b"
    assert files.cmdline == "console=ttyAMA0 panic=-1"
    assert "grub.cfg" in files.source


def test_boot_cpio_carries_the_domu(tmp_path):
    k, i = tmp_path / "k", tmp_path / "i"
    k.write_bytes(b"KERNEL")
    i.write_bytes(b"INITRD")
    f = xen.DomUFiles(k, i, "", "grub", "test")
    xen_boot.boot_cpio(tmp_path / "b.cpio", f, "CFG\n", "S=1\n")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=open(tmp_path / "b.cpio", "rb"), cwd=out,
                   check=True)
    assert (out / "xen/vmlinuz").read_bytes() == b"KERNEL"
    assert (out / "xen/initrd").read_bytes() == b"INITRD"
    assert (out / "xen/domu.cfg").read_text() == "CFG\n"
    assert (out / "xen/settings").read_text() == "S=1\n"


def test_needed_reads_dt_needed_of_a_real_elf():
    exe = Path(os.path.realpath(sys.executable))
    names = xen_dom0.needed(exe.read_bytes(), str(exe))
    assert any(n.startswith("libc.so.") for n in names)
    assert xen_dom0.needed(b"#!/bin/sh\n", "script") == []
    with pytest.raises(ArmvmError):
        xen_dom0.needed(b"\x7fELF\x02\x01" + b"\0" * 26 + (10 ** 6).to_bytes(8, "little")
                        + b"\0" * 14 + (56).to_bytes(2, "little") + (3).to_bytes(2, "little")
                        + b"\0" * 8, "broken")


def test_read_debs(tmp_path):
    p = tmp_path / "debs.txt"
    a, b = "a" * 64, "b" * 64
    p.write_text(f"{a} 847552 busybox-static_1%3a1.37.0-6+b9_arm64.deb\n{b} 1 bash_5.2.37-2+b10_arm64.deb\n"
                 f"junk\n{a} x bad_1_arm64.deb\n")
    assert xen_dom0.read_debs(p) == [["bash", "5.2.37-2+b10", "arm64", 1, b],
                                     ["busybox-static", "1:1.37.0-6+b9", "arm64", 847552, a]]


def test_list_debs_hook_runs_in_sh(tmp_path):
    """The extract hook as mmdebstrap runs it (sh -c '...' exec ROOT) on a fake tree."""
    d = tmp_path / "root/var/cache/apt/archives"
    d.mkdir(parents=True)
    (d / "x_1.0_arm64.deb").write_bytes(b"abc")
    out = tmp_path / "debs.txt"
    subprocess.run(["sh", "-c", f"{xen_dom0.LIST_DEBS} {out}", "exec", str(tmp_path / "root")],
                   check=True)
    import hashlib
    assert xen_dom0.read_debs(out) == [["x", "1.0", "arm64", 3, hashlib.sha256(b"abc").hexdigest()]]


# --- the console, the verdict and the checks ----------------------------------------

def test_split_console_and_spans():
    domu, end, backend = xen.split_console(CONSOLE)
    assert domu.splitlines()[0].endswith("[0x411fd070]")          # \r removed
    assert "ARMVM-XEN" not in domu and spec.BOOT_MARKER in domu
    assert end["result"] == "goal"
    assert backend[0].endswith('params = "/dev/vdb"')
    ev = {"xen": 7.0, "dom0": 15.5, "dom0_ready": 45.0, "domu": 47.0, "goal": 95.5, "end": 141.6}
    assert xen.spans(ev) == {"firmware": 7.0, "xen": 8.5, "dom0": 29.5, "domu": 48.5,
                             "total": 141.6}
    assert xen.spans({})["xen"] is None


def test_xen_report_and_checks_pass():
    domu, end, _ = xen.split_console(CONSOLE)
    facts = parse_runtime_report(domu)
    assert facts.hypervisor == "xen"
    assert ("hvc0", "xen") in facts.consoles
    assert facts.xen_devices == [("vbd-51712", "vbd"), ("vif-0", "vif")]
    c = by_id(xen_checks(facts, scenario={"reached_goal": True, "ok": True}))
    assert [c[k].result for k in ("rt.xen-boot", "rt.xen-console", "rt.xen-block", "rt.xen-net")] \
        == ["pass"] * 4
    assert c["rt.xen-net"].detail == "vif-0 bound to xen-netfront (vif)"
    assert "no Xen guest UEFI" in c["rt.xen-boot"].detail or "ArmVirtXen" in c["rt.xen-boot"].detail
    ok, why = xen.verdict(goal_name="marker", events={"goal": 1.0}, end=end, facts=facts,
                          timed_out=False, status=0, killed_for=None, until_login=False,
                          domu_console=domu)
    assert ok and "vbd-51712" in why


def test_xen_checks_fail_on_a_kvm_style_report():
    facts = parse_runtime_report("ARMVM-REPORT hypervisor=none\nARMVM-REPORT console=ttyAMA0 "
                                 "driver=uart-pl011\nARMVM-REPORT xen-device=vbd-51712 driver=none\n"
                                 + spec.BOOT_MARKER + "\n")
    c = by_id(xen_checks(facts, scenario={"reached_goal": True}))
    assert c["rt.xen-boot"].result == "fail" and "hypervisor=none" in c["rt.xen-boot"].detail
    assert c["rt.xen-console"].result == "warn"          # SHOULD under vmspec-2.0
    assert c["rt.xen-block"].result == "fail"
    assert c["rt.xen-net"].result == "warn" and "xen devices: vbd-51712:none" in c["rt.xen-net"].detail
    old = by_id(xen_checks(facts, scenario={}, profile="vmspec-1.0"))
    assert old["rt.xen-console"].result == "fail"         # MUST under v1.0


def test_no_report_fails_every_xen_check():
    c = by_id(xen_checks(parse_runtime_report(""), scenario={"ok": False, "reason": "timed out"}))
    assert [c[k].result for k in ("rt.xen-boot", "rt.xen-console", "rt.xen-block", "rt.xen-net")] \
        == ["fail", "warn", "fail", "warn"]              # the console and network are SHOULDs
    assert "timed out" in c["rt.xen-boot"].detail


def test_domu_without_blkfront_fails_the_verdict():
    text = CONSOLE.replace("[domu] ARMVM-REPORT xen-device=vbd-51712 driver=vbd\n", "")
    domu, end, _ = xen.split_console(text)
    ok, why = xen.verdict(goal_name="marker", events={}, end=end, facts=parse_runtime_report(domu),
                          timed_out=False, status=0, killed_for=None, until_login=False,
                          domu_console=domu)
    assert not ok and "xen-blkfront" in why


def test_domu_that_never_reaches_its_marker(tmp_path):
    text = "\n".join(CONSOLE.splitlines()[:8]) + \
        "\nARMVM-XEN domu-timeout after 180 s\nARMVM-XEN dom0-end result=timeout\n"
    domu, end, backend = xen.split_console(text)
    facts = parse_runtime_report(domu)
    ok, why = xen.verdict(goal_name="marker", events={"domu": 1.0}, end=end, facts=facts,
                          timed_out=False, status=0, killed_for=None, until_login=False,
                          domu_console=domu)
    assert not ok and "did not reach its marker" in why
    from builder.run import xen_cli
    res = xen.XenResult(ok, why, text, domu, {"domu": 1.0}, xen.spans({"domu": 1.0}), end, backend,
                        log=str(tmp_path / "a.boot.log"), domu_log=str(tmp_path / "a.boot.domu.log"))
    out = xen_cli.text(res, facts)
    assert "xen boot FAILED" in out
    assert "last 3 DomU console lines:" in out and "  | ARMVM-REPORT kernel=6.12.117+deb13-cloud-arm64 machine=aarch64" in out
    assert "Xen/Dom0 console lines:" in out and "  | ARMVM-XEN dom0-end result=timeout" in out
    assert f"console log: {tmp_path}/a.boot.log" in out and "DomU console log:" in out


LOGIN_CONSOLE = """\
ARMVM-XEN domu-created domid=1
[domu] armvm-init: root UUID=1234 is /dev/xvda2; switching to /sbin/init
[domu] Debian GNU/Linux 13 armvm hvc0
[domu] armvm login: ARMVM-XEN domu-goal after 101 s
ARMVM-XEN cpu Domain-0 vcpus=1 seconds=61.5
ARMVM-XEN cpu armvm vcpus=2 seconds=120.3
ARMVM-XEN backend /local/domain/0/backend/vif/1/0/state = "4"
ARMVM-XEN backend /local/domain/0/backend/vif/1/0/hotplug-status = "connected"
ARMVM-XEN domu-poweroff after 17 s
ARMVM-XEN dom0-end result=goal
"""


def test_dom0_report():
    d = xen.dom0_report(LOGIN_CONSOLE)
    assert d == {"cpu": {"Domain-0": {"vcpus": 1, "seconds": 61.5},
                         "armvm": {"vcpus": 2, "seconds": 120.3}},
                 "netback": "connected", "vif_state": "4", "poweroff": "poweroff",
                 "poweroff_seconds": 17}
    assert xen.dom0_report(CONSOLE) == {"poweroff": "poweroff"}
    late = xen.dom0_report("ARMVM-XEN domu-still-running after 120 s\n"
                           "[domu] ARMVM-XEN cpu x vcpus=1 seconds=1\n")   # a DomU line: ignored
    assert late == {"poweroff": "still-running", "poweroff_seconds": 120}


def test_until_login_needs_the_root_on_xvda_and_a_power_off():
    domu, end, _ = xen.split_console(LOGIN_CONSOLE)
    base = dict(goal_name="login prompt", events={"domu": 30.0, "goal": 131.5}, end=end,
                facts=None, timed_out=False, status=0, killed_for=None, until_login=True)
    ok, why = xen.verdict(**base, domu_console=domu, dom0=xen.dom0_report(LOGIN_CONSOLE))
    assert ok, why
    assert "login prompt on hvc0 after 101.5 s" in why and "UUID=1234" in why
    assert "/dev/xvda2" in why and "powered off 17 s after xl shutdown" in why
    ok, why = xen.verdict(**base, domu_console="armvm-init: root UUID=1234 is /dev/vda2\n",
                          dom0={"poweroff": "poweroff"})
    assert not ok and "xvda" in why
    ok, why = xen.verdict(**base, domu_console=domu,
                          dom0={"poweroff": "still-running", "poweroff_seconds": 120})
    assert not ok and "did not power off within 120 s of xl shutdown" in why
    ok, why = xen.verdict(**base, domu_console=domu, dom0=xen.dom0_report(LOGIN_CONSOLE),
                          failed_units=["ssh.service"])
    assert not ok and "ssh.service" in why


# --- bad input ----------------------------------------------------------------------

def test_armv7_is_not_supported():
    with pytest.raises(ArmvmError, match="no arm32 Xen") as e:
        xen.check_arch("armv7")
    assert e.value.exit_code == EXIT_USAGE
    xen.check_arch("aarch64")


def test_armv7_image_refused_before_anything_runs(tmp_path):
    img = imagegen.build_image(tmp_path, imagegen.ImageSpec(arch="armv7"))
    r = subprocess.run([sys.executable, "-m", "builder", "boot", str(img), "--xen", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE, r.stdout + r.stderr
    assert "no arm32 Xen" in r.stderr and "Traceback" not in r.stderr


def test_xen_with_direct_is_a_usage_error(tmp_path):
    img = imagegen.build_image(tmp_path, imagegen.ImageSpec())
    r = subprocess.run([sys.executable, "-m", "builder", "boot", str(img), "--xen", "--direct"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--xen" in r.stderr


class _Pkg:
    def __init__(self, name, version):
        self.name, self.version = name, version


class _Archive:
    """resolve() like DebianArchive's: known names, else its 'not found' error."""
    def __init__(self, known):
        self.known = known

    def resolve(self, name, pin=True):
        if name not in self.known:
            raise ArmvmError(f"package '{name}' not found in trixie (main) for arm64")
        return _Pkg(name, self.known[name])


def test_missing_xen_package_in_the_mirror():
    with pytest.raises(ArmvmError, match="--xen needs Debian's Xen for arm64, but package "
                                         "'xen-utils-common' not found"):
        xen_dom0.resolve_packages(_Archive({}))
    v = "4.20.4+63-g7abfd2bce2-0+deb13u1"
    known = {n.format(x="4.20"): v for n in xen_dom0.PACKAGES}
    del known["xen-hypervisor-4.20-arm64"]
    with pytest.raises(ArmvmError, match="xen-hypervisor-4.20-arm64"):
        xen_dom0.resolve_packages(_Archive(known))
    known["xen-hypervisor-4.20-arm64"] = v
    x, named = xen_dom0.resolve_packages(_Archive(known))
    assert x == "4.20" and ("xen-utils-4.20", v) in named and len(named) == len(xen_dom0.PACKAGES)


def test_domu_cfg_for_a_guest_firmware():
    cfg = xen.domu_cfg(kernel="/xen/XEN_EFI.fd", ramdisk=None, extra=None, vuart=True)
    assert 'kernel = "/xen/XEN_EFI.fd"' in cfg and 'vuart = "sbsa_uart"' in cfg
    assert "extra" not in cfg and "ramdisk" not in cfg


def test_xen_firmware_needs_xen(tmp_path):
    img = imagegen.build_image(tmp_path, imagegen.ImageSpec())
    r = subprocess.run([sys.executable, "-m", "builder", "boot", str(img), "--xen-firmware",
                        str(tmp_path / "x.fd")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "only with --xen" in r.stderr
