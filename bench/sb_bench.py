"""Secure Boot cost under QEMU + AAVMF, in one run: the very same image booted with Secure
Boot enforced and without (Debian's plain, empty variable store), alternating, SB_RUNS
boots each (default 2); medians.

Images: a UKI signed with Debian's snakeoil test key (recipes/uki-own-key.yaml with the
snakeoil key; enforced with --secure-boot snakeoil) and Debian's shim chain
(recipes/debian-arm64-secureboot.yaml; enforced with --secure-boot ms). Reported: QEMU start
to power-off, and loader -> EFI stub (where the firmware, shim and GRUB hash and verify
the next stage)."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMVM = str(Path(sys.executable).parent / "armvm-build")
RUNS = int(os.environ.get("SB_RUNS", "2"))
SNAKEOIL = Path("/usr/share/qemu-efi-aarch64")


def _build(d: Path, name: str, text: str, env: dict) -> Path:
    (d / f"{name}.yaml").write_text(text)
    subprocess.run([ARMVM, "build", "-q", str(d / f"{name}.yaml"), "-o", str(d / "out")],
                   check=True, env=env, capture_output=True)
    return d / "out" / f"{name}.raw"


def _median(events: list, key: str, start: str | None = None):
    vals = [e[key] - (e[start] if start else 0.0) for e in events if key in e and (start is None or start in e)]
    return statistics.median(vals) if vals else None


def run(rows: list, measure) -> None:
    sys.path.insert(0, str(ROOT))
    from builder.run.boot import boot_image
    d = Path(tempfile.mkdtemp(prefix="armvm-sbbench-"))
    try:
        env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", SB_BENCH_PASS="snakeoil")
        shutil.copy(SNAKEOIL / "PkKek-1-snakeoil.key", d / "so.key")
        shutil.copy(SNAKEOIL / "PkKek-1-snakeoil.pem", d / "so.pem")
        uki = (ROOT / "recipes" / "uki-own-key.yaml").read_text()
        uki = uki.replace('key: "{{ keydir }}/db.key"', "key: so.key").replace(
            'cert: "{{ keydir }}/db.crt"', "cert: so.pem\n    passphrase_env: SB_BENCH_PASS").replace(
            "  keydir: keys\n", "")
        images = [("UKI signed (snakeoil)", _build(d, "uki-own-key", uki, env), "snakeoil"),
                  ("shim chain (ms)", _build(d, "debian-arm64-secureboot",
                                             (ROOT / "recipes" / "debian-arm64-secureboot.yaml").read_text(),
                                             env), "ms")]
        for label, image, store in images:
            on, off = [], []
            for _ in range(RUNS):
                for sb, out in ((store, on), (None, off)):
                    res = boot_image(image, arch="aarch64", timeout=300, secure_boot=sb)
                    if not res.ok:
                        raise RuntimeError(f"{image.name} secure_boot={sb}: {res.reason}")
                    out.append(res.events)
            total_on, total_off = _median(on, "poweroff"), _median(off, "poweroff")
            verify_on, verify_off = _median(on, "stub", "loader"), _median(off, "stub", "loader")
            rows.append((f"SB {label}: QEMU start to power-off, SB on", total_on, None,
                         f"loader->stub {verify_on:.1f} s; runs " +
                         ", ".join(f"{e['poweroff']:.1f}" for e in on)))
            rows.append((f"SB {label}: same image, SB off", total_off, None,
                         f"loader->stub {verify_off:.1f} s; runs " +
                         ", ".join(f"{e['poweroff']:.1f}" for e in off)))
            rows.append((f"SB {label}: cost of Secure Boot (s)", total_on - total_off, None,
                         f"loader->stub +{verify_on - verify_off:.1f} s; by hand: +4-6 s under TCG"))
    except Exception as exc:
        rows.append(("secure boot benchmark", None, None, f"skipped: {exc}"[:200]))
    finally:
        shutil.rmtree(d, ignore_errors=True)
