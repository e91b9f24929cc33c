"""Secure Boot keys for testing your own chain: `armvm-build keys DIR`.

Writes PK, KEK and db RSA-2048 keys (PEM, mode 0600) with self-signed X.509 certificates
(PEM), and VARS.fd: Debian's formatted AAVMF variable store (AAVMF_VARS.snakeoil.fd) with
its PK, KEK and db replaced by these and Secure Boot on, written by virt-firmware (the library behind virt-fw-vars). Boot an
image signed with db.key by passing ``--secure-boot DIR/VARS.fd``.

The keys are random (not reproducible); the certificates' serial numbers and the owner
GUIDs come from DIR's name, their validity from the creation time for 30 years. Each file
is written under a temporary name and renamed; an existing DIR/db.key (or any other
output) is never overwritten.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from builder.errors import ArmvmError

ROLES = ("PK", "KEK", "db")
KEY_BITS = 2048
VALID_DAYS = 30 * 365
VARS_NAME = "VARS.fd"
# owner GUIDs of the enrolled signature lists derive from this namespace and the CN
OWNER_NAMESPACE = uuid.UUID("5d0a3a6e-8c3f-4e43-9a3e-61726d766d62")


@dataclass
class KeysResult:
    dir: Path
    files: Dict[str, Path] = field(default_factory=dict)   # "db.key" -> path
    owner: str = ""
    subjects: Dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"dir": str(self.dir), "files": {k: str(v) for k, v in self.files.items()},
                "owner_guid": self.owner, "subjects": self.subjects}


# Debian's plain AAVMF_VARS.fd is all zeros (the firmware formats it at first boot), which
# virt-firmware cannot edit; its snakeoil store is formatted, and every key list in it
# (PK, KEK, db) is replaced.
VARS_TEMPLATE = Path("/usr/share/AAVMF/AAVMF_VARS.snakeoil.fd")


def default_vars_template() -> Path:
    return VARS_TEMPLATE


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _cert(key, cn: str, serial: int, now: datetime.datetime):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def make_keys(dest: Path, *, common_name: Optional[str] = None,
              vars_template: Optional[Path] = None, stage=None) -> KeysResult:
    """Write PK/KEK/db keys and certs and an enrolled VARS.fd into `dest`. `stage` is a
    context-manager factory taking a stage name (the CLI's live progress)."""
    stage = stage or (lambda name: contextlib.nullcontext())
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ArmvmError(f"{dest} exists and is not a folder")
    template = Path(vars_template) if vars_template else default_vars_template()
    if not template.is_file():
        from builder.errors import MissingToolError
        raise MissingToolError(str(template), "qemu-efi-aarch64", "as the VARS template")
    names = [f"{r}.{s}" for r in ROLES for s in ("key", "crt")] + [VARS_NAME]
    taken = [n for n in names if (dest / n).exists() or (dest / n).is_symlink()]
    if taken:
        raise ArmvmError(f"{dest}: {', '.join(taken)} already exist; keys are never overwritten "
                         f"(choose another folder or remove them)")
    cn = common_name or f"armvm-build {dest.resolve().name}"
    owner = str(uuid.uuid5(OWNER_NAMESPACE, cn))
    dest.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    result = KeysResult(dest, owner=owner)
    with stage("generate PK, KEK, db"):
        for role in ROLES:
            key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
            serial = int.from_bytes(uuid.uuid5(OWNER_NAMESPACE, f"{cn}/{role}").bytes, "big") >> 1
            cert = _cert(key, f"{cn} {role}", serial, now)
            kpath, cpath = dest / f"{role}.key", dest / f"{role}.crt"
            _write(kpath, key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), 0o600)
            _write(cpath, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            result.files[kpath.name], result.files[cpath.name] = kpath, cpath
            result.subjects[role] = cert.subject.rfc4514_string()
    with stage("write VARS.fd (virt-firmware)"):
        result.files[VARS_NAME] = write_vars(dest / VARS_NAME, template, owner,
                                             pk=dest / "PK.crt", kek=[dest / "KEK.crt"],
                                             db=[dest / "db.crt"])
    return result


def write_vars(out: Path, template: Path, owner: str, *, pk: Path, kek: List[Path],
               db: List[Path]) -> Path:
    """An EDK2 variable store from `template` with PK/KEK/db enrolled and Secure Boot on."""
    import logging
    from virt.firmware.varstore import edk2
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    if not edk2.Edk2VarStore.probe(str(template)):
        raise ArmvmError(f"{template}: not an EDK2 variable store (expected Debian's AAVMF_VARS.fd)",
                         exit_code=3)
    store = edk2.Edk2VarStore(str(template))
    varlist = store.get_varlist()
    varlist.add_cert("PK", owner, str(pk), True)
    for n, c in enumerate(kek):
        varlist.add_cert("KEK", owner, str(c), n == 0)
    for n, c in enumerate(db):
        varlist.add_cert("db", owner, str(c), n == 0)
    varlist.enable_secureboot()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    store.write_varstore(str(tmp), varlist)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out
