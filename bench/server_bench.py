"""Server images (real Debian root, ext4): a cold build with an empty cache of its own
(downloads, mmdebstrap under qemu-user, staging, mke2fs), a warm rebuild (target <= 10 s for
arm64), the image's size (apparent and allocated), and boot to `login:` (`boot --until-login
--json`: targets 45 s aarch64, 60 s armhf). BENCH_SERVER=arm64,armhf picks the recipes
(default both). The 1-minute load average is noted beside each figure: the host is shared."""
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
LOGIN_TARGET = {"arm64": 45, "armhf": 60}


def _load() -> str:
    return "load %.2f" % os.getloadavg()[0]


def _build(recipe: Path, out: Path, env: dict) -> tuple:
    t0 = time.perf_counter()
    res = subprocess.run([ARMVM, "build", "-q", "--json", str(recipe), "-o", str(out)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"build failed ({res.returncode}): {res.stderr[-1000:]}")
    return time.perf_counter() - t0, json.loads(res.stdout)["stages"]


def _stages(stages: dict, least: float) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in stages.items() if v >= least)


def run(rows: list, measure) -> None:
    for key in filter(None, os.environ.get("BENCH_SERVER", "arm64,armhf").split(",")):
        name = f"debian-{key}-server"
        d = Path(tempfile.mkdtemp(prefix="armvm-serverbench-"))
        try:
            shutil.copy(ROOT / "recipes" / f"{name}.yaml", d / f"{name}.yaml")
            shutil.copy(ROOT / "recipes" / "server-authorized_keys", d / "server-authorized_keys")
            env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
            env["ARMVM_CACHE_DIR"] = str(d / "cache")            # cold: an empty cache of its own
            load = _load()
            cold, cs = _build(d / f"{name}.yaml", d / "out", env)
            rows.append((f"{name} cold build (empty cache)", cold, None,
                         f"{load} -> {_load()}; " + _stages(cs, 0.5)))
            load = _load()
            warm, ws = _build(d / f"{name}.yaml", d / "out", env)
            rows.append((f"{name} warm rebuild", warm, None,
                         f"target <= 10 s (arm64); {load}; " + _stages(ws, 0.05)))
            image = d / "out" / f"{name}.raw"
            st = image.stat()
            rows.append((f"{name} image MiB (apparent)", st.st_size / 2**20, None,
                         f"{st.st_blocks * 512 / 2**20:.0f} MiB allocated (sparse)"))
            load = _load()
            t0 = time.perf_counter()
            res = subprocess.run([ARMVM, "boot", str(image), "--until-login", "--json", "--timeout", "600"],
                                 capture_output=True, text=True, timeout=900, env=env)
            # 600 s, not the default 180 s: on a loaded shared host login took 154 s (aarch64)
            rep = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
            if res.returncode == 0 and rep.get("login_seconds") is not None:
                off = rep.get("poweroff_seconds")
                rows.append((f"{name} boot to login:", rep["login_seconds"], None,
                             f"target <= {LOGIN_TARGET[key]} s; {load}; power-off "
                             f"{off if off is None else round(off, 1)} s; wall {time.perf_counter() - t0:.1f} s"))
            else:
                rows.append((f"{name} boot to login:", None, None,
                             f"failed ({res.returncode}): {(rep.get('reason') or res.stderr.strip())[-150:]}"))
        except Exception as exc:
            rows.append((f"{name} builds", None, None, f"failed: {exc}"[:300]))
        finally:
            shutil.rmtree(d, ignore_errors=True)
