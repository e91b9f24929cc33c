"""Server images (real Debian root, ext4): build with the normal cache (cold the first time
on a machine: mmdebstrap under qemu-user), a warm rebuild (target <= 10 s for arm64), the
image's size on disk, and boot to `login:` (targets 45 s aarch64, 60 s armhf) when the boot
runner offers --until-login. BENCH_SERVER=arm64,armhf picks the recipes (default arm64)."""
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


def _build(recipe: Path, out: Path, env: dict) -> tuple:
    t0 = time.perf_counter()
    res = subprocess.run([ARMVM, "build", "-q", "--json", str(recipe), "-o", str(out)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-1000:])
    return time.perf_counter() - t0, json.loads(res.stdout)["stages"]


def run(rows: list, measure) -> None:
    for key in filter(None, os.environ.get("BENCH_SERVER", "arm64").split(",")):
        name = f"debian-{key}-server"
        d = Path(tempfile.mkdtemp(prefix="armvm-serverbench-"))
        try:
            shutil.copy(ROOT / "recipes" / f"{name}.yaml", d / f"{name}.yaml")
            shutil.copy(ROOT / "recipes" / "server-authorized_keys", d / "server-authorized_keys")
            env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}   # reuse the cached root
            first, fs = _build(d / f"{name}.yaml", d / "out", env)
            warm, ws = _build(d / f"{name}.yaml", d / "out", env)
            image = d / "out" / f"{name}.raw"
            st = image.stat()
            rows.append((f"{name} first build (cache as found)", first, None,
                         ", ".join(f"{k} {v:.1f}" for k, v in fs.items() if v >= 0.1)))
            rows.append((f"{name} warm rebuild", warm, None,
                         "target <= 10 s (arm64); " + ", ".join(f"{k} {v:.2f}" for k, v in ws.items() if v >= 0.05)))
            rows.append((f"{name} image MiB (apparent / allocated)", st.st_size / 2**20, st.st_blocks * 512 / 2**20, ""))
            t0 = time.perf_counter()
            res = subprocess.run([ARMVM, "boot", str(image), "--until-login", "--json"], capture_output=True,
                                 text=True, timeout=900)
            if res.returncode == 0:
                rep = json.loads(res.stdout)
                rows.append((f"{name} boot to login:", rep.get("login_seconds"), None,
                             f"target {45 if key == 'arm64' else 60} s; power-off {rep.get('poweroff_seconds')} s; "
                             f"wall {time.perf_counter() - t0:.1f} s"))
            else:
                rows.append((f"{name} boot to login:", None, None, f"skipped: {res.stderr.strip()[-150:]}"))
        except Exception as exc:
            rows.append((f"{name} builds", None, None, f"skipped: {exc}"[:200]))
        finally:
            shutil.rmtree(d, ignore_errors=True)
