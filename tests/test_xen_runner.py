"""builder.run.xen.boot_xen against a fake QEMU (tests/fakeqemu.py) and a small stand-in
Dom0 kit: the command line, the verdict from what the console says, the saved logs (the
machine's and the DomU's), a DomU that never reaches its marker, and --checks --xen's
rt.xen-* rows. The real chain is booted in tests/test_xen_boot.py."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from builder.payload import xen_boot, xen_dom0
from builder.run import xen
from tests import imagegen as g
from tests.test_xen import CONSOLE

sys.path.insert(0, str(Path(__file__).parent))
import fakeqemu  # noqa: E402


@pytest.fixture
def setup(tmp_path, monkeypatch):
    env, plan_file, rec = fakeqemu.environment(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    kit = tmp_path / "kit"
    kit.mkdir()
    for name in ("xen.efi", "vmlinuz", "dom0.cpio"):
        (kit / name).write_bytes(name.encode() * 100)
    (kit / "packages.json").write_text(json.dumps([["xen-utils-4.20", "4.20.4", "arm64", 5, "a" * 64]]))
    fake = xen_dom0.Dom0Kit(kit, "4.20", "6.12.117+deb13-cloud-arm64",
                            (("xen-utils-4.20", "4.20.4"),), "k")
    monkeypatch.setattr(xen_dom0, "dom0_kit", lambda *a, **kw: fake)
    image = g.build_image(tmp_path, g.ImageSpec(cmdline="console=ttyAMA0 panic=-1"), "vm.raw")

    def run(plan, **kw):
        plan_file.write_text(json.dumps(plan))
        kw.setdefault("timeout", 60)
        return xen.boot_xen(image, archive=object(), cache=object(), log_path=tmp_path / "vm.boot.log", stager=xen_boot,
                            **kw)
    run.rec, run.dir = rec, tmp_path
    return run


def test_good_run(setup):
    res = setup([{"out": CONSOLE.replace("\n", "\r\n")}, {"exit": 0}])
    assert res.ok, res.reason
    assert "vbd-51712" in res.reason
    args = (setup.rec / "args").read_text().splitlines()
    assert args[args.index("-M") + 1] == "virt,gic-version=3,acpi=off,virtualization=on"
    assert any(a.startswith("virtio-blk-pci,drive=xenboot,bootindex=0") for a in args)
    assert set(res.events) >= {"xen", "dom0", "dom0_ready", "domu", "goal", "end"}
    assert res.kit["debs"] == 1 and res.kit["lock"].endswith("packages.json")
    domu = Path(res.domu_log).read_text()
    assert domu.startswith("[    0.000000] Booting Linux") and "ARMVM-XEN" not in domu
    assert "(XEN) Xen version" in Path(res.log).read_text()
    assert not list((setup.dir / "tmp").iterdir())          # the per-boot folder is gone


def test_domu_never_reaches_its_marker(setup):
    text = "\r\n".join(CONSOLE.splitlines()[:8]) + \
        "\r\nARMVM-XEN domu-timeout after 180 s\r\nARMVM-XEN dom0-end result=timeout\r\n"
    res = setup([{"out": text}, {"exit": 0}])
    assert not res.ok and "did not reach its marker" in res.reason
    domu, dom0 = res.last_lines(5)
    assert domu[-1].startswith("ARMVM-REPORT kernel=")
    assert dom0[-1] == "ARMVM-XEN dom0-end result=timeout"
    assert Path(res.log).is_file() and Path(res.domu_log).is_file()


def test_qemu_exits_before_dom0_finished(setup):
    res = setup([{"out": CONSOLE.splitlines()[0] + "\r\n"}, {"exit": 0}])
    assert not res.ok and "before Dom0 finished" in res.reason


def test_a_hung_machine_is_bounded(setup):
    res = setup([{"out": CONSOLE.splitlines()[0] + "\r\n"}, {"sleep": 60}, {"exit": 0}], timeout=3)
    assert not res.ok and res.timed_out and "timed out" in res.reason
    assert res.events["end"] < 30


def test_checks_with_xen_adds_the_xen_rows(setup, monkeypatch, capsys):
    """`boot --checks --xen`: the matrix boots (here the fake plays the same console for
    every boot), then the Xen boot; the table gains rt.xen-boot, -console, -block and -net."""
    from builder.run import bootview, xen_cli
    plan = [{"out": CONSOLE.replace("\n", "\r\n")}, {"exit": 0}]
    (setup.dir / "plan.json").write_text(json.dumps(plan))
    image = setup.dir / "vm.raw"
    code = xen_cli.run(image, arch="auto", timeout=60, until_login=False, checks=True,
                       log_path=setup.dir / "vm.boot.log", qemu_args=(), verbose=False,
                       quiet=True, as_json=True, live=bootview.BootProgress(False), stem="vm",
                       stager=xen_boot)
    out = json.loads(capsys.readouterr().out)
    rows = {c["id"]: c for c in out["checks"]}
    assert {rows[k]["result"] for k in ("rt.xen-boot", "rt.xen-console", "rt.xen-block",
                                        "rt.xen-net")} == {"pass"}
    assert rows["rt.xen-net"]["detail"] == "[xen] vif-0 bound to xen-netfront (vif)"
    assert rows["rt.xen-block"]["detail"].startswith("[xen] vbd-51712")
    assert [s["scenario"] for s in out["scenarios"]][-1] == "xen"
    assert (setup.dir / "vm.boot.xen.log").is_file() and (setup.dir / "vm.boot.xen.domu.log").is_file()
    assert code == (0 if out["ok"] else 1)


def test_until_login_reports_the_login_and_the_power_off(setup):
    """--until-login under Xen: the goal is the DomU's login prompt (no newline), then Dom0's
    xl shutdown and how long the DomU took to go; the CPU per domain and the vif's
    hotplug status come from Dom0's lines."""
    from tests.test_xen import LOGIN_CONSOLE
    text = "(XEN) Xen version 4.20.5-pre\r\n" + LOGIN_CONSOLE.replace("\n", "\r\n")
    res = setup([{"out": text}, {"exit": 0}], until_login=True)
    assert res.ok, res.reason
    assert "login prompt on hvc0" in res.reason and "powered off 17 s after xl shutdown" in res.reason
    assert res.dom0["poweroff_seconds"] == 17 and res.dom0["netback"] == "connected"
    assert res.dom0["cpu"]["armvm"] == {"vcpus": 2, "seconds": 120.3}
    assert res.to_json()["dom0"] == res.dom0 and res.failed_units == []
    from builder.run import xen_cli
    from builder.verify.runtime import parse_runtime_report
    out = xen_cli.text(res, parse_runtime_report(res.domu_console))
    assert "DomU power-off after xl shutdown: 17 s" in out
    assert "armvm 120.3 s on 2 vCPUs" in out and "back-end state Connected (xen-netfront connected), hotplug-status connected" in out


def test_until_login_fails_on_a_failed_unit_in_the_domu(setup):
    from tests.test_xen import LOGIN_CONSOLE
    text = LOGIN_CONSOLE.replace(
        "[domu] Debian GNU/Linux", "[domu] [FAILED] Failed to start ssh.service - OpenBSD Secure "
        "Shell server.\n[domu] Debian GNU/Linux")
    res = setup([{"out": text.replace("\n", "\r\n")}, {"exit": 0}], until_login=True)
    assert not res.ok and "ssh.service" in res.reason and res.failed_units == ["ssh.service"]
