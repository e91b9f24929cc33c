"""Secure Boot checks: sb.signed, sb.digest, sb.chain, sb.sbat.

They judge every link the firmware or shim verifies, following the chain the loader really
takes (see chain.py): the loader at the removable path (firmware: db); when it is shim, the
grub<arch>.efi beside it (shim: db or the certificate in its .vendor_cert); then the kernel
that GRUB or systemd-boot starts (shim's vendor cert when shim is in the chain, else db). A
UKI's sections are covered by the UKI's own signature.

They run when the loader carries a signature, or when asked (``--secure-boot``, ``--db``,
``--vars``); otherwise they are left out of the report. Trusted certificates come from
``--db CERT`` (PEM or DER), from the db of a ``--vars`` file (read with virt-firmware), or,
for shim, from Microsoft's UEFI CA 2011 and 2023 shipped in builder/verify/certs/ (copied from
Debian's shim-signed; see the README there).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from builder.errors import EXIT_USAGE, ArmvmError, NotAnImageError
from builder.verify import authenticode as ac
from builder.verify.blob import read_option_file
from builder.verify.pe import PeError, parse_pe, section_blob

from builder.verify.catalog import SB_IDS
CERTS_DIR = Path(__file__).with_name("certs")
MS_UEFI_CAS = ("microsoft-uefi-ca-2011.pem", "microsoft-uefi-ca-2023.pem")
MAX_CERT_FILE = 1 << 20
MAX_VARS_FILE = 64 << 20                # AAVMF VARS files are 64 MiB at most (trixie pads)
MAX_SBAT = 64 << 10
MAX_IMAGE = 1 << 30                     # larger "loaders" and "kernels" are not hashed
EFI_CERT_SHA256 = "c1c41626-504c-4092-aca9-41f936934328"


@dataclass
class Trust:
    certs: list = field(default_factory=list)       # cryptography certificates (db)
    hashes: set = field(default_factory=set)        # db EFI_CERT_SHA256 entries
    dbx: set = field(default_factory=set)           # dbx EFI_CERT_SHA256 entries
    source: str = ""
    given: bool = False                             # from --db / --vars, not the built-in CAs


@dataclass
class Link:
    path: str
    blob: object
    role: str                                       # 'loader' | 'shim' | 'next' | 'kernel'
    anchors: list                                   # [(cert, where)] it must chain to
    by: str                                         # who verifies it: firmware, shim
    info: object = None
    table: object = None
    sigs: list = field(default_factory=list)        # (CertEntry, Signature or error str)
    digest: Optional[bytes] = None


def builtin_cas() -> list:
    return [c for n in MS_UEFI_CAS for c in ac.load_certs((CERTS_DIR / n).read_bytes())]


def load_trust(db=(), vars_file=None) -> Trust:
    """Trusted certificates from --db files and a --vars file; the built-in Microsoft UEFI
    CAs when neither is given. ArmvmError exit 2 when a file cannot be read, exit 3 when it
    is not what it claims."""
    t = Trust()
    where = []
    for p in db or ():
        name = os.fspath(p)
        raw = read_option_file(name, "--db", MAX_CERT_FILE, "what --db takes")
        try:
            certs = ac.load_certs(raw)
        except ValueError as e:
            raise NotAnImageError(f"--db {name}: not an X.509 certificate in PEM or DER "
                                  f"({e})") from None
        t.certs += certs
        where.append(f"--db {name}")
    if vars_file is not None:
        _load_vars(t, os.fspath(vars_file))
        where.append(f"--vars {os.fspath(vars_file)}")
    if where:
        t.given, t.source = True, ", ".join(where)
    else:
        t.source = "Microsoft UEFI CA 2011/2023 (built in)"   # loaded when needed (run)
    return t


def _load_vars(t: Trust, name: str) -> None:
    try:
        size = os.path.getsize(name)
    except OSError as e:
        raise ArmvmError(f"--vars {name}: cannot read it ({e.strerror or e})",
                         exit_code=EXIT_USAGE) from None
    if size > MAX_VARS_FILE:
        raise NotAnImageError(f"--vars {name}: {size} bytes, larger than {MAX_VARS_FILE}; "
                              "not a UEFI variable store")
    try:
        from virt.firmware.varstore import autodetect
        store = autodetect.open_varstore(name)
        varlist = store.get_varlist() if store is not None else None
    except Exception as e:             # virt-firmware on garbage: many exception types
        raise NotAnImageError(f"--vars {name}: not a UEFI variable store virt-firmware "
                              f"reads ({type(e).__name__}: {e})") from None
    if varlist is None:
        raise NotAnImageError(f"--vars {name}: not a UEFI variable store (edk2 VARS .fd, "
                              "qcow2, AWS or JSON)")
    for var, target in (("db", "db"), ("dbx", "dbx")):
        item = varlist.get(var)
        sigdb = getattr(item, "sigdb", None) if item is not None else None
        for siglist in sigdb or []:
            if siglist.x509 is not None and target == "db":
                t.certs.append(siglist.x509)
            if str(siglist.guid) == EFI_CERT_SHA256:
                for sig in siglist:
                    (t.hashes if target == "db" else t.dbx).add(bytes(sig["data"]))
    if not t.certs and not t.hashes:
        raise NotAnImageError(f"--vars {name}: its db holds no certificate or hash (Secure "
                              "Boot keys not enrolled?)")


def _names(certs) -> str:
    return "; ".join(dict.fromkeys(ac.subject(c) for c in certs)) or "none"


def run(ctx, trust: Trust, required: bool) -> None:
    if ctx.loader is None or ctx.loader_pe is None:
        for cid in SB_IDS:
            ctx.set(cid, "skip", "no usable loader (see boot.path / boot.pe)")
        return
    loader = Link(ctx.loader_path, ctx.loader, "loader", [], "the firmware")
    _read_sigs(loader)
    if not required and not loader.sigs and not (loader.table and loader.table.problems):
        return                           # unsigned and not asked: sb.* are not reported
    if not trust.given and not trust.certs:
        trust.certs = builtin_cas()
    db = [(c, "db") for c in trust.certs]
    loader.anchors = db
    links = [loader]
    vendor = []
    shim = ac.find_section(ctx.loader, ctx.loader_pe, ".vendor_cert") is not None
    if shim:
        loader.role = "shim"
        raw = section_blob(ctx.loader, ac.find_section(ctx.loader, ctx.loader_pe,
                                                       ".vendor_cert")).read_at(0, 1 << 20)
        vendor = [(c, "shim's .vendor_cert") for c in ac.vendor_certs(raw)]
        nxt = ctx.cache.get("shim.next")
        if nxt is not None:
            links.append(Link(nxt[0], nxt[1], "next", db + vendor, "shim"))
    k = _kernel_link(ctx, db + vendor if shim else db, "shim" if shim else "the firmware")
    if k is not None:
        links.append(k)
    for ln in links[1:]:
        _read_sigs(ln)
    _signed(ctx, links)
    _digest(ctx, links)
    _chain(ctx, links, trust, shim)
    _sbat(ctx, links, shim)


def _kernel_link(ctx, anchors, by) -> Optional[Link]:
    ch = ctx.chain
    if ch is None or ch.kernel is None or ch.kind == "stub":
        return None
    if ch.kind == "uki":
        parent = getattr(ch.kernel, "parent", None)
        if parent is None or parent is ctx.loader or parent is (ctx.cache.get("shim.next")
                                                                 or (None, None))[1]:
            return None                  # the UKI is a link already; its sections are signed
        return Link("the UKI systemd-boot starts", parent, "kernel", anchors, by)
    return Link(ch.kernel_name, ch.kernel, "kernel", anchors, by)


def _read_sigs(ln: Link) -> None:
    try:
        ln.info = ac.read_pe_auth(ln.blob)
    except ac.PeAuthError as e:
        ln.table = ac.CertTable(problems=[str(e)])
        return
    ln.table = ac.read_cert_table(ln.blob, ln.info)
    for e in ln.table.entries:
        if e.type != ac.WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            continue
        try:
            ln.sigs.append((e, ac.parse_signature(e.data)))
        except ValueError as err:
            ln.sigs.append((e, f"WIN_CERTIFICATE at 0x{e.offset:X} holds no Authenticode "
                               f"signature: {err}"))


def _signed(ctx, links) -> None:
    bad, ok = [], []
    for ln in links:
        probs = list(ln.table.problems) if ln.table else []
        probs += [s for _, s in ln.sigs if isinstance(s, str)]
        if probs:
            bad.append(f"{ln.path}: " + "; ".join(probs[:3]))
        elif not ln.sigs:
            bad.append(f"{ln.path} carries no signature (data directory 4 is empty), so "
                       f"{ln.by} refuses it")
        else:
            ok.append(f"{ln.path} ({len(ln.sigs)} signature{'s' * (len(ln.sigs) > 1)})")
    if bad:
        ctx.set("sb.signed", "fail", "; ".join(bad))
    else:
        ctx.set("sb.signed", "pass", "WIN_CERTIFICATE rev 0x0200 type 2, 8-byte aligned: " +
                ", ".join(ok))


def _good_sigs(ln):
    return [s for _, s in ln.sigs if not isinstance(s, str)]


def _digest(ctx, links) -> None:
    bad, ok, none = [], [], []
    for ln in links:
        sigs = _good_sigs(ln)
        if not sigs:
            none.append(ln.path)
            continue
        algs = {s.digest_algorithm for s in sigs if s.digest_algorithm in ac.HASHES}
        if ln.blob.size > MAX_IMAGE:
            bad.append(f"{ln.path}: {ln.blob.size} bytes; larger than {MAX_IMAGE} is not "
                       "hashed")
            continue
        try:
            digests = {a: ac.image_digest(ln.blob, ln.info, a) for a in sorted(algs)}
        except ValueError as e:
            bad.append(f"{ln.path}: {e}")
            continue
        ln.digest = digests.get("sha256")
        match = [s for s in sigs if digests.get(s.digest_algorithm) == s.digest]
        if match:
            ok.append(f"{ln.path} {match[0].digest_algorithm} {match[0].digest.hex()[:16]}…")
        else:
            s = sigs[0]
            got = digests.get(s.digest_algorithm)
            bad.append(f"{ln.path}: recomputed {s.digest_algorithm} "
                       f"{got.hex()[:16] if got else '?'}… differs from the signed "
                       f"{s.digest.hex()[:16]}… (the image was changed after signing)")
    if bad:
        ctx.set("sb.digest", "fail", "; ".join(bad))
    elif ok:
        ctx.set("sb.digest", "pass", "Authenticode digest matches: " + ", ".join(ok) +
                (f"; not judged (unsigned, see sb.signed): {', '.join(none)}" if none else ""))
    else:
        ctx.set("sb.digest", "skip", "no readable signature to compare (see sb.signed)")


def _sha256(ln: Link) -> Optional[bytes]:
    """The link's Authenticode SHA-256 (for db/dbx hash entries), None when not computable."""
    if ln.digest is None and ln.info is not None and ln.blob.size <= MAX_IMAGE:
        try:
            ln.digest = ac.image_digest(ln.blob, ln.info)
        except ValueError:
            pass
    return ln.digest


def _chain(ctx, links, trust: Trust, shim: bool) -> None:
    bad, ok, unjudged = [], [], []
    for ln in links:
        sigs = _good_sigs(ln)
        digest = _sha256(ln) if trust.dbx or trust.hashes else ln.digest
        if digest is not None and digest in trust.dbx:
            bad.append(f"{ln.path}: its digest is in dbx (revoked)")
            continue
        if not sigs:
            if digest is not None and digest in trust.hashes:
                ok.append(f"{ln.path}: digest enrolled in db")
            else:
                bad.append(f"{ln.path}: unsigned (see sb.signed)")
            continue
        if not trust.given and (ln.role == "loader" or not shim):
            # Microsoft's CAs (the default trust) sign shims only: without shim in the chain
            # and without --db/--vars there is no db to judge this link against
            unjudged.append(f"{ln.path} signed by {sigs[0].signer_name}")
            continue
        anchors = [c for c, _ in ln.anchors]
        where = {id(c): w for c, w in ln.anchors}
        found, probs = None, []
        for s in sigs:
            if s.problems:
                probs += s.problems
                continue
            good, anchor = ac.chain_to(s, anchors)
            if good:
                found = (s, anchor)
                break
        if found:
            s, anchor = found
            ok.append(f"{ln.path}: {_cn(s.signer)} -> {_cn(anchor)} ({where.get(id(anchor))})")
        elif probs:
            bad.append(f"{ln.path}: " + "; ".join(dict.fromkeys(probs)))
        else:
            signers = ", ".join(dict.fromkeys(s.signer_name for s in sigs))
            trusted = "; ".join(f"{_cn(c)} ({w})" for c, w in ln.anchors) or "none"
            bad.append(f"{ln.path}: signed by {signers}, which chains to no trusted cert "
                       f"({ln.by} trusts: {trusted})")
    if bad:
        ctx.set("sb.chain", "fail", "; ".join(bad))
    elif unjudged:
        ctx.set("sb.chain", "skip", f"{'; '.join(unjudged)}: no db to judge a non-shim "
                "loader against (pass --db CERT or --vars FILE)" +
                (f"; {'; '.join(ok)}" if ok else ""))
    else:
        ctx.set("sb.chain", "pass", "; ".join(ok) + f" [db: {trust.source}]")


def _cn(cert) -> str:
    try:
        from cryptography.x509.oid import NameOID
        cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return cn[0].value if cn else ac.subject(cert)
    except Exception:
        return ac.subject(cert)


def _section_text(ln: Link, name: str):
    try:
        pe = parse_pe(ln.blob)
    except PeError:
        return None, None
    s = ac.find_section(ln.blob, pe, name)
    if s is None:
        return None, pe
    return section_blob(ln.blob, s).read_at(0, MAX_SBAT), pe


def _sbat(ctx, links, shim: bool) -> None:
    level = None
    if shim:
        raw, _ = _section_text(links[0], ".sbatlevel")
        level = ac.parse_sbatlevel(raw) if raw is not None else None
    bad, ok, notes = [], [], []
    for ln in links:
        raw, _ = _section_text(ln, ".sbat")
        if raw is None:
            # shim needs .sbat in itself and in what it starts (not in the kernel GRUB hands it)
            if shim and ln.role in ("shim", "next"):
                bad.append(f"{ln.path} has no .sbat section; shim refuses it")
            continue
        entries, probs = ac.parse_sbat(raw.split(b"\0", 1)[0].decode("ascii", "replace"))
        if probs or not entries:
            bad.append(f"{ln.path}: .sbat does not parse ({'; '.join(probs[:2]) or 'empty'})")
            continue
        gens = dict(entries)
        low = []
        if level is not None:
            req, _ = ac.parse_sbat(level["previous"])
            low = [f"{c} {gens[c]} < {g}" for c, g in req[1:] if c in gens and gens[c] < g]
            late, _ = ac.parse_sbat(level["latest"])
            notes += [f"{ln.path}: {c} {gens[c]} < {g} under shim's 'latest' policy"
                      for c, g in late[1:] if c in gens and gens[c] < g]
        if low:
            bad.append(f"{ln.path}: generation below shim's .sbatlevel: {', '.join(low)}")
        else:
            ok.append(f"{ln.path} ({', '.join(f'{c},{g}' for c, g in entries[1:4])})")
    tail = f"; notes: {'; '.join(notes[:3])}" if notes else ""
    if bad:
        ctx.set("sb.sbat", "fail", "; ".join(bad) + tail)
    elif not ok:
        ctx.set("sb.sbat", "skip", "no shim in the chain and no .sbat section; SBAT is "
                                   "enforced by shim only", applicable=False)
    else:
        lvl = (f" against shim's .sbatlevel ({level['previous'].splitlines()[0]})"
               if level else "" if shim else " (no shim: SBAT not enforced)")
        ctx.set("sb.sbat", "pass", ".sbat parses" + lvl + ": " + "; ".join(ok) + tail)
