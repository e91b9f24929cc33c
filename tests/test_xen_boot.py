"""End to end: the default probe image (recipes/debian-arm64.yaml, built from the real
Debian archive) booted as a Xen DomU with `armvm-build boot --xen` under QEMU TCG: Debian's
xen.efi from AAVMF, a Dom0 of Debian packages, the image's kernel as the DomU with the image
on xvda. About 2-4 minutes under TCG (plus ~80 s once to build the Dom0 kit into the
cache). Skipped with ARMVM_OFFLINE_TESTS=1."""
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
