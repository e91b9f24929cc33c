"""The build's user experience (issue 8): live progress on a terminal and nothing extra
elsewhere, summaries that name things, layout checked before the network, one lock per
variant, virtio transports, unused variables, and one clear message per mistake."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from builder.build import BuildOptions, build, lock_command, lock_path
from builder.preflight import preflight
from builder.errors import RecipeError
from builder.recipe.load import load_recipe
from tests.fixtures import efi_recipe

ROOT = Path(__file__).resolve().parent.parent
ENV = {"SOURCE_DATE_EPOCH": "1700000000"}


def cli_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARMVM_VAR_")}
    env.update(ARMVM_CACHE_DIR=str(tmp_path / "cache"), SOURCE_DATE_EPOCH="1700000000", **extra)
    return env


def run_cli(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=env or cli_env(tmp_path), cwd=tmp_path, timeout=600)


def run_in_pty(argv, env, cwd, timeout=900):
    """Run argv with stdin/stdout/stderr on a pseudo-terminal; -> (exit code, output bytes,
    largest gap in seconds between two pieces of output while it ran, and the output that came
    just before that gap)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    out, gaps, last = bytearray(), [], None          # from the first output on (start-up is no stage)
    worst = (0.0, b"")
    start = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                    if now - last > worst[0]:
                        worst = (now - last, bytes(out[-300:]))
                last = now
                out += chunk
            elif proc.poll() is not None:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                break
    finally:
        os.close(master)
        proc.wait()
    run_in_pty.worst_context = worst[1]
    return proc.returncode, bytes(out), max(gaps or [0.0])


# --- progress --------------------------------------------------------------------------------
def test_progress_on_a_terminal_and_nothing_extra_otherwise(tmp_path):
    recipe = efi_recipe(tmp_path)
    argv = [sys.executable, "-m", "builder", "build", str(recipe), "-o", str(tmp_path / "out")]
    code, out, _ = run_in_pty(argv, cli_env(tmp_path, TERM="xterm", COLUMNS="100"), tmp_path)
    assert code == 0, out.decode(errors="replace")
    text = out.decode(errors="replace")
    for label in ("check the layout", "assemble the image", "self-check"):
        assert label in text, text
    code, quiet, _ = run_in_pty(argv + ["-q"], cli_env(tmp_path, TERM="xterm"), tmp_path)
    assert code == 0 and b"assemble the image" not in quiet and b"\x1b[" not in quiet
    piped = run_cli(tmp_path, "build", recipe, "-o", tmp_path / "out")
    assert piped.returncode == 0 and "assemble the image" not in piped.stderr + piped.stdout
    as_json = run_cli(tmp_path, "build", recipe, "-o", tmp_path / "out", "--json")
    assert json.loads(as_json.stdout)["ok"] and as_json.stderr == ""


@pytest.mark.network
def test_cold_debian_build_on_a_terminal_is_never_silent_for_2s(tmp_path):
    """A cold build (empty cache) of the default recipe on a pty: output never stops for
    more than 2 s while it runs (the issue's requirement, measured from the outside)."""
    if os.environ.get("ARMVM_OFFLINE_TESTS") == "1":
        pytest.skip("needs the Debian archive")
    argv = [sys.executable, "-m", "builder", "build", str(ROOT / "recipes" / "debian-arm64.yaml"),
            "-o", str(tmp_path / "out")]
    code, out, gap = run_in_pty(argv, cli_env(tmp_path, TERM="xterm", COLUMNS="100"), tmp_path)
    text = out.decode(errors="replace")
    assert code == 0, text[-3000:]
    for label in ("resolve and index", "extract packages", "module scan", "initramfs"):
        assert label in text
    assert gap <= 2.0, (f"output stopped for {gap:.1f} s after: "
                        f"{run_in_pty.worst_context.decode(errors='replace')!r}")


# --- summaries ---------------------------------------------------------------------------------
def test_summary_lists_every_warn_and_fail_with_detail():
    from builder.cli import _check_lines, _summary_line
    from builder.verify.report import Check, Report
    checks = (Check("a.pass", "MUST", "r", "s", "pass", "fine"),
              Check("os.xen-pv", "SHOULD", "r", "s", "warn", "XEN_BALLOON is not set"),
              Check("os.virtio", "SHOULD", "r", "s", "warn", "virtio_pci not in the initramfs"),
              Check("boot.pe", "MUST", "r", "s", "fail", "machine 0x8664 is not 0xAA64"),
              Check("rt.x", "MUST", "r", "s", "skip", "no guest"))
    lines = _check_lines(Report("i", "aarch64", "vmspec-2.0", checks), ("fail", "warn"))
    assert lines == ["FAIL MUST   boot.pe: machine 0x8664 is not 0xAA64",
                     "WARN SHOULD os.virtio: virtio_pci not in the initramfs",
                     "WARN SHOULD os.xen-pv: XEN_BALLOON is not set"]
    assert _summary_line(Report("i", "aarch64", "vmspec-2.0", checks)) == "1 pass, 1 fail, 2 warn, 1 skip"


def test_failed_must_prints_its_detail(tmp_path):
    recipe = efi_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("arch: aarch64", "arch: armv7"))
    from tests.fixtures import ARM, pe_image
    (tmp_path / "files" / "loader.efi").write_bytes(pe_image(ARM))
    res = run_cli(tmp_path, "build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 1
    report = json.loads((tmp_path / "out" / "demo.failed.verify.json").read_text())
    kernel = next(c for c in report["checks"] if c["id"] == "boot.kernel")
    assert kernel["result"] == "fail" and f"FAIL MUST   boot.kernel: {kernel['detail']}" in res.stderr


def test_result_names_packages_and_lock():
    from builder.build import BuildResult
    res = BuildResult(True, "x", None, [], {}, packages=["busybox-static 1:1.37.0-6"], lock=Path("x.lock"))
    from builder.cli import _inputs_lines
    assert _inputs_lines(res, Path("r.yaml"), {}, None) == ["packages: busybox-static 1:1.37.0-6",
                                                           "lock: x.lock (versions pinned by it)"]
    res.lock = None
    line = _inputs_lines(res, Path("r.yaml"), {"suite": "sid"}, Path("v.lock"))[1]
    assert line.endswith("pin them with: armvm-build lock r.yaml --set suite=sid --lock v.lock)")


# --- layout and files before the network --------------------------------------------------------
DEBIAN_RECIPE = """\
name: demo
arch: aarch64
debian: {{suite: trixie, mirror: "http://127.0.0.1:9/debian"}}
kernel: {{package: linux-image-cloud-arm64}}
bootloader: {{type: grub}}
disk:
  size: {disk}
  sector_size: 4096
  partitions:
    - type: esp
      size: {esp}
"""


@pytest.mark.parametrize("disk, esp, expect", [
    ("512MiB", "100MiB", [":11:", "too small for FAT32 at 4096-byte sectors", "at least 257 MiB"]),
    ("512MiB", "600MiB", [":11:", "does not fit", "needs at least 602 MiB"]),
])
def test_layout_is_checked_before_any_download(tmp_path, disk, esp, expect):
    """The mirror is unreachable: the layout error must come first, with line and MiB."""
    p = tmp_path / "r.yaml"
    p.write_text(DEBIAN_RECIPE.format(disk=disk, esp=esp))
    with pytest.raises(RecipeError) as info:
        build(p, BuildOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                              environ=ENV))
    for part in expect:
        assert part in str(info.value), str(info.value)


def test_missing_file_names_its_line_and_field(tmp_path):
    recipe = efi_recipe(tmp_path)
    (tmp_path / "files" / "vmlinuz").unlink()
    with pytest.raises(RecipeError) as info:
        preflight(load_recipe(recipe, environ={}))
    err = str(info.value)
    assert "demo.yaml:13:" in err and "disk.partitions[0].files[1].file" in err and "files/vmlinuz does not exist" in err


def test_disk_image_passed_to_build_is_called_one(tmp_path):
    image = tmp_path / "disk.img"
    data = bytearray(8192)
    data[510:512] = b"\x55\xaa"
    data[512:520] = b"EFI PART"
    image.write_bytes(bytes(data))
    res = run_cli(tmp_path, "build", image)
    assert res.returncode == 3 and "disk image (GPT), not a recipe" in res.stderr
    assert f"armvm-build verify {image}" in res.stderr and "Traceback" not in res.stderr


# --- variables --------------------------------------------------------------------------------
def templated(tmp_path) -> Path:
    recipe = efi_recipe(tmp_path)
    text = recipe.read_text().replace("name: demo", "vars: {suite: trixie}\nname: demo-{{ suite }}")
    recipe.write_text(text)
    return recipe


def test_unused_set_and_env_values_warn_with_the_name_meant(tmp_path):
    recipe = templated(tmp_path)
    r = load_recipe(recipe, environ={"ARMVM_VAR_SUITE": "sid"}, overrides={"suit": "sid"})
    assert r.name == "demo-trixie"
    assert any(w.startswith("--set suit=...") and "did you mean 'suite'" in w for w in r.warnings), r.warnings
    assert any(w.startswith("ARMVM_VAR_SUITE") and "did you mean 'suite'" in w and "case-sensitive" in w
               for w in r.warnings), r.warnings
    assert load_recipe(recipe, environ={"ARMVM_VAR_suite": "sid"}).warnings == ()
    res = run_cli(tmp_path, "build", recipe, "-o", tmp_path / "out", "--set", "suit=sid")
    assert res.returncode == 0 and "warning: --set suit=...: the recipe never reads" in res.stderr


def test_set_without_equals_is_a_usage_error(tmp_path):
    recipe = efi_recipe(tmp_path)
    for cmd in (["build", recipe], ["lock", recipe], ["vendor", recipe, tmp_path / "v"]):
        res = run_cli(tmp_path, *cmd, "--set", "x")
        assert res.returncode == 2, (cmd, res.stderr)
        assert "'x' is not name=value" in res.stderr


# --- locks -----------------------------------------------------------------------------------
def test_one_lock_per_rendered_name_and_the_exact_command(tmp_path):
    recipe = templated(tmp_path)
    a = load_recipe(recipe, environ={})
    b = load_recipe(recipe, environ={}, overrides={"suite": "sid"})
    assert lock_path(a) == recipe.with_name("demo-trixie.lock")
    assert lock_path(b) == recipe.with_name("demo-sid.lock")
    opts = BuildOptions(overrides={"suite": "sid"}, lock=tmp_path / "my.lock")
    assert lock_path(b, opts) == tmp_path / "my.lock"
    assert lock_command(b, opts) == f"armvm-build lock {recipe} --set suite=sid --lock {tmp_path / 'my.lock'}"


def test_stale_lock_error_prints_the_lock_command(tmp_path):
    from builder.build import _with_lock_command
    from builder.errors import ArmvmError
    recipe = templated(tmp_path)
    r = load_recipe(recipe, environ={})
    err = _with_lock_command(ArmvmError("package 'x' is not pinned in the lock file y: update the lock"), r,
                             BuildOptions())
    assert f"run: armvm-build lock {recipe} --lock {recipe.with_name('demo-trixie.lock')}" in str(err)


# --- virtio transports and small messages ------------------------------------------------------
def test_virtio_transports_are_added_when_they_are_modules():
    from builder.payload.components import with_virtio_transports
    kinfo = SimpleNamespace(modules={"virtio_pci": 1, "virtio_mmio": 1, "virtio_blk": 1})
    assert with_virtio_transports(kinfo, ("virtio_blk",)) == ("virtio_pci", "virtio_mmio", "virtio_blk")
    assert with_virtio_transports(kinfo, ("virtio_mmio", "virtio_blk")) == ("virtio_pci", "virtio_mmio",
                                                                            "virtio_blk")
    assert with_virtio_transports(kinfo, ("xen_blkfront",)) == ("xen_blkfront",)
    builtin = SimpleNamespace(modules={"virtio_blk": 1})          # transports built in
    assert with_virtio_transports(builtin, ("virtio_blk",)) == ("virtio_blk",)


def test_fat_name_error_names_every_bad_character(tmp_path):
    recipe = efi_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("dest: EFI/BOOT/grub.cfg", "dest: 'a:b?.txt'"))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, environ={})
    err = str(info.value)
    assert "the characters ':' '?' are not allowed" in err and "absolute" not in err


def test_oversized_size_states_the_maximum(tmp_path):
    recipe = efi_recipe(tmp_path, disk="99TiB")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, environ={})
    assert "more than the maximum 16 TiB" in str(info.value) and "demo.yaml:5" in str(info.value)


def test_m_means_mib(tmp_path):
    assert load_recipe(efi_recipe(tmp_path, disk="512M"), environ={}).disk.size == 512 << 20


def test_vendor_hint_names_the_recipe():
    text = (ROOT / "builder" / "inputs" / "debian" / "archive.py").read_text()
    assert "armvm-build vendor RECIPE DIR" in text
    assert not re.search(r"armvm-build vendor DIR", text)
