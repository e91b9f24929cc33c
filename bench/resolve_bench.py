"""Cold resolve beside apt (issue 13.1): `armvm-build lock recipes/debian-arm64.yaml` from an
empty cache against `apt-get update` + `apt-cache policy <kernel>` for the same mirror, suite,
component and architecture, with apt's state, cache, lists, sources and configuration all
in a private temporary folder (the host's apt is never touched). The two alternate,
RESOLVE_RUNS times each (default 3); medians. Both download the same InRelease and
Packages.xz from the mirror the host's apt sources name."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMVM = str(Path(sys.executable).parent / "armvm-build")
RUNS = int(os.environ.get("RESOLVE_RUNS", "3"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def apt_setup(d: Path, mirror: str, suite: str, components: list, arch: str) -> dict:
    """A private apt root under ``d``; the environment that points apt at it."""
    etc = d / "etc"
    for sub in ("apt.conf.d", "preferences.d", "sources.list.d", "trusted.gpg.d"):
        (etc / sub).mkdir(parents=True, exist_ok=True)
    (d / "state" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "log").mkdir(exist_ok=True)
    (d / "status").write_text("")
    (etc / "sources.list").write_text(
        f"deb [arch={arch} signed-by={KEYRING}] {mirror} {suite} {' '.join(components)}\n")
    conf = d / "apt.conf"
    conf.write_text("".join(f'{k} "{v}";\n' for k, v in {
        "Dir::Etc": etc, "Dir::Etc::Parts": etc / "apt.conf.d",
        "Dir::Etc::sourcelist": etc / "sources.list", "Dir::State": d / "state",
        "Dir::State::status": d / "status", "Dir::Cache": d / "cache", "Dir::Log": d / "log",
        "APT::Architecture": arch, "Acquire::Languages": "none",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", ""),
    }.items()) + f'APT::Architectures {{ "{arch}"; }};\n')
    return dict(os.environ, APT_CONFIG=str(conf))


def _timed(argv_list: list, env: dict) -> float:
    t0 = time.perf_counter()
    for argv in argv_list:
        res = subprocess.run(argv, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {res.stderr[-500:]}")
    return time.perf_counter() - t0


def run(rows: list, measure) -> None:
    if not shutil.which("apt-get"):
        rows.append(("cold resolve vs apt", None, None, "skipped: apt-get not installed"))
        return
    sys.path.insert(0, str(ROOT))
    from builder.inputs.debian.mirror import find_mirror
    d = Path(tempfile.mkdtemp(prefix="armvm-resolvebench-"))
    try:
        mirror = find_mirror(None)
        shutil.copy(ROOT / "recipes" / "debian-arm64.yaml", d / "debian-arm64.yaml")
        ours, apt = [], []
        for i in range(RUNS):
            apt_dir = d / f"apt{i}"
            env = apt_setup(apt_dir, mirror, "trixie", ["main"], "arm64")
            apt.append(_timed([["apt-get", "update", "-qq"],
                               ["apt-cache", "policy", "linux-image-cloud-arm64"]], env))
            env = dict(os.environ, ARMVM_CACHE_DIR=str(d / f"cache{i}"),
                       SOURCE_DATE_EPOCH="1700000000")
            ours.append(_timed([[ARMVM, "lock", "-q", str(d / "debian-arm64.yaml")]], env))
            shutil.rmtree(apt_dir, ignore_errors=True)
            shutil.rmtree(d / f"cache{i}", ignore_errors=True)
        o, a = statistics.median(ours), statistics.median(apt)
        rows.append(("armvm-build lock, empty cache (trixie arm64)", o, None,
                     "runs: " + ", ".join(f"{x:.1f}" for x in ours)))
        rows.append(("apt-get update + apt-cache policy, private dirs", a, None,
                     "runs: " + ", ".join(f"{x:.1f}" for x in apt)))
        rows.append(("ratio: cold resolve / apt", o / a, None, "target <= 1.0x"))
    except Exception as exc:       # the archive may be unreachable: say so, keep the table
        rows.append(("cold resolve vs apt", None, None, f"skipped: {exc}"[:200]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
