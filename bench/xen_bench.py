"""Xen (`boot --xen`) against the KVM-style boot (`boot`, AAVMF + the image's own loader) of
the same probe image, both in one run, one after the other (the host is shared: the
1-minute load average is noted). The Xen figure is split into its parts: firmware to Xen's
banner, Xen to the Dom0 kernel, Dom0 kernel to the Xen tools up, DomU create to the marker.
Then the arm64 server image (recipes/debian-arm64-server.yaml): `boot --until-login` beside
`boot --xen --until-login`, one run each (time to login: from QEMU's start, and from xl
create for the DomU; the power-off after the power button / xl shutdown; the CPU each Xen
domain used). BENCH_XEN_SERVER=0 skips the server pair (about 5 minutes under TCG).
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
        from builder.payload import xen_boot
        from builder.run.xen import DEFAULT_SUITE
        t0 = time.perf_counter()
        kit = xen_boot.kit(suite=DEFAULT_SUITE)
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
        if os.environ.get("BENCH_XEN_SERVER", "1") != "0":
            server(rows, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def server(rows: list, d: Path) -> None:
    """The server image to `login:`, plain and as a Xen DomU, one run each."""
    shutil.copy(ROOT / "recipes" / "debian-arm64-server.yaml", d / "server.yaml")
    shutil.copy(ROOT / "recipes" / "server-authorized_keys", d / "server-authorized_keys")
    subprocess.run([ARMVM, "build", "-q", str(d / "server.yaml"), "-o", str(d / "out")],
                   check=True, capture_output=True)
    image = d / "out" / "debian-arm64-server.raw"
    load = _load()
    try:
        wall, plain = _boot([str(image), "--until-login", "--timeout", "600"])
        rows.append(("boot --until-login (TCG) server image", plain.get("login_seconds"), None,
                     f"login at {plain.get('login_seconds', 0):.1f} s from QEMU's start; "
                     f"power-off {plain.get('poweroff_seconds') or 0:.1f} s; wall {wall:.1f} s; {load}"))
    except RuntimeError as e:
        plain = {}
        rows.append(("boot --until-login (TCG) server image", None, None, str(e)[-160:]))
    load = _load()
    try:
        wall, xen = _boot([str(image), "--xen", "--until-login"])
        ev, sp, d0 = xen.get("events", {}), xen.get("spans", {}), xen.get("dom0", {})
        cpu = ", ".join(f"{n} {c['seconds']:.0f} CPU s" for n, c in d0.get("cpu", {}).items())
        ratio = (f"; {ev['goal'] / plain['login_seconds']:.1f}x the plain boot's"
                 if plain.get("login_seconds") and "goal" in ev else "")
        rows.append(("boot --xen --until-login (TCG) server image", ev.get("goal"), None,
                     f"login at {ev.get('goal', 0):.1f} s from QEMU's start, {sp.get('domu')} s "
                     f"after xl create (bound 180 s){ratio}; DomU power-off "
                     f"{d0.get('poweroff_seconds')} s after xl shutdown; {cpu}; wall {wall:.1f} s; {load}"))
    except RuntimeError as e:
        rows.append(("boot --xen --until-login (TCG) server image", None, None, str(e)[-160:]))
