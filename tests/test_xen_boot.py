"""End to end: the default probe image (recipes/debian-arm64.yaml, built from the real
Debian archive) booted as a Xen DomU with `armvm-build boot --xen` under QEMU TCG: Debian's
xen.efi from AAVMF, a Dom0 of Debian packages, the image's kernel as the DomU with the image
on xvda and a vif. About 2-4 minutes under TCG (plus ~80 s once to build the Dom0 kit into
the cache). Then the arm64 server image (recipes/debian-arm64-server.yaml) to its login
prompt on hvc0 and its power-off after `xl shutdown` (about 1-3 minutes: login 38.5 s
after `xl create` on an idle host, 101-147 s at load 3-4.9, against the 180 s bound).
Skipped with ARMVM_OFFLINE_TESTS=1."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder import spec

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.network, pytest.mark.boot,
              pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1",
                                 reason="ARMVM_OFFLINE_TESTS=1"),
              pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                                 reason="no qemu-system-aarch64")]


def cli(*args, timeout=1800):
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_probe_image_boots_as_a_xen_domu(tmp_path):
    shutil.copy(ROOT / "recipes" / "debian-arm64.yaml", tmp_path / "debian-arm64.yaml")
    b = cli("build", "-q", tmp_path / "debian-arm64.yaml", "-o", tmp_path / "out")
    assert b.returncode == 0, b.stderr[-2000:]
    image = tmp_path / "out" / "debian-arm64.raw"
    r = cli("boot", image, "--xen", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["ok"], out["reason"] + "\n" + r.stderr[-2000:]
    assert out["dom0_end"]["result"] == "goal"
    assert "goal" in out["events"] and all(out["spans"][k] > 0 for k in ("xen", "dom0", "domu"))
    # the back end seen from Dom0: xen-blkback connected (XenbusStateConnected = 4, or 6 once
    # the DomU closed it after powering off) and serving the image disk
    assert any(re.search(r'/params = "/dev/vd[a-z]"$', ln) for ln in out["backend"])
    assert any(re.search(r'/state = "[46]"$', ln) for ln in out["backend"])
    assert {n for n, *_ in out["kit"]["packages"]} >= {"xen-utils-" + out["kit"]["xen"],
                                                       "xenstore-utils", "busybox-static"}
    console = Path(out["log"]).read_text()
    assert "(XEN) Xen version" in console            # the hypervisor really ran
    domu = Path(out["domu_log"]).read_text()
    assert spec.BOOT_MARKER in domu
    assert "blkfront: xvda" in domu                   # the DomU's kernel bound xvda
    assert "ARMVM-REPORT hypervisor=xen" in domu
    assert "ARMVM-REPORT console=hvc0 driver=xen" in domu
    assert "ARMVM-REPORT xen-device=vbd-51712 driver=vbd" in domu
    assert "ARMVM-REPORT xen-device=vif-0 driver=vif" in domu       # xen-netfront bound the vif


@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap is not installed "
                    "(the server root is built with it; `make` installs it)")
def test_server_image_boots_as_a_xen_domu_to_login(tmp_path):
    """A real Debian root as a Xen DomU: the image's kernel and initramfs find the root by
    its UUID on xvda (never by device name), systemd brings up a getty on the Xen PV console
    hvc0, then Dom0's `xl shutdown` powers the DomU off; no systemd unit fails."""
    for name in ("debian-arm64-server.yaml", "server-authorized_keys"):
        shutil.copy(ROOT / "recipes" / name, tmp_path / name)
    b = cli("build", "-q", tmp_path / "debian-arm64-server.yaml", "-o", tmp_path / "out")
    assert b.returncode == 0, b.stderr[-2000:]
    r = cli("boot", tmp_path / "out" / "debian-arm64-server.raw", "--xen", "--until-login",
            "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["ok"], out["reason"] + "\n" + r.stderr[-2000:]
    domu = Path(out["domu_log"]).read_text()
    assert re.search(r"armvm-init: root UUID=[0-9a-f-]{36} is /dev/xvda2", domu)
    assert re.search(r"Debian GNU/Linux \S+ \S+ hvc0", domu)          # getty on the PV console
    assert re.search(r"^\S+ login:", domu, re.M)
    assert out["dom0"]["poweroff"] == "poweroff" and out["failed_units"] == []
    assert out["dom0"]["vif_state"] in ("4", "6") and out["dom0"]["netback"] == "connected"
    assert set(out["dom0"]["cpu"]) == {"Domain-0", "armvm"}
