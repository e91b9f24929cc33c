"""Xen (`boot --xen`) against the KVM-style boot (`boot`, AAVMF + the image's own loader) of
the same probe image, both in one run, one after the other (the host is shared: the
1-minute load average is noted). The Xen figure is split into its parts: firmware to Xen's
banner, Xen to the Dom0 kernel, Dom0 kernel to the Xen tools up, DomU create to the marker.
The Dom0 kit is built first (cached by content; the first run on a machine pays ~80 s for
it, which is reported on its own row and not in the boot spans). BENCH_ONLY=xen runs this.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMVM = str(Path(sys.executable).parent / "armvm-build")


def _load() -> str:
    return "load %.2f" % os.getloadavg()[0]


def _boot(args: list) -> tuple:
    t0 = time.perf_counter()
    res = subprocess.run([ARMVM, "boot", "-q", "--json", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        data = json.loads(res.stdout)
    except ValueError:
        raise RuntimeError(f"boot {' '.join(args)} failed ({res.returncode}): "
                           f"{res.stderr[-1500:]}") from None
    if res.returncode != 0 or not data.get("ok"):
        raise RuntimeError(f"boot {' '.join(args)} failed: {data.get('reason')}")
    return wall, data


def run(rows: list, measure) -> None:
    d = Path(tempfile.mkdtemp(prefix="armvm-xenbench-"))
    try:
        shutil.copy(ROOT / "recipes" / "debian-arm64.yaml", d / "debian-arm64.yaml")
        subprocess.run([ARMVM, "build", "-q", str(d / "debian-arm64.yaml"), "-o", str(d / "out")],
                       check=True, capture_output=True)
        image = d / "out" / "debian-arm64.raw"
        # the Dom0 kit alone (a cache hit after the first run)
        sys.path.insert(0, str(ROOT))
        from builder.inputs.cache import Cache, default_cache_root
        from builder.inputs.debian.archive import DebianArchive
        from builder.inputs.sources import Fetcher
        from builder.payload.xen_dom0 import dom0_kit
        from builder.run.xen import DEFAULT_SUITE, TIMESTAMP
        t0 = time.perf_counter()
        archive = DebianArchive(Fetcher(cache=Cache(default_cache_root()), progress=False),
                                mirror=None, suite=DEFAULT_SUITE, components=["main"], arch="arm64")
        kit = dom0_kit(archive, archive.cache, timestamp=TIMESTAMP)
        debs = json.loads((kit.dir / "packages.json").read_text())
        rows.append(("xen Dom0 kit (cached by content)", time.perf_counter() - t0, None,
                     f"{len(debs)} .debs, {sum(x[3] for x in debs) / 2**20:.0f} MiB; "
                     f"dom0.cpio {kit.initramfs.stat().st_size / 2**20:.1f} MiB; Xen {kit.xen_version}"))
        load = _load()
        kvm_wall, kvm = _boot([str(image)])
        ev = kvm.get("events", {})
        rows.append(("boot (KVM-style, TCG) probe image", kvm_wall, None,
                     f"marker at {ev.get('marker', 0):.1f} s; {load}"))
        load = _load()
        xen_wall, xen = _boot([str(image), "--xen"])
        sp = xen.get("spans", {})
        rows.append(("boot --xen (TCG) probe image", xen_wall, None,
                     f"firmware {sp.get('firmware')} s, Xen {sp.get('xen')} s, Dom0 {sp.get('dom0')} s, "
                     f"DomU {sp.get('domu')} s; {xen_wall / kvm_wall:.1f}x the KVM-style boot; {load}"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
