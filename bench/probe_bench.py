"""Probe boots (issue 13.3): recipes/debian-armhf.yaml and recipes/debian-arm64.yaml as
shipped (/init cold-plugs: only drivers whose alias matches a device load) beside the same
recipe with an /init that loads every listed module in order (what /init did before), built
and booted in the same run. PROBE_RUNS boots each (default 3); medians of QEMU start to
power-off and of the kernel's `Run /init` to the marker. PROBE_ARCHES=armhf,arm64 picks."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMVM = str(Path(sys.executable).parent / "armvm-build")
RUNS = int(os.environ.get("PROBE_RUNS", "3"))
LOAD_ALL = """echo "armvm-init: loading {{ modules | length }} module(s)"
{% for path in modules %}
insmod {{ path | shquote }} || echo "armvm-init: insmod {{ path }} failed (status $?)"
{% endfor %}
"""


def peer_template() -> str:
    """The shipped /init with its cold-plug section replaced by insmod of every module."""
    text = (ROOT / "builder" / "payload" / "templates" / "init.j2").read_text()
    start = text.index("# Modules: every driver")
    end = text.index('echo "armvm-init: loaded')
    end = text.index("\n", end) + 1
    return text[:start] + LOAD_ALL + text[end:].replace("        coldplug ", "        : ")


def _boots(image: Path) -> tuple:
    sys.path.insert(0, str(ROOT))
    from builder.run.boot import boot_image
    total, init = [], []
    for _ in range(RUNS):
        res = boot_image(image, arch="auto", timeout=300)
        if not res.ok:
            raise RuntimeError(f"{image.name}: {res.reason}")
        total.append(res.events["poweroff"])
        init.append(res.events["marker"] - res.events["init"])
    return statistics.median(total), statistics.median(init), total


def run(rows: list, measure) -> None:
    arches = [a for a in os.environ.get("PROBE_ARCHES", "armhf,arm64").split(",") if a]
    for arch in arches:
        d = Path(tempfile.mkdtemp(prefix="armvm-probebench-"))
        try:
            name = f"debian-{arch}"
            text = (ROOT / "recipes" / f"{name}.yaml").read_text()
            (d / f"{name}.yaml").write_text(text)
            (d / "peer-init.j2").write_text(peer_template())
            assert "\ninitramfs:\n" in text
            (d / f"{name}-all.yaml").write_text(
                text.replace(f"name: {name}\n", f"name: {name}-all\n")
                    .replace("\ninitramfs:\n", "\ninitramfs:\n  init: peer-init.j2\n"))
            env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
            for r in (name, f"{name}-all"):
                subprocess.run([ARMVM, "build", "-q", str(d / f"{r}.yaml"), "-o", str(d / "out")],
                               check=True, env=env, capture_output=True)
            ours = _boots(d / "out" / f"{name}.raw")
            peer = _boots(d / "out" / f"{name}-all.raw")
            load = os.getloadavg()[0]
            rows.append((f"probe boot {arch}: cold-plug /init, QEMU start to power-off", ours[0],
                         None, f"Run /init to marker {ours[1]:.1f} s; runs "
                         + ", ".join(f"{x:.1f}" for x in ours[2]) + f"; load {load:.1f}"))
            rows.append((f"probe boot {arch}: /init loading every module", peer[0], None,
                         f"Run /init to marker {peer[1]:.1f} s; runs "
                         + ", ".join(f"{x:.1f}" for x in peer[2])))
            rows.append((f"ratio: {arch} probe boot cold-plug / load-all", ours[0] / peer[0], None,
                         "target: armhf <= 15 s, neither arch slower"))
        except Exception as exc:
            rows.append((f"probe boot {arch}", None, None, f"skipped: {exc}"[:200]))
        finally:
            shutil.rmtree(d, ignore_errors=True)
