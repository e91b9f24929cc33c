"""Authenticode signing (builder/payload/sign.py) and Secure Boot keys (builder/payload/keys.py),
judged by external tools: sbverify --cert (sbsigntool) for every signature, sbsign's own
digest for the Authenticode hash, virt-fw-vars for the enrolled variable store.
"""
from __future__ import annotations

import datetime
import lzma
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from builder.payload import sign
from builder.payload.sign import (SignError, authenticode_digest, load_signer, parse_pe, sign_file,
                                  sign_pe, strip_signature)
from tests.fixtures import AA64, pe_image

SNAKEOIL_KEY = Path("/usr/share/qemu-efi-aarch64/PkKek-1-snakeoil.key")
SNAKEOIL_CERT = Path("/usr/share/qemu-efi-aarch64/PkKek-1-snakeoil.pem")
SNAKEOIL_PASSWORD = "snakeoil"          # /usr/share/doc/qemu-efi-aarch64/README.Debian

needs_sbverify = pytest.mark.skipif(shutil.which("sbverify") is None,
                                    reason="sbverify missing (Debian package sbsigntool)")


def _key_and_cert(tmp: Path, name: str = "db", *, days: int = 365, not_after=None,
                  password: bytes | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    end = not_after or now + datetime.timedelta(days=days)
    n = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test {name}")])
    cert = (x509.CertificateBuilder().subject_name(n).issuer_name(n).public_key(key.public_key())
            .serial_number(12345).not_valid_before(min(now, end) - datetime.timedelta(days=2))
            .not_valid_after(end).sign(key, hashes.SHA256()))
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    kp, cp = tmp / f"{name}.key", tmp / f"{name}.crt"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


@pytest.fixture(scope="module")
def keypair(tmp_path_factory):
    return _key_and_cert(tmp_path_factory.mktemp("keys"))


def _sbverify(cert: Path, image: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sbverify", "--cert", str(cert), str(image)], capture_output=True, text=True)


def _efi(tmp: Path, data: bytes, name: str = "in.efi") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


@needs_sbverify
def test_signed_image_passes_sbverify_and_fails_with_another_cert(tmp_path, keypair):
    key, cert = keypair
    other_key, other_cert = _key_and_cert(tmp_path, "other")
    src = _efi(tmp_path, pe_image(AA64, payload=bytes(range(256)) * 40))
    out = tmp_path / "signed.efi"
    res = sign_file(src, out, load_signer(key, cert))
    assert not res.replaced
    ok = _sbverify(cert, out)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Signature verification OK" in ok.stdout
    bad = _sbverify(other_cert, out)
    assert bad.returncode != 0


@needs_sbverify
def test_win_certificate_layout(tmp_path, keypair):
    """data directory 4 names an 8-byte aligned WIN_CERTIFICATE, revision 0x0200, type 2,
    at the end of the file."""
    data = pe_image(AA64, payload=b"\x01" * 1001)
    signed = sign_pe(data, load_signer(*keypair)).data
    pe = parse_pe(signed)
    off, size = pe.cert_table
    assert off % 8 == 0 and size % 8 == 0 and off + size == len(signed)
    length, revision, ctype = struct.unpack_from("<IHH", signed, off)
    assert (revision, ctype) == (0x0200, 0x0002)
    assert 8 < length <= size


@needs_sbverify
def test_digest_equals_sbsigns(tmp_path):
    """sbsign (with the snakeoil key decrypted to a temp file) signs the same image: the
    digest in its SpcIndirectDataContent equals ours, and sbverify accepts both."""
    if shutil.which("sbsign") is None or shutil.which("openssl") is None:
        pytest.skip("sbsign or openssl missing")
    plain = tmp_path / "snakeoil.key"
    subprocess.run(["openssl", "pkey", "-in", str(SNAKEOIL_KEY), "-passin", f"pass:{SNAKEOIL_PASSWORD}",
                    "-out", str(plain)], check=True, capture_output=True)
    src = _efi(tmp_path, pe_image(AA64, payload=bytes(range(251)) * 77))
    theirs = tmp_path / "sbsign.efi"
    subprocess.run(["sbsign", "--key", str(plain), "--cert", str(SNAKEOIL_CERT), "--output", str(theirs),
                    str(src)], check=True, capture_output=True)
    data = theirs.read_bytes()
    off, size = parse_pe(data).cert_table
    blob = data[off + 8:off + size]
    parsed = sign.SpcOuterContentInfo.load(blob[:struct.unpack_from("<I", data, off)[0] - 8])
    their_digest = parsed["content"]["encap_content_info"]["content"]["message_digest"]["digest"].native
    assert their_digest == authenticode_digest(data)          # their image, our hash
    signer = load_signer(SNAKEOIL_KEY, SNAKEOIL_CERT, passphrase_env="P", environ={"P": SNAKEOIL_PASSWORD})
    ours = tmp_path / "ours.efi"
    res = sign_file(src, ours, signer)
    assert res.digest == their_digest
    assert _sbverify(SNAKEOIL_CERT, ours).returncode == 0
    assert _sbverify(SNAKEOIL_CERT, theirs).returncode == 0


def test_signing_is_deterministic_and_resigning_replaces(tmp_path, keypair):
    signer = load_signer(*keypair)
    data = pe_image(AA64, payload=b"\x5a" * 3333)
    a, b = sign_pe(data, signer), sign_pe(data, signer)
    assert a.data == b.data                       # no signing time, deterministic RSA
    again = sign_pe(a.data, signer)
    assert again.replaced and again.data == a.data
    stripped, had = strip_signature(a.data)
    assert had and parse_pe(stripped).cert_table == (0, 0)
    assert authenticode_digest(stripped + bytes(-len(stripped) % 8)) == a.digest


@needs_sbverify
def test_real_debian_loader_signed(tmp_path, pytestconfig, keypair):
    """systemd-boot's real AArch64 binary from Debian: signed, accepted by sbverify; a
    flipped byte in a section makes sbverify refuse it."""
    from tests.fixtures import debian_tree
    tree = debian_tree(pytestconfig, "trixie", "arm64", "systemd-boot-efi")
    src = next(tree.rglob("systemd-bootaa64.efi"))
    out = tmp_path / "BOOTAA64.EFI"
    sign_file(src, out, load_signer(*keypair))
    assert _sbverify(keypair[1], out).returncode == 0
    data = bytearray(out.read_bytes())
    ptr = parse_pe(bytes(data)).sections[0][0]
    data[ptr + 100] ^= 0xFF
    bad = tmp_path / "flipped.efi"
    bad.write_bytes(bytes(data))
    assert _sbverify(keypair[1], bad).returncode != 0


# --- keys and certificates: bad input gets a clear error ---------------------------------

def test_key_not_matching_cert(tmp_path, keypair):
    _, other_cert = _key_and_cert(tmp_path, "other")
    with pytest.raises(SignError, match="does not match") as e:
        load_signer(keypair[0], other_cert)
    assert e.value.exit_code == 3


def test_encrypted_key_without_passphrase_env():
    with pytest.raises(SignError, match="encrypted and no passphrase.*passphrase_env"):
        load_signer(SNAKEOIL_KEY, SNAKEOIL_CERT)
    with pytest.raises(SignError, match="SB_PASS is not set"):
        load_signer(SNAKEOIL_KEY, SNAKEOIL_CERT, passphrase_env="SB_PASS", environ={})
    with pytest.raises(SignError, match="passphrase is wrong") as e:
        load_signer(SNAKEOIL_KEY, SNAKEOIL_CERT, passphrase_env="SB_PASS", environ={"SB_PASS": "nope"})
    assert "nope" not in str(e.value)
    s = load_signer(SNAKEOIL_KEY, SNAKEOIL_CERT, passphrase_env="SB_PASS", environ={"SB_PASS": "snakeoil"})
    assert "SnakeOil" in s.subject and not s.warnings


def test_expired_cert_warns(tmp_path):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    key, cert = _key_and_cert(tmp_path, "old", not_after=past)
    s = load_signer(key, cert)
    assert len(s.warnings) == 1 and "expired on 2020-01-01" in s.warnings[0]


def test_not_a_key_or_cert(tmp_path, keypair):
    junk = tmp_path / "junk"
    junk.write_text("hello")
    with pytest.raises(SignError, match="not a PEM or DER private key"):
        load_signer(junk, keypair[1])
    with pytest.raises(SignError, match="not an X.509 certificate"):
        load_signer(keypair[0], junk)
    with pytest.raises(SignError, match="not found"):
        load_signer(tmp_path / "missing.key", keypair[1])
    with pytest.raises(SignError, match="not a PE/COFF image"):
        sign_pe(b"MZ" + bytes(100), load_signer(*keypair))


def test_private_key_not_in_signed_output(tmp_path, keypair):
    from cryptography.hazmat.primitives import serialization
    signer = load_signer(*keypair)
    data = sign_pe(pe_image(AA64), signer).data
    der = signer.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    d = signer.key.private_numbers().d.to_bytes(256, "big")
    assert der not in data and d not in data
    assert "key=" not in repr(signer)           # never printed by repr either


# --- armvm-build keys ----------------------------------------------------------------------

def test_keys_command_writes_keys_and_enrolled_vars(tmp_path):
    dest = tmp_path / "k"
    res = subprocess.run([sys.executable, "-m", "builder", "keys", str(dest), "--json"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for role in ("PK", "KEK", "db"):
        assert (dest / f"{role}.key").stat().st_mode & 0o077 == 0
        out = subprocess.run(["openssl", "x509", "-in", str(dest / f"{role}.crt"), "-noout", "-subject"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and role in out.stdout
        load_signer(dest / f"{role}.key", dest / f"{role}.crt")      # key matches cert
    # virt-fw-vars (another reader) sees our certs enrolled and Secure Boot enabled
    fw = Path(sys.executable).with_name("virt-fw-vars")
    listing = subprocess.run([str(fw), "-i", str(dest / "VARS.fd"), "-p", "-v"], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout + listing.stderr
    assert "SecureBootEnable" in text
    # its --extract-certs writes each enrolled cert: PK, KEK and db hold exactly ours
    work = tmp_path / "extracted"
    work.mkdir()
    subprocess.run([str(fw), "-i", str(dest / "VARS.fd"), "--extract-certs"], cwd=work, check=True,
                   capture_output=True)
    from cryptography import x509
    for role in ("PK", "KEK", "db"):
        got = sorted(work.glob(f"{role}-*.pem"))
        assert len(got) == 1, (role, [p.name for p in work.iterdir()])
        assert x509.load_pem_x509_certificate(got[0].read_bytes()) == \
            x509.load_pem_x509_certificate((dest / f"{role}.crt").read_bytes())
    again = subprocess.run([sys.executable, "-m", "builder", "keys", str(dest)], capture_output=True, text=True)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert "Traceback" not in again.stderr


# --- modules under lockdown -----------------------------------------------------------------

def test_decompressed_module_keeps_appended_signature(pytestconfig):
    """Under lockdown the kernel loads only signed modules: decompressing a real trixie
    .ko.xz at build time keeps the '~Module signature appended~' trailer, byte for byte."""
    import os
    if os.environ.get("ARMVM_OFFLINE_TESTS") == "1":
        pytest.skip("ARMVM_OFFLINE_TESTS=1")
    from builder.inputs.cache import Cache
    from builder.inputs.debian.archive import DebianArchive
    from builder.inputs.sources import Fetcher
    from builder.payload.kernel import decompress_module
    fetcher = Fetcher(cache=Cache(Path(pytestconfig.cache.mkdir("armvm-debian"))), progress=False)
    archive = DebianArchive(fetcher, mirror=None, suite="trixie", components=["main"], arch="arm64")
    tree = archive.extract(archive.fetch(archive.resolve_kernel("linux-image-cloud-arm64")))
    ko = next(p for p in tree.rglob("efivarfs.ko.xz"))
    raw = ko.read_bytes()
    plain = decompress_module(raw, ko.name)
    assert plain == lzma.decompress(raw)
    assert plain.endswith(b"~Module signature appended~\n")
    assert plain.startswith(b"\x7fELF")
