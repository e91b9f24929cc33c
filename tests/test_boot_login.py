"""Real boots (QEMU + AAVMF + Debian's kernel) of a login probe image: /init's payload
prints `armvm-probe login: ` without a newline and waits for the power-button input event
(evdev on the kernel's ACPI button or gpio-keys), then init reports and powers off.

  - ACPI: `boot --until-login --json` sees the prompt, presses the power button over QMP,
    the guest powers off: ok, login_seconds, poweroff_seconds, no failed units.
  - device tree: Debian's cloud kernel has no gpio-keys driver (KEYBOARD_GPIO is not set),
    so the guest ignores the request: a clear error within the power-off bound.
  - the same image without grub.cfg: GRUB's shell stops the boot at once and GRUB itself
    says where it looked.
One image, built once for the module from the Debian archive (cache reused)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builder.run.boot import boot_image

pytestmark = [pytest.mark.boot, pytest.mark.network,
              pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1",
                                 reason="ARMVM_OFFLINE_TESTS=1"),
              pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                                 reason="qemu-system-arm missing")]

PROBE = """\
name: armvm-login-probe
arch: aarch64
debian: {suite: trixie, components: [main]}
kernel:
  package: linux-image-cloud-arm64
  cmdline: "console=ttyAMA0 panic=-1 quiet"
initramfs:
  drivers: [virtio_blk, evdev]
  payload: |
    ev=
    for n in /sys/class/input/event*; do
      case "$(cat "$n/device/name" 2>/dev/null)" in
        *"Power Button"*|*gpio-keys*|*gpio_keys*) ev=/dev/input/${n##*/} ;;
      esac
    done
    if [ -z "$ev" ]; then
      echo "armvm-probe: no power-button input device; waiting forever"
      printf 'armvm-probe login: '
      while :; do sleep 1000; done
    fi
    printf 'armvm-probe login: '
    head -c 1 "$ev" > /dev/null
    echo
    echo "armvm-probe: power button pressed ($ev)"
bootloader: {type: grub}
disk:
  size: 300MiB
  partitions:
    - {type: esp, size: 256MiB}
"""


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.yaml").write_text(PROBE)
    r = cli("build", "-q", d / "probe.yaml", "-o", d / "out", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "out" / "armvm-login-probe.raw"


def test_until_login_acpi_power_button(probe):
    r = cli("boot", probe, "--until-login", "--json", "--timeout", "300")
    res = json.loads(r.stdout)
    assert r.returncode == 0 and res["ok"], res["reason"] + r.stderr
    assert 0 < res["login_seconds"] < res["events"]["poweroff"]
    assert 0 <= res["poweroff_seconds"] <= 60
    assert res["failed_units"] == []
    log = Path(res["log"])
    assert log == probe.parent / "armvm-login-probe.boot.log"
    text = log.read_text()
    assert "armvm-probe: power button pressed (/dev/input/event" in text
    assert "reboot: Power down" in text


def test_until_login_devicetree_guest_ignores_the_request(probe, tmp_path):
    t0 = time.monotonic()
    r = boot_image(probe, timeout=300, acpi=False, until_login=True, poweroff_wait=5,
                   log_path=tmp_path / "dt.log")
    if "no power-button input device" not in r.console:
        pytest.skip("this kernel has a gpio-keys driver: the DT guest can power off")
    assert not r.ok
    assert r.reason == ("the guest did not power off within 5 s of the power-button "
                        "request (QMP system_powerdown)")
    assert r.login_seconds is not None and r.poweroff_seconds is None
    assert time.monotonic() - t0 < r.login_seconds + 5 + 30      # not the 300 s timeout


def test_grub_shell_stops_the_boot_and_says_where_it_looked(probe, tmp_path):
    img = tmp_path / "nocfg.raw"
    subprocess.run(["cp", "--sparse=always", str(probe), str(img)], check=True)
    if shutil.which("mdel") is None:
        pytest.skip("mtools missing")
    subprocess.run(["mdel", "-i", f"{img}@@1M", "::/EFI/BOOT/grub.cfg"], check=True)
    r = cli("boot", img, "-q", "--timeout", "300")
    assert r.returncode == 1
    first = r.stdout.splitlines()[0]
    assert first == ("boot FAILED: GRUB found no grub.cfg it could read and stopped at its "
                     "grub> shell; it looked for (hd0,gpt1)/EFI/BOOT/grub.cfg"), r.stdout
    assert "grub-shell" in r.stdout and f"console log: {tmp_path / 'nocfg.boot.log'}" in r.stdout
