"""Image formats (issue 14 item 5): time and size of each format armvm-build writes from the
default image (recipes/debian-arm64.yaml), against the command-line peers on the same raw, in
one run: qcow2 (ours in Python vs `qemu-img convert`), raw.zst (python-zstandard with threads
vs `zstd -T0 -3`), raw.xz (our piecewise lzma in threads vs `xz -T0 -6`).

Ours are timed in-process (no interpreter start-up), the tools as whole commands. Runs
alternate ours / tool (so both see the same cache and load); median of BENCH_RUNS runs
(default 3, up to 9); xz, the slow one, once.

`python bench/outputs_bench.py [IMAGE.raw ...]` runs it alone (e.g. on the server image,
output/debian-arm64-server.raw, 2 GiB disk); with no image it builds the default one.
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


def _wall(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _alternating(a, b, runs: int):
    """Walls of a and b, run alternately (a b a b ...), so drift in load hits both."""
    wa, wb = [], []
    for _ in range(runs):
        wa.append(_wall(a))
        wb.append(_wall(b))
    return wa, wb


def _fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    path.touch()
    return path


def run(rows: list, measure, image: Path | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    from builder.publish import formats
    runs = max(1, min(int(os.environ.get("BENCH_RUNS", "3")), 9))
    d = Path(tempfile.mkdtemp(prefix="armvm-outbench-"))
    try:
        if image is None:
            shutil.copy(ROOT / "recipes" / "debian-arm64.yaml", d / "debian-arm64.yaml")
            env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
            res = subprocess.run([ARMVM, "build", "-q", str(d / "debian-arm64.yaml"), "-o", str(d / "out")],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-500:])
            raw = d / "out" / "debian-arm64.raw"
        else:
            raw = image
        data = raw.stat().st_blocks * 512
        rows.append((f"outputs: {raw.name}", None, None,
                     f"{raw.stat().st_size // MIB} MiB disk, {data / MIB:.1f} MiB data"))
        cases = [
            ("qcow2", "ours: qcow2 (Python, in-process)", lambda o: formats.write_qcow2(raw, o),
             "qemu-img convert -O qcow2", lambda o: formats.convert_qcow2(raw, o), runs),
            ("raw.zst", "ours: raw.zst (zstandard threads, -3)", lambda o: formats.write_zstd(raw, o),
             "zstd -T0 -3", lambda o: subprocess.run(["zstd", "-q", "-f", "-T0", "-3", str(raw), "-o", str(o)],
                                                     check=True), runs),
            ("raw.xz", "ours: raw.xz (lzma pieces, threads, -6)", lambda o: formats.write_xz(raw, o),
             "xz -T0 -6", lambda o: subprocess.run(["xz", "-T0", "-6", "-c", str(raw)], stdout=open(o, "wb"),
                                                   check=True), 1),
        ]
        only = os.environ.get("BENCH_FORMATS")
        for ext, ours_name, ours, peer_name, peer, n in cases:
            if only and ext not in only.split(","):
                continue
            a, b = d / f"ours.{ext}", d / f"peer.{ext}"
            wa, wb = _alternating(lambda: ours(_fresh(a)), lambda: peer(_fresh(b)), n)
            t_ours, t_peer = statistics.median(wa), statistics.median(wb)
            same = "same bytes" if a.read_bytes() == b.read_bytes() else "other bytes"
            each = lambda w: " ".join(f"{x:.2f}" for x in w)
            rows.append((f"outputs: {ours_name}", t_ours, None,
                         f"{a.stat().st_size / MIB:.2f} MiB; runs {each(wa)}"))
            rows.append((f"outputs: {peer_name}", t_peer, None,
                         f"{b.stat().st_size / MIB:.2f} MiB ({same}); runs {each(wb)}"))
            rows.append((f"outputs: ratio {ext} ours / tool", t_ours / t_peer, None, ""))
    except Exception as exc:          # no archive, no tool: say so, keep the table
        rows.append(("outputs", None, None, f"skipped: {exc}"[:200]))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    table: list = []
    for arg in sys.argv[1:] or [None]:
        run(table, None, Path(arg) if arg else None)
    for name, wall, rss, note in table:
        print(f"{name:<48} {'' if wall is None else f'{wall:.3f}':>8}  {note}")
