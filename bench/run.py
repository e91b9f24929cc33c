"""`make bench`: one table, every figure beside a peer measured in the same run.

Disk assembly (issue: disk core): a 512 MiB disk with a 256 MiB ESP holding ~75 MB
(a 4 MB loader, a 30 MB kernel, a 40 MB initrd, a few small files), built by
  - armvm-build's assembly stage alone (plan + GPT + FAT32 writers),
  - the whole `armvm-build` command for that recipe (start-up included),
  - genimage (whole command), and mkfs.fat --offset + mcopy (+ sfdisk for the GPT),
  - the same assembly on a 64 GiB disk.
Wall time and peak RSS of each process come from os.wait4 (per child). Median of N runs.

Debian builds and boots (other issues) are added by bench/debian.py and bench/boot.py
when their parts exist; this script runs whatever is available and says what it skipped.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
MIB = 1024 * 1024


def measure(argv, *, cwd=None, env=None, setup=None, inner=False):
    """(median wall seconds, max peak RSS MiB) over RUNS runs of a command. With inner=True
    the seconds are what the process itself printed on stdout (a stage timed in-process)."""
    walls, rss = [], []
    for _ in range(RUNS):
        if setup:
            setup()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE if inner else subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        out = proc.stdout.read() if inner else b""
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(float(out) if inner else time.perf_counter() - t0)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if inner:
            proc.stdout.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {err[-2000:]}")
        rss.append(usage.ru_maxrss / 1024)
    return statistics.median(walls), max(rss)


def payload(d: Path) -> dict:
    """Incompressible-ish files of the benchmark's sizes (generated once per run)."""
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import AA64, arm64_kernel, pe_image
    files = d / "files"
    files.mkdir()
    sizes = {"loader.efi": 4 * MIB, "vmlinuz": 30 * MIB, "initrd.img": 40 * MIB}
    for name, size in sizes.items():
        with open(files / name, "wb") as f:
            if name in ("loader.efi", "vmlinuz"):      # real headers, so the self-check passes
                f.write(pe_image(AA64) if name == "loader.efi" else arm64_kernel())
                size -= f.tell()
            block = os.urandom(MIB)
            for _ in range(size // MIB):
                f.write(block)
    (files / "grub.cfg").write_text("set timeout=0\nmenuentry x {\n linux /vmlinuz\n initrd /initrd.img\n}\n")
    for i in range(3):
        (files / f"note{i}.txt").write_text(f"small file {i}\n" * 100)
    return {p.name: p for p in files.iterdir()}


def recipe(d: Path, disk: str) -> Path:
    text = textwrap.dedent(f"""\
        name: bench
        arch: aarch64
        bootloader: {{type: efi, file: files/loader.efi}}
        output: {{bmap: false}}
        disk:
          size: {disk}
          partitions:
            - type: esp
              size: 256MiB
              files:
                - {{file: files/grub.cfg, dest: EFI/BOOT/grub.cfg}}
                - {{file: files/vmlinuz, dest: vmlinuz}}
                - {{file: files/initrd.img, dest: initrd.img}}
                - {{file: files/note0.txt, dest: notes/note0.txt}}
                - {{file: files/note1.txt, dest: notes/note1.txt}}
                - {{file: files/note2.txt, dest: notes/note2.txt}}
        """)
    p = d / f"bench-{disk}.yaml"
    p.write_text(text)
    return p


ASSEMBLE = """
import sys, time
from pathlib import Path
from builder.recipe.load import load_recipe
from builder.disk.layout import PlannedFile, plan_layout
from builder.disk.assemble import write_image
from builder import spec
r = load_recipe(sys.argv[1], environ={})
files = [PlannedFile("EFI/BOOT/BOOTAA64.EFI", r.bootloader.source.file, r.bootloader.source.file.stat().st_size, "", "loader")]
for e in r.disk.partitions[0].files:
    files.append(PlannedFile(e.dest, e.source.file, e.source.file.stat().st_size, "", "file"))
t0 = time.perf_counter()
layout = plan_layout(r, files, timestamp=spec.DEFAULT_SOURCE_DATE_EPOCH, seed=r.digest)
write_image(layout, Path(sys.argv[2]))
t1 = time.perf_counter()
print(t1 - t0 if "--inner" in sys.argv else "")
"""


def genimage_cfg(d: Path) -> Path:
    cfg = d / "genimage.cfg"
    cfg.write_text(textwrap.dedent(f"""\
        image esp.vfat {{
          vfat {{
            extraargs = "-F 32 -s 1"
            label = "ESP"
            file EFI/BOOT/BOOTAA64.EFI {{ image = "{d}/files/loader.efi" }}
            file EFI/BOOT/grub.cfg {{ image = "{d}/files/grub.cfg" }}
            file vmlinuz {{ image = "{d}/files/vmlinuz" }}
            file initrd.img {{ image = "{d}/files/initrd.img" }}
            file notes/note0.txt {{ image = "{d}/files/note0.txt" }}
            file notes/note1.txt {{ image = "{d}/files/note1.txt" }}
            file notes/note2.txt {{ image = "{d}/files/note2.txt" }}
          }}
          size = 256M
        }}
        image disk.img {{
          hdimage {{ partition-table-type = "gpt" }}
          partition esp {{
            image = "esp.vfat"
            partition-type-uuid = "U"
            offset = 1M
          }}
          size = 512M
        }}
        """))
    return cfg


MKFS_SCRIPT = """
set -e
img="$1"; f="$2"
rm -f "$img"; truncate -s 512M "$img"
printf 'label: gpt\\nstart=2048, size=524288, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\n' | sfdisk -q "$img" >/dev/null
mkfs.fat -F 32 -s 1 -n ESP --offset 2048 "$img" 262144 >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$img@@1M" ::EFI ::EFI/BOOT ::notes
mcopy -i "$img@@1M" "$f/loader.efi" ::EFI/BOOT/BOOTAA64.EFI
mcopy -i "$img@@1M" "$f/grub.cfg" ::EFI/BOOT/grub.cfg
mcopy -i "$img@@1M" "$f/vmlinuz" ::vmlinuz
mcopy -i "$img@@1M" "$f/initrd.img" ::initrd.img
mcopy -i "$img@@1M" "$f/note0.txt" "$f/note1.txt" "$f/note2.txt" ::notes/
"""


def bench_assembly(rows: list) -> None:
    d = Path(tempfile.mkdtemp(prefix="armvm-bench-"))
    try:
        payload(d)
        r512, r64g = recipe(d, "512MiB"), recipe(d, "64GiB")
        env = dict(os.environ, PYTHONPATH=str(ROOT), SOURCE_DATE_EPOCH="1700000000")
        out = d / "out"
        def rm(*paths):
            return lambda: [p.unlink() for p in paths if p.exists()]
        asm = measure([PY, "-c", ASSEMBLE, str(r512), str(d / "asm.raw"), "--inner"], env=env,
                      setup=rm(d / "asm.raw"), inner=True)
        asm_proc = measure([PY, "-c", ASSEMBLE, str(r512), str(d / "asm.raw")], env=env, setup=rm(d / "asm.raw"))
        asm64 = measure([PY, "-c", ASSEMBLE, str(r64g), str(d / "asm64.raw"), "--inner"], env=env,
                        setup=rm(d / "asm64.raw"), inner=True)
        cli = measure([str(Path(PY).parent / "armvm-build"), "build", "-q", str(r512), "-o", str(out)],
                      env=dict(env, ARMVM_CACHE_DIR=str(d / "cache")), setup=rm(out / "bench.raw"))
        rows.append(("assembly stage 512 MiB disk (plan+GPT+FAT32)", *asm))
        rows.append(("assembly as its own process (start-up, recipe)", *asm_proc))
        rows.append(("assembly 64 GiB disk", *asm64, f"{asm64[0] / asm[0]:.2f}x the 512 MiB one"))
        rows.append(("armvm-build whole command (incl. self-check)", *cli))
        if shutil.which("genimage"):
            cfg = genimage_cfg(d)
            gdir = d / "genimage"

            def clean():
                for sub in ("tmp", "images"):
                    shutil.rmtree(gdir / sub, ignore_errors=True)
                (gdir / "root").mkdir(parents=True, exist_ok=True)
            gen = measure(["genimage", "--config", str(cfg), "--rootpath", str(gdir / "root"),
                           "--tmppath", str(gdir / "tmp"), "--inputpath", str(d / "files"),
                           "--outputpath", str(gdir / "images")], setup=clean)
            rows.append(("genimage whole command", *gen))
            rows.append(("ratio: our assembly / genimage", asm[0] / gen[0], asm[1] / gen[1], "target <= 0.5x time"))
            rows.append(("ratio: armvm-build command / genimage", cli[0] / gen[0], cli[1] / gen[1], "target <= 1.0x time"))
        else:
            rows.append(("genimage", None, None, "skipped: genimage not installed"))
        if shutil.which("mkfs.fat") and shutil.which("mcopy"):
            mk = measure(["bash", "-c", MKFS_SCRIPT, "bench", str(d / "mk.raw"), str(d / "files")],
                         setup=rm(d / "mk.raw"))
            rows.append(("sfdisk + mkfs.fat --offset + mcopy", *mk))
            rows.append(("ratio: our assembly / mkfs.fat+mcopy", asm[0] / mk[0], asm[1] / mk[1], ""))
        rows.append(("peak RSS target: assembly <= 64 MiB", None, asm[1], "ok" if asm[1] <= 64 else "OVER"))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def print_table(rows: list) -> None:
    print(f"{'measurement':<48} {'wall s / ratio':>14} {'peak RSS MiB / ratio':>21}  note")
    for name, wall, rss, *note in rows:
        w = "" if wall is None else f"{wall:.3f}"
        m = "" if rss is None else f"{rss:.1f}"
        print(f"{name:<48} {w:>14} {m:>21}  {note[0] if note else ''}")


def main() -> None:
    rows: list = []
    only = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))   # assembly,resolve,debian,probe,boot,checks,server,sb_verify,sb,outputs,xen
    print(f"# armvm-build benchmark: median of {RUNS} runs, {os.cpu_count()} cores", flush=True)
    # An installed package has its bytecode compiled at install time; an editable checkout
    # run with PYTHONDONTWRITEBYTECODE=1 would compile ~40 modules (0.3 s) on every start.
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "builder")], check=False,
                   stdout=subprocess.DEVNULL)
    if not only or "assembly" in only:
        bench_assembly(rows)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    for extra in ("resolve", "debian", "probe", "boot", "checks", "server", "sb_verify", "sb", "outputs", "xen"):
        if not only or extra in only:
            __import__(f"{extra}_bench").run(rows, measure)
    print_table(rows)


if __name__ == "__main__":
    main()
