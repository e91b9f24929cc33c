"""Server images (real Debian root, ext4): a cold build with an empty cache of its own
(downloads, mmdebstrap under qemu-user, staging, mke2fs), a warm rebuild (target <= 10 s for
arm64), the image's size (apparent and allocated), and boot to `login:` (`boot --until-login
--json`: targets 45 s aarch64, 60 s armhf), and the guest's own view of the same start-up
from a second boot of a copy of the recipe with one unit more, which prints `systemd-analyze
time`, the getty's place in `critical-chain` and the slowest units of `blame` on the console
once the boot is finished, then powers off (the guest's clock runs on the host's, so it is
not immune to a loaded host either, but it leaves out the firmware and QEMU's start-up).
BENCH_SERVER=arm64,armhf picks the recipes (default both), BENCH_SERVER_RECIPES=DIR takes
them from another folder (to compare two versions); BENCH_SERVER_COLD=0 skips the cold build
and rebuilds warm from the normal cache (after one build that makes it warm);
BENCH_SERVER_PROFILE=0 skips the guest's view. The CPU seconds QEMU used are noted beside
each boot (unlike the wall clock, barely moved by other jobs), and the 1-minute load average
beside each figure: the host is shared."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMVM = str(Path(sys.executable).parent / "armvm-build")
LOGIN_TARGET = {"arm64": 45, "armhf": 60}
PROFILE_UNIT = """[Unit]
Description=armvm-build bench: the guest's view of its start-up
[Service]
Type=simple
Environment=SYSTEMD_COLORS=0 SYSTEMD_PAGER=
ExecStart=/bin/sh -c 'until systemd-analyze time >/dev/null 2>&1; do sleep 1; done; \\
  timeout 60 sh -c "until systemctl -q is-active serial-getty@ttyAMA0.service; do sleep 1; done"; \\
  sleep 5; \\
  { echo ARMVM-PROFILE-BEGIN; systemd-analyze time; systemd-analyze blame | head -n 12; \\
    systemd-analyze critical-chain serial-getty@ttyAMA0.service; echo ARMVM-PROFILE-END; } >/dev/console 2>&1; \\
  systemctl poweroff'
[Install]
WantedBy=multi-user.target
"""
_SPAN = re.compile(r"(?:(\d+)min\s*)?(?:(\d+(?:\.\d+)?)(ms|s))?")


def seconds(text: str):
    """systemd's time spans as systemd-analyze prints them: '1min 50.669s', '8.551s', '850ms'."""
    m = _SPAN.fullmatch(text.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    value = int(m.group(1) or 0) * 60.0
    if m.group(2):
        value += float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)
    return value


def parse_profile(log: str) -> dict:
    """The profile unit's console block -> kernel, userspace, getty (since userspace began)
    and blame (the slowest units, 'name seconds')."""
    block = log[log.rfind("ARMVM-PROFILE-BEGIN"):log.rfind("ARMVM-PROFILE-END")]
    out: dict = {"blame": []}
    m = re.search(r"Startup finished in (.+?) \(kernel\) \+ (.+?) \(userspace\)", block)
    if m:
        out["kernel"], out["userspace"] = seconds(m.group(1)), seconds(m.group(2))
    m = re.search(r"serial-getty@\S+ @(.+?)\s*$", block, re.M)
    if m:
        out["getty"] = seconds(m.group(1))
    else:       # the getty line lost on the console: the getty starts when user-sessions ends
        m = re.search(r"systemd-user-sessions\.service @(.+?) \+(.+?)\s*$", block, re.M)
        if m and seconds(m.group(1)) is not None and seconds(m.group(2)) is not None:
            out["getty"] = seconds(m.group(1)) + seconds(m.group(2))
    for line in block.splitlines():
        b = re.fullmatch(r"\s*((?:\d+min )?[\d.]+m?s) (\S+\.(?:service|mount|device|socket|target))\s*", line)
        if b and len(out["blame"]) < 5:
            out["blame"].append(f"{b.group(2).replace('.service', '')} {seconds(b.group(1)):.1f}")
    return out


def _profile(name: str, d: Path, env: dict) -> dict:
    """Build a copy of the recipe with the profile unit and boot it until it powers off."""
    import yaml
    rec = yaml.safe_load((d / f"{name}.yaml").read_text())
    rec["name"] = f"{name}-profile"
    (d / "armvm-bench-profile.service").write_text(PROFILE_UNIT)
    root = rec["rootfs"]
    root.setdefault("files", []).append({"file": "armvm-bench-profile.service", "mode": "0644",
                                         "dest": "etc/systemd/system/armvm-bench-profile.service"})
    root.setdefault("enable", []).append("armvm-bench-profile.service")
    (d / f"{name}-profile.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    _build(d / f"{name}-profile.yaml", d / "out", env)
    log = d / "profile.boot.log"
    cpu0 = _child_cpu()
    subprocess.run([ARMVM, "boot", str(d / "out" / f"{name}-profile.raw"), "--json", "--timeout", "600",
                    "--expect", "ARMVM-PROFILE-END", "--log", str(log)],
                   capture_output=True, text=True, timeout=900, env=env)
    cpu = _child_cpu() - cpu0
    if not log.exists():
        return {}
    text = log.read_text(errors="replace")
    block = text[text.rfind("ARMVM-PROFILE-BEGIN"):text.rfind("ARMVM-PROFILE-END")]
    print(f"# {name}, the guest's view:\n{block.strip()}", file=sys.stderr, flush=True)
    return dict(parse_profile(text), cpu=cpu)


def _child_cpu() -> float:
    """CPU seconds of finished children (QEMU's included, reaped by armvm-build): unlike the
    wall clock, barely moved by other jobs on the host."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


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
            recipes = Path(os.environ.get("BENCH_SERVER_RECIPES", ROOT / "recipes"))
            shutil.copy(recipes / f"{name}.yaml", d / f"{name}.yaml")
            for extra in ("server-authorized_keys", "server-masked.unit"):     # files the recipes name
                shutil.copy(ROOT / "recipes" / extra, d / extra)
            env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
            if os.environ.get("BENCH_SERVER_COLD", "1") != "0":
                env["ARMVM_CACHE_DIR"] = str(d / "cache")        # cold: an empty cache of its own
                load = _load()
                cold, cs = _build(d / f"{name}.yaml", d / "out", env)
                rows.append((f"{name} cold build (empty cache)", cold, None,
                             f"{load} -> {_load()}; " + _stages(cs, 0.5)))
            else:
                _build(d / f"{name}.yaml", d / "out", env)     # the normal cache: make it warm
            load = _load()
            warm, ws = _build(d / f"{name}.yaml", d / "out", env)
            rows.append((f"{name} warm rebuild", warm, None,
                         f"target <= 10 s (arm64); {load}; " + _stages(ws, 0.05)))
            image = d / "out" / f"{name}.raw"
            st = image.stat()
            rows.append((f"{name} image MiB (apparent)", st.st_size / 2**20, None,
                         f"{st.st_blocks * 512 / 2**20:.0f} MiB allocated (sparse)"))
            load = _load()
            t0, cpu0 = time.perf_counter(), _child_cpu()
            res = subprocess.run([ARMVM, "boot", str(image), "--until-login", "--json", "--timeout", "600"],
                                 capture_output=True, text=True, timeout=900, env=env)
            cpu = _child_cpu() - cpu0
            # 600 s, not the default 180 s: on a loaded shared host login took 154 s (aarch64)
            rep = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
            if res.returncode == 0 and rep.get("login_seconds") is not None:
                off = rep.get("poweroff_seconds")
                rows.append((f"{name} boot to login:", rep["login_seconds"], None,
                             f"target <= {LOGIN_TARGET[key]} s; {load}; power-off "
                             f"{off if off is None else round(off, 1)} s; wall {time.perf_counter() - t0:.1f} s; "
                             f"QEMU used {cpu:.0f} CPU s (boot, login, power-off)"))
            elif rep.get("login_seconds") is not None:
                rows.append((f"{name} boot to login:", rep["login_seconds"], None,
                             f"target <= {LOGIN_TARGET[key]} s; {load}; but: {rep.get('reason', '')[:120]}; "
                             f"QEMU used {cpu:.0f} CPU s"))
            else:
                rows.append((f"{name} boot to login:", None, None,
                             f"failed ({res.returncode}): {(rep.get('reason') or res.stderr.strip())[-150:]}"))
            if os.environ.get("BENCH_SERVER_PROFILE", "1") != "0":
                load = _load()
                prof = _profile(name, d, env)
                if prof.get("getty") is not None and prof.get("kernel") is not None:
                    rows.append((f"{name} guest: kernel + init to getty", prof["kernel"] + prof["getty"], None,
                                 f"systemd-analyze: kernel {prof['kernel']:.1f} s, getty at "
                                 f"{prof['getty']:.1f} s of userspace {prof.get('userspace') or 0:.1f} s; "
                                 f"{load}; QEMU used {prof['cpu']:.0f} CPU s (to the end of the boot and power-off); slowest: {', '.join(prof['blame'][:3])}"))
                else:
                    rows.append((f"{name} guest: kernel + init to getty", None, None,
                                 "failed: no systemd-analyze output on the console"))
        except Exception as exc:
            rows.append((f"{name} builds", None, None, f"failed: {exc}"[:300]))
        finally:
            shutil.rmtree(d, ignore_errors=True)
