"""Runtime report parsing (rt.* checks) from a realistic serial console transcript."""
from __future__ import annotations

from builder.verify.runtime import merge_runtime, parse_runtime_report, runtime_checks

ESC = "\x1b"
# What a serial console shows: AAVMF + GRUB with ANSI escapes, kernel log lines, and
# /init's report, partly on the same lines as kernel messages.
TRANSCRIPT = (
    f"{ESC}[2J{ESC}[01;01H{ESC}[=3h{ESC}[2J{ESC}[01;01HBdsDxe: loading Boot0001 \"UEFI Misc "
    "Device\" from PciRoot(0x0)/Pci(0x1,0x0)\r\n"
    "BdsDxe: starting Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0)\r\n"
    f"{ESC}[0m{ESC}[37m{ESC}[40m{ESC}[1;1H  Booting `Debian GNU/Linux'\r\n"
    "EFI stub: Booting Linux Kernel...\r\n"
    "EFI stub: Using DTB from configuration table\r\n"
    "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x411fd070]\r\n"
    "[    0.000000] Linux version 6.12.117+deb13-cloud-arm64 (debian-kernel@lists.debian.org)\r\n"
    "[    0.000000] efi: EFI v2.7 by EDK II\r\n"
    "[    0.000000] ACPI: SPCR 0x000000005BFD0000 000050 (v02 BOCHS  BXPC)\r\n"
    "[    0.000000] GICv3: 256 SPIs implemented\r\n"
    "[    1.901234] Run /init as init process\r\n"
    f"{ESC}[1mARMVM-REPORT kernel=6.12.117+deb13-cloud-arm64 machine=aarch64{ESC}[0m\r\n"
    "ARMVM-REPORT efi=1\r\n"
    "ARMVM-REPORT acpi=1\r\n"
    "ARMVM-REPORT fdt=1\r\n"
    "ARMVM-REPORT rtc=rtc-efi\r\n"
    "ARMVM-REPORT console=ttyAMA0 driver=sbsa-uart\r\n"
    "ARMVM-REPORT gic=3\r\n"
    "[    2.101010] virtio_net virtio1 enp0s2: renamed from eth0\r\n"
    "ARMVM-REPORT virtio=virtio0 id=2 driver=virtio_blk transport=pci\r\n"
    "[    2.2] random: crng init done ARMVM-REPORT virtio=virtio1 id=1 driver=virtio_net "
    "transport=pci\r\n"
    "ARMVM-REPORT virtio=virtio2 id=3 driver=virtio_console transport=pci\r\n"
    "ARMVM-REPORT virtio=virtio3 id=5 driver=virtio_balloon transport=pci\r\n"
    "ARMVM-REPORT virtio=virtio4 id=2 driver=virtio_blk transport=mmio\r\n"
    "ARMVM-REPORT virtio=virtio5 id=1 driver=none transport=mmio\r\n"
    "ARMVM-REPORT module=virtio_mmio\r\n"
    "ARMVM-REPORT module=net_failover\r\n"
    f"{ESC}[32mARMVM-BOOT-COMPLETE{ESC}[0m\r\n"
    "[    3.000000] reboot: Power down\r\n"
)
ACPI_GIC3 = {"gic": 3, "acpi": True, "virtio_transports": ["pci"], "reached_marker": True,
             "powered_off": True, "loader_seen": True}


def by_id(checks):
    return {c.id: c for c in checks}


def test_parse_transcript():
    f = parse_runtime_report(TRANSCRIPT)
    assert f.kernel == "6.12.117+deb13-cloud-arm64" and f.machine == "aarch64"
    assert (f.efi, f.acpi, f.fdt, f.gic) == (True, True, True, "3")
    assert f.rtc == ["rtc-efi"] and f.consoles == [("ttyAMA0", "sbsa-uart")]
    assert [(d.name, d.id, d.driver, d.transport) for d in f.virtio][:2] == [
        ("virtio0", 2, "virtio_blk", "pci"), ("virtio1", 1, "virtio_net", "pci")]
    assert f.modules == ["virtio_mmio", "net_failover"]
    assert f.marker and f.kernel_started and f.report_lines == 15


def test_acpi_boot_passes():
    r = by_id(runtime_checks(parse_runtime_report(TRANSCRIPT), arch="aarch64",
                             scenario=ACPI_GIC3))
    assert {k: c.result for k, c in r.items() if c.result != "pass"} == {"rt.dt": "skip"}
    assert r["rt.dt"].detail.startswith("n/a")
    assert "sbsa-uart" in r["rt.console"].detail
    assert len(r) == 9


def test_mmio_needs_bound_drivers():
    sc = dict(ACPI_GIC3, virtio_transports=["pci", "mmio"])
    r = by_id(runtime_checks(parse_runtime_report(TRANSCRIPT), arch="aarch64", scenario=sc))
    assert r["rt.virtio"].result == "warn"          # SHOULD: net has no driver over mmio
    assert "net over virtio-mmio" in r["rt.virtio"].detail
    sc["virtio_devices"] = {"mmio": [2]}
    r = by_id(runtime_checks(parse_runtime_report(TRANSCRIPT), arch="aarch64", scenario=sc))
    assert r["rt.virtio"].result == "pass"


def test_device_tree_boot_and_gic_mismatch():
    text = TRANSCRIPT.replace("acpi=1", "acpi=0")
    sc = dict(ACPI_GIC3, acpi=False, gic=2)
    r = by_id(runtime_checks(parse_runtime_report(text), arch="aarch64", scenario=sc))
    assert r["rt.dt"].result == "pass" and r["rt.acpi"].result == "skip"
    assert r["rt.gic"].result == "fail" and "GICv3" in r["rt.gic"].detail
    # ACPI still on although the firmware was told acpi=off: not a device-tree boot
    r = by_id(runtime_checks(parse_runtime_report(TRANSCRIPT), arch="aarch64", scenario=sc))
    assert r["rt.dt"].result == "fail"


def test_armv7_has_no_acpi_requirement():
    text = TRANSCRIPT.replace("acpi=1", "acpi=0").replace("machine=aarch64", "machine=armv7l")
    sc = dict(ACPI_GIC3, acpi=False)
    r = by_id(runtime_checks(parse_runtime_report(text), arch="armv7", scenario=sc))
    assert r["rt.acpi"].result == "pass" and "not applicable" in r["rt.acpi"].detail
    assert r["rt.dt"].result == "pass"


def test_no_userspace_means_fail_and_skips():
    text = TRANSCRIPT.split("[    1.901234]")[0]
    sc = dict(ACPI_GIC3, reached_marker=False, powered_off=False)
    r = by_id(runtime_checks(parse_runtime_report(text), arch="aarch64", scenario=sc))
    assert r["rt.removable-boot"].result == "pass"       # the kernel did start
    assert r["rt.userspace"].result == "fail"
    assert all(r[k].result == "skip" for k in ("rt.efi", "rt.gic", "rt.rtc", "rt.console"))
    r = by_id(runtime_checks(parse_runtime_report(""), arch="aarch64",
                             scenario=dict(sc, loader_seen=False)))
    assert r["rt.removable-boot"].result == "fail" and "loader" in r["rt.removable-boot"].detail


def test_missing_facts_fail():
    text = TRANSCRIPT.replace("rtc=rtc-efi", "rtc=rtc-pl031").replace(
        "console=ttyAMA0 driver=sbsa-uart", "console=hvc0 driver=virtio_console").replace(
        "efi=1", "efi=0")
    r = by_id(runtime_checks(parse_runtime_report(text), arch="aarch64", scenario=ACPI_GIC3))
    assert r["rt.rtc"].result == "fail" and "rtc-pl031" in r["rt.rtc"].detail
    assert r["rt.console"].result == "fail" and r["rt.efi"].result == "fail"


def test_hostile_console_text():
    junk = ("\x1b[0m\x1b" * 10000 + " ARMVM-REPORT virtio= id=99999999999999 driver "
            "transport=\x00\nARMVM-REPORT virtio=virtio9 id=2\u00b2\n"
            + "ARMVM-REPORT" * 1000 + "\n" + "x" * 100000 + "\nARMVM-REPORT gic=banana efi=2\n")
    f = parse_runtime_report(junk)
    assert f.gic == "unknown" and f.efi is None
    assert [d.id for d in f.virtio] == [None, None]      # too long; not an ASCII number
    checks = runtime_checks(f, arch="aarch64", scenario={})
    assert len(checks) == 9


def test_merge_runtime():
    f = parse_runtime_report(TRANSCRIPT)
    a = runtime_checks(f, arch="aarch64", scenario=ACPI_GIC3)
    b = runtime_checks(parse_runtime_report(TRANSCRIPT.replace("acpi=1", "acpi=0")),
                       arch="aarch64", scenario=dict(ACPI_GIC3, acpi=False, gic=2))
    m = by_id(merge_runtime([a, b]))
    assert m["rt.dt"].result == "pass"           # skip in the ACPI boot, pass in the DT boot
    assert m["rt.gic"].result == "fail"          # the second boot reported GICv3 for gic=2
    assert m["rt.acpi"].result == "pass" and "(1 of 2 boots)" in m["rt.acpi"].detail


def test_devicetree_flag_and_the_readable_table():
    from builder.run.bootview import facts_rows
    f = parse_runtime_report(TRANSCRIPT)
    assert f.devicetree is None                      # the transcript has no such line
    rows = dict(facts_rows(f))
    assert rows["ACPI/DT"] == "ACPI" and rows["GIC"] == "v3"
    dt = parse_runtime_report(TRANSCRIPT.replace("acpi=1", "acpi=0")
                              + "ARMVM-REPORT devicetree=1\r\n")
    assert dt.devicetree is True
    rows = facts_rows(dt)
    assert dict(rows)["ACPI/DT"] == "device tree"
    assert [v for k, v in rows if k == "virtio"][:2] == [
        "virtio0: block over pci, driver virtio_blk", "virtio1: net over pci, driver virtio_net"]
