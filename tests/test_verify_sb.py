"""verify's Secure Boot checks (sb.signed, sb.digest, sb.chain, sb.sbat) on images made by
external tools (sfdisk, mkfs.fat, mtools): Debian's real signed shim -> GRUB -> kernel chain,
and loaders signed by sbsign (sbsigntool) with keys openssl makes here. sbverify judges the
same files alongside, so the verdicts are not only our own reader's."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fixtures  # noqa: E402
import imagegen as g  # noqa: E402

import builder.verify as verify  # noqa: E402
from builder.verify import authenticode as ac  # noqa: E402
from builder.verify import checks_sb  # noqa: E402
from builder.verify.blob import BytesBlob  # noqa: E402
from builder.verify.pe import parse_pe, section_blob  # noqa: E402

pytestmark = pytest.mark.skipif(
    not g.have_tools("sfdisk", "mkfs.fat", "mcopy", "mmd", "sbsign", "sbverify", "sbattach",
                     "openssl"), reason="needs fdisk, dosfstools, mtools, sbsigntool, openssl")
SB = ("sb.signed", "sb.digest", "sb.chain", "sb.sbat")
HOST_MS_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.ms.fd")


@pytest.fixture(autouse=True)
def _raise_internal(monkeypatch):
    monkeypatch.setattr(verify, "_RAISE_INTERNAL", True)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "builder", "verify", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def results(img, *args):
    p = cli(img, "--json", *args)
    assert "Traceback" not in p.stderr, p.stderr
    rep = json.loads(p.stdout)
    return p.returncode, {c["id"]: c for c in rep["checks"]}


# --- keys and signing (openssl, sbsign) -------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for name in ("db", "wrong"):
        g.run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
              d / f"{name}.key", "-out", d / f"{name}.crt", "-subj", f"/CN=armvm {name} key/",
              "-days", "3650")
    return d


def sign(keys, data: bytes, name: str = "db") -> bytes:
    d = Path(keys)
    src, out = d / "in.efi", d / "out.efi"
    src.write_bytes(data)
    out.unlink(missing_ok=True)
    g.run("sbsign", "--key", d / f"{name}.key", "--cert", d / f"{name}.crt", "--output", out,
          src)
    return out.read_bytes()


def unsign(tmp: Path, data: bytes) -> bytes:
    p = tmp / "strip.efi"
    p.write_bytes(data)
    g.run("sbattach", "--remove", p)
    return p.read_bytes()


def sbverify(tmp: Path, data: bytes, cert: Path) -> bool:
    p = tmp / "judge.efi"
    p.write_bytes(data)
    return subprocess.run(["sbverify", "--cert", str(cert), str(p)],
                          capture_output=True).returncode == 0


# --- Debian's signed chain ------------------------------------------------------------
@pytest.fixture(scope="module")
def debian(pytestconfig):
    shim = fixtures.debian_tree(pytestconfig, "trixie", "arm64", "shim-signed")
    grub = fixtures.debian_tree(pytestconfig, "trixie", "arm64", "grub-efi-arm64-signed")
    kern = _debian_kernel(pytestconfig, "linux-image-cloud-arm64")
    return {
        "shim": (shim / "usr/lib/shim/shimaa64.efi.signed").read_bytes(),
        "grub": (grub / "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed").read_bytes(),
        "kernel": next((kern / "boot").glob("vmlinuz-*")).read_bytes(),
        "kver": next((kern / "boot").glob("vmlinuz-*")).name[len("vmlinuz-"):],
    }


def _debian_kernel(pytestconfig, meta: str) -> Path:
    """The signed kernel package a meta-package points at (fixtures.debian_tree has already
    skipped when offline; same cache)."""
    from builder.inputs.cache import Cache
    from builder.inputs.debian.archive import DebianArchive
    from builder.inputs.sources import Fetcher
    fetcher = Fetcher(cache=Cache(Path(pytestconfig.cache.mkdir("armvm-debian"))),
                      progress=False)
    archive = DebianArchive(fetcher, mirror=None, suite="trixie", components=["main"],
                            arch="arm64")
    return archive.extract(archive.resolve_kernel(meta))


def shim_image(tmp: Path, debian, name="disk.raw", **override) -> Path:
    files = {
        "EFI/BOOT/BOOTAA64.EFI": debian["shim"],
        "EFI/BOOT/grubaa64.efi": debian["grub"],
        "EFI/BOOT/grub.cfg": b"set timeout=0\nmenuentry 'debian' {\n  linux /vmlinuz "
                             b"console=ttyAMA0\n  initrd /initrd.img\n}\n",
        "vmlinuz": debian["kernel"],
        # modules in the test initramfs built for Debian's kernel (boot.modules passes)
        "initrd.img": g.make_initramfs(g.initramfs_files(ver=debian["kver"])),
    }
    files.update(override)
    return g.build_image(tmp, g.ImageSpec(esp_files=files, esp_mib=64, disk_mib=80,
                                          second_partition=False), name)


def vendor_cert(debian) -> object:
    b = BytesBlob(debian["shim"])
    pe = parse_pe(b)
    raw = section_blob(b, ac.find_section(b, pe, ".vendor_cert")).read_at(0, 1 << 20)
    return ac.vendor_certs(raw)


@pytest.mark.network
def test_debian_shim_chain_passes(tmp_path, debian):
    img = shim_image(tmp_path, debian)
    rc, r = results(img)
    for cid in SB:
        assert r[cid]["result"] == "pass", (cid, r[cid]["detail"])
    assert rc == 0
    assert r["boot.chain"]["result"] == "pass" and "/vmlinuz" in r["boot.chain"]["detail"]
    chain = r["sb.chain"]["detail"]
    # shim -> Microsoft's CA (built in), GRUB and the kernel -> shim's vendor cert
    assert "/EFI/BOOT/BOOTAA64.EFI" in chain and "Microsoft" in chain
    assert "grubaa64.efi: Debian Secure Boot Signer 2022 - grub2 -> Debian Secure Boot CA" \
           " (shim's .vendor_cert)" in chain
    assert "/vmlinuz: Debian Secure Boot Signer 2022 - linux -> Debian Secure Boot CA" in chain
    assert "sbatlevel" in r["sb.sbat"]["detail"] and "grub,7" in r["sb.sbat"]["detail"]
    assert r["sb.signed"]["detail"].count("signature") >= 3


@pytest.mark.network
def test_debian_chain_judged_by_sbverify_too(tmp_path, debian):
    """sbverify agrees: GRUB and the kernel chain to the cert in shim's .vendor_cert."""
    from cryptography.hazmat.primitives.serialization import Encoding
    pem = tmp_path / "vendor.pem"
    pem.write_bytes(vendor_cert(debian)[0].public_bytes(Encoding.PEM))
    assert sbverify(tmp_path, debian["grub"], pem)
    assert sbverify(tmp_path, debian["kernel"], pem)


@pytest.mark.network
def test_debian_shim_with_the_ms_vars_file(tmp_path, debian):
    """--vars: the db of Debian's AAVMF_VARS.ms.fd (Microsoft UEFI CA 2011) judges shim."""
    if not HOST_MS_VARS.is_file():
        pytest.skip("qemu-efi-aarch64 has no AAVMF_VARS.ms.fd")
    img = shim_image(tmp_path, debian)
    rc, r = results(img, "--vars", HOST_MS_VARS)
    assert rc == 0, r["sb.chain"]
    assert r["sb.chain"]["result"] == "pass"
    assert "Microsoft Corporation UEFI CA 2011 (db)" in r["sb.chain"]["detail"]
    assert f"--vars {HOST_MS_VARS}" in r["sb.chain"]["detail"]


@pytest.mark.network
def test_flipped_kernel_byte_fails_sb_digest(tmp_path, debian):
    k = bytearray(debian["kernel"])
    k[len(k) // 2] ^= 0x01
    img = shim_image(tmp_path, debian, vmlinuz=bytes(k))
    rc, r = results(img)
    assert rc == 1
    assert r["sb.digest"]["result"] == "fail"
    assert "/vmlinuz" in r["sb.digest"]["detail"] and "changed after signing" in \
        r["sb.digest"]["detail"]
    assert "grubaa64" not in r["sb.digest"]["detail"]
    assert r["sb.signed"]["result"] == "pass"
    from cryptography.hazmat.primitives.serialization import Encoding
    pem = tmp_path / "vendor.pem"
    pem.write_bytes(vendor_cert(debian)[0].public_bytes(Encoding.PEM))
    assert not sbverify(tmp_path, bytes(k), pem)       # sbverify refuses it too


@pytest.mark.network
def test_unsigned_grub_fails_sb_signed(tmp_path, debian):
    grub = unsign(tmp_path, debian["grub"])
    img = shim_image(tmp_path, debian, **{"EFI/BOOT/grubaa64.efi": grub})
    rc, r = results(img)
    assert rc == 1
    assert r["sb.signed"]["result"] == "fail"
    assert "/EFI/BOOT/grubaa64.efi carries no signature" in r["sb.signed"]["detail"]
    assert "shim refuses it" in r["sb.signed"]["detail"]
    assert r["sb.chain"]["result"] == "fail"


@pytest.mark.network
def test_kernel_signed_with_the_wrong_key_fails_sb_chain(tmp_path, debian, keys):
    k = sign(keys, unsign(tmp_path, debian["kernel"]), "wrong")
    assert sbverify(tmp_path, k, keys / "wrong.crt")  # a good signature, by the wrong key
    img = shim_image(tmp_path, debian, vmlinuz=k)
    rc, r = results(img)
    assert rc == 1
    assert r["sb.digest"]["result"] == "pass"
    assert r["sb.chain"]["result"] == "fail"
    d = r["sb.chain"]["detail"]
    assert "/vmlinuz: signed by CN=armvm wrong key" in d and "chains to no trusted cert" in d
    assert "Debian Secure Boot CA (shim's .vendor_cert)" in d


@pytest.mark.network
def test_grub_below_shims_sbatlevel_warns(tmp_path, debian, keys):
    grub = bytearray(unsign(tmp_path, debian["grub"]))
    b = BytesBlob(bytes(grub))
    s = parse_pe(b).section(".sbat")
    off = grub.find(b"grub,7,", s.PointerToRawData)
    assert off > 0
    grub[off:off + 6] = b"grub,3"
    img = shim_image(tmp_path, debian, **{"EFI/BOOT/grubaa64.efi": sign(keys, bytes(grub))})
    rc, r = results(img)
    assert r["sb.sbat"]["result"] == "warn"          # SHOULD
    assert "grub 3 < 5" in r["sb.sbat"]["detail"]


@pytest.mark.network
def test_shim_without_its_grub(tmp_path, debian):
    img = shim_image(tmp_path, debian, **{"EFI/BOOT/grubaa64.efi": None})
    rc, r = results(img)
    assert rc == 1
    assert r["boot.chain"]["result"] == "fail"
    assert "shim, which starts grubaa64.efi beside it" in r["boot.chain"]["detail"]


# --- own keys: a UKI signed with sbsign ------------------------------------------------
def uki_image(tmp: Path, loader: bytes, name="disk.raw") -> Path:
    return g.build_image(tmp, g.ImageSpec(esp_files={
        "EFI/BOOT/grub.cfg": None, "vmlinuz": None, "initrd.img": None,
        "EFI/BOOT/BOOTAA64.EFI": loader}, second_partition=False), name)


@pytest.fixture(scope="module")
def uki(keys):
    return g.make_uki("aarch64", g.make_initramfs())


def test_own_key_uki_with_db(tmp_path, keys, uki):
    signed = sign(keys, uki)
    assert sbverify(tmp_path, signed, keys / "db.crt")
    img = uki_image(tmp_path, signed)
    rc, r = results(img, "--db", keys / "db.crt")
    assert rc == 0
    for cid in ("sb.signed", "sb.digest", "sb.chain"):
        assert r[cid]["result"] == "pass", (cid, r[cid]["detail"])
    assert "armvm db key -> armvm db key (db)" in r["sb.chain"]["detail"]
    assert r["sb.sbat"]["result"] == "skip" and not r["sb.sbat"]["applicable"]
    # the wrong db
    rc, r = results(img, "--db", keys / "wrong.crt")
    assert rc == 1 and r["sb.chain"]["result"] == "fail"
    assert "armvm wrong key (db)" in r["sb.chain"]["detail"]
    # signed, but no db given: not judged, and says how to judge it
    rc, r = results(img)
    assert rc == 0 and r["sb.chain"]["result"] == "skip"
    assert "--db CERT or --vars FILE" in r["sb.chain"]["detail"]
    p = cli(img, "--strict")
    assert p.returncode == 1 and re.search(r"SKIP\s+MUST\s+sb\.chain", p.stdout)


SNAKEOIL = Path("/usr/share/qemu-efi-aarch64")


def test_snakeoil_uki_with_the_snakeoil_vars_file(tmp_path, keys, uki):
    """A UKI signed with Debian's snakeoil test key (password in qemu-efi-aarch64's
    README.Debian) passes with AAVMF_VARS.snakeoil.fd and fails with AAVMF_VARS.ms.fd."""
    vars_snake = Path("/usr/share/AAVMF/AAVMF_VARS.snakeoil.fd")
    if not (SNAKEOIL / "PkKek-1-snakeoil.key").is_file() or not vars_snake.is_file() or \
            not HOST_MS_VARS.is_file():
        pytest.skip("qemu-efi-aarch64 without the snakeoil key or VARS files")
    g.run("openssl", "rsa", "-in", SNAKEOIL / "PkKek-1-snakeoil.key", "-passin",
          "pass:snakeoil", "-out", keys / "snakeoil.key")
    shutil.copy(SNAKEOIL / "PkKek-1-snakeoil.pem", keys / "snakeoil.crt")
    img = uki_image(tmp_path, sign(keys, uki, "snakeoil"))
    rc, r = results(img, "--vars", vars_snake)
    assert rc == 0 and r["sb.chain"]["result"] == "pass", r["sb.chain"]
    assert "SnakeOil" in r["sb.chain"]["detail"] and "(db)" in r["sb.chain"]["detail"]
    rc, r = results(img, "--vars", HOST_MS_VARS)
    assert rc == 1 and r["sb.chain"]["result"] == "fail"
    assert "Microsoft Corporation UEFI CA 2011 (db)" in r["sb.chain"]["detail"]


def test_vars_made_by_virt_fw_vars_db_and_dbx(tmp_path, keys, uki):
    """--vars: a VARS file with our cert enrolled (virt-fw-vars, as `armvm-build keys` makes
    them) trusts the UKI; the same with its digest in dbx refuses it."""
    if not HOST_MS_VARS.is_file():
        pytest.skip("qemu-efi-aarch64 has no AAVMF_VARS.ms.fd")
    fwv = Path(sys.executable).parent / "virt-fw-vars"
    owner = "a0baa8a3-041d-48a8-bc87-c36d121b5e3d"
    signed = sign(keys, uki)
    img = uki_image(tmp_path, signed)
    # bookworm's blank AAVMF_VARS.fd has no variable store header: start from the MS one
    # with its keys deleted
    enroll = [fwv, "-i", HOST_MS_VARS, "-d", "db", "-d", "dbx", "-d", "KEK", "-d", "PK",
              "--set-pk", owner, keys / "db.crt", "--add-kek", owner, keys / "db.crt",
              "--add-db", owner, keys / "db.crt", "--sb"]
    g.run(*enroll, "-o", tmp_path / "own.fd")
    rc, r = results(img, "--vars", tmp_path / "own.fd")
    assert rc == 0 and r["sb.chain"]["result"] == "pass", r["sb.chain"]
    assert "armvm db key -> armvm db key (db)" in r["sb.chain"]["detail"]
    assert "Microsoft" not in r["sb.chain"]["detail"]
    b = BytesBlob(signed)
    digest = ac.image_digest(b, ac.read_pe_auth(b)).hex()
    g.run(*enroll, "--add-dbx-hash", owner, digest, "-o", tmp_path / "dbx.fd")
    rc, r = results(img, "--vars", tmp_path / "dbx.fd")
    assert rc == 1 and r["sb.chain"]["result"] == "fail"
    assert "in dbx (revoked)" in r["sb.chain"]["detail"]


def test_overlapping_sections_are_not_hashed_over_and_over(keys, uki):
    """A section table covering the file many times is refused before hashing (bounded)."""
    signed = bytearray(sign(keys, uki))
    b = BytesBlob(bytes(signed))
    info = ac.read_pe_auth(b)
    lfanew = struct.unpack_from("<I", signed, 0x3C)[0]
    nsec, opt = struct.unpack_from("<H", signed, lfanew + 6)[0], \
        struct.unpack_from("<H", signed, lfanew + 20)[0]
    table = lfanew + 24 + opt
    for i in range(nsec):
        struct.pack_into("<II", signed, table + 40 * i + 16, len(signed), 0)
    b = BytesBlob(bytes(signed))
    with pytest.raises(ValueError, match="overlapping sections"):
        ac.image_digest(b, ac.read_pe_auth(b))
    assert info.sections and ac.image_digest(BytesBlob(sign(keys, uki)), info)


def test_unsigned_loader_only_judged_when_asked(tmp_path, uki):
    img = uki_image(tmp_path, uki)
    rc, r = results(img)
    assert rc == 0 and r["boot.chain"]["result"] == "pass"
    assert not set(SB) & set(r)                     # not signed, not asked: not reported
    rc, r = results(img, "--secure-boot")
    assert rc == 1 and r["sb.signed"]["result"] == "fail"
    assert "/EFI/BOOT/BOOTAA64.EFI carries no signature" in r["sb.signed"]["detail"]
    p = cli(img, "--secure-boot")
    assert p.returncode == 1 and "failed MUST: sb.signed" in p.stdout


def _patch_certdir(data: bytes, off: int, size: int) -> bytes:
    b = BytesBlob(data)
    info = ac.read_pe_auth(b)
    out = bytearray(data)
    struct.pack_into("<II", out, info.certdir_off, off, size)
    return bytes(out)


def hostile_tables(signed: bytes):
    info = ac.read_pe_auth(BytesBlob(signed))
    off, size = info.cert_off, info.cert_size
    body = bytearray(signed)
    garbage = bytearray(signed)
    garbage[off + 8:off + size] = bytes((i * 37) & 0xFF for i in range(size - 8))
    huge = bytearray(signed)
    struct.pack_into("<I", huge, off, 0xFFFFFFF0)
    badrev = bytearray(signed)
    struct.pack_into("<HH", badrev, off + 4, 0x0100, 0x0EF1)
    return {
        "garbage PKCS#7": (bytes(garbage), "holds no Authenticode signature"),
        "dwLength past the table": (bytes(huge), "does not fit"),
        "table past the end of the file": (_patch_certdir(signed, off, 0x7FFFFFF0),
                                           "outside the file"),
        "truncated file": (bytes(body[:off + 40]), "outside the file"),
        "misaligned table": (_patch_certdir(signed[:off] + b"\0" * 4 + signed[off:],
                                            off + 4, size), "not 8-byte aligned"),
        "revision and type": (bytes(badrev), "wRevision 0x0100"),
    }


def test_hostile_certificate_tables_fail_cleanly(tmp_path, keys, uki):
    """Truncated or garbage certificate tables: a clear sb.signed failure, no traceback
    (the CLI runs without the test hook that turns verifier bugs into exceptions)."""
    signed = sign(keys, uki)
    for i, (what, (data, msg)) in enumerate(hostile_tables(signed).items()):
        img = uki_image(tmp_path, data, f"h{i}.raw")
        rc, r = results(img, "--db", keys / "db.crt")
        assert rc == 1, what
        assert r["sb.signed"]["result"] == "fail", (what, r["sb.signed"])
        assert msg in r["sb.signed"]["detail"], (what, r["sb.signed"]["detail"])
        assert "verifier error" not in json.dumps(r), what
        img.unlink()


def test_reader_bounds_on_random_tables():
    """The reader never raises on any table, and caps what it reads."""
    import random
    rnd = random.Random(12)
    base = g.make_uki("aarch64", b"070701" + bytes(100))
    info = ac.read_pe_auth(BytesBlob(base))
    for _ in range(300):
        tail = bytes(rnd.getrandbits(8) for _ in range(rnd.choice((8, 16, 64, 300))))
        n = rnd.choice((len(tail), rnd.getrandbits(32)))
        data = _patch_certdir(base + tail, len(base), n)
        b = BytesBlob(data)
        t = ac.read_cert_table(b, ac.read_pe_auth(b))
        assert t.entries or t.problems or n == 0
        for e in t.entries:
            assert len(e.data) <= ac.MAX_CERT_TABLE
            try:
                ac.parse_signature(e.data)
            except ValueError:
                pass
    assert ac.read_cert_table(BytesBlob(base), info).entries == []


# --- trust inputs ------------------------------------------------------------------------
def test_bad_trust_inputs_are_clear_errors(tmp_path, uki):
    img = uki_image(tmp_path, uki)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a certificate\n" * 10)
    big = tmp_path / "big.fd"
    with open(big, "wb") as f:
        f.truncate(checks_sb.MAX_VARS_FILE + 1)
    for args, rc, msg in ((("--db", junk), 3, "not an X.509 certificate"),
                          (("--vars", junk), 3, "not a UEFI variable store"),
                          (("--db", tmp_path / "missing.crt"), 2, "cannot read it"),
                          (("--vars", tmp_path / "missing.fd"), 2, "cannot read it"),
                          (("--vars", big), 3, "larger than")):
        p = cli(img, *args)
        assert p.returncode == rc, (args, p.stderr)
        assert args[0] in p.stderr and msg in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr


def test_builtin_microsoft_cas_match_virt_firmware():
    """The package data (from Debian's shim-signed) is the same as virt-firmware's copies."""
    import os
    import virt.firmware
    from cryptography.hazmat.primitives import hashes
    ref = Path(os.path.dirname(virt.firmware.__file__)) / "certs" / "microsoft.com"
    ours = {c.fingerprint(hashes.SHA256()) for c in checks_sb.builtin_cas()}
    theirs = {ac.load_certs((ref / n).read_bytes())[0].fingerprint(hashes.SHA256())
              for n in ("ms-uefi-2011.pem", "ms-uefi-2023.pem")}
    assert ours == theirs and len(ours) == 2


@pytest.mark.network
def test_shim_signatures_are_ber_and_both_verify(debian):
    """Microsoft's two signatures on shim (UEFI CA 2011 and 2023) parse and verify."""
    b = BytesBlob(debian["shim"])
    info = ac.read_pe_auth(b)
    t = ac.read_cert_table(b, info)
    assert len(t.entries) == 2 and not t.problems
    digest = ac.image_digest(b, info)
    cas = checks_sb.builtin_cas()
    anchors = set()
    for e in t.entries:
        s = ac.parse_signature(e.data)
        assert not s.problems and s.digest == digest
        ok, anchor = ac.chain_to(s, cas)
        assert ok
        anchors.add(anchor.subject.rfc4514_string())
    assert len(anchors) == 2
