"""`armvm-build boot --checks`: boot an image in a small matrix of VM configurations and
turn what the guest reported into rt.* checks.

AArch64: GICv2 + ACPI (the default `virt` machine) and GICv3 + device tree
(`-M virt,acpi=off`), both with extra virtio devices on PCI and MMIO.
AArch32: GICv2 and GICv3, device tree (AAVMF32 has no ACPI).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence


# Measured on a shared 2-core TCG host: both scenarios at once took 0.70x and 0.61x the
# time of one after the other (74.9 s vs 107.6 s, 55.5 s vs 90.8 s); a booting guest keeps
# about one vCPU busy, so one core per boot is enough to gain. With one vCPU per concurrent
# guest: 0.51-0.80x (median 0.66x over five pairs at load 5-14, README "Benchmarks").
CONCURRENT_MIN_CORES_PER_BOOT = 1
# vCPUs per guest. Under TCG every vCPU is a host thread: two 2-vCPU guests at once are four
# threads on two cores, and cross-vCPU work (secondary bring-up, TLB shootdowns) makes each
# slower. Concurrent boots therefore give each guest one vCPU, so each keeps one core; the
# matrix judges GIC, ACPI/DT, virtio transports and power-off, none of which needs a second
# vCPU (PSCI is checked statically, os.psci). Alone, a guest keeps the runner's default 2.
CONCURRENT_CPUS = 1
SEQUENTIAL_CPUS = 2


@dataclass(frozen=True)
class Scenario:
    name: str
    gic: int
    acpi: bool
    balloon: str        # QEMU allows one balloon device: which transport carries it


# virtio device IDs: 1 net, 2 block, 3 console, 5 balloon
def _expected(balloon: str) -> dict:
    return {t: [1, 2, 3] + ([5] if t == balloon else []) for t in ("pci", "mmio")}


def scenarios(arch: str) -> List[Scenario]:
    if arch == "aarch64":
        return [Scenario("gicv2-acpi", 2, True, "pci"), Scenario("gicv3-dt", 3, False, "mmio")]
    return [Scenario("gicv2-dt", 2, False, "pci"), Scenario("gicv3-dt", 3, False, "mmio")]


def detect_arch(image: Path) -> str:
    """The target architecture from the removable-path loader on the ESP."""
    from builder.errors import NotAnImageError
    from builder.run.qemu import probe_image
    arch = probe_image(image).arch
    if arch is None:
        raise NotAnImageError(f"{image}: cannot tell the architecture (no BOOTAA64.EFI or BOOTARM.EFI on "
                              "an ESP); pass --arch aarch64 or --arch armv7")
    return arch


def check_arch(image: Path, arch: str) -> None:
    """Refuse, before booting, an --arch that the image's loader contradicts."""
    from builder import spec
    from builder.errors import NotAnImageError
    from builder.run.qemu import probe_image
    found = probe_image(image).arch
    if found is not None and found != arch:
        raise NotAnImageError(f"{image}: its loader is for {found} (\\EFI\\BOOT\\"
                              f"{spec.ARCHES[found].removable_name}), not {arch}: drop --arch or "
                              f"give --arch {found}")


def _one(image, sc: Scenario, arch: str, timeout: float, qemu_args, progress, verbose, log_dir,
         log_stem, cancel=None, secure_boot=None, cpus: int = 2) -> tuple:
    from builder.run.boot import boot_image
    from builder.verify.runtime import parse_runtime_report, runtime_checks
    task = progress.boot(sc.name) if progress is not None else None
    lines = ([task.on_line] if task else []) + ([_echo_err(sc.name)] if verbose else [])
    log = Path(log_dir) / f"{log_stem}.boot.{sc.name}.log" if log_dir is not None else None
    try:
        res = boot_image(image, arch=arch, timeout=timeout, gic=sc.gic,
                         acpi=sc.acpi if arch == "aarch64" else None, extra_virtio=sc.balloon,
                         qemu_args=qemu_args, on_line=lambda ln: [f(ln) for f in lines],
                         on_event=task.on_event if task else None, log_path=log,
                         cancel=cancel, secure_boot=secure_boot, cpus=cpus)
    finally:
        if task is not None:
            task.done()
    facts = parse_runtime_report(res.console)
    scenario = {"gic": sc.gic, "acpi": sc.acpi, "virtio_transports": ["pci", "mmio"],
                "virtio_devices": _expected(sc.balloon),
                "reached_marker": res.ok or "marker" in res.events,
                "powered_off": res.exit_status is not None and not res.timed_out,
                "loader_seen": "loader" in res.events, "secure_boot": secure_boot}
    sc_checks = [replace(c, detail=f"[{sc.name}] {c.detail}")
                 for c in runtime_checks(facts, arch=arch, scenario=scenario)]
    return ({"scenario": sc.name, "ok": res.ok, "reason": res.reason, "log": res.log,
             "events": {k: round(v, 2) for k, v in res.events.items()},
             "checks": [c.to_json() for c in sc_checks]}, sc_checks)


def _echo_err(name: str):
    import sys

    def echo(line: str) -> None:
        print(f"[{name}] {line}", file=sys.stderr, flush=True)
    return echo


def can_run_concurrently(n: int, memory_mb: int = 1024) -> bool:
    """Boots at once only with a core per boot and the guests' memory available twice
    over."""
    import os
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split()[1:]}
        avail_mb = info.get("MemAvailable", 0) // 1024
    except (OSError, ValueError, IndexError):
        avail_mb = 0
    return cores >= CONCURRENT_MIN_CORES_PER_BOOT * n and avail_mb >= 2 * n * memory_mb


def run_checks(image: Path, *, arch: str, timeout: float, qemu_args: Sequence[str] = (),
               progress=None, verbose: bool = False, log_dir: Optional[Path] = None,
               log_stem: str = "image", concurrent: Optional[bool] = None,
               secure_boot: Optional[str] = None, cpus: Optional[int] = None) -> dict:
    """Boot each scenario; returns {"scenarios": [...], "checks": [Check...], "ok": bool}.
    concurrent None decides by cores and memory (can_run_concurrently); cpus None gives
    each guest CONCURRENT_CPUS or SEQUENTIAL_CPUS vCPUs."""
    from builder.run.boot import signals_as_interrupt
    scs = scenarios(arch)
    if concurrent is None:
        concurrent = can_run_concurrently(len(scs))
    cancel = threading.Event()
    if cpus is None:     # concurrent: one vCPU (one TCG thread) per guest, one core each
        cpus = CONCURRENT_CPUS if concurrent else SEQUENTIAL_CPUS
    args = (arch, timeout, qemu_args, progress, verbose, log_dir, log_stem, cancel, secure_boot, cpus)
    with signals_as_interrupt():
        if concurrent:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(len(scs)) as pool:
                try:
                    done = list(pool.map(lambda sc: _one(image, sc, *args), scs))
                except BaseException:
                    cancel.set()          # Ctrl-C / SIGTERM: stop the other boots too
                    raise
        else:
            done = [_one(image, sc, *args) for sc in scs]
    results = [r for r, _ in done]
    merged = _merge([c for _, cs in done for c in cs])
    ok = all(r["ok"] for r in results) and all(c.result != "fail" for c in merged)
    return {"image": str(image), "arch": arch, "ok": ok, "concurrent": bool(concurrent), "cpus": cpus,
            "scenarios": results, "checks": merged}


def checks_report(out: dict, profile: str = "vmspec-2.0"):
    """The merged rt.* checks as a verify Report: same table, levels and count line."""
    from builder.verify.report import Report
    return Report(image=out["image"], arch=out["arch"], profile=profile,
                  checks=tuple(out["checks"]))
def _merge(checks) -> list:
    """One result per check id over all scenarios: fail wins over warn, warn over pass,
    pass over skip; details of the winning result are joined."""
    rank = {"fail": 3, "warn": 2, "pass": 1, "skip": 0}
    best = {}
    for c in checks:
        cur = best.get(c.id)
        if cur is None or rank[c.result] > rank[cur.result]:
            best[c.id] = c
        elif rank[c.result] == rank[cur.result] and c.detail != cur.detail:
            best[c.id] = replace(cur, detail=f"{cur.detail}; {c.detail}")
    return [best[k] for k in sorted(best)]
