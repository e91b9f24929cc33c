"""Secure Boot, build and boot half: recipe fields (bootloader.shim, bootloader.sign), the ESP
layout of Debian's shim chain, signed UKIs, refusals on the console, secureboot=/lockdown=
in the runtime report and rt.secureboot; end to end under QEMU + AAVMF with Debian's
variable stores (ms, snakeoil) and one written by `armvm-build keys`.

The e2e part needs the Debian archive (network) and boots (boot); signatures are judged by
sbverify (sbsigntool).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from builder.console import ConsoleWatcher
from builder.verify.runtime import parse_runtime_report, runtime_checks
from tests import diskcheck
from tests.fixtures import write_efi_tree

ROOT = Path(__file__).resolve().parent.parent
SNAKEOIL_KEY = Path("/usr/share/qemu-efi-aarch64/PkKek-1-snakeoil.key")
SNAKEOIL_CERT = Path("/usr/share/qemu-efi-aarch64/PkKek-1-snakeoil.pem")
REPORT = "ARMVM-REPORT"


def cli(*args, env=None, cwd=None, timeout=1800):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "builder", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=timeout)


def _keypair(d: Path, name: str = "db"):
    d.mkdir(parents=True, exist_ok=True)
    from tests.test_sign import _key_and_cert
    return _key_and_cert(d, name)


def _efi_sign_recipe(root: Path, key: str, cert: str, extra: str = "", sign_kernel: bool = True) -> Path:
    write_efi_tree(root)
    if sign_kernel:       # the kernel the signed loader starts comes signed (its own key)
        from builder.payload.sign import load_signer, sign_pe
        kernel = root / "files" / "vmlinuz"
        kernel.write_bytes(sign_pe(kernel.read_bytes(), load_signer(*_keypair(root / "kk", "kernel"))).data)
    text = textwrap.dedent(f"""\
        name: signed
        arch: aarch64
        bootloader:
          type: efi
          file: files/loader.efi
          sign: {{key: {key}, cert: {cert}{extra}}}
        disk:
          size: 64MiB
          partitions:
            - type: esp
              size: 40MiB
              files:
                - {{file: files/grub.cfg, dest: EFI/BOOT/grub.cfg}}
                - {{file: files/vmlinuz, dest: vmlinuz}}
                - {{file: files/initrd.img, dest: initrd.img}}
        """)
    p = root / "signed.yaml"
    p.write_text(text)
    return p


def _esp(out: Path, name: str) -> dict:
    manifest = json.loads((out / f"{name}.manifest.json").read_text())
    return next(p for p in manifest["layout"]["partitions"] if p.get("files"))


# --- recipe: bad input gets a clear error (no network) -----------------------------------

@pytest.mark.parametrize("bootloader, arch, message, field", [
    ("{type: grub, signed: true, shim: true}", "armv7", "Debian ships no shim for armhf", "bootloader.shim"),
    ("{type: grub, shim: true}", "aarch64", "needs type: grub and signed: true", "bootloader.shim"),
    ("{type: uki, shim: true}", "aarch64", "needs type: grub and signed: true", "bootloader.shim"),
    ("{type: grub, sign: {key: k.key, cert: k.crt}}", "aarch64", "signs a UKI or a prebuilt loader",
     "bootloader.sign"),
    ("{type: uki, sign: {key: k.key}}", "aarch64", "cert", "bootloader.sign"),
    ("{type: uki, sign: {key: k.key, cert: k.crt}}", "aarch64", "k.key: no such file", "bootloader.sign.key"),
    ("{type: uki, sign: {key: k.key, cert: k.crt, passphrase_env: 'my pass'}}", "aarch64",
     "does not have the allowed form", "bootloader.sign.passphrase_env"),
])
def test_recipe_errors(tmp_path, bootloader, arch, message, field):
    (tmp_path / "r.yaml").write_text(textwrap.dedent(f"""\
        name: r
        arch: {arch}
        debian: {{suite: trixie}}
        kernel: {{package: linux-image-cloud-arm64}}
        bootloader: {bootloader}
        disk: {{size: 64MiB, partitions: [{{type: esp, size: 40MiB}}]}}
        """))
    res = cli("build", tmp_path / "r.yaml", "-o", tmp_path / "out", "--offline", "-q")
    assert res.returncode in (1, 2, 3), res.stderr
    assert message in res.stderr and field in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "r.yaml:5:" in res.stderr, res.stderr
    assert not (tmp_path / "out" / "r.raw").exists()


def test_sign_prebuilt_loader_offline_sbverify_and_replace_warning(tmp_path):
    """type: efi + sign: the loader on the ESP is the input signed with our key (sbverify
    accepts it); signing an already signed loader warns that the signature gets replaced;
    the manifest names the cert, never the key."""
    from builder.payload.sign import load_signer, sign_pe
    key, cert = _keypair(tmp_path / "k")
    recipe = _efi_sign_recipe(tmp_path, "k/db.key", "k/db.crt")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "already signed" not in res.stderr
    esp = _esp(tmp_path / "out", "signed")
    loader = next(f for f in esp["files"] if f["dest"] == "EFI/BOOT/BOOTAA64.EFI")
    expected = sign_pe((tmp_path / "files" / "loader.efi").read_bytes(), load_signer(key, cert)).data
    assert loader["sha256"] == hashlib.sha256(expected).hexdigest()
    out_efi = tmp_path / "BOOTAA64.EFI"
    subprocess.run(["mcopy", "-n", "-i", f"{tmp_path / 'out' / 'signed.raw'}@@{esp['offset']}",
                    "::/EFI/BOOT/BOOTAA64.EFI", str(out_efi)], check=True, capture_output=True)
    assert out_efi.read_bytes() == expected
    if shutil.which("sbverify"):
        v = subprocess.run(["sbverify", "--cert", str(cert), str(out_efi)], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
    # the self-check sees the signed loader; its chain is not judged (the kernel it starts
    # is not ours to sign), unlike a signed UKI's
    checks = {c["id"]: c["result"] for c in json.loads((tmp_path / "out" / "signed.verify.json").read_text())["checks"]}
    assert checks["sb.digest"] == "pass" and checks["sb.chain"] == "skip", checks
    manifest = (tmp_path / "out" / "signed.manifest.json").read_text()
    assert "db.key" not in manifest and "PRIVATE" not in manifest
    assert hashlib.sha256(cert.read_bytes()).hexdigest() in manifest
    # an already signed loader: the build says its signature gets replaced
    (tmp_path / "files" / "loader.efi").write_bytes(expected)
    again = cli("build", recipe, "-o", tmp_path / "out2")
    assert again.returncode == 0, again.stderr
    assert "already signed" in again.stderr and "replaces its signature" in again.stderr
    assert _esp(tmp_path / "out2", "signed")["files"] == esp["files"]      # same signed bytes


def test_signed_loader_starting_an_unsigned_kernel_fails_the_self_check(tmp_path):
    """A signed loader makes the self-check judge the chain: the unsigned kernel it starts
    would be refused under Secure Boot, so the build fails naming it (sb.signed) and publishes
    nothing under the final name."""
    _keypair(tmp_path / "k")
    recipe = _efi_sign_recipe(tmp_path, "k/db.key", "k/db.crt", sign_kernel=False)
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 1 and "sb.signed" in res.stderr and "/vmlinuz" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out" / "signed.raw").exists()


def test_sign_bad_keys_through_the_build(tmp_path):
    key, cert = _keypair(tmp_path / "k")
    _keypair(tmp_path / "k", "other")
    recipe = _efi_sign_recipe(tmp_path, "k/db.key", "k/other.crt")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 3 and "does not match" in res.stderr and "Traceback" not in res.stderr
    shutil.copy(SNAKEOIL_KEY, tmp_path / "k" / "so.key")
    shutil.copy(SNAKEOIL_CERT, tmp_path / "k" / "so.crt")
    recipe = _efi_sign_recipe(tmp_path, "k/so.key", "k/so.crt")
    res = cli("build", recipe, "-o", tmp_path / "out")
    assert res.returncode == 3 and "encrypted and no passphrase" in res.stderr, res.stderr
    recipe = _efi_sign_recipe(tmp_path, "k/so.key", "k/so.crt", ", passphrase_env: SB_TEST_PASS")
    res = cli("build", recipe, "-o", tmp_path / "out", env={"SB_TEST_PASS": "snakeoil"})
    assert res.returncode == 0, res.stderr
    assert "snakeoil" not in (tmp_path / "out" / "signed.manifest.json").read_text().replace("SnakeOil", "")
    # an expired certificate signs, with a warning
    import datetime
    from tests.test_sign import _key_and_cert
    _key_and_cert(tmp_path / "k", "old", not_after=datetime.datetime(2021, 1, 1, tzinfo=datetime.timezone.utc))
    recipe = _efi_sign_recipe(tmp_path, "k/old.key", "k/old.crt")
    res = cli("build", recipe, "-o", tmp_path / "out3")
    assert res.returncode == 0 and "expired on 2021-01-01" in res.stderr, res.stderr


# --- console: refusals end the boot, named --------------------------------------------------

@pytest.mark.parametrize("chunks, cause", [
    ([b"BdsDxe: loading Boot0001\r\n", b"BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from "
      b"PciRoot(0x0)/Pci(0x3,0x0): Access Denied\r\n"], "the firmware refused the loader (Access Denied)"),
    # shim's dialog: no newline, waits for a key forever
    ([b"\x1b[0m\x1b[37m\x1b[40m", b"Verification failed: (0x1A) Security Violation"],
     "shim refused the next stage (Security Violation)"),
    ([b"Loading Linux 6.12 ...\r\n", b"error: bad shim signature.\r\n", b"\r\nPress any key to continue..."],
     "GRUB refused the kernel (bad shim signature)"),
])
def test_console_names_secure_boot_refusals(chunks, cause):
    w = ConsoleWatcher("ARMVM-BOOT-COMPLETE")
    for i, c in enumerate(chunks):
        w.feed(c, float(i))
    assert w.failure is not None and cause in w.failure, w.failure
    assert w.stop_now                                # the runner stops at once


def test_no_refusal_on_a_normal_console():
    w = ConsoleWatcher("ARMVM-BOOT-COMPLETE")
    w.feed(b"EFI stub: UEFI Secure Boot is enabled.\r\n[    0.000000] secureboot: Secure boot enabled\r\n", 0.0)
    assert w.failure is None


# --- runtime report: secureboot=, lockdown=, rt.secureboot ---------------------------------

def _console(sb: str, lockdown: str = "integrity") -> str:
    return "\n".join([f"{REPORT} kernel=6.12 machine=aarch64", f"{REPORT} efi=1",
                      f"\x1b[0m{REPORT} secureboot={sb}", f"{REPORT} lockdown={lockdown}",
                      "ARMVM-BOOT-COMPLETE"]) + "\n"


def test_runtime_report_parses_secureboot_and_lockdown():
    f = parse_runtime_report(_console("1"))
    assert f.secureboot is True and f.lockdown == "integrity"
    f = parse_runtime_report(_console("0", "none"))
    assert f.secureboot is False and f.lockdown == "none"
    f = parse_runtime_report(_console("unknown", "$(evil)"))
    assert f.secureboot is None and f.lockdown is None


def test_rt_secureboot_only_with_secure_boot():
    scenario = {"loader_seen": True, "reached_marker": True, "powered_off": True}
    ids = [c.id for c in runtime_checks(parse_runtime_report(_console("1")), arch="aarch64", scenario=scenario)]
    assert "rt.secureboot" not in ids
    for sb, want in (("1", "pass"), ("0", "fail"), ("unknown", "fail")):
        checks = runtime_checks(parse_runtime_report(_console(sb)), arch="aarch64",
                                scenario={**scenario, "secure_boot": "ms"})
        c = next(c for c in checks if c.id == "rt.secureboot")
        assert c.result == want, (sb, c)
        assert c.level == "MUST"
    assert "lockdown integrity" in c.detail or want != "pass"


def test_boot_secure_boot_argument_errors(tmp_path):
    from builder.run.qemu import secure_boot_vars
    from builder.errors import ArmvmError
    assert secure_boot_vars("aarch64", "ms").name == "AAVMF_VARS.ms.fd"
    assert secure_boot_vars("aarch64", "snakeoil").name == "AAVMF_VARS.snakeoil.fd"
    with pytest.raises(ArmvmError, match="AAVMF32\\) has no Secure Boot"):
        secure_boot_vars("armv7", "ms")
    with pytest.raises(ArmvmError, match="no such file.*armvm-build keys"):
        secure_boot_vars("aarch64", str(tmp_path / "none.fd"))
    small = tmp_path / "small.fd"
    small.write_bytes(b"\0" * 4096)
    with pytest.raises(ArmvmError, match="variable store"):
        secure_boot_vars("aarch64", str(small))
    img = tmp_path / "x.raw"
    img.write_bytes(b"")
    res = cli("boot", img, "--secure-boot", "ms", "--direct")
    assert res.returncode == 2 and "Traceback" not in res.stderr


# --- end to end: real Debian parts, real firmware ------------------------------------------

online = pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1", reason="ARMVM_OFFLINE_TESTS=1")


@pytest.fixture(scope="module")
def cache_env(pytestconfig):
    return {"ARMVM_CACHE_DIR": str(pytestconfig.cache.mkdir("armvm-sb-cache"))}


def _build(recipe: Path, out: Path, env: dict, *extra) -> Path:
    res = cli("build", recipe, "-o", out, "-q", *extra, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def _boot(image: Path, sb: str, *extra, timeout: int = 240):
    res = cli("boot", image, "--secure-boot", sb, "--json", "--timeout", str(timeout), *extra,
              timeout=timeout + 120)
    return res, json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}


def _flip_in_image(image: Path, data: bytes, at: int) -> None:
    """Flip one byte of a file stored on the image: find 64 bytes of it around `at`
    (unique in the image) and invert the first."""
    chunk = data[at:at + 64]
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        pos = m.find(chunk)
        assert pos >= 0 and m.find(chunk, pos + 1) < 0, "chunk not unique in the image"
        m[pos] ^= 0xFF


@pytest.fixture(scope="module")
def shim_image(tmp_path_factory, cache_env):
    d = tmp_path_factory.mktemp("shim")
    out = _build(ROOT / "recipes" / "debian-arm64-secureboot.yaml", d / "out", cache_env)
    return out / "debian-arm64-secureboot.raw"


@pytest.mark.network
@online
def test_shim_chain_esp_layout(shim_image):
    """shim at BOOTAA64.EFI, Debian's signed GRUB and MokManager beside it, never fbaa64.efi;
    grub.cfg beside GRUB; each from its Debian package, byte for byte."""
    out = shim_image.parent
    manifest = json.loads((out / "debian-arm64-secureboot.manifest.json").read_text())
    esp = _esp(out, "debian-arm64-secureboot")
    dests = {f["dest"]: f for f in esp["files"]}
    assert set(dests) == {"EFI/BOOT/BOOTAA64.EFI", "EFI/BOOT/grubaa64.efi", "EFI/BOOT/mmaa64.efi",
                          "EFI/BOOT/grub.cfg", "vmlinuz", "initrd.img"}
    origins = {i["role"]: i["origin"] for i in manifest["inputs"]}
    assert origins["shim"].startswith("debian:shim-signed=")
    assert origins["shim-helpers"].startswith("debian:shim-helpers-arm64-signed=")
    assert origins["bootloader"].startswith("debian:grub-efi-arm64-signed=")
    listing = diskcheck.mtools_readback(shim_image, esp["offset"], {d: f["sha256"] for d, f in dests.items()})
    assert "fbaa64" not in listing.lower()


@pytest.mark.network
@online
@pytest.mark.boot
def test_shim_chain_boots_with_ms_vars(shim_image):
    """Debian's shim -> signed GRUB -> signed kernel, Microsoft's CA only: secureboot=1."""
    res, out = _boot(shim_image, "ms")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert out["ok"] and "Secure Boot enforced (secureboot=1)" in out["reason"], out
    log = Path(out["log"]).read_text()
    assert f"{REPORT} secureboot=1" in log and f"{REPORT} lockdown=integrity" in log


@pytest.mark.network
@online
@pytest.mark.boot
def test_shim_refuses_flipped_grub_and_grub_refuses_flipped_kernel(shim_image, tmp_path):
    """Negatives on copies of the shim image: a flipped byte in grubaa64.efi (shim: Security
    Violation, a dialog without newline) and in the kernel (GRUB: bad shim signature). Each
    ends the boot non-zero, named, well before the 60 s timeout."""
    from builder.payload.sign import parse_pe
    esp = _esp(shim_image.parent, "debian-arm64-secureboot")
    for dest, cause in (("EFI/BOOT/grubaa64.efi", "Security Violation"), ("vmlinuz", "bad shim signature")):
        image = tmp_path / f"{dest.replace('/', '_')}.raw"
        shutil.copyfile(shim_image, image)
        data_file = tmp_path / "file"
        subprocess.run(["mcopy", "-n", "-i", f"{image}@@{esp['offset']}", f"::/{dest}", str(data_file)],
                       check=True, capture_output=True)
        data = data_file.read_bytes()
        ptr, size = parse_pe(data).sections[0]
        _flip_in_image(image, data, ptr + size // 2)
        res, out = _boot(image, "ms", timeout=60)
        assert res.returncode == 1, res.stdout[-2000:]
        assert cause in out["reason"] and not out["timed_out"], out["reason"]


@pytest.mark.network
@online
@pytest.mark.boot
def test_unsigned_grub_is_refused_by_the_firmware(tmp_path, cache_env):
    recipe = tmp_path / "unsigned.yaml"
    recipe.write_text((ROOT / "recipes" / "debian-arm64-secureboot.yaml").read_text()
                      .replace("name: debian-arm64-secureboot", "name: unsigned")
                      .replace("  signed: true\n  shim: true\n", ""))
    out = _build(recipe, tmp_path / "out", cache_env)
    res, got = _boot(out / "unsigned.raw", "ms", timeout=60)
    assert res.returncode == 1
    assert "the firmware refused the loader (Access Denied)" in got["reason"] and not got["timed_out"]


def _uki_recipe(d: Path, key: str, cert: str, extra: str = "") -> Path:
    text = (ROOT / "recipes" / "uki-own-key.yaml").read_text()
    text = text.replace('key: "{{ keydir }}/db.key"', f"key: {key}").replace(
        'cert: "{{ keydir }}/db.crt"', f"cert: {cert}{extra}").replace("  keydir: keys\n", "")
    p = d / "uki-own-key.yaml"
    p.write_text(text)
    return p


@pytest.mark.network
@online
@pytest.mark.boot
def test_uki_signed_with_snakeoil_boots_with_checks(tmp_path, cache_env):
    """A UKI signed with Debian's snakeoil key (encrypted: passphrase from the environment)
    passes `boot --checks --secure-boot snakeoil`, rt.secureboot included."""
    shutil.copy(SNAKEOIL_KEY, tmp_path / "so.key")
    shutil.copy(SNAKEOIL_CERT, tmp_path / "so.pem")
    recipe = _uki_recipe(tmp_path, "so.key", "so.pem", "\n    passphrase_env: SNAKEOIL_PASS")
    out = _build(recipe, tmp_path / "out", {**cache_env, "SNAKEOIL_PASS": "snakeoil"})
    res = cli("boot", out / "uki-own-key.raw", "--checks", "--secure-boot", "snakeoil", "--json",
              "--timeout", "240", timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    checks = {c["id"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["rt.secureboot"]["result"] == "pass", checks["rt.secureboot"]
    assert "lockdown integrity" in checks["rt.secureboot"]["detail"]


@pytest.mark.network
@online
@pytest.mark.boot
def test_uki_own_keys_boot_reproducible_and_wrong_key_refused(tmp_path, cache_env):
    """`armvm-build keys` -> sign the UKI with its db key -> boots with its VARS.fd
    (secureboot=1); two builds are byte-identical; the same image with Debian's snakeoil
    store is refused by the firmware (Access Denied)."""
    keys = tmp_path / "keys"
    assert cli("keys", keys).returncode == 0
    recipe = _uki_recipe(tmp_path, "keys/db.key", "keys/db.crt")
    a = _build(recipe, tmp_path / "a", cache_env) / "uki-own-key.raw"
    b = _build(recipe, tmp_path / "b", cache_env) / "uki-own-key.raw"
    # the self-check judged the UKI against the recipe's own db cert
    checks = {c["id"]: c["result"] for c in json.loads((tmp_path / "a" / "uki-own-key.verify.json").read_text())["checks"]}
    assert checks["sb.chain"] == "pass" and checks["sb.digest"] == "pass", checks
    assert diskcheck.sha256_file(a) == diskcheck.sha256_file(b)
    esp = _esp(tmp_path / "a", "uki-own-key")
    uki = tmp_path / "uki.efi"
    subprocess.run(["mcopy", "-n", "-i", f"{a}@@{esp['offset']}", "::/EFI/BOOT/BOOTAA64.EFI", str(uki)],
                   check=True, capture_output=True)
    if shutil.which("sbverify"):
        v = subprocess.run(["sbverify", "--cert", str(keys / "db.crt"), str(uki)], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
    res, out = _boot(a, str(keys / "VARS.fd"))
    assert res.returncode == 0 and "secureboot=1" in out["reason"], res.stdout[-3000:]
    res, out = _boot(a, "snakeoil", timeout=60)
    assert res.returncode == 1
    assert "Access Denied" in out["reason"] and not out["timed_out"], out
