"""Outputs under hostile conditions (issue 9 items 2, 7, 8): a failed build publishes under
its own names through temp + rename and never follows a planted symlink; leftovers of a
SIGKILLed build are swept by the next build of the recipe, a live build's never; a full
disk is a clean error naming the folder and the space needed, with nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from builder.build import BuildOptions, build
from builder.publish.output import Staging
from tests.fixtures import ARM, efi_recipe, pe_image
from tests import limits
from tests.limits import ROOT, run_limited

ENV = {"SOURCE_DATE_EPOCH": "1700000000"}


def opts(tmp_path, out=None) -> BuildOptions:
    return BuildOptions(output_dir=out or tmp_path / "out", cache_dir=tmp_path / "cache",
                        progress=False, environ=ENV)


def test_failed_build_never_follows_symlinks_nor_replaces_the_good_report(tmp_path):
    recipe = efi_recipe(tmp_path)
    good = build(recipe, opts(tmp_path))
    assert good.ok
    out = tmp_path / "out"
    good_report = (out / "demo.verify.json").read_bytes()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("demo.failed.verify.json", "demo.failed.raw"):
        (out / name).symlink_to(victim)
    # an AArch32 recipe with an AArch64 kernel fails boot.kernel
    recipe.write_text(recipe.read_text().replace("arch: aarch64", "arch: armv7"))
    (tmp_path / "files" / "loader.efi").write_bytes(pe_image(ARM))
    res = build(recipe, opts(tmp_path))
    assert not res.ok and "demo.failed.verify.json" in res.message
    assert victim.read_text() == "precious"
    for name in ("demo.failed.verify.json", "demo.failed.raw"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    report = json.loads((out / "demo.failed.verify.json").read_text())
    assert any(c["id"] == "boot.kernel" and c["result"] == "fail" for c in report["checks"])
    assert (out / "demo.verify.json").read_bytes() == good_report
    assert sorted(p.name for p in out.iterdir()) == [
        "demo.bmap", "demo.failed.raw", "demo.failed.report.html", "demo.failed.verify.json",
        "demo.manifest.json", "demo.raw", "demo.report.html", "demo.verify.json"]


def test_good_build_replaces_planted_symlinks_without_following(tmp_path):
    recipe = efi_recipe(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("demo.raw", "demo.verify.json", "demo.manifest.json", "demo.bmap"):
        (out / name).symlink_to(victim)
    assert build(recipe, opts(tmp_path)).ok
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in out.iterdir())


KILLED = """
import os, signal, sys
from pathlib import Path
from builder.publish.output import Staging
s = Staging(Path(sys.argv[1]), sys.argv[2])
tmp = s.temp_path(sys.argv[2] + ".raw")
os.truncate(tmp, 512 << 20)                      # the 512 MiB sparse image
(s.work_dir() / "grub.cfg").write_text("x")
print(s.token, flush=True)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()                                  # stay alive until told
s.close()
"""


def _start(out: Path, name: str, how: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(out), name, how],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    token = p.stdout.readline().strip()
    assert len(token) == 16, token
    return p, token


def _ours(out: Path, token: str) -> list[str]:
    return sorted(p.name for p in out.iterdir() if token in p.name)


def test_sigkill_leftovers_swept_by_next_build_live_ones_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead, dead_token = _start(out, "demo", "kill")
    assert dead.wait() == -signal.SIGKILL
    assert _ours(out, dead_token) == [f".demo.{dead_token}.lock",
                                      f".demo.raw.{dead_token}-1.tmp",
                                      f".demo.work.{dead_token}.tmp"]
    live, live_token = _start(out, "demo", "live")                 # same recipe, running
    other, other_token = _start(out, "demo.raw", "kill")           # a prefix-sharing name
    assert other.wait() == -signal.SIGKILL
    try:
        recipe = efi_recipe(tmp_path)
        assert build(recipe, opts(tmp_path)).ok                    # the next build
        assert _ours(out, dead_token) == []
        assert len(_ours(out, live_token)) == 3                    # never a live build's
        assert len(_ours(out, other_token)) == 3                   # nor another recipe's
    finally:
        live.stdin.close()
        live.wait()
    assert _ours(out, live_token) == []                           # it cleaned up itself
    s = Staging(out, "demo.raw")                                   # its next build sweeps
    s.close()
    assert sorted(p.name for p in out.iterdir()) == [
        "demo.bmap", "demo.manifest.json", "demo.raw", "demo.report.html", "demo.verify.json"]


def test_legacy_leftovers_swept_once_a_day_old(tmp_path):
    """Temp files of builds before the lock scheme carry no token: swept when a day old."""
    out = tmp_path / "out"
    out.mkdir()
    old, fresh = out / ".demo.raw.ab_cd123.tmp", out / ".demo.raw.zz_zz999.tmp"
    work = out / ".demo.work-q1w2e3r4"
    other = out / ".demo2.raw.ab_cd123.tmp"
    for p in (old, fresh, other):
        p.write_bytes(b"x")
    work.mkdir()
    (work / "grub.cfg").write_text("x")
    day_ago = os.stat(old).st_mtime - 2 * 86400
    for p in (old, work, other):
        os.utime(p, (day_ago, day_ago))
    s = Staging(out, "demo")
    s.close()
    assert sorted(s.swept) == [old.name, work.name]
    assert fresh.exists() and other.exists() and not old.exists() and not work.exists()


def test_file_size_limit_is_a_clean_error(tmp_path):
    """RLIMIT_FSIZE (EFBIG, no root needed): the 512 MiB sparse image cannot be sized."""
    recipe = efi_recipe(tmp_path)
    r = run_limited("""
import sys
from builder.cli import main
sys.argv = ["armvm-build", "build", sys.argv[1], "-o", sys.argv[2]]
main()
""", fsize=64 << 20, args=[recipe, tmp_path / "out"],
        env=dict(os.environ, ARMVM_CACHE_DIR=str(tmp_path / "cache"), **ENV))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"{tmp_path / 'out'}: the file size limit" in r.stderr and "MiB" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted by the test (root only); unmounted whatever happens."""
    yield from limits.small_tmpfs(tmp_path, 4)


def test_disk_full_output_folder(tmp_path, small_tmpfs):
    out = small_tmpfs / "out"
    recipe = efi_recipe(tmp_path, extra_files="        - {file: files/big.bin, dest: big.bin}\n")
    (tmp_path / "files" / "big.bin").write_bytes(b"small")
    good = build(recipe, opts(tmp_path, out))
    assert good.ok, good.message
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "files" / "big.bin").write_bytes(os.urandom(6 << 20))
    env = dict(os.environ, ARMVM_CACHE_DIR=str(tmp_path / "cache"), **ENV)
    r = subprocess.run([sys.executable, "-m", "builder", "build", str(recipe), "-o", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert f"{out}: No space left on device while writing the image" in r.stderr, r.stderr
    assert "MiB of free space" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # nothing half-written


def test_disk_full_anywhere_in_a_build_is_clean(tmp_path, monkeypatch):
    """ENOSPC from any stage (here: writing the initramfs into the work folder) becomes a
    clean error naming the folder; other OSErrors stay what they are."""
    import errno
    from builder import build as buildmod
    from builder.errors import ArmvmError

    def full(ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.work / "initrd.img"))
    monkeypatch.setattr(buildmod, "gather", full)
    recipe = efi_recipe(tmp_path)
    with pytest.raises(ArmvmError) as err:
        build(recipe, opts(tmp_path))
    assert f"{tmp_path / 'out'}: No space left on device while building" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []

    def broken(ctx):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(buildmod, "gather", broken)
    with pytest.raises(OSError, match="Input/output error"):
        build(recipe, opts(tmp_path))
