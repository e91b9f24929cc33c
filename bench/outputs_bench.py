"""Image formats (issue 14 item 5): time and size of each format armvm-build writes from the
default image (recipes/debian-arm64.yaml), against the command-line peers on the same raw, in
one run: qcow2 (ours in Python vs `qemu-img convert`), raw.zst (python-zstandard with threads
vs `zstd -T0 -3`), raw.xz (our piecewise lzma in threads vs `xz -T0 -6`).

Ours are timed in-process (no interpreter start-up), the tools as whole commands. Median of
up to 3 runs (BENCH_RUNS caps it); xz, the slow one, once.
"""
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
MIB = 1 << 20


def _timed(fn, runs: int) -> float:
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.touch()
    return path


def run(rows: list, measure) -> None:
    sys.path.insert(0, str(ROOT))
    from builder.publish import formats
    runs = max(1, min(int(os.environ.get("BENCH_RUNS", "3")), 3))
    d = Path(tempfile.mkdtemp(prefix="armvm-outbench-"))
    try:
        shutil.copy(ROOT / "recipes" / "debian-arm64.yaml", d / "debian-arm64.yaml")
        env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
        res = subprocess.run([ARMVM, "build", "-q", str(d / "debian-arm64.yaml"), "-o", str(d / "out")],
                             capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-500:])
        raw = d / "out" / "debian-arm64.raw"
        data = raw.stat().st_blocks * 512
        rows.append((f"outputs: debian-arm64.raw", None, None,
                     f"{raw.stat().st_size // MIB} MiB disk, {data / MIB:.1f} MiB data"))
        cases = [
            ("qcow2", "ours: qcow2 (Python, in-process)", lambda o: formats.write_qcow2(raw, o),
             "qemu-img convert -O qcow2",
             lambda o: subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1",
                                       str(raw), str(o)], check=True), runs),
            ("raw.zst", "ours: raw.zst (zstandard threads, -3)", lambda o: formats.write_zstd(raw, o),
             "zstd -T0 -3", lambda o: subprocess.run(["zstd", "-q", "-f", "-T0", "-3", str(raw), "-o", str(o)],
                                                     check=True), runs),
            ("raw.xz", "ours: raw.xz (lzma pieces, threads, -6)", lambda o: formats.write_xz(raw, o),
             "xz -T0 -6", lambda o: subprocess.run(["xz", "-T0", "-6", "-c", str(raw)], stdout=open(o, "wb"),
                                                   check=True), 1),
        ]
        for ext, ours_name, ours, peer_name, peer, n in cases:
            a, b = d / f"ours.{ext}", d / f"peer.{ext}"
            t_ours = _timed(lambda: ours(_fresh(a)), n)
            t_peer = _timed(lambda: peer(_fresh(b)), n)
            same = "same bytes" if a.read_bytes() == b.read_bytes() else "other bytes"
            rows.append((f"outputs: {ours_name}", t_ours, None, f"{a.stat().st_size / MIB:.2f} MiB"))
            rows.append((f"outputs: {peer_name}", t_peer, None, f"{b.stat().st_size / MIB:.2f} MiB ({same})"))
            rows.append((f"outputs: ratio {ext} ours / tool", t_ours / t_peer, None, ""))
    except Exception as exc:          # no archive, no tool: say so, keep the table
        rows.append(("outputs", None, None, f"skipped: {exc}"[:200]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
