"""Whole builds from generated inputs (prebuilt-loader recipes), judged by external
validators: sfdisk --verify, fsck.fat -n, mtools read-back, bmaptool copy."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from builder.build import BuildOptions, build
from builder.errors import ArmvmError
from tests import diskcheck
from tests.fixtures import efi_recipe

ENV = {"SOURCE_DATE_EPOCH": "1700000000"}


def opts(tmp_path, **kw) -> BuildOptions:
    return BuildOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False,
                        environ=ENV, **kw)


def esp_of(manifest: dict) -> dict:
    return next(p for p in manifest["layout"]["partitions"] if p["kind"] == "esp")


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_build_passes_external_validators(tmp_path, sector_size):
    disk, esp = ("512MiB", "256MiB") if sector_size == 512 else ("600MiB", "300MiB")
    recipe = efi_recipe(tmp_path, sector_size=sector_size, disk=disk, esp=esp)
    res = build(recipe, opts(tmp_path))
    assert res.ok, res.message
    image = res.image
    manifest = json.loads((tmp_path / "out" / "demo.manifest.json").read_text())
    part = esp_of(manifest)
    if sector_size == 512:
        diskcheck.sfdisk_verify(image)
        table = diskcheck.sfdisk_json(image)
        entry = table["partitions"][0]
        assert entry["type"].upper() == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        assert entry["uuid"].upper() == part["unique_guid"]
        assert table["id"].upper() == manifest["layout"]["disk_guid"]
    else:
        gpt = diskcheck.read_gpt(image, 4096)
        assert gpt is not None
    diskcheck.fsck_fat(image, part["offset"], part["size"])
    assert diskcheck.fat_cluster_count(image, part["offset"]) >= 65525
    expected = {f["dest"]: f["sha256"] for f in part["files"]}
    assert "EFI/BOOT/BOOTAA64.EFI" in expected
    diskcheck.mtools_readback(image, part["offset"], expected)
    # sparse: far fewer blocks allocated than the disk size
    assert os.stat(image).st_blocks * 512 < 64 * 1024 * 1024
    report = json.loads((tmp_path / "out" / "demo.verify.json").read_text())
    assert all(c["result"] != "fail" for c in report["checks"] if c["level"] == "MUST"), report


def test_two_builds_are_byte_identical_and_bmap_reproduces(tmp_path):
    recipe = efi_recipe(tmp_path)
    a = build(recipe, BuildOptions(output_dir=tmp_path / "a", cache_dir=tmp_path / "c1", environ=ENV,
                                   progress=False, checksum=True))
    b = build(recipe, BuildOptions(output_dir=tmp_path / "b", cache_dir=tmp_path / "c2", environ=ENV,
                                   progress=False, checksum=True))
    for suffix in (".raw", ".manifest.json", ".bmap", ".raw.sha256"):
        assert (tmp_path / "a" / f"demo{suffix}").read_bytes() == (tmp_path / "b" / f"demo{suffix}").read_bytes(), suffix
    digest = hashlib.sha256(a.image.read_bytes()).hexdigest()
    assert (tmp_path / "a" / "demo.raw.sha256").read_text().split()[0] == digest
    copy = tmp_path / "copy.raw"
    out = subprocess.run(["bmaptool", "copy", "--bmap", str(tmp_path / "a" / "demo.bmap"), str(a.image), str(copy)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest


def test_source_date_epoch_changes_bytes_and_default_is_fixed(tmp_path):
    recipe = efi_recipe(tmp_path)
    a = build(recipe, BuildOptions(output_dir=tmp_path / "a", cache_dir=tmp_path / "c", environ={}, progress=False))
    b = build(recipe, BuildOptions(output_dir=tmp_path / "b", cache_dir=tmp_path / "c", environ={}, progress=False))
    c = build(recipe, BuildOptions(output_dir=tmp_path / "c2", cache_dir=tmp_path / "c", environ=ENV, progress=False))
    assert a.image.read_bytes() == b.image.read_bytes()
    assert a.image.read_bytes() != c.image.read_bytes()
    assert json.loads((tmp_path / "a" / "demo.manifest.json").read_text())["source_date_epoch"] == 315532800


def test_loader_path_follows_target_arch_not_host(tmp_path):
    recipe = efi_recipe(tmp_path)
    text = recipe.read_text().replace("arch: aarch64", "arch: armv7")
    recipe.write_text(text)
    from tests.fixtures import write_efi_tree
    write_efi_tree(tmp_path, arch="armv7")
    res = build(recipe, opts(tmp_path))
    assert res.ok, res.message
    manifest = json.loads((tmp_path / "out" / "demo.manifest.json").read_text())
    dests = [f["dest"] for f in esp_of(manifest)["files"]]
    assert "EFI/BOOT/BOOTARM.EFI" in dests and "EFI/BOOT/BOOTAA64.EFI" not in dests
    assert res.ok, res.message


# --- bad inputs: a clear error, non-zero exit, no traceback, nothing under final names ---
BAD = [
    ("partitions do not fit", lambda t: t.replace("size: 256MiB", "size: 600MiB"), "does not fit"),
    ("esp too small", lambda t: t.replace("size: 256MiB", "size: 16MiB"), "too small for FAT32"),
    ("missing source", lambda t: t.replace("files/grub.cfg", "files/nope.cfg"), "nope.cfg"),
    ("dest with ..", lambda t: t.replace("dest: vmlinuz", "dest: ../vmlinuz"), "contains '..'"),
    ("absolute host path", lambda t: t.replace("file: files/vmlinuz", "file: /etc/passwd"), "absolute path"),
    ("name FAT cannot store", lambda t: t.replace("dest: vmlinuz", "dest: 'vm|linuz'"), "FAT cannot store"),
    ("duplicate destinations", lambda t: t.replace("dest: initrd.img", "dest: VMLINUZ"),
     "duplicate FAT destination 'VMLINUZ'"),
    ("unknown field", lambda t: t + "extra: 1\n", "unknown field 'extra'"),
    ("wrong type", lambda t: t.replace("sector_size: 512", "sector_size: [512]"), "expected an integer"),
    ("unparsable size", lambda t: t.replace("size: 512MiB", "size: 512 apples"), "cannot parse size"),
    ("missing required", lambda t: t.replace("arch: aarch64\n", ""), "missing required field 'arch'"),
    ("malformed yaml", lambda t: t + "  - : [\n", "malformed YAML"),
]


def run_cli(*args, cwd=None, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e)


@pytest.mark.parametrize("label, mutate, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_clear_error_and_nothing_published(tmp_path, label, mutate, message):
    recipe = efi_recipe(tmp_path)
    good = build(recipe, opts(tmp_path))
    assert good.ok
    before = good.image.read_bytes()
    recipe.write_text(mutate(recipe.read_text()))
    res = run_cli("build", recipe, "-o", tmp_path / "out", env={"ARMVM_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 1, res.stderr
    assert message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert str(recipe.name) in res.stderr or label in ("missing source", "esp too small", "partitions do not fit",
                                                      "duplicate destinations")
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert out == ["demo.bmap", "demo.manifest.json", "demo.raw", "demo.report.html", "demo.verify.json"], out
    assert good.image.read_bytes() == before


def test_unwritable_output_dir(tmp_path):
    recipe = efi_recipe(tmp_path)
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o500)
    try:
        if os.access(target, os.W_OK):      # root ignores mode bits: use a path under a file instead
            target = tmp_path / "files" / "loader.efi" / "out"
        res = run_cli("build", recipe, "-o", target, env={"ARMVM_CACHE_DIR": str(tmp_path / "cache")})
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert res.returncode == 1
    assert "output folder" in res.stderr and "Traceback" not in res.stderr


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def test_url_sha256_mismatch_errors_and_caches_nothing(tmp_path):
    recipe = efi_recipe(tmp_path)
    served = tmp_path / "www"
    served.mkdir()
    (served / "tool.efi").write_bytes(b"MZ not what you pinned")
    handler = lambda *a, **k: _Handler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tool.efi"
        recipe.write_text(recipe.read_text() + f"        - {{url: '{url}', sha256: '{'0' * 64}', dest: EFI/tool.efi}}\n")
        with pytest.raises(ArmvmError) as info:
            build(recipe, opts(tmp_path))
        assert "sha256" in str(info.value)
    finally:
        server.shutdown()
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] if (tmp_path / "cache").exists() else []
    assert not any(p.read_bytes() == b"MZ not what you pinned" for p in cached)
    assert not (tmp_path / "out" / "demo.raw").exists()


def test_cli_routes_file_argument_to_build_and_json(tmp_path):
    recipe = efi_recipe(tmp_path)
    res = run_cli(recipe, "-o", tmp_path / "out", "--json", env={"ARMVM_CACHE_DIR": str(tmp_path / "cache"),
                                                                 "SOURCE_DATE_EPOCH": "1700000000"})
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] and data["image"].endswith("demo.raw")
    assert run_cli("build", "--help").returncode == 0
    assert run_cli("--version").stdout.startswith("armvm-build ")
    assert run_cli("build", "--no-such-flag", recipe).returncode == 2


def test_verify_cli_exit_3_for_non_image(tmp_path):
    junk = tmp_path / "junk.raw"
    junk.write_bytes(b"hello")
    res = run_cli("verify", junk)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "Traceback" not in res.stderr


def test_image_failing_a_must_is_kept_as_failed_and_good_one_untouched(tmp_path):
    recipe = efi_recipe(tmp_path)
    good = build(recipe, opts(tmp_path))
    assert good.ok
    before = good.image.read_bytes()
    # an AArch32 recipe carrying an AArch64 kernel: boot.kernel must fail the self-check
    recipe.write_text(recipe.read_text().replace("arch: aarch64", "arch: armv7"))
    from tests.fixtures import ARM, pe_image
    (tmp_path / "files" / "loader.efi").write_bytes(pe_image(ARM))
    res = build(recipe, opts(tmp_path))
    assert not res.ok
    assert "boot.kernel" in res.message
    assert (tmp_path / "out" / "demo.failed.raw").exists()
    report = json.loads((tmp_path / "out" / "demo.failed.verify.json").read_text())
    assert any(c["id"] == "boot.kernel" and c["result"] == "fail" for c in report["checks"])
    good_report = json.loads((tmp_path / "out" / "demo.verify.json").read_text())
    assert not any(c["result"] == "fail" for c in good_report["checks"])   # the good one's
    assert good.image.read_bytes() == before


def test_4096_byte_sector_gpt_through_a_loop_device(tmp_path):
    """Debian 12's sfdisk reads a file as 512-byte sectors; a read-only loop device with
    4096-byte logical blocks lets it judge our 4K GPT (skipped where no loop device exists)."""
    import shutil as _sh
    recipe = efi_recipe(tmp_path, sector_size=4096, disk="600MiB", esp="300MiB")
    res = build(recipe, opts(tmp_path))
    assert res.ok, res.message
    if not _sh.which("losetup"):
        pytest.skip("losetup not installed")
    setup = subprocess.run(["losetup", "-f", "--show", "-r", "-b", "4096", str(res.image)],
                           capture_output=True, text=True)
    if setup.returncode != 0:
        pytest.skip(f"no loop device here: {setup.stderr.strip()}")
    dev = setup.stdout.strip()
    try:
        verify = subprocess.run(["sfdisk", "--verify", dev], capture_output=True, text=True)
        table = json.loads(subprocess.run(["sfdisk", "-J", dev], capture_output=True, text=True,
                                          check=True).stdout)["partitiontable"]
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    assert verify.returncode == 0 and "No errors detected." in verify.stdout, verify.stdout + verify.stderr
    manifest = json.loads((tmp_path / "out" / "demo.manifest.json").read_text())
    part = esp_of(manifest)
    assert table["sectorsize"] == 4096 and table["firstlba"] == 6
    assert table["partitions"][0]["start"] == part["first_lba"]
    assert table["partitions"][0]["type"].upper() == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
