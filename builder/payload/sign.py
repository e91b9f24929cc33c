"""Authenticode signing of EFI applications (PE/COFF) for UEFI Secure Boot, in Python.

What the firmware checks (Microsoft's "Windows Authenticode Portable Executable Signature
Format", as EDK2's DxeImageVerificationLib implements it):

* the image digest: SHA-256 over the file, skipping the optional header's CheckSum, the
  certificate table's data directory entry (index 4) and the certificate table itself;
  headers first, then each section's raw data in file order, then any data after the
  last section up to the certificate table;
* that digest inside an ``SpcIndirectDataContent`` (``SPC_PE_IMAGE_DATAOBJ`` + DigestInfo);
* a PKCS#7 SignedData over it: the signed attributes contentType and messageDigest (the
  SHA-256 of the SpcIndirectDataContent's value octets), RSA PKCS#1 v1.5 with SHA-256;
* a ``WIN_CERTIFICATE`` (revision 0x0200, type 2 = PKCS_SIGNED_DATA) appended at an
  8-byte aligned offset, named by data directory 4 (whose address is a file offset).

No signing-time attribute is added and RSA PKCS#1 v1.5 is deterministic, so equal inputs
give identical bytes. A loader that is already signed gets its signature replaced.
The private key stays in this process: it is never written anywhere or logged.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from asn1crypto import algos, cms, core, x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from builder.errors import ArmvmError

MAX_PE_BYTES = 512 * 1024 * 1024      # bounded before reading
MAX_KEY_BYTES = 64 * 1024
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
IMAGE_DIRECTORY_ENTRY_SECURITY = 4
SPC_INDIRECT_DATA_OBJID = "1.3.6.1.4.1.311.2.1.4"
SPC_PE_IMAGE_DATAOBJ = "1.3.6.1.4.1.311.2.1.15"


class SignError(ArmvmError):
    """A key, certificate or image that cannot be signed with (exit 3: input not what it claims)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)


# --- PE/COFF layout ----------------------------------------------------------------------

@dataclass(frozen=True)
class PeLayout:
    checksum_off: int          # file offset of OptionalHeader.CheckSum
    certdir_off: int           # file offset of data directory 4 (8 bytes)
    size_of_headers: int
    sections: Tuple[Tuple[int, int], ...]    # (PointerToRawData, SizeOfRawData), in file order
    cert_table: Tuple[int, int]              # (file offset, size) or (0, 0)


def parse_pe(data: bytes, what: str = "image") -> PeLayout:
    """The offsets Authenticode needs, read with bounds checks (never trusting a field)."""
    def need(cond, msg):
        if not cond:
            raise SignError(f"{what}: not a PE/COFF image ({msg})")
    need(len(data) >= 0x40 and data[:2] == b"MZ", "no MZ header")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    need(pe + 24 <= len(data) and data[pe:pe + 4] == b"PE\0\0", "no PE signature")
    nsections, = struct.unpack_from("<H", data, pe + 6)
    opt_size, = struct.unpack_from("<H", data, pe + 20)
    opt = pe + 24
    need(opt + opt_size <= len(data) and opt_size >= 96, "optional header out of range")
    magic, = struct.unpack_from("<H", data, opt)
    need(magic in (0x10B, 0x20B), f"optional header magic {magic:#x}")
    dd = opt + (96 if magic == 0x10B else 112)
    ndirs, = struct.unpack_from("<I", data, dd - 4)
    need(ndirs > IMAGE_DIRECTORY_ENTRY_SECURITY and dd + 8 * 5 <= opt + opt_size,
         "no certificate table directory entry")
    size_of_headers, = struct.unpack_from("<I", data, opt + 60)
    certdir = dd + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY
    cert_off, cert_size = struct.unpack_from("<II", data, certdir)
    sec = opt + opt_size
    need(sec + 40 * nsections <= len(data) and nsections <= 96, "section table out of range")
    need(sec + 40 * nsections <= size_of_headers <= len(data), "SizeOfHeaders out of range")
    sections = []
    for i in range(nsections):
        raw_size, raw_ptr = struct.unpack_from("<II", data, sec + 40 * i + 16)
        if raw_size == 0:
            continue
        need(raw_ptr + raw_size <= len(data), f"section {i} lies beyond the end of the file")
        sections.append((raw_ptr, raw_size))
    if cert_size:
        need(cert_off + cert_size <= len(data) and cert_off >= size_of_headers,
             "certificate table out of range")
    return PeLayout(opt + 64, certdir, size_of_headers, tuple(sorted(sections)),
                    (cert_off, cert_size) if cert_size else (0, 0))


def authenticode_digest(data: bytes, layout: Optional[PeLayout] = None) -> bytes:
    """SHA-256 Authenticode digest of a PE image (as the firmware computes it)."""
    pe = layout or parse_pe(data)
    h = hashlib.sha256()
    h.update(data[:pe.checksum_off])
    h.update(data[pe.checksum_off + 4:pe.certdir_off])
    h.update(data[pe.certdir_off + 8:pe.size_of_headers])
    hashed = pe.size_of_headers
    for ptr, size in pe.sections:
        h.update(data[ptr:ptr + size])
        hashed += size
    end = len(data) - pe.cert_table[1]
    if end > hashed:
        h.update(data[hashed:end])
    return h.digest()


# --- keys and certificates ---------------------------------------------------------------

@dataclass
class Signer:
    key: rsa.RSAPrivateKey = field(repr=False)
    cert: x509.Certificate
    cert_der: bytes
    warnings: List[str] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()


def _read_bounded(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        st = path.stat()
        if st.st_size > MAX_KEY_BYTES:
            raise SignError(f"{path}: {what} is {st.st_size} bytes; at most {MAX_KEY_BYTES} allowed")
        return path.read_bytes()
    except FileNotFoundError:
        raise SignError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise SignError(f"{path}: {what} is a folder, not a file") from None


def load_cert(path: Path) -> x509.Certificate:
    raw = _read_bounded(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw \
            else x509.load_der_x509_certificate(raw)
    except ValueError as e:
        raise SignError(f"{path}: not an X.509 certificate (PEM or DER): {e}") from None


def load_signer(key_path: Path, cert_path: Path, *, passphrase_env: Optional[str] = None,
                environ=None, now: Optional[datetime.datetime] = None) -> Signer:
    """Load an RSA key (PEM or DER; encrypted needs the passphrase from the environment
    variable `passphrase_env`) and its certificate; refuse a key that is not the cert's.
    An expired or not-yet-valid certificate gives a warning (the firmware ignores dates)."""
    environ = os.environ if environ is None else environ
    raw = _read_bounded(key_path, "signing key")
    password = None
    if passphrase_env:
        if passphrase_env not in environ:
            raise SignError(f"{key_path}: the passphrase variable {passphrase_env} is not set in "
                            f"the environment (export {passphrase_env}=...)")
        password = environ[passphrase_env].encode()
    loader = serialization.load_pem_private_key if b"-----BEGIN" in raw \
        else serialization.load_der_private_key
    try:
        key = loader(raw, password=password)
    except TypeError:
        if password is None:
            raise SignError(f"{key_path}: the signing key is encrypted and no passphrase was given: "
                            f"name an environment variable in bootloader.sign.passphrase_env "
                            f"(the passphrase never goes into the recipe)") from None
        raise SignError(f"{key_path}: the signing key is not encrypted; drop passphrase_env") from None
    except ValueError:
        # wrong passphrase or not a key; never echo key material
        why = "the passphrase is wrong or the file is not a private key" if password is not None \
            else "not a PEM or DER private key"
        raise SignError(f"{key_path}: cannot read the signing key: {why}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SignError(f"{key_path}: the signing key is {type(key).__name__.lstrip('_')}; "
                        f"UEFI Secure Boot needs RSA (2048 bits or more)")
    if key.key_size < 2048:
        raise SignError(f"{key_path}: RSA key of {key.key_size} bits; at least 2048 needed")
    cert = load_cert(cert_path)
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise SignError(f"{key_path} does not match {cert_path}: the key's public part is not the "
                        f"certificate's ({cert.subject.rfc4514_string()})")
    signer = Signer(key, cert, cert.public_bytes(serialization.Encoding.DER))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if now > after:
        signer.warnings.append(f"{cert_path}: the certificate expired on {after:%Y-%m-%d}; UEFI "
                               f"firmware ignores certificate dates, other verifiers may not")
    elif now < before:
        signer.warnings.append(f"{cert_path}: the certificate is not valid before {before:%Y-%m-%d}")
    return signer


# --- ASN.1 structures Authenticode adds to PKCS#7 ------------------------------------------

class SpcString(core.Choice):
    _alternatives = [("unicode", core.BMPString, {"implicit": 0}),
                     ("ascii", core.IA5String, {"implicit": 1})]


class SpcLink(core.Choice):
    _alternatives = [("url", core.IA5String, {"implicit": 0}),
                     ("moniker", core.Any, {"implicit": 1}),
                     ("file", SpcString, {"explicit": 2})]


class SpcPeImageData(core.Sequence):
    _fields = [("flags", core.BitString), ("file", SpcLink, {"explicit": 0})]


class SpcAttributeTypeAndOptionalValue(core.Sequence):
    _fields = [("type", core.ObjectIdentifier), ("value", SpcPeImageData)]


class DigestInfo(core.Sequence):
    _fields = [("digest_algorithm", algos.DigestAlgorithm), ("digest", core.OctetString)]


class SpcIndirectDataContent(core.Sequence):
    _fields = [("data", SpcAttributeTypeAndOptionalValue), ("message_digest", DigestInfo)]


class SpcContentInfo(core.Sequence):
    """PKCS#7 (not CMS) ContentInfo: the content is the SEQUENCE itself, not an OCTET STRING."""
    _fields = [("content_type", core.ObjectIdentifier),
               ("content", SpcIndirectDataContent, {"explicit": 0})]


class SpcSignedData(cms.SignedData):
    _fields = [(f[0], SpcContentInfo, *f[2:]) if f[0] == "encap_content_info" else f
               for f in cms.SignedData._fields]
    _spec_callbacks = None


class SpcOuterContentInfo(core.Sequence):
    _fields = [("content_type", cms.ContentType), ("content", SpcSignedData, {"explicit": 0})]


def _indirect_data(digest: bytes) -> SpcIndirectDataContent:
    return SpcIndirectDataContent({
        "data": {"type": SPC_PE_IMAGE_DATAOBJ,
                 "value": {"flags": core.BitString(()),
                           "file": SpcLink(name="file", value=SpcString(name="unicode",
                                                                          value="<<<Obsolete>>>"))}},
        "message_digest": {"digest_algorithm": {"algorithm": "sha256", "parameters": core.Null()},
                           "digest": digest},
    })


def pkcs7_signature(digest: bytes, signer: Signer) -> bytes:
    """The DER PKCS#7 SignedData that Authenticode puts into the WIN_CERTIFICATE."""
    idc = _indirect_data(digest)
    idc_der = idc.dump()
    # PKCS#7 v1.5: messageDigest covers the content's value octets (no tag and length)
    value = idc_der[len(idc_der) - len(idc.contents):]
    attrs = [
        cms.CMSAttribute({"type": "content_type", "values": [SPC_INDIRECT_DATA_OBJID]}),
        cms.CMSAttribute({"type": "message_digest", "values": [hashlib.sha256(value).digest()]}),
    ]
    attrs = sorted(attrs, key=lambda a: a.dump())           # DER orders a SET OF by encoding
    signed_attrs = cms.CMSAttributes(attrs)
    signature = signer.key.sign(signed_attrs.dump(), padding.PKCS1v15(), hashes.SHA256())
    cert = asn1_x509.Certificate.load(signer.cert_der)
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier(name="issuer_and_serial_number", value={
            "issuer": cert.issuer, "serial_number": cert.serial_number}),
        "digest_algorithm": {"algorithm": "sha256", "parameters": core.Null()},
        "signed_attrs": signed_attrs,
        "signature_algorithm": {"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()},
        "signature": signature,
    })
    signed = SpcSignedData({
        "version": "v1",
        "digest_algorithms": [{"algorithm": "sha256", "parameters": core.Null()}],
        "encap_content_info": {"content_type": SPC_INDIRECT_DATA_OBJID, "content": idc},
        "certificates": [cms.CertificateChoices(name="certificate", value=cert)],
        "signer_infos": [signer_info],
    })
    return SpcOuterContentInfo({"content_type": "signed_data", "content": signed}).dump()


# --- the signed image --------------------------------------------------------------------

@dataclass(frozen=True)
class SignResult:
    data: bytes
    digest: bytes
    replaced: bool              # the input carried a signature that was replaced


def strip_signature(data: bytes, what: str = "image") -> Tuple[bytes, bool]:
    """The image without its certificate table (directory 4 zeroed); the table must be at
    the end of the file, where every signer puts it."""
    pe = parse_pe(data, what)
    off, size = pe.cert_table
    if not size:
        return data, False
    if off + size != len(data) and data[off + size:].strip(b"\0"):
        raise SignError(f"{what}: its certificate table is not at the end of the file; "
                        f"cannot replace the signature")
    out = bytearray(data[:off])
    out[pe.certdir_off:pe.certdir_off + 8] = bytes(8)
    return bytes(out), True


def sign_pe(data: bytes, signer: Signer, what: str = "image") -> SignResult:
    """Sign (or re-sign) a PE image: pad to 8 bytes, digest, append the WIN_CERTIFICATE."""
    if len(data) > MAX_PE_BYTES:
        raise SignError(f"{what}: {len(data)} bytes; at most {MAX_PE_BYTES} can be signed")
    data, replaced = strip_signature(data, what)
    data += bytes(-len(data) % 8)                   # the table starts 8-byte aligned
    pe = parse_pe(data, what)
    digest = authenticode_digest(data, pe)
    blob = pkcs7_signature(digest, signer)
    length = 8 + len(blob)
    table = struct.pack("<IHH", length, WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA) + blob
    table += bytes(-len(table) % 8)
    out = bytearray(data)
    struct.pack_into("<II", out, pe.certdir_off, len(data), len(table))
    out += table
    return SignResult(bytes(out), digest, replaced)


def is_signed(path: Path) -> bool:
    """Whether a PE file carries a certificate table (data directory 4 not empty)."""
    path = Path(path)
    if path.stat().st_size > MAX_PE_BYTES:
        return False
    try:
        return parse_pe(path.read_bytes(), str(path)).cert_table[1] != 0
    except SignError:
        return False


def sign_file(src: Path, dest: Path, signer: Signer, what: Optional[str] = None) -> SignResult:
    """Sign `src` into `dest` (written under a temporary name, then renamed)."""
    src = Path(src)
    size = src.stat().st_size
    if size > MAX_PE_BYTES:
        raise SignError(f"{src}: {size} bytes; at most {MAX_PE_BYTES} can be signed")
    result = sign_pe(src.read_bytes(), signer, what or str(src))
    tmp = Path(dest).with_name(Path(dest).name + ".signing")
    tmp.write_bytes(result.data)
    os.replace(tmp, dest)
    return result
