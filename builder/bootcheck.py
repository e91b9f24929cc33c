"""`armvm-build boot --checks`: boot an image in a small matrix of VM configurations and
turn what the guest reported into rt.* checks.

AArch64: GICv2 + ACPI (the default `virt` machine) and GICv3 + device tree
(`-M virt,acpi=off`), both with extra virtio devices on PCI and MMIO.
AArch32: GICv2 and GICv3, device tree (AAVMF32 has no ACPI).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence


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
    from builder.qemu import probe_image
    arch = probe_image(image).arch
    if arch is None:
        raise NotAnImageError(f"{image}: cannot tell the architecture (no BOOTAA64.EFI or BOOTARM.EFI on "
                              "an ESP); pass --arch aarch64 or --arch armv7")
    return arch


def run_checks(image: Path, *, arch: str, timeout: float, qemu_args: Sequence[str] = (),
               on_line=None) -> dict:
    """Boot each scenario; returns {"scenarios": [...], "checks": [Check...], "ok": bool}."""
    from builder.boot import boot_image
    from builder.verify.runtime import parse_runtime_report, runtime_checks
    results, checks = [], []
    for sc in scenarios(arch):
        res = boot_image(image, arch=arch, timeout=timeout, gic=sc.gic, acpi=sc.acpi if arch == "aarch64" else None,
                         extra_virtio=sc.balloon, qemu_args=qemu_args,
                         on_line=on_line)
        facts = parse_runtime_report(res.console)
        scenario = {"gic": sc.gic, "acpi": sc.acpi, "virtio_transports": ["pci", "mmio"],
                    "virtio_devices": _expected(sc.balloon),
                    "reached_marker": res.ok or "marker" in res.events,
                    "powered_off": res.exit_status is not None and not res.timed_out,
                    "loader_seen": "loader" in res.events}
        sc_checks = [replace(c, detail=f"[{sc.name}] {c.detail}")
                     for c in runtime_checks(facts, arch=arch, scenario=scenario)]
        results.append({"scenario": sc.name, "ok": res.ok, "reason": res.reason,
                        "events": {k: round(v, 2) for k, v in res.events.items()},
                        "checks": [c.__dict__ if not hasattr(c, "to_json") else c.to_json() for c in sc_checks]})
        checks.extend(sc_checks)
    merged = _merge(checks)
    ok = all(r["ok"] for r in results) and all(c.result != "fail" for c in merged)
    return {"image": str(image), "arch": arch, "ok": ok, "scenarios": results, "checks": merged}


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


def check_table(checks) -> str:
    lines = [f"{'check':<22} {'result':<6} detail"]
    for c in checks:
        lines.append(f"{c.id:<22} {c.result:<6} {c.detail}")
    return "\n".join(lines)
