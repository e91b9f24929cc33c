"""verify with and without the Secure Boot checks (issue 12, item 5).

- the default image (recipes/debian-arm64.yaml, built here; its GRUB is unsigned):
  `verify` and `verify --secure-boot` (which fails sb.signed at once: exit 1);
- Debian's signed chain (trixie shim-signed -> grub-efi-arm64-signed -> the signed 30 MB cloud
  kernel, on an ESP made by mkfs.fat + mtools): `verify` runs sb.* by itself because the loader
  is signed (three Authenticode digests, signatures, chains, SBAT), beside the same image
  with every signature removed by `sbattach --remove` (sb.* not run).
Median wall time and peak RSS of SB_RUNS (default 5) runs of the whole command.
    .venv/bin/python bench/sb_verify_bench.py     (or BENCH_ONLY=sb_verify bench/run.py)
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
RUNS = int(os.environ.get("SB_RUNS", "5"))


def timed(argv, ok=(0,)) -> tuple:
    walls, rss = [], []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        walls.append(time.perf_counter() - t0)
        rss.append(usage.ru_maxrss / 1024)
        rc = os.waitstatus_to_exitcode(status)
        if rc not in ok:
            raise RuntimeError(f"{' '.join(argv)}: exit {rc}: {err.decode()[-1000:]}")
    return statistics.median(walls), max(rss)


def _debian(d: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from builder.inputs.cache import Cache, default_cache_root
    from builder.inputs.debian.archive import DebianArchive
    from builder.inputs.sources import Fetcher
    fetcher = Fetcher(cache=Cache(default_cache_root()), progress=False)
    a = DebianArchive(fetcher, mirror=None, suite="trixie", components=["main"], arch="arm64")
    shim = a.extract(a.resolve("shim-signed"))
    grub = a.extract(a.resolve("grub-efi-arm64-signed"))
    kern = a.extract(a.resolve_kernel("linux-image-cloud-arm64"))
    return {"shim": (shim / "usr/lib/shim/shimaa64.efi.signed").read_bytes(),
            "grub": (grub / "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed").read_bytes(),
            "kernel": next((kern / "boot").glob("vmlinuz-*")).read_bytes(),
            "kver": next((kern / "boot").glob("vmlinuz-*")).name[len("vmlinuz-"):]}


def _chain_image(d: Path, deb: dict, name: str, strip: bool) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import imagegen as g
    files = {"EFI/BOOT/BOOTAA64.EFI": deb["shim"], "EFI/BOOT/grubaa64.efi": deb["grub"],
             "vmlinuz": deb["kernel"]}
    if strip:
        for k, v in files.items():
            p = d / "strip.efi"
            p.write_bytes(v)
            for _ in range(4):                                   # shim has two
                if subprocess.run(["sbattach", "--remove", str(p)],
                                  capture_output=True).returncode != 0:
                    break
            files[k] = p.read_bytes()
    files["EFI/BOOT/grub.cfg"] = (b"set timeout=0\nmenuentry 'debian' {\n  linux /vmlinuz "
                                  b"console=ttyAMA0\n  initrd /initrd.img\n}\n")
    files["initrd.img"] = g.make_initramfs(g.initramfs_files(ver=deb["kver"]))
    return g.build_image(d, g.ImageSpec(esp_files=files, esp_mib=64, disk_mib=80,
                                        second_partition=False), name)


def run(rows: list, measure=None) -> None:
    d = Path(tempfile.mkdtemp(prefix="armvm-sbbench-"))
    try:
        subprocess.run([ARMVM, str(ROOT / "recipes/debian-arm64.yaml"), "-o", str(d), "-q"],
                       check=True, capture_output=True)
        img = str(d / "debian-arm64.raw")
        rows.append(("verify default image", *timed([ARMVM, "verify", img]),
                     "unsigned GRUB: no sb.* checks"))
        rows.append(("verify default image --secure-boot", *timed(
            [ARMVM, "verify", img, "--secure-boot"], ok=(1,)), "exit 1: sb.signed fails"))
        if shutil.which("sbattach") is None:
            rows.append(("verify Debian signed chain", None, None, "skipped: no sbsigntool"))
            return
        deb = _debian(d)
        signed = _chain_image(d, deb, "signed.raw", strip=False)
        stripped = _chain_image(d, deb, "stripped.raw", strip=True)
        rows.append(("verify Debian shim chain (signed: sb.* run)",
                     *timed([ARMVM, "verify", str(signed)]), "3 digests, 4 signatures"))
        rows.append(("verify same chain, signatures removed",
                     *timed([ARMVM, "verify", str(stripped)]), "no sb.* checks"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    out: list = []
    run(out)
    print(f"# median of {RUNS} runs, {os.cpu_count()} cores")
    for name, wall, rss, note in out:
        w = "" if wall is None else f"{wall:.3f}"
        m = "" if rss is None else f"{rss:.1f}"
        print(f"{name:<46} {w:>8} s {m:>8} MiB  {note}")
