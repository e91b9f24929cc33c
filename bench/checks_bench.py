"""`boot --checks` concurrent beside sequential (issue 13.4): recipes/debian-arm64.yaml built
once, then its runtime matrix (two boots) run one after the other with the runner's 2 vCPUs
per guest, and at the same time with one vCPU per guest (what `boot --checks` picks when
there is a core per boot), alternating, CHECKS_RUNS times each (default 1); medians of the
whole matrix's wall time."""
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
RUNS = int(os.environ.get("CHECKS_RUNS", "1"))


def run(rows: list, measure) -> None:
    d = Path(tempfile.mkdtemp(prefix="armvm-checksbench-"))
    try:
        sys.path.insert(0, str(ROOT))
        from builder.run.bootcheck import run_checks
        shutil.copy(ROOT / "recipes" / "debian-arm64.yaml", d / "debian-arm64.yaml")
        subprocess.run([ARMVM, "build", "-q", str(d / "debian-arm64.yaml"), "-o", str(d / "out")],
                       check=True, capture_output=True,
                       env=dict(os.environ, SOURCE_DATE_EPOCH="1700000000"))
        image = d / "out" / "debian-arm64.raw"
        times: dict = {"seq": [], "conc": []}
        loads = []
        for _ in range(RUNS):
            for mode in ("seq", "conc"):
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                out = run_checks(image, arch="aarch64", timeout=600, concurrent=mode == "conc")
                if not out["ok"]:
                    raise RuntimeError(f"boot --checks failed ({mode})")
                times[mode].append(time.perf_counter() - t0)
        s, c = statistics.median(times["seq"]), statistics.median(times["conc"])
        rows.append(("boot --checks debian-arm64, sequential (2 vCPUs)", s, None,
                     "runs: " + ", ".join(f"{x:.1f}" for x in times["seq"])))
        rows.append(("boot --checks debian-arm64, concurrent (1 vCPU each)", c, None,
                     "runs: " + ", ".join(f"{x:.1f}" for x in times["conc"])
                     + f"; load {min(loads):.1f}-{max(loads):.1f}"))
        rows.append(("ratio: boot --checks concurrent / sequential", c / s, None, "target <= 0.6x"))
    except Exception as exc:
        rows.append(("boot --checks benchmark", None, None, f"skipped: {exc}"[:200]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
