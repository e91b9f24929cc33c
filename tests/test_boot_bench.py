"""bench/boot_bench.py takes the same console marks from every profile: the kernel's own
`Run /init` only when the kernel printed it (a quiet kernel does not), /init's module line
and first report line otherwise; all on the milestones' clock (fake QEMU; only the order
of the marks is asserted, never a duration)."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "bench"))
import boot_bench  # noqa: E402
import fakeqemu  # noqa: E402
import imagegen as g  # noqa: E402

pytestmark = pytest.mark.skipif(not g.have_tools("sfdisk", "mkfs.fat", "mmd", "mcopy"),
                                reason="fdisk/dosfstools/mtools missing")

FIRMWARE = ("UEFI firmware (version  built at 13:10:49 on Nov  5 2024)\r\n"
            "BdsDxe: starting Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)\r\n")
LOUD_KERNEL = ("EFI stub: Booting Linux Kernel...\r\n"
               "[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x411fd070]\r\n"
               "[    3.397896] Run /init as init process\r\n")
INIT = "armvm-init: loaded 5 of 5 module(s) in the initramfs\r\n"
REPORT = "ARMVM-REPORT kernel=6.12 machine=aarch64\r\nARMVM-REPORT efi=1\r\n"
DONE = "ARMVM-BOOT-COMPLETE\r\n"


@pytest.fixture
def boot(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    image = g.build_image(tmp_path / "img", g.ImageSpec(arch="aarch64"), "vm.raw")
    env, plan_file, _rec = fakeqemu.environment(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(tempfile, "tempdir", None)

    def run(plan):
        plan_file.write_text(json.dumps(plan))
        return boot_bench.boot_once(image)
    return run


def test_quiet_kernel_has_no_run_init_mark_and_the_common_marks_in_order(boot):
    ev = boot([{"out": FIRMWARE}, {"sleep": 0.2}, {"out": INIT}, {"sleep": 0.2},
               {"out": REPORT}, {"sleep": 0.2}, {"out": DONE}, {"exit": 0}])
    assert "Run /init" not in ev and "stub" not in ev
    # on the milestones' clock: a mark left on the monotonic clock would come after power-off
    assert ev["loader"] < ev["modules"] < ev["report"] <= ev["marker"] <= ev["poweroff"]
    assert ev["cpu"] >= 0


def test_loud_kernel_run_init_comes_before_the_modules(boot):
    ev = boot([{"out": FIRMWARE}, {"sleep": 0.1}, {"out": LOUD_KERNEL}, {"sleep": 0.2},
               {"out": INIT + REPORT + DONE}, {"exit": 0}])
    assert ev["loader"] <= ev["stub"] <= ev["Run /init"] < ev["modules"] <= ev["report"]


def test_a_failed_boot_is_an_error(boot):
    with pytest.raises(RuntimeError, match="vm.raw"):
        boot([{"out": FIRMWARE + INIT}, {"exit": 1}])
