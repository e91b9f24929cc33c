"""Authenticode reader for UEFI Secure Boot: the certificate table, the image digest, the
PKCS#7 signature and its chain (Microsoft "Windows Authenticode Portable Executable Signature
Format"; UEFI 2.6 §32.2.4 WIN_CERTIFICATE_UEFI_GUID / WIN_CERT_TYPE_PKCS_SIGNED_DATA).

Reads untrusted images: every size is checked against the file and capped before anything is
allocated. The PKCS#7 SignedData is parsed with asn1crypto, which accepts BER (Microsoft's
signatures on shim are BER, not strict DER); signatures are checked with ``cryptography``.

    info = read_pe_auth(blob)              # header fields (PeAuthError when not a PE)
    table = read_cert_table(blob, info)    # WIN_CERTIFICATE entries and problems
    digest = image_digest(blob, info, "sha256")
    sig = parse_signature(entry.data)      # SpcIndirectDataContent digest, signer, certs
    ok, why = chain_to(sig, trusted)       # signer -> ... -> one of the trusted certs
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Optional

from builder.verify.blob import Blob

# Optional header offsets (Microsoft PE/COFF Specification, "Optional Header")
OPT_CHECKSUM = 64                        # CheckSum, same in PE32 and PE32+
OPT_SIZE_OF_HEADERS = 60
OPT_NUMBER_OF_RVA_AND_SIZES = {0x10B: 92, 0x20B: 108}
OPT_DATA_DIRECTORIES = {0x10B: 96, 0x20B: 112}
IMAGE_DIRECTORY_ENTRY_SECURITY = 4       # Certificate Table: a file offset, not an RVA
WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
WIN_CERT_TYPE_EFI_GUID = 0x0EF1
WIN_CERTIFICATE_HEADER = 8               # dwLength, wRevision, wCertificateType
MAX_CERT_TABLE = 1 << 20                 # real tables are a few KiB (shim: two signatures)
MAX_CERTS = 16
MAX_SECTIONS = 96                        # the PE/COFF limit
MAX_CHAIN = 8
MAX_SIG_CERTS = 64                       # certificates read from one SignedData
MAX_HASH_FACTOR = 4                      # overlapping sections: hash at most 4x the file
SPC_INDIRECT_DATA = "1.3.6.1.4.1.311.2.1.4"
HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384,
          "sha512": hashlib.sha512}


class PeAuthError(Exception):
    """The headers Authenticode needs are missing or point outside the file."""


@dataclass
class PeAuth:
    magic: int
    checksum_off: int                    # file offset of the CheckSum field
    certdir_off: int                     # file offset of data directory 4 (8 bytes)
    size_of_headers: int
    cert_off: int                        # Certificate Table: file offset and size (0 = none)
    cert_size: int
    sections: list                       # (PointerToRawData, SizeOfRawData)
    size: int
    has_certdir: bool = True             # NumberOfRvaAndSizes > 4


@dataclass
class CertEntry:
    offset: int
    length: int                          # dwLength
    revision: int
    type: int
    data: bytes


@dataclass
class CertTable:
    entries: list = field(default_factory=list)
    problems: list = field(default_factory=list)


@dataclass
class Signature:
    digest_algorithm: str                # of SpcIndirectDataContent's DigestInfo
    digest: bytes                        # the image digest the signer signed
    signer: object                       # cryptography x509.Certificate (None: not found)
    certs: list                          # every certificate the SignedData carries
    problems: list = field(default_factory=list)   # signature does not verify, ...

    @property
    def signer_name(self) -> str:
        return subject(self.signer) if self.signer is not None else "(unknown signer)"


def read_pe_auth(blob: Blob) -> PeAuth:
    head = blob.read_at(0, 64)
    if len(head) < 64 or head[:2] != b"MZ":
        raise PeAuthError("not a PE image (no MZ header)")
    lfanew = struct.unpack_from("<I", head, 0x3C)[0]
    coff = blob.read_at(lfanew, 24)
    if len(coff) < 24 or coff[:4] != b"PE\0\0":
        raise PeAuthError(f"no PE signature at e_lfanew 0x{lfanew:X}")
    nsec, opt_size = struct.unpack_from("<H", coff, 6)[0], struct.unpack_from("<H", coff, 20)[0]
    opt_off = lfanew + 24
    magic = struct.unpack("<H", blob.read_at(opt_off, 2).ljust(2, b"\0"))[0]
    if magic not in OPT_DATA_DIRECTORIES:
        raise PeAuthError(f"optional header magic 0x{magic:X} is neither PE32 nor PE32+")
    ddir = OPT_DATA_DIRECTORIES[magic]
    if opt_size < ddir + 8 * (IMAGE_DIRECTORY_ENTRY_SECURITY + 1):
        raise PeAuthError(f"SizeOfOptionalHeader {opt_size} leaves no room for the "
                          "Certificate Table data directory")
    opt = blob.read_at(opt_off, ddir + 8 * (IMAGE_DIRECTORY_ENTRY_SECURITY + 1))
    if len(opt) < ddir + 8 * (IMAGE_DIRECTORY_ENTRY_SECURITY + 1):
        raise PeAuthError("the optional header runs past the end of the file")
    nrva = struct.unpack_from("<I", opt, OPT_NUMBER_OF_RVA_AND_SIZES[magic])[0]
    certdir = ddir + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY
    cert_off, cert_size = struct.unpack_from("<II", opt, certdir)
    if nrva <= IMAGE_DIRECTORY_ENTRY_SECURITY:   # no such directory: nothing to skip there
        cert_off = cert_size = 0
    soh = struct.unpack_from("<I", opt, OPT_SIZE_OF_HEADERS)[0]
    if nsec > MAX_SECTIONS:
        raise PeAuthError(f"{nsec} sections (PE/COFF allows {MAX_SECTIONS})")
    table = opt_off + opt_size
    raw = blob.read_at(table, 40 * nsec)
    if len(raw) < 40 * nsec:
        raise PeAuthError("the section table runs past the end of the file")
    secs = []
    for i in range(nsec):
        size, ptr = struct.unpack_from("<II", raw, 40 * i + 16)
        if size:
            secs.append((ptr, size))
    return PeAuth(magic, opt_off + OPT_CHECKSUM, opt_off + certdir, soh, cert_off, cert_size,
                  sorted(secs), blob.size, nrva > IMAGE_DIRECTORY_ENTRY_SECURITY)


def read_cert_table(blob: Blob, info: PeAuth) -> CertTable:
    """The WIN_CERTIFICATE entries of the Certificate Table; problems name what is wrong
    (an absent table is the empty result with no problems)."""
    t = CertTable()
    off, size = info.cert_off, info.cert_size
    if not off and not size:
        return t
    if off + size > info.size or off < info.size_of_headers and off:
        t.problems.append(f"the Certificate Table (offset 0x{off:X}, {size} bytes) lies outside "
                          f"the file's data ({info.size} bytes, headers end at "
                          f"0x{info.size_of_headers:X})")
        return t
    if off % 8:
        t.problems.append(f"the Certificate Table at 0x{off:X} is not 8-byte aligned")
    if size > MAX_CERT_TABLE:
        t.problems.append(f"the Certificate Table is {size} bytes; more than {MAX_CERT_TABLE} "
                          "is not a signature")
        return t
    data = blob.read_at(off, size)
    pos = 0
    while pos < len(data):
        if len(t.entries) >= MAX_CERTS:
            t.problems.append(f"more than {MAX_CERTS} WIN_CERTIFICATE entries")
            break
        if len(data) - pos < WIN_CERTIFICATE_HEADER:
            if data[pos:].strip(b"\0"):
                t.problems.append(f"{len(data) - pos} stray bytes at the end of the "
                                  "Certificate Table")
            break
        length, rev, typ = struct.unpack_from("<IHH", data, pos)
        if length < WIN_CERTIFICATE_HEADER or pos + length > len(data):
            t.problems.append(f"WIN_CERTIFICATE at +{pos}: dwLength {length} does not fit the "
                              f"{size}-byte table")
            break
        e = CertEntry(off + pos, length, rev, typ, data[pos + 8:pos + length])
        t.entries.append(e)
        if rev != WIN_CERT_REVISION_2_0:
            t.problems.append(f"WIN_CERTIFICATE at +{pos}: wRevision 0x{rev:04X}, expected "
                              "0x0200")
        if typ != WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            t.problems.append(f"WIN_CERTIFICATE at +{pos}: wCertificateType 0x{typ:04X}, "
                              "expected 0x0002 (PKCS_SIGNED_DATA)")
        pos += -(-length // 8) * 8
    return t


def image_digest(blob: Blob, info: PeAuth, algorithm: str = "sha256") -> bytes:
    """The Authenticode image hash as UEFI firmware computes it: the headers without the
    CheckSum field and the Certificate Table entry, every section's raw data in file order,
    then whatever follows up to the Certificate Table (or the end of the file). ValueError
    when overlapping sections would make that more than MAX_HASH_FACTOR times the file."""
    total = sum(min(size, max(0, info.size - ptr)) for ptr, size in info.sections)
    if total > MAX_HASH_FACTOR * info.size:
        raise ValueError(f"the section table covers {total} bytes of a {info.size}-byte file "
                         "(overlapping sections); not hashed")
    h = HASHES[algorithm]()
    soh = min(info.size_of_headers, info.size)
    ranges = ((0, info.checksum_off), (info.checksum_off + 4, info.certdir_off),
              (info.certdir_off + 8, soh)) if info.has_certdir else \
        ((0, info.checksum_off), (info.checksum_off + 4, soh))
    for a, b in ranges:
        for chunk in blob.chunks(a, max(a, b)):
            h.update(chunk)
    hashed = soh
    for ptr, size in info.sections:
        end = min(ptr + size, info.size)
        for chunk in blob.chunks(ptr, end):
            h.update(chunk)
        hashed += max(0, end - ptr)
    end = info.size - (info.cert_size if info.cert_off else 0)
    if end > hashed:
        for chunk in blob.chunks(hashed, end):
            h.update(chunk)
    return h.digest()


def section_names(blob: Blob, pe) -> list:
    """Section names with COFF long names ('/4': offset 4 in the string table after the
    symbol table) resolved; linkers give shim's .vendor_cert and .sbatlevel such names."""
    lfanew = struct.unpack("<I", blob.read_at(0x3C, 4).ljust(4, b"\0"))[0]
    symtab, nsym = struct.unpack("<II", blob.read_at(lfanew + 12, 8).ljust(8, b"\0"))
    strtab = symtab + 18 * nsym if symtab else 0
    out = []
    for s in pe.sections:
        name = s.name
        if name.startswith("/") and name[1:].isdigit() and strtab:
            raw = blob.read_at(strtab + int(name[1:]), 64).split(b"\0", 1)[0]
            name = raw.decode("ascii", "replace") or name
        out.append(name)
    return out


def find_section(blob: Blob, pe, name: str):
    for s, n in zip(pe.sections, section_names(blob, pe)):
        if n == name:
            return s
    return None


def _crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    return x509, hashes, padding, rsa, ec


def load_cert(der: bytes):
    x509 = _crypto()[0]
    return x509.load_der_x509_certificate(der)


def subject(cert) -> str:
    try:
        return cert.subject.rfc4514_string()
    except Exception:                     # a name cryptography cannot print
        return "(unprintable subject)"


def parse_signature(data: bytes) -> Signature:
    """Parse one PKCS#7 SignedData (BER accepted) holding an SpcIndirectDataContent, and
    check the signer's signature over the signed attributes. Raises ValueError when it is
    not an Authenticode signature at all."""
    from asn1crypto import algos, cms, core
    try:
        ci = cms.ContentInfo.load(data)
        if ci["content_type"].native != "signed_data":
            raise ValueError(f"content type {ci['content_type'].dotted}, not signedData")
        sd = ci["content"]
        eci = sd["encap_content_info"]
        if eci["content_type"].dotted != SPC_INDIRECT_DATA:
            raise ValueError(f"content {eci['content_type'].dotted} is not "
                             "SpcIndirectDataContent")
        # [0] EXPLICIT SpcIndirectDataContent: asn1crypto strips the explicit tag; the
        # signer hashed the SEQUENCE's value octets (without its tag and length)
        spc_value = eci["content"].contents
        spc = core.Sequence.load(b"\x30" + _der_length(len(spc_value)) + spc_value)
        di = algos.DigestInfo.load(spc[1].dump())
        alg = di["digest_algorithm"]["algorithm"].native
        digest = di["digest"].native
        signers = list(sd["signer_infos"])
        certs = []
        for c in list(sd["certificates"] or [])[:MAX_SIG_CERTS]:
            if c.name == "certificate":
                try:
                    certs.append(load_cert(c.chosen.dump(force=True)))
                except ValueError:
                    pass                  # one unreadable extra cert does not sink the rest
    except ValueError:
        raise
    except Exception as e:                # asn1crypto raises many types on garbage
        raise ValueError(f"not a PKCS#7 SignedData ({type(e).__name__}: {e})") from None
    sig = Signature(alg, digest, None, certs)
    if len(signers) != 1:
        sig.problems.append(f"{len(signers)} SignerInfos; Authenticode has exactly one")
        if not signers:
            return sig
    si = signers[0]
    sid = si["sid"]
    if sid.name == "issuer_and_serial_number":
        serial = sid.chosen["serial_number"].native
        issuer = sid.chosen["issuer"].dump()
        for c in certs:
            if c.serial_number == serial and c.issuer.public_bytes() == issuer:
                sig.signer = c
                break
    if sig.signer is None:
        for c in certs:                   # fall back on the serial number alone
            if sid.name == "issuer_and_serial_number" and c.serial_number == serial:
                sig.signer = c
                break
    if sig.signer is None:
        sig.problems.append("the signer's certificate is not in the signature")
        return sig
    _verify_signer(sig, si, spc_value)
    return sig


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _verify_signer(sig: Signature, si, spc_value: bytes) -> None:
    x509, hashes, padding, rsa, ec = _crypto()
    halg = si["digest_algorithm"]["algorithm"].native
    if halg not in HASHES:
        sig.problems.append(f"signer digest algorithm {halg} is not supported")
        return
    attrs = si["signed_attrs"]
    if attrs is None or not len(attrs):
        signed = spc_value
    else:
        md = [a["values"][0].native for a in attrs if a["type"].native == "message_digest"]
        if not md or md[0] != HASHES[halg](spc_value).digest():
            sig.problems.append("the messageDigest attribute does not match the "
                                "SpcIndirectDataContent (the signed content was altered)")
            return
        signed = b"\x31" + attrs.dump()[1:]    # the SET OF tag, as the signer hashed it
    h = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
         "sha512": hashes.SHA512}[halg]()
    key = sig.signer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(si["signature"].native, signed, padding.PKCS1v15(), h)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(si["signature"].native, signed, ec.ECDSA(h))
        else:
            sig.problems.append(f"signer key type {type(key).__name__} is not supported")
    except Exception:                     # cryptography's InvalidSignature and friends
        sig.problems.append(f"the signature by {sig.signer_name} does not verify")


def issued_by(cert, issuer) -> bool:
    """``cert`` names ``issuer`` as its issuer and carries a valid signature by it (UEFI
    ignores validity periods: no clock at boot)."""
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:
        return False


def chain_to(sig: Signature, trusted: list) -> tuple:
    """(True, trusted cert) when the signer, or a certificate it chains to through the
    signature's own certificates, is one of ``trusted`` or is issued by one of them."""
    if sig.signer is None:
        return False, None
    fps = {c.fingerprint(_crypto()[1].SHA256()): c for c in trusted}
    cur, seen = sig.signer, set()
    for _ in range(MAX_CHAIN):
        fp = cur.fingerprint(_crypto()[1].SHA256())
        if fp in fps:
            return True, fps[fp]
        for t in trusted:
            if issued_by(cur, t):
                return True, t
        seen.add(fp)
        nxt = [c for c in sig.certs if c.fingerprint(_crypto()[1].SHA256()) not in seen
               and issued_by(cur, c)]
        if not nxt:
            return False, None
        cur = nxt[0]
    return False, None


def load_certs(data: bytes) -> list:
    """Certificates from PEM (one or more) or DER bytes; ValueError when none."""
    x509 = _crypto()[0]
    if b"-----BEGIN CERTIFICATE-----" in data:
        return list(x509.load_pem_x509_certificates(data))
    return [x509.load_der_x509_certificate(data)]


def vendor_certs(section_data: bytes) -> list:
    """shim's ``.vendor_cert`` section: struct cert_table { UINT32 vendor_authorized_size,
    vendor_deauthorized_size, vendor_authorized_offset, vendor_deauthorized_offset }, the
    authorized part being one DER certificate (or an EFI_SIGNATURE_LIST database)."""
    if len(section_data) < 16:
        return []
    asize, _, aoff, _ = struct.unpack_from("<IIII", section_data, 0)
    der = section_data[aoff:aoff + asize]
    if len(der) != asize or not asize:
        return []
    try:
        return [load_cert(der)]
    except ValueError:
        return []


def parse_sbat(text: str) -> tuple:
    """(entries [(component, generation)], problems) from SBAT CSV (shim's SBAT.md)."""
    entries, problems = [], []
    for n, line in enumerate(text.splitlines()[:256], 1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        if len(fields) < 2 or not fields[0]:
            problems.append(f"line {n}: '{line[:60]}' is not component,generation,...")
            continue
        try:
            gen = int(fields[1])
        except ValueError:
            problems.append(f"line {n}: generation '{fields[1][:20]}' is not a number")
            continue
        entries.append((fields[0], gen))
    if entries and entries[0][0] != "sbat":
        problems.append("the first entry is not the 'sbat,<version>' header")
    return entries, problems


def parse_sbatlevel(data: bytes) -> Optional[dict]:
    """shim's ``.sbatlevel`` section: UINT32 version, previous offset, latest offset (from
    byte 4), then NUL-terminated SBAT revocation lists. {'previous': text, 'latest': text}."""
    if len(data) < 12:
        return None
    _, prev, latest = struct.unpack_from("<III", data, 0)
    out = {}
    for name, off in (("previous", prev), ("latest", latest)):
        start = 4 + off
        if start >= len(data):
            return None
        out[name] = data[start:].split(b"\0", 1)[0].decode("ascii", "replace")
    return out
