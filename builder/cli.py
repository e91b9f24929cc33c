"""The command line: a thin layer that parses arguments, calls one library function and
prints its result (table or --json). Exit codes: 0 ok, 1 job failed, 2 usage, 3 bad input.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from builder import __version__
from builder.errors import EXIT_FAILED, ArmvmError


class DefaultBuildGroup(TyperGroup):
    """`armvm-build RECIPE` means `armvm-build build RECIPE`: a first argument that is not a
    command but names a file (or looks like a recipe) is routed to `build`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            if Path(args[0]).exists() or args[0].endswith((".yaml", ".yml")):
                args = ["build"] + list(args)
        return super().parse_args(ctx, args)


app = typer.Typer(cls=DefaultBuildGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Build raw disk images that boot on any ARM VM following the ARM VM System "
                       "Specification (GPT + FAT32 ESP + removable-path loader), verify them, boot them.\n\n"
                       "armvm-build RECIPE is short for armvm-build build RECIPE.")


def _version(value: bool):
    if value:
        typer.echo(f"armvm-build {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")):
    pass


def _fail(err: ArmvmError, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"ok": False, "error": str(err), "exit_code": err.exit_code}))
    typer.echo(f"armvm-build: error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def _progress(quiet: bool) -> Optional[bool]:
    return False if quiet else None


def _warn(text: str) -> None:
    typer.echo(f"armvm-build: warning: {text}", err=True)


def _usage(err: ArmvmError) -> None:
    """--set and friends: a malformed argument is a usage error (exit 2)."""
    typer.echo(f"armvm-build: error: {err}", err=True)
    raise typer.Exit(err.exit_code)


SET_HELP = ("Template variable name=value (repeatable; names are case-sensitive; a value that is "
            "more than one plain word stays text inside its YAML scalar).")
LOCK_HELP = "Lock file to use/write (default: <name>.lock beside the recipe, name as rendered)."


@app.command()
def build(recipe: Path = typer.Argument(..., help="The recipe (YAML, Jinja2-templated)."),
          output: Path = typer.Option(Path("output"), "-o", "--output", help="Output folder."),
          set_: List[str] = typer.Option([], "--set", help=SET_HELP),
          checksum: bool = typer.Option(False, "--checksum", help="Also write <name>.raw.sha256 (whole image)."),
          format_: List[str] = typer.Option([], "--format", help="Image file to publish: raw, qcow2, raw.zst or "
                                            "raw.xz (repeatable or comma-separated; overrides output.formats)."),
          offline: bool = typer.Option(False, "--offline", help="Make no network request (cache, --vendor, lock)."),
          mirror: Optional[str] = typer.Option(None, "--mirror", help="Debian mirror URL (else ARMVM_MIRROR, "
                                                "the recipe, then the host's apt sources)."),
          keyring: Optional[Path] = typer.Option(None, "--keyring", help="OpenPGP keyring for InRelease "
                                                 "(default: Debian's archive keyring)."),
          vendor: List[Path] = typer.Option([], "--vendor", help="Folder of exported .debs to use before the "
                                            "network (repeatable)."),
          lock_file: Optional[Path] = typer.Option(None, "--lock", help=LOCK_HELP),
          update_lock: bool = typer.Option(False, "--update-lock", help="Ignore the lock and refresh it."),
          quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress display."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable result on stdout.")):
    """Build output/<name>.raw (+ .manifest.json, .verify.json, .bmap) from a recipe."""
    from builder.build import BuildOptions, build as do_build
    from builder.recipe.load import parse_set
    try:
        overrides = parse_set(set_)
    except ArmvmError as err:
        _usage(err)
    from builder.publish.formats import FORMATS
    formats = [f.strip() for arg in format_ for f in arg.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        _usage(ArmvmError(f"--format {bad[0]!r} is not a format we write; allowed: {', '.join(FORMATS)}", exit_code=2))
    try:
        options = BuildOptions(output_dir=output, overrides=overrides, checksum=checksum, offline=offline,
                               formats=tuple(dict.fromkeys(formats)) or None,
                               mirror=mirror, keyring=keyring, vendor_dirs=tuple(vendor), lock=lock_file,
                               update_lock=update_lock, progress=_progress(quiet or as_json), on_warning=_warn)
        result = do_build(recipe, options)
    except ArmvmError as err:
        _fail(err, as_json)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    elif result.ok:
        typer.echo(f"built {result.image}")
        for p in result.outputs:
            if p != result.image:
                typer.echo(f"  {p}")
        for line in _inputs_lines(result, recipe, overrides, lock_file):
            typer.echo("  " + line)
        typer.echo("  self-check: " + _summary_line(result.report))
        for line in _check_lines(result.report, ("fail", "warn")):
            typer.echo("    " + line)
        typer.echo("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in result.stages.items()))
    if not result.ok:
        typer.echo(f"armvm-build: error: {result.message}", err=True)
        if result.report is not None and not as_json:
            for line in _check_lines(result.report, ("fail", "warn")):
                typer.echo("  " + line, err=True)
        raise typer.Exit(EXIT_FAILED)


def _inputs_lines(result, recipe: Path, overrides: dict, lock_file: Optional[Path]) -> List[str]:
    """What the build was made from: the Debian packages and versions, and the lock."""
    lines = []
    if result.packages:
        lines.append("packages: " + ", ".join(result.packages))
        if result.lock is not None:
            lines.append(f"lock: {result.lock} (versions pinned by it)")
        else:
            import shlex
            cmd = ["armvm-build", "lock", str(recipe)] + [a for k, v in overrides.items()
                                                            for a in ("--set", f"{k}={v}")]
            if lock_file is not None:
                cmd += ["--lock", str(lock_file)]
            lines.append(f"lock: none (resolved from the archive; pin them with: {shlex.join(cmd)})")
    return lines


def _check_lines(report, results) -> List[str]:
    """One line per check with one of `results`, with its detail (fail first)."""
    order = {r: i for i, r in enumerate(results)}
    picked = sorted((c for c in report.checks if c.result in order),
                    key=lambda c: (order[c.result], c.level != "MUST", c.id))
    return [f"{c.result.upper():<4} {c.level:<6} {c.id}: {c.detail or '-'}" for c in picked]


def _summary_line(report) -> str:
    s = report.summary()
    counts = s.get("counts", s)
    return ", ".join(f"{v} {k}" for k, v in counts.items() if isinstance(v, int))


def _needs_config(report) -> bool:
    return any(c.id.startswith("os.") and c.result == "skip" and "kernel-config" in c.detail
               for c in report.checks)


def _fetch_kernel_config(report, quiet: bool = False) -> Path:
    """boot/config-<release> from Debian's linux-image-<release> for the booted kernel, via
    the project's archive client (signed index, cached). Debian keeps only current kernels."""
    import re
    from builder import spec
    from builder.inputs.cache import Cache, default_cache_root
    from builder.inputs.debian.archive import DebianArchive
    from builder.inputs.sources import Fetcher
    rel, arch = report.kernel_release, report.arch
    m = re.fullmatch(r"\d+\.\d+[^\s/]*\+deb(\d+)-[a-z0-9-]+", rel or "")
    suites = {"11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}
    if m is None or m.group(1) not in suites or arch not in spec.ARCHES:
        raise ArmvmError(f"--fetch-config: the kernel release {rel!r} is not a Debian kernel "
                         "release (like 6.12.117+deb13-cloud-arm64); pass --kernel-config FILE")
    archive = DebianArchive(Fetcher(cache=Cache(default_cache_root()), progress=False if quiet else None), mirror=None,
                            suite=suites[m.group(1)], components=["main"],
                            arch=spec.ARCHES[arch].debian_arch)
    tree = archive.extract(archive.resolve(f"linux-image-{rel}"))
    cfg = tree / "boot" / f"config-{rel}"
    if not cfg.is_file():
        raise ArmvmError(f"--fetch-config: linux-image-{rel} has no boot/config-{rel}")
    return cfg


@app.command()
def verify(image: Path = typer.Argument(..., help="A raw disk image (ours or another tool's)."),
           arch: str = typer.Option("auto", "--arch", help="auto, aarch64 or armv7."),
           profile: str = typer.Option("vmspec-2.0", "--profile", help="vmspec-2.0, vmspec-1.0 or rfc-v2."),
           strict: bool = typer.Option(False, "--strict", help="Fail on SHOULD warnings and skipped checks too."),
           kernel_config: Optional[Path] = typer.Option(None, "--kernel-config", help="The kernel's .config "
                                                        "(e.g. /boot/config-<version>) for the os.* checks when the "
                                                        "initramfs carries none (other tools' images)."),
           fetch_config: bool = typer.Option(False, "--fetch-config", help="Network, opt-in: when the "
                                             "os.* checks lack a kernel config, fetch the booted kernel's Debian "
                                             "package (linux-image-<release>) and use its /boot/config-<release>."),
           secure_boot: bool = typer.Option(False, "--secure-boot", help="Require Secure Boot signatures "
                                            "(sb.* checks; they run anyway when the loader is signed)."),
           db: List[Path] = typer.Option([], "--db", help="A trusted db certificate (PEM or DER; repeatable); "
                                         "implies --secure-boot."),
           vars_file: Optional[Path] = typer.Option(None, "--vars", help="A UEFI VARS file (e.g. "
                                                    "AAVMF_VARS.ms.fd) whose db is trusted; implies --secure-boot."),
           as_json: bool = typer.Option(False, "--json", help="JSON report on stdout.")):
    """Check an image against every static requirement of the ARM VM System Specification."""
    if arch not in ("auto", "aarch64", "armv7"):
        raise typer.BadParameter("use auto, aarch64 or armv7", param_hint="--arch")
    if profile not in ("vmspec-2.0", "vmspec-1.0", "rfc-v2"):
        raise typer.BadParameter("use vmspec-2.0, vmspec-1.0 or rfc-v2", param_hint="--profile")
    from builder.verify import verify_image
    try:
        sb = dict(secure_boot=secure_boot, db=db, vars_file=vars_file)
        report = verify_image(image, arch=arch, profile=profile, kernel_config=kernel_config, **sb)
        if fetch_config and kernel_config is None and _needs_config(report):
            cfg = _fetch_kernel_config(report, quiet=as_json)
            report = verify_image(image, arch=arch, profile=profile, kernel_config=cfg, **sb)
    except ArmvmError as err:
        _fail(err, as_json)
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else report.format_table())
    raise typer.Exit(report.exit_code(strict))


@app.command()
def boot(image: Path = typer.Argument(..., help="A raw disk image."),
         arch: str = typer.Option("auto", "--arch", help="auto (from the loader on the ESP), aarch64 or armv7; "
                                  "a value the loader contradicts is an error before booting."),
         timeout: float = typer.Option(180.0, "--timeout", help="Seconds before the guest counts as hung."),
         gic: Optional[int] = typer.Option(None, "--gic", help="GIC version of the virt machine: 2 or 3."),
         acpi: Optional[str] = typer.Option(None, "--acpi", help="AArch64: on (default virt) or off (device tree)."),
         expect: Optional[str] = typer.Option(None, "--expect", help="Regex that counts as success on the console, "
                                              "also matched on unfinished lines (default: our images' marker line)."),
         until_login: bool = typer.Option(False, "--until-login", help="Real OS: wait for a getty login prompt, then "
                                          "press the power button over QMP; ok when the guest powers off within "
                                          "60 s and no systemd unit failed."),
         checks: bool = typer.Option(False, "--checks", help="Boot the runtime matrix and report rt.* checks."),
         secure_boot: Optional[str] = typer.Option(None, "--secure-boot", metavar="ms|snakeoil|PATH.fd",
                                                   help="AArch64: boot with Secure Boot enforced: ms (Microsoft's CAs, "
                                                   "AAVMF_VARS.ms.fd), snakeoil (Debian's test key) or a VARS file "
                                                   "(`armvm-build keys`); a refusal ends the boot at once; with --checks "
                                                   "adds rt.secureboot."),
         xen: bool = typer.Option(False, "--xen", help="AArch64: boot the image as a Xen DomU (Debian's Xen under "
                                  "QEMU TCG, Dom0 from Debian packages); with --checks, adds rt.xen-* checks; "
                                  "with --until-login, Dom0 sends xl shutdown instead of the power button "
                                  "(the DomU has 120 s to power off)."),
         xen_firmware: Optional[Path] = typer.Option(None, "--xen-firmware", help="With --xen: an edk2 ArmVirtXen "
                                                     "XEN_EFI.fd started as the DomU, which then boots the image's "
                                                     "own loader from xvda (experimental; Debian ships none)."),
         direct: bool = typer.Option(False, "--direct", help="Boot <name>.vmlinuz/.initrd/.cmdline beside the image "
                                     "with -kernel/-initrd/-append (no firmware; outside the spec's image contract)."),
         interactive: bool = typer.Option(False, "--interactive", help="Serial console on this terminal; no marker wait."),
         qemu_arg: List[str] = typer.Option([], "--qemu-arg", help="Extra QEMU argument (repeatable)."),
         log: Optional[Path] = typer.Option(None, "--log", help="Where to save the console log (default: "
                                            "<image folder>/<name>.boot.log)."),
         verbose: bool = typer.Option(False, "-v", "--verbose", help="Stream the guest console to stderr."),
         quiet: bool = typer.Option(False, "-q", "--quiet", help="No live progress."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable result on stdout."),
         report: bool = typer.Option(False, "--report", help="Write <name>.report.html beside the image: the "
                                     "build's report plus the boot timeline and the runtime report.")):
    """Boot an image under QEMU with the AAVMF firmware and report what the guest saw."""
    if arch not in ("auto", "aarch64", "armv7"):
        raise typer.BadParameter("use auto, aarch64 or armv7", param_hint="--arch")
    if gic not in (None, 2, 3):
        raise typer.BadParameter("use 2 or 3", param_hint="--gic")
    if acpi not in (None, "on", "off"):
        raise typer.BadParameter("use on or off", param_hint="--acpi")
    if checks and until_login:
        raise typer.BadParameter("--checks boots our marker images; use one of them", param_hint="--until-login")
    if secure_boot is not None and direct:
        raise typer.BadParameter("Secure Boot needs the firmware; drop --direct", param_hint="--secure-boot")
    if report and (checks or interactive):
        raise typer.BadParameter("--report draws one boot; not with --checks or --interactive", param_hint="--report")
    if xen_firmware is not None and not xen:
        raise typer.BadParameter("only with --xen", param_hint="--xen-firmware")
    if xen and (direct or interactive or gic is not None or acpi is not None or expect is not None):
        raise typer.BadParameter("--xen boots its own machine (GICv3, device tree) and waits for the marker or "
                                 "login prompt; drop --direct, --interactive, --gic, --acpi and --expect",
                                 param_hint="--xen")
    from builder.run import bootcheck
    from builder.run import bootview
    from builder.errors import NotAnImageError
    live = bootview.BootProgress(False if (quiet or as_json or verbose or interactive) else None)
    stem = image.name[:-4] if image.name.endswith(".raw") else image.name
    log_path = log if log is not None else image.parent / f"{stem}.boot.log"
    try:
        if not image.is_file():
            raise NotAnImageError(f"{image}: no such image file")
        if xen:
            from builder.payload import xen_boot      # the writers run/ must not import
            from builder.run import xen_cli
            code = xen_cli.run(image, arch=arch, timeout=timeout, until_login=until_login, checks=checks,
                               log_path=log_path, qemu_args=qemu_arg, verbose=verbose, quiet=quiet,
                               as_json=as_json, live=live, stem=stem, guest_firmware=xen_firmware,
                               stager=xen_boot)
            raise typer.Exit(code)
        if checks:
            if arch == "auto":
                arch = bootcheck.detect_arch(image)
            else:
                bootcheck.check_arch(image, arch)      # before booting anything
            with live:
                out = bootcheck.run_checks(image, arch=arch, timeout=timeout, qemu_args=qemu_arg,
                                           progress=live, verbose=verbose, secure_boot=secure_boot,
                                           log_dir=log_path.parent, log_stem=stem)
            report = bootcheck.checks_report(out)
            if as_json:
                typer.echo(json.dumps({**out, "checks": [c.to_json() for c in out["checks"]],
                                       "summary": report.summary()}, indent=2))
            else:
                for sc in out["scenarios"]:
                    typer.echo(f"{sc['scenario']}: {'ok' if sc['ok'] else 'FAILED: ' + sc['reason']}"
                               + (f" (console log: {sc['log']})" if sc.get("log") else ""))
                typer.echo("")
                typer.echo(report.format_table())
            raise typer.Exit(0 if out["ok"] else EXIT_FAILED)
        from builder.run.boot import boot_image
        direct_args = _direct_files(image) if direct else None
        with live:
            task = live.boot(image.name)
            lines = [task.on_line] + ([lambda line: typer.echo(line, err=True)] if verbose else [])
            res = boot_image(image, arch=arch, timeout=timeout, gic=gic, acpi=None if acpi is None else acpi == "on",
                             expect=expect, interactive=interactive, qemu_args=qemu_arg, direct=direct_args,
                             on_line=lambda line: [f(line) for f in lines], on_event=task.on_event,
                             until_login=until_login, log_path=None if interactive else log_path,
                             secure_boot=secure_boot)
            task.done()
    except ArmvmError as err:
        _fail(err, as_json)
    except KeyboardInterrupt:           # Ctrl-C, SIGTERM, SIGHUP (builder.run.boot)
        kept = f"console logs kept in {log_path.parent}" if checks else f"console log kept at {log_path}"
        typer.echo(f"armvm-build: interrupted; QEMU stopped, {kept}", err=True)
        raise typer.Exit(130)
    report_path = None
    if report:
        from builder.publish.report_html import publish_boot_report
        try:
            report_path = publish_boot_report(image, res.to_json(), res.console)
        except ArmvmError as err:
            _fail(err, as_json)
        except OSError as err:
            _fail(ArmvmError(f"cannot write the report beside {image}: {err.strerror}"), as_json)
    if as_json:
        typer.echo(json.dumps({**res.to_json(), **({"report": str(report_path)} if report_path else {})}, indent=2))
    elif interactive:
        typer.echo(res.reason)
    elif res.ok:
        from builder.verify.runtime import parse_runtime_report
        typer.echo(bootview.success_text(res, parse_runtime_report(res.console)))
    else:
        typer.echo(bootview.failure_text(res, until_login=until_login))
    if report_path is not None and not as_json:
        typer.echo(f"report: {report_path}")
    raise typer.Exit(0 if res.ok else EXIT_FAILED)


def _direct_files(image: Path):
    from builder.errors import NotAnImageError
    stem = image.with_suffix("")
    kernel, initrd, cmdline = (Path(f"{stem}.vmlinuz"), Path(f"{stem}.initrd"), Path(f"{stem}.cmdline"))
    if not kernel.is_file():
        raise NotAnImageError(f"{kernel} not found: build with `output: {{direct: true}}` for direct boot")
    return (kernel, initrd if initrd.is_file() else None,
            cmdline.read_text().strip() if cmdline.is_file() else "")


@app.command("keys")
def keys_cmd(dest: Path = typer.Argument(..., help="Folder for PK/KEK/db keys, certificates and VARS.fd."),
             common_name: Optional[str] = typer.Option(None, "--cn", help="Common name prefix of the certificates "
                                                       "(default: 'armvm-build <folder name>')."),
             quiet: bool = typer.Option(False, "-q", "--quiet", help="No live progress."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable result on stdout.")):
    """Make Secure Boot keys (PK, KEK, db: RSA-2048 + X.509) and VARS.fd with them enrolled and Secure Boot on."""
    from builder.payload.keys import make_keys
    from builder.progress import BuildProgress
    try:
        with BuildProgress(_progress(quiet or as_json)) as progress:
            res = make_keys(dest, common_name=common_name, stage=progress.stage)
    except ArmvmError as err:
        _fail(err, as_json)
    if as_json:
        typer.echo(json.dumps({"ok": True, **res.to_json()}, indent=2))
        return
    typer.echo(f"keys written to {res.dir} (private keys mode 0600; never put them into an image):")
    for name, path in res.files.items():
        typer.echo(f"  {path}")
    typer.echo(f"sign with bootloader.sign: {{key: {res.files['db.key']}, cert: {res.files['db.crt']}}}; "
               f"boot with --secure-boot {res.files['VARS.fd']}")


@app.command("lock")
def lock_cmd(recipe: Path = typer.Argument(..., help="The recipe."),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP),
             mirror: Optional[str] = typer.Option(None, "--mirror", help="Debian mirror URL."),
             keyring: Optional[Path] = typer.Option(None, "--keyring", help="OpenPGP keyring for InRelease."),
             lock_file: Optional[Path] = typer.Option(None, "--lock", help=LOCK_HELP),
             quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress display.")):
    """Pin every Debian package the recipe uses (and SOURCE_DATE_EPOCH) in a lock file."""
    from builder.build import BuildOptions, lock
    from builder.recipe.load import parse_set
    try:
        overrides = parse_set(set_)
    except ArmvmError as err:
        _usage(err)
    try:
        path = lock(recipe, BuildOptions(overrides=overrides, mirror=mirror, keyring=keyring, lock=lock_file,
                                         progress=_progress(quiet)), on_warning=_warn)
    except ArmvmError as err:
        _fail(err, False)
    typer.echo(f"wrote {path}")


@app.command("vendor")
def vendor_cmd(recipe: Path = typer.Argument(..., help="The recipe (its lock must exist)."),
               dest: Path = typer.Argument(..., help="Folder to export the pinned .deb files to."),
               set_: List[str] = typer.Option([], "--set", help=SET_HELP),
               offline: bool = typer.Option(False, "--offline", help="Only from the cache; no network."),
               lock_file: Optional[Path] = typer.Option(None, "--lock", help=LOCK_HELP),
               quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress display.")):
    """Export the files a lock pins, so the image can be rebuilt after the archive moves on."""
    from builder.build import BuildOptions, vendor
    from builder.recipe.load import parse_set
    try:
        overrides = parse_set(set_)
    except ArmvmError as err:
        _usage(err)
    try:
        paths = vendor(recipe, dest, BuildOptions(overrides=overrides, offline=offline, lock=lock_file,
                                                  progress=_progress(quiet)), on_warning=_warn)
    except ArmvmError as err:
        _fail(err, False)
    typer.echo(f"exported {len(paths)} file(s) to {dest}")


cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="List or prune the download and extraction cache "
                             "($ARMVM_CACHE_DIR, else $XDG_CACHE_HOME/armvm-build, else ~/.cache/armvm-build).")
app.add_typer(cache_app, name="cache")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@cache_app.command("list")
def cache_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable list on stdout.")):
    """Every cached blob and tree with its size and last use, least recently used first."""
    import time as _time
    from builder.inputs.cache import default_cache_root
    from builder.inputs.cache_admin import list_entries
    root = default_cache_root()
    entries = list_entries(root)
    total = sum(e.size for e in entries)
    if as_json:
        typer.echo(json.dumps({"root": str(root), "total_bytes": total,
                               "entries": [e.to_json() for e in entries]}, indent=2))
        return
    typer.echo(f"cache {root}: {len(entries)} entries, {_mib(total)}")
    for e in entries:
        used = _time.strftime("%Y-%m-%d %H:%M", _time.gmtime(e.last_used))
        typer.echo(f"  {e.kind:<12} {_mib(e.size):>11}  {used}Z  {e.key}")


@cache_app.command("prune")
def cache_prune(older_than: Optional[float] = typer.Option(None, "--older-than", metavar="DAYS",
                                                           help="Remove entries unused for more than DAYS days."),
                max_size: Optional[str] = typer.Option(None, "--max-size", metavar="SIZE",
                                                       help="Then remove the least recently used entries until the "
                                                            "cache holds at most SIZE (e.g. 500MiB, 2GiB)."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable result on stdout.")):
    """Remove cache entries by age of last use and/or total size. Entries a running build holds
    are never removed; with no option, entries unused for 30 days go."""
    from builder.inputs.cache import default_cache_root
    from builder.inputs.cache_admin import prune
    limit = None
    if max_size is not None:
        from builder.errors import RecipeError
        from builder.recipe.validate import parse_size
        try:
            limit = parse_size(max_size)
        except RecipeError as err:
            raise typer.BadParameter(err.allowed or str(err), param_hint="--max-size")
    if older_than is not None and older_than < 0:
        raise typer.BadParameter("use a number of days >= 0", param_hint="--older-than")
    if older_than is None and limit is None:
        older_than = 30.0
    try:
        result = prune(default_cache_root(), older_than_days=older_than, max_size=limit, dry_run=dry_run)
    except OSError as err:
        _fail(ArmvmError(f"cannot prune the cache: {err.strerror or err}"), as_json)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(result['removed'])} entries ({_mib(result['freed_bytes'])}); "
               f"{_mib(result['remaining_bytes'])} remain in {result['root']}")
    for e in result["removed"]:
        typer.echo(f"  {e['kind']:<12} {_mib(e['bytes']):>11}  {e['key']}")
    if result["busy"]:
        typer.echo(f"kept {len(result['busy'])} entries a running build holds")


@app.command()
def schema():
    """Print the recipe JSON Schema (for editors)."""
    from builder.recipe.schema import SCHEMA
    typer.echo(json.dumps(SCHEMA, indent=2))


def main():
    try:
        app()
    except KeyboardInterrupt:
        print("armvm-build: interrupted; nothing was published", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
