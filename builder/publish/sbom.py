"""Software bill of materials, derived from the build manifest alone (so the same manifest
gives the same bytes): SPDX 2.3 JSON (<name>.spdx.json) and CycloneDX 1.5 JSON
(<name>.cdx.json).

What it lists: the image; its partitions (the ESP holds the loader, kernel, initramfs and
other files; the initramfs holds the kernel modules); one entry per Debian package (name,
version, architecture, sha256 of the .deb, purl pkg:deb/debian/<name>@<version>?arch=<arch>,
license from the package's machine-readable (DEP-5) copyright file, read at extraction and
kept in the manifest), and one per local file or URL input.
"""
from __future__ import annotations

import hashlib
import logging
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote

from builder.publish.output import canonical_json

COPYRIGHT_MAX = 1 << 20
NAMESPACE = uuid.UUID("5b0c7f0e-3a7e-5a8e-9b7a-61726d766d00")     # ours, for uuid5 names

# Debian's short license names (DEP-5 §7.2) -> SPDX identifiers
SPDX_IDS = {
    "GPL-1": "GPL-1.0-only", "GPL-1+": "GPL-1.0-or-later", "GPL-2": "GPL-2.0-only",
    "GPL-2+": "GPL-2.0-or-later", "GPL-3": "GPL-3.0-only", "GPL-3+": "GPL-3.0-or-later",
    "LGPL-2": "LGPL-2.0-only", "LGPL-2+": "LGPL-2.0-or-later", "LGPL-2.1": "LGPL-2.1-only",
    "LGPL-2.1+": "LGPL-2.1-or-later", "LGPL-3": "LGPL-3.0-only", "LGPL-3+": "LGPL-3.0-or-later",
    "AGPL-3": "AGPL-3.0-only", "AGPL-3+": "AGPL-3.0-or-later", "Expat": "MIT", "MIT": "MIT",
    "BSD-2-clause": "BSD-2-Clause", "BSD-3-clause": "BSD-3-Clause", "BSD-4-clause": "BSD-4-Clause",
    "Apache-2.0": "Apache-2.0", "MPL-2.0": "MPL-2.0", "ISC": "ISC", "Zlib": "Zlib",
    "CC0-1.0": "CC0-1.0", "CC-BY-SA-3.0": "CC-BY-SA-3.0", "Artistic-2.0": "Artistic-2.0",
}


def copyright_license(tree: Path, package: str) -> Optional[str]:
    """The `License:` of the `Files: *` paragraph of usr/share/doc/<package>/copyright in
    an extracted package tree, when that file is machine-readable (DEP-5); else None.
    Bounded: a regular file (no symlink followed) of at most 1 MiB."""
    path = tree / "usr" / "share" / "doc" / package / "copyright"
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > COPYRIGHT_MAX:
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return dep5_license(text)


def dep5_license(text: str) -> Optional[str]:
    """The `License:` synopsis of the `Files: *` paragraph of a DEP-5 copyright file; None
    when the text is not machine-readable or has no such paragraph."""
    if not text.startswith("Format:"):
        return None
    from debian.copyright import Copyright
    logging.getLogger("debian.copyright").setLevel(logging.ERROR)   # "Fixing Format URL"
    try:
        doc = Copyright(text.splitlines(True), strict=False)
        for par in doc.all_files_paragraphs():
            if "*" in par.files and par.license is not None and par.license.synopsis:
                return par.license.synopsis.strip()
    except Exception:          # not machine-readable after all: no license claimed
        return None
    return None


DOC = "usr/share/doc/"


def tar_licenses(tar_path: Path, packages) -> Dict[str, str]:
    """{package: DEP-5 license} for the `packages` whose usr/share/doc/<package>/copyright
    in the root tarball is machine-readable. Read from the tar itself (no extraction, no
    host path involved): only regular members of at most COPYRIGHT_MAX bytes are read; a
    doc folder that is a symlink to a sibling (libfoo-dev -> libfoo1, Debian's usual way)
    is followed one step inside the tar."""
    import tarfile
    wanted = set(packages)
    texts: Dict[str, str] = {}
    links: Dict[str, str] = {}
    try:
        with tarfile.open(tar_path) as tar:
            for info in tar:
                name = info.name[2:] if info.name.startswith("./") else info.name
                if not name.startswith(DOC):
                    continue
                rest = name[len(DOC):].rstrip("/")
                pkg, _, leaf = rest.partition("/")
                if not leaf and info.issym() and pkg in wanted and "/" not in info.linkname.rstrip("/"):
                    links[pkg] = info.linkname.rstrip("/")
                elif leaf == "copyright" and info.isreg() and info.size <= COPYRIGHT_MAX:
                    f = tar.extractfile(info)
                    if f is not None:
                        texts[pkg] = f.read(COPYRIGHT_MAX).decode("utf-8", "replace")
    except (tarfile.TarError, OSError):
        return {}                      # the SBOM then says NOASSERTION, as before
    out: Dict[str, str] = {}
    parsed: Dict[str, Optional[str]] = {}
    for pkg in sorted(wanted):
        src = pkg if pkg in texts else links.get(pkg)
        if src is None or src not in texts:
            continue
        if src not in parsed:
            parsed[src] = dep5_license(texts[src])
        if parsed[src]:
            out[pkg] = parsed[src]
    return out


def spdx_expression(debian: Optional[str]) -> Tuple[str, List[str]]:
    """(SPDX license expression, LicenseRef ids it uses) for a Debian license synopsis."""
    if not debian:
        return "NOASSERTION", []
    refs: List[str] = []
    out = []
    for token in re.split(r"(\s+(?:or|and|with)\s+)", debian.strip(), flags=re.I):
        if re.fullmatch(r"\s+(?:or|and|with)\s+", token, flags=re.I):
            op = token.strip().upper()
            out.append(" WITH " if op == "WITH" else f" {op} ")
            continue
        sid = SPDX_IDS.get(token.strip())
        if sid is None:
            sid = "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.-]+", "-", token.strip()).strip("-") or "unknown")
            refs.append(sid)
        out.append(sid)
    expr = "".join(out)
    if " WITH " in expr:                 # exceptions need the SPDX exception list: keep it simple
        ref = "LicenseRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", debian.strip()).strip("-")
        return ref, [ref]
    return expr, refs


def _packages(manifest: dict) -> List[dict]:
    """Debian packages and local/URL inputs from manifest["inputs"], in a fixed order."""
    arch = manifest.get("debian_arch") or {"aarch64": "arm64", "armv7": "armhf"}.get(
        manifest["recipe"]["arch"], manifest["recipe"]["arch"])
    out, seen = [], set()
    for item in manifest["inputs"]:
        origin = item["origin"]
        if origin.startswith("debian:") and "filename" in item:
            name, version = origin[len("debian:"):].split("=", 1)
            m = re.search(r"_([a-z0-9]+)\.deb$", item["filename"])
            parch = m.group(1) if m else arch
            key = ("deb", name, version)
            entry = {"kind": "deb", "name": name, "version": version, "arch": parch,
                     "sha256": item["sha256"], "role": item["role"], "license": item.get("license"),
                     "purl": f"pkg:deb/debian/{quote(name)}@{quote(version, safe=':')}?arch={parch}",
                     "download": item["filename"]}
        elif origin.startswith("debian:"):
            continue                       # a file inside a package already listed
        else:
            key = ("input", origin, item["sha256"])
            kind = origin.partition(":")[0]
            entry = {"kind": kind, "name": origin, "version": None, "sha256": item["sha256"],
                     "role": item["role"], "license": None, "purl": None,
                     "download": None}
            if origin.startswith(("https:", "http:")):
                entry["download"] = origin
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return sorted(out, key=lambda e: (e["kind"] != "deb", e["name"], e["version"] or ""))


def _esp(manifest: dict) -> Optional[dict]:
    return next((p for p in manifest["layout"]["partitions"] if p.get("kind") == "esp"), None)


def _created(manifest: dict) -> str:
    return datetime.fromtimestamp(manifest["source_date_epoch"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sid(text: str) -> str:
    return "SPDXRef-" + re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")


def spdx_document(manifest: dict) -> dict:
    """SPDX 2.3 JSON document for the image the manifest describes."""
    name = manifest["recipe"]["name"]
    digest = hashlib.sha256(canonical_json(manifest).encode()).hexdigest()
    pkgs: List[dict] = []
    rels: List[dict] = []
    refs: Dict[str, dict] = {}

    taken: Dict[str, int] = {}

    def add(spdxid, pname, *, version=None, sha256=None, purpose="FILE", license_=None, purl=None,
            download=None, comment=None):
        n = taken[spdxid] = taken.get(spdxid, 0) + 1
        if n > 1:                                   # two names that sanitize alike stay apart
            spdxid = f"{spdxid}-{n}"
        expr, used = spdx_expression(license_)
        for r in used:
            refs[r] = {"licenseId": r, "extractedText": f"Debian license name: {license_}",
                       "name": r[len("LicenseRef-"):]}
        p = {"SPDXID": spdxid, "name": pname, "downloadLocation": download or "NOASSERTION",
             "filesAnalyzed": False, "licenseConcluded": "NOASSERTION", "licenseDeclared": expr,
             "copyrightText": "NOASSERTION", "primaryPackagePurpose": purpose}
        if version:
            p["versionInfo"] = version
        if sha256:
            p["checksums"] = [{"algorithm": "SHA256", "checksumValue": sha256}]
        if purl:
            p["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                  "referenceLocator": purl}]
        if comment:
            p["comment"] = comment
        pkgs.append(p)
        return spdxid

    image_id = _sid(f"image-{name}")
    add(image_id, f"{name}.raw", sha256=manifest.get("image_sha256"), purpose="OPERATING-SYSTEM",
        comment=f"raw GPT disk image, {manifest['layout']['disk_bytes']} bytes")
    rels.append({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                 "relatedSpdxElement": image_id})
    deb_ids = {}
    for e in _packages(manifest):
        sid = _sid(("deb-" if e["kind"] == "deb" else "input-") + e["name"] + (f"-{e['version']}" if e["version"] else ""))
        sid = add(sid, e["name"], version=e["version"], sha256=e["sha256"], download=e["download"] if e["kind"] != "deb" else None,
            purpose="INSTALL" if e["kind"] == "deb" else "FILE", license_=e["license"], purl=e["purl"],
            comment=f"role: {e['role']}" + (f"; arch: {e['arch']}; {e['download']}" if e["kind"] == "deb" else ""))
        deb_ids.setdefault(e["role"], []).append(sid)
        rels.append({"spdxElementId": image_id, "relationshipType": "DEPENDS_ON", "relatedSpdxElement": sid})
    for part in manifest["layout"]["partitions"]:
        pid = _sid(f"partition-{part['number']}")
        pid = add(pid, part.get("name") or f"partition {part['number']}",
            comment=f"GPT partition {part['number']}, type {part['type_guid']}, "
                    f"{part['size']} bytes at {part['offset']}, {part.get('filesystem') or 'no file system'}")
        rels.append({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pid})
        if part.get("kind") == "root":                # the root's pinned Debian packages
            for sid in deb_ids.get("rootfs.debian", []):
                rels.append({"spdxElementId": pid, "relationshipType": "CONTAINS", "relatedSpdxElement": sid})
        for f in part.get("files", ()):
            fid = _sid(f"file-{part['number']}-{f['dest']}")
            fid = add(fid, f["dest"], sha256=f["sha256"], comment=f"role: {f['role']}, {f['size']} bytes")
            rels.append({"spdxElementId": pid, "relationshipType": "CONTAINS", "relatedSpdxElement": fid})
            source_roles = {"kernel": ["kernel"], "loader": ["bootloader"], "initrd": ["busybox", "kernel"]}
            for role in source_roles.get(f["role"], []):
                for sid in deb_ids.get(role, []):
                    rels.append({"spdxElementId": fid, "relationshipType": "GENERATED_FROM",
                                 "relatedSpdxElement": sid})
            if f["role"] == "initrd":
                for mod in manifest.get("initramfs", {}).get("modules", []):
                    mid = _sid(f"module-{mod}")
                    mid = add(mid, f"{mod}.ko", comment="kernel module in the initramfs")
                    rels.append({"spdxElementId": fid, "relationshipType": "CONTAINS", "relatedSpdxElement": mid})
    doc = {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{name} disk image",
        "documentNamespace": f"https://spdx.org/spdxdocs/armvm-build/{name}-{uuid.uuid5(NAMESPACE, digest)}",
        "creationInfo": {"created": _created(manifest),
                         "creators": [f"Tool: armvm-build-{manifest['tool']['version']}"]},
        "packages": pkgs, "relationships": rels,
    }
    if refs:
        doc["hasExtractedLicensingInfos"] = [refs[k] for k in sorted(refs)]
    return doc


def cyclonedx_document(manifest: dict) -> dict:
    """CycloneDX 1.5 JSON BOM: the image as metadata.component, the ESP with its files
    nested (the initramfs nests its modules), Debian packages and other inputs beside."""
    name = manifest["recipe"]["name"]
    digest = hashlib.sha256(canonical_json(manifest).encode()).hexdigest()

    def sha(h):
        return [{"alg": "SHA-256", "content": h}] if h else None

    def comp(ref, ctype, cname, **kw):
        c = {"bom-ref": ref, "type": ctype, "name": cname}
        c.update({k: v for k, v in kw.items() if v is not None})
        return c

    components, deps = [], []
    by_role: Dict[str, List[str]] = {}
    for e in _packages(manifest):
        ref = e["purl"] or f"input:{e['name']}"
        lic = None
        if e["license"]:
            expr, used = spdx_expression(e["license"])
            lic = [{"expression": expr}] if not used else [{"license": {"name": e["license"]}}]
        props = [{"name": "armvm-build:role", "value": e["role"]}]
        if e["kind"] == "deb":
            props.append({"name": "armvm-build:arch", "value": e["arch"]})
        components.append(comp(ref, "library" if e["kind"] == "deb" else "file", e["name"],
                               version=e["version"], hashes=sha(e["sha256"]), licenses=lic, purl=e["purl"],
                               properties=props))
        by_role.setdefault(e["role"], []).append(ref)
    image_ref = f"image:{name}"
    parts = []
    for part in manifest["layout"]["partitions"]:
        pref = f"partition:{part['number']}"
        files = []
        for f in part.get("files", ()):
            fref = f"file:{part['number']}:{f['dest']}"
            inner = None
            if f["role"] == "initrd":
                inner = [comp(f"module:{m}", "file", f"{m}.ko")
                         for m in manifest.get("initramfs", {}).get("modules", [])] or None
            files.append(comp(fref, "file", f["dest"], hashes=sha(f["sha256"]), components=inner,
                              properties=[{"name": "armvm-build:role", "value": f["role"]}]))
            roles = {"kernel": ["kernel"], "loader": ["bootloader"], "initrd": ["busybox", "kernel"]}
            src = sorted({r for role in roles.get(f["role"], []) for r in by_role.get(role, [])})
            if src:
                deps.append({"ref": fref, "dependsOn": src})
        if part.get("kind") == "root" and by_role.get("rootfs.debian"):
            deps.append({"ref": pref, "dependsOn": sorted(by_role["rootfs.debian"])})
        parts.append(comp(pref, "file", part.get("name") or f"partition {part['number']}", components=files or None,
                          properties=[{"name": "armvm-build:type_guid", "value": part["type_guid"]},
                                      {"name": "armvm-build:offset", "value": str(part["offset"])},
                                      {"name": "armvm-build:size", "value": str(part["size"])}]))
    deps.insert(0, {"ref": image_ref, "dependsOn": sorted(c["bom-ref"] for c in components)})
    return {
        "bomFormat": "CycloneDX", "specVersion": "1.5",
        "serialNumber": f"urn:uuid:{uuid.uuid5(NAMESPACE, digest)}", "version": 1,
        "metadata": {
            "timestamp": _created(manifest),
            "tools": {"components": [{"type": "application", "name": "armvm-build",
                                      "version": manifest["tool"]["version"]}]},
            "component": comp(image_ref, "file", f"{name}.raw", hashes=sha(manifest.get("image_sha256")),
                              components=parts or None),
        },
        "components": components,
        "dependencies": deps,
    }


SBOM_FILES = {"spdx": ("spdx.json", spdx_document), "cyclonedx": ("cdx.json", cyclonedx_document)}


def stage_sbom(staging, name: str, manifest: dict, kinds) -> List[str]:
    """Write each requested SBOM under a staging name; returns the final names."""
    names = []
    for kind in kinds:
        suffix, make = SBOM_FILES[kind]
        final = f"{name}.{suffix}"
        staging.write_text(final, canonical_json(make(manifest)))
        names.append(final)
    return names
