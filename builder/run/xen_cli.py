"""`armvm-build boot IMAGE --xen [--checks] [--until-login]`: run builder.run.xen and print
what happened (kept out of cli.py, which stays thin)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from builder.errors import EXIT_FAILED

CLI_DEFAULT_TIMEOUT = 180.0           # `boot --timeout`'s default; --xen needs longer
LAST_LINES = 12


def _timeout(t: float) -> float:
    from builder.run.xen import DEFAULT_TIMEOUT
    return float(DEFAULT_TIMEOUT) if t == CLI_DEFAULT_TIMEOUT else float(t)


def run(image: Path, *, arch: str, timeout: float, until_login: bool, checks: bool,
        log_path: Path, qemu_args, verbose: bool, quiet: bool, as_json: bool, live,
        stem: str, guest_firmware=None, stager=None) -> int:
    from builder.run import bootcheck, xen
    from builder.verify.runtime import parse_runtime_report, xen_checks
    chatty = not (quiet or as_json)

    def say(msg: str) -> None:
        if chatty:
            print(f"xen: {msg}", file=sys.stderr, flush=True)
    out = None
    if checks:
        if arch == "auto":
            arch = bootcheck.detect_arch(image)
        xen.check_arch(arch)                        # before booting anything
        with live:
            out = bootcheck.run_checks(image, arch=arch, timeout=CLI_DEFAULT_TIMEOUT
                                       if timeout == CLI_DEFAULT_TIMEOUT else timeout,
                                       qemu_args=qemu_args, progress=live, verbose=verbose,
                                       log_dir=log_path.parent, log_stem=stem)
        log_path = log_path.parent / f"{stem}.boot.xen.log"
    lines = [lambda ln: print(ln, file=sys.stderr, flush=True)] if verbose else []
    with live:
        task = live.boot(f"{image.name} (xen)")
        try:
            res = xen.boot_xen(image, arch=arch, timeout=_timeout(timeout),
                               until_login=until_login, log_path=log_path,
                               qemu_args=qemu_args, say=say, guest_firmware=guest_firmware, stager=stager,
                               on_line=lambda ln: [f(ln) for f in lines + [task.on_line]],
                               on_event=task.on_event)
        finally:
            task.done()
    facts = parse_runtime_report(res.domu_console)
    if out is not None:
        from dataclasses import replace
        xc = [replace(c, detail=f"[xen] {c.detail}") for c in
              xen_checks(facts, scenario={"reached_goal": "goal" in res.events,
                                          "ok": res.ok, "reason": res.reason,
                                          "domu_source": res.domu_source})]
        out["checks"] = sorted(out["checks"] + xc, key=lambda c: c.id)
        out["scenarios"].append({"scenario": "xen", "ok": res.ok, "reason": res.reason,
                                 "log": res.log, "events": res.events, "spans": res.spans,
                                 "checks": [c.to_json() for c in xc]})
        out["ok"] = out["ok"] and res.ok and all(c.result != "fail" for c in xc)
        report = bootcheck.checks_report(out)
        if as_json:
            print(json.dumps({**out, "checks": [c.to_json() for c in out["checks"]],
                              "summary": report.summary()}, indent=2))
        else:
            for sc in out["scenarios"]:
                print(f"{sc['scenario']}: {'ok' if sc['ok'] else 'FAILED: ' + sc['reason']}"
                      + (f" (console log: {sc['log']})" if sc.get("log") else ""))
            print(f"xen timings: {format_spans(res.spans)}\n")
            print(report.format_table())
        return 0 if out["ok"] else EXIT_FAILED
    if as_json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        print(text(res, facts))
    return 0 if res.ok else EXIT_FAILED


def format_spans(sp: dict) -> str:
    names = (("firmware", "firmware to Xen"), ("xen", "Xen to Dom0 kernel"),
             ("dom0", "Dom0 kernel to Xen tools up"), ("domu", "DomU create to goal"),
             ("total", "total"))
    return ", ".join(f"{label} {sp[k]:.1f}s" for k, label in names if sp.get(k) is not None)


def text(res, facts) -> str:
    from builder.run.bootview import facts_rows, table
    if res.ok:
        lines = [f"booted under Xen {res.kit.get('xen', '?')}: {res.reason}"]
        if facts.report_lines:
            rows = facts_rows(facts) + [("hypervisor", facts.hypervisor or "?")]
            rows += [("xen device", f"{n}: driver {d}") for n, d in facts.xen_devices]
            lines += ["what the DomU saw:", table(rows)]
    else:
        domu, dom0 = res.last_lines(LAST_LINES)
        lines = [f"xen boot FAILED: {res.reason}",
                 f"last {len(domu)} DomU console lines:" if domu else "no DomU console output"]
        lines += [f"  | {ln}" for ln in domu]
        lines.append(f"last {len(dom0)} Xen/Dom0 console lines:" if dom0 else "no console output")
        lines += [f"  | {ln}" for ln in dom0]
    lines.append(f"timings: {format_spans(res.spans)}")
    d0 = res.dom0 or {}
    if d0.get("poweroff_seconds") is not None:
        lines.append(f"DomU power-off after xl shutdown: {d0['poweroff_seconds']} s"
                     + ("" if d0.get("poweroff") == "poweroff" else " (still running)"))
    if d0.get("cpu"):
        lines.append("CPU used until the goal: " + ", ".join(
            f"{name} {c['seconds']:.1f} s on {c['vcpus']} vCPU{'s' if c['vcpus'] > 1 else ''}"
            for name, c in d0["cpu"].items()))
    if d0.get("netback") or d0.get("vif_state"):
        state = {"4": "Connected (xen-netfront connected)", "6": "Closed"}.get(
            d0.get("vif_state", ""), d0.get("vif_state", "?"))
        lines.append(f"DomU vif: back-end state {state}, hotplug-status "
                     f"{d0.get('netback', '?')} (xen-netback, no bridge)")
    if res.failed_units:
        lines.append(f"failed systemd units in the DomU: {', '.join(res.failed_units)}")
    lines.append(f"DomU started: {res.domu_source or '?'}" + (
        "" if "firmware" in (res.domu_source or "") else "; no guest UEFI under Xen"))
    if res.kit.get("debs"):
        lines.append(f"Dom0 kit: Xen {res.kit['xen']}, {res.kit['debs']} .debs "
                     f"({res.kit['debs_bytes'] / 2**20:.0f} MiB), pinned in {res.kit['lock']}")
    for what, p in (("console log", res.log), ("DomU console log", res.domu_log)):
        if p:
            lines.append(f"{what}: {p}")
    return "\n".join(lines)
