"""Run code in a child Python with resource limits, so that a regression of a hostile-input
bound fails a test (MemoryError, SIGXCPU) instead of swapping the machine running the tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

PRELUDE = """
import resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
{fsize}
"""


def run_limited(code: str, *, mem_mib: int = 512, cpu_s: int = 60, fsize: int | None = None,
                args=(), cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run ``code`` under RLIMIT_AS=mem_mib MiB and RLIMIT_CPU=cpu_s s (and RLIMIT_FSIZE
    when given, with SIGXFSZ ignored so writes fail with EFBIG)."""
    extra = ""
    if fsize is not None:
        extra = (f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
                 "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)")
    prelude = PRELUDE.format(mem=mem_mib * MIB, cpu=cpu_s, fsize=extra)
    full = prelude + textwrap.dedent(code)
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", full, *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=child_env, timeout=cpu_s * 4)


def small_tmpfs(tmp_path, mib: int):
    """Yield a `mib` MiB tmpfs mounted under tmp_path (root only, else the test skips);
    unmounted whatever happens. For disk-full tests."""
    import shutil
    import pytest
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (disk-full tests)")
    mnt = Path(tmp_path) / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
